"""End-to-end ESMTP inspection: EHLO filtering, parameters, AUTH, PIPELINING, CHUNKING."""

import smtplib
from email.message import EmailMessage

from twisted.internet import defer
from twisted.internet.threads import deferToThread

from tests.backends import AUTH_PASSWORD, AUTH_USER, AiosmtpdBackend
from tests.clients import LockstepClient, wait_for
from tests.test_gateway import GatewayTestCase

CHUNKING_EXTENSIONS = ("PIPELINING", "SIZE 50000000", "8BITMIME", "BINARYMIME", "CHUNKING",
                       "ENHANCEDSTATUSCODES", "XEXCH50", "X-LINK2STATE", "DSN")


class EhloTests(GatewayTestCase):
    """What the client is shown of the server's extensions."""

    @defer.inlineCallbacks
    def test_ehlo_filtered_and_size_capped(self):
        """Unlisted keywords are removed and SIZE is capped at max-data, seen by smtplib."""
        backend, bport = self.recording(extensions=CHUNKING_EXTENSIONS)
        port = self.gateway(bport, max_data=1000)

        def ehlo():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("c.example")
                return dict(client.esmtp_features)

        features = yield deferToThread(ehlo)
        self.assertEqual(features["size"], "1000")
        self.assertNotIn("xexch50", features)
        self.assertNotIn("x-link2state", features)
        self.assertIn("chunking", features)
        self.assertEqual(sorted(a["keyword"] for a in self.alerts("EHLO_KEYWORD_REMOVED")),
                         ["X-LINK2STATE", "XEXCH50"])

    @defer.inlineCallbacks
    def test_size_declared_too_big(self):
        """A MAIL SIZE= over max-data is answered 552 by the gateway and never forwarded."""
        backend, bport = self.recording()
        port = self.gateway(bport, max_data=1000)

        def talk():
            client = LockstepClient(port)
            client.command(b"EHLO c")
            reply = client.command(b"MAIL FROM:<a@b> SIZE=1001")
            client.command(b"QUIT")
            client.close()
            return reply

        reply = yield deferToThread(talk)
        self.assertTrue(reply.startswith(b"552 5.3.4"), reply)
        yield wait_for(lambda: backend.connections[0].closed)
        self.assertNotIn(b"MAIL", bytes(backend.connections[0].received))


class AuthAndBodyTests(GatewayTestCase):
    """AUTH and 8BITMIME with aiosmtpd behind the gateway."""

    @defer.inlineCallbacks
    def test_login_and_8bitmime(self):
        """smtplib login() works through the gateway and an 8BITMIME message arrives intact."""
        backend = AiosmtpdBackend(auth=True)
        bport = backend.start()
        self.addCleanup(backend.stop)
        port = self.gateway(bport)
        msg = EmailMessage()
        msg["From"] = "a@example.org"
        msg["To"] = "b@example.org"
        msg["Subject"] = "8bit"
        msg.set_content("Grüße aus Köln\n", cte="8bit")

        def send():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.login(AUTH_USER, AUTH_PASSWORD)
                client.send_message(msg, mail_options=["BODY=8BITMIME"])

        yield deferToThread(send)
        (envelope,) = yield backend.whenMessages(1)
        self.assertTrue(envelope.authenticated)
        self.assertIn("Grüße aus Köln".encode(), envelope.original_content)
        self.assertIn("BODY=8BITMIME", envelope.mail_options)
        self.assertEqual(self.alerts("SMTP_INVALID_COMMAND"), [])

    @defer.inlineCallbacks
    def test_wrong_password_refused(self):
        """A failed AUTH exchange is relayed and the client may not use AUTH= later without it."""
        backend = AiosmtpdBackend(auth=True)
        bport = backend.start()
        self.addCleanup(backend.stop)
        port = self.gateway(bport)

        def send():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                with self.assertRaises(smtplib.SMTPAuthenticationError):
                    client.login(AUTH_USER, "wrong")

        yield deferToThread(send)


