"""The milter client against the real programs: rspamd, ClamAV (clamd + clamav-milter), OpenDKIM.

Each program is started once for this module (by the first test needing it), with a
private configuration on loopback (tests/milters.py).  The filter is driven
the way the gateway drives message filters: session facts at the first
MAIL, envelope, header fields, end of headers, body pieces, end of message.
"""

import atexit
import os
import shutil
import smtplib
import tempfile
from types import MappingProxyType

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from mailguard import filters
from mailguard.filters import FilterConfig, SessionFacts
from mailguard.message import MessageSplitter
from mailguard.milterclient import MilterFilterFactory
from mailguard.policy import GlobalSettings, Rule
from tests import milters
from tests.backends import RecordingBackend, listenBackend
from tests.harness import start_gateway
from tests.test_milter_e2e import bdat_session

FACTS = SessionFacts(client=("127.0.0.1", 40000), helo=b"client.example.com", session="1")


def message(body, subject=b"test"):
    """A small message from example.com (OpenDKIM's signing domain)."""
    return (b"From: Sender <sender@example.com>\r\nTo: rcpt@example.org\r\nSubject: " + subject + b"\r\n"
            b"Date: Wed, 02 Dec 2026 12:00:00 +0000\r\nMessage-ID: <m1@example.com>\r\n\r\n" + body)


def split(data):
    """Header fields (name, value) and body of a message."""
    head, _, body = data.partition(b"\r\n\r\n")
    fields = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n" + line)
        else:
            name, _, value = line.partition(b":")
            fields.append((name, value))
    return fields, body


def apply(data, verdict):
    """The message as the server gets it once ``verdict``'s modifications are applied."""
    fields, body = split(data)
    for change in verdict.modifications:
        if isinstance(change, filters.AddHeader):
            fields.append((change.name, change.value))
        elif isinstance(change, filters.InsertHeader):
            fields.insert(change.index, (change.name, change.value))
        elif isinstance(change, filters.ChangeHeader):
            same = [i for i, (n, _) in enumerate(fields) if n.lower() == change.name.lower()]
            if len(same) >= change.index:
                i = same[change.index - 1]
                if change.value is None:
                    del fields[i]
                else:
                    fields[i] = (fields[i][0], change.value)
        elif isinstance(change, filters.ReplaceBody):
            body = change.data
    return b"".join(n + b":" + v + b"\r\n" for n, v in fields) + b"\r\n" + body


_started = {}
"""Per program class: [the started program, tests of this module using it still to run] (or its error)."""


def _users(program):
    """How many tests of this module use ``program``."""
    return sum(len([n for n in dir(cls) if n.startswith("test_")])
               for cls in globals().values()
               if isinstance(cls, type) and issubclass(cls, RealMilterMixin) and program in cls.programs)


def _acquire(program):
    """The running ``program``, started by the first test of this module that needs it."""
    entry = _started.get(program)
    if isinstance(entry, BaseException):
        raise entry
    if entry is None:
        try:
            server = program(tempfile.mkdtemp(prefix="mailguard-milter-"))
            server.start()
        except BaseException as e:
            _started[program] = e
            raise
        atexit.register(server.stop)
        entry = _started[program] = [server, _users(program)]
    return entry[0]


def _release(program):
    """One test using ``program`` is over; the last one stops it."""
    entry = _started[program]
    entry[1] -= 1
    if entry[1] == 0:
        entry[0].stop()
        shutil.rmtree(entry[0].directory, ignore_errors=True)


