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
    """Close both legs once everything queued before this event is written."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reset:
    """Reset the client connection now (TCP RST), and drop the backend leg; nothing more is written."""

    reason: str


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Start TLS on one leg (``"client"`` or ``"server"``) after what was written so far."""

    side: str


@dataclass(frozen=True, slots=True)
class Passthrough:
    """From now on the session is relayed blindly (TLS passthrough): inspection ends."""
