"""Milters as message filters: the Twisted shell around `mailguard.milter`.

A ``[milter NAME]`` policy section becomes a `mailguard.filters.FilterConfig`
whose factory is `MilterFilterFactory`.  For each client session the
gateway asks it for a `MilterFilter` (at the session's first MAIL); the
filter opens one connection to the milter (any Twisted client endpoint),
negotiates, tells it about the connection and the HELO, and then about
each transaction as the gateway calls it: MAIL, each RCPT, the header
fields, the end of the headers, the body in pieces of at most 65,535
octets, the end of the message (whose modifications come back with the
verdict), abort between transactions and quit at the end.

Every wait runs on an injected clock, like Postfix's milter timeouts:
``connect-timeout`` for the connection, ``command-timeout`` for the
negotiation and the envelope steps, ``content-timeout`` for the header,
body and end-of-message steps (a ``progress`` answer restarts it).  A
milter that is down, too slow or breaks the protocol gets the section's
``default-action``; the ``MILTER_FAILED`` alert names the milter and why,
and the next transaction connects again.
"""

import re
import socket
import uuid
from collections import Counter

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from mailguard import filters, milter
from mailguard.interfaces import IMessageFilter, IMessageFilterFactory

log = Logger(namespace="mailguard")

PLUGIN = "milter"
"""The ``FilterConfig.plugin`` of every ``[milter NAME]`` section."""


MAX_MODIFICATIONS = 10000
"""The most modifications one end of message may carry (their octets are bounded by MAX_BODY)."""


class MilterFailed(Exception):
    """The milter could not be used (down, too slow, broke the protocol); ``str()`` says why."""


class MilterConnection(Protocol):
    """Moves bytes between one milter socket and its `mailguard.milter.MilterSession`.

    `request` sends one step and returns a Deferred firing with
    ``(modifications, answer)`` once the milter's final answer arrives,
    or failing with `MilterFailed` on a timeout, a protocol error or a
    closed connection.  One request at a time.
    """

    def __init__(self, core, clock):
        self.core = core
        self.clock = clock
        self.lost = False
        self.stats = None
        self._waiter = None
        self._timer = None
        self._timeout = None
        self._what = ""
        self._collected = []
        self._collected_size = 0

    def request(self, data, awaits, timeout, what):
        """Send ``data``; when ``awaits``, wait up to ``timeout`` seconds for the answer."""
        if self.lost:
            return defer.fail(MilterFailed("connection lost before %s" % what))
        if data:
            self.transport.write(data)
        if not awaits:
            return defer.succeed(([], None))
        self._waiter = defer.Deferred()
        self._collected = []
        self._collected_size = 0
        self._timeout = timeout
        self._what = what
        self._timer = self.clock.callLater(timeout, self._timedOut)
        return self._waiter

    def send(self, data):
        """Send ``data`` that needs no answer (abort, quit)."""
        if not self.lost and data:
            self.transport.write(data)

    def _finish(self, result=None, failure=None):
        waiter, self._waiter = self._waiter, None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if waiter is None:
            return
        if failure is not None:
            waiter.errback(failure)
        else:
            waiter.callback(result)

    def _timedOut(self):
        self._timer = None
        self._finish(failure=MilterFailed("no answer to %s within %g s" % (self._what, self._timeout)))
        self.transport.abortConnection()

    def dataReceived(self, data):
        """Feed the core; settle the waiting request with the answer."""
        try:
            values = self.core.receive(data)
        except milter.MilterProtocolError as e:
            self._finish(failure=MilterFailed("protocol error: %s" % e))
            self.lost = True
            self.transport.abortConnection()
            return
        for value in values:
            if not isinstance(value, (milter.Progress, milter.MilterReply, milter.Negotiated)):
                self._collected_size += len(getattr(value, "data", b"") or b"") + 64
                if self._collected_size > milter.MAX_BODY or len(self._collected) >= MAX_MODIFICATIONS:
                    self._finish(failure=MilterFailed("protocol error: too many modifications"))
                    self.lost = True
                    self.transport.abortConnection()
                    return
            if isinstance(value, milter.Progress):
                if self._timer is not None and self._timer.active():
                    self._timer.reset(self._timeout)
            elif isinstance(value, (milter.MilterReply, milter.Negotiated)):
                self._finish((self._collected, value))
            else:
                self._collected.append(value)

    def connectionLost(self, reason=None):
        """Fail a waiting request: the milter closed in the middle."""
        self.lost = True
        if self.stats is not None:
            self.stats.open -= 1
            self.stats = None
        self._finish(failure=MilterFailed("connection closed by milter%s" % (" during " + self._what if self._waiter
                                                                              else "")))

    def close(self):
        """Say QUIT and close."""
        if not self.lost:
            self.transport.write(self.core.quit())
            self.lost = True
            self.transport.loseConnection()


