"""Tests for L{mailguard.embedded} and the test peers in L{tests.backends}."""

from __future__ import annotations

import os
import smtplib

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailguard.embedded import (
    DataEnd,
    DotDataReader,
    EmbeddedBackendFactory,
    make_maildir,
    SMTPServerProtocol,
)
from tests.backends import (
    AUTH_PASSWORD,
    AUTH_USER,
    AiosmtpdBackend,
    RecordingBackend,
    connectSMTP,
    listenBackend,
    rawConversation,
    smtplibInThread,
)

GREETING = b"220 localhost ESMTP mailguard embedded backend\r\n"

# Lines starting with dots are dot-stuffed by smtplib and must be unstuffed again.
MESSAGE = (
    b"From: alice@example.com\r\n"
    b"To: bob@example.com\r\n"
    b"Subject: dots\r\n"
    b"\r\n"
    b"..two dots\r\n"
    b".x\r\n"
    b"8bit: \xc3\xa9t\xc3\xa9\r\n"
    b"bare LF inside\nstays\r\n"
    b"last line\r\n"
)


def replyCodes(data: bytes) -> list[bytes]:
    """
    Return the code of every complete reply (its last line) in C{data}, in order.
    """
    return [line[:3] for line in data.split(b"\r\n") if line[3:4] == b" "]


def sendMessage(port: int, message: bytes, recipients: list[str]) -> dict:
    """
    Send one message with smtplib (blocking) and return the refused recipients.
    """
    with connectSMTP(port) as client:
        return client.sendmail("alice@example.com", recipients, message)


def converse(
    factory: EmbeddedBackendFactory, data: bytes, byteByByte: bool = False
) -> tuple[SMTPServerProtocol, StringTransport]:
    """
    Run a dialogue through a protocol on a L{StringTransport}, whole or byte by byte.
    """
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2525))
    transport = StringTransport()
    protocol.makeConnection(transport)
    if byteByByte:
        for i in range(len(data)):
            protocol.dataReceived(data[i : i + 1])
    else:
        protocol.dataReceived(data)
    protocol.connectionLost(Failure(ConnectionDone()))
    return protocol, transport


class DotDataReaderTests(SynchronousTestCase):
    """
    Tests for L{DotDataReader}, the sans-IO end-of-data finder.
    """

    def feedAll(self, reader: DotDataReader, chunks: list[bytes]) -> DataEnd | None:
        """
        Feed chunks until the reader reports the end.
        """
        for chunk in chunks:
            end = reader.feed(chunk)
            if end is not None:
                return end
        return None

    def test_emptyMessage(self) -> None:
        """A dot line straight after the 354 reply is an empty message."""
        self.assertEqual(DotDataReader().feed(b".\r\nQUIT\r\n"), DataEnd(b"", b"QUIT\r\n"))

    def test_unstuffing(self) -> None:
        """One leading dot is removed from each line that has one."""
        end = DotDataReader().feed(b"..a\r\n...b\r\nc.\r\n.\r\n")
        self.assertEqual(end, DataEnd(b".a\r\n..b\r\nc.\r\n", b""))

    def test_byteByByte(self) -> None:
        """Feeding one byte at a time finds the same end as feeding it whole."""
        data = b"a\r\n..b\n.\nc\r\n\r\n.\r\n"
        reader = DotDataReader()
        ends = [reader.feed(data[i : i + 1]) for i in range(len(data))]
        self.assertEqual(ends[:-1], [None] * (len(data) - 1))
        self.assertEqual(ends[-1], DotDataReader().feed(data))
        self.assertEqual(ends[-1], DataEnd(b"a\r\n.b\n.\nc\r\n\r\n", b""))

    def test_strictIgnoresBareLF(self) -> None:
        """Strictly, dot lines with a bare LF on either side do not end the message."""
        reader = DotDataReader()
        self.assertIsNone(reader.feed(b"a\n.\nb\r\n.\nc\n.\r\nd\r\n"))
        # Lines are CRLF-delimited, so ".\nc\n.\r\n" is one stuffed line.
        self.assertEqual(
            reader.feed(b".\r\n"), DataEnd(b"a\n.\nb\r\n\nc\n.\r\nd\r\n", b"")
        )

    def test_lenientEndsOnBareLF(self) -> None:
        """Leniently, a dot line with bare LF line ends ends the message."""
        for data, content in [
            (b"a\n.\nrest", b"a\n"),
            (b"a\r\n.\nrest", b"a\r\n"),
            (b"a\n.\r\nrest", b"a\n"),
            (b".\nrest", b""),
        ]:
            self.assertEqual(
                DotDataReader(lenient=True).feed(data), DataEnd(content, b"rest")
            )

    def test_oversized(self) -> None:
        """A message over the limit is dropped but its end and what follows are still found."""
        reader = DotDataReader(max_size=10)
        end = self.feedAll(reader, [b"x" * 7, b"y" * 7, b"\r", b"\n.", b"\r\nNOOP\r\n"])
        self.assertEqual(end, DataEnd(None, b"NOOP\r\n"))

    def test_exactlyAtLimit(self) -> None:
        """A message exactly as large as the limit is accepted."""
        self.assertEqual(
            DotDataReader(max_size=5).feed(b"abc\r\n.\r\n"), DataEnd(b"abc\r\n", b"")
        )


