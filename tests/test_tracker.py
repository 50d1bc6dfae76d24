"""Tests for the session tracker: the table, every threshold, every timer, traces; Clock-driven, then end to end."""

import collections
import socket

from twisted.internet import defer, endpoints, reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, formatEvent
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailguard import tracker as tracker_module
from mailguard.events import Alert, Trace
from mailguard.policy import GlobalSettings, Listener, Rule, parse_policy
from mailguard.replies import reply
from mailguard.service import listener_factory
from mailguard.tracker import (
    CLOSING,
    INCOMPLETE,
    OPEN,
    RateWindow,
    SessionTracker,
    TrackingFactory,
    host_of,
)
from tests.backends import RecordingBackend, listenBackend
from tests.clients import LockstepClient, wait_for

RULE = Rule(name="R", protocol="esmtp", timeout=100)


class FakeInspector:
    """Just what the tracker reads from an inspector."""

    phase = "COMMAND"

    def __init__(self):
        self.commands = 0
        self.verbs = collections.Counter()


class FakeLeg:
    """A stand-in for relay.ClientLeg that records what the tracker asks of it."""

    session = None

    def __init__(self):
        self.calls = []
        self.inspector = FakeInspector()

    def timeoutSession(self, reply_name):
        """Record a timeout."""
        self.calls.append(("timeout", reply_name))

    def abortSession(self):
        """Record an abort."""
        self.calls.append(("abort",))


class FakeInspectorFactory:
    """The wrapped factory: builds fake legs and counts them."""

    def __init__(self):
        self.built = []

    def buildProtocol(self, addr):
        """One fake leg per admitted connection."""
        leg = FakeLeg()
        self.built.append(leg)
        return leg


class Harness:
    """A tracker on a Clock behind a TrackingFactory, with fake addresses and legs."""

    def __init__(self, rule=RULE, **settings):
        self.clock = Clock()
        self.clock.advance(1000)
        self.tracker = SessionTracker(GlobalSettings(**settings), self.clock)
        self.listener = Listener(name="L", listen="tcp:0", backend="tcp:127.0.0.1:1", rule=rule)
        self.wrapped = FakeInspectorFactory()
        self.factory = TrackingFactory(self.tracker, self.listener, self.wrapped)
        self._ports = iter(range(40000, 50000))

    def connect(self, host="10.0.0.1", address=None):
        """Offer one connection; return the protocol the factory built (a FakeLeg, or the refusal)."""
        if address is None:
            address = IPv4Address("TCP", host, next(self._ports))
        return self.factory.buildProtocol(address)

    def admit(self, host="10.0.0.1", **kw):
        """Offer one connection that must be admitted; return its session."""
        leg = self.connect(host, **kw)
        if not isinstance(leg, FakeLeg):
            raise AssertionError("connection refused")
        return leg.session


def refused(proto):
    """Whether ``proto`` is the refusal protocol: it answers 421 try-later and closes."""
    if isinstance(proto, FakeLeg):
        return False
    transport = StringTransport()
    proto.makeConnection(transport)
    return transport.value() == reply("try_later") and transport.disconnecting


class LoggingTestCase(SynchronousTestCase):
    """Captures the tracker's log events."""

    def setUp(self):
        self.events = []
        self.patch(tracker_module, "log", Logger(namespace="mailguard", observer=self.events.append))

    def tagged(self, tag):
        """Logged events carrying ``tag``."""
        return [e for e in self.events if e.get("tag") == tag]