class _ConnectionFactory(Factory):
    def __init__(self, clock):
        self.clock = clock

    def buildProtocol(self, addr):
        return MilterConnection(milter.MilterSession(), self.clock)


# Per-transaction states of a MilterFilter: open (ask the milter), accepted or discard (by the milter,
# nothing more to ask), decided (refused by the milter, or the milter failed: the answer is kept).
_OPEN, _ACCEPTED, _DISCARD, _DECIDED = "open", "accepted", "discard", "decided"


@implementer(IMessageFilter)
class MilterFilter:
    """One milter connection for one client session (see the module docstring).

    Calls are run one after the other (a `DeferredLock`), in the order
    the gateway makes them.
    """

    def __init__(self, config, session, factory):
        self.config = config
        self.facts = session
        self.factory = factory
        self.stats = factory.stats(config.name)
        self._named = "milter %s" % config.name
        self.options = config.options
        self._lock = defer.DeferredLock()
        self._connection = None
        self._session_verdict = None  # the milter's answer to connect/helo, for the whole session
        self._tx = None
        self._tx_verdict = None
        self._in_transaction = False
        self._data_sent = False
        self._macros = {}
        self._closed = False
        self._open_failure = None
        self._messages = 0
        self._anonymous = uuid.uuid4().hex[:10].upper()
        self._run(self._first_open)

    # -- plumbing

    def _run(self, function, *args):
        return self._lock.run(function, *args)

    def _fail(self, why):
        """Log MILTER_FAILED, drop the connection, and return the default verdict."""
        why = str(why).replace("\n", " ")
        if self._closed:
            return filters.default_verdict(self.config, why)
        client = self.facts.client if self.facts else None
        log.warn("MILTER_FAILED: milter {milter}: {reason}; {action} applies -- initiator ({initiator})",
                 tag="MILTER_FAILED", milter=self.config.name, reason=why, action=self.config.default_action,
                 initiator="%s:%s" % client if client else "-", session=self.facts.session if self.facts else "")
        self.factory.record(self.config.name, "failed")
        self.stats.last_failure = why
        connection, self._connection = self._connection, None
        if connection is not None and not connection.lost:
            connection.lost = True
            connection.transport.abortConnection()
        self._tx = _DECIDED
        verdict = filters.default_verdict(self.config, why)
        self._tx_verdict = verdict
        return verdict

    def _step(self, step, timeout, what):
        d = self._connection.request(step.data, step.awaits, timeout, what)
        if step.awaits:
            clock, started = self.factory.clock, self.factory.clock.seconds()

            def answered(result):
                self.stats.observe(clock.seconds() - started)
                return result

            d.addCallback(answered)
        return d

    def _base_macros(self):
        facts = self.facts
        macros = {"j": self.factory.hostname, "{daemon_name}": "mailguard", "{client_name}": "unknown"}
        if facts is not None:
            if facts.client:
                macros["{client_addr}"] = str(facts.client[0])
                macros["{client_port}"] = str(facts.client[1])
                macros["_"] = "unknown [%s]" % facts.client[0]
            if facts.client_tls:
                macros["{tls_version}"] = facts.tls_version
                macros["{cipher}"] = facts.cipher
            if facts.auth:
                macros["{auth_authen}"] = facts.auth.decode("utf-8", "replace")
        return macros

    @defer.inlineCallbacks
    def _first_open(self):
        """Connect at once (the gateway builds the filter at the first MAIL); keep a failure for it."""
        self._open_failure = yield self._open()

    @defer.inlineCallbacks
    def _open(self):
        """Connect, negotiate, tell the milter about the client and its HELO; None or a MilterFailed."""
        options, clock = self.options, self.factory.clock
        self._session_verdict = None
        try:
            endpoint = self.factory.endpoint(options["endpoint"])
            attempt = endpoint.connect(_ConnectionFactory(clock))
            attempt.addTimeout(options["connect_timeout"], clock)
            try:
                connection = yield attempt
            except defer.TimeoutError:
                raise MilterFailed("no connection within %g s" % options["connect_timeout"])
            except MilterFailed:
                raise
            except Exception as e:
                raise MilterFailed("cannot connect: %s" % (str(e) or type(e).__name__))
            if self._closed:
                connection.close()
                raise MilterFailed("session closed while connecting")
            self._connection = connection
            command = options["command_timeout"]
            yield connection.request(connection.core.negotiate(), True, command, "option negotiation")
            self.stats.connected(connection)
            self._macros = self._base_macros()
            client = self.facts.client if self.facts else None
            if client:
                family = "6" if ":" in str(client[0]) else "4"
                step = connection.core.connect("[%s]" % client[0], family, int(client[1]), str(client[0]),
                                               self._macros)
            else:
                step = connection.core.connect("localhost", None, 0, "", self._macros)
            _, answer = yield self._step(step, command, "connect")
            self._session_verdict = self._session_answer(answer)
            helo = self.facts.helo if self.facts else None
            if helo and self._session_verdict is None:
                _, answer = yield self._step(connection.core.helo(helo, self._macros), command, "helo")
                self._session_verdict = self._session_answer(answer)
        except MilterFailed as e:
            return e
        except milter.MilterProtocolError as e:
            return MilterFailed("protocol error: %s" % e)
        return None

    def _session_answer(self, answer):
        """The verdict of the milter's answer to connect or HELO (for every transaction of the session)."""
        if answer is None:
            return None
        return milter.to_verdict(answer, self._named)

    def _envelope(self, verdict):
        """Map an envelope step's answer to what the gateway expects at MAIL/RCPT."""
        if verdict is None:
            return filters.Verdict.CONTINUE
        if verdict.action == filters.ACCEPT:
            self._tx = _ACCEPTED
            return filters.Verdict.CONTINUE
        if verdict.action == filters.DISCARD:
            self._tx = _DISCARD
            return filters.Verdict.CONTINUE
        self.factory.record(self.config.name, verdict.action)
        return verdict

    def _content(self, verdict):
        """Map an answer at a header/body step: None to go on, or a final verdict."""
        if verdict is None:
            return None
        if verdict.action == filters.ACCEPT:
            self._tx = _ACCEPTED
            return None
        self._tx = _DISCARD if verdict.action == filters.DISCARD else _DECIDED
        self._tx_verdict = verdict
        self.factory.record(self.config.name, verdict.action)
        return verdict

    def _short_circuit(self, envelope):
        """The answer without asking the milter, when this transaction is already decided."""
        if self._tx in (_ACCEPTED, _DISCARD):
            return filters.Verdict.CONTINUE if envelope else None
        if self._tx == _DECIDED:
            verdict = self._tx_verdict
            if verdict.action == filters.ACCEPT:
                return filters.Verdict.CONTINUE if envelope else None
            return verdict
        return False

    # -- IMessageFilter

    def envelopeFrom(self, session, sender, parameters):
        """MAIL: (re)connect if needed, end the last transaction, send the sender."""
        self.facts = session
        return self._run(self._mail, sender, parameters)

    @defer.inlineCallbacks
    def _mail(self, sender, parameters):
        self._tx, self._tx_verdict, self._data_sent = _OPEN, None, False
        failed, self._open_failure = self._open_failure, None
        if failed is None and (self._connection is None or self._connection.lost):
            self._connection = None
            failed = yield self._open()
        if failed is not None:
            return self._envelope_default(failed)
        if self._session_verdict is not None:
            verdict = self._session_verdict
            if verdict.action in (filters.REJECT, filters.TEMPFAIL, filters.DROP):
                self.factory.record(self.config.name, verdict.action)
                return verdict
            return self._envelope(verdict)
        connection = self._connection
        try:
            if self._in_transaction:
                connection.send(connection.core.abort())
            self._in_transaction = True
            self._macros["i"] = self._message_id()
            self._macros["{mail_addr}"] = sender.decode("utf-8", "surrogateescape")
            step = connection.core.mail(sender, parameters.split(), self._macros)
            _, answer = yield self._step(step, self.options["command_timeout"], "MAIL")
        except (MilterFailed, milter.MilterProtocolError) as e:
            return self._envelope_default(e)
        return self._envelope(milter.to_verdict(answer, self._named) if answer else None)

    def _message_id(self):
        """The ``i`` macro: the same for every milter of the session's n-th message (session id, n)."""
        self._messages += 1
        session = re.sub(r"[^0-9A-Za-z]", "", self.facts.session if self.facts else "") or self._anonymous
        return "MG%sM%d" % (session, self._messages)

    def _envelope_default(self, why):
        verdict = self._fail(why)
        if verdict.action == filters.ACCEPT:
            return filters.Verdict.CONTINUE
        return verdict

    def envelopeRecipient(self, recipient, parameters):
        """RCPT: the milter's answer for this recipient."""
        return self._run(self._rcpt, recipient, parameters)

    @defer.inlineCallbacks
    def _rcpt(self, recipient, parameters):
        decided = self._short_circuit(True)
        if decided is not False:
            return decided
        connection = self._connection
        try:
            self._macros["{rcpt_addr}"] = recipient.decode("utf-8", "surrogateescape")
            step = connection.core.rcpt(recipient, parameters.split(), self._macros)
            _, answer = yield self._step(step, self.options["command_timeout"], "RCPT")
        except (MilterFailed, milter.MilterProtocolError) as e:
            return self._envelope_default(e)
        verdict = milter.to_verdict(answer, self._named) if answer else None
        if verdict is not None and verdict.action in (filters.ACCEPT, filters.DISCARD):
            return self._envelope(verdict)
        if verdict is not None:
            # A refused recipient ends nothing but itself.
            self.factory.record(self.config.name, verdict.action)
            return verdict
        return filters.Verdict.CONTINUE

    def serverReply(self, command, code, text):
        """Not told to milters (Postfix does not either)."""

    def _content_step(self, make, what, timeout=None):
        return self._run(self._content_call, make, what, timeout)

    @defer.inlineCallbacks
    def _content_call(self, make, what, timeout):
        decided = self._short_circuit(False)
        if decided is not False:
            return decided
        connection = self._connection
        timeout = timeout or self.options["content_timeout"]
        try:
            if not self._data_sent:
                self._data_sent = True
                _, answer = yield self._step(connection.core.data(self._macros), self.options["command_timeout"],
                                             "DATA")
                verdict = self._content(milter.to_verdict(answer, self._named) if answer else None)
                if verdict is not None or self._tx != _OPEN:
                    return verdict
            _, answer = yield self._step(make(connection.core), timeout, what)
        except (MilterFailed, milter.MilterProtocolError) as e:
            verdict = self._fail(e)
            return None if verdict.action == filters.ACCEPT else verdict
        return self._content(milter.to_verdict(answer, self._named) if answer else None)

    def header(self, name, value):
        """One header field (HDR_LEADSPC decides whether its leading space is kept)."""
        return self._content_step(lambda core: core.header(name, value, self._macros), "header")

    def endOfHeaders(self):
        """The end of the header block."""
        return self._content_step(lambda core: core.end_of_headers(self._macros), "end of headers")

    def body(self, chunk):
        """A body piece, sent in packets of at most 65,535 octets."""
        return self._run(self._body, chunk)

    @defer.inlineCallbacks
    def _body(self, chunk):
        for start in range(0, max(len(chunk), 1), milter.BODY_CHUNK):
            piece = chunk[start:start + milter.BODY_CHUNK]
            if not piece:
                break
            verdict = yield self._content_call(lambda core, piece=piece: core.body(piece), "body", None)
            if verdict is not None:
                return verdict
        return None

    def endOfMessage(self):
        """The end of the message: modifications, then the verdict."""
        return self._run(self._end)

    @defer.inlineCallbacks
    def _end(self):
        verdict = yield self._end_verdict()
        if self._tx != _DECIDED:  # refusals and failures were counted where they happened
            self.factory.record(self.config.name, verdict.action)
        return verdict

    @defer.inlineCallbacks
    def _end_verdict(self):
        if self._tx == _ACCEPTED:
            return filters.Verdict.ACCEPT
        if self._tx == _DISCARD:
            return filters.Verdict(filters.DISCARD, reason="discarded by milter %s" % self.config.name)
        if self._tx == _DECIDED:
            return self._tx_verdict
        if not self._data_sent:
            # A message with no header and no body: DATA still comes first.
            verdict = yield self._content_call(lambda core: milter.Step(b"", False), "DATA", None)
            if verdict is not None:
                return verdict
            return (yield self._end_verdict())
        connection = self._connection
        try:
            changes, answer = yield self._step(connection.core.end_of_message(self._macros),
                                               self.options["content_timeout"], "end of message")
            collected = milter.Modifications(bool(connection.core.protocol & milter.SMFIP_HDR_LEADSPC))
            for change in changes:
                collected.add(change)
            verdict = collected.verdict(answer)
        except (MilterFailed, milter.MilterProtocolError) as e:
            return self._fail(e)
        self._tx = None
        self._in_transaction = False
        if verdict.action != filters.ACCEPT:
            reason = verdict.reason if verdict.reason.startswith(self._named) else self._named
            if verdict.action == filters.QUARANTINE:
                reason = "%s: %s" % (self._named, verdict.reason)
            verdict = filters.Verdict(verdict.action, verdict.reply, verdict.modifications, reason)
        return verdict

    def abort(self):
        """The transaction ended without a verdict: tell the milter."""
        return self._run(self._abort)

    def _abort(self):
        connection = self._connection
        if connection is not None and not connection.lost and self._in_transaction:
            connection.send(connection.core.abort())
        self._in_transaction = False
        self._tx = None
        return None

    def close(self):
        """QUIT and close the connection, at once (a step still waiting fails quietly)."""
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
        return None


