"""End-to-end tests: real clients through the real gateway to real servers, on loopback."""

import os
import smtplib
import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from mailguard.policy import Rule
from tests.backends import AiosmtpdBackend, RecordingBackend, listenBackend
from tests.clients import LockstepClient, lockstep, wait_for
from tests.harness import start_gateway

MESSAGE = (
    b"From: a@example.org\r\nTo: b@example.org\r\nSubject: test\r\n\r\n"
    b"line one\r\n.leading dot\r\n..two dots\r\nRSET\r\nMAIL FROM:<x@y>\r\n"
)


class GatewayTestCase(TestCase):
    """Start a backend and a gateway listener in front of it, per test."""

    timeout = 30

    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def gateway(self, backend_port, protocol="esmtp", settings=None, **rule):
        """Listen with a gateway relaying to ``backend_port``; return its port number."""
        rule.setdefault("max_data", 100000)
        if protocol == "mailguard":
            rule.setdefault("mask_banner", "pix")
        self.rule = Rule(name="TEST", protocol=protocol, **rule)
        self.tracker, port = start_gateway(self, self.rule, backend_port, settings)
        return port

    def recording(self, **kwargs):
        """A recording backend on loopback; returns (factory, port)."""
        factory = RecordingBackend(**kwargs)
        return factory, listenBackend(self, factory)

    def alerts(self, tag):
        """Logged events carrying ``tag``."""
        return [e for e in self.events if e.get("tag") == tag]


