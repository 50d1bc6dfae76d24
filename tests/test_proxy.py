"""Real client identity across proxies: inbound PROXY protocol, outbound PROXY header, XCLIENT.

The inbound header's parser (`mailguard.proxyreader`) is tested alone, whole
and byte by byte, against the specification's examples and against what
Twisted's own ``haproxy:`` wrapper makes of the same bytes (through its
public `proxyEndpoint`); the shell wrapper in the tracker is tested on a
`MemoryReactorClock`, and the whole path end to end.
"""

import ipaddress
import socket
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.protocols.haproxy import proxyEndpoint
from twisted.trial.unittest import SynchronousTestCase

from mailguard.policy import GlobalSettings, Listener, Rule
from mailguard.proxyheader import proxy_header
from mailguard.proxyreader import V2_SIGNATURE, InvalidProxyHeader, ProxyHeader, ProxyHeaderReader
from mailguard.service import listener_factory
from mailguard.tracker import SessionTracker
from tests.clients import LockstepClient, read_reply, wait_for
from tests.harness import start_gateway
from tests.test_gateway import GatewayTestCase


def read(chunks):
    """Feed ``chunks`` to a new reader; return ``(header, rest)`` where rest is every byte after the header.

    ``header`` is None when the chunks never complete one.
    """
    reader = ProxyHeaderReader()
    for i, chunk in enumerate(chunks):
        header, rest = reader.feed(chunk)
        if header is not None:
            return header, rest + b"".join(chunks[i + 1 :])
    return None, b""


def bytewise(data):
    """``data`` one byte per chunk."""
    return [data[i : i + 1] for i in range(len(data))]


def v2(command, family, body):
    """A v2 header: signature, version/command, family, length, ``body``."""
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(body)) + body


