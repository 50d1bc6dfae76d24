"""Security and robustness, tested from outside with real clients: AUTH only inside TLS, no side
door to the embedded backend, trickling clients, credentials never logged, modern TLS, one rule
for over-long lines, NUL in message data."""

import os
import smtplib
import socket
import ssl

import trustme
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from mailguard.policy import parse_policy
from mailguard.service import build_service
from tests.clients import LockstepClient, read_reply, wait_for
from tests.test_gateway import GatewayTestCase
from tests.clients import free_port

# RSA, so that static-RSA suites could be negotiated at all if the gateway offered them.
CA = trustme.CA(key_type=trustme.KeyType.RSA)
CERT = CA.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)

#: The TLS 1.2 suites the default tls-ciphers accepts with an RSA certificate.
MODERN_RSA_SUITES = {
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
}




def tls12_suites():
    """Every TLS 1.2 cipher suite this machine's OpenSSL can offer as a client."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    return sorted({c["name"] for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3"})


def client_context(suite=None):
    """A TLS 1.2-only client context trusting the test CA, offering only ``suite`` when given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    CA.configure_trust(ctx)
    if suite is not None:
        ctx.set_ciphers(suite + ":@SECLEVEL=0")
    return ctx


def starttls_socket(port):
    """A plain socket on the gateway, after EHLO and STARTTLS (ready for the handshake)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = sock.makefile("rb")
    read_reply(f)
    sock.sendall(b"EHLO client.example\r\n")
    read_reply(f)
    sock.sendall(b"STARTTLS\r\n")
    answer = read_reply(f)
    assert answer.startswith(b"220"), answer
    f.close()
    return sock


def handshake(port, starttls, suite=None, session=None, context=None):
    """One TLS 1.2 handshake with the gateway: ``(cipher, resumed, session)``, or None if refused."""
    sock = starttls_socket(port) if starttls else socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        context = context or client_context(suite)
        tls = context.wrap_socket(sock, server_hostname="localhost", session=session)
    except (ssl.SSLError, ConnectionError):
        sock.close()
        return None
    try:
        if not starttls:
            read_reply(tls.makefile("rb"))  # the greeting, inside TLS
        return tls.cipher()[0], tls.session_reused, tls.session
    finally:
        tls.close()


class SecurityTestCase(GatewayTestCase):
    """A gateway (through its service, as twistd builds it, or the test harness) with the test certificate."""

    def setUp(self):
        super().setUp()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.cert_file = os.path.join(self.dir, "cert.pem")
        self.key_file = os.path.join(self.dir, "key.pem")
        CERT.cert_chain_pems[0].write_to_path(self.cert_file)
        CERT.private_key_pem.write_to_path(self.key_file)

    def service(self, text):
        """Start the whole gateway for the policy ``text``; it is stopped when the test ends."""
        policy = parse_policy(text, path="test.ini", base_dir=self.dir)
        top = build_service(policy, reactor)
        top.startService()
        self.addCleanup(top.stopService)
        self.tracker = top.tracker
        return top


class TLSCipherTests(SecurityTestCase):
    """tls-ciphers: only forward-secret AEAD suites in TLS 1.2, on STARTTLS and ssl: listeners; sessions resume."""

    def starttls_gateway(self, **rule):
        """A tls = terminate gateway in front of a recording backend; its port."""
        backend, bport = self.recording()
        return self.gateway(bport, tls="terminate", tls_certificate=self.cert_file, tls_key=self.key_file,
                            backend_tls="off", **rule)

    def ssl_gateway(self, ciphers=None):
        """An ssl: listener built from a policy, relaying to a recording backend; its port."""
        backend, bport = self.recording()
        port = free_port()
        self.service(
            "[inspect TLS]\nprotocol = esmtp\n%s"
            "[listener implicit]\nlisten = ssl:%d:interface=127.0.0.1:privateKey=%s:certKey=%s\n"
            "backend = tcp:host=127.0.0.1:port=%d\ninspect = TLS\n"
            % ("tls-ciphers = %s\n" % ciphers if ciphers else "", port, self.key_file, self.cert_file, bport)
        )
        return port

    @defer.inlineCallbacks
    def check_suites(self, port, starttls):
        """Each TLS 1.2 suite alone: the modern ones are accepted, every other one refused."""
        suites = tls12_suites()
        # The ones testssl.sh flagged must be among those tried.
        for flagged in ("AES128-SHA", "AES256-GCM-SHA384", "ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES256-SHA384"):
            self.assertIn(flagged, suites)
        accepted = set()
        for suite in suites:
            result = yield deferToThread(handshake, port, starttls, suite)
            if result is not None:
                self.assertEqual(result[0], suite)
                accepted.add(suite)
        self.assertEqual(accepted, MODERN_RSA_SUITES)

    @defer.inlineCallbacks
    def check_resumption(self, port, starttls):
        """A second connection presenting the first one's session resumes it."""
        context = client_context()
        cipher, reused, session = yield deferToThread(handshake, port, starttls, context=context)
        self.assertFalse(reused)
        cipher, reused, session = yield deferToThread(handshake, port, starttls, None, session, context)
        self.assertTrue(reused)

    def test_starttls_suites(self):
        """tls = terminate: a real TLS 1.2 handshake per suite accepts exactly ECDHE with AES-GCM or ChaCha20."""
        return self.check_suites(self.starttls_gateway(), True)

    def test_ssl_listener_suites(self):
        """An ssl: listener: a real TLS 1.2 handshake per suite accepts exactly ECDHE with AES-GCM or ChaCha20."""
        return self.check_suites(self.ssl_gateway(), False)

    def test_starttls_resumption(self):
        """tls = terminate: a client that comes back resumes its TLS 1.2 session."""
        return self.check_resumption(self.starttls_gateway(), True)

    def test_ssl_listener_resumption(self):
        """An ssl: listener: a client that comes back resumes its TLS 1.2 session."""
        return self.check_resumption(self.ssl_gateway(), False)

    @defer.inlineCallbacks
    def test_tls_ciphers_key(self):
        """tls-ciphers replaces the list: with one suite named, only that suite is accepted."""
        port = self.ssl_gateway(ciphers="ECDHE-RSA-AES256-GCM-SHA384")
        self.assertIsNotNone((yield deferToThread(handshake, port, False, "ECDHE-RSA-AES256-GCM-SHA384")))
        self.assertIsNone((yield deferToThread(handshake, port, False, "ECDHE-RSA-AES128-GCM-SHA256")))


