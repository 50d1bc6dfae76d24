"""The IMAP inspection state machine (sans-IO): RFC 9051 commands, tags and literals.

`IMAPInspector` is fed the client's and the server's bytes and returns the
events to carry out (`mailguard.events`).  Both directions are split by a
`Framer` into line fragments and literal octets: a fragment ending in
``{n}``, ``{n+}`` (or ``~{n}``, ``~{n+}``) announces ``n`` octets that are
data, whatever they look like, and the command (or response) goes on after
them.  Literal octets are counted as they pass, never held.

Client side, per command::

    tag SP verb ...  --not in COMMANDS--> "tag BAD" from the gateway; the rest of the
                     |                    command (its {n+} octets too) is dropped
                     --allowed--> forwarded, fragment by fragment:
                        ... {n}   wait for the server: "+" -> n octets, or a tagged reply -> done
                        ... {n+}  n octets follow at once (only if the server has LITERAL+,
                                  or LITERAL-/IMAP4rev2 and n <= 4096)
                        AUTHENTICATE  wait: "+" -> one SASL line -> wait ... tagged reply -> done
                        IDLE          wait: "+" -> DONE -> tagged reply

Every forwarded command and every reply the gateway writes itself has an
entry in one pending queue; the gateway's replies reach the client only
after the server has completed every command sent before them, so
pipelined replies keep their order.  Untagged responses and continuation
requests are relayed at once.

STARTTLS follows the rule's ``tls`` key, as for esmtp:

- ``strip``: the gateway answers ``tag NO`` itself and removes STARTTLS
  from every capability list; the server never sees it.
- ``terminate``: the gateway answers ``tag OK`` and starts TLS on the
  client leg itself (`StartTLS` ``"client"``), and advertises STARTTLS
  until then.  It secures its own leg first: after the server's greeting
  it sends its own STARTTLS (unless the greeting's capabilities lack it)
  and relays the greeting, without its now stale ``[CAPABILITY]`` code,
  once that leg is TLS (``backend-tls``: ``opportunistic`` goes on in
  plaintext when the server refuses, ``required`` closes, ``off`` sends
  nothing).
- ``passthrough``: STARTTLS is forwarded; the server's ``tag OK`` ends
  inspection (`Passthrough`, alert ``TLS_PASSTHROUGH``).

Injection (RFC 2595 section 3.1, RFC 9051 section 11.1) is refused both
ways: a client that sends anything after STARTTLS before the handshake is
closed, and so is a server that sends anything after its ``OK`` to
STARTTLS; those bytes are never relayed.  After STARTTLS nothing learned
before survives: the literal limit is forgotten until the client asks for
the capabilities again.  STARTTLS is allowed only before login.

``secure-login = on`` refuses LOGIN and AUTHENTICATE (``tag NO
[PRIVACYREQUIRED]``) before the client leg is encrypted (STARTTLS, or an
implicit-TLS ``ssl:`` listener), and until then advertises LOGINDISABLED
without AUTH= mechanisms.  Nothing here imports Twisted.
"""

import collections
import re
from dataclasses import dataclass

from zope.interface import implementer

from mailguard.commands import printable_verb
from mailguard.events import AbortServer, Close, Greeted, Passthrough, StartTLS, ToClient, ToServer
from mailguard.interfaces import IInspector
from mailguard.ordering import MAX_PENDING, OrderedReplies

GREETING = "GREETING"
COMMAND = "COMMAND"
PASSTHROUGH = "PASSTHROUGH"
CLOSED = "CLOSED"

#: Longest line fragment (a command, a response), line end included.
LINE_LIMIT = 8192
#: Longest SASL response line, line end included.
SASL_LIMIT = 12288
#: Client bytes held while the gateway waits for the server's continuation.
HOLD_LIMIT = 65536
#: Largest non-synchronizing literal under LITERAL- and IMAP4rev2 (RFC 7888).
LITERAL_MINUS_LIMIT = 4096

#: The allowlist: RFC 9051 section 6, plus CHECK and LSUB of IMAP4rev1 (RFC 3501).
COMMANDS = frozenset(
    b"CAPABILITY NOOP LOGOUT STARTTLS AUTHENTICATE LOGIN ENABLE SELECT EXAMINE NAMESPACE "
    b"CREATE DELETE RENAME SUBSCRIBE UNSUBSCRIBE LIST STATUS APPEND IDLE CLOSE UNSELECT "
    b"EXPUNGE SEARCH FETCH STORE COPY MOVE UID CHECK LSUB".split()
)
#: What may follow UID (RFC 9051 section 6.4.9).
UID_COMMANDS = frozenset(b"COPY MOVE FETCH SEARCH STORE EXPUNGE".split())
_LOGIN = frozenset((b"LOGIN", b"AUTHENTICATE"))

