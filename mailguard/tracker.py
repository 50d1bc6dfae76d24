"""The CBAC-style session tracker: the session table, its limits and timers, alerts and the audit trail.

`TrackingFactory` is the second link of the factory chain (listener ->
tracker -> inspector -> backend).  For every accepted connection it first
asks the `SessionTracker` whether to admit it; a refused connection gets
the refusal of the listener's protocol (SMTP ``421 4.7.0``, POP3 ``-ERR``,
IMAP ``* BYE``, nothing for ``tcp``: see
`mailguard.interfaces.IInspectorFactory.refusalReply`) from a tiny protocol
and is closed, at O(1) cost (no inspector, no backend connection).  An
admitted one is recorded as a `Session` and handed to the inspector's
factory.

Sessions go incomplete -> open -> closing:

- **incomplete** (half-open) from accept until the backend's greeting has
  been relayed (`SessionTracker.opened`);
- **open** until either side closes or the gateway closes them;
- **closing** once one side has closed or the gateway has begun closing
  both (`SessionTracker.closing`, `SessionTracker.server_closed`), until
  both legs are gone: the relay reports the backend leg with
  `SessionTracker.server_closed` and the client leg with
  `SessionTracker.closed`.  Then the session leaves the table and its audit
  record is written.

The ``[global]`` thresholds, with IOS semantics (N is the most allowed, so
the connection that would be number N+1 is the one refused):

- ``max-incomplete-high`` / ``one-minute-high``: the gateway "gets
  aggressive" (``ALERT_ON``).  While aggressive it refuses every new
  connection, and each refusal also deletes the oldest incomplete session
  as long as at least ``max-incomplete-low`` are incomplete.  It calms down
  (``ALERT_OFF``) once fewer than ``max-incomplete-low`` sessions are
  incomplete and fewer than ``one-minute-low`` were admitted in the last
  minute.
- ``max-incomplete-host``: a host with that many incomplete sessions gets
  its next connections refused (``HOST_TCP_ALERT_ON``); with
  ``block-time`` > 0 its incomplete sessions are deleted and the host is
  refused for that many minutes (``BLOCK_HOST`` / ``UNBLOCK_HOST``).

Timers run on the injected clock (`IReactorTime`): the whole table shares
one `IDelayedCall`, armed for the earliest entry of a heap of
``(deadline, session id)`` entries.  An entry is checked lazily when it is
due (bytes only record the time of the last activity, so the data path never
touches a timer); entries superseded by a later one, or left by sessions that
are gone, are skipped when popped and purged in bulk when they outnumber the
live sessions.

Two more deadlines of an open session share that one entry, for clients that
trickle instead of falling silent (which the idle timer alone cannot see):

- ``command-timeout``: a command line must be complete within that many
  seconds of its first byte (`SessionTracker.progress` notes when a partial
  line appears, from the inspector's ``partial_command()``);
- ``min-data-rate`` (octets per second over a window of seconds): while the
  inspector is ``reading_data()`` (DATA, BDAT chunks), each window must bring
  that average.  Time while the relay has paused reading the client
  (backpressure from the server, `SessionTracker.reading_paused`) does not
  count: the window is pushed back by the pause.

Both are checked lazily like the others: bytes only move counters.
"""

import collections
import heapq
import itertools
import math
import sys

from twisted.application import service
from twisted.internet import protocol
from twisted.logger import Logger
from twisted.protocols import policies
from zope.interface import directlyProvides, providedBy

from mailguard.events import Alert, MessageDone, MessageSent, Trace
from mailguard.logs import (
    ALERT_LIMIT, AlertLimiter, emit_info, is_alert, queue_id_of_text, reply_text, tls_of, unix_path,
)

log = Logger(namespace="mailguard")

INCOMPLETE = "incomplete"
OPEN = "open"
CLOSING = "closing"

#: The session states, in the order a session goes through them.
STATES = (INCOMPLETE, OPEN, CLOSING)

#: IOS-style names of the session states, for `show sessions`.
STATE_NAMES = {INCOMPLETE: "SIS_OPENING", OPEN: "SIS_OPEN", CLOSING: "SIS_CLOSING"}

# Why a connection was refused: the policy key that refused it (a metrics label).
REFUSED_MAX_INCOMPLETE = "max-incomplete"
REFUSED_ONE_MINUTE = "one-minute"
REFUSED_HOST = "max-incomplete-host"
REFUSED_BLOCKED = "block-time"

#: Every refusal reason, for metrics that list them all.
REFUSAL_REASONS = (REFUSED_MAX_INCOMPLETE, REFUSED_ONE_MINUTE, REFUSED_HOST, REFUSED_BLOCKED)

#: Upper bounds (seconds) of the backend connect-time histogram's buckets.
#: Upper bounds (octets) of the message-size histogram.
SIZE_BUCKETS = (1024, 10240, 102400, 1048576, 10485760, 52428800)
CONNECT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# A timer that fires this close to its deadline counts as on time: the
# clock's float arithmetic must not turn one expiry into a re-arm loop.
_SLACK = 1e-3

# The timer heap is rebuilt without its stale entries once it holds more
# than this many entries per session in the table (plus a few).
_HEAP_PER_SESSION = 3
_HEAP_SPARE = 64

#: How many recent alerts the tracker keeps for the status page.
ALERT_RING = 100
#: Seconds between two samples of the status page's rate charts.
SAMPLE_INTERVAL = 5
#: How many samples are kept: 15 minutes of them.
SAMPLE_COUNT = 15 * 60 // SAMPLE_INTERVAL
#: Sampling stops once the status page has not been asked for in this many seconds.
WATCH_SECONDS = 60