def swaks(port, *args):
    """Run Debian's swaks against the gateway; ``(exit code, its whole transcript)``."""
    import subprocess

    run = subprocess.run(
        ["swaks", "--server", "127.0.0.1:%d" % port, "--from", "a@example.org", "--to", "b@example.org",
         "--timeout", "10", *args],
        capture_output=True, stdin=subprocess.DEVNULL, timeout=60,
    )
    return run.returncode, run.stdout + run.stderr


class AuthRequiresTLSTests(SecurityTestCase):
    """auth-requires-tls: under tls = terminate no credentials cross the client's network in clear."""

    def setUp(self):
        super().setUp()
        if not os.path.exists("/usr/bin/swaks"):
            raise SkipTest("Debian package swaks is not installed")
        from tests.backends import AiosmtpdBackend, _authenticate
        from tests.test_tls import BACKEND_CERT, server_context

        # Like Postfix with smtpd_tls_auth_only: AUTH is offered only inside TLS,
        # and the gateway's own leg to it is TLS.
        self.backend = AiosmtpdBackend(tls_context=server_context(BACKEND_CERT))
        self.backend._smtpKwargs.update(authenticator=_authenticate, auth_require_tls=True)
        bport = self.backend.start()
        self.addCleanup(self.backend.stop)
        self.port = self.gateway(bport, tls="terminate", tls_certificate=self.cert_file, tls_key=self.key_file)

    @defer.inlineCallbacks
    def test_swaks_auth_in_clear_refused(self):
        """swaks -a PLAIN without --tls is not shown AUTH and gets no 235; the backend gets no message."""
        from tests.backends import AUTH_PASSWORD, AUTH_USER

        code, out = yield deferToThread(
            swaks, self.port, "-a", "PLAIN", "--auth-user", AUTH_USER, "--auth-password", AUTH_PASSWORD)
        self.assertNotEqual(code, 0)
        lines = out.splitlines()
        # Not offered (swaks shows server lines as "<- ", its own as " -> ")...
        self.assertFalse([line for line in lines if line.lstrip().startswith((b"<-  250-AUTH", b"<-  250 AUTH"))], out)
        # ...so never sent, and never accepted.
        self.assertFalse([line for line in lines if line.lstrip().startswith(b"-> AUTH")], out)
        self.assertNotIn(b"235 ", out)
        self.assertEqual(self.backend.envelopes, [])

    @defer.inlineCallbacks
    def test_swaks_auth_inside_tls(self):
        """swaks --tls -a PLAIN authenticates (235) and delivers: AUTH is offered again inside TLS."""
        from tests.backends import AUTH_PASSWORD, AUTH_USER

        code, out = yield deferToThread(
            swaks, self.port, "--tls", "-a", "PLAIN", "--auth-user", AUTH_USER, "--auth-password", AUTH_PASSWORD)
        self.assertEqual(code, 0, out)
        self.assertIn(b"235 ", out)
        (envelope,) = yield self.backend.whenMessages(1)
        self.assertTrue(envelope.authenticated)

    @defer.inlineCallbacks
    def test_auth_command_before_starttls(self):
        """smtplib's AUTH PLAIN before STARTTLS gets 530 5.7.0 from the gateway; EHLO shows no AUTH."""

        def talk():
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
                client.ehlo()
                offered = client.has_extn("auth")
                return offered, client.docmd("AUTH", "PLAIN AHVzZXIAcGFzc3dvcmQ=")

        offered, (code, text) = yield deferToThread(talk)
        self.assertFalse(offered)
        self.assertEqual((code, text), (530, b"5.7.0 Must issue a STARTTLS command first"))
        self.assertEqual(len(self.alerts("SMTP_AUTH_WITHOUT_TLS")), 1)

    def test_check_warns(self):
        """mailguard check warns about auth-requires-tls = no with tls = terminate, and still says OK."""
        import io
        from contextlib import redirect_stderr, redirect_stdout

        from mailguard.cli import main

        path = os.path.join(self.dir, "policy.ini")
        with open(path, "w") as f:
            f.write("[inspect T]\nprotocol = esmtp\ntls = terminate\ntls-certificate = %s\n"
                    "tls-key = %s\nauth-requires-tls = no\n"
                    "[listener l]\nlisten = tcp:2525\nbackend = tcp:host=127.0.0.1:port=25\ninspect = T\n"
                    % (self.cert_file, self.key_file))
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(["check", "-c", path])
        self.assertEqual(code, 0)
        self.assertIn("OK", out.getvalue())
        self.assertEqual(
            err.getvalue(),
            "warning: %s: [inspect T] auth-requires-tls: no lets clients send AUTH credentials "
            "in clear before STARTTLS\n" % path,
        )


