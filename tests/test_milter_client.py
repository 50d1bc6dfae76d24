"""The milter client (mailguard.milterclient) against a milter written here for the protocol's corners.

The test milter listens on loopback and answers each packet the gateway
sends as the test scripts it; every timeout runs on a `task.Clock`.
"""

import struct
from types import MappingProxyType

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailguard import filters, milter, milterclient
from mailguard.filters import FilterConfig, SessionFacts
from mailguard.interfaces import IMessageFilter, IMessageFilterFactory
from mailguard.milter import PacketReader, encode
from mailguard.milterclient import MilterConnection, MilterFilterFactory

SILENT = object()
"""Script value: do not answer this packet."""
CLOSE = object()
"""Script value: close the connection instead of answering."""

STEP_PACKETS = frozenset(b"CHMRTLNBEU")


class TestMilterProtocol(Protocol):
    """One connection of the test milter: records packets, answers from the script."""

    def connectionMade(self):
        self.reader = PacketReader(limit=1 << 20)
        self.seen = []
        self.lost = defer.Deferred()
        self.factory.connections.append(self)

    def dataReceived(self, data):
        for command, payload in self.reader.feed(data):
            self.seen.append((command, payload))
            self.factory.arrived(command)
            answer = self.factory.answer(command, payload)
            if answer is CLOSE:
                self.transport.loseConnection()
                return
            if answer is not SILENT and answer:
                self.transport.write(answer)

    def connectionLost(self, reason=None):
        self.lost.callback(None)


class TestMilter(Factory):
    """A milter for the tests: negotiates ``protocol``/``actions``; ``script`` maps a command to answers.

    A script value is bytes (the answer), `SILENT`, `CLOSE`, or a list of
    those used one per occurrence.  Unscripted steps are answered continue.
    """

    protocol = TestMilterProtocol

    def __init__(self, protocol=0, actions=milter.ACTIONS, script=None):
        self.negotiation = encode(b"O", struct.pack("!III", 6, actions, protocol))
        self.script = dict(script or {})
        self.connections = []
        self._waiters = {}

    def answer(self, command, payload):
        if command == b"O":
            return self.script.get(b"O", self.negotiation)
        value = self.script.get(command)
        if isinstance(value, list):
            value = value.pop(0) if value else None
        if value is None:
            return encode(b"c") if command[0] in STEP_PACKETS else SILENT
        return value

    def arrived(self, command):
        for waiter in self._waiters.pop(command, []):
            waiter.callback(None)

    def when(self, command):
        """A Deferred firing when the next ``command`` packet arrives."""
        d = defer.Deferred()
        self._waiters.setdefault(command, []).append(d)
        return d

    def commands(self, index=-1):
        """The command letters connection ``index`` received, macros left out."""
        return b"".join(c for c, _ in self.connections[index].seen if c != b"D")


FACTS = SessionFacts(client=("192.0.2.7", 40000), helo=b"client.example", session="7")
HEADERS = [(b"From", b" a@example.org"), (b"To", b" b@example.org"), (b"Subject", b" hello")]