#: Every reply the IMAP inspector writes itself (``%s`` is the command's tag).
REPLIES = {
    "not_allowed": b"%s BAD Command not allowed\r\n",
    "bad_command": b"%s BAD Invalid command\r\n",
    "no_tag": b"* BAD Invalid or missing tag\r\n",
    "line_too_long": b"%s BAD Line too long\r\n",
    "literal_plus": b"%s BAD Non-synchronizing literal not supported by the server\r\n",
    "tls_not_available": b"%s NO TLS not available\r\n",
    "tls_ready": b"%s OK Begin TLS negotiation now\r\n",
    "tls_active": b"%s BAD TLS already active\r\n",
    "tls_after_login": b"%s BAD STARTTLS not allowed after login\r\n",
    "starttls_injection": b"* BYE Protocol error: data sent after STARTTLS, closing connection\r\n",
    "starttls_sync": b"* BYE Protocol error: STARTTLS while commands are in progress, closing connection\r\n",
    "backend_injection": b"* BYE [UNAVAILABLE] Mail server sent data after STARTTLS, closing connection\r\n",
    "backend_tls_missing":
        b"* BYE [UNAVAILABLE] TLS required but not offered by the mail server, closing connection\r\n",
    "backend_tls_failed": b"* BYE [UNAVAILABLE] TLS to the mail server failed, closing connection\r\n",
    "secure_login": b"%s NO [PRIVACYREQUIRED] Login refused before TLS (secure-login)\r\n",
    "too_many_errors": b"* BYE Too many errors, closing connection\r\n",
    "pregreet": b"* BYE Protocol error: data sent before greeting\r\n",
    "sync": b"* BYE Protocol error: data sent before the server's continuation\r\n",
    "broken_command": b"* BYE Protocol error in a command already forwarded, closing connection\r\n",
    "queue_overflow": b"* BYE Too many pipelined commands, closing connection\r\n",
    "invalid_response": b"* BYE Invalid response from the mail server, closing connection\r\n",
    "backend_lost": b"* BYE Connection to the mail server lost\r\n",
}

#: What a refused client gets instead of the server's greeting, by
#: `mailguard.interfaces.IInspectorFactory.refusalReply` reason.
REFUSALS = {
    "overload": b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n",
    "unreachable": b"* BYE [UNAVAILABLE] Mail server unreachable, closing connection\r\n",
}


def _reply(name, tag=b"*"):
    text = REPLIES[name]
    return text % tag if b"%s" in text else text


# -- framing ---------------------------------------------------------------------

LINE = "line"  # a whole fragment within the limit: (LINE, data, literal)
LONG = "long"  # the first LIMIT octets of a longer fragment: (LONG, data, None)
MORE = "more"  # more of it, no line end yet: (MORE, data, None)
END = "end"  # its last octets, line end included: (END, data, literal)
LITERAL = "literal"  # literal octets: (LITERAL, data, last)

_MARKER = re.compile(rb"~?\{([0-9]{1,20})(\+?)\}\r?\n\Z")
_TAIL = 32


def literal_marker(fragment):
    """The literal a fragment announces at its end: ``(octets, synchronizing)``, or None."""
    m = _MARKER.search(fragment)
    if m is None:
        return None
    return int(m.group(1)), not m.group(2)


