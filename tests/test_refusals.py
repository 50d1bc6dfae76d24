"""What the gateway tells a client it turns away, times out or cannot serve: always in the client's protocol.

Overload refusals come from the protocol's factory (`IInspectorFactory.refusalReply`,
no inspector exists yet), as does the answer to an unreachable backend;
timeouts come from the session's inspector (`IInspector.timeout_reply`).
The shell itself never speaks SMTP to a POP3, IMAP or ``tcp`` client.  The
shell tests drive the real factory chain on a `MemoryReactorClock`; the end
to end tests use poplib and imaplib through a gateway on loopback.
"""

import imaplib
import poplib
import socket

from twisted.internet import defer, endpoints, error, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailguard.inspectors import PluginError, refusal_reply, registry
from mailguard.policy import GlobalSettings, Listener, Rule
from mailguard.service import listener_factory
from mailguard.tracker import SessionTracker
from tests.clients import wait_for
from tests.harness import start_gateway
from tests.test_imap import IMAPBackend
from tests.test_pop3 import PASSWORD, USER, POP3Backend

#: Per protocol: the backend's greeting, then what the client is told on
#: overload, on an unreachable backend, on an idle timeout and on a set-up
#: timeout, and what the backend is told on an idle timeout.
EXPECTED = {
    "esmtp": dict(
        greeting=b"220 mx.example ESMTP\r\n",
        overload=b"421 4.7.0 Too many connections, try again later\r\n",
        unreachable=b"421 4.4.1 Service not available: mail server unreachable, closing connection\r\n",
        idle=b"421 4.4.2 Idle timeout, closing connection\r\n",
        synwait=b"421 4.4.2 Connection set-up timeout, closing connection\r\n",
        idle_server=b"QUIT\r\n",
    ),
    "pop3": dict(
        greeting=b"+OK POP3 ready\r\n",
        overload=b"-ERR [SYS/TEMP] Too many connections, try again later\r\n",
        unreachable=b"-ERR [SYS/TEMP] Mail server unreachable, closing connection\r\n",
        idle=b"-ERR [SYS/TEMP] Idle timeout, closing connection\r\n",
        synwait=b"-ERR [SYS/TEMP] Connection set-up timeout, closing connection\r\n",
        idle_server=b"QUIT\r\n",
    ),
    "imap": dict(
        greeting=b"* OK IMAP4rev1 ready\r\n",
        overload=b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n",
        unreachable=b"* BYE [UNAVAILABLE] Mail server unreachable, closing connection\r\n",
        idle=b"* BYE Idle timeout, closing connection\r\n",
        synwait=b"* BYE Connection set-up timeout, closing connection\r\n",
        idle_server=b"",
    ),
    "tcp": dict(
        greeting=b"",
        overload=b"",
        unreachable=b"",
        idle=b"",
        synwait=b"",
        idle_server=b"",
    ),
}


class _Silent:
    """A third-party factory written before `refusalReply` existed."""

    name = "silent"


class _Wordy:
    """A factory whose refusalReply returns text instead of bytes."""

    name = "wordy"

    def refusalReply(self, reason):
        """Wrong type on purpose."""
        return "go away"


class FactoryTests(SynchronousTestCase):
    """Each protocol's factory says how a session is refused."""

    def test_builtins(self):
        """smtp, esmtp and mailguard say 421, pop3 -ERR, imap * BYE, tcp nothing."""
        for name, expected in EXPECTED.items():
            for reason in ("overload", "unreachable"):
                self.assertEqual(refusal_reply(registry()[name], reason), expected[reason], (name, reason))
        for name in ("smtp", "mailguard"):
            self.assertEqual(refusal_reply(registry()[name], "overload"), EXPECTED["esmtp"]["overload"])

    def test_unknown_reason(self):
        """A reason a factory does not know gets no words, in every built-in protocol."""
        for name in EXPECTED:
            self.assertEqual(refusal_reply(registry()[name], "solar-flare"), b"", name)

    def test_plugin_without_refusal(self):
        """A plugin factory without refusalReply closes refused clients without a word."""
        self.assertEqual(refusal_reply(_Silent(), "overload"), b"")
        self.assertEqual(refusal_reply(_Silent(), "unreachable"), b"")

    def test_refusal_not_bytes(self):
        """A refusalReply returning anything but bytes is a one-line start-up error naming the plugin."""
        e = self.assertRaises(PluginError, refusal_reply, _Wordy(), "overload")
        self.assertIn("refusalReply('overload') returned 'go away', expected bytes", str(e))
        self.assertEqual(len(str(e).splitlines()), 1)