@implementer(IMessageFilterFactory)
class MilterFilterFactory:
    """Builds `MilterFilter` sessions for ``[milter NAME]`` sections; counts verdicts per milter.

    ``reactor`` (connections) and ``clock`` (timeouts) default to the
    global reactor, imported only when the first filter is built.
    """

    name = PLUGIN
    options = {}

    def __init__(self, reactor=None, clock=None):
        self._reactor = reactor
        self._clock = clock
        self.hostname = socket.gethostname()
        self.milters = {}

    def validateOption(self, key, value):
        """``[milter NAME]`` keys are parsed by the policy itself."""
        raise ValueError("not a milter key")

    @property
    def reactor(self):
        """The reactor connections are made with (the global one unless given)."""
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    @property
    def clock(self):
        """The clock every milter timeout runs on (the reactor unless given)."""
        return self._clock if self._clock is not None else self.reactor

    def endpoint(self, description):
        """The client endpoint of ``description``."""
        from twisted.internet.endpoints import clientFromString

        return clientFromString(self.reactor, description)

    def buildFilter(self, config, session):
        """A `MilterFilter` for one client session; it starts connecting now."""
        stats = self.stats(config.name)
        stats.sessions += 1
        stats.endpoint = config.options.get("endpoint")
        return MilterFilter(config, session, self)

    def stats(self, name):
        """The `MilterStats` of milter ``name`` (made on first use)."""
        stats = self.milters.get(name)
        if stats is None:
            stats = self.milters[name] = MilterStats(name)
        return stats

    @property
    def verdicts(self):
        """Verdict counts by milter name."""
        return {name: stats.verdicts for name, stats in self.milters.items()}

    def record(self, name, verdict):
        """Count one verdict (or ``failed``) of milter ``name``."""
        self.stats(name).verdicts[verdict] += 1

    def snapshot(self):
        """Every milter's figures, for ``/milters`` and ``mailguard show milters``."""
        return {"milters": [self.milters[name].as_dict() for name in sorted(self.milters)]}


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
"""Upper bounds (seconds) of the milter answer-time histogram."""