class Framer:
    """Split one direction of an IMAP stream into line fragments and literal octets.

    `push` adds bytes as they arrive; `pop` returns the next item (see the
    kinds above) or None when more bytes are needed.  A fragment ends at LF.
    Literal octets are counted only after `start_literal`: the consumer
    decides, because a synchronizing literal of a refused command is never
    sent.  Whatever the input, no more than ``limit`` octets of a fragment
    are kept; what `pop` has not returned yet is `buffered`.
    """

    def __init__(self, limit):
        self.limit = limit
        self._buf = bytearray()
        self._pos = 0
        self._literal = 0
        self._long = False
        self._tail = b""

    def push(self, data):
        """Add bytes received from the peer."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self):
        """Octets pushed but not yet returned by `pop`."""
        return len(self._buf) - self._pos

    @property
    def in_literal(self):
        """True while literal octets are still expected."""
        return self._literal > 0

    def start_literal(self, octets):
        """The next ``octets`` octets are literal data, whatever they contain."""
        self._literal = octets

    def pop(self):
        """Return the next item, or None."""
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if self._literal:
            if not avail:
                return None
            n = min(avail, self._literal)
            self._literal -= n
            self._pos = pos + n
            return (LITERAL, bytes(buf[pos : pos + n]), self._literal == 0)
        end = buf.find(b"\n", pos)
        if self._long:
            if end < 0:
                if not avail:
                    return None
                chunk = bytes(buf[pos:])
                self._pos = len(buf)
                self._tail = (self._tail + chunk)[-_TAIL:]
                return (MORE, chunk, None)
            chunk = bytes(buf[pos : end + 1])
            self._pos = end + 1
            tail, self._tail, self._long = (self._tail + chunk)[-_TAIL:], b"", False
            return (END, chunk, literal_marker(tail))
        if end < 0:
            if avail < self.limit:
                return None
        elif end + 1 - pos <= self.limit:
            line = bytes(buf[pos : end + 1])
            self._pos = end + 1
            return (LINE, line, literal_marker(line))
        head = bytes(buf[pos : pos + self.limit])
        self._pos = pos + self.limit
        self._long = True
        self._tail = head[-_TAIL:]
        return (LONG, head, None)


def _text(fragment):
    """A fragment without its line end."""
    if fragment.endswith(b"\r\n"):
        return fragment[:-2]
    if fragment.endswith(b"\n"):
        return fragment[:-1]
    return fragment


_TAG_CHARS = bytes(c for c in range(0x21, 0x7F) if c not in b'(){%*"\\+')
_TAG = re.compile(rb"[" + re.escape(_TAG_CHARS) + rb"]+")
_COMMAND = re.compile(
    rb"([" + re.escape(_TAG_CHARS) + rb"]+) ([A-Za-z][A-Za-z0-9-]*)(?: ([A-Za-z][A-Za-z0-9-]*))?"
)
_TAGGED = re.compile(rb"([" + re.escape(_TAG_CHARS) + rb"]+) (OK|NO|BAD)(?:[ \r\n]|\Z)", re.I)
_STATUS = re.compile(rb"\* (OK|NO|BAD|BYE|PREAUTH)(?:[ \r\n]|\Z)", re.I)
_CAPABILITY = re.compile(rb"\* CAPABILITY(?= |\r?\n|\Z)", re.I)
_CAPABILITY_CODE = re.compile(rb"\[CAPABILITY ([^\]\r\n]*)\]", re.I)
_CAPABILITY_CODE_SP = re.compile(rb"\[CAPABILITY [^\]\r\n]*\] ?", re.I)
_SASL_RESPONSE = re.compile(rb"(?:[A-Za-z0-9+/]*={0,2}|\*)\Z")


# -- the inspector ---------------------------------------------------------------

# What the client is waiting for from the server (client input is held meanwhile).
_AWAIT_LITERAL = "literal"
_AWAIT_SASL = "sasl"
_AWAIT_IDLE = "idle"
_AWAIT_TLS = "tls"  # a forwarded STARTTLS (tls = passthrough)

#: The tag of the gateway's own STARTTLS on the backend leg (before any client command).
_GW_TAG = b"mg0"


@dataclass(slots=True)
class _Pending:
    """One completion the client is owed: a forwarded command, or the gateway's own reply."""

    tag: bytes
    verb: bytes = b""
    local: bytes = None


@dataclass(slots=True)
class _Command:
    """The client command whose fragments are still arriving."""

    tag: bytes
    verb: bytes
    forward: bool  # forwarded to the server, or dropped after the gateway's reply
    sent: bool = False  # some of it has reached the server
    entry: _Pending = None  # its place in the pending queue, once forwarded