class SessionTableTests(LoggingTestCase):
    """What the table holds and how sessions move through it."""

    def test_row(self):
        """An admitted connection is an incomplete row with its initiator, listener, rule and times."""
        h = Harness()
        s = h.admit("10.0.0.7")
        self.assertEqual(h.tracker.sessions, {s.id: s})
        self.assertEqual((s.initiator, s.listener, s.rule, s.protocol), ("10.0.0.7:40000", "L", RULE, "esmtp"))
        self.assertEqual((s.state, s.client_bytes, s.server_bytes, s.responder), (INCOMPLETE, 0, 0, None))
        self.assertEqual((s.started, s.last_activity), (1000, 1000))
        self.assertIs(s.leg, h.wrapped.built[0])
        self.assertIs(s.leg.session, s)

    def test_ids_unique(self):
        """Every session gets its own id."""
        h = Harness()
        ids = {h.admit().id for _ in range(5)}
        self.assertEqual(len(ids), 5)

    def test_incomplete_open_closing_gone(self):
        """incomplete -> open at the greeting -> closing when a side closes -> gone when both legs are."""
        h = Harness()
        s = h.admit()
        s.set_responder(IPv4Address("TCP", "192.0.2.9", 25))
        self.assertEqual(s.state, INCOMPLETE)
        h.tracker.opened(s)
        self.assertEqual(s.state, OPEN)
        h.tracker.closing(s)
        self.assertEqual(s.state, CLOSING)
        h.tracker.server_closed(s)
        self.assertIn(s.id, h.tracker.sessions)
        h.tracker.closed(s)
        self.assertEqual(h.tracker.sessions, {})

    def test_backend_leg_outlives_client(self):
        """A session whose client left stays in the table, closing, until the backend leg is gone."""
        h = Harness()
        s = h.admit()
        s.set_responder(IPv4Address("TCP", "192.0.2.9", 25))
        h.tracker.opened(s)
        h.tracker.closed(s)
        self.assertEqual(s.state, CLOSING)
        self.assertIn(s.id, h.tracker.sessions)
        h.tracker.server_closed(s)
        self.assertEqual(h.tracker.sessions, {})

    def test_never_connected(self):
        """A session whose backend never connected leaves the table with its client leg."""
        h = Harness()
        s = h.admit()
        h.tracker.closed(s)
        self.assertEqual(h.tracker.sessions, {})
        self.assertEqual(h.tracker.incomplete_count(), 0)

    def test_opened_is_idempotent(self):
        """The greeting of a closing session does not reopen it."""
        h = Harness()
        s = h.admit()
        h.tracker.closing(s)
        h.tracker.opened(s)
        self.assertEqual(s.state, CLOSING)

    def test_commands_and_snapshot(self):
        """The JSON row holds every column of the table, commands from the inspector included."""
        h = Harness()
        s = h.admit("10.0.0.7")
        s.set_responder(IPv4Address("TCP", "192.0.2.9", 25))
        h.tracker.opened(s)
        s.client_bytes, s.server_bytes = 12, 34
        s.leg.inspector.commands = 3
        h.clock.advance(5)
        s.touch()
        h.clock.advance(2)
        snapshot = h.tracker.snapshot()
        self.assertEqual(snapshot["incomplete"], 0)
        self.assertFalse(snapshot["aggressive"])
        self.assertEqual(
            snapshot["sessions"],
            [
                {
                    "id": s.id,
                    "initiator": "10.0.0.7:40000",
                    "responder": "192.0.2.9:25",
                    "listener": "L",
                    "rule": "R",
                    "protocol": "esmtp",
                    "state": "open",
                    "state_name": "SIS_OPEN",
                    "client_bytes": 12,
                    "server_bytes": 34,
                    "commands": 3,
                    "phase": "COMMAND",
                    "started": 1000,
                    "last_activity": 1005,
                    "age": 7,
                    "idle": 2,
                }
            ],
        )

    def test_audit_trail(self):
        """audit-trail logs a start record and, once both legs are gone, a stop record with bytes and duration."""
        rule = Rule(name="R", protocol="esmtp", audit_trail=True)
        h = Harness(rule=rule)
        s = h.admit("10.0.0.7")
        (start,) = self.tagged("SESS_AUDIT_TRAIL_START")
        self.assertEqual((start["initiator"], start["listener"], start["session_id"]), ("10.0.0.7:40000", "L", s.id))
        s.set_responder(IPv4Address("TCP", "192.0.2.9", 25))
        s.client_bytes, s.server_bytes = 1834, 412
        h.clock.advance(0.8)
        h.tracker.closed(s)
        self.assertEqual(self.tagged("SESS_AUDIT_TRAIL"), [])
        h.tracker.server_closed(s)
        (stop,) = self.tagged("SESS_AUDIT_TRAIL")
        self.assertEqual(
            formatEvent(stop),
            "SESS_AUDIT_TRAIL: Stop esmtp session: initiator (10.0.0.7:40000) sent 1834 bytes"
            " -- responder (192.0.2.9:25) sent 412 bytes, 0.8 s",
        )
        self.assertEqual((stop["client_bytes"], stop["server_bytes"], stop["rule"]), (1834, 412, "R"))

    def test_no_audit_trail(self):
        """Without audit-trail nothing is logged for a session."""
        h = Harness()
        h.tracker.closed(h.admit())
        self.assertEqual(self.events, [])


class HostOfTests(SynchronousTestCase):
    """Per-host accounting keys."""

    def test_ipv4_mapped(self):
        """An IPv4-mapped IPv6 peer counts as its IPv4 address."""
        self.assertEqual(host_of(IPv6Address("TCP", "::ffff:192.0.2.1", 1)), "192.0.2.1")

    def test_ipv6(self):
        """A real IPv6 peer keeps its address."""
        self.assertEqual(host_of(IPv6Address("TCP", "2001:db8::1", 1)), "2001:db8::1")

    def test_unix(self):
        """A UNIX-socket peer has no host."""
        self.assertIsNone(host_of(UNIXAddress(None)))