def _observe(counts, bounds, value):
    """Count ``value`` in the first bucket whose bound holds it (the last: overflow)."""
    for i, bound in enumerate(bounds):
        if value <= bound:
            counts[i] += 1
            return
    counts[-1] += 1


def host_of(address):
    """The host part of a peer address for per-host accounting, or None.

    IPv4-mapped IPv6 peers (``::ffff:a.b.c.d``, what a ``tcp6:`` listener
    reports for IPv4 clients) count as their IPv4 address.  Addresses
    without a host (UNIX sockets) are not accounted per host.
    """
    host = getattr(address, "host", None)
    if not host:
        return None
    if host[:7].lower() == "::ffff:" and "." in host:
        host = host[7:]
    # One string per host, however many of its sessions are held.
    return sys.intern(host)


class RateWindow:
    """How many events happened in the last ``seconds`` seconds, in O(1) memory.

    One counter per second over a ring of ``seconds`` buckets; a count
    includes the current (partial) second and the ``seconds - 1`` before it.
    """

    __slots__ = ("_buckets", "_second", "_total")

    def __init__(self, seconds=60):
        self._buckets = [0] * seconds
        self._second = None
        self._total = 0

    def _advance(self, now):
        second = int(now)
        last = self._second
        if last is None or second <= last:
            # First use, same second, or a clock stepped back: stay put.
            if last is None:
                self._second = second
            return
        buckets = self._buckets
        size = len(buckets)
        if second - last >= size:
            buckets[:] = [0] * size
            self._total = 0
        else:
            for s in range(last + 1, second + 1):
                i = s % size
                self._total -= buckets[i]
                buckets[i] = 0
        self._second = second

    def add(self, now):
        """Count one event at time ``now``."""
        self._advance(now)
        self._buckets[self._second % len(self._buckets)] += 1
        self._total += 1

    def count(self, now):
        """Events in the window ending at ``now``."""
        self._advance(now)
        return self._total


class Session:
    """One client connection and its backend connection, as the table shows it."""

    __slots__ = (
        "id",
        "initiator",
        "host",
        "responder",
        "listener",
        "rule",
        "state",
        "client_bytes",
        "server_bytes",
        "started",
        "last_activity",
        "closing_since",
        "server_up",
        "client_gone",
        "line_started",
        "rate_due",
        "rate_mark",
        "paused_at",
        "leg",
        "_clock",
        "_tracker",
        "_entry",
    )

    def __init__(self, sid, initiator, listener, rule, clock, host=None, tracker=None):
        self.id = sid
        self.initiator = initiator
        self.host = host
        self.responder = None
        self.listener = listener
        self.rule = rule
        self.state = INCOMPLETE
        self.client_bytes = 0
        self.server_bytes = 0
        self.leg = None  # the relay.ClientLeg: timeoutSession(), abortSession()
        self._clock = clock
        self._tracker = tracker
        self._entry = None  # its live entry in the tracker's timer heap
        self.started = self.last_activity = clock.seconds()
        self.closing_since = None
        self.server_up = False
        self.client_gone = False
        self.line_started = None  # first byte of a partial command line
        self.rate_due = None  # end of the current min-data-rate window
        self.rate_mark = 0  # client_bytes when that window began
        self.paused_at = None  # since when the relay has stopped reading the client

    def touch(self):
        """Record activity (bytes either way) now."""
        self.last_activity = self._clock.seconds()

    def set_responder(self, address):
        """Record the backend's address once connected (the backend leg is up)."""
        from mailguard.relay import format_address, shared_address_text

        host = getattr(address, "host", None)
        # Every session of a listener has the same backend: share its text.
        self.responder = format_address(address) if host is None else shared_address_text(host, address.port)
        self.server_up = True
        if self._tracker is not None:
            self._tracker._backend_connected(self._clock.seconds() - self.started)

    @property
    def label(self):
        """The session id the operator sees: ``n``, or ``<worker>-<n>`` in a worker process."""
        worker = getattr(self._tracker, "worker", None)
        return self.id if worker is None else "%d-%d" % (worker, self.id)

    @property
    def protocol(self):
        """The inspection protocol of the session's rule (``esmtp``, ``smtp``, ``tcp``)."""
        return self.rule.protocol

    @property
    def inspector(self):
        """The session's inspector, or None before it has one."""
        return getattr(self.leg, "inspector", None)

    @property
    def commands(self):
        """How many commands the client has issued (as the inspector counts them)."""
        return getattr(self.inspector, "commands", 0)

    def as_dict(self, now):
        """The table row as plain data (for the JSON view)."""
        return {
            "id": self.label,
            "initiator": self.initiator,
            "responder": self.responder,
            "listener": self.listener,
            "rule": self.rule.name,
            "protocol": self.protocol,
            "state": self.state,
            "state_name": STATE_NAMES[self.state],
            "client_bytes": self.client_bytes,
            "server_bytes": self.server_bytes,
            "commands": self.commands,
            "phase": _text(getattr(self.inspector, "phase", None)),
            "started": self.started,
            "last_activity": self.last_activity,
            "age": max(0.0, now - self.started),
            "idle": max(0.0, now - self.last_activity),
        }


