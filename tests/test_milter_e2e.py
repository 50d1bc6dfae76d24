"""Milters through the real gateway: smtplib and a raw BDAT client, the test milter, the recording backend.

The milter is the one written in tests/test_milter_client.py: it answers
each packet as a test scripts it, so every corner of the protocol can be
driven through the gateway (skip, quarantine, recipients added and removed,
a replaced body, a malformed reply, a milter closing in the middle, a
timeout).  The recording backend shows what reached the server.
"""

import os
import smtplib
from types import MappingProxyType

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from mailguard.filters import FilterConfig
from mailguard.milter import encode
from mailguard.milterclient import MilterFilterFactory
from mailguard.policy import GlobalSettings, Rule, parse_policy
from tests.backends import RecordingBackend, listenBackend
from tests import clients
from tests.harness import start_gateway
from tests.test_milter_client import CLOSE, SILENT, TestMilter

CLEAN = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hello\r\n\r\nhello\r\n.dot line\r\n"
BAD = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: bad\r\n\r\nrefuse me\r\n"


def bdat_session(port, messages, recipients=(b"b@example.org",)):
    """A raw BDAT client (`tests.clients.bdat_session`) with this module's addresses; every reply code."""
    return clients.bdat_session(port, messages, sender=b"a@example.org", recipients=recipients,
                                helo=b"client.example")