class RateWindowTests(SynchronousTestCase):
    """The one-minute rate in per-second buckets."""

    def test_window(self):
        """Events count for 60 seconds, then drop out second by second."""
        w = RateWindow(60)
        w.add(100.5)
        w.add(110.0)
        w.add(159.9)
        self.assertEqual(w.count(159.9), 3)
        self.assertEqual(w.count(160.0), 2)
        self.assertEqual(w.count(170.0), 1)
        self.assertEqual(w.count(218.9), 1)
        self.assertEqual(w.count(219.0), 0)

    def test_long_gap(self):
        """After a gap longer than the window nothing is left."""
        w = RateWindow(60)
        for i in range(100):
            w.add(10 + i * 0.1)
        self.assertEqual(w.count(5000), 0)
        w.add(5000)
        self.assertEqual(w.count(5000), 1)

    def test_bounded_memory(self):
        """However many events, the window keeps one counter per second."""
        w = RateWindow(60)
        for i in range(10000):
            w.add(i * 0.01)
        self.assertEqual(len(w._buckets), 60)
        self.assertEqual(w.count(99.99), 6000)

    def test_clock_stepped_back(self):
        """A clock that steps back counts into the current second instead of failing."""
        w = RateWindow(60)
        w.add(100)
        w.add(90)
        self.assertEqual(w.count(100), 2)


class RefusalTests(LoggingTestCase):
    """A refused connection: 421 try-later, closed, at O(1)."""

    def test_refusal_protocol(self):
        """A refused connection is answered 421 4.7.0 and closed, never built into a session."""
        h = Harness(max_incomplete_host=1)
        h.admit()
        proto = h.connect()
        self.assertTrue(refused(proto))
        self.assertEqual(len(h.wrapped.built), 1)
        self.assertEqual(len(h.tracker.sessions), 1)

    def test_refused_client_bytes_ignored(self):
        """Bytes from a refused client are ignored."""
        h = Harness(max_incomplete_host=1)
        h.admit()
        proto = h.connect()
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(b"EHLO x\r\n")
        self.assertEqual(transport.value(), reply("try_later"))


class MaxIncompleteTests(LoggingTestCase):
    """max-incomplete-high / -low: aggressive mode."""

    def test_high_is_the_most_allowed(self):
        """With high = 3, three incomplete sessions are admitted and the fourth is refused."""
        h = Harness(max_incomplete_high=3, max_incomplete_low=3)
        sessions = [h.admit() for _ in range(3)]
        self.assertTrue(refused(h.connect()))
        self.assertEqual(h.tracker.refused["max-incomplete"], 1)
        (on,) = self.tagged("ALERT_ON")
        self.assertEqual(formatEvent(on), "ALERT_ON: getting aggressive, count (3/3) current 1-min rate: 3")
        self.assertEqual((on["count"], on["high"], on["rate"], on["trigger"]), (3, 3, 3, "max-incomplete"))
        # The oldest incomplete session is deleted.
        self.assertEqual(sessions[0].leg.calls, [("abort",)])
        self.assertEqual(sessions[0].state, CLOSING)
        self.assertEqual([s.leg.calls for s in sessions[1:]], [[], []])

    def test_sheds_oldest_until_below_low(self):
        """While aggressive every new connection is refused and deletes the oldest incomplete session until below low."""
        h = Harness(max_incomplete_high=4, max_incomplete_low=2)
        sessions = [h.admit() for _ in range(4)]
        for _ in range(3):
            self.assertTrue(refused(h.connect()))
        self.assertEqual([bool(s.leg.calls) for s in sessions], [True, True, True, False])
        self.assertEqual(h.tracker.shed_total, 3)
        self.assertEqual(h.tracker.incomplete_count(), 1)
        (off,) = self.tagged("ALERT_OFF")
        self.assertEqual(formatEvent(off), "ALERT_OFF: calming down, count (1/2) current 1-min rate: 4")
        self.assertIsNone(h.tracker.aggressive)
        h.admit()

    def test_calms_when_sessions_open(self):
        """Sessions becoming open bring the count below low: ALERT_OFF, and new sessions are admitted again."""
        h = Harness(max_incomplete_high=3, max_incomplete_low=2)
        sessions = [h.admit() for _ in range(3)]
        self.assertTrue(refused(h.connect()))
        self.assertEqual(h.tracker.incomplete_count(), 2)
        self.assertEqual(self.tagged("ALERT_OFF"), [])
        h.tracker.opened(sessions[1])
        self.assertEqual(len(self.tagged("ALERT_OFF")), 1)
        h.admit()

    def test_open_sessions_do_not_count(self):
        """Only incomplete sessions count against max-incomplete-high."""
        h = Harness(max_incomplete_high=2, max_incomplete_low=1)
        for _ in range(5):
            h.tracker.opened(h.admit())
        self.assertEqual(len(h.tracker.sessions), 5)
        self.assertEqual(self.tagged("ALERT_ON"), [])


