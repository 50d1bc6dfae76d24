"""Logs an administrator trusts: formats, severities, the MESSAGE line, the alert rate limit, workers, rotation."""

import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import syslog
import time

from twisted.internet import defer, task
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from mailguard import events as E
from mailguard import logs
from mailguard.commands import MODES
from mailguard.events import Alert, MessageDone
from mailguard.policy import GlobalSettings, Listener, PolicyError, Rule, parse_policy
from mailguard.smtp import SMTPInspector
from mailguard.tracker import SessionTracker
from tests.clients import LockstepClient
from tests.harness import drive
from tests.test_gateway import GatewayTestCase
from tests.test_plugin import TWISTD, free_port, installed

SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def alert_event(tag="SMTP_INVALID_COMMAND", **fields):
    """A log event shaped like the tracker's alert lines."""
    event = {
        "log_format": "{tag}: {text} -- initiator ({initiator}) responder ({responder})",
        "log_level": LogLevel.warn,
        "log_namespace": "mailguard",
        "log_time": 1764676800.25,
        "tag": tag,
        "text": "Invalid SMTP command (EXPN): not allowed",
        "initiator": "127.0.0.1:40312",
        "responder": "127.0.0.1:2526",
        "session_id": "1-7",
        "verb": "EXPN",
    }
    event.update(fields)
    return event


class FormatTests(SynchronousTestCase):
    """The text, json and ios renderings of one event."""

    def test_ios_line(self):
        """An alert becomes `%FW-4-SMTP_INVALID_COMMAND: ...`, its tag not repeated, no timestamp."""
        line = logs.format_ios(alert_event())
        self.assertEqual(
            line,
            "%FW-4-SMTP_INVALID_COMMAND: Invalid SMTP command (EXPN): not allowed -- initiator (127.0.0.1:40312)"
            " responder (127.0.0.1:2526)\n",
        )
        self.assertRegex(line, r"^%FW-\d-[A-Z_]+:")

    def test_ios_untagged(self):
        """A line without a tag (twistd's own) is `%SYS-<severity>-LOG:` with its level's severity."""
        event = {"log_format": "reactor class: {r}.", "r": "epoll", "log_level": LogLevel.info}
        self.assertEqual(logs.format_ios(event), "%SYS-6-LOG: reactor class: epoll.\n")
        event["log_level"] = LogLevel.error
        self.assertTrue(logs.format_ios(event).startswith("%SYS-3-LOG: "))

    def test_ios_severities(self):
        """The audit trail is severity 6, a blocked host 2, a tag the table does not know its level's."""
        self.assertTrue(logs.format_ios(alert_event("SESS_AUDIT_TRAIL")).startswith("%FW-6-SESS_AUDIT_TRAIL: "))
        self.assertTrue(logs.format_ios(alert_event("BLOCK_HOST")).startswith("%FW-2-BLOCK_HOST: "))
        self.assertTrue(logs.format_ios(alert_event("PLUGIN_THING")).startswith("%FW-4-PLUGIN_THING: "))

    def test_json_line(self):
        """A JSON line is one object holding the tag, the session id and every field, without a tag prefix."""
        line = logs.format_json(alert_event())
        self.assertTrue(line.endswith("}\n"))
        self.assertEqual(line.count("\n"), 1)
        obj = json.loads(line)
        self.assertEqual(
            {k: obj[k] for k in ("tag", "session_id", "verb", "level", "severity", "namespace")},
            {"tag": "SMTP_INVALID_COMMAND", "session_id": "1-7", "verb": "EXPN", "level": "warn", "severity": 4,
             "namespace": "mailguard"},
        )
        self.assertTrue(obj["text"].startswith("Invalid SMTP command (EXPN)"))
        self.assertEqual(obj["time"], "2025-12-02T12:00:00.250000Z")

    def test_json_odd_fields(self):
        """Bytes, sets and arbitrary objects in an event still give valid JSON."""
        obj = json.loads(logs.format_json(alert_event(raw=b"\xffx", kw=frozenset({"A"}), obj=object())))
        self.assertEqual((obj["raw"], obj["kw"]), ("\ufffdx", ["A"]))
        self.assertTrue(obj["obj"].startswith("<object"))

    def test_text_is_twistds(self):
        """The text format is twistd's classic line: timestamp, [namespace#level], text."""
        line = logs.format_text(alert_event())
        self.assertRegex(line, r"^\S+ \[mailguard#warn\] SMTP_INVALID_COMMAND: Invalid SMTP command \(EXPN\)")

    def test_text_line_events_as_twisted_formats_them(self):
        """A `{line}` event (the MESSAGE line's shortcut) gives exactly Twisted's classic text, whatever its time."""
        from twisted.logger import formatEventAsClassicLogText

        base = {"log_format": "{line}", "log_level": LogLevel.info, "log_namespace": "mailguard",
                "line": "MESSAGE: session 1 from=<a@example.org>", "tag": "MESSAGE"}
        variants = [{}, {"line": "two\nlines"}, {"line": ""}, {"log_time": None}, {"log_system": "worker"},
                    {"log_level": LogLevel.warn, "log_namespace": "other"}, {"line": b"bytes"}]
        for when in (1764676800.0, 1764676800.25, 1764676800.9995, 1764676800.9999996, 1764676801.5, 1.0):
            for extra in variants:
                event = dict(base, log_time=when)
                event.update(extra)
                self.assertEqual(logs.format_text(event), formatEventAsClassicLogText(event), event)

    def test_emit_info_is_logger_info(self):
        """`emit_info` publishes the event `Logger.info` would, fields in the same order (the JSON line's)."""
        seen = []
        logger = Logger(namespace="mailguard", observer=seen.append)
        logger.info("{line}", line="MESSAGE: x", tag="MESSAGE", size=3, sender="<a@b>")
        logs.emit_info(logger, {"line": "MESSAGE: x", "tag": "MESSAGE", "size": 3, "sender": "<a@b>"})
        for event in seen:
            event["log_time"] = 0
        self.assertEqual(list(seen[0].items()), list(seen[1].items()))
        self.assertEqual(logs.format_json(seen[0]), logs.format_json(seen[1]))

    def test_every_emitted_tag_is_in_the_table(self):
        """Every tag the source code logs has an IOS severity (0-7) in the table."""
        found = set()
        for directory in ("mailguard",):
            for name in os.listdir(os.path.join(SOURCE, directory)):
                if name.endswith(".py"):
                    with open(os.path.join(SOURCE, directory, name)) as f:
                        text = f.read()
                    found |= set(re.findall(r'_alert\(\s*"([A-Z0-9_]+)"', text))
                    found |= set(re.findall(r'tag="([A-Z0-9_]+)"', text))
        self.assertGreater(len(found), 25)
        self.assertEqual(sorted(found - set(logs.TAGS)), [])
        self.assertTrue(all(0 <= sev <= 7 for sev, _alert, _what in logs.TAGS.values()))


