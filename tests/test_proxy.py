"""Real client identity across proxies: inbound PROXY protocol, outbound PROXY header, XCLIENT."""

import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.threads import deferToThread
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory

from mailguard.policy import GlobalSettings, Rule
from mailguard.proxyheader import proxy_header
from tests.clients import LockstepClient, read_reply, wait_for
from tests.harness import start_gateway
from tests.test_gateway import GatewayTestCase


def proxied_session(port, source, lines=(b"QUIT",)):
    """Connect as a proxy would: PROXY v1 header for ``source``, then lockstep SMTP."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = sock.makefile("rb")
    try:
        sock.sendall(proxy_header("v1", source, ("127.0.0.1", port)))
        replies = [read_reply(f)]
        for line in lines:
            sock.sendall(line + b"\r\n")
            replies.append(read_reply(f))
        return replies
    finally:
        f.close()
        sock.close()


class InboundProxyTests(GatewayTestCase):
    """A haproxy: listener makes the real client the session's initiator everywhere."""

    def proxied_gateway(self, backend_port, settings=None, **rule):
        self.rule = Rule(name="P", protocol="esmtp", max_data=100000, audit_trail=True, **rule)
        self.tracker, port = start_gateway(self, self.rule, backend_port, settings, listen="haproxy:tcp:0")
        return port

    @defer.inlineCallbacks
    def test_audit_trail_sees_real_client(self):
        """The audit trail names the address from the PROXY header, not the proxy's."""
        backend, bport = self.recording()
        port = self.proxied_gateway(bport)
        replies = yield deferToThread(proxied_session, port, ("203.0.113.7", 4242))
        self.assertEqual(replies[-1][:3], b"221")
        yield wait_for(lambda: self.alerts("SESS_AUDIT_TRAIL"))
        self.assertEqual(self.alerts("SESS_AUDIT_TRAIL")[0]["initiator"], "203.0.113.7:4242")

    @defer.inlineCallbacks
    def test_per_host_limit_uses_real_client(self):
        """max-incomplete-host counts the real client: another real client behind the same proxy is admitted."""
        backend, bport = self.recording(greet=False)
        port = self.proxied_gateway(bport, settings=GlobalSettings(max_incomplete_host=1))

        def open_proxied(source):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(proxy_header("v1", source, ("127.0.0.1", port)))
            return sock

        first = yield deferToThread(open_proxied, ("198.51.100.1", 1000))
        self.addCleanup(first.close)
        yield wait_for(lambda: len(self.tracker.sessions) == 1)

        def refused():
            sock = open_proxied(("198.51.100.1", 1001))
            try:
                return sock.recv(1024)
            finally:
                sock.close()

        got = yield deferToThread(refused)
        self.assertTrue(got.startswith(b"421 4.7.0"), got)
        other = yield deferToThread(open_proxied, ("198.51.100.2", 1002))
        self.addCleanup(other.close)
        yield wait_for(lambda: len(self.tracker.sessions) == 2)
        hosts = sorted(s.initiator for s in self.tracker.sessions.values())
        self.assertEqual(hosts, ["198.51.100.1:1000", "198.51.100.2:1002"])
        first.close()
        other.close()


class _PeerRecorder(protocol.Protocol):
    """A backend behind Twisted's PROXY parser: records the peer it was told about."""

    def connectionMade(self):
        self.transport.write(b"220 backend ESMTP\r\n")

    def dataReceived(self, data):
        # Twisted's wrapper knows the proxied peer once the header is parsed.
        self.factory.peers.append(self.transport.getPeer())
        if b"QUIT" in data.upper():
            self.transport.write(b"221 bye\r\n")
            self.transport.loseConnection()


class OutboundProxyTests(GatewayTestCase):
    """backend-proxy-protocol and xclient."""

    @defer.inlineCallbacks
    def check_header(self, version):
        factory = protocol.ServerFactory.forProtocol(_PeerRecorder)
        factory.peers = []
        listening = reactor.listenTCP(0, HAProxyWrappingFactory(factory), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        bport = listening.getHost().port
        self.rule = Rule(name="O", protocol="esmtp")
        self.tracker, port = start_gateway(self, self.rule, bport, backend_proxy_protocol=version)

        def talk():
            client = LockstepClient(port)
            local = client.sock.getsockname()
            client.command(b"QUIT")
            client.close()
            return local

        local = yield deferToThread(talk)
        (peer,) = factory.peers
        self.assertEqual((peer.host, peer.port), local)

    def test_proxy_v1(self):
        """A v1 PROXY header tells the backend the real client's address and port."""
        return self.check_header("v1")

    def test_proxy_v2(self):
        """A v2 PROXY header tells the backend the real client's address and port."""
        return self.check_header("v2")

    @defer.inlineCallbacks
    def test_xclient(self):
        """With xclient on, the backend gets XCLIENT with the client's address before the client's EHLO."""
        backend, bport = self.recording(
            extensions=("PIPELINING", "XCLIENT ADDR PORT HELO PROTO"),
            replyOverride={"XCLIENT": b"220 backend ESMTP after XCLIENT\r\n"},
        )
        self.rule = Rule(name="X", protocol="esmtp")
        self.tracker, port = start_gateway(self, self.rule, bport, xclient=True)

        def talk():
            client = LockstepClient(port)
            local = client.sock.getsockname()
            replies = [client.greeting, client.command(b"EHLO c.example"), client.command(b"QUIT")]
            client.close()
            return local, replies

        (host, cport), replies = yield deferToThread(talk)
        self.assertTrue(replies[0].startswith(b"220 localhost ESMTP"), replies)
        self.assertEqual([r[:3] for r in replies[1:]], [b"250", b"221"])
        yield wait_for(lambda: backend.connections[0].closed)
        received = bytes(backend.connections[0].received)
        self.assertEqual(
            received,
            b"EHLO localhost\r\nXCLIENT ADDR=%s PORT=%d HELO=[UNAVAILABLE] PROTO=[UNAVAILABLE]\r\n"
            b"EHLO c.example\r\nQUIT\r\n" % (host.encode(), cport),
        )