@implementer(IInspector)
class IMAPInspector(OrderedReplies):
    """Inspect one IMAP session under a `mailguard.policy.Rule`."""

    #: Set by the shell (`mailguard.interfaces.IInspector`); unused by this protocol.
    trace = False
    xclient = False
    peer = None

    def __init__(self, rule):
        self.rule = rule
        options = getattr(rule, "options", None) or {}
        self.secure_login = bool(options.get("secure-login", False))
        #: strip, terminate or passthrough (the rule's ``tls`` key).
        self.tls = getattr(rule, "tls", "strip")
        self.client_tls = False
        self.server_tls = False
        self._greeting = None  # held while the gateway secures the backend leg
        self._setup = False  # the gateway's own STARTTLS is awaiting its completion
        self._server_tls_pending = False
        self._authenticated = False  # STARTTLS is allowed only before login
        self.phase = GREETING
        self.commands = 0
        self.verbs = collections.Counter()
        self.bad_commands = 0
        self._client = Framer(LINE_LIMIT)
        self._server = Framer(LINE_LIMIT)
        self._held = b""
        self._pending = collections.deque()
        self._cmd = None  # the client command in progress across fragments
        self._await = None  # _AWAIT_* while the client must wait for the server
        self._await_octets = 0
        self._await_entry = None
        self._sasl = False  # the next client line is a SASL response
        self._idle = False  # IDLE accepted: the next client line must be DONE
        self._resp = None  # "relay" while a server response continues after a literal
        self._literal_plus = 0  # largest non-synchronizing literal the server takes
        self._bye = False
        self._ev = []

    def _local_entry(self, data):
        return _Pending(b"", local=data)

    def _held_limit(self):
        return LINE_LIMIT

    # -- the IInspector interface -------------------------------------------

    def server_connected(self):
        """The backend is up; its greeting is awaited."""
        return []

    def client_data(self, data):
        """Inspect bytes from the client; return the events to carry out."""
        ev = self._ev = []
        if self.phase is CLOSED:
            return ev
        if self.phase is PASSTHROUGH:
            ev.append(ToServer(data))
            return ev
        if self.phase is GREETING:
            self._pregreet(data)
            return ev
        self._client.push(data)
        self._drain()
        return ev

    def server_data(self, data):
        """Inspect bytes from the server; return the events to carry out."""
        ev = self._ev = []
        if self.phase is CLOSED:
            return ev
        if self.phase is PASSTHROUGH:
            ev.append(ToClient(data))
            return ev
        framer = self._server
        framer.push(data)
        while self.phase is not CLOSED and self.phase is not PASSTHROUGH:
            item = framer.pop()
            if item is None:
                break
            self._server_item(*item)
        return ev

    def server_lost(self):
        """The backend closed: tell the client, unless the server already said BYE."""
        ev = self._ev = []
        if self.phase is CLOSED:
            return ev
        if self._greeting is not None or self._server_tls_pending:
            # Still securing the backend leg: the client has no greeting yet.
            self._close("backend_tls_failed", "backend TLS failed")
            return ev
        if (self.phase is PASSTHROUGH or self.phase is GREETING or self._bye or self._resp is not None
                or self._server.in_literal):
            ev.append(Close("server closed"))
        else:
            self._close("backend_lost", "backend lost")
        self.phase = CLOSED
        return ev

    def client_lost(self):
        """The client closed; a half-sent command must never complete at the server."""
        ev = self._ev = []
        if self.in_message():
            ev.append(AbortServer("client lost mid-command"))
        self.phase = CLOSED
        return ev

    def in_message(self):
        """True while part of a command (e.g. an APPEND literal) has reached the server."""
        return self._cmd is not None and self._cmd.sent

    def timeout_reply(self, reason):
        """The protocol's own goodbye to the client; the server is simply closed."""
        if self.phase is PASSTHROUGH:
            return b"", b""  # both legs speak TLS the gateway cannot write into
        text = b"Idle timeout" if reason == "idle_timeout" else b"Connection set-up timeout"
        return b"* BYE %s, closing connection\r\n" % text, b""

    def client_tls_ready(self):
        """The client leg is TLS (an implicit-TLS listener, or STARTTLS done): logins are allowed."""
        self.client_tls = True
        return []

    def server_tls_ready(self):
        """The gateway's own TLS handshake with the server is done: greet the client."""
        ev = self._ev = []
        self._server_tls_pending = False
        self.server_tls = True
        if self._greeting is not None and self.phase is GREETING:
            # Capabilities announced before TLS are stale (RFC 9051 section 6.2.1):
            # the client asks again.
            greeting, self._greeting = _CAPABILITY_CODE_SP.sub(b"", self._greeting, count=1), None
            self._literal_plus = 0
            self._open(greeting)
        return ev

    # -- helpers ------------------------------------------------------------------

    def _close(self, reply_name, reason, abort=False):
        if abort or self.in_message():
            # Bytes of an unfinished command are at the server: it must
            # never see the rest, nor an end.
            self._ev.append(AbortServer(reason))
        if reply_name is not None:
            self._ev.append(ToClient(_reply(reply_name)))
        self._ev.append(Close(reason))
        self.phase = CLOSED
        self._cmd = None

    def _send(self, data):
        self._ev.append(ToServer(data))
        if self._cmd is not None:
            self._cmd.sent = True

    # -- client ---------------------------------------------------------------------

    def _drain(self):
        """Inspect what the client sent, unless it must wait for the server first."""
        framer = self._client
        while self.phase is COMMAND and self._await is None:
            item = framer.pop()
            if item is None:
                break
            self._client_item(*item)
        if self.phase is COMMAND and framer.buffered > HOLD_LIMIT:
            self._alert("IMAP_SYNC_ERROR", "client sent %d bytes before the server's continuation" % framer.buffered)
            self._close("sync", "client did not wait for a continuation")

    def _client_item(self, kind, data, extra):
        cmd = self._cmd
        if kind is LITERAL:
            if cmd.forward:
                self._send(data)
            return
        if cmd is None:
            if self._sasl:
                self._sasl_line(kind, data)
                return
            if self._idle:
                if kind is LINE and _text(data).upper() == b"DONE":
                    self._idle = False
                    self._ev.append(ToServer(b"DONE\r\n"))
                    return
                # Anything but DONE ends the IDLE (RFC 2177 lets the server
                # refuse it); the gateway ends it cleanly and goes on.
                self._idle = False
                self._alert("IMAP_INVALID_COMMAND", "Invalid IMAP command during IDLE: expected DONE", verb="IDLE")
                self._ev.append(ToServer(b"DONE\r\n"))
            self._command_start(kind, data, extra)
            return
        # A fragment continuing the command after a literal.
        if kind is LONG or kind is MORE:
            if cmd.forward:
                self._alert("IMAP_INVALID_COMMAND", "Invalid IMAP command (%s): line too long" % cmd.verb.decode(),
                            verb=cmd.verb.decode())
                self._close("broken_command", "line too long in a forwarded command")
            return
        text = _text(data)
        if cmd.forward:
            if b"\0" in text or b"\r" in text:
                self._alert("IMAP_INVALID_COMMAND", "Invalid IMAP command (%s): NUL or bare CR" % cmd.verb.decode(),
                            verb=cmd.verb.decode())
                self._close("broken_command", "NUL or CR in a forwarded command")
                return
        self._fragment_end(text, extra, kind is END)

    def _command_start(self, kind, data, literal):
        self.commands += 1
        if kind is not LINE:
            # Too long to inspect: refuse it (by its tag, if that much is there).
            m = _COMMAND.match(data)
            tag = m.group(1) if m else None
            self._cmd = _Command(tag or b"*", b"", forward=False)
            self._refuse(tag, "line_too_long", b"", "line too long")
            return
        text = _text(data)
        m = _COMMAND.match(text)
        if m is None:
            tag = text.split(b" ", 1)[0]
            self._cmd = _Command(b"*", b"", forward=False)
            if text and _TAG.fullmatch(tag):
                self._refuse(tag, "bad_command", b"", "malformed command")
            else:
                self._refuse(None, "no_tag", b"", "missing or invalid tag")
            if self.phase is not CLOSED:
                self._fragment_end(text, literal, False)
            return
        tag, verb, sub = m.group(1), m.group(2).upper(), m.group(3)
        rest_ok = m.end() == len(text) or text[m.end() : m.end() + 1] == b" "
        name = verb
        self._cmd = _Command(tag, verb, forward=False)
        if verb == b"UID":
            sub = sub.upper() if sub else b""
            name = b"UID " + sub
            verb_ok = sub in UID_COMMANDS
        else:
            verb_ok = verb in COMMANDS
            if sub is not None:
                # The second word was an argument: only the verb is checked.
                rest_ok = True
        if not verb_ok:
            self._refuse(tag, "not_allowed", name, "not allowed")
        elif not rest_ok or b"\0" in text or b"\r" in text:
            self._refuse(tag, "bad_command", name, "invalid characters")
        elif verb == b"STARTTLS":
            if sub is not None or m.end() != len(text) or literal is not None:
                self._refuse(tag, "bad_command", name, "STARTTLS takes no argument")
            else:
                self.verbs[name] += 1
                self._starttls(tag)
        elif verb in _LOGIN and self.secure_login and not self.client_tls:
            self._refuse(tag, "secure_login", name, "login before TLS (secure-login)")
        elif literal is not None and not literal[1] and not self._literal_ok(literal[0]):
            self._refuse(tag, "literal_plus", name, "non-synchronizing literal the server did not advertise")
        elif len(self._pending) >= MAX_PENDING:
            self._close("queue_overflow", "pending queue overflow")
            return
        else:
            self.verbs[name] += 1
            self._cmd.forward = True
            self._cmd.verb = name
            self._cmd.entry = _Pending(tag, name)
            self._pending.append(self._cmd.entry)
        if self.phase is CLOSED:
            return
        self._fragment_end(text, literal, False)

    def _fragment_end(self, text, literal, long_line):
        """The end of one fragment of the current command: forward it, then see what follows."""
        cmd = self._cmd
        if cmd.forward:
            if literal is not None and not literal[1] and not self._literal_ok(literal[0]):
                self._alert("IMAP_INVALID_COMMAND",
                            "Invalid IMAP command (%s): non-synchronizing literal the server did not advertise"
                            % cmd.verb.decode(), verb=cmd.verb.decode())
                self._close("broken_command", "unsupported literal in a forwarded command")
                return
            self._send(text + b"\r\n")
        if literal is None:
            self._cmd = None
            if cmd.forward and cmd.verb == b"AUTHENTICATE":
                self._wait(_AWAIT_SASL, cmd.entry)
            elif cmd.forward and cmd.verb == b"IDLE":
                self._wait(_AWAIT_IDLE, cmd.entry)
            return
        octets, sync = literal
        if not sync:
            self._client.start_literal(octets)
        elif cmd.forward:
            self._wait(_AWAIT_LITERAL, cmd.entry, octets)
        else:
            # Refused before the server's "+": the client never sends it.
            self._cmd = None

    def _starttls(self, tag):
        """STARTTLS, as the rule's ``tls`` key says (see the module docstring)."""
        if self.tls == "strip":
            # The server never sees it, so nothing after it can be mistaken
            # for TLS-protected input.
            self._answer(_reply("tls_not_available", tag))
            return
        if self.client_tls:
            self._answer(_reply("tls_active", tag))
            return
        if self._authenticated:
            self._answer(_reply("tls_after_login", tag))  # not-authenticated state only
            return
        if self._client.buffered:
            # Bytes after STARTTLS would be taken as if they had come inside TLS.
            self._alert("STARTTLS_INJECTION", "client pipelined data after STARTTLS")
            self._close("starttls_injection", "STARTTLS injection")
            return
        if self._pending:
            self._alert("IMAP_SYNC_ERROR", "STARTTLS while commands are in progress")
            self._close("starttls_sync", "STARTTLS pipelined")
            return
        if self.tls == "passthrough":
            # Forwarded; the client's next bytes wait for the server's answer.
            entry = _Pending(tag, b"STARTTLS")
            self._pending.append(entry)
            self._ev.append(ToServer(tag + b" STARTTLS\r\n"))
            self._wait(_AWAIT_TLS, entry)
            return
        self._ev.append(ToClient(_reply("tls_ready", tag)))
        self._ev.append(StartTLS("client"))
        self.client_tls = True
        self._literal_plus = 0  # nothing learned before TLS survives it

    def _wait(self, what, entry, octets=0):
        """Hold the client's input until the server answers the command of ``entry``."""
        self._await = what
        self._await_entry = entry
        self._await_octets = octets

    def _literal_ok(self, octets):
        return octets <= self._literal_plus

    def _refuse(self, tag, reply_name, verb, why):
        """Refuse a command with the gateway's reply; close after too many."""
        self.bad_commands += 1
        name = printable_verb(verb) if verb else "<line>"
        self._alert("IMAP_INVALID_COMMAND", "Invalid IMAP command (%s): %s" % (name, why), verb=name)
        if self.bad_commands >= self.rule.max_bad_commands:
            self._close("too_many_errors", "too many errors")
            return
        self._answer(_reply(reply_name, tag or b"*"))

    def _sasl_line(self, kind, data):
        """One SASL response to a challenge (never logged); an invalid one cancels."""
        self._sasl = False
        self._client.limit = LINE_LIMIT
        text = _text(data)
        if kind is not LINE or _SASL_RESPONSE.match(text) is None:
            self._alert("IMAP_INVALID_COMMAND", "Invalid SASL response", verb="<sasl>")
            if kind is not LINE:
                self._close("broken_command", "SASL response too long", abort=True)
                return
            text = b"*"
        self._ev.append(ToServer(text + b"\r\n"))
        self._wait(_AWAIT_SASL, self._await_entry)

    # -- server -----------------------------------------------------------------------

    def _invalid_response(self, why):
        self._alert("IMAP_INVALID_RESPONSE", "invalid response from server: %s" % why)
        self._close("invalid_response", "invalid response", abort=True)

    def _server_item(self, kind, data, extra):
        if kind is LITERAL:
            self._ev.append(ToClient(data))
            return
        if self._resp is not None:
            # The rest of a response that carried a literal, or of a long line.
            self._ev.append(ToClient(data))
            if kind is LINE or kind is END:
                self._resp = None
                self._server_fragment_end(extra)
            return
        if kind is LONG:
            if data.startswith(b"* ") and not _STATUS.match(data) and not _CAPABILITY.match(data):
                # A long untagged response (SEARCH, FETCH, LIST...): streamed.
                self._ev.append(ToClient(data))
                self._resp = "relay"
                return
            self._invalid_response("response line too long")
            return
        self._response(data, extra)

    def _server_fragment_end(self, literal):
        if literal is not None:
            self._server.start_literal(literal[0])
            self._resp = "relay"

    def _response(self, line, literal):
        text = _text(line)
        if self.phase is GREETING:
            if self._setup:
                self._setup_response(text, literal)
                return
            m = _STATUS.match(text)
            if m is None or m.group(1).upper() not in (b"OK", b"PREAUTH", b"BYE"):
                self._invalid_response("invalid greeting")
                return
            status = m.group(1).upper()
            if status != b"BYE" and self._wants_tls():
                if status == b"PREAUTH":
                    # Already logged in: no STARTTLS is possible on this leg.
                    if self._backend_tls_missing("mail server greeted with PREAUTH"):
                        return
                elif literal is not None:
                    self._invalid_response("literal in the greeting")
                    return
                else:
                    self._secure_backend(line)
                    return
            if status == b"BYE":
                self._ev.append(ToClient(self._filter_codes(line)))
                self._bye = True
                return
            if status == b"PREAUTH":
                self._authenticated = True
            self._open(line)
            self._server_fragment_end(literal)
            return
        if text[:1] == b"+" and (len(text) == 1 or text[1:2] == b" "):
            self._continuation(line)
            return
        if text.startswith(b"* "):
            if _CAPABILITY.match(text):
                line = self._filter_capability(line)
            else:
                m = _STATUS.match(text)
                if m is not None:
                    line = self._filter_codes(line)
                    if m.group(1).upper() == b"BYE":
                        self._bye = True
            self._ev.append(ToClient(line))
            self._server_fragment_end(literal)
            return
        m = _TAGGED.match(text)
        if m is None:
            self._invalid_response("not a tagged, untagged or continuation response")
            return
        self._completed(m.group(1), self._filter_codes(line), literal)

    def _continuation(self, line):
        what = self._await
        if what is None or what is _AWAIT_TLS:
            self._invalid_response("unexpected continuation request")
            return
        self._ev.append(ToClient(line))
        self._await = None
        if what is _AWAIT_LITERAL:
            self._client.start_literal(self._await_octets)
        elif what is _AWAIT_SASL:
            self._sasl = True
            self._client.limit = SASL_LIMIT
        else:
            self._idle = True
        self._drain()

    def _completed(self, tag, line, literal):
        """A tagged completion: it ends its command, wherever that is in the queue."""
        pending = self._pending
        for i, entry in enumerate(pending):
            if entry.local is None and entry.tag == tag:
                del pending[i]
                break
        else:
            self._invalid_response("completion of a command never sent")
            return
        ok = _TAGGED.match(line).group(2).upper() == b"OK"
        if ok and entry.verb == b"STARTTLS":
            self._tls_passthrough(line)
            return
        if ok and entry.verb in _LOGIN:
            self._authenticated = True
        self._ev.append(ToClient(line))
        self._server_fragment_end(literal)
        if self._await is not None and self._await_entry is entry:
            # Refused before its literal (or the end of AUTHENTICATE/IDLE):
            # what the client sends next is a new command.
            if self._await is _AWAIT_LITERAL:
                self._cmd = None
            self._await = None
        if self._sasl and self._await_entry is entry:
            self._sasl = False
            self._client.limit = LINE_LIMIT
        if entry.verb == b"IDLE":
            self._idle = False
        self._flush_local()
        self._drain()

    def _tls_passthrough(self, line):
        """The server accepted a forwarded STARTTLS: relay blindly from now on."""
        if self._server.buffered:
            self._alert("STARTTLS_INJECTION", "server sent data after its OK to STARTTLS")
            self._close("backend_injection", "server STARTTLS injection")
            return
        if self._client.buffered:
            self._alert("STARTTLS_INJECTION", "client sent data before the server's OK to STARTTLS")
            self._close("starttls_injection", "STARTTLS injection")
            return
        self._ev.append(ToClient(line))
        self._alert("TLS_PASSTHROUGH", "TLS passthrough: session no longer inspected")
        self._ev.append(Passthrough())
        self.phase = PASSTHROUGH
        self._await = None

    # -- the gateway's own leg to the server (tls = terminate) -----------------------

    def _wants_tls(self):
        return self.tls == "terminate" and self.rule.backend_tls != "off" and not self.server_tls

    def _secure_backend(self, greeting):
        """Hold the greeting and send the gateway's own STARTTLS, unless the server lacks it."""
        m = _CAPABILITY_CODE.search(greeting)
        if m is not None and b"STARTTLS" not in m.group(1).upper().split():
            if self._backend_tls_missing("mail server does not offer STARTTLS"):
                return
            self._open(greeting)
            return
        self._greeting = greeting
        self._setup = True
        self._ev.append(ToServer(_GW_TAG + b" STARTTLS\r\n"))

    def _setup_response(self, text, literal):
        """A response to the gateway's own STARTTLS (never relayed)."""
        m = _TAGGED.match(text)
        if literal is not None:
            self._greeting = None
            self._invalid_response("literal while securing the backend leg")
            return
        if m is None:
            status = _STATUS.match(text)
            if text.startswith(b"* ") and (status is None or status.group(1).upper() != b"BYE"):
                return  # untagged data (a CAPABILITY...): of no use to the client
            self._greeting = None
            if status is not None:
                self._close("backend_tls_failed", "server said BYE to STARTTLS")
            else:
                self._invalid_response("unexpected response while securing the backend leg")
            return
        if m.group(1) != _GW_TAG:
            self._greeting = None
            self._invalid_response("completion of a command never sent")
            return
        self._setup = False
        if m.group(2).upper() == b"OK":
            if self._server.buffered:
                self._alert("STARTTLS_INJECTION", "server sent data after its OK to STARTTLS")
                self._greeting = None
                self._close("backend_injection", "server STARTTLS injection")
                return
            self._server_tls_pending = True
            self._ev.append(StartTLS("server"))
            return
        greeting, self._greeting = self._greeting, None
        if self._backend_tls_missing("mail server refused STARTTLS"):
            return
        self._open(greeting)

    def _backend_tls_missing(self, why):
        """Under backend-tls = required, close: True.  Otherwise go on in plaintext: False."""
        if self.rule.backend_tls != "required":
            return False
        self._alert("BACKEND_TLS_MISSING", why)
        self._greeting = None
        self._close("backend_tls_missing", "backend TLS required")
        return True

    def _open(self, greeting):
        """Relay the greeting: the session is open, and early client bytes are inspected."""
        self._ev.append(ToClient(self._filter_codes(greeting)))
        self.phase = COMMAND
        self._ev.append(Greeted())
        if self._held:
            held, self._held = self._held, b""
            self._client.push(held)
            self._drain()

    # -- capabilities ------------------------------------------------------------------

    def _filter_words(self, words):
        """Remove what the client cannot use through the gateway; learn the literal limit."""
        upper = [w.upper() for w in words]
        if b"LITERAL+" in upper:
            self._literal_plus = 1 << 64
        elif b"LITERAL-" in upper or b"IMAP4REV2" in upper:
            self._literal_plus = LITERAL_MINUS_LIMIT
        else:
            self._literal_plus = 0
        secure = self.secure_login and not self.client_tls
        kept = []
        for word, up in zip(words, upper):
            if up == b"STARTTLS" and (self.tls != "passthrough" or self.client_tls):
                continue
            if secure and (up.startswith(b"AUTH=") or up == b"LOGINDISABLED"):
                continue
            kept.append(word)
        if self.tls == "terminate" and not self.client_tls:
            kept.append(b"STARTTLS")  # the gateway's own, whatever the server offers
        if secure:
            kept.append(b"LOGINDISABLED")
        return kept

    def _filter_capability(self, line):
        """``* CAPABILITY ...``, filtered."""
        text = _text(line)
        words = self._filter_words(text[len(b"* CAPABILITY"):].split())
        return b" ".join([text[: len(b"* CAPABILITY")]] + words) + b"\r\n"

    def _filter_codes(self, line):
        """A status response with its ``[CAPABILITY ...]`` code filtered."""
        if b"[" not in line:
            return line

        def replace(m):
            return b"[CAPABILITY " + b" ".join(self._filter_words(m.group(1).split())) + b"]"

        return _CAPABILITY_CODE.sub(replace, line, count=1)