class _Chain:
    """The real factory chain of one listener (tracker -> inspector -> backend) on a MemoryReactorClock."""

    def __init__(self, protocol_name, **settings):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1000)
        rule = Rule(name="R", protocol=protocol_name, timeout=60)
        listener = Listener(name="L", listen="tcp:0", backend="tcp:127.0.0.1:1", rule=rule)
        self.tracker = SessionTracker(GlobalSettings(**settings), self.reactor)
        backend = endpoints.TCP4ClientEndpoint(self.reactor, "127.0.0.1", 1)
        self.factory = listener_factory(listener, self.tracker, self.reactor, backend)
        self._ports = iter(range(40000, 41000))

    def connect(self):
        """A client from 10.0.0.1 connects; return (its protocol, its transport)."""
        address = IPv4Address("TCP", "10.0.0.1", next(self._ports))
        proto = self.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        proto.makeConnection(transport)
        return proto, transport

    def backend_up(self, index=0):
        """The index-th backend connection succeeds; return the backend protocol and its transport."""
        factory = self.reactor.tcpClients[index][2]
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1))
        leg = factory.buildProtocol(None)
        leg.makeConnection(transport)
        return leg, transport


class ShellTests(SynchronousTestCase):
    """The shell writes only what the protocol's factory or inspector gives it, per protocol."""

    def test_overload(self):
        """A connection over max-incomplete-host gets its protocol's refusal and is closed, never reaching the backend."""
        for name, expected in EXPECTED.items():
            chain = _Chain(name, max_incomplete_host=1)
            chain.connect()
            _, transport = chain.connect()
            self.assertEqual(transport.value(), expected["overload"], name)
            self.assertTrue(transport.disconnecting, name)
            self.assertEqual(len(chain.reactor.tcpClients), 1, name)
            self.assertEqual(chain.tracker.refused["max-incomplete-host"], 1, name)

    def test_unreachable(self):
        """A refused backend connection gives the client its protocol's refusal, then the close."""
        for name, expected in EXPECTED.items():
            chain = _Chain(name)
            _, transport = chain.connect()
            leg = chain.reactor.tcpClients[0][2]
            leg.clientConnectionFailed(chain.reactor.connectors[0], Failure(error.ConnectionRefusedError()))
            self.assertEqual(transport.value(), expected["unreachable"], name)
            self.assertTrue(transport.disconnecting, name)

    def test_idle_timeout(self):
        """An idle session gets its protocol's goodbye; the backend gets QUIT where the protocol has one."""
        for name, expected in EXPECTED.items():
            chain = _Chain(name)
            _, transport = chain.connect()
            leg, server = chain.backend_up()
            if expected["greeting"]:
                leg.dataReceived(expected["greeting"])
            self.assertEqual(transport.value(), expected["greeting"], name)
            transport.clear()
            chain.reactor.advance(60)
            self.assertEqual(transport.value(), expected["idle"], name)
            self.assertEqual(server.value(), expected["idle_server"], name)
            self.assertTrue(transport.disconnecting and server.disconnecting, name)
            self.assertEqual(chain.tracker.timeouts["idle"], 1, name)

    def test_synwait_timeout(self):
        """A backend that never greets: the client gets its protocol's set-up timeout."""
        for name, expected in EXPECTED.items():
            if name == "tcp":
                continue  # no greeting to wait for: a tcp session is open as soon as the backend is
            chain = _Chain(name, synwait_time=5)
            _, transport = chain.connect()
            chain.backend_up()
            chain.reactor.advance(5)
            self.assertEqual(transport.value(), expected["synwait"], name)
            self.assertEqual(chain.tracker.timeouts["synwait"], 1, name)


class _SilentServer(protocol.Protocol):
    """A backend that accepts and never says a word (its sessions stay incomplete)."""

    def connectionMade(self):
        """Count it."""
        self.factory.open.append(self)

    def connectionLost(self, reason):
        """Forget it."""
        self.factory.open.remove(self)


