"""Events produced by the sans-IO inspectors.

An inspector turns bytes from either peer into a list of these small frozen
values; the Twisted shell (`mailguard.relay`) carries them out in order.
Nothing here knows about sockets or clocks.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ToServer:
    """Send these bytes to the backend."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ToClient:
    """Send these bytes to the client."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Greeted:
    """The backend's greeting reached the client: the session is now open."""


@dataclass(frozen=True, slots=True)
class Alert:
    """A policy violation worth telling the operator about.

    ``tag`` is the IOS-style tag (``SMTP_INVALID_COMMAND``, ...), ``text`` the
    human-readable detail; ``fields`` carries the same facts for structured
    log observers.  Never holds message data or AUTH payloads.
    """

    tag: str
    text: str
    fields: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True, slots=True)
class Trace:
    """A debug trace point (one command or reply), for ``--debug smtp``."""

    direction: str
    verb: str
    length: int
    state: str
    code: int = 0


@dataclass(frozen=True, slots=True)
class MessageSent:
    """A whole message went to the backend (its end of data or BDAT LAST); ``size`` as SIZE counts it."""

    size: int


@dataclass(frozen=True, slots=True)
class AbortServer:
    """Drop the backend leg now, without a clean end of message.

    Used when a message must never complete at the backend (size exceeded,
    bare newline refused, client gone mid-message).  The client leg stays
    up so the gateway can still answer it.
    """

    reason: str


@dataclass(frozen=True, slots=True)
class Close:
    """Close both legs once everything queued before this event is written.

    With ``reset`` the client connection is reset (TCP RST) instead, and
    nothing more is written to it.
    """

    reason: str
    reset: bool = False


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Start TLS on one leg (``"client"`` or ``"server"``) after what was written so far."""

    side: str


@dataclass(frozen=True, slots=True)
class Passthrough:
    """From now on the session is relayed blindly (TLS passthrough): inspection ends."""


# -- message filters (see mailguard.filtering) ---------------------------------------


@dataclass(frozen=True, slots=True)
class PauseClient:
    """Stop reading the client until `ResumeClient`: the inspector waits for a filter's verdict."""


@dataclass(frozen=True, slots=True)
class ResumeClient:
    """Read the client again."""


@dataclass(frozen=True, slots=True)
class FilterEnvelope:
    """Ask the rule's filters about ``MAIL`` or ``RCPT`` before it is forwarded.

    ``command`` is ``b"MAIL"`` or ``b"RCPT"``; ``address`` the path without
    its angle brackets; ``parameters`` the rest of the line.  The shell
    answers with the inspector's ``envelope_verdict``.
    """

    command: bytes
    address: bytes
    parameters: bytes


@dataclass(frozen=True, slots=True)
class FilterReply:
    """The server answered a filtered ``MAIL`` or ``RCPT`` (a notification for the filters)."""

    command: bytes
    code: int
    text: bytes


@dataclass(frozen=True, slots=True)
class FilterAbort:
    """The filtered transaction ended without a message verdict (RSET, HELO, a new MAIL...)."""


@dataclass(frozen=True, slots=True)
class ToSpool:
    """Message octets for the spool (DATA: the wire form, dot-stuffed, ``stuffed`` true; BDAT: as sent)."""

    data: bytes
    stuffed: bool


@dataclass(frozen=True, slots=True)
class MessageSpooled:
    """The message is whole in the spool: run the filters, then call ``message_verdict``.

    ``size`` is its size as SIZE counts it; ``stuffed`` is true for DATA
    (the spool holds the dot-stuffed wire form).
    """

    size: int
    stuffed: bool


@dataclass(frozen=True, slots=True)
class DropSpool:
    """The spooled message will never be delivered (refused before its verdict): remove it."""


@dataclass(frozen=True, slots=True)
class SendSpool:
    """Stream the spooled message to the server now, then ``trailer`` (``.CRLF`` for DATA)."""

    trailer: bytes


#: The events the shell hands to the session's filter driver (`mailguard.filtering.FilterSession`).
FILTER_EVENTS = frozenset({FilterEnvelope, FilterReply, FilterAbort, ToSpool, MessageSpooled, DropSpool, SendSpool})
#: What became of a message (`MessageDone.outcome`): a small fixed set.
DELIVERED = "delivered"  # the server accepted it (2xx)
REFUSED_BY_SERVER = "refused-by-server"  # the server refused it for good (5xx)
TEMPFAILED = "tempfailed"  # the client was told to try again (4xx, from the server or the gateway)
REJECTED = "rejected"  # the gateway refused it (max-data, bare newline, a filter)
DISCARDED = "discarded"  # accepted from the client, never sent on (a filter)
QUARANTINED = "quarantined"  # kept aside by the gateway (a filter)
DROPPED = "dropped"  # abandoned mid-transfer: nobody was told it was delivered

OUTCOMES = frozenset((DELIVERED, REFUSED_BY_SERVER, TEMPFAILED, REJECTED, DISCARDED, QUARANTINED, DROPPED))


def outcome_of(code):
    """The outcome a server's reply code to an end of data means: 2xx, 4xx, anything else."""
    if 200 <= code < 300:
        return DELIVERED
    if 400 <= code < 500:
        return TEMPFAILED
    return REFUSED_BY_SERVER


@dataclass(frozen=True, slots=True)
class MessageDone:
    """A message's fate is known: one ``MESSAGE`` line in the log.

    ``sender`` is the reverse-path as the client gave it (``b"<a@example.org>"``,
    ``b"<>"``), ``recipients`` how many the server accepted, ``size`` the
    message's size as SIZE counts it, ``outcome`` one of `OUTCOMES`, and
    ``reply`` the reply the client got (the server's, holding its queue id,
    or the gateway's own; ``b""`` when nobody was answered).  Never holds
    message data.
    """

    sender: bytes
    recipients: int
    size: int
    outcome: str
    reply: bytes = b""

    def __post_init__(self):
        if self.outcome not in OUTCOMES:
            raise ValueError("unknown message outcome %r (expected one of %s)" % (self.outcome, sorted(OUTCOMES)))