class OneMinuteTests(LoggingTestCase):
    """one-minute-high / -low: aggressive mode driven by the rate of new sessions."""

    def test_rate_high(self):
        """With one-minute-high = 3 the fourth new session within a minute is refused until the rate falls below low."""
        h = Harness(one_minute_high=3, one_minute_low=2)
        for _ in range(3):
            h.tracker.opened(h.admit())
        self.assertTrue(refused(h.connect()))
        (on,) = self.tagged("ALERT_ON")
        self.assertEqual((on["trigger"], on["rate"], on["count"]), ("one-minute", 3, 0))
        self.assertEqual(h.tracker.refused["one-minute"], 1)
        h.clock.advance(30)
        self.assertTrue(refused(h.connect()))
        # Refused connections do not count: the rate decays to zero.
        h.clock.advance(31)
        self.assertEqual(h.tracker.one_minute_rate(), 0)
        h.admit()
        (off,) = self.tagged("ALERT_OFF")
        self.assertEqual(formatEvent(off), "ALERT_OFF: calming down, count (0/400) current 1-min rate: 0")

    def test_rate_spread_out(self):
        """New sessions spread over more than a minute never trip one-minute-high."""
        h = Harness(one_minute_high=3, one_minute_low=2)
        for _ in range(10):
            h.tracker.opened(h.admit())
            h.clock.advance(21)
        self.assertEqual(self.tagged("ALERT_ON"), [])

    def test_no_shedding_below_low(self):
        """A rate-triggered aggressive mode deletes nothing while fewer than max-incomplete-low are incomplete."""
        h = Harness(one_minute_high=3, one_minute_low=2, max_incomplete_low=5)
        sessions = [h.admit() for _ in range(3)]
        self.assertTrue(refused(h.connect()))
        self.assertEqual([s.leg.calls for s in sessions], [[], [], []])


class HostTests(LoggingTestCase):
    """max-incomplete-host and block-time."""

    def test_host_limit(self):
        """With max-incomplete-host = 2 a host's third half-open connection is refused; other hosts are not."""
        h = Harness(max_incomplete_host=2)
        first = [h.admit("10.0.0.1") for _ in range(2)]
        self.assertTrue(refused(h.connect("10.0.0.1")))
        self.assertTrue(refused(h.connect("10.0.0.1")))
        (alert,) = self.tagged("HOST_TCP_ALERT_ON")
        self.assertEqual(formatEvent(alert), "HOST_TCP_ALERT_ON: Max tcp half-open connections (2) exceeded for host 10.0.0.1")
        self.assertEqual((alert["host"], alert["limit"]), ("10.0.0.1", 2))
        self.assertEqual(h.tracker.refused["max-incomplete-host"], 2)
        h.admit("10.0.0.2")
        self.assertEqual([s.leg.calls for s in first], [[], []])
        # Once one of them is open, the host may have another.
        h.tracker.opened(first[0])
        h.admit("10.0.0.1")

    def test_alert_again_after_recovery(self):
        """HOST_TCP_ALERT_ON is logged once per episode, again after the host fell below the limit."""
        h = Harness(max_incomplete_host=1)
        s = h.admit("10.0.0.1")
        h.connect("10.0.0.1")
        h.tracker.opened(s)
        h.admit("10.0.0.1")
        h.connect("10.0.0.1")
        self.assertEqual(len(self.tagged("HOST_TCP_ALERT_ON")), 2)

    def test_ipv4_mapped_peers_share_the_limit(self):
        """An IPv4 client seen through a tcp6 listener counts against the same host as over IPv4."""
        h = Harness(max_incomplete_host=2)
        s = h.admit(address=IPv6Address("TCP", "::ffff:10.0.0.1", 5000))
        self.assertEqual(s.initiator, "10.0.0.1:5000")
        h.admit("10.0.0.1")
        self.assertTrue(refused(h.connect(address=IPv6Address("TCP", "::ffff:10.0.0.1", 5001))))
        self.assertEqual(self.tagged("HOST_TCP_ALERT_ON")[0]["host"], "10.0.0.1")

    def test_unix_peers_not_limited_per_host(self):
        """Peers on a UNIX socket have no host and are not limited per host."""
        h = Harness(max_incomplete_host=1)
        for _ in range(3):
            h.admit(address=UNIXAddress(None))

    def test_block_time(self):
        """With block-time > 0 the host's half-open sessions are deleted and it is refused for that many minutes."""
        h = Harness(max_incomplete_host=2, block_time=2)
        first = [h.admit("10.0.0.1") for _ in range(2)]
        self.assertTrue(refused(h.connect("10.0.0.1")))
        (block,) = self.tagged("BLOCK_HOST")
        self.assertEqual(
            formatEvent(block),
            "BLOCK_HOST: Blocking new TCP connections from host 10.0.0.1 for 2 minutes (half-open count 2 exceeded)",
        )
        self.assertEqual([s.leg.calls for s in first], [[("abort",)], [("abort",)]])
        self.assertEqual(h.tracker.incomplete_count(), 0)
        self.assertEqual(h.tracker.blocked_hosts(), ["10.0.0.1"])
        h.clock.advance(119)
        self.assertTrue(refused(h.connect("10.0.0.1")))
        self.assertEqual(h.tracker.refused["block-time"], 1)
        h.admit("10.0.0.2")
        h.clock.advance(1)
        (unblock,) = self.tagged("UNBLOCK_HOST")
        self.assertEqual(formatEvent(unblock), "UNBLOCK_HOST: New TCP connections from host 10.0.0.1 no longer blocked")
        self.assertEqual(h.tracker.blocked_hosts(), [])
        h.admit("10.0.0.1")

    def test_block_time_zero(self):
        """With block-time 0 only the excess is refused: no block, no deletion."""
        h = Harness(max_incomplete_host=1, block_time=0)
        s = h.admit("10.0.0.1")
        self.assertTrue(refused(h.connect("10.0.0.1")))
        self.assertEqual(self.tagged("BLOCK_HOST"), [])
        self.assertEqual(s.leg.calls, [])
        self.assertEqual(h.clock.getDelayedCalls()[0].func, h.tracker._expire)