class ProtocolTests(SynchronousTestCase):
    """
    Tests for L{SMTPServerProtocol} on a L{StringTransport}.
    """

    DIALOGUE = (
        b"EHLO client\r\nMAIL FROM:<a@example.com> BODY=8BITMIME\r\n"
        b"RCPT TO:<b@example.com>\r\nDATA\r\nhello\r\n..dot\r\n.\r\n"
        b"MAIL FROM:<>\r\nRCPT TO:<c@example.com>\r\nBDAT 7\r\n\r\n.\r\nab"
        b"BDAT 0 LAST\r\nQUIT\r\nNOOP\r\n"
    )

    def test_wholeAndByteByByte(self) -> None:
        """A dialogue fed whole and fed byte by byte gets the same replies and messages."""
        whole, wholeTransport = converse(RecordingBackend(), self.DIALOGUE)
        split, splitTransport = converse(RecordingBackend(), self.DIALOGUE, True)
        self.assertEqual(wholeTransport.value(), splitTransport.value())
        self.assertEqual(whole.factory.messages, split.factory.messages)
        self.assertEqual(
            [(m.mail_from, m.rcpt_to, m.data, m.command) for m in whole.factory.messages],
            [
                (b"a@example.com", [b"b@example.com"], b"hello\n.dot\n", "DATA"),
                (b"", [b"c@example.com"], b"\n.\nab", "BDAT"),
            ],
        )
        self.assertEqual(
            replyCodes(wholeTransport.value()),
            [b"220", b"250", b"250", b"250", b"354", b"250", b"250", b"250", b"250",
             b"250", b"221"],
        )
        self.assertTrue(wholeTransport.disconnecting)

    def test_ehloAdvertisesExtensions(self) -> None:
        """EHLO lists the hostname and then the configured extensions."""
        factory = EmbeddedBackendFactory(hostname="mx.test", extensions=["SIZE 5", "HELP"])
        _, transport = converse(factory, b"EHLO c\r\nHELO c\r\n")
        self.assertEqual(
            transport.value(),
            b"220 mx.test ESMTP mailguard embedded backend\r\n"
            b"250-mx.test\r\n250-SIZE 5\r\n250 HELP\r\n250 mx.test\r\n",
        )

    def test_defaultExtensions(self) -> None:
        """By default EHLO advertises the full extension list with the size limit."""
        _, transport = converse(EmbeddedBackendFactory(max_size=1234), b"ehlo c\r\n")
        self.assertEqual(
            transport.value()[len(GREETING) :],
            b"250-localhost\r\n250-PIPELINING\r\n250-SIZE 1234\r\n250-8BITMIME\r\n"
            b"250-BINARYMIME\r\n250-CHUNKING\r\n250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n"
            b"250-SMTPUTF8\r\n250 HELP\r\n",
        )

    def test_sequenceErrors(self) -> None:
        """RCPT before MAIL, DATA without RCPT and nested MAIL get 503 5.5.1."""
        _, transport = converse(
            RecordingBackend(),
            b"RCPT TO:<b>\r\nDATA\r\nMAIL FROM:<a>\r\nDATA\r\nMAIL FROM:<a>\r\n"
            b"BDAT 3 LAST\r\nabcNOOP\r\n",
        )
        replies = transport.value()[len(GREETING) :].split(b"\r\n")
        self.assertEqual(
            [r[:9] for r in replies[:-1]],
            [b"503 5.5.1", b"503 5.5.1", b"250 2.1.0", b"503 5.5.1", b"503 5.5.1",
             b"503 5.5.1", b"250 2.0.0"],
        )

    def test_otherCommands(self) -> None:
        """VRFY, HELP, ETRN, RSET, NOOP and AUTH get their fixed replies."""
        _, transport = converse(
            RecordingBackend(), b"VRFY x\r\nHELP\r\nETRN x\r\nRSET\r\nNOOP\r\nAUTH PLAIN\r\n"
        )
        self.assertEqual(
            replyCodes(transport.value()),
            [b"220", b"252", b"214", b"250", b"250", b"250", b"504"],
        )

    def test_bdatNeedsChunking(self) -> None:
        """BDAT is an unknown command when CHUNKING is not advertised."""
        _, transport = converse(
            RecordingBackend(extensions=["PIPELINING"]), b"BDAT 1 LAST\r\n"
        )
        self.assertEqual(
            transport.value(), GREETING + b"500 5.5.2 Error: command not recognized\r\n"
        )

    def test_bdatSyntax(self) -> None:
        """A BDAT without a valid size gets 501 and reads no octets."""
        _, transport = converse(RecordingBackend(), b"BDAT x\r\nBDAT 1 NOTLAST\r\nNOOP\r\n")
        self.assertEqual(replyCodes(transport.value()), [b"220", b"501", b"501", b"250"])

    def test_lineTooLong(self) -> None:
        """An overlong command line gets one 500 and the session goes on."""
        longLine = b"NOOP " + b"x" * 5000 + b"\r\n"
        for byteByByte in (False, True):
            _, transport = converse(RecordingBackend(), longLine + b"NOOP\r\n", byteByByte)
            self.assertEqual(
                transport.value(),
                GREETING + b"500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n",
            )

    def test_bareLFCommands(self) -> None:
        """A bare LF also ends a command line."""
        _, transport = converse(RecordingBackend(), b"NOOP\nQUIT\n")
        self.assertEqual(replyCodes(transport.value()), [b"220", b"250", b"221"])

    def test_oversizedData(self) -> None:
        """A DATA message over the size limit gets 552 and is not stored."""
        protocol, transport = converse(
            RecordingBackend(max_size=4),
            b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n12345\r\n.\r\nNOOP\r\n",
        )
        self.assertEqual(
            replyCodes(transport.value()), [b"220", b"250", b"250", b"354", b"552", b"250"]
        )
        self.assertEqual(protocol.factory.messages, [])

    def test_idleTimeout(self) -> None:
        """A silent client gets 421 and is disconnected after the timeout."""
        clock = Clock()
        factory = EmbeddedBackendFactory(timeout=30, reactor=clock)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2525))
        transport = StringTransport()
        protocol.makeConnection(transport)
        clock.advance(29)
        protocol.dataReceived(b"NOOP\r\n")
        clock.advance(29)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.value().endswith(b"421 4.4.2 localhost Error: timeout exceeded\r\n"))
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_replyOverride(self) -> None:
        """Scripted replies replace real ones; refusing ones keep the command from taking effect."""
        factory = RecordingBackend(
            replyOverride={
                "MAIL": b"250 fine\r\n",
                "RCPT": b"550 5.1.1 no such user\r\n",
                "NOOP": b"250-multi\r\n250 line\r\n",
            }
        )
        protocol, transport = converse(
            factory, b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\nNOOP\r\n"
        )
        self.assertEqual(
            transport.value(),
            GREETING + b"250 fine\r\n550 5.1.1 no such user\r\n"
            b"503 5.5.1 Error: need RCPT command\r\n250-multi\r\n250 line\r\n",
        )

    def test_replyOverrideContent(self) -> None:
        """A refusing scripted reply to a message or chunk means nothing is stored."""
        factory = RecordingBackend(
            replyOverride={".": b"554 5.7.1 no\r\n", "BDAT": b"452 4.3.1 full\r\n"}
        )
        _, transport = converse(
            factory,
            b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\nx\r\n.\r\n"
            b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nBDAT 1 LAST\r\nx",
        )
        self.assertEqual(
            replyCodes(transport.value()),
            [b"220", b"250", b"250", b"354", b"554", b"250", b"250", b"452"],
        )
        self.assertEqual(factory.messages, [])


