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
from twisted.trial.unittest import SkipTest

from mailguard.policy import parse_policy
from mailguard.service import build_service
from tests.clients import LockstepClient, read_reply, wait_for
from tests.test_gateway import GatewayTestCase

# RSA, so that static-RSA suites could be negotiated at all if the gateway offered them.
CA = trustme.CA(key_type=trustme.KeyType.RSA)
CERT = CA.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)

#: The TLS 1.2 suites the default tls-ciphers accepts with an RSA certificate.
MODERN_RSA_SUITES = {
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
}


def free_port():
    """A loopback port number nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        capture_output=True, timeout=60,
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
        self.assertNotIn(b"235 ", out)
        self.assertNotIn(b"AUTH PLAIN", out.upper().replace(b"250-AUTH", b""))
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
            "%s: warning: [inspect T] auth-requires-tls: no lets clients send AUTH credentials "
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
            "[inspect E]\nprotocol = esmtp\n"
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