class QueueIdTests(SynchronousTestCase):
    """The server's queue id, found in its reply to the end of data."""

    def test_shapes(self):
        """Postfix, Exim, Sendmail, Exchange and the embedded backend each give their id."""
        cases = {
            b"250 2.0.0 Ok: queued as 4ZxY1r2Ab3z1\r\n": "4ZxY1r2Ab3z1",
            b"250 OK id=1tQ4Zb-0001Ab-3C\r\n": "1tQ4Zb-0001Ab-3C",
            b"250 2.0.0 5B2CKnqX012345 Message accepted for delivery\r\n": "5B2CKnqX012345",
            b"250 2.6.0 <a1b2@EX01.contoso.com> [InternalId=4294967298, Hostname=EX01.contoso.com]"
            b" Queued mail for delivery\r\n": "4294967298",
            b"250 2.6.0 <a1b2@EX01.contoso.com> Queued mail for delivery\r\n": "<a1b2@EX01.contoso.com>",
            b"250 2.0.0 Ok: queued as 1796214299.M402778P27657Q1.vm\r\n": "1796214299.M402778P27657Q1.vm",
            b"250 2.0.0 Ok: 42 octets received, queued as 1796.M1P2Q3.vm\r\n": "1796.M1P2Q3.vm",
            b"250-2.0.0 Ok\r\n250 2.0.0 queued as ABC123\r\n": "ABC123",
        }
        for reply, expected in cases.items():
            self.assertEqual(logs.queue_id(reply), expected, reply)

    def test_unknown_shapes(self):
        """A reply naming no id the table knows gives None (the MESSAGE line then has the reply text)."""
        for reply in (b"250 2.0.0 Ok\r\n", b"250 ok 1733140000 qp 1234\r\n", b"", b"554 5.7.1 rejected\r\n"):
            self.assertIsNone(logs.queue_id(reply), reply)

    def test_reply_text(self):
        """A reply becomes one printable line, its lines joined, bounded in length."""
        self.assertEqual(logs.reply_text(b"250-a\r\n250 b\x00\r\n"), "250-a / 250 b?")
        self.assertEqual(len(logs.reply_text(b"250 " + b"x" * 1000)), 300)


class LimiterTests(SynchronousTestCase):
    """At most 10 alerts per tag and host per minute, the rest counted."""

    def test_limit_and_report(self):
        """100 alerts of one tag from one host: 10 let through, 90 reported once when the window ends."""
        limiter = logs.AlertLimiter()
        allowed = sum(limiter.allow("SMTP_INVALID_COMMAND", "10.0.0.1", 1000.0 + i * 0.1) for i in range(100))
        self.assertEqual(allowed, 10)
        self.assertEqual(limiter.next_due(), 1060.0)
        self.assertEqual(limiter.due(1059.0), [])
        self.assertEqual(limiter.due(1060.0), [("SMTP_INVALID_COMMAND", "10.0.0.1", 90)])
        self.assertEqual(limiter.due(1200.0), [])

    def test_per_tag_and_host(self):
        """Another host, or another tag, has its own allowance."""
        limiter = logs.AlertLimiter(limit=2)
        self.assertEqual([limiter.allow("A", "h1", 0) for _ in range(3)], [True, True, False])
        self.assertTrue(limiter.allow("A", "h2", 0))
        self.assertTrue(limiter.allow("B", "h1", 0))

    def test_new_window_after_drops(self):
        """An alert after the window ended is let through, and the old window's count is still reported."""
        limiter = logs.AlertLimiter(limit=1, window=60)
        limiter.allow("A", "h", 0)
        limiter.allow("A", "h", 1)
        self.assertTrue(limiter.allow("A", "h", 61))
        self.assertEqual(limiter.due(61), [("A", "h", 1)])

    def test_flush(self):
        """Stopping reports every window holding drops, ended or not."""
        limiter = logs.AlertLimiter(limit=1)
        limiter.allow("A", None, 0)
        limiter.allow("A", None, 0)
        self.assertEqual(limiter.flush(), [("A", None, 1)])
        self.assertEqual(limiter.flush(), [])


class _Leg:
    """A stand-in client leg: the tracker asks it for transports and may abort it."""

    transport = None
    server = None
    inspector = None
    aborted = False

    def abortSession(self):
        self.aborted = True