class MilterStats:
    """What one milter did in this process: sessions, connections, verdicts, answer times, last failure."""

    def __init__(self, name):
        self.name = name
        self.endpoint = None
        self.sessions = 0
        self.connections = 0
        self.open = 0
        self.verdicts = Counter()
        self.last_failure = None
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def connected(self, connection):
        """A connection finished its negotiation; it counts as open until it is lost."""
        self.connections += 1
        self.open += 1
        self.last_failure = None
        connection.stats = self

    def observe(self, seconds):
        """One step answered after ``seconds``."""
        self.latency_sum += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.latency_counts[i] += 1
                return
        self.latency_counts[-1] += 1

    @property
    def state(self):
        """``up`` (a connection is open), ``down`` (the last attempt failed) or ``idle``."""
        if self.last_failure is not None:
            return "down"
        return "up" if self.open else "idle"

    def as_dict(self):
        """The figures as JSON-ready values."""
        return {"name": self.name, "endpoint": self.endpoint, "state": self.state, "sessions": self.sessions,
                "connections": self.connections, "open": self.open, "verdicts": dict(sorted(self.verdicts.items())),
                "last_failure": self.last_failure, "answers": sum(self.latency_counts),
                "answer_seconds": round(self.latency_sum, 6)}


class MilterCollector:
    """A prometheus_client collector of every milter's verdicts and answer times (at scrape time)."""

    def __init__(self, factory=None):
        self._factory = factory

    def collect(self):
        """``mailguard_milter_verdicts_total{milter,verdict}`` and ``mailguard_milter_latency_seconds{milter}``."""
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        factory = self._factory if self._factory is not None else default_factory()
        verdicts = CounterMetricFamily("mailguard_milter_verdicts_total",
                                       "Milter verdicts (and failures: verdict=failed), by milter.",
                                       labels=["milter", "verdict"])
        latency = HistogramMetricFamily("mailguard_milter_latency_seconds",
                                        "Time each milter took to answer one step.", labels=["milter"])
        for name in sorted(factory.milters):
            stats = factory.milters[name]
            for verdict, count in sorted(stats.verdicts.items()):
                verdicts.add_metric([name, verdict], count)
            buckets, cumulative = [], 0
            for bound, count in zip(LATENCY_BUCKETS, stats.latency_counts):
                cumulative += count
                buckets.append((repr(float(bound)), cumulative))
            buckets.append(("+Inf", cumulative + stats.latency_counts[-1]))
            latency.add_metric([name], buckets, stats.latency_sum)
        yield verdicts
        yield latency


_default = None


def default_factory():
    """The gateway's shared `MilterFilterFactory` (global reactor)."""
    global _default
    if _default is None:
        _default = MilterFilterFactory()
    return _default