class TimerTests(LoggingTestCase):
    """synwait-time, idle-time / timeout and finwait-time on the injected clock."""

    def test_synwait(self):
        """An incomplete session older than synwait-time is timed out with the synwait reply."""
        h = Harness(synwait_time=30)
        s = h.admit()
        h.clock.advance(29.9)
        self.assertEqual(s.leg.calls, [])
        h.clock.advance(0.1)
        self.assertEqual(s.leg.calls, [("timeout", "synwait_timeout")])
        self.assertEqual(s.state, CLOSING)
        self.assertEqual(h.tracker.timeouts["synwait"], 1)

    def test_synwait_not_for_open_sessions(self):
        """A session opened in time is not timed out at synwait-time."""
        h = Harness(synwait_time=30)
        s = h.admit()
        h.clock.advance(1)
        h.tracker.opened(s)
        h.clock.advance(60)
        self.assertEqual(s.leg.calls, [])
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)

    def test_synwait_despite_activity(self):
        """Bytes do not extend synwait-time: a session still incomplete at synwait-time goes."""
        h = Harness(synwait_time=30)
        s = h.admit()
        for _ in range(30):
            h.clock.advance(1)
            s.touch()
        self.assertEqual(s.leg.calls, [("timeout", "synwait_timeout")])

    def test_idle(self):
        """An open session with no bytes either way for the rule's timeout is timed out with the idle reply."""
        h = Harness()
        s = h.admit()
        h.tracker.opened(s)
        h.clock.advance(99)
        self.assertEqual(s.leg.calls, [])
        h.clock.advance(1)
        self.assertEqual(s.leg.calls, [("timeout", "idle_timeout")])
        self.assertEqual(h.tracker.timeouts["idle"], 1)

    def test_activity_defers_idle_with_one_timer(self):
        """Activity moves the idle deadline lazily: touching never adds a heap entry, and the table keeps one DelayedCall."""
        h = Harness()
        sessions = [h.admit() for _ in range(3)]
        for s in sessions:
            h.tracker.opened(s)
        s = sessions[0]
        entries = len(h.tracker._heap)
        for _ in range(50):
            h.clock.advance(1)
            s.touch()
            self.assertEqual(len(h.tracker._heap), entries)
            (call,) = h.clock.getDelayedCalls()
            self.assertEqual(call.func, h.tracker._expire)
        h.clock.advance(99)
        self.assertEqual(s.leg.calls, [])
        h.clock.advance(1)
        self.assertEqual(s.leg.calls, [("timeout", "idle_timeout")])

    def test_idle_while_incomplete(self):
        """A rule timeout shorter than synwait-time times out an idle incomplete session with the idle reply."""
        h = Harness(rule=Rule(name="R", protocol="esmtp", timeout=10), synwait_time=30)
        s = h.admit()
        h.clock.advance(10)
        self.assertEqual(s.leg.calls, [("timeout", "idle_timeout")])

    def test_finwait(self):
        """A closing session whose legs are not gone within finwait-time is aborted."""
        h = Harness(finwait_time=5)
        s = h.admit()
        h.tracker.opened(s)
        h.clock.advance(3)
        h.tracker.closing(s)
        h.clock.advance(4.9)
        self.assertEqual(s.leg.calls, [])
        h.clock.advance(0.1)
        self.assertEqual(s.leg.calls, [("abort",)])
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(h.tracker.timeouts["finwait"], 1)

    def test_finwait_after_client_left(self):
        """When the client left first, the backend leg is aborted finwait-time later."""
        h = Harness(finwait_time=5)
        s = h.admit()
        s.set_responder(IPv4Address("TCP", "192.0.2.9", 25))
        h.tracker.opened(s)
        h.tracker.closed(s)
        h.clock.advance(5)
        self.assertEqual(s.leg.calls, [("abort",)])

    def test_finwait_after_timeout(self):
        """A timed-out session that does not go is aborted finwait-time later."""
        h = Harness(synwait_time=30, finwait_time=5)
        s = h.admit()
        h.clock.advance(30)
        h.clock.advance(5)
        self.assertEqual(s.leg.calls, [("timeout", "synwait_timeout"), ("abort",)])

    def test_timers_cancelled_at_end(self):
        """The table's DelayedCall stays while any session is left and is cancelled when the last one goes."""
        h = Harness()
        sessions = [h.admit() for _ in range(3)]
        h.tracker.closing(sessions[1])
        for s in sessions:
            self.assertEqual(len(h.clock.getDelayedCalls()), 1)
            h.tracker.closed(s)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(h.tracker._heap, [])

    def test_thousand_sessions_one_timer(self):
        """1,000 sessions share one pending DelayedCall, and each still times out at its own deadline."""
        h = Harness(synwait_time=1000, one_minute_high=10000, one_minute_low=10000)
        sessions = []
        for i in range(1000):
            s = h.admit("10.0.%d.%d" % (i // 250, i % 250))
            h.tracker.opened(s)
            sessions.append(s)
        # A few are active later: 10, 20 and 30.5 seconds after the rest.
        moved = {sessions[7]: 10, sessions[500]: 20, sessions[999]: 30.5}
        for s, after in sorted(moved.items(), key=lambda item: item[1]):
            h.clock.advance(1000 + after - h.clock.seconds())
            s.touch()
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)
        h.clock.advance(1100 - h.clock.seconds())
        timed_out = [s for s in sessions if s.leg.calls]
        self.assertEqual(len(timed_out), 997)
        self.assertEqual([s.leg.calls for s in moved], [[], [], []])
        self.assertEqual(h.tracker.timeouts["idle"], 997)
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)
        for s, after in sorted(moved.items(), key=lambda item: item[1]):
            h.clock.advance(1100 + after - 0.01 - h.clock.seconds())
            self.assertEqual(s.leg.calls, [])
            h.clock.advance(0.01)
            self.assertEqual(s.leg.calls, [("timeout", "idle_timeout")])
            self.assertEqual(len(h.clock.getDelayedCalls()), 1)
        self.assertEqual(h.tracker.timeouts["idle"], 1000)

    def test_earlier_deadline_moves_the_timer(self):
        """A deadline earlier than every pending one (finwait among idle sessions) fires on time."""
        h = Harness(finwait_time=5)
        sessions = [h.admit() for _ in range(3)]
        for s in sessions:
            h.tracker.opened(s)
        h.clock.advance(10)
        h.tracker.closing(sessions[2])
        (call,) = h.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 1015)
        h.clock.advance(5)
        self.assertEqual([s.leg.calls for s in sessions], [[], [], [("abort",)]])
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)
        h.clock.advance(85)
        self.assertEqual([s.leg.calls for s in sessions[:2]], [[("timeout", "idle_timeout")]] * 2)

    def test_deadline_reached_exactly(self):
        """A timer armed when rounding would land after its deadline still fires when the clock reads the deadline."""
        clock = Clock()
        tracker = SessionTracker(GlobalSettings(), clock)
        late = Listener(name="L", listen="tcp:0", backend="tcp:127.0.0.1:1", rule=Rule(name="R", protocol="esmtp", timeout=0.9))
        early = Listener(name="E", listen="tcp:0", backend="tcp:127.0.0.1:1", rule=Rule(name="E", protocol="esmtp", timeout=0.3))
        s = tracker.admit(IPv4Address("TCP", "10.0.0.1", 1), late)
        other = tracker.admit(IPv4Address("TCP", "10.0.0.2", 1), early)
        s.leg, other.leg = FakeLeg(), FakeLeg()
        # At 0.3 the one timer is re-armed for 0.9, and 0.3 + (0.9 - 0.3) > 0.9.
        clock.advance(0.3)
        self.assertEqual(other.leg.calls, [("timeout", "idle_timeout")])
        clock.advance(0.1)
        clock.advance(0.5)
        self.assertEqual(clock.seconds(), 0.9)
        self.assertEqual(s.leg.calls, [("timeout", "idle_timeout")])
        tracker.stop()

    def test_failing_leg_spares_the_others(self):
        """A leg that raises on timeout is logged, and the other sessions due at the same time still time out."""
        h = Harness()
        broken, s = h.admit(), h.admit()

        def fail(reply_name):
            raise RuntimeError("broken leg")

        broken.leg.timeoutSession = fail
        h.clock.advance(30)
        self.assertEqual(s.leg.calls, [("timeout", "synwait_timeout")])
        (event,) = [e for e in self.events if "log_failure" in e]
        self.assertEqual(event["session_id"], broken.id)
        self.assertIsInstance(event["log_failure"].value, RuntimeError)
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)

    def test_heap_stays_bounded(self):
        """Sessions that come and go behind a long-lived one leave at most a bounded number of stale heap entries."""
        h = Harness(one_minute_high=10000, one_minute_low=10000)
        first = h.admit()
        bound = 3 * 1 + 64
        for _ in range(1000):
            h.clock.advance(0.01)
            s = h.admit()
            h.tracker.closed(s)
            self.assertLessEqual(len(h.tracker._heap), bound + 1)
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)
        h.clock.advance(1100 - h.clock.seconds())
        self.assertEqual(first.leg.calls, [("timeout", "synwait_timeout")])

    def test_stop(self):
        """stop() cancels every session timer and every host block."""
        h = Harness(max_incomplete_host=1, block_time=1)
        h.admit("10.0.0.1")
        h.connect("10.0.0.1")
        h.admit("10.0.0.2")
        h.tracker.stop()
        self.assertEqual(h.clock.getDelayedCalls(), [])