class MakeMaildirTests(SynchronousTestCase):
    """Creating the embedded backend's Maildir."""

    def test_half_made(self):
        """A Maildir another process has only begun (its folder, no tmp/new/cur) is completed, mode 0700."""
        path = os.path.join(self.mktemp(), "Maildir")
        os.makedirs(path)
        make_maildir(path)
        for folder in ("tmp", "new", "cur"):
            self.assertEqual(os.stat(os.path.join(path, folder)).st_mode & 0o777, 0o700)
        make_maildir(path)  # and again: already there is fine


class EmbeddedBackendTests(TestCase):
    """
    Tests for the embedded backend over real sockets on 127.0.0.1.
    """

    timeout = 20

    @inlineCallbacks
    def test_maildirDelivery(self):
        """A message sent with smtplib lands in new/ byte for byte, CRLF stored as LF."""
        maildir = os.path.join(self.mktemp(), "parents", "Maildir")
        factory = EmbeddedBackendFactory(maildir=maildir)
        port = listenBackend(self, factory)
        refused = yield smtplibInThread(
            sendMessage, port, MESSAGE, ["bob@example.com", "carol@example.com"]
        )
        self.assertEqual(refused, {})
        [name] = os.listdir(os.path.join(maildir, "new"))
        with open(os.path.join(maildir, "new", name), "rb") as f:
            self.assertEqual(f.read(), MESSAGE.replace(b"\r\n", b"\n"))
        self.assertEqual(os.listdir(os.path.join(maildir, "tmp")), [])
        [message] = factory.messages
        self.assertEqual(message.key, name)
        self.assertEqual(message.mail_from, b"alice@example.com")
        self.assertEqual(message.rcpt_to, [b"bob@example.com", b"carol@example.com"])
        self.assertEqual(message.data, MESSAGE.replace(b"\r\n", b"\n"))

    @inlineCallbacks
    def test_pipelinedRepliesInOrder(self):
        """Commands written in one write get their replies in order."""
        factory = RecordingBackend()
        port = listenBackend(self, factory)
        received = yield smtplibInThread(
            rawConversation,
            port,
            b"EHLO client\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
            b"RCPT TO:<c@example.com>\r\nDATA\r\nSubject: t\r\n\r\nhi\r\n.\r\n"
            b"NOOP\r\nVRFY b\r\nRSET\r\nQUIT\r\n",
        )
        self.assertEqual(
            replyCodes(received),
            [b"220", b"250", b"250", b"250", b"250", b"354", b"250", b"250", b"252",
             b"250", b"221"],
        )
        [message] = factory.messages
        self.assertEqual(message.rcpt_to, [b"b@example.com", b"c@example.com"])
        self.assertEqual(message.data, b"Subject: t\n\nhi\n")

    @inlineCallbacks
    def test_bdatStoredIntact(self):
        """BDAT chunks are stored intact, even when they contain CRLF . CRLF."""
        factory = RecordingBackend()
        port = listenBackend(self, factory)
        first = b"Subject: c\r\n\r\n.\r\nx"
        second = b"\r\n..y\r\n"
        received = yield smtplibInThread(
            rawConversation,
            port,
            b"EHLO client\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
            b"BDAT %d\r\n%sBDAT %d LAST\r\n%sQUIT\r\n"
            % (len(first), first, len(second), second),
        )
        self.assertIn(b"\r\n250 2.0.0 Ok: %d octets received\r\n" % len(first), received)
        self.assertIn(
            b"\r\n250 2.0.0 Ok: %d octets received, queued as mem-1\r\n" % len(second),
            received,
        )
        [message] = factory.messages
        self.assertEqual(message.data, (first + second).replace(b"\r\n", b"\n"))
        self.assertEqual(message.command, "BDAT")

    def smuggle(self, factory: RecordingBackend) -> Deferred[bytes]:
        """
        Send a DATA message holding a bare-LF dot line, then what looks like a command.
        """
        port = listenBackend(self, factory)
        return smtplibInThread(
            rawConversation,
            port,
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
            b"one\n.\nNOOP\r\n.\r\nQUIT\r\n",
        )

    @inlineCallbacks
    def test_strictDataEnd(self):
        """By default a bare-LF dot line is message content."""
        factory = RecordingBackend()
        received = yield self.smuggle(factory)
        self.assertEqual(replyCodes(received), [b"220", b"250", b"250", b"354", b"250", b"221"])
        self.assertEqual([m.data for m in factory.messages], [b"one\n.\nNOOP\n"])

    @inlineCallbacks
    def test_lenientDataEnd(self):
        """With lenient_data_end a bare-LF dot line ends the message, as on vulnerable servers."""
        factory = RecordingBackend(lenient_data_end=True)
        received = yield self.smuggle(factory)
        self.assertEqual(
            replyCodes(received),
            [b"220", b"250", b"250", b"354", b"250", b"250", b"500", b"221"],
        )
        self.assertEqual([m.data for m in factory.messages], [b"one\n"])

    @inlineCallbacks
    def test_unknownCommand(self):
        """Unknown commands, including lines of x characters, get 500 5.5.2."""
        port = listenBackend(self, RecordingBackend())
        received = yield smtplibInThread(
            rawConversation, port, b"XXXXXXXX\r\nxxxx xxxx\r\nSTARTTLS\r\nQUIT\r\n"
        )
        self.assertEqual(
            received,
            GREETING + b"500 5.5.2 Error: command not recognized\r\n" * 3
            + b"221 2.0.0 Bye\r\n",
        )

    @inlineCallbacks
    def test_recordsExactBytes(self):
        """The recording backend keeps every byte received and sent on a connection."""
        factory = RecordingBackend(greeting=b"220-first\r\n220 second\r\n")
        port = listenBackend(self, factory)
        sent = b"EHLO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n..\r\n.\r\nQUIT\r\n"
        received = yield smtplibInThread(rawConversation, port, sent)
        [record] = yield factory.whenConnectionClosed(1)
        self.assertEqual(bytes(record.received), sent)
        self.assertEqual(bytes(record.sent), received)
        self.assertTrue(received.startswith(b"220-first\r\n220 second\r\n250-localhost\r\n"))
        self.assertEqual(factory.messages[0].data, b".\n")

    @inlineCallbacks
    def test_neverGreets(self):
        """With greet=False the backend sends nothing until the client speaks."""
        port = listenBackend(self, RecordingBackend(greet=False))
        received = yield smtplibInThread(
            rawConversation, port, b"QUIT\r\n", waitForGreeting=False
        )
        self.assertEqual(received, b"221 2.0.0 Bye\r\n")

    @inlineCallbacks
    def test_whenMessages(self):
        """whenMessages fires once the requested number of messages is stored."""
        factory = RecordingBackend()
        port = listenBackend(self, factory)
        waiting = factory.whenMessages(2)
        yield smtplibInThread(sendMessage, port, MESSAGE, ["b@example.com"])
        self.assertNoResult(waiting)
        yield smtplibInThread(sendMessage, port, MESSAGE, ["c@example.com"])
        messages = yield waiting
        self.assertEqual([m.rcpt_to for m in messages], [[b"b@example.com"], [b"c@example.com"]])
        self.assertEqual(self.successResultOf(factory.whenMessages(1)), messages)

    @inlineCallbacks
    def test_closeAll(self):
        """closeAll closes the connections a test left open."""
        factory = RecordingBackend()
        port = listenBackend(self, factory)
        lost: Deferred[None] = Deferred()

        class Idle(Protocol):
            """
            A client that never speaks and reports when it is disconnected.
            """

            def connectionLost(self, reason: Failure) -> None:
                lost.callback(None)

        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Idle())
        while not factory.connections:
            yield deferLater(reactor, 0.01)
        yield factory.closeAll()
        yield lost
        self.assertTrue(factory.connections[0].closed)



