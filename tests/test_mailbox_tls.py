"""STLS (POP3) and STARTTLS (IMAP) end to end: poplib and imaplib through the gateway to a real Dovecot.

Dovecot (Debian ``dovecot-pop3d`` and ``dovecot-imapd``) is started once per
test module and process, with a private configuration: its own base
directory, a certificate made here with trustme, one user in a static
passwd-file, a Maildir holding one message, listeners on free loopback
ports and its log in a file.  It is stopped when the process exits.
"""

import atexit
import grp
import imaplib
import os
import poplib
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from types import MappingProxyType

import trustme
from twisted.internet import defer, protocol, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mailguard.policy import Rule
from tests.clients import wait_for
from tests.harness import start_gateway
from tests.test_gateway import GatewayTestCase
from tests.clients import free_port as _free_port

CA = trustme.CA()
#: The gateway's certificate (what a client sees under tls = terminate).
GATEWAY_CERT = CA.issue_cert("gateway.test", "127.0.0.1")
#: Dovecot's certificate (what a client sees under tls = passthrough, and the gateway under terminate).
DOVECOT_CERT = CA.issue_cert("dovecot.test", "127.0.0.1")

USER, PASSWORD = "bob", "s3cret-pass"
MESSAGE = (b"From: a@example.org\r\nTo: bob@example.org\r\nSubject: over TLS\r\n\r\n"
           b".leading dot\r\nQUIT\r\nlast line\r\n")