class AlertTests(LoggingTestCase):
    """Alerts are structured events, counted whether logged or not."""

    def test_inspector_alert(self):
        """An inspector's alert is logged with its tag, text, addresses and fields."""
        h = Harness()
        s = h.admit("10.0.0.7")
        h.tracker.alert(s, Alert("SMTP_INVALID_COMMAND", "Invalid SMTP command (EXPN): not allowed", {"verb": "EXPN"}))
        (event,) = self.tagged("SMTP_INVALID_COMMAND")
        self.assertEqual(
            formatEvent(event),
            "SMTP_INVALID_COMMAND: Invalid SMTP command (EXPN): not allowed -- initiator (10.0.0.7:40000) responder (-)",
        )
        self.assertEqual((event["verb"], event["session_id"]), ("EXPN", s.id))
        self.assertEqual(h.tracker.alerts["SMTP_INVALID_COMMAND"], 1)

    def test_rule_alert_off(self):
        """alert = off in the rule silences its sessions' alerts but still counts them."""
        h = Harness(rule=Rule(name="R", protocol="esmtp", alert=False))
        h.tracker.alert(h.admit(), Alert("SMTP_MAX_DATA", "too big"))
        self.assertEqual(self.events, [])
        self.assertEqual(h.tracker.alerts["SMTP_MAX_DATA"], 1)

    def test_global_alert_off(self):
        """[global] alert = off silences the tracker's own alerts but still counts them."""
        h = Harness(max_incomplete_host=1, alert=False)
        h.admit()
        h.connect()
        self.assertEqual(self.events, [])
        self.assertEqual(h.tracker.alerts["HOST_TCP_ALERT_ON"], 1)


