"""The values message filters exchange with the gateway, and the registry of filter plugins.

A message filter (`mailguard.interfaces.IMessageFilter`) answers with a
`Verdict`; with ``accept`` it may carry modifications (`AddHeader`,
`InsertHeader`, `ChangeHeader`, `ReplaceBody`, `AddRecipient`,
`DeleteRecipient`).  It learns about the client from `SessionFacts`.  A
``[filter NAME]`` policy section becomes a `FilterConfig`.

Nothing here imports the reactor; the filter plugins themselves are
imported only when a policy names one (`registry`).
"""

import re
from dataclasses import dataclass, field
from types import MappingProxyType


# -- verdicts ---------------------------------------------------------------------

CONTINUE = "continue"
ACCEPT = "accept"
REJECT = "reject"
TEMPFAIL = "tempfail"
DISCARD = "discard"
QUARANTINE = "quarantine"
DROP = "drop"
RESET = "reset"

#: What an envelope step (MAIL, RCPT) may answer.
ENVELOPE_ACTIONS = frozenset({CONTINUE, REJECT, TEMPFAIL, DROP, RESET})
#: What the end of a message may answer.
MESSAGE_ACTIONS = frozenset({ACCEPT, REJECT, TEMPFAIL, DISCARD, QUARANTINE, DROP, RESET})

_DEFAULT_REPLIES = {
    REJECT: b"550 5.7.1 Rejected by filter\r\n",
    TEMPFAIL: b"451 4.7.1 Temporarily refused by filter, try again later\r\n",
}

_REPLY = re.compile(rb"[2-5][0-9][0-9]([ -][\x20-\x7e]*)?\r\n")


def check_reply(data):
    """Return ``data`` if it is one or more well-formed SMTP reply lines; ``ValueError`` otherwise."""
    lines = data.split(b"\r\n")[:-1]
    if not lines or not data.endswith(b"\r\n"):
        raise ValueError("a reply must end with CRLF: %r" % data[:80])
    codes = set()
    for i, line in enumerate(lines):
        if _REPLY.fullmatch(line + b"\r\n") is None:
            raise ValueError("not an SMTP reply line: %r" % line[:80])
        codes.add(line[:3])
        last = i == len(lines) - 1
        if len(line) > 3 and (line[3:4] == b"-") == last:
            raise ValueError("bad continuation in reply: %r" % line[:80])
    if len(codes) != 1:
        raise ValueError("reply lines with different codes: %r" % data[:80])
    return data


@dataclass(frozen=True, slots=True)
class AddHeader:
    """Append the header field ``name: value`` to the header block (``value`` with its leading space)."""

    name: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class InsertHeader:
    """Insert ``name: value`` before the header field at ``index`` (0: at the top)."""

    index: int
    name: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    """Replace the ``index``-th (1-based) field called ``name``; ``value`` None deletes it."""

    name: bytes
    index: int
    value: bytes | None


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    """Replace the whole body with ``data`` (CRLF line ends)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class AddRecipient:
    """Deliver to ``address`` too (``parameters`` as on a RCPT line, may be empty)."""

    address: bytes
    parameters: bytes = b""


@dataclass(frozen=True, slots=True)
class DeleteRecipient:
    """Do not deliver to ``address`` (compared without regard to case)."""

    address: bytes


MODIFICATIONS = (AddHeader, InsertHeader, ChangeHeader, ReplaceBody, AddRecipient, DeleteRecipient)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A filter's answer: an action, the reply the client gets, and (accept only) modifications.

    ``reply`` is whole SMTP reply lines (CRLF-terminated), or None for the
    action's default.  ``reason`` is for the log (never message content).
    """

    action: str
    reply: bytes | None = None
    modifications: tuple = ()
    reason: str = ""

    def __post_init__(self):
        if self.action not in ENVELOPE_ACTIONS | MESSAGE_ACTIONS:
            raise ValueError("unknown verdict action %r" % (self.action,))
        if self.reply is not None:
            check_reply(self.reply)
            code = self.reply[:1]
            if (self.action == REJECT and code != b"5") or (self.action == TEMPFAIL and code != b"4"):
                raise ValueError("a %s reply must be %sxx" % (self.action, "5" if self.action == REJECT else "4"))
        if self.modifications and self.action != ACCEPT:
            raise ValueError("only accept carries modifications")
        for m in self.modifications:
            if not isinstance(m, MODIFICATIONS):
                raise ValueError("not a modification: %r" % (m,))

    def client_reply(self):
        """The reply the client gets for a reject or tempfail."""
        return self.reply if self.reply is not None else _DEFAULT_REPLIES.get(self.action)

    @property
    def final(self):
        """True when this answer ends the filtering (not continue / accept)."""
        return self.action not in (CONTINUE, ACCEPT)