def v2_inet(source, destination, tlv=b"", family=None):
    """A v2 PROXY header for two ``(host, port)`` of one IP version, with optional TLV octets."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if family is None:
        family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1]) + tlv
    return v2(0x21, family, body)


def v2_unix(source, destination):
    """A v2 PROXY header for two UNIX socket paths."""
    return v2(0x21, 0x31, source.ljust(108, b"\x00") + destination.ljust(108, b"\x00"))


#: Valid headers and what they say: (bytes, version, family, source, destination).
VALID = [
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n", 1, "TCP4", ("192.0.2.1", 56324), ("198.51.100.2", 25)),
    (b"PROXY TCP6 2001:db8::1 2001:0db8:0:0:0:0:0:2 65535 0\r\n", 1, "TCP6", ("2001:db8::1", 65535),
     ("2001:db8::2", 0)),
    (b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n", 1, "TCP6", ("::ffff:192.0.2.1", 1), ("::1", 2)),
    (b"PROXY UNKNOWN\r\n", 1, None, None, None),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", 1, None, None, None),
    (v2_inet(("192.0.2.1", 56324), ("198.51.100.2", 25)), 2, "TCP4", ("192.0.2.1", 56324), ("198.51.100.2", 25)),
    (v2_inet(("2001:db8::1", 4000), ("::ffff:10.0.0.1", 25), tlv=b"\x04\x00\x03abc"), 2, "TCP6",
     ("2001:db8::1", 4000), ("::ffff:10.0.0.1", 25)),
    (v2_inet(("192.0.2.9", 53), ("192.0.2.10", 53), family=0x12), 2, "UDP4", ("192.0.2.9", 53), ("192.0.2.10", 53)),
    (v2_unix(b"/run/client.sock", b"/run/mailguard.sock"), 2, "UNIX", b"/run/client.sock", b"/run/mailguard.sock"),
    (v2(0x20, 0x00, b""), 2, None, None, None),
    (v2(0x20, 0x11, b"\x00" * 12), 2, None, None, None),
    (v2(0x21, 0x00, b"anything"), 2, None, None, None),
]


#: Invalid headers and the reason each is refused with.
INVALID = {
    b"GET / HTTP/1.1\r\n": "not a PROXY header",
    b"PROXX TCP4": "not a PROXY header",
    b"proxy TCP4 192.0.2.1 192.0.2.2 1 2\r\n": "not a PROXY header",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n": "not ended by CRLF",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r2\r\n": "bare CR",
    b"PROXY UDP4 192.0.2.1 192.0.2.2 1 2\r\n": "protocol 'UDP4' is not TCP4, TCP6 or UNKNOWN",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n": "needs 4 fields after the protocol, got 3",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3\r\n": "needs 4 fields",
    b"PROXY TCP4 192.0.2.1  192.0.2.2 1 2\r\n": "needs 4 fields",
    b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n": "'2001:db8::1' is not an IPv4 address",
    b"PROXY TCP6 192.0.2.1 ::1 1 2\r\n": "'192.0.2.1' is not an IPv6 address",
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n": "is not an IPv6 address",
    b"PROXY TCP4 192.0.2.01 192.0.2.2 1 2\r\n": "is not an IPv4 address",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n": "port '65536'",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 -1 2\r\n": "port '-1'",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 0x19\r\n": "port '0x19'",
    b"PROXY UNKNOWN " + b"x" * 100: "longer than 107 octets",
    V2_SIGNATURE[:5] + b"X": "not a PROXY header",
    V2_SIGNATURE + b"\x11\x11\x00\x0c": "version/command octet 0x11",
    V2_SIGNATURE + b"\x22\x11\x00\x0c": "version/command octet 0x22",
    V2_SIGNATURE + b"\x21\x13\x00\x0c": "address family octet 0x13",
    v2(0x21, 0x11, b"\x00" * 11): "TCP4 header has 11 address octets, needs 12",
    v2(0x21, 0x21, b"\x00" * 12): "TCP6 header has 12 address octets, needs 36",
    v2(0x21, 0x31, b"\x00" * 200): "UNIX header has 200 address octets, needs 216",
}


class ReaderTests(SynchronousTestCase):
    """mailguard.proxyreader parses PROXY v1 and v2 headers in any segmentation, or says why not."""

    def test_valid_whole_and_bytewise(self):
        """Every valid header gives the same value and the same following bytes, whole or byte by byte."""
        for data, *fields in VALID:
            expected = ProxyHeader(*fields, len(data))
            for chunks in ([data + b"EHLO x\r\n"], bytewise(data + b"EHLO x\r\n")):
                self.assertEqual(read(chunks), (expected, b"EHLO x\r\n"), data)

    def test_incomplete(self):
        """Every proper prefix of a valid header is still incomplete, never an error."""
        for data, *_ in VALID:
            reader = ProxyHeaderReader()
            for piece in bytewise(data[:-1]):
                self.assertEqual(reader.feed(piece), (None, b""), data)

    def test_invalid_whole_and_bytewise(self):
        """Every invalid header raises InvalidProxyHeader with its reason, whole or byte by byte, before any value."""
        for data, reason in INVALID.items():
            for chunks in ([data], bytewise(data)):
                e = self.assertRaises(InvalidProxyHeader, read, chunks)
                self.assertIn(reason, str(e), data)
                self.assertEqual(len(str(e).splitlines()), 1)

    def test_refused_early(self):
        """The first octet that fits neither signature is refused at once: nothing waits for more."""
        self.assertRaises(InvalidProxyHeader, ProxyHeaderReader().feed, b"E")
        reader = ProxyHeaderReader()
        for piece in bytewise(b"PROX"):
            reader.feed(piece)
        self.assertRaises(InvalidProxyHeader, reader.feed, b"X")
        reader = ProxyHeaderReader()
        reader.feed(b"\r\n\r")
        self.assertRaises(InvalidProxyHeader, reader.feed, b"\r")

    def test_v1_bound(self):
        """A v1 header may take 107 octets with its CRLF; the 107th octet without LF is refused."""
        longest = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
        self.assertEqual(len(longest), 107)
        self.assertEqual(read([longest])[0], ProxyHeader(1, None, None, None, 107))
        reader = ProxyHeaderReader()
        self.assertEqual(reader.feed(longest[:-1]), (None, b""))
        self.assertRaises(InvalidProxyHeader, reader.feed, b"x")

    def test_v2_longest(self):
        """A v2 header of the longest length (65535 octets after the fixed 16, TLVs included) is read, byte by byte too."""
        block = ipaddress.ip_address("192.0.2.1").packed * 2 + struct.pack("!HH", 1, 2)
        data = v2(0x21, 0x11, block + b"\x00" * (0xFFFF - len(block)))
        self.assertEqual(len(data), 16 + 0xFFFF)
        expected = ProxyHeader(2, "TCP4", ("192.0.2.1", 1), ("192.0.2.1", 2), len(data))
        self.assertEqual(read([data + b"x"]), (expected, b"x"))
        self.assertEqual(read(bytewise(data + b"x")), (expected, b"x"))

    def test_only_once(self):
        """A reader reads one header: feeding it again is a programming error."""
        reader = ProxyHeaderReader()
        reader.feed(b"PROXY UNKNOWN\r\n")
        self.assertRaises(RuntimeError, reader.feed, b"PROXY UNKNOWN\r\n")

    @settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.sampled_from(["v1", "v2"]),
        st.one_of(st.tuples(st.ip_addresses(v=4), st.ip_addresses(v=4)),
                  st.tuples(st.ip_addresses(v=6), st.ip_addresses(v=6))),
        st.integers(0, 65535), st.integers(0, 65535),
    )
    def test_round_trip(self, version, hosts, sport, dport):
        """What mailguard.proxyheader writes for the backend, the reader reads back."""
        source, destination = (str(hosts[0]), sport), (str(hosts[1]), dport)
        header, rest = read([proxy_header(version, source, destination)])
        self.assertEqual(rest, b"")
        if _unmapped(hosts[0]).version != _unmapped(hosts[1]).version:
            # Mixed families: the writer names no addresses.
            self.assertIsNone(header.family)
            return
        self.assertEqual(
            (ipaddress.ip_address(header.source[0]), header.source[1]),
            (_unmapped(hosts[0]), sport))
        self.assertEqual(
            (ipaddress.ip_address(header.destination[0]), header.destination[1]),
            (_unmapped(hosts[1]), dport))

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE, V2_SIGNATURE + b"\x21"]),
        st.binary(max_size=120),
        st.lists(st.integers(1, 140), max_size=8),
    )
    def test_never_anything_else(self, prefix, data, cuts):
        """Any bytes, in any segmentation: a header, an InvalidProxyHeader, or still incomplete; the same whole or cut."""
        data = prefix + data
        chunks, last = [], 0
        for cut in sorted(set(c for c in cuts if c < len(data))):
            chunks.append(data[last:cut])
            last = cut
        chunks.append(data[last:])
        outcomes = []
        for pieces in ([data], chunks):
            try:
                outcomes.append(read(pieces))
            except InvalidProxyHeader as e:
                outcomes.append(("invalid", type(e)))
        self.assertEqual(outcomes[0], outcomes[1])


class _Collect(protocol.Protocol):
    """Collects what a wrapper hands on after the header."""

    received = b""

    def dataReceived(self, data):
        """Keep it."""
        self.received += data


class _Capture:
    """A server endpoint that only remembers the factory it is asked to listen with."""

    def listen(self, factory):
        """Remember ``factory``."""
        self.factory = factory
        return defer.succeed(None)


#: Valid headers Twisted's wrapper refuses (its v1 parser wants a space after UNKNOWN).
TWISTED_REFUSES = {b"PROXY UNKNOWN\r\n"}

#: The addresses of the connection itself, as the wrappers' transport reports them.
PROXY_PEER = IPv4Address("TCP", "127.0.0.2", 9999)
PROXY_HOST = IPv4Address("TCP", "127.0.0.3", 2525)


def twisted_reads(data):
    """What Twisted's own ``haproxy:`` wrapper (public `proxyEndpoint`) makes of ``data`` fed whole.

    Returns ``(peer, host, bytes handed on, dropped)``.
    """
    capture = _Capture()
    proxyEndpoint(capture).listen(protocol.Factory.forProtocol(_Collect))
    wrapper = capture.factory.buildProtocol(PROXY_PEER)
    transport = StringTransport(peerAddress=PROXY_PEER, hostAddress=PROXY_HOST)
    wrapper.makeConnection(transport)
    wrapper.dataReceived(data)
    return wrapper.getPeer(), wrapper.getHost(), wrapper.wrappedProtocol.received, transport.disconnecting


def _ip_header():
    """Hypothesis: a valid v1 or v2 header naming IP addresses, and what it names."""
    v4 = st.tuples(st.just(4), st.ip_addresses(v=4), st.ip_addresses(v=4))
    v6 = st.tuples(st.just(6), st.ip_addresses(v=6), st.ip_addresses(v=6))
    ports = st.tuples(st.integers(0, 65535), st.integers(0, 65535))

    def v1(args):
        (version, src, dst), (sport, dport), exploded = args
        text = (lambda ip: ip.exploded) if exploded else str
        data = b"PROXY TCP%d %s %s %d %d\r\n" % (version, text(src).encode(), text(dst).encode(), sport, dport)
        return data, "TCP%d" % version, (src, sport), (dst, dport)

    def v2_(args):
        (version, src, dst), (sport, dport), (udp, tlv) = args
        family = (0x10 if version == 4 else 0x20) | (2 if udp else 1)
        data = v2_inet((str(src), sport), (str(dst), dport), tlv=tlv, family=family)
        return data, ("UDP%d" if udp else "TCP%d") % version, (src, sport), (dst, dport)

    return st.one_of(
        st.tuples(st.one_of(v4, v6), ports, st.booleans()).map(v1),
        st.tuples(st.one_of(v4, v6), ports, st.tuples(st.booleans(), st.binary(max_size=40))).map(v2_),
    )


class TwistedAgreementTests(SynchronousTestCase):
    """On valid headers, mailguard's reader and Twisted's haproxy: wrapper name the same addresses."""

    def assertSameAddress(self, ours, family, theirs, own):
        """Our value for one end (``family``) names what Twisted's address ``theirs`` names (``own`` if nothing)."""
        if ours is None:
            self.assertEqual(theirs, own)
        elif family.startswith("UNIX"):
            self.assertIsInstance(theirs, UNIXAddress)
            self.assertEqual(theirs.name, ours)
        else:
            self.assertIsInstance(theirs, IPv4Address if family.endswith("4") else IPv6Address)
            self.assertEqual(theirs.type, family[:3])
            self.assertEqual((ipaddress.ip_address(theirs.host), theirs.port), (ipaddress.ip_address(ours[0]), ours[1]))

    def check(self, data, rest=b"MAIL\r\n"):
        """Feed ``data + rest`` to both; they agree on both ends and on the bytes handed on."""
        peer, host, handed, dropped = twisted_reads(data + rest)
        self.assertFalse(dropped, data)
        header, ours = read([data + rest])
        self.assertEqual(ours, handed)
        self.assertSameAddress(header.source, header.family, peer, PROXY_PEER)
        self.assertSameAddress(header.destination, header.family, host, PROXY_HOST)
        return header

    def test_examples(self):
        """Every valid example: both name the same ends, and hand on the same bytes."""
        for data, *_ in VALID:
            if data in TWISTED_REFUSES:
                continue
            self.check(data)

    def test_known_difference(self):
        """Twisted drops ``PROXY UNKNOWN`` without a space after it, which the specification allows and we accept."""
        for data in TWISTED_REFUSES:
            self.assertTrue(twisted_reads(data)[3])
            self.assertEqual(read([data])[0].family, None)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_ip_header(), st.binary(max_size=20))
    def test_generated(self, generated, rest):
        """Generated v1 and v2 headers (IPv4, IPv6, UDP, TLVs, any trailing bytes): both agree, and match the input."""
        data, family, source, destination = generated
        header = self.check(data, rest)
        self.assertEqual(header.family, family)
        self.assertEqual((ipaddress.ip_address(header.source[0]), header.source[1]), source)
        self.assertEqual((ipaddress.ip_address(header.destination[0]), header.destination[1]), destination)