class TraceTests(LoggingTestCase):
    """debug = smtp: per-command and per-reply trace events."""

    def test_command_trace(self):
        """With debug = smtp a command trace is logged with its verb, length and state only."""
        h = Harness(debug=frozenset({"smtp"}))
        s = h.admit()
        h.tracker.event(s, Trace("client", "MAIL", 34, "COMMAND"))
        (event,) = self.tagged("SMTP_TRACE")
        self.assertEqual(formatEvent(event), "SMTP_TRACE: session %d client MAIL (34 bytes) in COMMAND" % s.id)
        self.assertEqual(
            {k: event[k] for k in ("direction", "verb", "length", "state", "code")},
            {"direction": "client", "verb": "MAIL", "length": 34, "state": "COMMAND", "code": 0},
        )

    def test_reply_trace(self):
        """A reply trace carries the reply code and the command it answers."""
        h = Harness(debug=frozenset({"smtp"}))
        s = h.admit()
        h.tracker.trace(s, Trace("server", "MAIL", 14, "COMMAND", 250))
        (event,) = self.tagged("SMTP_TRACE")
        self.assertEqual(formatEvent(event), "SMTP_TRACE: session %d server 250 to MAIL (14 bytes) in COMMAND" % s.id)

    def test_off_by_default(self):
        """Without debug = smtp traces are dropped."""
        h = Harness()
        h.tracker.event(h.admit(), Trace("client", "MAIL", 34, "COMMAND"))
        self.assertEqual(self.events, [])

    def test_verb_made_printable(self):
        """A verb from the wire is logged printable and short."""
        h = Harness(debug=frozenset({"smtp"}))
        h.tracker.trace(h.admit(), Trace("client", b"\x1b[2J" + b"A" * 100, 110, "COMMAND"))
        (event,) = self.tagged("SMTP_TRACE")
        self.assertEqual(event["verb"], "?[2J" + "A" * 28)

    def test_debug_key(self):
        """[global] debug = smtp turns tracing on; unknown facilities are refused."""
        text = "[global]\ndebug = %s\n[inspect R]\nprotocol = esmtp\n[listener l]\nlisten = tcp:2525\nbackend = tcp:host=x:port=1\ninspect = R\n"
        self.assertEqual(parse_policy(text % "smtp").settings.debug, frozenset({"smtp"}))
        self.assertEqual(parse_policy(text % "").settings.debug, frozenset())
        from mailguard.policy import PolicyError

        with self.assertRaises(PolicyError) as cm:
            parse_policy(text % "smtp, tcp")
        self.assertEqual(
            str(cm.exception),
            "<policy>: [global] debug: bad value 'smtp, tcp': expected debug facilities out of smtp ('tcp' is not one)",
        )

    def test_twistd_option(self):
        """`twistd mailguard --debug smtp` adds smtp to the policy's debug facilities."""
        from mailguard.service import makeService
        from mailguard.tap import Options

        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[inspect R]\nprotocol = esmtp\n[listener l]\nlisten = tcp:0\nbackend = tcp:host=127.0.0.1:port=1\ninspect = R\n")
        options = Options()
        options.parseOptions(["-c", path, "--debug", "smtp"])
        self.assertTrue(makeService(options).tracker.tracing)
        options = Options()
        options.parseOptions(["-c", path])
        self.assertFalse(makeService(options).tracker.tracing)
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--debug", "bogus"])