class TrackerLogTests(SynchronousTestCase):
    """What the tracker logs: rate-limited alerts, MESSAGE lines, session ids, control actions."""

    def setUp(self):
        import mailguard.tracker as tracker_module

        self.events = []
        self.patch(tracker_module, "log", Logger(namespace="mailguard", observer=self.events.append))
        self.clock = task.Clock()
        self.tracker = SessionTracker(GlobalSettings(), self.clock)
        from twisted.internet.address import IPv4Address

        self.listener = Listener(name="L", listen="tcp:25", backend="tcp:host=mx:port=25",
                                 rule=Rule(name="R", protocol="esmtp", audit_trail=True))
        self.session = self.tracker.admit(IPv4Address("TCP", "10.0.0.9", 40000), self.listener)
        self.session.leg = _Leg()

    def tagged(self, tag):
        return [e for e in self.events if e.get("tag") == tag]

    def test_rate_limited_alerts(self):
        """100 alerts from one host log 10 lines, then one ALERTS_SUPPRESSED line saying 90 when the minute ends."""
        for _ in range(100):
            self.tracker.alert(self.session, Alert("SMTP_INVALID_COMMAND", "Invalid SMTP command (EXPN)"))
        self.assertEqual(len(self.tagged("SMTP_INVALID_COMMAND")), 10)
        self.assertEqual(self.tracker.alerts["SMTP_INVALID_COMMAND"], 100)
        self.assertEqual(self.tagged("ALERTS_SUPPRESSED"), [])
        self.clock.advance(60)
        (line,) = self.tagged("ALERTS_SUPPRESSED")
        self.assertEqual((line["dropped"], line["suppressed"], line["host"]), (90, "SMTP_INVALID_COMMAND", "10.0.0.9"))
        self.assertEqual(self.clock.getDelayedCalls(), [c for c in self.clock.getDelayedCalls() if c.active()])

    def test_stop_reports_suppressed(self):
        """Stopping the gateway reports the drops of a window that has not ended yet."""
        for _ in range(12):
            self.tracker.alert(self.session, Alert("PREGREET", "early"))
        self.tracker.stop()
        (line,) = self.tagged("ALERTS_SUPPRESSED")
        self.assertEqual(line["dropped"], 2)
        self.assertFalse([c for c in self.clock.getDelayedCalls() if c.active()])

    def test_audit_trail_not_limited(self):
        """The audit trail is never rate-limited: 30 sessions give 30 start lines."""
        from twisted.internet.address import IPv4Address

        for i in range(29):
            self.tracker.admit(IPv4Address("TCP", "10.0.0.9", 40001 + i), self.listener)
        self.assertEqual(len(self.tagged("SESS_AUDIT_TRAIL_START")), 30)

    def test_worker_ids_and_share(self):
        """In worker 1 of 2 session ids are `1-<n>` and the worker's share of the limit is 5."""
        self.tracker.set_worker(1, 2)
        self.assertEqual(self.session.label, "1-1")
        self.assertIs(self.tracker.find("1-1"), self.session)
        self.assertEqual(self.tracker.snapshot()["sessions"][0]["id"], "1-1")
        for _ in range(7):
            self.tracker.alert(self.session, Alert("SMTP_SYNC_ERROR", "sync"))
        self.assertEqual([e["session_id"] for e in self.tagged("SMTP_SYNC_ERROR")], ["1-1"] * 5)

    def test_message_line(self):
        """A MessageDone becomes a MESSAGE line with the session id, the envelope, the outcome and the queue id."""
        self.tracker.event(self.session, MessageDone(b"<a@example.org>", 2, 1234, E.DELIVERED,
                                                     b"250 2.0.0 Ok: queued as 4ZxY1r2Ab3z1\r\n"))
        (line,) = self.tagged("MESSAGE")
        self.assertEqual(
            {k: line[k] for k in ("session_id", "sender", "recipients", "size", "outcome", "queue_id", "client_tls",
                                  "server_tls", "reply")},
            {"session_id": 1, "sender": "<a@example.org>", "recipients": 2, "size": 1234, "outcome": "delivered",
             "queue_id": "4ZxY1r2Ab3z1", "client_tls": "none", "server_tls": "none",
             "reply": "250 2.0.0 Ok: queued as 4ZxY1r2Ab3z1"},
        )
        self.assertIn("queue_id=4ZxY1r2Ab3z1", logs.format_ios(line))

    def test_unix_initiator(self):
        """A client of a unix: listener is written as the socket's path, not UNIXAddress('')."""
        from twisted.internet.address import UNIXAddress

        listener = Listener(name="U", listen="unix:/run/mg.sock:mode=660", backend="tcp:host=mx:port=25",
                            rule=Rule(name="R", protocol="esmtp"))
        session = self.tracker.admit(UNIXAddress(""), listener)
        self.assertEqual(session.initiator, "/run/mg.sock")

    def test_clear(self):
        """Clearing a session aborts its legs and logs SESSION_CLEARED; an unknown id is refused."""
        self.assertFalse(self.tracker.clear("99"))
        self.assertTrue(self.tracker.clear("1"))
        self.assertTrue(self.session.leg.aborted)
        self.assertEqual(len(self.tagged("SESSION_CLEARED")), 1)

    def test_debug_switch(self):
        """Switching the trace on reaches the inspectors of sessions already in the table."""
        inspector = SMTPInspector(self.listener.rule, MODES["esmtp"])
        self.session.leg.inspector = inspector
        self.tracker.set_tracing(True)
        self.assertTrue((self.tracker.tracing, inspector.trace) == (True, True))
        self.tracker.set_tracing(False)
        self.assertFalse(inspector.trace)
        self.assertEqual([e["state"] for e in self.tagged("DEBUG_CHANGED")], ["on", "off"])


def dialogue(rule=None, script=(), bytewise=False):
    """Drive an esmtp inspector; return its MessageDone events."""
    rule = rule or Rule(name="R", protocol="esmtp")
    inspector = SMTPInspector(rule, MODES["esmtp"])
    _s, _c, events = drive(inspector, [("s", b"220 mx ESMTP\r\n")] + list(script), bytewise=bytewise)
    return inspector, [e for e in events if type(e) is MessageDone]


EHLO = [("c", b"EHLO c\r\n"), ("s", b"250-mx\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 SIZE 1000\r\n")]