PASSWORD = "S3cret-pass"


class CredentialLogTests(SecurityTestCase):
    """Credentials a client sends where they do not belong never reach the log or the debug trace."""

    @defer.inlineCallbacks
    def check_not_logged(self, protocol):
        """Send credentials every wrong way, then search every logged event for them."""
        import base64

        from twisted.logger import formatEvent

        from mailguard.policy import GlobalSettings

        backend, bport = self.recording()
        port = self.gateway(bport, protocol=protocol, settings=GlobalSettings(debug=frozenset({"smtp"})))
        b64 = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731
        plain = b64("\0user\0" + PASSWORD)
        lines = [
            "AUTH PLAIN " + plain,  # AUTH not advertised: refused
            "AUTH LOGIN",  # refused, and the client goes on anyway
            b64("user"),
            b64(PASSWORD),
            plain,
            PASSWORD,  # the password typed as a command
            PASSWORD.lower() + " " + PASSWORD,
            b64(PASSWORD) + " " + b64(PASSWORD),
        ]

        def talk():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo_or_helo_if_needed()
                return [client.docmd(line)[0] for line in lines]

        codes = yield deferToThread(talk)
        self.assertEqual(len(codes), len(lines))
        yield wait_for(lambda: not self.tracker.sessions)
        secrets = {PASSWORD, b64(PASSWORD), plain, b64("\0user\0" + PASSWORD)}
        secrets |= {s.upper() for s in secrets} | {s.lower() for s in secrets}
        secrets |= {s[:32] for s in secrets} | {s[:16] for s in secrets}
        text = "\n".join((formatEvent(e) or "") + " " + repr(e) for e in self.events)
        self.assertIn("SMTP_INVALID_COMMAND", text)
        self.assertIn("SMTP_TRACE", text)
        for secret in secrets:
            self.assertNotIn(secret, text)
        # Known verbs are still named, unknown ones counted.
        verbs = [e.get("verb") for e in self.alerts("SMTP_INVALID_COMMAND")]
        self.assertIn("AUTH", verbs)
        self.assertIn("(%d octets)" % len(b64(PASSWORD)), verbs)

    def test_esmtp(self):
        """esmtp, AUTH not advertised by the server: nothing of the credentials is logged."""
        return self.check_not_logged("esmtp")

    def test_mailguard(self):
        """mailguard mode (AUTH is illegal): nothing of the credentials is logged."""
        return self.check_not_logged("mailguard")


