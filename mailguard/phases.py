"""The phases of an inspected session: one definition for every protocol.

An inspector's ``phase`` is one of these names (the session table and
``mailguard status`` show it).  They are plain strings, compared by
identity inside the inspectors.  Nothing here imports Twisted.
"""

#: Waiting for the server's greeting (the client may not talk yet).
GREETING = "GREETING"
#: Commands and replies flow, each command inspected.
COMMAND = "COMMAND"
#: SMTP message data after DATA's 354.
DATA = "DATA"
#: SMTP BDAT chunk octets.
CHUNK = "CHUNK"
#: Waiting for a reply before the client may go on (SMTP).
WAIT = "WAIT"
#: Inspection ended (TLS passthrough): bytes are relayed blindly.
PASSTHROUGH = "PASSTHROUGH"
#: The session is over; nothing more is inspected.
CLOSED = "CLOSED"


class PhaseError(Exception):
    """An inspector asked for a transition its table does not have (a bug, never the peer's fault)."""


class PhaseTable:
    """The phases of one protocol and the events that move between them, as one literal table.

    ``transitions`` maps each phase to ``{event: next phase}``; `next`
    looks an event up and refuses one the table does not list.
    """

    __slots__ = ("transitions",)

    def __init__(self, transitions):
        self.transitions = transitions

    def next(self, phase, event):
        """The phase after ``event`` in ``phase``; `PhaseError` if the table has no such transition."""
        try:
            return self.transitions[phase][event]
        except KeyError:
            raise PhaseError("no transition from %s on %r" % (phase, event)) from None