class MessageDoneTests(SynchronousTestCase):
    """The SMTP inspector says what became of each message."""

    def test_delivered(self):
        """A message the server accepts: sender, accepted recipients (not refused ones), size, reply."""
        script = EHLO + [
            ("c", b"MAIL FROM:<a@example.org>\r\n"), ("s", b"250 ok\r\n"),
            ("c", b"RCPT TO:<b@example.org>\r\n"), ("s", b"250 ok\r\n"),
            ("c", b"RCPT TO:<c@example.org>\r\n"), ("s", b"550 no\r\n"),
            ("c", b"DATA\r\n"), ("s", b"354 go\r\n"),
            ("c", b"Subject: x\r\n\r\nbody\r\n.\r\n"), ("s", b"250 2.0.0 Ok: queued as ABC\r\n"),
        ]
        for bytewise in (False, True):
            _i, done = dialogue(script=script, bytewise=bytewise)
            self.assertEqual(done, [MessageDone(b"<a@example.org>", 1, 20, E.DELIVERED,
                                                b"250 2.0.0 Ok: queued as ABC\r\n")])

    def test_pipelined_next_transaction(self):
        """A MAIL pipelined after the end of data does not change the first message's sender or count."""
        script = EHLO + [
            ("c", b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n"), ("s", b"250 ok\r\n250 ok\r\n354 go\r\n"),
            ("c", b"hi\r\n.\r\nMAIL FROM:<z@x>\r\nRCPT TO:<y@x>\r\n"),
            ("s", b"451 4.3.0 later\r\n250 ok\r\n250 ok\r\n"),
        ]
        _i, done = dialogue(script=script)
        self.assertEqual(done, [MessageDone(b"<a@x>", 1, 4, E.TEMPFAILED, b"451 4.3.0 later\r\n")])

    def test_bdat_last(self):
        """BDAT chunks: one MessageDone at the reply to BDAT ... LAST, with the total size."""
        script = EHLO + [
            ("c", b"MAIL FROM:<>\r\n"), ("s", b"250 ok\r\n"), ("c", b"RCPT TO:<b@x>\r\n"), ("s", b"250 ok\r\n"),
            ("c", b"BDAT 3\r\nabc"), ("s", b"250 got 3\r\n"),
            ("c", b"BDAT 2 LAST\r\nde"), ("s", b"554 5.7.1 spam\r\n"),
        ]
        _i, done = dialogue(script=script)
        self.assertEqual(done, [MessageDone(b"<>", 1, 5, E.REFUSED_BY_SERVER, b"554 5.7.1 spam\r\n")])

    def test_max_data_rejected(self):
        """A message over max-data is rejected by the gateway, with the gateway's reply."""
        script = EHLO + [
            ("c", b"MAIL FROM:<a@x>\r\n"), ("s", b"250 ok\r\n"), ("c", b"RCPT TO:<b@x>\r\n"), ("s", b"250 ok\r\n"),
            ("c", b"DATA\r\n"), ("s", b"354 go\r\n"), ("c", b"x" * 40 + b"\r\n.\r\n"),
        ]
        _i, done = dialogue(Rule(name="R", protocol="esmtp", max_data=20), script)
        self.assertEqual([(d.outcome, d.reply[:3]) for d in done], [(E.REJECTED, b"552")])

    def test_bare_newline_rejected(self):
        """bare-newline = reject: the message is rejected with 550."""
        script = EHLO + [
            ("c", b"MAIL FROM:<a@x>\r\n"), ("s", b"250 ok\r\n"), ("c", b"RCPT TO:<b@x>\r\n"), ("s", b"250 ok\r\n"),
            ("c", b"DATA\r\n"), ("s", b"354 go\r\n"), ("c", b"a\nb\r\n.\r\n"),
        ]
        _i, done = dialogue(Rule(name="R", protocol="esmtp", bare_newline="reject"), script)
        self.assertEqual([(d.outcome, d.reply[:3]) for d in done], [(E.REJECTED, b"550")])

    def test_dropped_and_tempfailed(self):
        """A client gone mid-message drops it; a server gone mid-message tempfails it (451)."""
        script = EHLO + [
            ("c", b"MAIL FROM:<a@x>\r\n"), ("s", b"250 ok\r\n"), ("c", b"RCPT TO:<b@x>\r\n"), ("s", b"250 ok\r\n"),
            ("c", b"DATA\r\n"), ("s", b"354 go\r\n"), ("c", b"half a mess"),
        ]
        inspector, _done = dialogue(script=script)
        (done,) = [e for e in inspector.client_lost() if type(e) is MessageDone]
        self.assertEqual((done.outcome, done.sender, done.size), (E.DROPPED, b"<a@x>", 11))
        inspector, _done = dialogue(script=script)
        (done,) = [e for e in inspector.server_lost() if type(e) is MessageDone]
        self.assertEqual((done.outcome, done.reply[:3]), (E.TEMPFAILED, b"451"))

    def test_outcomes_fixed(self):
        """An outcome outside the fixed set is refused; reply codes map to delivered, tempfailed, refused."""
        self.assertRaises(ValueError, MessageDone, b"<>", 0, 0, "maybe")
        self.assertEqual([E.outcome_of(c) for c in (250, 451, 554, 354)],
                         [E.DELIVERED, E.TEMPFAILED, E.REFUSED_BY_SERVER, E.REFUSED_BY_SERVER])


class PlumbingTests(SynchronousTestCase):
    """Pieces of the log path: the worker pipe reader, the log file, TLS names, unix paths, policy keys."""

    def test_event_reader(self):
        """JSON lines from a worker, however split, are published with the worker's index."""
        from twisted.logger import eventAsJSON

        published = []
        reader = logs.EventReader(3, published.append)
        data = (eventAsJSON(alert_event()) + "\n" + eventAsJSON({"log_format": "hi", "log_level": LogLevel.info})
                + "\nnot json\n").encode()
        for i in range(len(data)):
            reader.feed(data[i : i + 1])
        self.assertEqual([e.get("tag") for e in published], ["SMTP_INVALID_COMMAND", None, None])
        self.assertEqual({e["worker"] for e in published}, {3})
        self.assertEqual(published[0]["log_level"], LogLevel.warn)
        self.assertEqual(logs.format_ios(published[2]), "%SYS-6-LOG: not json\n")

    def test_forwarding_observer(self):
        """A worker's observer writes each event as one JSON line to its pipe."""
        from twisted.logger import eventFromJSON

        r, w = os.pipe()
        self.addCleanup(os.close, r)
        observer = logs.forwarding_observer(w)
        observer(alert_event())
        os.close(w)
        line = os.read(r, 65536)
        self.assertEqual(line.count(b"\n"), 1)
        self.assertEqual(eventFromJSON(line.decode())["tag"], "SMTP_INVALID_COMMAND")

    def test_forwarder_batches_a_turn(self):
        """With a running reactor, a turn's lines leave in one write at its end, in order; without, at once."""
        class Turn:
            running = True

            def __init__(self):
                self.calls = []

            def callLater(self, delay, f):
                self.calls.append((delay, f))

        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        os.set_blocking(r, False)
        self.patch(logs, "_in_io_thread", lambda: True)  # as in the worker, where this is the reactor's thread
        forwarder = logs.forwarding_observer(w)
        turn = Turn()
        forwarder.batch_with(turn)
        for n in range(3):
            forwarder({"log_format": "{line}", "line": "line %d" % n, "log_level": LogLevel.info})
        self.assertRaises(BlockingIOError, os.read, r, 65536)  # nothing yet
        self.assertEqual([delay for delay, _ in turn.calls], [0])  # one flush asked for the turn
        turn.calls[0][1]()
        lines = os.read(r, 65536).splitlines()
        self.assertEqual([json.loads(l)["line"] for l in lines], ["line 0", "line 1", "line 2"])
        turn.running = False
        forwarder({"log_format": "{line}", "line": "after", "log_level": LogLevel.info})
        self.assertEqual(json.loads(os.read(r, 65536))["line"], "after")

    def test_forwarder_broken_pipe_falls_back(self):
        """When the supervisor is gone, every event of the batch that did not get through goes to the fallback."""
        r, w = os.pipe()
        os.close(r)
        self.addCleanup(os.close, w)
        fallen = []
        forwarder = logs.forwarding_observer(w, fallen.append)
        events = [{"log_format": "{line}", "line": "l%d" % n, "log_level": LogLevel.info} for n in range(3)]
        forwarder._pending = [(e, b"x\n") for e in events]
        forwarder.flush()
        self.assertEqual(fallen, events)
        forwarder(events[0])
        self.assertEqual(len(fallen), 4)  # and later events straight there
        entries = [(1, b"ab\n"), (2, b"cd\n")]
        self.assertEqual(list(logs._unsent(entries, 2)), entries)
        self.assertEqual(list(logs._unsent(entries, 3)), entries[1:])
        self.assertEqual(list(logs._unsent(entries, 6)), [])

    def test_forwarded_line_event_same_everywhere(self):
        """A MESSAGE-style event sent by a worker's short path reads back to the same lines, in every format, as by eventAsJSON."""
        from twisted.logger import Logger, eventAsJSON

        def event():
            captured = []
            logger = Logger(namespace="mailguard", observer=captured.append)
            logs.emit_info(logger, {"line": "MESSAGE: session 1 from=a@b.example \u00e9 \"q\"\nx", "tag": "MESSAGE",
                                    "session_id": "1", "size": 1024, "recipients": 2, "ratio": 0.5, "queue_id": None,
                                    "client_tls": "none"})
            return captured[0]

        original = event()
        short = logs.line_event_json(dict(original))
        self.assertIsNotNone(short)
        read = []
        reader = logs.EventReader(1, read.append)
        reader.feed((short + "\n").encode() + (eventAsJSON(dict(original)) + "\n").encode())
        fast, slow = read
        for name, formatter in logs.FORMATTERS.items():
            self.assertEqual(formatter(fast), formatter(slow), name)
        self.assertIn("MESSAGE: session 1", logs.format_text(fast))
        self.assertIsNone(logs.line_event_json({"log_format": "{x}", "log_level": LogLevel.info}))
        self.assertIsNone(logs.line_event_json(dict(event(), extra=object())))  # not plain: eventAsJSON's case

    def test_log_file_rotate_or_reopen(self):
        """SIGUSR1's action: rotate as twistd does, or reopen a file logrotate moved away."""
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, "twistd.log")
        f = logs.LogFile.fromFullPath(path, rotateLength=None)
        self.addCleanup(f.close)
        f.write("one\n")
        f.rotate_or_reopen()
        self.assertTrue(os.path.exists(path + ".1"))
        f.write("two\n")
        os.rename(path, path + ".moved")
        open(path, "w").close()  # logrotate's create
        f.rotate_or_reopen()
        f.write("three\n")
        self.assertEqual([open(p).read() for p in (path + ".1", path + ".moved", path)], ["one\n", "two\n", "three\n"])

    def test_append_mode(self):
        """The log file is appended to, so a copytruncate leaves no hole."""
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, "twistd.log")
        f = logs.LogFile.fromFullPath(path, rotateLength=None)
        self.addCleanup(f.close)
        f.write("x" * 100)
        os.truncate(path, 0)
        f.write("y\n")
        self.assertEqual(open(path).read(), "y\n")

    def test_tls_of(self):
        """A TLS transport is named by its protocol and cipher; a plain one by None."""

        class Connection:
            def get_protocol_version_name(self):
                return "TLSv1.3"

            def get_cipher_name(self):
                return "TLS_AES_256_GCM_SHA384"

        class Protocol:
            _tlsConnection = Connection()

        class Transport:
            TLS = True
            protocol = Protocol()

        class Wrapper:
            transport = Transport()

        self.assertEqual(logs.tls_of(Wrapper()), "TLSv1.3/TLS_AES_256_GCM_SHA384")
        self.assertIsNone(logs.tls_of(object()))
        self.assertIsNone(logs.tls_of(None))

    def test_unix_path(self):
        """The path of a unix: description, with or without options; None for anything else."""
        self.assertEqual(logs.unix_path("unix:/run/a.sock:mode=660"), "/run/a.sock")
        self.assertEqual(logs.unix_path("unix:address=/run/b.sock"), "/run/b.sock")
        self.assertIsNone(logs.unix_path("tcp:25"))

    def test_policy_keys(self):
        """log-format, log-rotate-size and control-socket parse, default, and fail on one line."""
        base = "[inspect R]\nprotocol = smtp\n[listener l]\nlisten = tcp:25\nbackend = tcp:host=mx:port=25\ninspect = R\n"
        policy = parse_policy(base, base_dir="/srv/mg")
        s = policy.settings
        self.assertEqual((s.log_format, s.log_rotate_size, s.control_socket),
                         ("text", 1000000, "var/run/mailguard.sock"))
        policy = parse_policy("[global]\nlog-format = IOS\nlog-rotate-size = 0\ncontrol-socket = off\n" + base)
        s = policy.settings
        self.assertEqual((s.log_format, s.log_rotate_size, s.control_socket), ("ios", 0, None))
        with self.assertRaises(PolicyError) as cm:
            parse_policy("[global]\nlog-format = xml\n" + base, path="p.ini")
        self.assertEqual(str(cm.exception), "p.ini: [global] log-format: bad value 'xml': expected one of text, json, ios")