class SessionTracker:
    """The session table of the whole gateway: admission, timers, alerts, audit trail.

    ``settings`` is the policy's `GlobalSettings`; ``clock`` provides
    ``seconds()`` and ``callLater`` (the reactor, or `task.Clock` in tests).
    The counters read by the status endpoint are plain attributes, updated
    per session or per chunk, never per byte.
    """

    def __init__(self, settings, clock):
        self.settings = settings
        self.clock = clock
        self.sessions = {}
        self._ids = itertools.count(1)
        # Incomplete sessions, oldest first, overall and per initiator host.
        self._incomplete = {}
        self._hosts = {}
        self._host_alerted = set()
        self._blocked = {}  # host -> IDelayedCall of its UNBLOCK_HOST
        # The session timers: a heap of (deadline, session id) entries and
        # the one IDelayedCall, armed for the deadline ``_due``.
        self._heap = []
        self._call = None
        self._due = None
        self._rate = RateWindow(60)
        self.aggressive = None  # the refusal reason that made it aggressive, or None
        self.tracing = "smtp" in settings.debug
        #: The worker index (``[global] workers``), or None: session ids are then ``<worker>-<n>``.
        self.worker = None
        self._limiter = AlertLimiter()
        self._limit_call = None
        # Counters for /metrics (monotonic).
        self.admitted_total = 0
        self.refused = collections.Counter()
        self.alerts = collections.Counter()
        self.shed_total = 0
        self.timeouts = collections.Counter()
        self._closed_bytes = [0, 0]
        self._closed_commands = 0
        self._closed_verbs = collections.Counter()
        self.connect_buckets = [0] * (len(CONNECT_BUCKETS) + 1)
        self.size_buckets = [0] * (len(SIZE_BUCKETS) + 1)
        self.size_sum = 0
        self.connect_sum = 0.0
        # For the status page: bounded rings, filled only while it is watched
        # (the samples) or as rarely as alerts are raised.
        self.started = clock.seconds()
        self.recent_alerts = collections.deque(maxlen=ALERT_RING)
        self.samples = collections.deque(maxlen=SAMPLE_COUNT)
        self._sampler = None
        self._watched = None

    def set_worker(self, index, count):
        """This tracker runs in worker ``index`` of ``count``: its ids and its share of the alert limit."""
        self.worker = index
        self._limiter.limit = max(1, math.ceil(ALERT_LIMIT / count))

    # -- admission -------------------------------------------------------------

    def refusal(self, address):
        """Decide on a new connection from ``address``: None to admit it, else why it is refused.

        Costs O(1) whatever the load: at most one incomplete session is
        deleted per call, except when a host gets blocked (block-time > 0):
        its half-open sessions go then, at most max-incomplete-host of them,
        once per block.
        """
        settings = self.settings
        host = host_of(address)
        if host is not None and host in self._blocked:
            return self._refuse(REFUSED_BLOCKED)
        now = self.clock.seconds()
        if self.aggressive is not None:
            self._maybe_calm(now)
        reason = self.aggressive
        if reason is not None:
            self._shed_oldest()
            return self._refuse(reason)
        if host is not None:
            group = self._hosts.get(host)
            if group is not None and len(group) >= settings.max_incomplete_host:
                return self._refuse(self._host_over(host, group))
        incomplete = len(self._incomplete)
        if incomplete >= settings.max_incomplete_high:
            trigger = REFUSED_MAX_INCOMPLETE
        elif self._rate.count(now) >= settings.one_minute_high:
            trigger = REFUSED_ONE_MINUTE
        else:
            return None
        self._get_aggressive(trigger, now)
        self._shed_oldest()
        return self._refuse(trigger)

    def _refuse(self, reason):
        self.refused[reason] += 1
        return reason

    def admit(self, initiator, listener):
        """Create and register the session for a newly accepted connection."""
        from mailguard.relay import format_address

        now = self.clock.seconds()
        host = host_of(initiator)
        text = format_address(initiator)
        if not text:
            # A UNIX socket's client has no name: say which socket it came in on.
            listen = listener.listen[8:] if listener.listen.lower().startswith("haproxy:") else listener.listen
            text = unix_path(listen) or "unix"
        session = Session(next(self._ids), text, listener.name, listener.rule, self.clock, host, self)
        self.sessions[session.id] = session
        self._incomplete[session.id] = session
        if host is not None:
            self._hosts.setdefault(host, {})[session.id] = session
        self._rate.add(now)
        self.admitted_total += 1
        self._arm(session)
        if listener.rule.audit_trail:
            log.info(
                "SESS_AUDIT_TRAIL_START: Start {protocol} session: initiator ({initiator}) -- listener {listener}",
                tag="SESS_AUDIT_TRAIL_START",
                protocol=session.protocol,
                initiator=session.initiator,
                listener=session.listener,
                rule=session.rule.name,
                session_id=session.label,
            )
        return session

    def one_minute_rate(self):
        """Sessions admitted in the last minute."""
        return self._rate.count(self.clock.seconds())

    def incomplete_count(self):
        """Sessions still incomplete (half-open)."""
        return len(self._incomplete)

    def check_mode(self):
        """Re-evaluate aggressive mode now; return the reason it holds, or None.

        The mode is otherwise re-evaluated on events (a new connection, a
        session leaving the incomplete state); views call this so that a
        rate that decayed in silence is seen.
        """
        if self.aggressive is not None:
            self._maybe_calm(self.clock.seconds())
        return self.aggressive

    def blocked_hosts(self):
        """The hosts refused under ``block-time`` right now."""
        return sorted(self._blocked)

    def _get_aggressive(self, trigger, now):
        self.aggressive = trigger
        self._tracker_alert(
            "ALERT_ON",
            "ALERT_ON: getting aggressive, count ({count}/{high}) current 1-min rate: {rate}",
            count=len(self._incomplete),
            high=self.settings.max_incomplete_high,
            rate=self._rate.count(now),
            trigger=trigger,
        )

    def _maybe_calm(self, now):
        settings = self.settings
        count = len(self._incomplete)
        if count >= settings.max_incomplete_low:
            return
        rate = self._rate.count(now)
        if rate >= settings.one_minute_low:
            return
        trigger, self.aggressive = self.aggressive, None
        self._tracker_alert(
            "ALERT_OFF",
            "ALERT_OFF: calming down, count ({count}/{low}) current 1-min rate: {rate}",
            level="info",
            count=count,
            low=settings.max_incomplete_low,
            rate=rate,
            trigger=trigger,
        )

    def _shed_oldest(self):
        """Delete the oldest incomplete session while at least max-incomplete-low are."""
        if not self._incomplete or len(self._incomplete) < self.settings.max_incomplete_low:
            return
        victim = next(iter(self._incomplete.values()))
        self.shed_total += 1
        self._abort(victim)

    def _host_over(self, host, group):
        settings = self.settings
        if host not in self._host_alerted:
            self._host_alerted.add(host)
            self._tracker_alert(
                "HOST_TCP_ALERT_ON",
                "HOST_TCP_ALERT_ON: Max tcp half-open connections ({limit}) exceeded for host {host}",
                limit=settings.max_incomplete_host,
                host=host,
            )
        if settings.block_time <= 0:
            return REFUSED_HOST
        self._blocked[host] = self.clock.callLater(settings.block_time * 60, self._unblock, host)
        self._tracker_alert(
            "BLOCK_HOST",
            "BLOCK_HOST: Blocking new TCP connections from host {host} for {minutes} minutes"
            " (half-open count {limit} exceeded)",
            host=host,
            minutes=settings.block_time,
            limit=settings.max_incomplete_host,
        )
        # As IOS does: a blocked host's half-open sessions go too (bounded
        # by max-incomplete-host, once per block).
        for session in list(group.values()):
            self._abort(session)
        return REFUSED_HOST

    def _unblock(self, host):
        del self._blocked[host]
        self._tracker_alert(
            "UNBLOCK_HOST",
            "UNBLOCK_HOST: New TCP connections from host {host} no longer blocked",
            level="info",
            host=host,
        )

    # -- state transitions -------------------------------------------------------

    def opened(self, session):
        """The backend's greeting reached the client: the session is open."""
        if session.state is INCOMPLETE and session.id in self.sessions:
            self._leave_incomplete(session)
            session.state = OPEN

    def closing(self, session):
        """One side has closed, or the gateway is closing both: finwait starts now."""
        if session.state is CLOSING or session.id not in self.sessions:
            return
        if session.state is INCOMPLETE:
            self._leave_incomplete(session)
        session.state = CLOSING
        session.closing_since = self.clock.seconds()
        self._arm(session)

    def server_closed(self, session, client_busy=False):
        """The backend leg is gone.

        ``client_busy``: the gateway dropped it on purpose while the client
        is still sending a refused message; the client must reach its end
        of data to be told why, so the idle timer, not finwait, applies.
        """
        if session.id not in self.sessions:
            return
        session.server_up = False
        if session.client_gone:
            self._end(session)
        elif not client_busy:
            self.closing(session)

    def closed(self, session):
        """The client leg is gone: the session ends once the backend leg is gone too."""
        if session.id not in self.sessions:
            return
        session.client_gone = True
        if session.server_up:
            # The backend leg is being closed; finwait bounds how long.
            self.closing(session)
        else:
            self._end(session)

    def _leave_incomplete(self, session):
        self._incomplete.pop(session.id, None)
        host = session.host
        if host is not None:
            group = self._hosts.get(host)
            if group is not None:
                group.pop(session.id, None)
                if len(group) < self.settings.max_incomplete_host:
                    self._host_alerted.discard(host)
                if not group:
                    del self._hosts[host]
        if self.aggressive is not None:
            self._maybe_calm(self.clock.seconds())

    def _abort(self, session):
        """Drop both legs of ``session`` now (load shedding, finwait)."""
        self.closing(session)
        leg = session.leg
        if leg is not None:
            leg.abortSession()

    def _end(self, session):
        """Remove a session whose legs are both gone; count it and write its audit record."""
        del self.sessions[session.id]
        if session.state is INCOMPLETE:
            self._leave_incomplete(session)
        session.state = CLOSING
        # Its heap entry is stale now.
        self._trim()
        self._closed_bytes[0] += session.client_bytes
        self._closed_bytes[1] += session.server_bytes
        inspector = session.inspector
        self._closed_commands += getattr(inspector, "commands", 0)
        verbs = getattr(inspector, "verbs", None)
        if verbs:
            self._closed_verbs.update(verbs)
        if session.rule.audit_trail:
            duration = self.clock.seconds() - session.started
            log.info(
                "SESS_AUDIT_TRAIL: Stop {protocol} session: initiator ({initiator}) sent {client_bytes} bytes"
                " -- responder ({responder}) sent {server_bytes} bytes, {duration:.1f} s",
                tag="SESS_AUDIT_TRAIL",
                protocol=session.protocol,
                initiator=session.initiator,
                responder=session.responder or "-",
                client_bytes=session.client_bytes,
                server_bytes=session.server_bytes,
                duration=duration,
                commands=session.commands,
                listener=session.listener,
                rule=session.rule.name,
                session_id=session.label,
            )

    def _backend_connected(self, elapsed):
        """Count how long a session's backend took to connect (``elapsed`` seconds)."""
        elapsed = max(0.0, elapsed)
        self.connect_sum += elapsed
        _observe(self.connect_buckets, CONNECT_BUCKETS, elapsed)

    # -- timers ------------------------------------------------------------------------

    def _deadline(self, session):
        """When ``session``'s timer is due, given its state and last activity."""
        settings = self.settings
        if session.state is CLOSING:
            return session.closing_since + settings.finwait_time
        rule = session.rule
        idle = session.last_activity + rule.timeout
        if session.state is INCOMPLETE:
            return min(session.started + settings.synwait_time, idle)
        if session.line_started is not None:
            idle = min(idle, session.line_started + rule.command_timeout)
        if session.rate_due is not None and session.paused_at is None:
            idle = min(idle, session.rate_due)
        return idle

    def _arm_earlier(self, session):
        """Arm ``session``'s timer if its deadline moved earlier than its entry."""
        entry = session._entry
        if entry is None or self._deadline(session) < entry[0]:
            self._arm(session)

    # -- what the relay reports, for the command and data-rate deadlines ------------

    def progress(self, session):
        """After bytes either way: start or stop the command and data-rate deadlines.

        Asks the inspector ``partial_command()`` and ``reading_data()``;
        an inspector without them (``tcp``, plugins) has neither deadline.
        """
        # After every read of either leg: the common case (a whole command,
        # no deadline to start or stop) is kept to a few attribute reads.
        leg = session.leg
        if session.state is not OPEN or leg is None:
            return
        inspector = leg.inspector
        partial_command = getattr(inspector, "partial_command", None)
        if partial_command is None:
            return
        if partial_command():
            if session.line_started is None:
                session.line_started = self.clock.seconds()
                self._arm_earlier(session)
        elif session.line_started is not None:
            session.line_started = None  # its entry re-arms lazily when due
        if inspector.reading_data() and session.rule.min_data_rate[0]:
            if session.rate_due is None:
                session.rate_due = self.clock.seconds() + session.rule.min_data_rate[1]
                session.rate_mark = session.client_bytes
                self._arm_earlier(session)
        elif session.rate_due is not None:
            session.rate_due = None

    def reading_paused(self, session):
        """The relay stopped reading the client (the server is not keeping up)."""
        if session.paused_at is None:
            session.paused_at = self.clock.seconds()

    def reading_resumed(self, session):
        """The relay reads the client again: the data-rate window is pushed back by the pause."""
        paused, session.paused_at = session.paused_at, None
        if paused is not None and session.rate_due is not None and session.id in self.sessions:
            session.rate_due += self.clock.seconds() - paused
            self._arm_earlier(session)

    def _arm(self, session):
        """(Re-)arm ``session``'s timer for its deadline: its earlier entry, if any, goes stale."""
        entry = session._entry = (self._deadline(session), session.id)
        heapq.heappush(self._heap, entry)
        self._trim()

    def _live(self, entry):
        """Whether heap ``entry`` is the live entry of a session still in the table."""
        session = self.sessions.get(entry[1])
        return session is not None and session._entry is entry

    def _trim(self):
        """Bound the heap's stale entries; keep the one DelayedCall on the first live entry."""
        heap = self._heap
        if not self.sessions:
            heap.clear()
        elif len(heap) > _HEAP_PER_SESSION * len(self.sessions) + _HEAP_SPARE:
            heap[:] = [entry for entry in heap if self._live(entry)]
            heapq.heapify(heap)
        self._schedule()

    def _schedule(self):
        """Point the one DelayedCall at the earliest live entry; cancel it when there is none."""
        heap = self._heap
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        call = self._call
        if not heap:
            if call is not None:
                self._call = None
                call.cancel()
            return
        due = heap[0][0]
        if call is None:
            self._due = due
            self._call = self.clock.callLater(self._delay(due), self._expire)
        elif due != self._due:
            # Earlier: a new deadline; later: the first entry went stale.
            self._due = due
            call.reset(self._delay(due))

    def _delay(self, due):
        """The delay after which a call lands on ``due``, never after it."""
        now = self.clock.seconds()
        delay = due - now
        if delay <= 0.0:
            return 0.0
        # now + (due - now) can round up past due: on task.Clock a timer due
        # at t must fire when the clock reaches t.
        while now + delay > due:
            delay = math.nextafter(delay, 0.0)
        return delay

    def _expire(self):
        """The table's timer fired: check every session whose entry is due."""
        self._call = None
        now = self.clock.seconds()
        # Entries up to the deadline the call was armed for are due even if
        # the clock reads a hair earlier (see `_delay`).
        limit = max(now, self._due)
        heap = self._heap
        due = []
        while heap and heap[0][0] <= limit:
            due.append(heapq.heappop(heap))
        # Popped first, acted on after: timers armed meanwhile (finwait) fire
        # on a later call, as they did with one DelayedCall per session.
        for entry in due:
            if not self._live(entry):
                continue
            try:
                self._expire_session(self.sessions[entry[1]], now)
            except Exception:
                # One session's failing leg must not stop the other timers.
                log.failure("Timer of session {session_id} failed", session_id=entry[1])
        self._schedule()

    def _expire_session(self, session, now):
        """A session's entry is due: act if its deadline has passed, else re-arm."""
        if now < self._deadline(session) - _SLACK:
            # Activity (or the state) moved the deadline since it was armed.
            self._arm(session)
            return
        state = session.state
        if state is CLOSING:
            self.timeouts["finwait"] += 1
            log.debug("Session {session_id}: finwait-time expired, aborting", session_id=session.label)
            leg = session.leg
            if leg is not None:
                leg.abortSession()
            return
        if state is INCOMPLETE and now >= session.started + self.settings.synwait_time - _SLACK:
            name, kind = "synwait_timeout", "synwait"
        elif session.rate_due is not None and session.paused_at is None and now >= session.rate_due - _SLACK:
            rate, window = session.rule.min_data_rate
            received = session.client_bytes - session.rate_mark
            if received >= rate * window:
                # Fast enough over this window: the next one starts now.
                session.rate_mark = session.client_bytes
                session.rate_due = now + window
                self._arm(session)
                return
            name, kind = "data_rate", "data-rate"
            self.alert(session, Alert(
                "SMTP_DATA_RATE",
                "%d octets of message data in %d s, below min-data-rate %d" % (received, window, rate),
                {"octets": received, "seconds": window, "min_rate": rate},
            ))
        elif session.line_started is not None and now >= session.line_started + session.rule.command_timeout - _SLACK:
            name, kind = "command_timeout", "command"
            self.alert(session, Alert(
                "SMTP_COMMAND_TIMEOUT",
                "command line not complete %d s after its first byte" % session.rule.command_timeout,
                {"seconds": session.rule.command_timeout},
            ))
        else:
            name, kind = "idle_timeout", "idle"
        self.timeouts[kind] += 1
        log.debug("Session {session_id}: {kind} timeout", session_id=session.label, kind=kind)
        leg = session.leg
        if leg is not None:
            leg.timeoutSession(name)
        # The leg reports closing itself; this makes sure finwait is armed
        # even when it was closing already.
        self.closing(session)

    def stop(self):
        """Cancel every timer (the gateway is stopping)."""
        for call in self._blocked.values():
            if call.active():
                call.cancel()
        self._blocked.clear()
        self._heap.clear()
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        call, self._limit_call = self._limit_call, None
        if call is not None and call.active():
            call.cancel()
        self._report_suppressed(self._limiter.flush())
        sampler, self._sampler = self._sampler, None
        if sampler is not None and sampler.active():
            sampler.cancel()

    # -- alerts, traces and other events -----------------------------------------------

    def _tracker_alert(self, tag, text, level="warn", **fields):
        """The tracker's own alerts (gateway-wide): counted always, logged when `[global] alert` is on."""
        self.alerts[tag] += 1
        self._remember(tag, fields.get("host"), text, fields)
        if not self.settings.alert or not self._allowed(tag, fields.get("host")):
            return
        emit = log.warn if level == "warn" else log.info
        emit(text, tag=tag, **fields)

    def alert(self, session, alert):
        """Log a policy violation reported by a session's inspector (when its rule's alert is on)."""
        self.alerts[alert.tag] += 1
        self._remember(alert.tag, getattr(session, "initiator", None), alert.text)
        if not session.rule.alert or not self._allowed(alert.tag, session.host):
            return
        log.warn(
            "{tag}: {text} -- initiator ({initiator}) responder ({responder})",
            tag=alert.tag,
            text=alert.text,
            initiator=session.initiator,
            responder=session.responder or "-",
            session_id=session.label,
            host=session.host,
            **alert.fields,
        )

    def _allowed(self, tag, host):
        """The alert rate limit: whether this alert of ``tag`` from ``host`` may be logged now."""
        if not is_alert(tag):
            return True
        if self._limiter.allow(tag, host, self.clock.seconds()):
            return True
        if self._limit_call is None:
            due = self._limiter.next_due()
            self._limit_call = self.clock.callLater(max(0.0, due - self.clock.seconds()), self._limit_expired)
        return False

    def _limit_expired(self):
        """A rate-limit window with dropped alerts ended: say how many were dropped."""
        self._limit_call = None
        now = self.clock.seconds()
        self._report_suppressed(self._limiter.due(now))
        due = self._limiter.next_due()
        if due is not None:
            self._limit_call = self.clock.callLater(max(0.0, due - now), self._limit_expired)

    def _report_suppressed(self, counts):
        for tag, host, dropped in counts:
            log.warn(
                "ALERTS_SUPPRESSED: {dropped} {suppressed} alerts from {host} suppressed"
                " (more than {limit} in {window} s)",
                tag="ALERTS_SUPPRESSED",
                suppressed=tag,
                host=host or "-",
                dropped=dropped,
                limit=self._limiter.limit,
                window=self._limiter.window,
            )

    def backend_unreachable(self, session, backend, why):
        """The session's backend could not be reached (the client gets 421)."""
        self._tracker_alert(
            "BACKEND_UNREACHABLE",
            "BACKEND_UNREACHABLE: mail server {backend} unreachable: {why} -- initiator ({initiator})",
            backend=backend,
            why=why,
            initiator=session.initiator,
            host=session.host,
            session_id=session.label,
        )

    def backend_tls_failed(self, session, why):
        """TLS to the session's backend failed, or its certificate did not verify."""
        self._tracker_alert(
            "BACKEND_TLS_FAILED",
            "BACKEND_TLS_FAILED: TLS to the mail server failed: {why} -- initiator ({initiator})"
            " responder ({responder})",
            why=why,
            initiator=session.initiator,
            responder=session.responder or "-",
            host=session.host,
            session_id=session.label,
        )

    def message(self, session, done):
        """Log the ``MESSAGE`` line of a message whose fate is known (`MessageDone`).

        One per message: the text is put together here with ``%`` (the
        logger's own ``{field}`` formatting of a dozen fields cost more than
        the rest of a 1 KB message's inspection); the fields still travel
        with the event, for the JSON and IOS formats.
        """
        leg = session.leg
        server = getattr(leg, "server", None)
        full = reply_text(done.reply, limit=10000) if done.reply else ""
        qid = queue_id_of_text(full) or "-"
        reply = (full if len(full) <= 300 else full[:297] + "...") or "-"
        sender = _printable(done.sender.decode("utf-8", "replace"), 300)
        client_tls = tls_of(getattr(leg, "transport", None)) or "none"
        server_tls = tls_of(getattr(server, "transport", None)) or "none"
        responder = session.responder or "-"
        label = session.label
        line = ("MESSAGE: session %s from=%s nrcpt=%d size=%d outcome=%s queue_id=%s client_tls=%s server_tls=%s"
                " -- initiator (%s) responder (%s) reply \"%s\"" % (
                    label, sender, done.recipients, done.size, done.outcome, qid, client_tls, server_tls,
                    session.initiator, responder, reply))
        emit_info(log, {
            "line": line,
            "tag": "MESSAGE",
            "session_id": label,
            "sender": sender,
            "recipients": done.recipients,
            "size": done.size,
            "outcome": done.outcome,
            "queue_id": qid,
            "client_tls": client_tls,
            "server_tls": server_tls,
            "initiator": session.initiator,
            "responder": responder,
            "reply": reply,
            "listener": session.listener,
            "rule": session.rule.name,
        })

    def set_tracing(self, on):
        """Switch the ``smtp`` trace on or off now, for new sessions and for those in the table."""
        self.tracing = bool(on)
        for session in self.sessions.values():
            inspector = session.inspector
            if inspector is not None and hasattr(inspector, "trace"):
                inspector.trace = self.tracing
        log.info("DEBUG_CHANGED: debug smtp is {state}", tag="DEBUG_CHANGED", state="on" if on else "off")

    def find(self, label):
        """The session whose id (as the operator sees it, e.g. ``3`` or ``1-3``) is ``label``, or None."""
        label = str(label)
        for session in self.sessions.values():
            if str(session.label) == label:
                return session
        return None

    def clear(self, label):
        """Close the session ``label`` now (IOS ``clear ip inspect session``); False if there is none."""
        session = self.find(label)
        if session is None:
            return False
        log.info(
            "SESSION_CLEARED: session {session_id} cleared by the operator -- initiator ({initiator})"
            " responder ({responder})",
            tag="SESSION_CLEARED",
            session_id=session.label,
            initiator=session.initiator,
            responder=session.responder or "-",
        )
        if session.leg is not None:
            session.leg.abortSession()
        else:
            self._abort(session)
        return True

    def trace(self, session, trace):
        """Log one `Trace` (a command or a reply) when ``debug = smtp`` is on.

        Only the verb, the length, the inspector's state and the reply code
        are logged, never arguments, AUTH payloads or message data.
        """
        if not self.tracing:
            return
        verb = _printable(trace.verb)
        if trace.code:
            what = "%d to %s" % (trace.code, verb) if verb else "%d" % trace.code
        else:
            what = verb
        log.info(
            "SMTP_TRACE: session {session_id} {direction} {what} ({length} bytes) in {state}",
            tag="SMTP_TRACE",
            session_id=session.label,
            direction=trace.direction,
            verb=verb,
            what=what,
            length=trace.length,
            state=_printable(trace.state),
            code=trace.code,
            initiator=session.initiator,
            responder=session.responder or "-",
        )

    def event(self, session, event):
        """Any other inspector event: traces go to `trace`, the rest is logged at debug level."""
        if event.__class__ is Trace:
            self.trace(session, event)
            return
        if event.__class__ is MessageSent:
            self.size_sum += event.size
            _observe(self.size_buckets, SIZE_BUCKETS, event.size)
            return
        if event.__class__ is MessageDone:
            self.message(session, event)
            return
        log.debug("{event!r}", event=event, session_id=session.label)

    # -- the status page's rings: recent alerts, rate samples ---------------------------

    def _remember(self, tag, client, text, fields=None):
        """Keep an alert in the bounded ring (the text is formatted only when read)."""
        self.recent_alerts.append((self.clock.seconds(), tag, client, text, fields))

    def alert_ring(self):
        """The recent alerts, newest first, as ``(time, tag, client, text)``."""
        out = []
        for when, tag, client, text, fields in reversed(self.recent_alerts):
            if fields is not None:
                try:
                    text = text.format(**fields)
                except (KeyError, IndexError, ValueError):
                    pass
            out.append((when, tag, client, text))
        return out

    def sample(self):
        """The monotonic counters the rate charts are drawn from, now.

        ``(time, admitted, refused per REFUSAL_REASONS, messages, bytes from
        clients, bytes from servers)``.
        """
        from_client, from_server = self.bytes_totals()
        return (
            self.clock.seconds(),
            self.admitted_total,
            tuple(self.refused[reason] for reason in REFUSAL_REASONS),
            sum(self.size_buckets),
            from_client,
            from_server,
        )

    def watch(self):
        """The status page was asked for: sample every `SAMPLE_INTERVAL` s for `WATCH_SECONDS` more.

        One timer on the tracker's clock, running only while the page is
        watched; nothing is sampled before the first call.
        """
        self._watched = self.clock.seconds()
        if self._sampler is None:
            self.samples.append(self.sample())
            self._sampler = self.clock.callLater(SAMPLE_INTERVAL, self._take_sample)

    def _take_sample(self):
        self._sampler = None
        self.samples.append(self.sample())
        if self.clock.seconds() - self._watched < WATCH_SECONDS:
            self._sampler = self.clock.callLater(SAMPLE_INTERVAL, self._take_sample)

    # -- views -----------------------------------------------------------------------------

    def snapshot(self):
        """The live table and the tracker's mode as plain data (the JSON of ``/sessions``)."""
        now = self.clock.seconds()
        return {
            "time": now,
            "aggressive": self.check_mode() is not None,
            "incomplete": len(self._incomplete),
            "one_minute_rate": self._rate.count(now),
            "blocked_hosts": self.blocked_hosts(),
            "sessions": [s.as_dict(now) for s in self.sessions.values()],
        }

    def state_counts(self):
        """How many sessions are in each state."""
        counts = dict.fromkeys(STATES, 0)
        for session in self.sessions.values():
            counts[session.state] += 1
        return counts

    def bytes_totals(self):
        """Bytes received from clients and from backends, over all sessions ever."""
        from_client, from_server = self._closed_bytes
        for session in self.sessions.values():
            from_client += session.client_bytes
            from_server += session.server_bytes
        return from_client, from_server

    def commands_total(self):
        """Commands issued by clients, over all sessions ever."""
        return self._closed_commands + sum(s.commands for s in self.sessions.values())

    def verb_totals(self):
        """Accepted commands by verb (bytes), over all sessions ever."""
        totals = collections.Counter(self._closed_verbs)
        for session in self.sessions.values():
            verbs = getattr(session.inspector, "verbs", None)
            if verbs:
                totals.update(verbs)
        return totals


