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
without AUTH= mechanisms.  The layers: framing in `mailguard.imap_framing`, the rules in `mailguard.imap_rules`
and `mailguard.mailbox_rules` (what POP3 and IMAP share), the phases and
state values in `mailguard.mailbox_state`; this module is the state
machine that joins them.  Nothing here imports Twisted.
"""

import collections
from dataclasses import dataclass, replace

from zope.interface import implementer

from mailguard import imap_rules as rules
from mailguard.commands import printable_verb
from mailguard.events import AbortServer, Close, Greeted, StartTLS, ToClient, ToServer
from mailguard.imap_framing import (
    CAPABILITY_PREFIX, END, LINE, LITERAL, LONG, MORE, Framer, capability_code, drop_capability_code, is_capability,
    is_tag, literal_marker, parse_command, parse_tagged, replace_capability_code, text as _text, untagged_status,
)
from mailguard.imap_rules import COMMANDS, LITERAL_MINUS_LIMIT, UID_COMMANDS
from mailguard.interfaces import IInspector
from mailguard.mailbox_rules import (
    TLS_FORWARD, TLS_INJECTION, TLS_START, TLS_SYNC, sasl_response_ok, secures_backend, starttls_step,
)
from mailguard.mailbox_state import ASKED, MAILBOX_PHASES, NO_SETUP, PLAINTEXT, asked
from mailguard.ordering import MAX_PENDING, OrderedReplies
from mailguard.phases import CLOSED, COMMAND, GREETING, PASSTHROUGH

__all__ = [
    "COMMANDS", "END", "LINE", "LITERAL", "LITERAL_MINUS_LIMIT", "LONG", "MORE", "UID_COMMANDS", "Framer",
    "IMAPInspector", "REPLIES", "literal_marker",
]

#: Longest line fragment (a command, a response), line end included.
LINE_LIMIT = 8192
#: Longest SASL response line, line end included.
SASL_LIMIT = 12288
#: Client bytes held while the gateway waits for the server's continuation.
HOLD_LIMIT = 65536
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


@dataclass(slots=True)
class _Exchange:
    """Where the client stands in a back-and-forth with the server (a literal, AUTHENTICATE, IDLE)."""

    wait: str = None  # _AWAIT_* while the client's input is held for the server, else None
    entry: _Pending = None  # the command the exchange belongs to
    octets: int = 0  # the synchronizing literal's size, under _AWAIT_LITERAL
    sasl: bool = False  # the next client line is a SASL response
    idle: bool = False  # IDLE accepted: the next client line must be DONE


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
        #: TLS on each leg, and whether the client has logged in.
        self.security = PLAINTEXT
        #: The gateway securing its own leg before the client is greeted.
        self.setup = NO_SETUP
        self.phase = GREETING
        self.commands = 0
        self.verbs = collections.Counter()
        self.bad_commands = 0
        self._client = Framer(LINE_LIMIT)
        self._server = Framer(LINE_LIMIT)
        self._held = b""
        self._pending = collections.deque()
        self._cmd = None  # the client command in progress across fragments
        self._ex = _Exchange()
        self._resp = False  # a server response continues (after a literal, or a long line)
        self._literal_plus = 0  # largest non-synchronizing literal the server takes
        self._bye = False
        self._ev = []

    @property
    def client_tls(self):
        """True once the client's leg is TLS."""
        return self.security.client_tls

    @property
    def server_tls(self):
        """True once the gateway's own leg to the server is TLS."""
        return self.security.server_tls

    def _local_entry(self, data):
        return _Pending(b"", local=data)

    def _take_greeting(self):
        """The greeting held by the backend setup (or None); the setup is over."""
        greeting, self.setup = self.setup.greeting, NO_SETUP
        return greeting

    def _to(self, event):
        """Move to the phase `MAILBOX_PHASES` gives for ``event``."""
        self.phase = MAILBOX_PHASES.next(self.phase, event)

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
        if self.setup.busy:
            # Still securing the backend leg: the client has no greeting yet.
            self._close("backend_tls_failed", "backend TLS failed")
            return ev
        if (self.phase is PASSTHROUGH or self.phase is GREETING or self._bye or self._resp
                or self._server.in_literal):
            ev.append(Close("server closed"))
        else:
            self._close("backend_lost", "backend lost")
        self._to("close")
        return ev

    def client_lost(self):
        """The client closed; a half-sent command must never complete at the server."""
        ev = self._ev = []
        if self.in_message():
            ev.append(AbortServer("client lost mid-command"))
        self._to("close")
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
        self.security = replace(self.security, client_tls=True)
        return []

    def server_tls_ready(self):
        """The gateway's own TLS handshake with the server is done: greet the client."""
        ev = self._ev = []
        self.security = replace(self.security, server_tls=True)
        greeting = self._take_greeting()
        if greeting is not None and self.phase is GREETING:
            # Capabilities announced before TLS are stale (RFC 9051 section 6.2.1):
            # the client asks again.
            self._literal_plus = 0
            self._open(drop_capability_code(greeting))
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
        self._to("close")
        self._cmd = None

    def _send(self, data):
        self._ev.append(ToServer(data))
        if self._cmd is not None:
            self._cmd.sent = True

    # -- client ---------------------------------------------------------------------

    def _drain(self):
        """Inspect what the client sent, unless it must wait for the server first."""
        framer = self._client
        while self.phase is COMMAND and self._ex.wait is None:
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
            if self._ex.sasl:
                self._sasl_line(kind, data)
                return
            if self._ex.idle:
                if kind is LINE and _text(data).upper() == b"DONE":
                    self._ex.idle = False
                    self._ev.append(ToServer(b"DONE\r\n"))
                    return
                # Anything but DONE ends the IDLE (RFC 2177 lets the server
                # refuse it); the gateway ends it cleanly and goes on.
                self._ex.idle = False
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
        """The first fragment of a command: refused, STARTTLS, or forwarded."""
        self.commands += 1
        if kind is not LINE:
            # Too long to inspect: refuse it (by its tag, if that much is there).
            parsed = parse_command(data)
            tag = parsed[0] if parsed else None
            self._cmd = _Command(tag or b"*", b"", forward=False)
            self._refuse(tag, "line_too_long", b"", "line too long")
            return
        text = _text(data)
        parsed = parse_command(text)
        if parsed is None:
            self._malformed(text, literal)
            return
        tag, verb, sub, end = parsed
        name = rules.command_name(verb, sub)[0]
        self._cmd = _Command(tag, verb, forward=False)
        refusal = rules.command_refusal(
            verb, sub, end, text, literal, self.secure_login, self.security, self._literal_plus)
        if refusal is not None:
            self._refuse(tag, refusal[0], name, refusal[1])
        elif verb == b"STARTTLS":
            self.verbs[name] += 1
            self._starttls(tag)
        elif len(self._pending) >= MAX_PENDING:
            self._close("queue_overflow", "pending queue overflow")
            return
        else:
            self._forward(tag, name)
        if self.phase is not CLOSED:
            self._fragment_end(text, literal, False)

    def _malformed(self, text, literal):
        """A line that is not ``tag SP verb``: refused by its tag, if it has a valid one."""
        tag = text.split(b" ", 1)[0]
        self._cmd = _Command(b"*", b"", forward=False)
        if text and is_tag(tag):
            self._refuse(tag, "bad_command", b"", "malformed command")
        else:
            self._refuse(None, "no_tag", b"", "missing or invalid tag")
        if self.phase is not CLOSED:
            self._fragment_end(text, literal, False)

    def _forward(self, tag, name):
        """The command is allowed: it owes the client a completion from the server."""
        self.verbs[name] += 1
        cmd = self._cmd
        cmd.forward = True
        cmd.verb = name
        cmd.entry = _Pending(tag, name)
        self._pending.append(cmd.entry)

    def _fragment_end(self, text, literal, long_line):
        """The end of one fragment of the current command: forward it, then see what follows."""
        cmd = self._cmd
        if cmd.forward:
            if rules.nonsync_refused(literal, self._literal_plus):
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
        step = starttls_step(self.tls, self.security, self._client.buffered, self._pending)
        if step == TLS_INJECTION:
            self._alert("STARTTLS_INJECTION", "client pipelined data after STARTTLS")
            self._close("starttls_injection", "STARTTLS injection")
        elif step == TLS_SYNC:
            self._alert("IMAP_SYNC_ERROR", "STARTTLS while commands are in progress")
            self._close("starttls_sync", "STARTTLS pipelined")
        elif step == TLS_FORWARD:
            entry = _Pending(tag, b"STARTTLS")
            self._pending.append(entry)
            self._ev.append(ToServer(tag + b" STARTTLS\r\n"))
            self._wait(_AWAIT_TLS, entry)
        elif step == TLS_START:
            self._ev.append(ToClient(_reply("tls_ready", tag)))
            self._ev.append(StartTLS("client"))
            self.security = replace(self.security, client_tls=True)
            self._literal_plus = 0  # nothing learned before TLS survives it
        else:
            self._answer(_reply(step, tag))

    def _wait(self, what, entry, octets=0):
        """Hold the client's input until the server answers the command of ``entry``."""
        self._ex.wait = what
        self._ex.entry = entry
        self._ex.octets = octets

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
        self._ex.sasl = False
        self._client.limit = LINE_LIMIT
        text = _text(data)
        if kind is not LINE or not sasl_response_ok(text):
            self._alert("IMAP_INVALID_COMMAND", "Invalid SASL response", verb="<sasl>")
            if kind is not LINE:
                self._close("broken_command", "SASL response too long", abort=True)
                return
            text = b"*"
        self._ev.append(ToServer(text + b"\r\n"))
        self._wait(_AWAIT_SASL, self._ex.entry)

    # -- server -----------------------------------------------------------------------

    def _invalid_response(self, why):
        self._alert("IMAP_INVALID_RESPONSE", "invalid response from server: %s" % why)
        self._close("invalid_response", "invalid response", abort=True)

    def _server_item(self, kind, data, extra):
        if kind is LITERAL:
            self._ev.append(ToClient(data))
            return
        if self._resp:
            # The rest of a response that carried a literal, or of a long line.
            self._ev.append(ToClient(data))
            if kind is LINE or kind is END:
                self._resp = False
                self._server_fragment_end(extra)
            return
        if kind is LONG:
            if data.startswith(b"* ") and untagged_status(data) is None and not is_capability(data):
                # A long untagged response (SEARCH, FETCH, LIST...): streamed.
                self._ev.append(ToClient(data))
                self._resp = True
                return
            self._invalid_response("response line too long")
            return
        self._response(data, extra)

    def _server_fragment_end(self, literal):
        if literal is not None:
            self._server.start_literal(literal[0])
            self._resp = True

    def _response(self, line, literal):
        """One whole server line: a greeting, a continuation, an untagged or a tagged response."""
        text = _text(line)
        if self.phase is GREETING:
            if self.setup.stage is ASKED:
                self._setup_response(text, literal)
            else:
                self._greeting(line, text, literal)
            return
        if text[:1] == b"+" and (len(text) == 1 or text[1:2] == b" "):
            self._continuation(line)
            return
        if text.startswith(b"* "):
            self._untagged(line, text, literal)
            return
        tagged = parse_tagged(text)
        if tagged is None:
            self._invalid_response("not a tagged, untagged or continuation response")
            return
        self._completed(tagged[0], tagged[1] == b"OK", self._filter_codes(line), literal)

    def _greeting(self, line, text, literal):
        """The server's greeting: relayed, or held while the gateway secures its own leg."""
        status = untagged_status(text)
        if status not in (b"OK", b"PREAUTH", b"BYE"):
            self._invalid_response("invalid greeting")
            return
        if status == b"BYE":
            self._ev.append(ToClient(self._filter_codes(line)))
            self._bye = True
            return
        if secures_backend(self.tls, self.rule.backend_tls, self.security):
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
        if status == b"PREAUTH":
            self.security = replace(self.security, authenticated=True)
        self._open(line)
        self._server_fragment_end(literal)

    def _untagged(self, line, text, literal):
        """``* ...``: relayed at once, capabilities filtered."""
        if is_capability(text):
            line = self._filter_capability(line)
        else:
            status = untagged_status(text)
            if status is not None:
                line = self._filter_codes(line)
                if status == b"BYE":
                    self._bye = True
        self._ev.append(ToClient(line))
        self._server_fragment_end(literal)

    def _continuation(self, line):
        what = self._ex.wait
        if what is None or what is _AWAIT_TLS:
            self._invalid_response("unexpected continuation request")
            return
        self._ev.append(ToClient(line))
        self._ex.wait = None
        if what is _AWAIT_LITERAL:
            self._client.start_literal(self._ex.octets)
        elif what is _AWAIT_SASL:
            self._ex.sasl = True
            self._client.limit = SASL_LIMIT
        else:
            self._ex.idle = True
        self._drain()

    def _completed(self, tag, ok, line, literal):
        """A tagged completion: it ends its command, wherever that is in the queue."""
        pending = self._pending
        for i, entry in enumerate(pending):
            if entry.local is None and entry.tag == tag:
                del pending[i]
                break
        else:
            self._invalid_response("completion of a command never sent")
            return
        if ok and entry.verb == b"STARTTLS":
            self._tls_passthrough(line)
            return
        if ok and entry.verb in rules.LOGIN:
            self.security = replace(self.security, authenticated=True)
        self._ev.append(ToClient(line))
        self._server_fragment_end(literal)
        self._end_exchange(entry)
        self._flush_local()
        self._drain()

    def _end_exchange(self, entry):
        """The command of ``entry`` is complete: whatever exchange it had with the server is over."""
        ex = self._ex
        if ex.wait is not None and ex.entry is entry:
            # Refused before its literal (or the end of AUTHENTICATE/IDLE):
            # what the client sends next is a new command.
            if ex.wait is _AWAIT_LITERAL:
                self._cmd = None
            ex.wait = None
        if ex.sasl and ex.entry is entry:
            ex.sasl = False
            self._client.limit = LINE_LIMIT
        if entry.verb == b"IDLE":
            ex.idle = False

    def _tls_passthrough(self, line):
        """The server accepted a forwarded STARTTLS: relay blindly from now on."""
        if self._passthrough(line, self._server.buffered, self._client.buffered):
            self._to("passthrough")
        self._ex.wait = None

    # -- the gateway's own leg to the server (tls = terminate) -----------------------

    def _secure_backend(self, greeting):
        """Hold the greeting and send the gateway's own STARTTLS, unless the server lacks it."""
        if not rules.offers_starttls(capability_code(greeting)):
            if self._backend_tls_missing("mail server does not offer STARTTLS"):
                return
            self._open(greeting)
            return
        self.setup = asked(greeting)
        self._ev.append(ToServer(_GW_TAG + b" STARTTLS\r\n"))

    def _setup_response(self, text, literal):
        """A response to the gateway's own STARTTLS (never relayed)."""
        if literal is not None:
            self._take_greeting()
            self._invalid_response("literal while securing the backend leg")
            return
        tagged = parse_tagged(text)
        if tagged is None:
            self._setup_untagged(text)
            return
        if tagged[0] != _GW_TAG:
            self._take_greeting()
            self._invalid_response("completion of a command never sent")
            return
        if tagged[1] == b"OK":
            if self._server.buffered:
                self._alert("STARTTLS_INJECTION", "server sent data after its OK to STARTTLS")
                self._take_greeting()
                self._close("backend_injection", "server STARTTLS injection")
                return
            self.setup = self.setup.accepted()
            self._ev.append(StartTLS("server"))
            return
        greeting = self._take_greeting()
        if self._backend_tls_missing("mail server refused STARTTLS"):
            return
        self._open(greeting)

    def _setup_untagged(self, text):
        """Untagged data while securing the backend leg: ignored, unless it is a BYE."""
        status = untagged_status(text)
        if text.startswith(b"* ") and status != b"BYE":
            return  # untagged data (a CAPABILITY...): of no use to the client
        self._take_greeting()
        if status is not None:
            self._close("backend_tls_failed", "server said BYE to STARTTLS")
        else:
            self._invalid_response("unexpected response while securing the backend leg")

    def _backend_tls_missing(self, why):
        """Under backend-tls = required, close: True.  Otherwise go on in plaintext: False."""
        if self.rule.backend_tls != "required":
            return False
        self._alert("BACKEND_TLS_MISSING", why)
        self._take_greeting()
        self._close("backend_tls_missing", "backend TLS required")
        return True

    def _open(self, greeting):
        """Relay the greeting: the session is open, and early client bytes are inspected."""
        self._ev.append(ToClient(self._filter_codes(greeting)))
        self._to("greeted")
        self._ev.append(Greeted())
        if self._held:
            held, self._held = self._held, b""
            self._client.push(held)
            self._drain()

    # -- capabilities ------------------------------------------------------------------

    def _filter_words(self, words):
        """Remove what the client cannot use through the gateway; learn the literal limit."""
        kept, self._literal_plus = rules.filter_capabilities(words, self.tls, self.secure_login, self.security)
        return kept

    def _filter_capability(self, line):
        """``* CAPABILITY ...``, filtered."""
        text = _text(line)
        words = self._filter_words(text[CAPABILITY_PREFIX:].split())
        return b" ".join([text[:CAPABILITY_PREFIX]] + words) + b"\r\n"

    def _filter_codes(self, line):
        """A status response with its ``[CAPABILITY ...]`` code filtered."""
        return replace_capability_code(line, self._filter_words)