Verdict.CONTINUE = Verdict(CONTINUE)
Verdict.ACCEPT = Verdict(ACCEPT)


def reject(reply=None, reason=""):
    """A reject verdict (``5xx`` reply)."""
    return Verdict(REJECT, reply, reason=reason)


def tempfail(reply=None, reason=""):
    """A tempfail verdict (``4xx`` reply)."""
    return Verdict(TEMPFAIL, reply, reason=reason)


# -- what a filter knows of the session ---------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """The client session as the gateway knows it when a filter is asked.

    ``client`` is the real client's ``(host, port)`` (after PROXY; the same
    address the gateway sends with XCLIENT), or None on a UNIX socket;
    ``helo`` the HELO/EHLO name (bytes, or None before it); ``client_tls``
    and ``server_tls`` whether each leg is encrypted, with the client leg's
    protocol and cipher names when known; ``auth`` the identity the server
    accepted with AUTH (bytes), or None.  ``session`` is the gateway's
    session id, ``listener`` and ``rule`` the policy names.
    """

    client: tuple | None = None
    helo: bytes | None = None
    client_tls: bool = False
    server_tls: bool = False
    tls_version: str | None = None
    cipher: str | None = None
    auth: bytes | None = None
    session: str = ""
    listener: str = ""
    rule: str = ""


# -- a [filter NAME] section ------------------------------------------------------------

#: The verdicts ``default-action`` may name (a filter down, too slow or broken).
DEFAULT_ACTIONS = ("tempfail", "accept", "reject")


@dataclass(frozen=True, slots=True)
class FilterConfig:
    """One filter of a rule: its section name, the plugin's name, timeout, default action, keys.

    ``factory`` is the plugin's `IMessageFilterFactory` (not compared);
    ``options`` the plugin's own keys, parsed by it.
    """

    name: str
    plugin: str
    timeout: float = 30.0
    default_action: str = "tempfail"
    options: object = field(default_factory=lambda: MappingProxyType({}))
    factory: object = field(default=None, compare=False, repr=False)


def default_verdict(config, why):
    """The `Verdict` of ``config.default_action`` when the filter could not answer (``why``)."""
    action = config.default_action
    if action == "accept":
        return Verdict(ACCEPT, reason=why)
    if action == "reject":
        return Verdict(REJECT, b"550 5.7.1 Message refused: filter %s unavailable\r\n" % config.name.encode(), reason=why)
    return Verdict(TEMPFAIL, b"451 4.7.1 Filter %s unavailable, try again later\r\n" % config.name.encode(), reason=why)


def chain_of(rule):
    """A rule's filters in the order they run: content rules, milters, then plugin filters.

    Content rules with dialogue criteria only (commands, replies, EHLO) are
    not a filter: the SMTP core applies them, and nothing is spooled.
    """
    matches = tuple(c for c in getattr(rule, "matches", ()) if c.options.get("filtering", True))
    return matches + tuple(getattr(rule, "milters", ())) + tuple(rule.filters)


# -- the registry of filter plugins -------------------------------------------------------

def load_registry(packages=None):
    """Discover every installed `IMessageFilterFactory`; return a read-only mapping by name."""
    from mailguard.inspectors import discover
    from mailguard.interfaces import IMessageFilterFactory

    return discover(IMessageFilterFactory, packages, "filter", "filter")


_registry = None


def registry():
    """The installed filter factories by name, discovered on first use."""
    global _registry
    if _registry is None:
        _registry = load_registry()
    return _registry