class MilterGatewayTests(TestCase):
    """A rule with a milter: the gateway asks it before the server sees anything."""

    timeout = 60

    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.quarantine = os.path.abspath(self.mktemp())

    def gateway(self, milter, default_action="tempfail", endpoint=None, **timeouts):
        """A gateway whose rule calls ``milter`` (listening here, or at ``endpoint``), relaying to a recording backend."""
        if milter is not None:
            listening = reactor.listenTCP(0, milter, interface="127.0.0.1")
            self.addCleanup(listening.stopListening)
            endpoint = "tcp:host=127.0.0.1:port=%d" % listening.getHost().port
        self.milter = milter
        options = {"endpoint": endpoint, "connect_timeout": 5.0,
                   "command_timeout": 5.0, "content_timeout": 5.0, **timeouts}
        config = FilterConfig("test", "milter", 30.0, default_action, MappingProxyType(options),
                              MilterFilterFactory(reactor))
        rule = Rule(name="TEST", protocol="esmtp", max_data=1000000, milters=(config,), quarantine=self.quarantine)
        self.backend = RecordingBackend()
        bport = listenBackend(self, self.backend)
        self.tracker, port = start_gateway(self, rule, bport, GlobalSettings(spool_directory=os.path.abspath(
            self.mktemp())))
        return port

    def received(self):
        """Every byte the server received, over all its connections."""
        return b"".join(bytes(c.received) for c in self.backend.connections)

    def alerts(self, tag):
        """The alerts of one tag logged so far."""
        return [e for e in self.events if e.get("tag") == tag]

    def send(self, port, *messages, recipients=("b@example.org",)):
        """Send ``messages`` in one smtplib session; return each one's outcome (refused dict or the error)."""
        def talk():
            outcomes = []
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
                for m in messages:
                    try:
                        outcomes.append(c.sendmail("a@example.org", list(recipients), m))
                    except smtplib.SMTPException as e:
                        outcomes.append(e)
                        c.rset()
            return outcomes

        return deferToThread(talk)

    @defer.inlineCallbacks
    def test_rejectedThenDelivered(self):
        """A message the milter rejects (its reply code) never reaches the server; the next one is delivered."""
        port = self.gateway(TestMilter(script={b"E": [encode(b"y", b"554 5.7.1 Not this one\0"), encode(b"c")]}))
        refused, delivered = yield self.send(port, BAD, CLEAN)
        self.assertEqual((refused.smtp_code, refused.smtp_error), (554, b"5.7.1 Not this one"))
        self.assertEqual(delivered, {})
        self.assertNotIn(b"refuse me", self.received())
        self.assertEqual(self.received().lower().count(b"data\r\n"), 1)
        self.assertEqual([m.data for m in self.backend.messages], [CLEAN.replace(b"\r\n", b"\n")])
        (alert,) = self.alerts("MESSAGE_REFUSED")
        self.assertIn("(milter test)", alert["text"])

    @defer.inlineCallbacks
    def test_bdat(self):
        """A raw BDAT client: the refused message's chunks never reach the server; the next one is delivered."""
        port = self.gateway(TestMilter(script={b"E": [encode(b"r"), encode(b"c")]}))
        codes = yield deferToThread(bdat_session, port, [BAD, CLEAN])
        self.assertEqual(codes, [b"220", b"250", b"250", b"250", b"250", b"550", b"250", b"250", b"250", b"250",
                                 b"221"])
        self.assertNotIn(b"refuse me", self.received())
        self.assertEqual(self.received().count(b"BDAT"), 1)
        self.assertEqual([m.data for m in self.backend.messages], [CLEAN.replace(b"\r\n", b"\n")])

    @defer.inlineCallbacks
    def test_recipientRefused(self):
        """A recipient the milter refuses gets its reply and never reaches the server."""
        port = self.gateway(TestMilter(script={b"R": [encode(b"y", b"550 5.1.1 No such user\0"), encode(b"c")]}))
        (refused,) = yield self.send(port, CLEAN, recipients=("nobody@example.org", "b@example.org"))
        self.assertEqual(refused, {"nobody@example.org": (550, b"5.1.1 No such user")})
        self.assertNotIn(b"nobody@", self.received())
        self.assertEqual(self.backend.messages[0].rcpt_to, [b"b@example.org"])
        (alert,) = self.alerts("FILTER_REFUSED")
        self.assertIn("milter test", alert["text"])

    @defer.inlineCallbacks
    def test_modifications(self):
        """Recipients added and removed, body replaced, headers added and changed: the server gets the result."""
        end = (encode(b"+", b"<added@example.org>\0") + encode(b"-", b"<B@example.org>\0")
               + encode(b"b", b"new body\r\n") + encode(b"h", b"X-Milter\0checked\0")
               + encode(b"m", b"\0\0\0\x01Subject\0changed\0") + encode(b"a"))
        port = self.gateway(TestMilter(script={b"E": end}))
        (outcome,) = yield self.send(port, CLEAN, recipients=("b@example.org", "c@example.org"))
        self.assertEqual(outcome, {})
        (message,) = self.backend.messages
        self.assertEqual(message.rcpt_to, [b"c@example.org", b"added@example.org"])
        self.assertEqual(message.data, b"From: a@example.org\nTo: b@example.org\nSubject: changed\n"
                                       b"X-Milter: checked\n\nnew body\n")

    @defer.inlineCallbacks
    def test_quarantine(self):
        """Quarantine: the client gets 250, the message is in the quarantine Maildir, not at the server."""
        port = self.gateway(TestMilter(script={b"E": encode(b"q", b"suspicious\0") + encode(b"c")}))
        (outcome,) = yield self.send(port, CLEAN)
        self.assertEqual(outcome, {})
        self.assertEqual(self.backend.messages, [])
        self.assertNotIn(b"data\r\n", self.received().lower())
        (name,) = os.listdir(os.path.join(self.quarantine, "new"))
        with open(os.path.join(self.quarantine, "new", name), "rb") as f:
            self.assertEqual(f.read(), CLEAN)
        self.assertEqual(len(self.alerts("MESSAGE_QUARANTINED")), 1)

    @defer.inlineCallbacks
    def test_discard(self):
        """Discard: 250 for the client, nothing for the server."""
        port = self.gateway(TestMilter(script={b"E": encode(b"d")}))
        (outcome,) = yield self.send(port, CLEAN)
        self.assertEqual(outcome, {})
        self.assertEqual(self.backend.messages, [])
        self.assertEqual(len(self.alerts("MESSAGE_DISCARDED")), 1)

    @defer.inlineCallbacks
    def test_skip(self):
        """SKIP at the body: the rest of the body is not sent to the milter; the message is delivered whole."""
        big = CLEAN + b"x" * 200000 + b"\r\n"
        port = self.gateway(TestMilter(script={b"B": encode(b"s")}))
        (outcome,) = yield self.send(port, big)
        self.assertEqual(outcome, {})
        self.assertEqual(self.backend.messages[0].data, big.replace(b"\r\n", b"\n"))
        self.assertEqual(self.milter.commands().count(b"B"), 1)

    @defer.inlineCallbacks
    def test_malformedReply(self):
        """A malformed reply: default-action (451) and MILTER_FAILED; nothing reaches the server."""
        port = self.gateway(TestMilter(script={b"E": encode(b"y", b"250 fine\0")}))
        (outcome,) = yield self.send(port, CLEAN)
        self.assertEqual(outcome.smtp_code, 451)
        self.assertEqual(self.backend.messages, [])
        ((event),) = self.alerts("MILTER_FAILED")
        self.assertEqual(event["milter"], "test")
        self.assertIn("not 4xx or 5xx", event["reason"])

    @defer.inlineCallbacks
    def test_closesInTheMiddle(self):
        """A milter closing during the headers: 451; the next message of the session connects again, delivered."""
        port = self.gateway(TestMilter(script={b"L": [CLOSE]}))
        failed, delivered = yield self.send(port, CLEAN, CLEAN)
        self.assertEqual(failed.smtp_code, 451)
        self.assertEqual(delivered, {})
        self.assertEqual(len(self.backend.messages), 1)
        self.assertEqual(len(self.milter.connections), 2)
        self.assertIn("closed by milter", self.alerts("MILTER_FAILED")[0]["reason"])

    @defer.inlineCallbacks
    def test_timeoutAtMail(self):
        """A milter silent at MAIL: the MAIL gets 451 after command-timeout; the server never sees it."""
        port = self.gateway(TestMilter(script={b"M": SILENT}), command_timeout=0.5)
        (outcome,) = yield self.send(port, CLEAN)
        self.assertIsInstance(outcome, smtplib.SMTPSenderRefused)
        self.assertEqual(outcome.smtp_code, 451)
        self.assertNotIn(b"MAIL FROM", self.received().upper())
        self.assertIn("no answer to MAIL within 0.5 s", self.alerts("MILTER_FAILED")[0]["reason"])

    @defer.inlineCallbacks
    def test_timeoutAtEndDefaultAccept(self):
        """A milter silent at the end of the message, default-action accept: the message is delivered."""
        port = self.gateway(TestMilter(script={b"E": SILENT}), default_action="accept", content_timeout=0.5)
        (outcome,) = yield self.send(port, CLEAN)
        self.assertEqual(outcome, {})
        self.assertEqual(self.backend.messages[0].data, CLEAN.replace(b"\r\n", b"\n"))
        self.assertTrue(self.alerts("MILTER_FAILED"))

    @defer.inlineCallbacks
    def test_down(self):
        """Nothing listening: MAIL gets 451 (default-action tempfail), as Postfix answers at MAIL FROM."""
        probe = reactor.listenTCP(0, TestMilter(), interface="127.0.0.1")
        number = probe.getHost().port
        yield probe.stopListening()
        port = self.gateway(None, endpoint="tcp:host=127.0.0.1:port=%d" % number)
        (outcome,) = yield self.send(port, CLEAN)
        self.assertIsInstance(outcome, smtplib.SMTPSenderRefused)
        self.assertEqual((outcome.smtp_code, outcome.smtp_error),
                         (451, b"4.7.1 Filter test unavailable, try again later"))
        self.assertEqual(self.backend.messages, [])
        self.assertNotIn(b"MAIL FROM", self.received().upper())
        self.assertTrue(self.alerts("MILTER_FAILED")[0]["reason"].startswith("cannot connect"))