def send_smtplib(port, message=MESSAGE, ehlo=True, **kw):
    """Send one message with smtplib; return sendmail's refused dict."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        if not ehlo:
            client.helo("client.example")
        return client.sendmail("a@example.org", ["b@example.org"], message, **kw)


class DeliveryTests(GatewayTestCase):
    """Messages arrive intact."""

    @defer.inlineCallbacks
    def test_embedded_maildir_byte_identical(self):
        """smtplib -> gateway -> embedded backend: the Maildir file is the message with LF ends."""
        from mailguard.embedded import EmbeddedBackendFactory

        maildir = self.mktemp()
        backend = EmbeddedBackendFactory(maildir=maildir, timeout=None)
        port = self.gateway(listenBackend(self, backend))
        yield deferToThread(send_smtplib, port)
        new = os.path.join(maildir, "new")
        files = os.listdir(new)
        self.assertEqual(len(files), 1)
        with open(os.path.join(new, files[0]), "rb") as f:
            self.assertEqual(f.read(), MESSAGE.replace(b"\r\n", b"\n"))

    @defer.inlineCallbacks
    def test_body_lines_untouched(self):
        """Body lines like RSET and '..' reach the server exactly as the client sent them."""
        backend, bport = self.recording()
        port = self.gateway(bport)
        yield deferToThread(send_smtplib, port)
        received = bytes(backend.connections[0].received)
        stuffed = MESSAGE.replace(b"\r\n.", b"\r\n..") + b".\r\n"
        self.assertIn(b"data\r\n" + stuffed, received)
        self.assertEqual(backend.messages[0].data, MESSAGE.replace(b"\r\n", b"\n"))

    @defer.inlineCallbacks
    def test_aiosmtpd_backend(self):
        """A message through the gateway to aiosmtpd arrives byte-identical."""
        backend = AiosmtpdBackend()
        bport = backend.start()
        self.addCleanup(backend.stop)
        port = self.gateway(bport)
        yield deferToThread(send_smtplib, port)
        envelopes = yield backend.whenMessages(1)
        self.assertEqual(envelopes[0].original_content, MESSAGE)

    @defer.inlineCallbacks
    def test_one_byte_per_write(self):
        """A client writing one byte per packet gets its commands to the server intact."""
        backend, bport = self.recording()
        port = self.gateway(bport, protocol="smtp")

        def talk():
            client = LockstepClient(port)
            client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            replies = []
            for line in (b"HELO slow.example", b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"QUIT"):
                for byte in line + b"\r\n":
                    client.send(bytes([byte]))
                replies.append(client.reply())
            client.close()
            return replies

        replies = yield deferToThread(talk)
        self.assertEqual([r[:3] for r in replies], [b"250", b"250", b"250", b"221"])
        yield wait_for(lambda: backend.connections and backend.connections[0].closed)
        self.assertEqual(
            bytes(backend.connections[0].received),
            b"HELO slow.example\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nQUIT\r\n",
        )

    @defer.inlineCallbacks
    def test_pipelined_group(self):
        """Pipelined MAIL/RCPT/RCPT/DATA get their replies in order and the message arrives."""
        backend, bport = self.recording()
        port = self.gateway(bport)

        def talk():
            client = LockstepClient(port)
            client.command(b"EHLO c.example")
            client.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n")
            replies = [client.reply() for _ in range(4)]
            replies.append(client.command(b"Subject: p\r\n\r\nhi\r\n."))
            replies.append(client.command(b"QUIT"))
            client.close()
            return replies

        replies = yield deferToThread(talk)
        self.assertEqual([r[:3] for r in replies], [b"250", b"250", b"250", b"354", b"250", b"221"])
        self.assertEqual(backend.messages[0].rcpt_to, [b"c@d", b"e@f"])
        self.assertEqual(backend.messages[0].data, b"Subject: p\n\nhi\n")


class InspectionTests(GatewayTestCase):
    """Allowlists and the x rewrite, seen from both ends."""

    @defer.inlineCallbacks
    def test_each_legal_smtp_command_passes(self):
        """Every verb of the smtp allowlist reaches the server unchanged."""
        backend, bport = self.recording()
        port = self.gateway(bport, protocol="smtp")
        lines = [b"HELO c.example", b"HELP", b"NOOP", b"VRFY postmaster", b"RSET", b"MAIL FROM:<a@b>",
                 b"RCPT TO:<c@d>", b"SAML FROM:<a@b>", b"SEND FROM:<a@b>", b"SOML FROM:<a@b>", b"DATA"]
        replies = yield deferToThread(lockstep, port, lines + [b"hi\r\n.", b"QUIT"])
        yield wait_for(lambda: backend.connections and backend.connections[0].closed)
        received = bytes(backend.connections[0].received)
        self.assertEqual(received, b"\r\n".join(lines + [b"hi", b".", b"QUIT"]) + b"\r\n")
        self.assertEqual(replies[-1][:3], b"221")

    @defer.inlineCallbacks
    def test_illegal_commands_rewritten(self):
        """EXPN, TURN, EHLO in smtp mode, an unknown verb and a non-command are x-ed; the client sees 500."""
        backend, bport = self.recording()
        port = self.gateway(bport, protocol="smtp")
        bad = [b"EXPN staff", b"TURN", b"EHLO c.example", b"XYZZY now", b"hello world"]
        replies = yield deferToThread(lockstep, port, bad + [b"QUIT"])
        yield wait_for(lambda: backend.connections and backend.connections[0].closed)
        received = bytes(backend.connections[0].received)
        expected = b"".join(b"x" * len(line) + b"\r\n" for line in bad) + b"QUIT\r\n"
        self.assertEqual(received, expected)
        self.assertEqual([r[:3] for r in replies[1:-1]], [b"500"] * len(bad))
        alerts = self.alerts("SMTP_INVALID_COMMAND")
        # Verbs outside the known SMTP ones are logged by length only (they may be credentials).
        self.assertEqual([a["verb"] for a in alerts], ["EXPN", "TURN", "EHLO", "(5 octets)", "(5 octets)"])
        self.assertEqual(alerts[0]["initiator"].split(":")[0], "127.0.0.1")

    @defer.inlineCallbacks
    def test_illegal_then_valid(self):
        """After an illegal command the client continues with a valid one."""
        backend, bport = self.recording()
        port = self.gateway(bport, protocol="esmtp")
        replies = yield deferToThread(lockstep, port, [b"EXPN x", b"EHLO c", b"QUIT"])
        self.assertEqual([r[:3] for r in replies[1:]], [b"500", b"250", b"221"])


class LimitTests(GatewayTestCase):
    """max-data and backend failures."""

    @defer.inlineCallbacks
    def test_max_data_boundary(self):
        """Exactly max-data octets are delivered; one more is refused with 552 and never delivered."""
        backend, bport = self.recording()
        body = b"x" * 98 + b"\r\n"  # 100 octets as SIZE counts them
        port = self.gateway(bport, max_data=len(body))
        yield deferToThread(send_smtplib, port, body[:-2])
        self.assertEqual(len(backend.messages), 1)

        def too_big():
            with self.assertRaises((smtplib.SMTPDataError, smtplib.SMTPServerDisconnected)) as cm:
                send_smtplib(port, b"y" + body[:-2])
            return cm.exception

        error = yield deferToThread(too_big)
        self.assertEqual(getattr(error, "smtp_code", 552), 552)
        yield wait_for(lambda: all(c.closed for c in backend.connections))
        self.assertEqual(len(backend.messages), 1)
        self.assertTrue(self.alerts("SMTP_MAX_DATA"))

    @defer.inlineCallbacks
    def test_backend_down(self):
        """With the backend unreachable the client gets 421 4.4.1 and the connection closes."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
        sock.close()
        port = self.gateway(dead)

        def talk():
            client = LockstepClient(port)
            rest = client.rest()
            client.close()
            return client.greeting + rest

        got = yield deferToThread(talk)
        self.assertTrue(got.startswith(b"421 4.4.1 "), got)

    @defer.inlineCallbacks
    def test_audit_trail(self):
        """audit-trail = on logs the session's byte counts each way and its duration."""
        backend, bport = self.recording()
        port = self.gateway(bport, audit_trail=True)
        yield deferToThread(send_smtplib, port)
        yield wait_for(lambda: self.alerts("SESS_AUDIT_TRAIL"))
        (event,) = self.alerts("SESS_AUDIT_TRAIL")
        conn = backend.connections[0]
        self.assertEqual(event["client_bytes"], len(conn.received))
        self.assertEqual(event["server_bytes"], len(conn.sent) + len(b"") - 0 * 1)
        from twisted.logger import formatEvent

        text = formatEvent(event)
        self.assertRegex(text, r"^SESS_AUDIT_TRAIL: Stop esmtp session: initiator \(127\.0\.0\.1:\d+\) sent \d+ bytes"
                         r" -- responder \(127\.0\.0\.1:%d\) sent \d+ bytes, \d+\.\d s$" % bport)