def closed_port():
    """A loopback port nothing listens on (bound a moment ago, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EndToEndTests(TestCase):
    """poplib and imaplib through a real gateway: refusals and timeouts in their own protocol."""

    timeout = 30

    def silent_backend(self):
        """A loopback backend that never greets; returns its port."""
        factory = protocol.ServerFactory.forProtocol(_SilentServer)
        factory.open = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: wait_for(lambda: not factory.open))
        return port.getHost().port

    def real_backend(self, cls):
        """Twisted's POP3 or IMAP server on loopback; returns (factory, port)."""
        backend = cls()
        port = reactor.listenTCP(0, backend, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: wait_for(lambda: backend.open == 0))
        return backend, port.getHost().port

    @defer.inlineCallbacks
    def overloaded(self, name, client):
        """Hold one session with the gateway full after one; return what ``client(port)`` gets.

        A session waiting for a greeting is incomplete: max-incomplete-host = 1
        refuses the next.  A ``tcp`` session is open at once, so there
        one-minute-high = 1 refuses the next.
        """
        if name == "tcp":
            settings, reason = GlobalSettings(one_minute_high=1, one_minute_low=1), "one-minute"
        else:
            settings, reason = GlobalSettings(max_incomplete_host=1), "max-incomplete-host"
        tracker, port = start_gateway(self, Rule(name="R", protocol=name), self.silent_backend(), settings)
        holder = yield deferToThread(socket.create_connection, ("127.0.0.1", port), 10)
        self.addCleanup(holder.close)
        yield wait_for(lambda: any(s.server_up for s in tracker.sessions.values()))
        failure = yield deferToThread(client, port)
        self.assertEqual(tracker.refused[reason], 1)
        self.assertEqual(tracker.admitted_total, 1)
        return failure

    @staticmethod
    def pop3_greeting(port):
        """Open poplib on ``port``; return the error it raises (or fail)."""
        try:
            poplib.POP3("127.0.0.1", port, timeout=10).quit()
        except poplib.error_proto as e:
            return e
        raise AssertionError("poplib was greeted")

    @staticmethod
    def imap_greeting(port):
        """Open imaplib on ``port``; return the error it raises (or fail)."""
        try:
            imaplib.IMAP4("127.0.0.1", port, timeout=10).logout()
        except imaplib.IMAP4.error as e:
            return e
        raise AssertionError("imaplib was greeted")

    @defer.inlineCallbacks
    def test_pop3_overload(self):
        """poplib refused on overload reads -ERR [SYS/TEMP] Too many connections, not SMTP's 421."""
        e = yield self.overloaded("pop3", self.pop3_greeting)
        self.assertEqual(e.args[0], EXPECTED["pop3"]["overload"].rstrip(b"\r\n"))

    @defer.inlineCallbacks
    def test_imap_overload(self):
        """imaplib refused on overload reads * BYE [UNAVAILABLE] Too many connections."""
        e = yield self.overloaded("imap", self.imap_greeting)
        self.assertIn("* BYE [UNAVAILABLE] Too many connections, try again later", str(e))

    @defer.inlineCallbacks
    def test_pop3_unreachable(self):
        """poplib in front of an unreachable backend reads -ERR [SYS/TEMP] Mail server unreachable."""
        _, port = start_gateway(self, Rule(name="R", protocol="pop3"), closed_port())
        e = yield deferToThread(self.pop3_greeting, port)
        self.assertEqual(e.args[0], EXPECTED["pop3"]["unreachable"].rstrip(b"\r\n"))

    @defer.inlineCallbacks
    def test_imap_unreachable(self):
        """imaplib in front of an unreachable backend reads * BYE [UNAVAILABLE] Mail server unreachable."""
        _, port = start_gateway(self, Rule(name="R", protocol="imap"), closed_port())
        e = yield deferToThread(self.imap_greeting, port)
        self.assertIn("* BYE [UNAVAILABLE] Mail server unreachable", str(e))

    @defer.inlineCallbacks
    def test_tcp_refusals_silent(self):
        """A tcp client refused on overload, or with no backend, is closed without a byte."""

        def read_all(port):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                got = b""
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return got
                    got += chunk

        got = yield self.overloaded("tcp", read_all)
        self.assertEqual(got, b"")
        _, port = start_gateway(self, Rule(name="T", protocol="tcp"), closed_port())
        got = yield deferToThread(read_all, port)
        self.assertEqual(got, b"")

    @defer.inlineCallbacks
    def test_pop3_idle_timeout(self):
        """A logged-in poplib client left idle reads -ERR [SYS/TEMP] Idle timeout; the POP3 server gets QUIT."""
        backend, bport = self.real_backend(POP3Backend)
        tracker, port = start_gateway(self, Rule(name="R", protocol="pop3", timeout=1), bport)
        client = yield deferToThread(poplib.POP3, "127.0.0.1", port, 10)
        self.addCleanup(client.close)
        yield deferToThread(client.user, USER)
        yield deferToThread(client.pass_, PASSWORD)
        yield wait_for(lambda: tracker.timeouts["idle"] == 1 and not tracker.sessions)
        e = yield self.assertFailure(deferToThread(client.noop), poplib.error_proto)
        self.assertEqual(e.args[0], EXPECTED["pop3"]["idle"].rstrip(b"\r\n"))
        self.assertTrue(backend.data.endswith(b"QUIT\r\n"), backend.data)

    @defer.inlineCallbacks
    def test_imap_idle_timeout(self):
        """A logged-in imaplib client left idle reads * BYE Idle timeout."""
        backend, bport = self.real_backend(IMAPBackend)
        tracker, port = start_gateway(self, Rule(name="R", protocol="imap", timeout=1), bport)
        client = yield deferToThread(imaplib.IMAP4, "127.0.0.1", port, 10)
        self.addCleanup(client.shutdown)
        yield deferToThread(client.login, USER, PASSWORD)
        yield wait_for(lambda: tracker.timeouts["idle"] == 1 and not tracker.sessions)
        e = yield self.assertFailure(deferToThread(client.noop), imaplib.IMAP4.abort)
        self.assertIn("Idle timeout, closing connection", str(e))