class _ProxiedChain:
    """A ``haproxy:`` listener's factory chain on a MemoryReactorClock."""

    def __init__(self, **settings):
        self.reactor = MemoryReactorClock()
        # tcp: bytes sent before the backend is up are held, not refused as early talk.
        rule = Rule(name="P", protocol="tcp")
        listener = Listener(name="p", listen="haproxy:tcp:0", backend="tcp:127.0.0.1:1", rule=rule)
        self.tracker = SessionTracker(GlobalSettings(**settings), self.reactor)
        backend = endpoints.TCP4ClientEndpoint(self.reactor, "127.0.0.1", 1)
        self.factory = listener_factory(listener, self.tracker, self.reactor, backend)

    def connect(self):
        """The proxy connects; return (wrapper, transport)."""
        wrapper = self.factory.buildProtocol(PROXY_PEER)
        transport = StringTransport(peerAddress=PROXY_PEER, hostAddress=PROXY_HOST)
        wrapper.makeConnection(transport)
        return wrapper, transport


class ProxyWrapperTests(SynchronousTestCase):
    """The tracker's PROXY wrapper admits the client the header names, whatever the segmentation."""

    def test_bytewise(self):
        """A v1 header arriving one byte at a time admits the real client; the bytes after it reach the session."""
        chain = _ProxiedChain()
        wrapper, transport = chain.connect()
        data = proxy_header("v1", ("203.0.113.7", 4242), ("192.0.2.25", 25)) + b"EHLO x\r\n"
        for piece in bytewise(data):
            wrapper.dataReceived(piece)
        (session,) = chain.tracker.sessions.values()
        self.assertEqual(session.initiator, "203.0.113.7:4242")
        self.assertEqual(session.client_bytes, len(b"EHLO x\r\n"))
        self.assertEqual((wrapper.getHost().host, wrapper.getHost().port), ("192.0.2.25", 25))
        self.assertFalse(transport.disconnecting)

    def test_no_session_before_header(self):
        """Until the header is whole nobody is admitted; the connection counts nowhere."""
        chain = _ProxiedChain()
        wrapper, _ = chain.connect()
        wrapper.dataReceived(proxy_header("v2", ("203.0.113.7", 4242), ("192.0.2.25", 25))[:-1])
        self.assertEqual(chain.tracker.sessions, {})
        self.assertEqual(chain.tracker.admitted_total, 0)

    def test_local(self):
        """A v2 LOCAL header (a health check) leaves the connection's own addresses."""
        chain = _ProxiedChain()
        wrapper, _ = chain.connect()
        wrapper.dataReceived(v2(0x20, 0x00, b""))
        (session,) = chain.tracker.sessions.values()
        self.assertEqual(session.initiator, "127.0.0.2:9999")
        self.assertEqual(wrapper.getHost(), PROXY_HOST)

    def test_invalid_dropped(self):
        """A connection that opens with no valid header is aborted, never admitted."""
        for data in (b"EHLO x\r\n", b"PROXY TCP4 a b 1 2\r\n", V2_SIGNATURE + b"\x31"):
            chain = _ProxiedChain()
            wrapper, transport = chain.connect()
            wrapper.dataReceived(data)
            self.assertTrue(transport.disconnected, data)
            self.assertEqual(chain.tracker.admitted_total, 0, data)

    def test_header_timeout(self):
        """A proxy that never finishes its header is aborted after synwait-time."""
        chain = _ProxiedChain(synwait_time=7)
        wrapper, transport = chain.connect()
        wrapper.dataReceived(b"PROXY TCP4 ")
        chain.reactor.advance(6.9)
        self.assertFalse(transport.disconnected)
        chain.reactor.advance(0.1)
        self.assertTrue(transport.disconnected)


def _unmapped(ip):
    """An IPv4-mapped IPv6 address as the writer sends it (as IPv4); any other unchanged."""
    return ip.ipv4_mapped if getattr(ip, "ipv4_mapped", None) else ip


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
        listening = yield proxyEndpoint(endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")).listen(factory)
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