class MailGuardModeTests(GatewayTestCase):
    """protocol = mailguard, with real clients."""

    @defer.inlineCallbacks
    def test_smtplib_falls_back_to_helo(self):
        """smtplib's EHLO is x-ed, it falls back to HELO and the message is delivered."""
        backend = AiosmtpdBackend()
        bport = backend.start()
        self.addCleanup(backend.stop)
        port = self.gateway(bport, protocol="mailguard", mask_banner="on")
        yield deferToThread(send_smtplib, port)
        envelopes = yield backend.whenMessages(1)
        self.assertEqual(envelopes[0].original_content, MESSAGE)

    @defer.inlineCallbacks
    def test_transcript(self):
        """The exact bytes both sides see through mailguard mode, PIX banner included."""
        banner = b"220 mx.example.com ESMTP Postfix (Debian/GNU) 3.7.10\r\n"
        backend, bport = self.recording(greeting=banner)
        port = self.gateway(bport, protocol="mailguard")
        replies = yield deferToThread(
            lockstep, port, [b"EHLO c.example", b"HELO c.example", b"MAIL FROM:<a@b> SIZE=10", b"QUIT"]
        )
        self.assertEqual(replies[0], b"220" + b"*" * 48 + b"0\r\n")
        self.assertEqual([r[:3] for r in replies[1:]], [b"500", b"250", b"500", b"221"])
        yield wait_for(lambda: backend.connections and backend.connections[0].closed)
        self.assertEqual(
            bytes(backend.connections[0].received),
            b"x" * 14 + b"\r\nHELO c.example\r\n" + b"x" * 23 + b"\r\nQUIT\r\n",
        )


class _SlowBannerServer(protocol.Protocol):
    """A server that writes its (multi-line) banner in small pieces, then answers QUIT."""

    def connectionMade(self):
        banner = self.factory.banner
        pieces = [banner[i : i + 5] for i in range(0, len(banner), 5)]
        for n, piece in enumerate(pieces):
            reactor.callLater(0.002 * n, self._write, piece)

    def _write(self, data):
        if self.transport.connected:
            self.transport.write(data)

    def dataReceived(self, data):
        if b"QUIT" in data.upper():
            self.transport.write(b"221 bye\r\n")
            self.transport.loseConnection()


class BannerTests(GatewayTestCase):
    """Banner masking through the real gateway."""

    @defer.inlineCallbacks
    def banner_through(self, banner, mask):
        factory = protocol.ServerFactory.forProtocol(_SlowBannerServer)
        factory.banner = banner
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        port = self.gateway(listening.getHost().port, protocol="mailguard", mask_banner=mask)
        replies = yield deferToThread(lockstep, port, [b"QUIT"])
        return replies[0]

    @defer.inlineCallbacks
    def test_pix_mask_split_banner(self):
        """A banner arriving in 5-byte pieces is masked PIX-style as a whole."""
        got = yield self.banner_through(b"220 mx.example.com ESMTP Postfix (Debian/GNU) 3.7.10\r\n", "pix")
        self.assertEqual(got, b"220" + b"*" * 48 + b"0\r\n")

    @defer.inlineCallbacks
    def test_multiline_banner_on(self):
        """A multi-line banner keeps its codes and separators with mask-banner = on."""
        got = yield self.banner_through(b"220-mx.example.com ESMTP\r\n220-second line\r\n220 last\r\n", "on")
        self.assertEqual(got, b"220-" + b"*" * 20 + b"\r\n220-" + b"*" * 11 + b"\r\n220 ****\r\n")

    @defer.inlineCallbacks
    def test_multiline_banner_pix(self):
        """PIX masking of a multi-line banner keeps the continuation dashes."""
        got = yield self.banner_through(b"220-mx 2.0\r\n220 ok\r\n", "pix")
        self.assertEqual(got, b"220-***2*0\r\n220***\r\n")


class SwaksTests(GatewayTestCase):
    """Debian's swaks as the client, where it is installed."""

    @defer.inlineCallbacks
    def test_swaks_delivers(self):
        """swaks sends a message through the gateway (esmtp) and it arrives."""
        import shutil
        import subprocess

        if shutil.which("swaks") is None:
            raise SkipTest("swaks is not installed (apt-get install swaks; .ci/run does)")
        backend, bport = self.recording()
        port = self.gateway(bport)
        result = yield deferToThread(
            subprocess.run,
            ["swaks", "--server", "127.0.0.1:%d" % port, "--from", "a@example.org", "--to", "b@example.org",
             "--header", "Subject: swaks", "--body", "via swaks", "--timeout", "10"],
            capture_output=True, timeout=30,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(backend.messages[0].rcpt_to, [b"b@example.org"])
        self.assertIn(b"via swaks", backend.messages[0].data)
