"""Tests for the relay shell's own choices: how the backend is connected, and what a session costs."""

from twisted.internet import endpoints, error
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IPushProducer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailguard.commands import MODES
from mailguard.inspectors import inspector_factory, refusal_reply
from mailguard.policy import Rule
from mailguard.endpoints import PlainTCPClient, client_endpoint
from mailguard.relay import ClientLeg, ServerLeg, direct_tcp
from mailguard.smtp import SMTPInspector


class _Tracker:
    """Records what the leg tells the tracker."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kw: self.calls.append(name)


class _Session:
    """The few session fields a leg updates."""

    id = 1
    client_bytes = server_bytes = 0

    def touch(self):
        """Activity is not under test here."""

    def set_responder(self, address):
        """Nor is the responder."""


class _Factory:
    """What a ClientLeg reads from its InspectorFactory."""

    def __init__(self, reactor):
        self.backend = PlainTCPClient(reactor, "127.0.0.1", 2526, timeout=7)
        self.direct = direct_tcp(self.backend)
        self.connect_timeout = 30
        self.clock = reactor
        self.tracker = _Tracker()
        self.backend_name = "tcp:host=127.0.0.1:port=2526"
        self.unreachable_reply = refusal_reply(inspector_factory("esmtp"), "unreachable")


def _leg(reactor):
    rule = Rule(name="R", protocol="esmtp")
    leg = ClientLeg(_Factory(reactor), SMTPInspector(rule, MODES["esmtp"]))
    leg.session = _Session()
    transport = StringTransport()
    leg.makeConnection(transport)
    return leg, transport


class DirectConnectTests(SynchronousTestCase):
    """A plain tcp: backend is connected with connectTCP, from the endpoint's own parsed values."""

    def test_direct_values(self):
        """direct_tcp takes host, port and bind address from a plain tcp: backend, nothing else."""
        reactor = MemoryReactorClock()
        tcp = client_endpoint(reactor, "tcp:host=127.0.0.1:port=25:bindAddress=127.0.0.2")
        self.assertEqual(direct_tcp(tcp), (reactor, "127.0.0.1", 25, ("127.0.0.2", 0)))
        self.assertIsNone(direct_tcp(endpoints.clientFromString(reactor, "tcp:host=127.0.0.1:port=25")))
        self.assertIsNone(direct_tcp(endpoints.clientFromString(reactor, "unix:path=/tmp/x.sock")))
        self.assertIsNone(direct_tcp(endpoints.HostnameEndpoint(reactor, b"localhost", 25)))

    def test_connects_with_the_session_timeout(self):
        """The client's arrival opens one connectTCP to the backend, bounded by synwait-time."""
        reactor = MemoryReactorClock()
        leg, _ = _leg(reactor)
        [(host, port, factory, timeout, bind)] = reactor.tcpClients
        self.assertEqual((host, port, timeout, bind), ("127.0.0.1", 2526, 30, None))
        self.assertIsInstance(factory, ServerLeg)
        self.assertIs(factory.client, leg)
        self.assertIs(factory.buildProtocol(None), factory)

    def test_client_gone_while_connecting(self):
        """A client that leaves before the backend answers abandons the attempt quietly."""
        reactor = MemoryReactorClock()
        leg, transport = _leg(reactor)
        connector = reactor.connectors[0]
        leg.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(connector.stoppedConnecting, True)
        # The connector reports the abandoned attempt as a failure: not an error.
        reactor.tcpClients[0][2].clientConnectionFailed(connector, Failure(error.UserError()))
        self.assertEqual(transport.value(), b"")
        self.assertIn("closed", leg.factory.tracker.calls)

    def test_backend_refused(self):
        """A refused backend connection gives the client 421 4.4.1 and closes it."""
        reactor = MemoryReactorClock()
        leg, transport = _leg(reactor)
        factory = reactor.tcpClients[0][2]
        factory.clientConnectionFailed(reactor.connectors[0], Failure(error.ConnectionRefusedError()))
        self.assertTrue(transport.value().startswith(b"421 4.4.1 "), transport.value())
        self.assertTrue(transport.disconnecting)


class FootprintTests(SynchronousTestCase):
    """What every idle session holds is kept out of instance dictionaries."""

    def test_no_instance_dictionaries(self):
        """The legs and the SMTP inspector are slotted: ten thousand idle sessions hold no dicts for them."""
        reactor = MemoryReactorClock()
        leg, _ = _leg(reactor)
        server = reactor.tcpClients[0][2]
        for obj in (leg, server, leg.inspector):
            self.assertFalse(hasattr(obj, "__dict__"), type(obj).__name__)

    def test_interfaces(self):
        """The slotted legs still provide what Twisted calls on them."""
        reactor = MemoryReactorClock()
        leg, _ = _leg(reactor)
        server = reactor.tcpClients[0][2]
        verifyObject(IProtocol, leg)
        verifyObject(IPushProducer, leg)
        verifyObject(IProtocol, server)
        verifyObject(IProtocolFactory, server)
