"""The CBAC-style session tracker: the session table, alerts and the audit trail.

`TrackingFactory` is the second link of the factory chain (listener ->
tracker -> inspector -> backend): it records every accepted connection as a
`Session` in the `SessionTracker`'s table before handing it to the
inspector's factory.  Sessions go incomplete -> open -> closing.
"""

import itertools

from twisted.internet import protocol
from twisted.logger import Logger

log = Logger(namespace="mailguard")

INCOMPLETE = "incomplete"
OPEN = "open"
CLOSING = "closing"

#: IOS-style names of the session states, for `show sessions`.
STATE_NAMES = {INCOMPLETE: "SIS_OPENING", OPEN: "SIS_OPEN", CLOSING: "SIS_CLOSING"}


class Session:
    """One client connection and its backend connection, as the table shows it."""

    __slots__ = (
        "id",
        "initiator",
        "responder",
        "listener",
        "rule",
        "protocol",
        "state",
        "client_bytes",
        "server_bytes",
        "started",
        "last_activity",
        "leg",
        "_clock",
    )

    def __init__(self, sid, initiator, listener, rule, clock):
        self.id = sid
        self.initiator = initiator
        self.responder = None
        self.listener = listener
        self.rule = rule
        self.protocol = rule.protocol
        self.state = INCOMPLETE
        self.client_bytes = 0
        self.server_bytes = 0
        self.leg = None  # the relay.ClientLeg: timeoutSession(), abortSession()
        self._clock = clock
        self.started = self.last_activity = clock.seconds()

    def touch(self):
        """Record activity (bytes either way) now."""
        self.last_activity = self._clock.seconds()

    def set_responder(self, address):
        """Record the backend's address once connected."""
        from mailguard.relay import format_address

        self.responder = format_address(address)


class SessionTracker:
    """The session table of the whole gateway, and its logging of alerts.

    ``settings`` is the policy's `GlobalSettings`; ``clock`` provides
    ``seconds()`` and ``callLater`` (the reactor, or `task.Clock` in tests).
    """

    def __init__(self, settings, clock):
        self.settings = settings
        self.clock = clock
        self.sessions = {}
        self._ids = itertools.count(1)

    def admit(self, initiator, listener):
        """Create and register the session for a newly accepted connection."""
        from mailguard.relay import format_address

        session = Session(next(self._ids), format_address(initiator), listener.name, listener.rule, self.clock)
        self.sessions[session.id] = session
        if listener.rule.audit_trail:
            log.info(
                "SESS_AUDIT_TRAIL_START: Start {protocol} session: initiator ({initiator}) -- listener {listener}",
                tag="SESS_AUDIT_TRAIL_START",
                protocol=session.protocol,
                initiator=session.initiator,
                listener=session.listener,
                session_id=session.id,
            )
        return session

    def opened(self, session):
        """The backend's greeting reached the client."""
        if session.state == INCOMPLETE:
            session.state = OPEN

    def closed(self, session):
        """The client leg is gone: drop the session and write its audit line."""
        if self.sessions.pop(session.id, None) is None:
            return
        session.state = CLOSING
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
                session_id=session.id,
            )

    def alert(self, session, alert):
        """Log a policy violation reported by a session's inspector."""
        if not session.rule.alert:
            return
        log.warn(
            "{tag}: {text} -- initiator ({initiator}) responder ({responder})",
            tag=alert.tag,
            text=alert.text,
            initiator=session.initiator,
            responder=session.responder or "-",
            session_id=session.id,
            **alert.fields,
        )

    def event(self, session, event):
        """Any other inspector event (debug traces): logged at debug level."""
        log.debug("{event!r}", event=event, session_id=session.id)


class TrackingFactory(protocol.ServerFactory):
    """Registers each accepted connection with the tracker, then builds its inspector protocol."""

    noisy = False

    def __init__(self, tracker, listener, wrapped):
        self.tracker = tracker
        self.listener = listener
        self.wrapped = wrapped

    def buildProtocol(self, addr):
        """Admit the connection into the session table and build its protocol."""
        session = self.tracker.admit(addr, self.listener)
        proto = self.wrapped.buildProtocol(addr)
        proto.session = session
        session.leg = proto
        return proto