class RecipientAndPipeliningTests(GatewayTestCase):
    """max-recipients and reply order."""

    @defer.inlineCallbacks
    def test_101st_recipient(self):
        """The 101st RCPT gets 452 4.5.3 from the gateway; the 100 others are delivered."""
        backend, bport = self.recording()
        port = self.gateway(bport)
        rcpts = ["r%d@example.org" % i for i in range(101)]

        def send():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                return client.sendmail("a@example.org", rcpts, b"Subject: many\r\n\r\nhi\r\n")

        refused = yield deferToThread(send)
        self.assertEqual(refused, {rcpts[-1]: (452, b"4.5.3 Too many recipients")})
        self.assertEqual(len(backend.messages[0].rcpt_to), 100)

    @defer.inlineCallbacks
    def test_order_with_gateway_reply_in_middle(self):
        """Pipelined replies keep their order when the gateway answers one command itself."""
        backend, bport = self.recording()
        port = self.gateway(bport, max_recipients=1)

        def talk():
            client = LockstepClient(port)
            client.command(b"EHLO c")
            client.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nRSET\r\nNOOP\r\n")
            replies = [client.reply() for _ in range(5)]
            client.command(b"QUIT")
            client.close()
            return replies

        replies = yield deferToThread(talk)
        self.assertEqual([r[:9] for r in replies],
                         [b"250 2.1.0", b"250 2.1.5", b"452 4.5.3", b"250 2.0.0", b"250 2.0.0"])

    @defer.inlineCallbacks
    def test_split_terminator(self):
        """A terminator split across writes delivers exactly one message."""
        backend, bport = self.recording()
        port = self.gateway(bport)

        def talk():
            client = LockstepClient(port)
            for line in (b"EHLO c", b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"DATA"):
                client.command(line)
            for piece in (b"body\r", b"\n", b".", b"\r", b"\n"):
                client.send(piece)
            reply = client.reply()
            client.command(b"QUIT")
            client.close()
            return reply

        reply = yield deferToThread(talk)
        self.assertTrue(reply.startswith(b"250"), reply)
        self.assertEqual([m.data for m in backend.messages], [b"body\n"])


class ChunkingTests(GatewayTestCase):
    """BDAT through the gateway to a backend that advertises CHUNKING."""

    def bdat_session(self, port, chunks, **kw):
        client = LockstepClient(port)
        client.command(b"EHLO c")
        client.command(b"MAIL FROM:<a@b>" + kw.get("mail_params", b""))
        client.command(b"RCPT TO:<c@d>")
        replies = []
        for i, chunk in enumerate(chunks):
            last = b" LAST" if i == len(chunks) - 1 else b""
            client.send(b"BDAT %d%s\r\n" % (len(chunk), last) + chunk)
            replies.append(client.reply())
        replies.append(client.command(b"QUIT"))
        client.close()
        return replies

    @defer.inlineCallbacks
    def test_bdat_chunk_with_terminator_inside(self):
        """A BDAT chunk containing CRLF.CRLF and a command arrives intact as data."""
        backend, bport = self.recording(extensions=CHUNKING_EXTENSIONS)
        port = self.gateway(bport)
        chunks = [b"Subject: c\r\n\r\nbefore\r\n.\r\nRSET\r\n", b"after\r\n"]
        replies = yield deferToThread(self.bdat_session, port, chunks)
        self.assertEqual([r[:3] for r in replies], [b"250", b"250", b"221"])
        self.assertEqual(backend.messages[0].data, b"".join(chunks).replace(b"\r\n", b"\n"))
        self.assertEqual(backend.messages[0].command, "BDAT")

    @defer.inlineCallbacks
    def test_bdat_binarymime(self):
        """BODY=BINARYMIME with BDAT passes; binary octets arrive unchanged."""
        backend, bport = self.recording(extensions=CHUNKING_EXTENSIONS)
        port = self.gateway(bport)
        chunk = bytes(range(256)) * 4
        replies = yield deferToThread(self.bdat_session, port, [chunk], mail_params=b" BODY=BINARYMIME")
        self.assertEqual(replies[0][:3], b"250")
        received = bytes(backend.connections[0].received)
        self.assertIn(b"BDAT 1024 LAST\r\n" + chunk, received)

    @defer.inlineCallbacks
    def test_bdat_over_max_data(self):
        """Chunks over max-data: 552 5.3.4 after the chunk, the message never completes."""
        backend, bport = self.recording(extensions=CHUNKING_EXTENSIONS)
        port = self.gateway(bport, max_data=100)

        def talk():
            client = LockstepClient(port)
            for line in (b"EHLO c", b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>"):
                client.command(line)
            client.send(b"BDAT 150 LAST\r\n" + b"x" * 150)
            rest = client.rest()
            client.close()
            return rest

        rest = yield deferToThread(talk)
        self.assertTrue(rest.startswith(b"552 5.3.4"), rest)
        yield wait_for(lambda: backend.connections[0].closed)
        self.assertEqual(backend.messages, [])


class TwistedClientTests(GatewayTestCase):
    """twisted.mail's own ESMTP client through the gateway."""

    @defer.inlineCallbacks
    def test_twisted_sendmail(self):
        """twisted.mail.smtp.sendmail delivers a message through the gateway."""
        from twisted.mail.smtp import sendmail

        backend = AiosmtpdBackend()
        bport = backend.start()
        self.addCleanup(backend.stop)
        port = self.gateway(bport)
        # twisted.mail's client takes LF line ends and sends CRLF.
        body = b"Subject: twisted\n\nfrom twisted.mail\n"
        yield sendmail("127.0.0.1", "a@example.org", ["b@example.org"], body, port=port,
                       requireAuthentication=False, requireTransportSecurity=False)
        (envelope,) = yield backend.whenMessages(1)
        self.assertEqual(envelope.original_content, body.replace(b"\n", b"\r\n"))