# -- end to end, on loopback --------------------------------------------------------


class EndToEndTests(TestCase):
    """The tracker in front of real backends, with real clients."""

    timeout = 30

    def gateway(self, backend_port, settings=None, **rule):
        """Listen with a gateway relaying to ``backend_port``; return its port number."""
        self.rule = Rule(name="E2E", protocol="esmtp", **rule)
        listener = Listener(name="e2e", listen="tcp:0", backend="tcp:127.0.0.1:%d" % backend_port, rule=self.rule)
        self.tracker = SessionTracker(settings or GlobalSettings(), reactor)
        backend = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", backend_port)
        port = reactor.listenTCP(0, listener_factory(listener, self.tracker, reactor, backend), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: wait_for(lambda: not self.tracker.sessions))
        return port.getHost().port

    def connect(self, port):
        """A raw client socket to the gateway, closed at cleanup (opened in a thread)."""
        d = deferToThread(socket.create_connection, ("127.0.0.1", port), 10)

        def opened(sock):
            self.addCleanup(sock.close)
            return sock

        return d.addCallback(opened)

    @defer.inlineCallbacks
    def test_host_limit(self):
        """A backend that never greets fills max-incomplete-host; the host's next connection gets 421 and never reaches it."""
        backend = RecordingBackend(greet=False)
        bport = listenBackend(self, backend)
        port = self.gateway(bport, settings=GlobalSettings(max_incomplete_host=2))
        for _ in range(2):
            yield self.connect(port)
        yield wait_for(lambda: len(backend.connections) == 2 and self.tracker.incomplete_count() == 2)

        def third():
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                got = b""
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return got
                    got += chunk

        got = yield deferToThread(third)
        self.assertEqual(got, reply("try_later"))
        self.assertEqual(self.tracker.refused["max-incomplete-host"], 1)
        self.assertEqual(len(backend.connections), 2)
        self.assertEqual(len(self.tracker.sessions), 2)

    @defer.inlineCallbacks
    def test_idle_timeout(self):
        """A session idle for the rule's timeout gets 421 idle timeout, the backend gets QUIT, and both close."""
        backend = RecordingBackend()
        bport = listenBackend(self, backend)
        port = self.gateway(bport, timeout=0.2)

        def idle():
            client = LockstepClient(port)
            try:
                return client.greeting, client.rest()
            finally:
                client.close()

        greeting, rest = yield deferToThread(idle)
        self.assertTrue(greeting.startswith(b"220 "), greeting)
        self.assertEqual(rest, reply("idle_timeout"))
        yield wait_for(lambda: backend.connections and backend.connections[0].closed)
        self.assertEqual(bytes(backend.connections[0].received), b"QUIT\r\n")
        self.assertEqual(self.tracker.timeouts["idle"], 1)