class ClientTestsMixin:
    """Start a test milter, build the client's filter, drive it as the gateway does."""

    def setUp(self):
        self.clock = task.Clock()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def start(self, milter_factory, default_action="tempfail", endpoint=None, **timeouts):
        """Listen with ``milter_factory``; return a filter connected to it."""
        if endpoint is None:
            port = reactor.listenTCP(0, milter_factory, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            endpoint = "tcp:host=127.0.0.1:port=%d" % port.getHost().port
        self.milter = milter_factory
        options = {"endpoint": endpoint, "connect_timeout": 5.0, "command_timeout": 10.0,
                   "content_timeout": 20.0, **timeouts}
        self.factory = MilterFilterFactory(reactor, self.clock)
        self.config = FilterConfig("test", "milter", 100.0, default_action, MappingProxyType(options),
                                   self.factory)
        flt = self.factory.buildFilter(self.config, FACTS)
        self.addCleanup(self.closeAll, flt)
        return flt

    @defer.inlineCallbacks
    def closeAll(self, flt):
        yield flt.close()
        if self.milter is not None:
            yield defer.DeferredList([c.lost for c in self.milter.connections])

    @defer.inlineCallbacks
    def transaction(self, flt, body=b"hello\r\n", recipients=(b"b@example.org",)):
        """MAIL, RCPTs, headers, end of headers, body, end of message; return every answer."""
        answers = [(yield flt.envelopeFrom(FACTS, b"a@example.org", b"SIZE=100"))]
        for rcpt in recipients:
            answers.append((yield flt.envelopeRecipient(rcpt, b"")))
        for name, value in HEADERS:
            answers.append((yield flt.header(name, value)))
        answers.append((yield flt.endOfHeaders()))
        answers.append((yield flt.body(body)))
        answers.append((yield flt.endOfMessage()))
        return answers

    def failures(self):
        """The MILTER_FAILED alerts logged, as (milter, reason)."""
        return [(e["milter"], e["reason"]) for e in self.events if e.get("tag") == "MILTER_FAILED"]


class DialogueTests(ClientTestsMixin, TestCase):
    """The client tells the milter what Postfix tells it, and applies every answer."""

    def test_interfaces(self):
        """The filter and its factory provide the message-filter interfaces."""
        flt = self.start(TestMilter())
        verifyObject(IMessageFilter, flt)
        verifyObject(IMessageFilterFactory, self.factory)

    @defer.inlineCallbacks
    def test_wholeTransaction(self):
        """Every step in order, with the macros milters read; continue everywhere gives accept."""
        flt = self.start(TestMilter())
        answers = yield self.transaction(flt)
        self.assertEqual(answers[:2], [filters.Verdict.CONTINUE] * 2)
        self.assertEqual(answers[2:-1], [None] * 5)
        self.assertEqual(answers[-1], filters.Verdict.ACCEPT)
        self.assertEqual(self.milter.commands(), b"OCHMRTLLLNBE")
        seen = self.milter.connections[0].seen
        connect = dict(seen)[b"C"]
        self.assertEqual(connect, b"[192.0.2.7]\x004" + struct.pack("!H", 40000) + b"192.0.2.7\0")
        self.assertEqual(dict(seen)[b"M"], b"<a@example.org>\0SIZE=100\0")
        macros = b"".join(p for c, p in seen if c == b"D")
        for expected in (b"{client_addr}\x00192.0.2.7\0", b"{client_port}\x0040000\0", b"{daemon_name}\0mailguard\0",
                         b"{mail_addr}\0a@example.org\0", b"{rcpt_addr}\0b@example.org\0"):
            self.assertIn(expected, macros)
        self.assertIn(b"Ei\0MG7M1\0", macros)  # the session's first message
        # Header values lose their leading space unless HDR_LEADSPC was negotiated.
        self.assertIn((b"L", b"Subject\0hello\0"), seen)
        self.assertEqual(self.factory.verdicts["test"]["accept"], 1)

    @defer.inlineCallbacks
    def test_unixSocket(self):
        """A milter on a UNIX socket (unix:path=...), as OpenDKIM and clamav-milter are often run."""
        path = self.mktemp()
        milter_factory = TestMilter()
        port = reactor.listenUNIX(path, milter_factory)
        self.addCleanup(port.stopListening)
        flt = self.start(milter_factory, endpoint="unix:path=%s" % path)
        answers = yield self.transaction(flt)
        self.assertEqual(answers[-1], filters.Verdict.ACCEPT)
        self.assertEqual(self.milter.commands(), b"OCHMRTLLLNBE")

    @defer.inlineCallbacks
    def test_leadingSpace(self):
        """With SMFIP_HDR_LEADSPC the header value keeps its leading space."""
        flt = self.start(TestMilter(protocol=milter.SMFIP_HDR_LEADSPC))
        yield self.transaction(flt)
        self.assertIn((b"L", b"Subject\0 hello\0"), self.milter.connections[0].seen)

    @defer.inlineCallbacks
    def test_skippedAndSilentSteps(self):
        """Steps the milter skips are not sent; "no reply" steps are not waited for."""
        protocol = (milter.SMFIP_NOCONNECT | milter.SMFIP_NOHELO | milter.SMFIP_NOHDRS | milter.SMFIP_NR_RCPT
                    | milter.SMFIP_NR_BODY | milter.SMFIP_NR_EOH | milter.SMFIP_NODATA)
        # The script would answer RCPT, EOH and BODY with a reject: the client must not read it as one.
        flt = self.start(TestMilter(protocol=protocol, script={b"R": SILENT, b"N": SILENT, b"B": SILENT}))
        answers = yield self.transaction(flt)
        self.assertEqual(answers[-1], filters.Verdict.ACCEPT)
        self.assertEqual(self.milter.commands(), b"OMRNBE")

    @defer.inlineCallbacks
    def test_bodyPieces(self):
        """A large body goes in pieces of at most 65,535 octets."""
        flt = self.start(TestMilter())
        yield self.transaction(flt, body=b"x" * 150000)
        sizes = [len(p) for c, p in self.milter.connections[0].seen if c == b"B"]
        self.assertEqual(sizes, [65535, 65535, 18930])

    @defer.inlineCallbacks
    def test_skip(self):
        """After SKIP no more body is sent, and the end of the message still is."""
        flt = self.start(TestMilter(script={b"B": encode(b"s")}))
        answers = yield self.transaction(flt, body=b"x" * 150000)
        self.assertEqual(answers[-1], filters.Verdict.ACCEPT)
        self.assertEqual(self.milter.commands().count(b"B"), 1)
        self.assertTrue(self.milter.commands().endswith(b"BE"))

    @defer.inlineCallbacks
    def test_replyCodeAtMail(self):
        """A reply code at MAIL refuses it with the milter's text; the next MAIL follows an ABORT."""
        flt = self.start(TestMilter(script={b"M": [encode(b"y", b"550 5.7.1 No thanks\0"), None]}))
        verdict = yield flt.envelopeFrom(FACTS, b"a@example.org", b"")
        self.assertEqual((verdict.action, verdict.reply), (filters.REJECT, b"550 5.7.1 No thanks\r\n"))
        yield flt.abort()
        answers = yield self.transaction(flt)
        self.assertEqual(answers[-1], filters.Verdict.ACCEPT)
        self.assertEqual(self.milter.commands(), b"OCHMAMRTLLLNBE")

    @defer.inlineCallbacks
    def test_recipientRefused(self):
        """A refused recipient is refused alone; the others go on."""
        flt = self.start(TestMilter(script={b"R": [encode(b"r"), encode(b"t"), encode(b"c")]}))
        yield flt.envelopeFrom(FACTS, b"a@example.org", b"")
        first = yield flt.envelopeRecipient(b"x@example.org", b"")
        second = yield flt.envelopeRecipient(b"y@example.org", b"")
        third = yield flt.envelopeRecipient(b"z@example.org", b"NOTIFY=NEVER")
        self.assertEqual(first.client_reply(), b"550 5.7.1 Command rejected\r\n")
        self.assertEqual(second.action, filters.TEMPFAIL)
        self.assertEqual(third, filters.Verdict.CONTINUE)
        self.assertEqual([p for c, p in self.milter.connections[0].seen if c == b"R"][-1],
                         b"<z@example.org>\0NOTIFY=NEVER\0")

    @defer.inlineCallbacks
    def test_tempfailAtHeader(self):
        """A tempfail at a header is the message's final answer."""
        flt = self.start(TestMilter(script={b"L": [encode(b"c"), encode(b"t")]}))
        yield flt.envelopeFrom(FACTS, b"a@example.org", b"")
        yield flt.envelopeRecipient(b"b@example.org", b"")
        self.assertIsNone((yield flt.header(b"From", b" a@example.org")))
        verdict = yield flt.header(b"Subject", b" x")
        self.assertEqual(verdict.action, filters.TEMPFAIL)

    @defer.inlineCallbacks
    def test_acceptAtMail(self):
        """Accept at MAIL: nothing more of this message is sent, and it is accepted."""
        flt = self.start(TestMilter(script={b"M": [encode(b"a"), None]}))
        answers = yield self.transaction(flt)
        self.assertEqual(answers[-1], filters.Verdict.ACCEPT)
        self.assertEqual(self.milter.commands(), b"OCHM")
        yield self.transaction(flt)
        self.assertEqual(self.milter.commands(), b"OCHMAMRTLLLNBE")

    @defer.inlineCallbacks
    def test_discard(self):
        """Discard at the end of the message, or at a recipient (then nothing more is sent)."""
        flt = self.start(TestMilter(script={b"E": [encode(b"d")], b"R": [None, encode(b"d")]}))
        answers = yield self.transaction(flt)
        self.assertEqual(answers[-1].action, filters.DISCARD)
        answers = yield self.transaction(flt)
        self.assertEqual(answers[1], filters.Verdict.CONTINUE)
        self.assertEqual(answers[-1].action, filters.DISCARD)
        self.assertEqual(self.milter.commands(), b"OCHMRTLLLNBEMR")

    @defer.inlineCallbacks
    def test_quarantine(self):
        """Quarantine, then continue: the message is quarantined."""
        flt = self.start(TestMilter(script={b"E": encode(b"q", b"looks odd\0") + encode(b"c")}))
        answers = yield self.transaction(flt)
        self.assertEqual(answers[-1].action, filters.QUARANTINE)
        self.assertIn("looks odd", answers[-1].reason)
        self.assertEqual(self.factory.verdicts["test"]["quarantine"], 1)

    @defer.inlineCallbacks
    def test_modifications(self):
        """Recipients added and deleted, body replaced (in two pieces), headers added, inserted, changed."""
        end = (encode(b"+", b"<new@example.org>\0") + encode(b"-", b"<b@example.org>\0")
               + encode(b"b", b"replaced ") + encode(b"b", b"body\r\n") + encode(b"h", b"X-Checked\0yes\0")
               + encode(b"i", b"\0\0\0\x01X-Top\0one\0") + encode(b"m", b"\0\0\0\x01Subject\0\0")
               + encode(b"p") + encode(b"a"))
        flt = self.start(TestMilter(script={b"E": end}))
        answers = yield self.transaction(flt)
        self.assertEqual(answers[-1], filters.Verdict(filters.ACCEPT, modifications=(
            filters.AddRecipient(b"new@example.org"),
            filters.DeleteRecipient(b"b@example.org"),
            filters.AddHeader(b"X-Checked", b" yes"),
            filters.InsertHeader(1, b"X-Top", b" one"),
            filters.ChangeHeader(b"Subject", 1, None),
            filters.ReplaceBody(b"replaced body\r\n"),
        )))

    @defer.inlineCallbacks
    def test_shutdown(self):
        """Shutdown at MAIL drops the session with 421."""
        flt = self.start(TestMilter(script={b"M": encode(b"4")}))
        verdict = yield flt.envelopeFrom(FACTS, b"a@example.org", b"")
        self.assertEqual((verdict.action, verdict.reply[:3]), (filters.DROP, b"421"))

    @defer.inlineCallbacks
    def test_connectRefusedBySession(self):
        """A milter refusing the connection refuses every transaction of the session."""
        flt = self.start(TestMilter(script={b"C": encode(b"y", b"554 5.7.1 Go away\0")}))
        for _ in range(2):
            verdict = yield flt.envelopeFrom(FACTS, b"a@example.org", b"")
            self.assertEqual(verdict.reply, b"554 5.7.1 Go away\r\n")
        self.assertEqual(self.milter.commands(), b"OC")


class FailureTests(ClientTestsMixin, TestCase):
    """A milter that is down, slow or broken gets default-action, and MILTER_FAILED says why."""

    @defer.inlineCallbacks
    def timeout_at(self, command, calls, timeout):
        """Stay silent at ``command``; run ``calls`` until it arrives, then let ``timeout`` pass."""
        flt = self.start(TestMilter(script={command: SILENT}))
        arrived = self.milter.when(command)
        for call in calls[:-1]:
            yield call(flt)
        d = calls[-1](flt)
        done = []
        d.addBoth(lambda result: done.append(result) or result)
        yield arrived
        self.clock.advance(timeout - 0.5)
        self.assertEqual(done, [], "answered before the timeout")
        self.clock.advance(0.5)
        self.assertEqual(len(done), 1)
        answer = yield d
        self.assertEqual(len(self.failures()), 1)
        return flt, answer

    def calls(self):
        """The gateway's calls of one transaction, as functions of the filter."""
        return [
            lambda f: f.envelopeFrom(FACTS, b"a@example.org", b""),
            lambda f: f.envelopeRecipient(b"b@example.org", b""),
            lambda f: f.header(b"From", b" a@example.org"),
            lambda f: f.endOfHeaders(),
            lambda f: f.body(b"hi\r\n"),
            lambda f: f.endOfMessage(),
        ]

    @defer.inlineCallbacks
    def test_timeoutAtEachStep(self):
        """No answer within the step's timeout: tempfail (451), with the step named."""
        steps = [(b"O", 0, 10, "option negotiation"), (b"C", 0, 10, "connect"), (b"H", 0, 10, "helo"),
                 (b"M", 0, 10, "MAIL"), (b"R", 1, 10, "RCPT"), (b"T", 2, 10, "DATA"), (b"L", 2, 20, "header"),
                 (b"N", 3, 20, "end of headers"), (b"B", 4, 20, "body"), (b"E", 5, 20, "end of message")]
        for command, index, timeout, what in steps:
            self.events[:] = []
            self.clock = task.Clock()
            flt, answer = yield self.timeout_at(command, self.calls()[:index + 1], timeout)
            self.assertEqual(answer.action, filters.TEMPFAIL, what)
            self.assertEqual(answer.reply, b"451 4.7.1 Filter test unavailable, try again later\r\n")
            self.assertEqual(self.failures(), [("test", "no answer to %s within %d s" % (what, timeout))])
            yield self.closeAll(flt)

    @defer.inlineCallbacks
    def test_connectTimeout(self):
        """A connection that does not come up within connect-timeout gets default-action."""

        class Never:
            def connect(self, factory):
                return defer.Deferred()

        flt = self.start(None, endpoint="tcp:host=127.0.0.1:port=9")
        self.milter = None
        self.factory.endpoint = lambda description: Never()
        flt = self.factory.buildFilter(self.config, FACTS)
        d = flt.envelopeFrom(FACTS, b"a@example.org", b"")
        self.clock.advance(5)
        verdict = yield d
        self.assertEqual(verdict.action, filters.TEMPFAIL)
        self.assertIn(("test", "no connection within 5 s"), self.failures())

    @defer.inlineCallbacks
    def test_down(self):
        """Nothing listening: tempfail at MAIL, and the reason names the connection."""
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        self.milter = None
        flt = self.start(None, endpoint="tcp:host=127.0.0.1:port=%d" % number)
        verdict = yield flt.envelopeFrom(FACTS, b"a@example.org", b"")
        self.assertEqual(verdict.reply[:3], b"451")
        ((name, reason),) = self.failures()
        self.assertTrue(reason.startswith("cannot connect"), reason)

    @defer.inlineCallbacks
    def test_defaultActions(self):
        """default-action accept lets the message through; reject refuses it with 550."""
        for action, expected in (("accept", filters.Verdict.CONTINUE), ("reject", filters.REJECT)):
            self.milter = None
            flt = self.start(None, default_action=action, endpoint="unix:path=%s" % self.mktemp())
            verdict = yield flt.envelopeFrom(FACTS, b"a@example.org", b"")
            if action == "accept":
                self.assertEqual(verdict, expected)
                self.assertIsNone((yield flt.header(b"Subject", b" x")))
                verdict = yield flt.endOfMessage()
                self.assertEqual((verdict.action, verdict.modifications), (filters.ACCEPT, ()))
            else:
                self.assertEqual(verdict.reply, b"550 5.7.1 Message refused: filter test unavailable\r\n")

    @defer.inlineCallbacks
    def test_malformedReply(self):
        """A reply the protocol does not allow: default-action, "protocol error"."""
        flt = self.start(TestMilter(script={b"M": encode(b"Z", b"junk")}))
        verdict = yield flt.envelopeFrom(FACTS, b"a@example.org", b"")
        self.assertEqual(verdict.action, filters.TEMPFAIL)
        self.assertEqual(self.failures(), [("test", "protocol error: unknown reply b'Z'")])

    @defer.inlineCallbacks
    def test_tooManyModifications(self):
        """A milter flooding the end of the message with modifications is cut off: default-action."""
        flood = encode(b"h", b"X-Flood\0x\0") * (milterclient.MAX_MODIFICATIONS + 1) + encode(b"c")
        flt = self.start(TestMilter(script={b"E": flood}))
        answers = yield self.transaction(flt)
        self.assertEqual(answers[-1].action, filters.TEMPFAIL)
        self.assertEqual(self.failures(), [("test", "protocol error: too many modifications")])

    @defer.inlineCallbacks
    def test_closesInTheMiddle(self):
        """A milter closing during the body: default-action; the next transaction connects again."""
        flt = self.start(TestMilter(script={b"B": [CLOSE]}))
        answers = yield self.transaction(flt)
        self.assertEqual(answers[-2].action, filters.TEMPFAIL)
        self.assertEqual(self.failures(), [("test", "connection closed by milter during body")])
        yield flt.abort()
        answers = yield self.transaction(flt)
        self.assertEqual(answers[-1], filters.Verdict.ACCEPT)
        self.assertEqual(len(self.milter.connections), 2)
        self.assertEqual(self.milter.commands(), b"OCHMRTLLLNBE")


class ConnectionTests(SynchronousTestCase):
    """The connection's timer, without a network (StringTransport, Clock)."""

    def setUp(self):
        self.clock = task.Clock()
        self.connection = MilterConnection(milter.MilterSession(), self.clock)
        self.connection.makeConnection(StringTransport())
        self.connection.request(self.connection.core.negotiate(), True, 10, "option negotiation")
        self.connection.dataReceived(encode(b"O", struct.pack("!III", 6, milter.ACTIONS, 0)))

    def test_progressRestartsTimer(self):
        """Progress restarts the step's timer; silence after it still times out."""
        d = self.connection.request(self.connection.core.end_of_message().data, True, 10, "end of message")
        self.clock.advance(9)
        self.connection.dataReceived(encode(b"p"))
        self.clock.advance(9)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.failureResultOf(d).check(Exception)
        self.assertTrue(self.connection.transport.disconnecting or self.connection.transport.disconnected)

    def test_answerCancelsTimer(self):
        """An answer in time stops the timer."""
        d = self.connection.request(self.connection.core.mail(b"a@b").data, True, 10, "MAIL")
        self.connection.dataReceived(encode(b"c"))
        self.assertEqual(self.successResultOf(d), ([], milter.MilterReply(b"c")))
        self.assertEqual(self.clock.getDelayedCalls(), [])