class PolicyGatewayTests(TestCase):
    """The gateway built from a policy file's text: [milter NAME] and milters = NAME, as twistd loads them."""

    timeout = 60
    setUp = MilterGatewayTests.setUp
    send = MilterGatewayTests.send

    def gateway(self, milter, default_action="tempfail", endpoint=None, **timeouts):
        """Parse a policy naming the test milter; run its rule."""
        listening = reactor.listenTCP(0, milter, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.milter = milter
        self.backend = RecordingBackend()
        bport = listenBackend(self, self.backend)
        policy = parse_policy(POLICY.format(milter=listening.getHost().port, backend=bport, quarantine=self.quarantine,
                                            action=default_action), path="p.ini")
        (rule,) = policy.rules
        self.assertEqual([m.name for m in rule.milters], ["scan"])
        self.tracker, port = start_gateway(self, rule, bport, GlobalSettings(spool_directory=os.path.abspath(
            self.mktemp())))
        return port

    @defer.inlineCallbacks
    def test_fromPolicy(self):
        """A milter configured in the policy refuses and accepts through the gateway; its figures are counted."""
        from mailguard.milterclient import default_factory

        before = default_factory().stats("scan").verdicts["reject"]
        port = self.gateway(TestMilter(script={b"E": [encode(b"r"), encode(b"c")]}))
        refused, delivered = yield self.send(port, BAD, CLEAN)
        self.assertEqual((refused.smtp_code, delivered), (550, {}))
        self.assertEqual([m.data for m in self.backend.messages], [CLEAN.replace(b"\r\n", b"\n")])
        self.assertEqual(default_factory().stats("scan").verdicts["reject"], before + 1)


POLICY = """
[inspect IN]
protocol = esmtp
milters = scan
quarantine = {quarantine}

[milter scan]
endpoint = tcp:host=127.0.0.1:port={milter}
default-action = {action}
command-timeout = 5
content-timeout = 5

[listener L]
listen = tcp:0
backend = tcp:host=127.0.0.1:port={backend}
inspect = IN
"""
