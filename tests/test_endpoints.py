"""mailguard.endpoints: descriptions split as Twisted splits them, and what is wrong with them said in words."""

import inspect

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import endpoints as tx
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from mailguard import endpoints
from mailguard.endpoints import EndpointError, check_client, check_server
from mailguard.policy import PolicyError, parse_policy

SAMPLES = [
    "tcp:25",
    "tcp:25:interface=127.0.0.1",
    r"tcp6:2525:interface=\:\:1",
    "haproxy:tcp:25",
    "ssl:465:privateKey=key.pem:certKey=cert.pem",
    "unix:/run/mg.sock:mode=600",
    "tcp:host=mx.example.org:port=25:bindAddress=10.0.0.1",
    r"a\\b:c\=d:e=f=g::",
    "systemd:domain=INET:index=0",
    "",
]


class SplitTests(SynchronousTestCase):
    """`split` agrees with Twisted's own parser."""

    def assertSameAsTwisted(self, description):
        # Twisted's parser is private; this test pins its behaviour, so a
        # Twisted that splits differently fails here first.
        args, kwargs = tx._parse(description)
        kind, ours, named = endpoints.split(description)
        # No positional word at all: no kind (Twisted's list is empty).
        words = [kind] + ours if args else ours + ([kind] if kind else [])
        self.assertEqual((words, named), (args, kwargs))

    def test_samples(self):
        """Every sample description splits into the words and names Twisted finds."""
        for description in SAMPLES:
            self.assertSameAsTwisted(description)

    @given(st.text(alphabet=":=\\abc1", max_size=30))
    def test_any_text(self, description):
        """Any text of separators, escapes and words splits as Twisted splits it."""
        if (len(description) - len(description.rstrip("\\"))) % 2:
            return  # a dangling escape: Twisted's tokenizer raises StopIteration
        self.assertSameAsTwisted(description)

    def test_unparse_round_trip(self):
        """A parsed description written out again parses to the same values."""
        for description in SAMPLES[:-1]:
            parsed = endpoints.parse(description)
            self.assertEqual(endpoints.parse(parsed.unparse()).kwargs, parsed.kwargs)
            self.assertEqual(endpoints.parse(parsed.unparse()).args, parsed.args)


class ParameterTableTests(SynchronousTestCase):
    """The tables of known parameters are Twisted's."""

    def test_server_parameters_are_twisteds(self):
        """Each built-in server kind's parameters are exactly its Twisted parser's, in order."""
        parsers = {
            "tcp": tx._parseTCP, "ssl": tx._parseSSL, "unix": tx._parseUNIX,
            "tcp6": tx._TCP6ServerParser._parseServer, "systemd": tx._SystemdParser._parseServer,
        }
        for kind, parser in parsers.items():
            names = [n for n in inspect.signature(parser).parameters if n not in ("self", "factory", "reactor")]
            self.assertEqual(tuple(names), endpoints.SERVER_PARAMETERS[kind], kind)

    def test_client_parameters_accepted(self):
        """Twisted's client parser accepts every parameter the table names (unknown ones it refuses)."""
        reactor = MemoryReactorClock()
        tx.clientFromString(reactor, "tcp:host=h:port=1:timeout=3:bindAddress=127.0.0.1")
        tx.clientFromString(reactor, "unix:path=/x:timeout=3:checkPID=0")
        self.assertRaises(TypeError, tx.clientFromString, reactor, "tcp:host=h:prt=1")