class AiosmtpdBackendTests(TestCase):
    """
    Tests for L{AiosmtpdBackend}, aiosmtpd in a thread on 127.0.0.1.
    """

    timeout = 20

    def startBackend(self, **kwargs) -> AiosmtpdBackend:
        """
        Start an L{AiosmtpdBackend} for this test.
        """
        backend = AiosmtpdBackend(**kwargs)
        backend.start()
        self.addCleanup(backend.stop)
        return backend

    @inlineCallbacks
    def test_receivesMessage(self):
        """A message sent with smtplib is recorded with its envelope and exact content."""
        backend = self.startBackend()
        refused = yield smtplibInThread(sendMessage, backend.port, MESSAGE, ["bob@example.com"])
        self.assertEqual(refused, {})
        [envelope] = yield backend.whenMessages(1)
        self.assertEqual(envelope.mail_from, "alice@example.com")
        self.assertEqual(envelope.rcpt_tos, ["bob@example.com"])
        self.assertEqual(envelope.original_content, MESSAGE)
        self.assertFalse(envelope.authenticated)

    @inlineCallbacks
    def test_unknownCommand(self):
        """aiosmtpd answers an unknown command with 500."""
        backend = self.startBackend()

        def probe() -> tuple[int, bytes]:
            with connectSMTP(backend.port) as client:
                return client.docmd("XXXX")

        code, _ = yield smtplibInThread(probe)
        self.assertEqual(code, 500)

    @inlineCallbacks
    def test_auth(self):
        """With auth=True the fixed user and password log in and others are refused."""
        backend = self.startBackend(auth=True)

        def login() -> None:
            with connectSMTP(backend.port) as client:
                with self.assertRaises(smtplib.SMTPAuthenticationError):
                    client.login(AUTH_USER, "wrong")
            with connectSMTP(backend.port) as client:
                client.login(AUTH_USER, AUTH_PASSWORD)
                client.sendmail("alice@example.com", ["bob@example.com"], MESSAGE)

        yield smtplibInThread(login)
        [envelope] = yield backend.whenMessages(1)
        self.assertTrue(envelope.authenticated)

    def test_noAuthByDefault(self):
        """Without auth=True, AUTH is not advertised."""
        backend = self.startBackend()

        def features() -> dict:
            with connectSMTP(backend.port) as client:
                client.ehlo()
                return client.esmtp_features

        return smtplibInThread(features).addCallback(
            lambda features: self.assertNotIn("auth", features)
        )

    def test_stopWhenNotStarted(self):
        """Stopping a backend that never started does nothing."""
        AiosmtpdBackend().stop()