def _text(value):
    """``value`` as a JSON-friendly string, or None."""
    return None if value is None else str(value)


def _printable(value, limit=32):
    """A short, printable rendering of a trace field (bytes or str)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    value = str(value)[:limit]
    if value.isprintable() and "\ufffd" not in value:
        return value
    return "".join(c if c.isprintable() and c != "\ufffd" else "?" for c in value)


class _Refused(protocol.Protocol):
    """A refused connection: the protocol's refusal (SMTP ``421 4.7.0``, POP3 ``-ERR``...), then close."""

    def __init__(self, message):
        self.message = message

    def connectionMade(self):
        """Answer (unless the protocol has no words for it) and close; nothing the client sends is read."""
        if self.message:
            self.transport.write(self.message)
        self.transport.loseConnection()


class _ProxyHeaderFirst(policies.ProtocolWrapper):
    """Read the PROXY header (v1 or v2) first; admit the real client only then.

    Unlike Twisted's own ``haproxy:`` wrapper, which connects the wrapped
    protocol before the header has been read, this one decides admission
    (per-host limits, blocking) on the address the header names, and only
    then builds the session, so the audit trail, ``show sessions`` and the
    metrics all see the real client.  The header itself is parsed by
    `mailguard.proxyreader`, in any segmentation; a connection whose first
    bytes are no valid header is dropped.
    """

    def __init__(self, factory):
        from mailguard.proxyreader import ProxyHeaderReader

        policies.ProtocolWrapper.__init__(self, factory, protocol.Protocol())
        self._reader = ProxyHeaderReader()
        self._peer = self._host = None
        self._admitted = False
        self._timer = None

    def makeConnection(self, transport):
        """Connected: wait for the header before anything else."""
        directlyProvides(self, providedBy(transport))
        protocol.Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        # Not yet in the session table, so bound the wait here.
        tracker = self.factory.wrappedFactory.tracker
        self._timer = tracker.clock.callLater(tracker.settings.synwait_time, transport.abortConnection)

    def connectionLost(self, reason):
        """Gone before or after the header: cancel the wait, tell the session."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        policies.ProtocolWrapper.connectionLost(self, reason)

    def dataReceived(self, data):
        """Parse the header; then admit and hand every later byte to the session."""
        if self._admitted:
            return self.wrappedProtocol.dataReceived(data)
        from mailguard.proxyreader import InvalidProxyHeader

        try:
            header, rest = self._reader.feed(data)
        except InvalidProxyHeader as e:
            log.info("Invalid PROXY header from {peer}: {why}", peer=self.transport.getPeer(), why=str(e))
            self.transport.abortConnection()
            return None
        if header is None:
            return None
        self._peer = _proxied_address(header.family, header.source)
        self._host = _proxied_address(header.family, header.destination)
        self._admitted = True
        self._timer.cancel()
        self.wrappedProtocol = self.factory.wrappedFactory.admitted(self.getPeer())
        self.wrappedProtocol.makeConnection(self)
        if rest:
            self.wrappedProtocol.dataReceived(rest)
        return None

    def getPeer(self):
        """The client named by the PROXY header (the proxy itself before it, or when it names none)."""
        if self._peer is not None:
            return self._peer
        return self.transport.getPeer()

    def getHost(self):
        """The address the client connected to, per the PROXY header."""
        if self._host is not None:
            return self._host
        return self.transport.getHost()


def _proxied_address(family, value):
    """The Twisted address of one end named by a PROXY header (`mailguard.proxyreader.ProxyHeader`)."""
    from twisted.internet import address

    if family is None or value is None:
        return None
    if family.startswith("UNIX"):
        return address.UNIXAddress(value)
    cls = address.IPv4Address if family.endswith("4") else address.IPv6Address
    return cls("UDP" if family.startswith("UDP") else "TCP", value[0], value[1])


class ProxyHeaderFactory(policies.WrappingFactory):
    """Wraps a `TrackingFactory` for listeners behind a proxy (``listen = haproxy:...``)."""

    noisy = False
    protocol = _ProxyHeaderFirst

    def buildProtocol(self, addr):
        """A wrapper that reads the PROXY header before admitting anyone."""
        return self.protocol(self)


class TrackingFactory(protocol.ServerFactory):
    """Admits each accepted connection into the tracker, then builds its inspector protocol."""

    noisy = False

    def __init__(self, tracker, listener, wrapped):
        from mailguard.inspectors import inspector_factory, refusal_reply

        self.tracker = tracker
        self.listener = listener
        self.wrapped = wrapped
        # What a refused client is told, in the listener's protocol.
        self.refusal = refusal_reply(inspector_factory(listener.rule.protocol), "overload")

    def buildProtocol(self, addr):
        """Refuse the connection (O(1)), or admit it into the table and build its protocol."""
        return self.admitted(addr)

    def admitted(self, addr):
        """The protocol for a connection from ``addr``: a refusal, or an admitted session's."""
        if self.tracker.refusal(addr) is not None:
            return _Refused(self.refusal)
        session = self.tracker.admit(addr, self.listener)
        proto = self.wrapped.buildProtocol(addr)
        proto.session = session
        session.leg = proto
        return proto


class TrackerService(service.Service):
    """Cancels the tracker's timers when the gateway stops."""

    def __init__(self, tracker):
        self.tracker = tracker

    def stopService(self):
        """Stop, and cancel every pending timer of the tracker."""
        service.Service.stopService(self)
        self.tracker.stop()