class RealMilterMixin:
    """Each program started once for this module, stopped after the last test needing it; filters; alerts.

    trial has no class or module fixtures: the first test that needs a
    program starts it and the last one stops it (an interrupted run stops it
    at exit).  ``programs`` lists what a class needs; ``self.server`` is the
    first, ``self.servers`` all of them.
    """

    programs = ()

    def setUp(self):
        self.servers = []
        for program in self.programs:
            self.servers.append(_acquire(program))
            self.addCleanup(_release, program)
        self.server = self.servers[0]
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def build(self, default_action="tempfail"):
        """A filter for one client session, talking to the real program."""
        options = {"endpoint": self.server.endpoint, "connect_timeout": 10.0, "command_timeout": 30.0,
                   "content_timeout": 60.0}
        factory = MilterFilterFactory(reactor)
        config = FilterConfig(self.server.__class__.__name__.lower(), "milter", 200.0, default_action,
                              MappingProxyType(options), factory)
        flt = factory.buildFilter(config, FACTS)
        self.addCleanup(flt.close)
        return flt

    @defer.inlineCallbacks
    def send(self, flt, data, sender=b"sender@example.com", recipients=(b"rcpt@example.org",)):
        """Run one transaction through ``flt`` as the gateway does; return the first final answer."""
        verdict = yield flt.envelopeFrom(FACTS, sender, b"")
        if verdict.final:
            return verdict
        for rcpt in recipients:
            verdict = yield flt.envelopeRecipient(rcpt, b"")
            if verdict.final:
                return verdict
        splitter = MessageSplitter()
        events = list(splitter.feed(data)) + list(splitter.close())
        for event in events:
            kind = type(event).__name__
            if kind == "HeaderField":
                answer = yield flt.header(event.name, event.value)
            elif kind == "EndOfHeaders":
                answer = yield flt.endOfHeaders()
            elif kind == "BodyChunk":
                answer = yield flt.body(event.data)
            else:
                answer = None
            if answer is not None:
                return answer
        return (yield flt.endOfMessage())

    def gateway(self, default_action="tempfail"):
        """The real gateway with a rule calling this class's programs in order, relaying to a recording backend."""
        factory = MilterFilterFactory(reactor)
        configs = tuple(
            FilterConfig(server.__class__.__name__.lower(), "milter", 200.0, default_action, MappingProxyType(
                {"endpoint": server.endpoint, "connect_timeout": 10.0, "command_timeout": 30.0,
                 "content_timeout": 60.0}), factory)
            for server in self.servers)
        rule = Rule(name="MILTER", protocol="esmtp", max_data=10000000, milters=configs,
                    quarantine=os.path.abspath(self.mktemp()))
        self.backend = RecordingBackend()
        port = listenBackend(self, self.backend)
        _, gateway = start_gateway(self, rule, port, GlobalSettings(spool_directory=os.path.abspath(self.mktemp())))
        return gateway

    def received(self):
        """Every byte the recording backend received."""
        return b"".join(bytes(c.received) for c in self.backend.connections)

    def smtp(self, port, *messages):
        """Send ``messages`` in one smtplib session (from sender@example.com); each outcome or its error."""
        def talk():
            outcomes = []
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
                for m in messages:
                    try:
                        outcomes.append(c.sendmail("sender@example.com", ["rcpt@example.org"], m))
                    except smtplib.SMTPException as e:
                        outcomes.append(e)
                        c.rset()
            return outcomes

        return deferToThread(talk)

    def delivered(self):
        """The messages the server got, with CRLF line ends again."""
        return [m.data.replace(b"\n", b"\r\n") for m in self.backend.messages]

    def failures(self):
        """MILTER_FAILED alerts logged, as (milter, reason)."""
        return [(e["milter"], e["reason"]) for e in self.events if e.get("tag") == "MILTER_FAILED"]