class LineRuleTests(SecurityTestCase):
    """Every line over max-command-line gets 500 5.5.2 Line too long from the gateway, whatever its verb."""

    @defer.inlineCallbacks
    def test_unknown_verb_and_noop(self):
        """A 602-octet unknown verb and a 607-octet NOOP: both answered by the gateway, neither forwarded."""
        backend, bport = self.recording()
        port = self.gateway(bport)
        unknown = b"FOO " + b"a" * 596  # 602 octets with CRLF
        noop = b"NOOP " + b"b" * 600  # 607 octets with CRLF

        def talk():
            client = LockstepClient(port)
            try:
                return [client.command(unknown), client.command(noop), client.command(b"QUIT")]
            finally:
                client.close()

        replies = yield deferToThread(talk)
        self.assertEqual(replies[:2], [b"500 5.5.2 Line too long\r\n"] * 2)
        yield wait_for(lambda: backend.connections and backend.connections[0].closed)
        self.assertEqual(bytes(backend.connections[0].received), b"QUIT\r\n")
        self.assertEqual(len(self.alerts("SMTP_LINE_TOO_LONG")), 2)


class NulTests(SecurityTestCase):
    """bare-newline = reject names a NUL as a NUL."""

    @defer.inlineCallbacks
    def check_reply(self, body, expected):
        """Send one message with ``body`` under reject; return after checking the gateway's reply."""
        backend, bport = self.recording()
        port = self.gateway(bport, bare_newline="reject")

        def talk():
            client = LockstepClient(port)
            try:
                for line in (b"EHLO c.example", b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.org>"):
                    client.command(line)
                assert client.command(b"DATA").startswith(b"354")
                client.send(body)
                return client.reply()
            finally:
                client.close()

        self.assertEqual((yield deferToThread(talk)), expected)
        self.assertEqual(backend.messages, [])

    def test_nul(self):
        """<CR><LF>.<NUL><CR><LF> gets 550 5.5.2 NUL received in message data."""
        return self.check_reply(b"Subject: x\r\n\r\nhello\r\n.\0\r\nmore\r\n.\r\n",
                                b"550 5.5.2 NUL received in message data\r\n")

    def test_bare_lf_still(self):
        """A bare LF is still answered as a bare newline."""
        return self.check_reply(b"Subject: x\r\n\r\nhello\n.\r\n.\r\n", b"550 5.5.2 bare <CR> or <LF> received\r\n")


def listening_sockets():
    """``{inode: description}`` of every socket this process is listening on (TCP, TCP6, UNIX)."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink("/proc/self/fd/" + fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            mine.add(target[8:-1])
    found = {}
    for table in ("tcp", "tcp6"):
        with open("/proc/net/" + table) as f:
            for row in list(f)[1:]:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in mine:  # 0A: LISTEN
                    found[cols[9]] = "%s %d" % (table, int(cols[1].rsplit(":", 1)[1], 16))
    with open("/proc/net/unix") as f:
        for row in list(f)[1:]:
            cols = row.split()
            # Flags 00010000: __SO_ACCEPTCON, a listening socket.
            if int(cols[3], 16) & 0x10000 and cols[6] in mine:
                found[cols[6]] = "unix " + (cols[7] if len(cols) > 7 else "(unnamed)")
    return found


class EmbeddedSideDoorTests(SecurityTestCase):
    """backend = embedded: nothing but the gateway can reach the embedded backend."""

    @defer.inlineCallbacks
    def test_only_the_gateway_listens(self):
        """Starting an embedded-backend gateway opens exactly one listening socket, the gateway's; mail still arrives."""
        port = free_port()
        maildir = os.path.join(self.dir, "maildir")
        before = listening_sockets()
        self.service(
            # The control socket (mode 0600, for mailguard clear/debug) is
            # another listener of the gateway's own; this test is about the backend.
            "[global]\ncontrol-socket = off\n[inspect E]\nprotocol = esmtp\n"
            "[listener local]\nlisten = tcp:%d:interface=127.0.0.1\nbackend = embedded\nmaildir = %s\ninspect = E\n"
            % (port, maildir)
        )
        new = {inode: what for inode, what in listening_sockets().items() if inode not in before}
        self.assertEqual(sorted(new.values()), ["tcp %d" % port])

        def send():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.sendmail("a@example.org", ["b@example.org"], b"Subject: in\r\n\r\nbody\r\n")
                # While the session is open the backend is still not listening anywhere.
                return listening_sockets()

        during = yield deferToThread(send)
        self.assertEqual(sorted(w for i, w in during.items() if i not in before), ["tcp %d" % port])
        yield wait_for(lambda: not self.tracker.sessions)
        (name,) = os.listdir(os.path.join(maildir, "new"))
        with open(os.path.join(maildir, "new", name), "rb") as f:
            self.assertEqual(f.read(), b"Subject: in\n\nbody\n")


class _Leg:
    """A stand-in for relay.ClientLeg around a real SMTP inspector: records the tracker's timeouts."""

    def __init__(self, inspector):
        self.inspector = inspector
        self.calls = []

    def timeoutSession(self, reply_name):
        """Record a timeout."""
        self.calls.append(reply_name)

    def abortSession(self):
        """Record an abort."""
        self.calls.append("abort")


class TrickleClockTests(TestCase):
    """command-timeout and min-data-rate on a task.Clock, through the tracker's one timer heap."""

    def setUp(self):
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock

        from mailguard.commands import MODES
        from mailguard.policy import GlobalSettings, Listener, Rule
        from mailguard.smtp import SMTPInspector
        from mailguard.tracker import SessionTracker

        self.clock = Clock()
        rule = Rule(name="T", protocol="esmtp", timeout=1000, command_timeout=10, min_data_rate=(100, 5))
        self.tracker = SessionTracker(GlobalSettings(), self.clock)
        listener = Listener(name="l", listen="tcp:0", backend="tcp:127.0.0.1:1", rule=rule)
        self.session = self.tracker.admit(IPv4Address("TCP", "127.0.0.1", 40000), listener)
        self.leg = _Leg(SMTPInspector(rule, MODES["esmtp"]))
        self.session.leg = self.leg
        self.leg.inspector.server_connected()
        self.server(b"220 mx.example ESMTP\r\n")
        self.tracker.opened(self.session)

    def client(self, data):
        """Bytes from the client, as the relay hands them on."""
        self.session.client_bytes += len(data)
        self.session.touch()
        self.leg.inspector.client_data(data)
        self.tracker.progress(self.session)

    def server(self, data):
        """Bytes from the server, as the relay hands them on."""
        self.session.server_bytes += len(data)
        self.session.touch()
        self.leg.inspector.server_data(data)
        self.tracker.progress(self.session)

    def in_data(self):
        """Go through EHLO, MAIL, RCPT and DATA up to the 354."""
        for line, answer in ((b"EHLO c\r\n", b"250 mx\r\n"), (b"MAIL FROM:<a@b>\r\n", b"250 ok\r\n"),
                             (b"RCPT TO:<c@d>\r\n", b"250 ok\r\n"), (b"DATA\r\n", b"354 go\r\n")):
            self.client(line)
            self.server(answer)

    def test_partial_line_times_out(self):
        """A command line still incomplete command-timeout seconds after its first byte: 421, SMTP_COMMAND_TIMEOUT."""
        self.client(b"NO")
        self.clock.advance(9.9)
        self.assertEqual(self.leg.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.leg.calls, ["command_timeout"])
        self.assertEqual(self.tracker.alerts["SMTP_COMMAND_TIMEOUT"], 1)
        self.assertEqual(self.tracker.timeouts["command"], 1)

    def test_trickle_does_not_extend(self):
        """One byte every 2 s keeps the session active, yet the line's deadline holds."""
        for byte in b"NOOP xxx":
            if self.leg.calls:
                break
            self.client(bytes([byte]))
            self.clock.advance(2)
        self.assertEqual(self.leg.calls, ["command_timeout"])
        self.assertEqual(self.clock.seconds(), 10)

    def test_each_line_has_its_own_deadline(self):
        """A line completed in time clears the deadline; the next line's starts at its own first byte."""
        self.client(b"NO")
        self.clock.advance(9)
        self.client(b"OP\r\n")
        self.server(b"250 ok\r\n")
        self.clock.advance(6)
        self.client(b"NO")
        self.clock.advance(9.9)
        self.assertEqual(self.leg.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.leg.calls, ["command_timeout"])

    def test_whole_lines_have_no_deadline(self):
        """Without a partial line only the idle timeout applies."""
        self.client(b"NOOP\r\n")
        self.server(b"250 ok\r\n")
        self.clock.advance(999)
        self.assertEqual(self.leg.calls, [])
        self.clock.advance(1)
        self.assertEqual(self.leg.calls, ["idle_timeout"])

    def test_slow_data(self):
        """Message data slower than min-data-rate over a window: 421, SMTP_DATA_RATE."""
        self.in_data()
        for second in range(5):  # 100 octets a second: exactly the rate
            self.client(b"x" * 98 + b"\r\n")
            self.clock.advance(1)
        self.assertEqual(self.leg.calls, [])
        for second in range(5):  # then 50 a second
            self.client(b"y" * 48 + b"\r\n")
            self.clock.advance(1)
        self.assertEqual(self.leg.calls, ["data_rate"])
        self.assertEqual(self.tracker.alerts["SMTP_DATA_RATE"], 1)
        self.assertEqual(self.tracker.timeouts["data-rate"], 1)

    def test_fast_data_and_end(self):
        """A fast message ends without a timeout, and after it the data-rate deadline is gone."""
        self.in_data()
        self.client(b"x" * 1000 + b"\r\n")
        self.clock.advance(4)
        self.client(b".\r\n")
        self.server(b"250 queued\r\n")
        self.clock.advance(500)
        self.assertEqual(self.leg.calls, [])

    def test_paused_time_does_not_count(self):
        """While the relay has paused the client (backpressure), the data-rate window stands still."""
        self.in_data()
        self.client(b"x" * 98 + b"\r\n")
        self.clock.advance(1)
        self.tracker.reading_paused(self.session)
        self.clock.advance(100)
        self.assertEqual(self.leg.calls, [])
        self.tracker.reading_resumed(self.session)
        self.clock.advance(3.9)
        self.assertEqual(self.leg.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.leg.calls, ["data_rate"])

    def test_off(self):
        """min-data-rate 0 turns the check off."""
        from dataclasses import replace

        self.session.rule = replace(self.session.rule, min_data_rate=(0, 30))
        self.in_data()
        self.clock.advance(999)
        self.assertEqual(self.leg.calls, [])


class TrickleEndToEndTests(SecurityTestCase):
    """Trickling clients through the real gateway, with small values."""

    @defer.inlineCallbacks
    def trickle(self, setup, piece, **rule):
        """Run ``setup`` lines, then send ``piece`` every 0.2 s (at most 40 times); return what the gateway said."""
        backend, bport = self.recording()
        port = self.gateway(bport, timeout=30, **rule)

        def talk():
            client = LockstepClient(port)
            try:
                for line in setup:
                    client.command(line)
                sock = client.sock
                sock.settimeout(0.2)
                said = b""
                for _ in range(40):
                    try:
                        sock.sendall(piece)
                    except OSError:
                        pass  # closed already: read what it said
                    try:
                        chunk = sock.recv(65536)
                    except socket.timeout:
                        continue
                    except OSError:
                        break
                    if not chunk:
                        break
                    said += chunk
                return said
            finally:
                client.close()

        said = yield deferToThread(talk)
        yield wait_for(lambda: not self.tracker.sessions)
        return said, backend

    @defer.inlineCallbacks
    def test_command_trickle(self):
        """One byte of a command line every 0.2 s: 421 4.4.2 after command-timeout = 1."""
        said, backend = yield self.trickle([b"EHLO c.example"], b"N", command_timeout=1)
        self.assertEqual(said, b"421 4.4.2 Command timeout, closing connection\r\n")
        self.assertEqual(len(self.alerts("SMTP_COMMAND_TIMEOUT")), 1)

    @defer.inlineCallbacks
    def test_data_trickle(self):
        """Ten octets of message data every 0.2 s under min-data-rate = 1000/1: 421 4.4.2, nothing delivered."""
        said, backend = yield self.trickle(
            [b"EHLO c.example", b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.org>", b"DATA"],
            b"0123456789", min_data_rate=(1000, 1))
        self.assertEqual(said, b"421 4.4.2 Message data too slow, closing connection\r\n")
        self.assertEqual(len(self.alerts("SMTP_DATA_RATE")), 1)
        self.assertEqual(backend.messages, [])


class PolicyKeyTests(TestCase):
    """The new rule keys: defaults, and one-line errors naming file, section and key."""

    def rule(self, extra):
        """The rule of a one-listener policy whose [inspect R] adds ``extra``."""
        text = ("[inspect R]\nprotocol = esmtp\n" + extra +
                "[listener l]\nlisten = tcp:2525\nbackend = tcp:host=127.0.0.1:port=25\ninspect = R\n")
        return parse_policy(text, path="p.ini").rules[0]

    def test_defaults(self):
        """Defaults: AUTH in clear allowed only without terminate, modern ciphers, 300 s, 500/30."""
        rule = self.rule("")
        self.assertEqual(
            (rule.auth_requires_tls, rule.tls_ciphers, rule.command_timeout, rule.min_data_rate),
            (False, "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL", 300, (500, 30)),
        )
        self.assertEqual(self.rule("min-data-rate = 0\n").min_data_rate, (0, 30))
        self.assertEqual(self.rule("min-data-rate = 200/10\n").min_data_rate, (200, 10))

    def test_errors(self):
        """Bad values stop start-up with one line naming the key."""
        from mailguard.policy import PolicyError

        for extra, start in [
            ("tls-ciphers = NOSUCHCIPHER\n", "p.ini: [inspect R] tls-ciphers: bad value 'NOSUCHCIPHER'"),
            ("tls-ciphers = eNULL:!NULL\n", "p.ini: [inspect R] tls-ciphers: bad value"),
            ("min-data-rate = fast\n", "p.ini: [inspect R] min-data-rate: bad value 'fast'"),
            ("min-data-rate = 500/0\n", "p.ini: [inspect R] min-data-rate: bad value '500/0'"),
            ("command-timeout = 0\n", "p.ini: [inspect R] command-timeout: bad value '0'"),
            ("auth-requires-tls = maybe\n", "p.ini: [inspect R] auth-requires-tls: bad value 'maybe'"),
        ]:
            with self.assertRaises(PolicyError) as caught:
                self.rule(extra)
            self.assertTrue(str(caught.exception).startswith(start), str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))


class PauseWiringTests(TestCase):
    """The relay tells the tracker when it pauses and resumes reading the client."""

    def test_pause_resume(self):
        """ClientLeg.pauseProducing / resumeProducing mark the session paused and resumed."""
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from mailguard.policy import GlobalSettings, Listener, Rule
        from mailguard.relay import ClientLeg
        from mailguard.tracker import SessionTracker

        clock = Clock()
        tracker = SessionTracker(GlobalSettings(), clock)
        listener = Listener(name="l", listen="tcp:0", backend="tcp:127.0.0.1:1", rule=Rule(name="R", protocol="esmtp"))
        session = tracker.admit(IPv4Address("TCP", "127.0.0.1", 40000), listener)

        class Factory:
            pass

        factory = Factory()
        factory.tracker = tracker
        leg = ClientLeg(factory, None)
        leg.session = session
        leg.transport = StringTransport()
        clock.advance(5)
        leg.pauseProducing()
        self.assertEqual((leg.transport.producerState, session.paused_at), ("paused", 5))
        session.rate_due = 10
        clock.advance(7)
        leg.resumeProducing()
        self.assertEqual((leg.transport.producerState, session.paused_at, session.rate_due), ("producing", None, 17))
        tracker.stop()


class EmbeddedLargeMessageTests(SecurityTestCase):
    """The embedded backend's socket pair carries large messages both ways without blocking the gateway."""

    @defer.inlineCallbacks
    def test_large_message(self):
        """A 4 MB message through the gateway to the embedded backend arrives whole."""
        port = free_port()
        maildir = os.path.join(self.dir, "maildir")
        self.service(
            # The control socket (mode 0600, for mailguard clear/debug) is
            # another listener of the gateway's own; this test is about the backend.
            "[global]\ncontrol-socket = off\n[inspect E]\nprotocol = esmtp\n"
            "[listener local]\nlisten = tcp:%d:interface=127.0.0.1\nbackend = embedded\nmaildir = %s\ninspect = E\n"
            % (port, maildir)
        )
        body = b"".join(b"line %07d of a large message\r\n" % i for i in range(130000))

        def send():
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.sendmail("a@example.org", ["b@example.org"], b"Subject: big\r\n\r\n" + body)

        yield deferToThread(send)
        yield wait_for(lambda: not self.tracker.sessions)
        (name,) = os.listdir(os.path.join(maildir, "new"))
        with open(os.path.join(maildir, "new", name), "rb") as f:
            self.assertEqual(f.read(), (b"Subject: big\r\n\r\n" + body).replace(b"\r\n", b"\n"))