class DestinationTests(SynchronousTestCase):
    """Where the observer writes: twistd's own destination for its options."""

    def test_stdout_and_daemon(self):
        """-n without --logfile writes to stdout; a daemon cannot log to stdout (twistd's own rule)."""
        observer = logs.log_observer("ios", {"nodaemon": True, "logfile": ""})
        self.assertIs(observer._outFile, sys.stdout)
        self.assertRaises(SystemExit, logs.log_observer, "json", {"nodaemon": False, "logfile": "-"})

    def test_logfile(self):
        """--logfile opens the gateway's LogFile (rotated at the policy's size) and hooks SIGUSR1."""
        self.patch(signal, "signal", lambda sig, handler: hooked.append(sig))
        hooked = []
        path = os.path.abspath(self.mktemp())
        observer = logs.log_observer("json", {"logfile": path}, rotate_size=0)
        self.addCleanup(observer._outFile.close)
        self.assertIsInstance(observer._outFile, logs.LogFile)
        self.assertIsNone(observer._outFile.rotateLength)
        self.assertEqual(hooked, [signal.SIGUSR1])
        observer(alert_event())
        with open(path) as f:
            self.assertEqual(json.loads(f.read())["tag"], "SMTP_INVALID_COMMAND")

    def test_syslog(self):
        """--syslog: each line goes to syslog at its IOS severity; text keeps twistd's own observer."""
        self.assertIsNone(logs.log_observer("text", {"syslog": True}))

        class FakeSyslog:
            LOG_PID, LOG_DAEMON = 1, 3 << 3

            def __init__(self):
                self.sent = []

            def openlog(self, *args):
                pass

            def syslog(self, priority, line):
                self.sent.append((priority, line))

        fake = FakeSyslog()
        self.patch(syslog, "openlog", fake.openlog)
        observer = logs.log_observer("ios", {"syslog": True, "prefix": "mg"})
        observer._syslog = fake
        observer(alert_event())
        self.assertEqual(fake.sent, [(FakeSyslog.LOG_DAEMON | 4, logs.format_ios(alert_event()).rstrip("\n"))])

    def test_use_log_format(self):
        """The observer is attached to twistd's application, unless --logger was given."""
        from twisted.application import service
        from twisted.logger import ILogObserver

        application = service.Application("t")
        svc = logs.use_log_format(service.Service(), "ios", {"nodaemon": True})
        svc.setServiceParent(application)
        self.assertIsNotNone(application.getComponent(ILogObserver, None))
        application = service.Application("t")
        svc = logs.use_log_format(service.Service(), "ios", {"nodaemon": True, "logger": lambda: None})
        svc.setServiceParent(application)
        self.assertIsNone(application.getComponent(ILogObserver, None))