class RspamdTests(RealMilterMixin, TestCase):
    """rspamd's proxy worker in milter mode."""

    programs = (milters.Rspamd,)
    timeout = 300

    @defer.inlineCallbacks
    def test_gtube(self):
        """The GTUBE message is refused with rspamd's own reply."""
        verdict = yield self.send(self.build(), message(milters.GTUBE + b"\r\n"))
        self.assertEqual((verdict.action, verdict.reply), (filters.REJECT, b"554 5.7.1 Gtube pattern\r\n"))

    @defer.inlineCallbacks
    def test_clean(self):
        """A clean message is accepted with rspamd's headers added."""
        verdict = yield self.send(self.build(), message(b"Hello, this is a perfectly ordinary message.\r\n"))
        self.assertEqual(verdict.action, filters.ACCEPT)
        names = [m.name for m in verdict.modifications if isinstance(m, filters.AddHeader)]
        self.assertIn(b"X-Spamd-Result", names)
        self.assertEqual(self.failures(), [])

    @defer.inlineCallbacks
    def test_twoMessagesOneSession(self):
        """One connection carries several transactions: a refused one, then a clean one."""
        flt = self.build()
        first = yield self.send(flt, message(milters.GTUBE + b"\r\n"))
        yield flt.abort()
        second = yield self.send(flt, message(b"Just a note.\r\n"))
        self.assertEqual((first.action, second.action), (filters.REJECT, filters.ACCEPT))

    @defer.inlineCallbacks
    def test_stoppedThenBack(self):
        """rspamd stopped: default-action (451) and MILTER_FAILED; started again: delivered."""
        self.server.stop()
        try:
            verdict = yield self.send(self.build(), message(b"Hello again.\r\n"))
            self.assertEqual(verdict.action, filters.TEMPFAIL)
            self.assertEqual(verdict.reply[:3], b"451")
            ((name, reason),) = self.failures()
            self.assertEqual(name, "rspamd")
            self.assertTrue(reason.startswith("cannot connect"), reason)
        finally:
            self.server.start()
        verdict = yield self.send(self.build(), message(b"Hello again.\r\n"))
        self.assertEqual(verdict.action, filters.ACCEPT)


    @defer.inlineCallbacks
    def test_gatewaySMTP(self):
        """Through the gateway with smtplib: GTUBE refused with rspamd's reply, never at the server; clean delivered with its headers."""
        port = self.gateway()
        spam, clean = message(milters.GTUBE + b"\r\n"), message(b"An ordinary note.\r\n")
        refused, ok = yield self.smtp(port, spam, clean)
        self.assertEqual((refused.smtp_code, refused.smtp_error), (554, b"5.7.1 Gtube pattern"))
        self.assertEqual(ok, {})
        self.assertNotIn(milters.GTUBE, self.received())
        self.assertEqual(self.received().lower().count(b"data\r\n"), 1)
        (data,) = self.delivered()
        self.assertIn(b"\r\nX-Spamd-Result: default: False", data)
        self.assertTrue(data.endswith(b"\r\n\r\nAn ordinary note.\r\n"))

    @defer.inlineCallbacks
    def test_gatewayBDAT(self):
        """Through the gateway with a raw BDAT client: GTUBE gets 554, no chunk of it reaches the server; clean delivered."""
        port = self.gateway()
        spam, clean = message(milters.GTUBE + b"\r\n"), message(b"Chunked and clean.\r\n")
        codes = yield deferToThread(bdat_session, port, [spam, clean], (b"rcpt@example.org",))
        self.assertEqual(codes, [b"220", b"250", b"250", b"250", b"250", b"554", b"250", b"250", b"250", b"250",
                                 b"221"])
        self.assertNotIn(milters.GTUBE, self.received())
        self.assertEqual(self.received().count(b"BDAT"), 1)
        (data,) = self.delivered()
        self.assertIn(b"\r\nX-Spamd-Result: ", data)

    @defer.inlineCallbacks
    def test_gatewayStoppedThenBack(self):
        """rspamd stopped: the gateway answers MAIL with 451 (default-action); rspamd back: delivered."""
        port = self.gateway()
        self.server.stop()
        try:
            (outcome,) = yield self.smtp(port, message(b"While it is down.\r\n"))
            self.assertIsInstance(outcome, smtplib.SMTPSenderRefused)
            self.assertEqual(outcome.smtp_code, 451)
            self.assertNotIn(b"MAIL FROM", self.received().upper())
            self.assertTrue(self.failures())
        finally:
            self.server.start()
        (outcome,) = yield self.smtp(port, message(b"Back again.\r\n"))
        self.assertEqual(outcome, {})
        self.assertEqual(len(self.delivered()), 1)