CONFIG = """\
base_dir = {dir}/run
state_dir = {dir}/state
instance_name = mailguard-test-{pid}
log_path = {dir}/dovecot.log
protocols = pop3 imap
listen = 127.0.0.1
ssl = yes
ssl_cert = <{dir}/cert.pem
ssl_key = <{dir}/key.pem
ssl_min_protocol = TLSv1.2
auth_mechanisms = plain login
first_valid_uid = {uid}
last_valid_uid = {uid}
{users}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {dir}/passwd
}}
userdb {{
  driver = passwd-file
  args = {dir}/passwd
}}
mail_location = maildir:{dir}/mail/%u
service pop3-login {{
  {chroot}
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap-login {{
  {chroot}
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""




def _die_with_parent():
    """In the child: get SIGTERM if the test process dies before stopping Dovecot (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _dovecot_binary():
    for path in (shutil.which("dovecot"), "/usr/sbin/dovecot"):
        if path and os.access(path, os.X_OK):
            return path
    return None


class Dovecot:
    """A private Dovecot offering STLS and STARTTLS on two free loopback ports."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="mailguard-dovecot-")
        self.proc = None
        self.pop3 = self.imap = None

    @property
    def log_path(self):
        """Dovecot's log file."""
        return os.path.join(self.dir, "dovecot.log")

    def log(self):
        """Everything Dovecot has logged so far."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def start(self, binary):
        """Write the configuration and start Dovecot in the foreground; wait until both ports answer."""
        d = self.dir
        os.chmod(d, 0o755)  # the mail user must reach its Maildir
        DOVECOT_CERT.cert_chain_pems[0].write_to_path(os.path.join(d, "cert.pem"))
        DOVECOT_CERT.private_key_pem.write_to_path(os.path.join(d, "key.pem"))
        if os.geteuid() == 0:
            # Dovecot refuses to read mail as root: the Maildir belongs to nobody.
            user = pwd.getpwnam("nobody")
            users, chroot = "", ""
        else:
            # Dovecot can run unprivileged when its internal users are the caller.
            user = pwd.getpwuid(os.geteuid())
            group = grp.getgrgid(os.getegid()).gr_name
            users = ("default_internal_user = %s\ndefault_login_user = %s\ndefault_internal_group = %s\n"
                     "service anvil {\n  chroot =\n}\n" % (user.pw_name, user.pw_name, group))
            chroot = "chroot ="
        uid, gid = user.pw_uid, user.pw_gid
        mail = os.path.join(d, "mail", USER)
        for sub in ("new", "cur", "tmp"):
            os.makedirs(os.path.join(mail, sub))
        with open(os.path.join(mail, "new", "1000000000.M1P1.test"), "wb") as f:
            f.write(MESSAGE.replace(b"\r\n", b"\n"))
        for root, dirs, files in os.walk(os.path.join(d, "mail")):
            for name in [root] + [os.path.join(root, n) for n in dirs + files]:
                os.chown(name, uid, gid)
        with open(os.path.join(d, "passwd"), "w") as f:
            f.write("%s:{PLAIN}%s:%d:%d::%s::\n" % (USER, PASSWORD, uid, gid, mail))
        last = ""
        for attempt in range(3):  # a free port may be taken between the probe and Dovecot's bind
            self.pop3, self.imap = _free_port(), _free_port()
            conf = os.path.join(d, "dovecot.conf")
            with open(conf, "w") as f:
                f.write(CONFIG.format(dir=d, pid=os.getpid(), uid=uid, users=users, chroot=chroot,
                                      pop3=self.pop3, imap=self.imap))
            self.proc = subprocess.Popen([binary, "-F", "-c", conf], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         preexec_fn=_die_with_parent)
            if self._wait_ready(15):
                return
            last = self._stop_process()
        raise RuntimeError("Dovecot did not start: %s %s" % (last.strip()[-500:], self.log()[-1500:]))

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                for port in (self.pop3, self.imap):
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def _stop_process(self):
        proc, self.proc = self.proc, None
        if proc is None:
            return ""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        err = proc.stderr.read().decode("utf-8", "replace")
        proc.stderr.close()
        return err

    def stop(self):
        """Stop Dovecot and remove its directory."""
        self._stop_process()
        shutil.rmtree(self.dir, ignore_errors=True)


_dovecot = None
_failed = None


def dovecot():
    """The module's Dovecot, started on first use and stopped when the process exits.

    A Dovecot that would not start is tried once: every test needing it
    then fails with the same error (and its log).
    """
    global _dovecot, _failed
    if _failed is not None:
        raise _failed
    if _dovecot is None:
        binary = _dovecot_binary()
        if binary is None or not os.path.exists("/usr/lib/dovecot/pop3") or not os.path.exists("/usr/lib/dovecot/imap"):
            raise SkipTest("Dovecot is not installed (Debian packages dovecot-pop3d and dovecot-imapd; "
                           ".ci/run installs them)")
        server = Dovecot()
        atexit.register(server.stop)
        try:
            server.start(binary)
        except RuntimeError as e:
            _failed = e
            raise
        _dovecot = server
    return _dovecot


def client_context():
    """An ssl context trusting the test CA (both the gateway's and Dovecot's certificates)."""
    ctx = ssl.create_default_context()
    CA.configure_trust(ctx)
    return ctx


def peer_names(sock):
    """The DNS names of the certificate ``sock``'s peer presented."""
    return [v for k, v in sock.getpeercert().get("subjectAltName", ()) if k == "DNS"]


class MailboxTLSTestCase(GatewayTestCase):
    """A gateway for pop3 or imap in front of the module's Dovecot."""

    def setUp(self):
        super().setUp()
        self.dovecot = dovecot()
        self.log_start = len(self.dovecot.log())
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        self.ca_file = os.path.join(d, "ca.pem")
        CA.cert_pem.write_to_path(self.ca_file)
        self.cert_file = os.path.join(d, "cert.pem")
        self.key_file = os.path.join(d, "key.pem")
        GATEWAY_CERT.cert_chain_pems[0].write_to_path(self.cert_file)
        GATEWAY_CERT.private_key_pem.write_to_path(self.key_file)

    def mailbox_gateway(self, protocol, secure_login=True, **rule):
        """A gateway for ``protocol`` in front of Dovecot; return its port."""
        rule.setdefault("tls", "terminate")
        if rule["tls"] == "terminate":
            rule.setdefault("tls_certificate", self.cert_file)
            rule.setdefault("tls_key", self.key_file)
            rule.setdefault("backend_tls", "required")
        rule.setdefault("backend_ca", self.ca_file)
        rule.setdefault("backend_hostname", "dovecot.test")
        self.rule = Rule(name="TEST", protocol=protocol,
                         options=MappingProxyType({"secure-login": secure_login}), **rule)
        backend = self.dovecot.pop3 if protocol == "pop3" else self.dovecot.imap
        self.tracker, port = start_gateway(self, self.rule, backend)
        return port

    @defer.inlineCallbacks
    def closed_without_finwait(self):
        """The session the gateway closed leaves the table by itself: its TLS legs closed, finwait never fired."""
        tracker = self.tracker
        yield wait_for(lambda: not tracker.sessions)
        self.assertEqual(tracker.timeouts["finwait"], 0)

    def logins(self):
        """Dovecot's login lines logged since this test began."""
        return [line for line in self.dovecot.log()[self.log_start:].splitlines() if "Login: user=<" in line]


class POP3Tests(MailboxTLSTestCase):
    """poplib's stls() through the gateway to Dovecot."""

    def session(self, port):
        """CAPA, a refused USER, stls(), CAPA, login, RETR 1; return what poplib saw."""
        c = poplib.POP3("127.0.0.1", port, timeout=10)
        try:
            before = c.capa()
            try:
                c.user(USER)
                refused = None
            except poplib.error_proto as e:
                refused = e.args[0]
            c.stls(context=client_context())
            names = peer_names(c.sock)
            after = c.capa()
            c.user(USER)
            c.pass_(PASSWORD)
            lines = c.retr(1)[1]
            c.quit()
        finally:
            c.close()
        return before, refused, names, after, lines

    @defer.inlineCallbacks
    def test_terminate(self):
        """terminate: the gateway's STLS and certificate, login only after it, RETR intact, Dovecot's leg TLS too."""
        port = self.mailbox_gateway("pop3")
        before, refused, names, after, lines = yield deferToThread(self.session, port)
        self.assertIn("STLS", before)
        self.assertNotIn("USER", before)  # secure-login: no login before TLS
        self.assertEqual(refused, b"-ERR [SYS/PERM] Login refused before TLS (secure-login)")
        self.assertEqual(names, ["gateway.test"])
        self.assertNotIn("STLS", after)
        self.assertIn("USER", after)
        self.assertEqual(b"\r\n".join(lines) + b"\r\n", MESSAGE)
        yield wait_for(lambda: self.logins())
        (login,) = self.logins()
        self.assertIn("user=<%s>" % USER, login)
        self.assertIn(", TLS,", login)  # the gateway's own leg to Dovecot is TLS (backend-tls = required)

    @defer.inlineCallbacks
    def test_terminate_backend_off(self):
        """terminate with backend-tls = off: the client's leg is TLS, the gateway's leg to Dovecot is not."""
        port = self.mailbox_gateway("pop3", backend_tls="off")
        before, refused, names, after, lines = yield deferToThread(self.session, port)
        self.assertEqual(names, ["gateway.test"])
        self.assertEqual(b"\r\n".join(lines) + b"\r\n", MESSAGE)
        yield wait_for(lambda: self.logins())
        (login,) = self.logins()
        self.assertNotIn(", TLS,", login)

    @defer.inlineCallbacks
    def test_passthrough(self):
        """passthrough: Dovecot's own STLS and certificate reach poplib; TLS_PASSTHROUGH is logged."""
        port = self.mailbox_gateway("pop3", tls="passthrough", secure_login=False)

        def talk():
            c = poplib.POP3("127.0.0.1", port, timeout=10)
            try:
                capa = c.capa()
                c.stls(context=client_context())
                names = peer_names(c.sock)
                c.user(USER)
                c.pass_(PASSWORD)
                lines = c.retr(1)[1]
                c.quit()
            finally:
                c.close()
            return capa, names, lines

        capa, names, lines = yield deferToThread(talk)
        self.assertIn("STLS", capa)
        self.assertEqual(names, ["dovecot.test"])
        self.assertEqual(b"\r\n".join(lines) + b"\r\n", MESSAGE)
        self.assertEqual(len(self.alerts("TLS_PASSTHROUGH")), 1)
        yield wait_for(lambda: self.logins())
        self.assertIn(", TLS,", self.logins()[0])

    @defer.inlineCallbacks
    def test_injection(self):
        """Commands pipelined after STLS are refused and the session closes; Dovecot sees no login."""
        for mode in ("terminate", "passthrough"):
            port = self.mailbox_gateway("pop3", tls=mode, secure_login=False)
            got = yield deferToThread(raw_exchange, port, b"STLS\r\nUSER bob\r\nPASS %s\r\n" % PASSWORD.encode())
            self.assertTrue(got.startswith(b"+OK Dovecot"), got)
            self.assertTrue(got.endswith(b"\r\n-ERR Protocol error: data sent after STLS, closing connection\r\n"), got)
            self.assertNotIn(b"Begin TLS", got)
            yield self.closed_without_finwait()
        self.assertEqual(len(self.alerts("STARTTLS_INJECTION")), 2)
        self.assertEqual(self.logins(), [])

    @defer.inlineCallbacks
    def test_required_wrong_name(self):
        """backend-tls = required and a Dovecot certificate for another name: the client gets -ERR, no greeting."""
        port = self.mailbox_gateway("pop3", backend_hostname="other.test")
        got = yield deferToThread(raw_exchange, port, b"")
        self.assertEqual(got, b"-ERR [SYS/TEMP] TLS to the mail server failed, closing connection\r\n")


class IMAPTests(MailboxTLSTestCase):
    """imaplib's starttls() through the gateway to Dovecot."""

    def session(self, port):
        """Capabilities, a refused LOGIN, starttls(), capabilities, login, SELECT and FETCH; return what imaplib saw."""
        c = imaplib.IMAP4("127.0.0.1", port, timeout=10)
        try:
            before = c.capabilities
            try:
                c.login(USER, PASSWORD)
                refused = None
            except imaplib.IMAP4.error as e:
                refused = str(e)
            c.starttls(ssl_context=client_context())
            names = peer_names(c.sock)
            after = c.capabilities  # imaplib asks again after STARTTLS
            c.login(USER, PASSWORD)
            count = c.select("INBOX")[1][0]
            data = c.fetch("1", "(BODY.PEEK[])")[1]
            c.logout()
        finally:
            if c.state != "LOGOUT":  # logout() closes the socket itself
                c.shutdown()
        return before, refused, names, after, count, data[0][1]

    @defer.inlineCallbacks
    def test_terminate(self):
        """terminate: the gateway's STARTTLS and certificate, login only after it, FETCH intact, TLS to Dovecot too."""
        port = self.mailbox_gateway("imap")
        before, refused, names, after, count, body = yield deferToThread(self.session, port)
        self.assertIn("STARTTLS", before)
        self.assertIn("LOGINDISABLED", before)
        self.assertIn("PRIVACYREQUIRED", refused or "")
        self.assertEqual(names, ["gateway.test"])
        self.assertNotIn("STARTTLS", after)
        self.assertNotIn("LOGINDISABLED", after)
        self.assertIn("AUTH=PLAIN", after)
        self.assertEqual(count, b"1")
        self.assertEqual(body, MESSAGE)
        yield wait_for(lambda: self.logins())
        (login,) = self.logins()
        self.assertIn(", TLS,", login)

    @defer.inlineCallbacks
    def test_passthrough(self):
        """passthrough: Dovecot's own STARTTLS and certificate reach imaplib; TLS_PASSTHROUGH is logged."""
        port = self.mailbox_gateway("imap", tls="passthrough", secure_login=False)

        def talk():
            c = imaplib.IMAP4("127.0.0.1", port, timeout=10)
            try:
                before = c.capabilities
                c.starttls(ssl_context=client_context())
                names = peer_names(c.sock)
                c.login(USER, PASSWORD)
                count = c.select("INBOX")[1][0]
                data = c.fetch("1", "(BODY.PEEK[])")[1]
                c.logout()
            finally:
                if c.state != "LOGOUT":
                    c.shutdown()
            return before, names, count, data[0][1]

        before, names, count, body = yield deferToThread(talk)
        self.assertIn("STARTTLS", before)
        self.assertEqual(names, ["dovecot.test"])
        self.assertEqual(count, b"1")
        self.assertEqual(body, MESSAGE)
        self.assertEqual(len(self.alerts("TLS_PASSTHROUGH")), 1)
        yield wait_for(lambda: self.logins())
        self.assertIn(", TLS,", self.logins()[0])

    @defer.inlineCallbacks
    def test_injection(self):
        """Commands pipelined after STARTTLS are refused and the session closes; Dovecot sees no login."""
        for mode in ("terminate", "passthrough"):
            port = self.mailbox_gateway("imap", tls=mode, secure_login=False)
            got = yield deferToThread(raw_exchange, port, b"a STARTTLS\r\nb LOGIN bob %s\r\n" % PASSWORD.encode())
            self.assertTrue(got.startswith(b"* OK "), got)
            self.assertTrue(got.endswith(b"\r\n* BYE Protocol error: data sent after STARTTLS, closing connection\r\n"),
                            got)
            self.assertNotIn(b"a OK", got)
            yield self.closed_without_finwait()
        self.assertEqual(len(self.alerts("STARTTLS_INJECTION")), 2)
        self.assertEqual(self.logins(), [])


class InjectingServer(protocol.Protocol):
    """A POP3 server that answers STLS with +OK and a forged response in the same segment."""

    def connectionMade(self):
        """Greet."""
        self.transport.write(b"+OK ready\r\n")

    def dataReceived(self, data):
        """Answer STLS with the injection, anything else with +OK."""
        for line in data.split(b"\r\n")[:-1]:
            if line == b"STLS":
                self.transport.write(b"+OK Begin TLS\r\n+OK injected\r\n")
            else:
                self.transport.write(b"+OK\r\n")


class ServerInjectionTests(GatewayTestCase):
    """A server that pipelines after its +OK to the gateway's STLS is never relayed."""

    @defer.inlineCallbacks
    def test_server_injection(self):
        """The client gets -ERR instead of the greeting, and never the injected response."""
        factory = protocol.ServerFactory.forProtocol(InjectingServer)
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        GATEWAY_CERT.cert_chain_pems[0].write_to_path(cert)
        GATEWAY_CERT.private_key_pem.write_to_path(key)
        port = self.gateway(listening.getHost().port, protocol="pop3", tls="terminate", tls_certificate=cert,
                            tls_key=key, backend_tls="opportunistic")
        got = yield deferToThread(raw_exchange, port, b"")
        self.assertEqual(got, b"-ERR [SYS/TEMP] Mail server sent data after STLS, closing connection\r\n")
        self.assertEqual(len(self.alerts("STARTTLS_INJECTION")), 1)


def raw_exchange(port, data):
    """Read the greeting, send ``data`` in one segment, and return everything until the gateway closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        f = sock.makefile("rb")
        out = f.readline()
        if data:
            sock.sendall(data)
        while True:
            chunk = f.read1(65536)
            if not chunk:
                return out
            out += chunk
    finally:
        sock.close()


class TLSPolicyTests(SynchronousTestCase):
    """The policy accepts the TLS keys for pop3 and imap, and says which protocols take them."""

    LISTENER = "[listener l]\nlisten = tcp:1110\nbackend = tcp:host=mx:port=110\ninspect = R\n"

    def parse(self, rule):
        """Parse a one-rule policy against the installed protocols."""
        from mailguard.inspectors import registry
        from mailguard.policy import parse_policy

        return parse_policy("[inspect R]\n" + rule + self.LISTENER, path="p.ini", protocols=registry())

    def test_terminate(self):
        """pop3 and imap take tls = terminate with a certificate, and passthrough without one."""
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        GATEWAY_CERT.cert_chain_pems[0].write_to_path(cert)
        GATEWAY_CERT.private_key_pem.write_to_path(key)
        for name in ("pop3", "imap"):
            rule = self.parse("protocol = %s\ntls = terminate\ntls-certificate = %s\ntls-key = %s\n"
                              "backend-tls = required\nsecure-login = on\n" % (name, cert, key)).rule("R")
            self.assertEqual((rule.tls, rule.backend_tls, rule.options["secure-login"]), ("terminate", "required", True))
            self.assertEqual(self.parse("protocol = %s\ntls = passthrough\n" % name).rule("R").tls, "passthrough")

    def test_errors(self):
        """terminate needs a certificate; a protocol without STARTTLS is named in a one-line error."""
        from mailguard.policy import PolicyError

        e = self.assertRaises(PolicyError, self.parse, "protocol = imap\ntls = terminate\n")
        self.assertEqual(str(e), "p.ini: [inspect R] tls: tls = terminate needs tls-certificate and tls-key")
        e = self.assertRaises(PolicyError, self.parse, "protocol = tcp\ntls = passthrough\n")
        self.assertEqual(str(e), "p.ini: [inspect R] tls: tls = passthrough needs protocol = esmtp, pop3 or imap "
                                 "(protocol = tcp has no STARTTLS)")
