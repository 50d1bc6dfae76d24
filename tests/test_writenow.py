"""Writing to a plain TCP connection at once when its buffer is empty (`mailguard.writenow`), on loopback."""

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from mailguard import writenow


class _Collect(protocol.Protocol):
    """The far end: keeps what it receives, and fires ``got`` once ``want`` octets are in."""

    def __init__(self, want):
        self.want = want
        self.data = b""
        self.got = defer.Deferred()

    def dataReceived(self, data):
        self.data += data
        if len(self.data) >= self.want and not self.got.called:
            self.got.callback(self.data)


class WriteNowTests(TestCase):
    """`write` and `write_sequence` send at once on an idle connection and queue otherwise, in order."""

    timeout = 20

    @defer.inlineCallbacks
    def connected(self, want):
        """A loopback connection: (the gateway side's transport, the far end collecting ``want`` octets)."""
        far = _Collect(want)
        factory = protocol.Factory.forProtocol(protocol.Protocol)
        factory.buildProtocol = lambda addr: far
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = yield protocol.ClientCreator(reactor, protocol.Protocol).connectTCP("127.0.0.1", port.getHost().port)
        self.addCleanup(client.transport.loseConnection)
        return client.transport, far

    @defer.inlineCallbacks
    def test_idle_sent_at_once(self):
        """On an idle connection the octets leave at once: the socket is never registered for writing."""
        transport, far = yield self.connected(9)
        writenow.write_sequence(transport, [b"abc", b"def"])
        writenow.write(transport, b"ghi")
        self.assertNotIn(transport, reactor.getWriters())
        self.assertEqual((yield far.got), b"abcdefghi")

    @defer.inlineCallbacks
    def test_queued_behind_buffer(self):
        """Behind octets still in the transport's buffer, a write is queued after them, in order."""
        transport, far = yield self.connected(6)
        transport.write(b"abc")  # Twisted's own write: buffered until the next turn
        writenow.write(transport, b"def")
        self.assertIn(transport, reactor.getWriters())
        self.assertEqual((yield far.got), b"abcdef")

    @defer.inlineCallbacks
    def test_partial_send_rest_queued(self):
        """What the socket does not take at once is queued: every octet arrives, in order."""
        import socket

        size = 2 * 1024 * 1024
        transport, far = yield self.connected(size)
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        payload = bytes(range(256)) * (size // 256)
        writenow.write(transport, payload)
        self.assertIn(transport, reactor.getWriters())  # the rest waits in Twisted's buffer
        self.assertEqual((yield far.got), payload)

    @defer.inlineCallbacks
    def test_send_file_idle(self):
        """send_file sends a file's first octets straight from it on an idle connection."""
        import tempfile

        transport, far = yield self.connected(5)
        with tempfile.TemporaryFile() as f:
            f.write(b"helloXXX")
            f.flush()
            self.assertEqual(writenow.send_file(transport, f.fileno(), 5), 5)
        self.assertEqual((yield far.got), b"hello")

    @defer.inlineCallbacks
    def test_send_file_partial_then_write(self):
        """What send_file could not send is the caller's to write: with the rest written, every octet arrives in order."""
        import os
        import socket
        import tempfile

        size = 2 * 1024 * 1024
        payload = bytes(range(256)) * (size // 256)
        transport, far = yield self.connected(size)
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        with tempfile.TemporaryFile() as f:
            f.write(payload)
            f.flush()
            sent = writenow.send_file(transport, f.fileno(), size)
            self.assertLess(sent, size)
            writenow.write(transport, os.pread(f.fileno(), size - sent, sent))
        self.assertEqual((yield far.got), payload)

    @defer.inlineCallbacks
    def test_send_file_not_idle(self):
        """Behind queued octets send_file sends nothing: the file must follow them."""
        import tempfile

        transport, far = yield self.connected(1)
        transport.write(b"x")
        with tempfile.TemporaryFile() as f:
            f.write(b"y")
            f.flush()
            self.assertEqual(writenow.send_file(transport, f.fileno(), 1), 0)

    @defer.inlineCallbacks
    def test_tls_connection_never_bypassed(self):
        """Once TLS has started on a connection nothing is sent around it: no send at once, no sendfile."""
        import tempfile

        from twisted.internet import ssl

        transport, far = yield self.connected(1)
        transport.startTLS(ssl.optionsForClientTLS("mail.example"))
        for _ in range(100):  # until the ClientHello has left Twisted's buffer
            if transport.offset == len(transport.dataBuffer) and not transport._tempDataLen:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertFalse(writenow._idle(transport))
        with tempfile.TemporaryFile() as f:
            f.write(b"plaintext")
            f.flush()
            self.assertEqual(writenow.send_file(transport, f.fileno(), 9), 0)

    def test_other_transports_use_their_own_write(self):
        """A transport that is not a plain TCP connection (here a StringTransport) gets its own write."""
        t = StringTransport()
        writenow.write(t, b"one")
        writenow.write_sequence(t, [b"two", b"three"])
        self.assertEqual(t.value(), b"onetwothree")

    @defer.inlineCallbacks
    def test_closing_connection_uses_twisted(self):
        """After loseConnection the write goes to Twisted, which drops or flushes it as it decides."""
        transport, far = yield self.connected(1)
        transport.loseConnection()
        self.assertFalse(writenow._idle(transport))

    @defer.inlineCallbacks
    def test_twisted_attributes_pinned(self):
        """The attributes of Twisted's TCP connection that writenow reads still exist (fails on a rename)."""
        transport, far = yield self.connected(1)
        for name in writenow.PRIVATE_ATTRIBUTES + ("connected", "disconnecting"):
            self.assertTrue(hasattr(transport, name), name)
        self.assertTrue(writenow._idle(transport))