class ClamAVTests(RealMilterMixin, TestCase):
    """clamd and clamav-milter with a test signature."""

    programs = (milters.ClamAV,)
    timeout = 120

    @defer.inlineCallbacks
    def test_virus(self):
        """A message carrying the test file is refused."""
        verdict = yield self.send(self.build(), message(milters.VIRUS.replace(b"\n", b"\r\n")))
        self.assertEqual(verdict.action, filters.REJECT)
        self.assertEqual(verdict.client_reply()[:3], b"550")

    @defer.inlineCallbacks
    def test_clean(self):
        """A clean message is accepted with X-Virus-Status: Clean."""
        verdict = yield self.send(self.build(), message(b"Nothing to see here.\r\n"))
        self.assertEqual(verdict.action, filters.ACCEPT)
        self.assertIn(filters.AddHeader(b"X-Virus-Status", b" Clean"), verdict.modifications)


    @defer.inlineCallbacks
    def test_gateway(self):
        """Through the gateway: the test virus is refused (smtplib and BDAT), never at the server; clean delivered."""
        port = self.gateway()
        infected = message(milters.VIRUS.replace(b"\n", b"\r\n"))
        refused, ok = yield self.smtp(port, infected, message(b"Clean mail.\r\n"))
        self.assertEqual(refused.smtp_code, 550)
        self.assertEqual(ok, {})
        codes = yield deferToThread(bdat_session, port, [infected], (b"rcpt@example.org",))
        self.assertEqual(codes[-2], b"550")
        self.assertNotIn(milters.VIRUS.strip(), self.received())
        (data,) = self.delivered()
        self.assertIn(b"\r\nX-Virus-Status: Clean\r\n", data)


class OpenDKIMTests(RealMilterMixin, TestCase):
    """OpenDKIM signing example.com mail (simple/simple canonicalization: every octet counts)."""

    programs = (milters.OpenDKIM,)
    timeout = 120

    @defer.inlineCallbacks
    def test_signatureVerifies(self):
        """The message as the server gets it carries a DKIM-Signature that verifies with the public key."""
        import dkim

        data = message(b"Signed body.\r\n  with  spaces \r\n", subject=b"  spaced   subject")
        verdict = yield self.send(self.build(), data)
        self.assertEqual(verdict.action, filters.ACCEPT)
        signed = apply(data, verdict)
        self.assertTrue(signed.startswith(b"DKIM-Signature:"), signed[:80])
        self.assertTrue(dkim.verify(signed, dnsfunc=self.server.dns))
        # The check can fail: a changed body does not verify.
        self.assertFalse(dkim.verify(signed.replace(b"Signed body", b"Signed bodY"), dnsfunc=self.server.dns))

    @defer.inlineCallbacks
    def test_gatewaySigned(self):
        """Through the gateway (smtplib and BDAT): the server receives a DKIM-Signature that verifies."""
        import dkim

        port = self.gateway()
        data = message(b"Signed through the gateway.\r\n")
        (outcome,) = yield self.smtp(port, data)
        self.assertEqual(outcome, {})
        codes = yield deferToThread(bdat_session, port, [data], (b"rcpt@example.org",))
        self.assertEqual(codes[-2], b"250")
        delivered = self.delivered()
        self.assertEqual(len(delivered), 2)
        for signed in delivered:
            self.assertTrue(signed.startswith(b"DKIM-Signature: "), signed[:60])
            self.assertTrue(dkim.verify(signed, dnsfunc=self.server.dns))


class AllThreeTests(RealMilterMixin, TestCase):
    """rspamd, ClamAV and OpenDKIM on one rule, in that order, as Postfix's smtpd_milters would run them."""

    programs = (milters.Rspamd, milters.ClamAV, milters.OpenDKIM)
    timeout = 300

    @defer.inlineCallbacks
    def test_together(self):
        """GTUBE 554, the virus 550, a clean message delivered with all three milters' headers and a valid signature."""
        import dkim

        port = self.gateway()
        spam = message(milters.GTUBE + b"\r\n")
        infected = message(milters.VIRUS.replace(b"\n", b"\r\n"))
        clean = message(b"Scanned twice and signed.\r\n")
        gtube, virus, ok = yield self.smtp(port, spam, infected, clean)
        self.assertEqual((gtube.smtp_code, gtube.smtp_error), (554, b"5.7.1 Gtube pattern"))
        self.assertEqual(virus.smtp_code, 550)
        self.assertEqual(ok, {})
        self.assertEqual(self.received().lower().count(b"data\r\n"), 1)
        (data,) = self.delivered()
        head = data.split(b"\r\n\r\n", 1)[0]
        self.assertIn(b"\r\nX-Spamd-Result: ", head)
        self.assertIn(b"\r\nX-Virus-Status: Clean", head)
        self.assertTrue(data.startswith(b"DKIM-Signature: "))
        self.assertTrue(dkim.verify(data, dnsfunc=self.servers[2].dns))