class ProblemTests(SynchronousTestCase):
    """A bad description is one sentence in the user's terms, never a parser's internals."""

    def problem(self, description, side="server"):
        if side == "server":
            with self.assertRaises(EndpointError) as cm:
                check_server(description)
            return str(cm.exception)
        return check_client(description)

    def test_ipv6_colons(self):
        """Unescaped IPv6 colons are named as such (not 'got multiple values for argument')."""
        self.assertEqual(self.problem("tcp6:25:interface=::1"),
                         r"colons in an IPv6 address must be escaped as \: (e.g. \:\:1)")
        self.assertIn(r"escaped as \:", self.problem("tcp:host=::1:port=25", "client"))

    def test_unknown_parameter(self):
        """An unknown parameter is named with the known ones (not 'unexpected keyword argument')."""
        self.assertEqual(self.problem("tcp:host=mx:prt=25", "client"),
                         "unknown parameter 'prt' for tcp: (known: host, port, timeout, bindAddress)")
        self.assertEqual(self.problem("tcp:25:iface=lo"),
                         "unknown parameter 'iface' for tcp: (known: port, interface, backlog)")

    def test_port_range(self):
        """A port beyond 65535 is out of range, for listeners and backends."""
        self.assertEqual(self.problem("tcp:70000"), "port 70000 out of range (0-65535)")
        self.assertEqual(self.problem("tcp:mx:65536", "client"), "port 65536 out of range (0-65535)")
        self.assertEqual(self.problem("tcp:port"), "port 'port' is not a number")

    def test_missing(self):
        """A backend without a port says which value is missing."""
        self.assertEqual(self.problem("tcp:mx", "client"), "tcp: needs port")

    def test_twisted_reasons_kept(self):
        """What only Twisted knows (an unknown kind) keeps Twisted's words."""
        self.assertEqual(self.problem("bogus:25"), "Unknown endpoint type: 'bogus'")

    def test_good_ones(self):
        """Valid descriptions raise nothing."""
        for description in ("tcp:25", r"tcp6:25:interface=\:\:1", "haproxy:tcp:25:interface=127.0.0.1",
                            "unix:/tmp/x.sock", "systemd:domain=INET:index=0"):
            check_server(description)
        self.assertIsNone(check_client("tcp:host=mx:port=25"))

    def test_policy_uses_it(self):
        """The policy's one-line error carries the sentence."""
        with self.assertRaises(PolicyError) as cm:
            parse_policy("[inspect R]\nprotocol = smtp\n[listener l]\nlisten = tcp6:25:interface=::1\n"
                         "backend = embedded\ninspect = R\n", path="p.ini")
        self.assertIn(r"p.ini: [listener l] listen: bad value 'tcp6:25:interface=::1': ", str(cm.exception))
        self.assertIn(r"must be escaped as \:", str(cm.exception))


class FactsTests(SynchronousTestCase):
    """What the gateway asks of a description."""

    def test_bind_description(self):
        """haproxy: goes, the default backlog comes unless the description sets one."""
        self.assertEqual(endpoints.bind_description("haproxy:tcp:25"), "tcp:25:backlog=1024")
        self.assertEqual(endpoints.bind_description("tcp:25:backlog=5"), "tcp:25:backlog=5")
        self.assertEqual(endpoints.bind_description("systemd:domain=INET:index=0"), "systemd:domain=INET:index=0")

    def test_tcp_address(self):
        """Family, port, interface and backlog of TCP listeners; None for others."""
        address = endpoints.tcp_address(r"haproxy:tcp6:25:interface=\:\:1")
        self.assertEqual((address.family, address.port, address.interface), ("tcp6", 25, "::1"))
        self.assertEqual(str(address), "[::1]:25")
        self.assertIsNone(endpoints.tcp_address("unix:/x"))

    def test_overlapping(self):
        """Same port on the same or a wildcard interface overlaps; port 0 never does."""
        self.assertIsNotNone(endpoints.overlapping([("a", "tcp:25"), ("b", "tcp:25:interface=127.0.0.1")]))
        self.assertIsNone(endpoints.overlapping([("a", "tcp:25:interface=127.0.0.2"),
                                                 ("b", "tcp:25:interface=127.0.0.1")]))
        self.assertIsNone(endpoints.overlapping([("a", "tcp:0"), ("b", "tcp:0")]))

    def test_client_host(self):
        """The host a backend description names, however it is written."""
        self.assertEqual(endpoints.client_host("tcp:host=mx.example.org:port=25"), "mx.example.org")
        self.assertEqual(endpoints.client_host("tcp:mx.example.org:25"), "mx.example.org")
        self.assertIsNone(endpoints.client_host("unix:path=/run/x"))

    def test_plain_tcp_client(self):
        """A tcp: backend becomes a PlainTCPClient with Twisted's values; others Twisted's endpoints."""
        reactor = MemoryReactorClock()
        plain = endpoints.client_endpoint(reactor, "tcp:mx:25:timeout=7:bindAddress=10.0.0.1")
        self.assertEqual((plain.host, plain.port, plain.timeout, plain.bindAddress),
                         ("mx", 25, 7, ("10.0.0.1", 0)))
        plain.connect(object())
        self.assertEqual(reactor.tcpClients[0][:2], ("mx", 25))
        self.assertNotIsInstance(endpoints.client_endpoint(reactor, "unix:path=/x"), endpoints.PlainTCPClient)