class InProcessTests(GatewayTestCase):
    """Lines a real gateway on loopback logs for a real client."""

    @defer.inlineCallbacks
    def test_backend_unreachable(self):
        """An unreachable backend is a BACKEND_UNREACHABLE warning naming it, and the client gets 421."""
        dead = free_port()
        port = self.gateway(dead)

        def talk():
            return LockstepClient(port).greeting

        greeting = yield deferToThread(talk)
        self.assertTrue(greeting.startswith(b"421 4.4.1"), greeting)
        (line,) = self.alerts("BACKEND_UNREACHABLE")
        self.assertEqual(line["log_level"], LogLevel.warn)
        self.assertIn("127.0.0.1:%d" % dead, line["backend"])

    @defer.inlineCallbacks
    def test_message_line_embedded_backend(self):
        """A message through the embedded-style recording backend gives a MESSAGE line with its queue id."""
        factory, bport = self.recording()
        port = self.gateway(bport)

        def send():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo()
                client.mail("a@example.org")
                client.rcpt("b@example.org")
                return client.data(b"Subject: t\r\n\r\nbody\r\n")

        code, text = yield deferToThread(send)
        self.assertEqual(code, 250)
        (line,) = self.alerts("MESSAGE")
        self.assertEqual((line["outcome"], line["sender"], line["recipients"]), ("delivered", "<a@example.org>", 1))
        self.assertEqual(line["queue_id"], logs.queue_id(b"250 " + text))
        self.assertNotEqual(line["queue_id"], "-")


try:
    from tests.test_tls import TLSTestCase, WRONG_CERT, client_context
except ImportError as e:  # pragma: no cover - trustme or aiosmtpd missing
    TLSTestCase = None
    _tls_missing = str(e)


if TLSTestCase is not None:

    class TLSLogTests(TLSTestCase):
        """TLS facts in the log: each leg's protocol and cipher, and why backend TLS failed."""

        @defer.inlineCallbacks
        def test_message_line_tls_legs(self):
            """With tls = terminate, the MESSAGE line names the TLS protocol and cipher of both legs."""
            backend, bport = self.aiosmtpd()
            port = self.tls_gateway(bport, backend_tls="required", backend_hostname="backend.example")

            def send():
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                    client.starttls(context=client_context())
                    client.sendmail("a@example.org", ["b@example.org"], b"Subject: t\r\n\r\nbody\r\n")

            yield deferToThread(send)
            (line,) = self.alerts("MESSAGE")
            self.assertRegex(line["client_tls"], r"^TLSv1\.[23]/\S+$")
            self.assertRegex(line["server_tls"], r"^TLSv1\.[23]/\S+$")

        @defer.inlineCallbacks
        def test_backend_tls_failed(self):
            """A backend certificate that fails verification is a BACKEND_TLS_FAILED line with the reason."""
            backend, bport = self.aiosmtpd(cert=WRONG_CERT)
            port = self.tls_gateway(bport, backend_tls="required", backend_hostname="backend.example")

            def talk():
                client = LockstepClient(port)
                client.rest()
                client.close()
                return client.greeting

            greeting = yield deferToThread(talk)
            self.assertTrue(greeting.startswith(b"421 4.7.0"), greeting)
            (line,) = self.alerts("BACKEND_TLS_FAILED")
            self.assertIn("backend.example", line["why"])


# -- a real twistd, daemonized ---------------------------------------------------------------


class Daemon:
    """``twistd mailguard`` run as a daemon (no -n) in ``workdir`` with ``--logfile``."""

    def __init__(self, testcase, policy, workdir=None):
        self.workdir = workdir or os.path.abspath(testcase.mktemp())
        os.makedirs(self.workdir, exist_ok=True)
        self.log = os.path.join(self.workdir, "twistd.log")
        self.pidfile = os.path.join(self.workdir, "twistd.pid")
        with open(os.path.join(self.workdir, "policy.ini"), "w") as f:
            f.write(policy)
        testcase.addCleanup(self.kill)

    def start(self, *extra):
        """Start it; return once twistd has daemonized (its pid file exists)."""
        result = subprocess.run(
            TWISTD + ["--logfile=" + self.log, "--pidfile=" + self.pidfile] + list(extra)
            + ["mailguard", "-c", "policy.ini"],
            cwd=self.workdir, capture_output=True, timeout=60,
        )
        if result.returncode != 0:
            raise AssertionError("twistd failed: %r %r" % (result.stdout, result.stderr))
        deadline = time.monotonic() + 30
        while not os.path.exists(self.pidfile):
            if time.monotonic() > deadline:
                raise AssertionError("no pid file; log: %s" % self.read())
            time.sleep(0.05)
        self.pid = int(open(self.pidfile).read())
        return self

    def wait_port(self, port, workers=1):
        """Wait until every process listens on ``port`` (said in the log: no probe session is made)."""
        self.wait_log(lambda lines: sum("TrackingFactory starting on %d" % port in l for l in lines) >= workers,
                      "the listener on %d" % port)

    def wait_log(self, predicate, what, seconds=30):
        """Wait until the log's lines satisfy ``predicate``; return them."""
        deadline = time.monotonic() + seconds
        while True:
            lines = self.read().splitlines()
            if predicate(lines):
                return lines
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for %s; log:\n%s" % (what, "\n".join(lines[-40:])))
            time.sleep(0.1)

    def stop(self, seconds=60):
        """SIGTERM, and wait until the process is gone."""
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + seconds
        while os.path.exists("/proc/%d" % self.pid) and open("/proc/%d/stat" % self.pid).read().split()[2] != "Z":
            if time.monotonic() > deadline:
                raise AssertionError("twistd did not stop")
            time.sleep(0.1)

    def kill(self):
        pid = getattr(self, "pid", None)
        if pid and os.path.exists("/proc/%d" % pid):
            for child in _children(pid):
                _signal(child, signal.SIGKILL)
            _signal(pid, signal.SIGKILL)

    def read(self):
        try:
            with open(self.log, encoding="utf-8") as f:
                return f.read()
        except OSError:
            return ""


def _children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def embedded_policy(port, *globals_, rule=""):
    """A policy: esmtp with the audit trail to the embedded backend on ``port``."""
    return ("[global]\naudit-trail = on\n%s\n[inspect R]\nprotocol = esmtp\n%s\n[listener l]\n"
            "listen = tcp:%d:interface=127.0.0.1\nbackend = embedded\ninspect = R\n"
            % ("\n".join(globals_), rule, port))


def send_messages(port, count, illegal=False):
    """``count`` smtplib sessions each sending one message; return the servers' replies to the data."""
    replies = []
    for i in range(count):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo()
            if illegal:
                client.docmd("EXPN", "staff")
            client.mail("a@example.org")
            client.rcpt("b%d@example.org" % i)
            replies.append(client.data(b"Subject: %d\r\n\r\nbody\r\n" % i))
    return replies


class DaemonTests(TestCase):
    """A real twistd, daemonized, with workers: every line reaches --logfile, in the chosen format."""

    timeout = 180

    def setUp(self):
        if not installed():
            raise SkipTest("mailguard is not installed in this Python: run `pip install .` (tox does)")

    def check_audit_trail(self, starts, stops, count):
        """One start and one stop line per session, for ``count`` sessions with unique <worker>-<n> ids."""
        start_ids = [s for s in starts]
        self.assertEqual(len(start_ids), count)
        self.assertEqual(sorted(start_ids), sorted(stops))
        self.assertEqual(len(set(start_ids)), count)
        for sid in start_ids:
            self.assertRegex(str(sid), r"^[01]-\d+$")

    @defer.inlineCallbacks
    def test_json_workers_daemon(self):
        """workers = 2, daemon mode, json: every line parses, the audit trail and MESSAGE lines are complete."""
        port = free_port()
        daemon = Daemon(self, embedded_policy(port, "workers = 2", "log-format = json"))

        def scenario():
            daemon.start()
            daemon.wait_port(port, 2)
            replies = send_messages(port, 8)
            # A session that ends before any message.
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            daemon.wait_log(lambda lines: sum('"SESS_AUDIT_TRAIL"' in l for l in lines) >= 9, "9 stop lines")
            daemon.stop()
            return replies, daemon.read().splitlines()

        replies, lines = yield deferToThread(scenario)
        objects = [json.loads(line) for line in lines]  # every line, twistd's own included
        self.assertTrue(any("twistd" in o["text"] and "starting up" in o["text"] for o in objects))
        tagged = lambda tag: [o for o in objects if o.get("tag") == tag]  # noqa: E731
        self.check_audit_trail([o["session_id"] for o in tagged("SESS_AUDIT_TRAIL_START")],
                               [o["session_id"] for o in tagged("SESS_AUDIT_TRAIL")], 9)
        messages = tagged("MESSAGE")
        self.assertEqual(len(messages), 8)
        stored = set(os.listdir(os.path.join(daemon.workdir, "var", "maildir", "new")))
        self.assertEqual({m["queue_id"] for m in messages}, stored)
        self.assertEqual({m["queue_id"] for m in messages}, {logs.queue_id(b"250 " + text) for _c, text in replies})
        self.assertEqual({m["outcome"] for m in messages}, {"delivered"})

    @defer.inlineCallbacks
    def test_ios_workers_daemon(self):
        """workers = 2, daemon mode, ios: mailguard lines begin %FW-<sev>-<TAG>:, illegal commands %FW-4-..."""
        port = free_port()
        daemon = Daemon(self, embedded_policy(port, "workers = 2", "log-format = ios"))

        def scenario():
            daemon.start()
            daemon.wait_port(port, 2)
            send_messages(port, 4, illegal=True)
            daemon.wait_log(lambda lines: sum(l.startswith("%FW-6-SESS_AUDIT_TRAIL:") for l in lines) >= 4,
                            "4 stop lines")
            daemon.stop()
            return daemon.read().splitlines()

        lines = yield deferToThread(scenario)
        for line in lines:
            if not line.startswith("\t"):
                self.assertRegex(line, r"^%(FW|SYS)-\d-[A-Z_]+: ")
        fw = [line for line in lines if line.startswith("%FW-")]
        ids = lambda prefix: [re.search(r"session (\S+)|$", l) for l in fw if l.startswith(prefix)]  # noqa: E731
        self.assertEqual(len([l for l in fw if l.startswith("%FW-6-SESS_AUDIT_TRAIL_START: ")]), 4)
        self.assertEqual(len([l for l in fw if l.startswith("%FW-6-SESS_AUDIT_TRAIL: ")]), 4)
        self.assertEqual(len(ids("%FW-6-MESSAGE: ")), 4)
        invalid = [l for l in fw if l.startswith("%FW-4-SMTP_INVALID_COMMAND: ")]
        self.assertEqual(len(invalid), 4)
        self.assertNotIn("SMTP_INVALID_COMMAND", invalid[0][len("%FW-4-SMTP_INVALID_COMMAND: "):])
        self.assertTrue(any(l.startswith("%SYS-6-LOG: twistd ") for l in lines))

    @defer.inlineCallbacks
    def test_logger_wins_with_workers(self):
        """An explicit --logger gets every worker's events in its own format; log-format does not apply."""
        port = free_port()
        daemon = Daemon(self, embedded_policy(port, "workers = 2", "log-format = ios"))
        with open(os.path.join(daemon.workdir, "customobserver.py"), "w") as f:
            f.write("import os\nfrom twisted.logger import jsonFileLogObserver\n"
                    "def observer():\n"
                    "    return jsonFileLogObserver(open(os.path.join(%r, 'custom.log'), 'a'), recordSeparator='')\n"
                    % daemon.workdir)
        env_path = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = daemon.workdir + (os.pathsep + env_path if env_path else "")
        self.addCleanup(lambda: os.environ.__setitem__("PYTHONPATH", env_path) if env_path is not None
                        else os.environ.pop("PYTHONPATH", None))
        custom = os.path.join(daemon.workdir, "custom.log")

        def scenario():
            daemon.start("--logger=customobserver.observer")
            daemon.log = custom  # where the lines go now
            daemon.wait_port(port, 2)
            send_messages(port, 3)
            daemon.wait_log(lambda lines: sum('"SESS_AUDIT_TRAIL"' in l for l in lines) >= 3, "3 stop lines")
            daemon.stop()
            return daemon.read().splitlines(), os.path.exists(os.path.join(daemon.workdir, "twistd.log"))

        lines, twistd_log = yield deferToThread(scenario)
        events = [json.loads(line) for line in lines]  # twisted's own JSON, not %FW- lines
        self.assertEqual(len([e for e in events if e.get("tag") == "SESS_AUDIT_TRAIL_START"]), 3)
        self.assertEqual({e.get("worker") for e in events if e.get("tag") == "MESSAGE"} <= {0, 1}, True)
        self.assertEqual(len([e for e in events if e.get("tag") == "MESSAGE"]), 3)
        self.assertFalse(twistd_log)

    @defer.inlineCallbacks
    def test_stdout_with_workers(self):
        """twistd -n with workers writes every worker's lines to its stdout, in the policy's format."""
        if not installed():
            raise SkipTest("mailguard is not installed in this Python: run `pip install .` (tox does)")
        port = free_port()
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        with open(os.path.join(workdir, "policy.ini"), "w") as f:
            f.write(embedded_policy(port, "workers = 2", "log-format = ios"))
        proc = subprocess.Popen(TWISTD + ["-n", "--pidfile=", "mailguard", "-c", "policy.ini"], cwd=workdir,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.addCleanup(lambda: proc.poll() is not None or (proc.kill(), proc.wait(30)))
        lines = []

        def scenario():
            import threading

            def pump():
                for raw in proc.stdout:
                    lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            deadline = time.monotonic() + 30
            while sum("TrackingFactory starting on %d" % port in l for l in lines) < 2:
                if time.monotonic() > deadline:
                    raise AssertionError("\n".join(lines))
                time.sleep(0.1)
            send_messages(port, 2)
            deadline = time.monotonic() + 30
            while sum(l.startswith("%FW-6-SESS_AUDIT_TRAIL: ") for l in lines) < 2:
                if time.monotonic() > deadline:
                    raise AssertionError("\n".join(lines))
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            reader.join(10)
            return list(lines)

        got = yield deferToThread(scenario)
        self.assertEqual(sum(l.startswith("%FW-6-MESSAGE: ") for l in got), 2)
        for line in got:
            if not line.startswith("\t"):
                self.assertRegex(line, r"^%(FW|SYS)-\d-[A-Z_]+: ")

    @defer.inlineCallbacks
    def test_rate_limit_daemon(self):
        """100 illegal commands from one client give at most 10 alert lines and one ALERTS_SUPPRESSED line."""
        port = free_port()
        daemon = Daemon(self, embedded_policy(port, "log-format = json", rule="max-bad-commands = 1000"))

        def scenario():
            daemon.start()
            daemon.wait_port(port)
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo()
                codes = [client.docmd("EXPN", "staff%d" % i)[0] for i in range(100)]
            daemon.wait_log(lambda lines: any('"SESS_AUDIT_TRAIL"' in l for l in lines), "the stop line")
            daemon.stop()
            return codes, [json.loads(line) for line in daemon.read().splitlines()]

        codes, objects = yield deferToThread(scenario)
        self.assertEqual(len(codes), 100)
        self.assertTrue(all(code >= 500 for code in codes))
        invalid = [o for o in objects if o.get("tag") == "SMTP_INVALID_COMMAND"]
        suppressed = [o for o in objects if o.get("tag") == "ALERTS_SUPPRESSED"]
        self.assertEqual(len(invalid), 10)
        self.assertEqual([(o["dropped"], o["suppressed"], o["host"]) for o in suppressed],
                         [(90, "SMTP_INVALID_COMMAND", "127.0.0.1")])

    @defer.inlineCallbacks
    def test_smtp_sink_message_line(self):
        """A message through Postfix's smtp-sink gives a MESSAGE line carrying the reply smtp-sink gave."""
        sink = shutil.which("smtp-sink") or ("/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else None)
        if sink is None:
            raise SkipTest("smtp-sink is not installed (Debian package postfix)")
        sport, port = free_port(), free_port()
        proc = subprocess.Popen([sink, "-u", "nobody", "127.0.0.1:%d" % sport, "10"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (proc.kill(), proc.wait(10)))
        daemon = Daemon(self, "[global]\nlog-format = json\n[inspect R]\nprotocol = esmtp\n[listener l]\n"
                              "listen = tcp:%d:interface=127.0.0.1\nbackend = tcp:host=127.0.0.1:port=%d\n"
                              "inspect = R\n" % (port, sport))

        def scenario():
            daemon.start()
            daemon.wait_port(port)
            reply = send_messages(port, 1)[0]
            lines = daemon.wait_log(lambda lines: any('"MESSAGE"' in l for l in lines), "the MESSAGE line")
            daemon.stop()
            return reply, [json.loads(line) for line in lines]

        (code, text), objects = yield deferToThread(scenario)
        (line,) = [o for o in objects if o.get("tag") == "MESSAGE"]
        self.assertEqual(code, 250)
        self.assertEqual(line["reply"], "250 " + text.decode())
        self.assertEqual(line["queue_id"], logs.queue_id(b"250 " + text) or "-")
        self.assertEqual((line["outcome"], line["recipients"], line["sender"]), ("delivered", 1, "<a@example.org>"))

    @defer.inlineCallbacks
    def test_rotation(self):
        """SIGUSR1 rotates twistd.log as twistd does, and reopens it after logrotate moved it away."""
        port = free_port()
        daemon = Daemon(self, embedded_policy(port, "log-format = json", "log-rotate-size = 0"))
        logrotate = shutil.which("logrotate") or ("/usr/sbin/logrotate" if os.path.exists("/usr/sbin/logrotate")
                                                  else None)
        with open(os.path.join(SOURCE, "etc", "logrotate.mailguard")) as f:
            snippet = f.read()

        def scenario():
            daemon.start()
            daemon.wait_port(port)
            send_messages(port, 1)
            daemon.wait_log(lambda lines: any('"SESS_AUDIT_TRAIL"' in l for l in lines), "the first stop line")
            os.kill(daemon.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 30
            while not os.path.exists(daemon.log + ".1"):
                if time.monotonic() > deadline:
                    raise AssertionError("SIGUSR1 did not rotate")
                time.sleep(0.1)
            with open(daemon.log + ".1") as f:
                first = f.read()
            send_messages(port, 1)
            daemon.wait_log(lambda lines: any('"SESS_AUDIT_TRAIL"' in l for l in lines), "the second stop line")
            second = third = None
            if logrotate is not None:
                conf = os.path.join(daemon.workdir, "logrotate.conf")
                with open(conf, "w") as f:
                    f.write(snippet.replace("/var/lib/mailguard", daemon.workdir))
                subprocess.run([logrotate, "-f", "-s", os.path.join(daemon.workdir, "state"), conf],
                               check=True, capture_output=True, timeout=60)
                send_messages(port, 1)
                daemon.wait_log(lambda lines: any('"SESS_AUDIT_TRAIL"' in l for l in lines), "the third stop line")
                with open(daemon.log + ".1") as f:
                    second = f.read()
                third = daemon.read()
            daemon.stop()
            return first, second, third

        first, second, third = yield deferToThread(scenario)
        self.assertEqual(first.count('"SESS_AUDIT_TRAIL"'), 1)
        if second is None:
            raise SkipTest("logrotate is not installed: only twistd's own SIGUSR1 rotation was checked")
        # logrotate moved the second session's file away; the gateway reopened twistd.log for the third.
        self.assertEqual(second.count('"SESS_AUDIT_TRAIL"'), 1)
        self.assertEqual(third.count('"SESS_AUDIT_TRAIL"'), 1)


class ReadmeTests(SynchronousTestCase):
    """The README's tag table is the code's."""

    def test_tag_table(self):
        """Every tag of the severity table is in the README with its severity."""
        with open(os.path.join(SOURCE, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        rows = dict(re.findall(r"^\| `([A-Z0-9_]+)` \| (\d) \|", readme, re.M))
        self.assertEqual({tag: int(sev) for tag, sev in rows.items()},
                         {tag: sev for tag, (sev, _alert, _what) in logs.TAGS.items()})
