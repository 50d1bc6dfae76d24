"""The POP3 inspection state machine (sans-IO): RFC 1939 commands, RFC 2449 CAPA, RFC 5034 AUTH.

`POP3Inspector` is fed the client's and the server's bytes and returns the
events to carry out (`mailguard.events`).  Only the commands of `COMMANDS`,
with the arguments their RFCs allow, reach the server; any other line is
answered ``-ERR`` by the gateway and never forwarded.  Every forwarded
command, and every reply the gateway writes itself, has an entry in one
pending queue, so responses reach a pipelining client (RFC 2449
PIPELINING) in the order of its commands.

Client side::

    GREETING --server +OK--> COMMAND --AUTH: wait for the server--> "+ " --> one SASL line --> ...
                                                                   +OK/-ERR --> COMMAND
    any --Close--> CLOSED

Server side: a status line (``+OK``, ``-ERR``, or ``+ `` continuing AUTH)
answers the head of the queue.  A ``+OK`` to RETR, TOP, CAPA, and LIST, UIDL
or AUTH without an argument opens a multi-line body, streamed (never held)
until ``CRLF . CRLF``; CAPA's body is filtered line by line.

STLS (RFC 2595) follows the rule's ``tls`` key, as STARTTLS does for esmtp:

- ``strip``: the gateway answers STLS itself (``-ERR``) and removes it from
  CAPA; the server never sees it.
- ``terminate``: the gateway answers ``+OK`` and starts TLS on the client
  leg itself (`StartTLS` ``"client"``), and shows STLS in CAPA until then.
  It secures its own leg first: after the server's greeting it sends STLS
  and relays the greeting only once that leg is TLS (``backend-tls``:
  ``opportunistic`` goes on in plaintext when the server answers ``-ERR``,
  ``required`` closes the session, ``off`` sends no STLS).
- ``passthrough``: STLS is forwarded; the server's ``+OK`` ends inspection
  (`Passthrough`, alert ``TLS_PASSTHROUGH``) and bytes are relayed blindly.

Injection (RFC 2595 section 3.1, the CVE-2011-0411 class) is refused both
ways: a client that sends anything after STLS before the TLS handshake is
closed, and so is a server that sends anything after its ``+OK`` to STLS;
those bytes are never relayed.  STLS is allowed only before login.

``secure-login = on`` refuses USER, PASS, APOP and AUTH before the client
leg is encrypted (by STLS, or on an implicit-TLS ``ssl:`` listener).
The layers: framing in `mailguard.pop3_framing`, the rules in `mailguard.pop3_rules`
and `mailguard.mailbox_rules` (what POP3 and IMAP share), the phases and
state values in `mailguard.mailbox_state`; this module is the state
machine that joins them.  Nothing here imports Twisted.
"""

import collections
from dataclasses import dataclass, replace

from zope.interface import implementer

from mailguard.commands import printable_verb
from mailguard.events import Close, Greeted, StartTLS, ToClient, ToServer
from mailguard.interfaces import IInspector
from mailguard.mailbox_rules import (
    TLS_FORWARD, TLS_INJECTION, TLS_START, TLS_SYNC, sasl_response_ok, secures_backend, starttls_step,
)
from mailguard.mailbox_state import MAILBOX_PHASES, NO_SETUP, PLAINTEXT, asked
from mailguard.ordering import MAX_PENDING, OrderedReplies
from mailguard.phases import CLOSED, COMMAND, GREETING, PASSTHROUGH
from mailguard import pop3_rules as rules
from mailguard.pop3_framing import BODY, BODY_END, DotEnd, FramingError, ResponseReader
from mailguard.pop3_rules import COMMANDS, MAX_CAPA_LINES
from mailguard.wire import LineBuffer

__all__ = ["COMMANDS", "DotEnd", "MAX_CAPA_LINES", "POP3Inspector", "REPLIES"]

#: Longest command or status line, CRLF included (RFC 2449 allows 255 and
#: 512; servers and clients stretch both).
LINE_LIMIT = 8192
#: Longest SASL response line (RFC 5034 section 4), CRLF included.
SASL_LIMIT = 12288
#: Client bytes held while the gateway waits for the server (after AUTH).
HOLD_LIMIT = 65536

#: Every reply the POP3 inspector writes itself.
REPLIES = {
    "not_allowed": b"-ERR Command not allowed\r\n",
    "bad_arguments": b"-ERR Invalid command arguments\r\n",
    "line_too_long": b"-ERR Line too long\r\n",
    "tls_not_available": b"-ERR TLS not available\r\n",
    "tls_ready": b"+OK Begin TLS negotiation\r\n",
    "tls_active": b"-ERR TLS already active\r\n",
    "tls_after_login": b"-ERR STLS not allowed after login\r\n",
    "starttls_injection": b"-ERR Protocol error: data sent after STLS, closing connection\r\n",
    "backend_injection": b"-ERR [SYS/TEMP] Mail server sent data after STLS, closing connection\r\n",
    "backend_tls_missing": b"-ERR [SYS/TEMP] TLS required but not offered by the mail server, closing connection\r\n",
    "backend_tls_failed": b"-ERR [SYS/TEMP] TLS to the mail server failed, closing connection\r\n",
    "secure_login": b"-ERR [SYS/PERM] Login refused before TLS (secure-login)\r\n",
    "too_many_errors": b"-ERR Too many errors, closing connection\r\n",
    "pregreet": b"-ERR Protocol error: data sent before greeting\r\n",
    "sync": b"-ERR Protocol error: data sent before the server's response\r\n",
    "queue_overflow": b"-ERR Too many pipelined commands, closing connection\r\n",
    "invalid_response": b"-ERR Invalid response from the mail server, closing connection\r\n",
    "backend_lost": b"-ERR Connection to the mail server lost\r\n",
}

#: What a refused client gets instead of the server's greeting, by
#: `mailguard.interfaces.IInspectorFactory.refusalReply` reason.
REFUSALS = {
    "overload": b"-ERR [SYS/TEMP] Too many connections, try again later\r\n",
    "unreachable": b"-ERR [SYS/TEMP] Mail server unreachable, closing connection\r\n",
}

# Pending-queue markers for responses that answer no client verb.
_GREETING = b"<greeting>"
_LOCAL = b"<local>"
_GW_STLS = b"<gateway STLS>"  # the gateway securing its own leg (tls = terminate)

# What the client's next lines wait for (`POP3Inspector._wait`; None: nothing).
_SERVER = "server"  # held until the server answers (AUTH with a mechanism, a forwarded STLS)
_SASL = "sasl"  # the next line is a SASL response to the server's challenge

#: A status line's indicator (`_status`).
_OK = "+OK"
_ERR = "-ERR"


def _status(line):
    """``_OK``, ``_ERR``, or None for a line that is neither."""
    if line.startswith(b"+OK"):
        return _OK
    if line.startswith(b"-ERR"):
        return _ERR
    return None


@dataclass(slots=True)
class _Pending:
    """One response the client is owed: from the server, or the gateway's own (``local``)."""

    verb: bytes
    multiline: bool = False
    local: bytes = None


@implementer(IInspector)
class POP3Inspector(OrderedReplies):
    """Inspect one POP3 session under a `mailguard.policy.Rule`."""

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
        self._lines = LineBuffer(LINE_LIMIT)
        self._server = ResponseReader(LINE_LIMIT)
        self._held = b""  # pregreet bytes kept under pregreet = ignore
        self._pending = collections.deque()
        self._wait = None  # None, _SERVER or _SASL
        self._capa_lines = None  # lines of the CAPA body flowing, else None
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
        return _Pending(_LOCAL, local=data)

    def _held_limit(self):
        return LINE_LIMIT

    def _take_greeting(self):
        """The greeting held by the backend setup (or None); the setup is over."""
        greeting, self.setup = self.setup.greeting, NO_SETUP
        return greeting

    def _to(self, event):
        """Move to the phase `MAILBOX_PHASES` gives for ``event``."""
        self.phase = MAILBOX_PHASES.next(self.phase, event)

    # -- the IInspector interface -------------------------------------------

    def server_connected(self):
        """The backend is up; its greeting is awaited."""
        self._pending.append(_Pending(_GREETING))
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
        self._lines.push(data)
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
        reader = self._server
        reader.push(data)
        try:
            while self.phase is COMMAND or self.phase is GREETING:
                item = reader.pop()
                if item is None:
                    break
                self._server_item(*item)
        except FramingError as e:
            self._invalid_response(str(e))
        return ev

    def server_lost(self):
        """The backend closed: tell the client, unless it asked to QUIT."""
        ev = self._ev = []
        if self.phase is CLOSED:
            return ev
        if self.setup.busy:
            # Still securing the backend leg: the client has no greeting yet.
            self._close("backend_tls_failed", "backend TLS failed")
            return ev
        owed = next((p.verb for p in self._pending if p.local is None), None)
        if owed == b"QUIT":
            ev.append(Close("server closed after QUIT"))
        elif self.phase is COMMAND and not self._in_body():
            self._close("backend_lost", "backend lost")
        else:
            ev.append(Close("server closed"))
        self._to("close")
        return ev

    def client_lost(self):
        """The client closed; the backend leg is closed normally."""
        self._to("close")
        return []

    def in_message(self):
        """POP3 sends no message to the server: closing is always clean."""
        return False

    def timeout_reply(self, reason):
        """The protocol's own goodbye to the client; the server is simply closed."""
        if self.phase is PASSTHROUGH:
            return b"", b""  # both legs speak TLS the gateway cannot write into
        text = b"Idle timeout" if reason == "idle_timeout" else b"Connection set-up timeout"
        return b"-ERR [SYS/TEMP] %s, closing connection\r\n" % text, (b"QUIT\r\n" if not self.in_message() else b"")

    def client_tls_ready(self):
        """The client leg is TLS (an implicit-TLS listener, or STLS done): logins are allowed."""
        self.security = replace(self.security, client_tls=True)
        return []

    def server_tls_ready(self):
        """The gateway's own TLS handshake with the server is done: greet the client."""
        ev = self._ev = []
        self.security = replace(self.security, server_tls=True)
        greeting = self._take_greeting()
        if greeting is not None and self.phase is GREETING:
            self._relay_greeting(greeting)
        return ev

    # -- helpers --------------------------------------------------------------

    def _close(self, reply_name, reason):
        if reply_name is not None:
            self._ev.append(ToClient(REPLIES[reply_name]))
        self._ev.append(Close(reason))
        self._to("close")

    def _in_body(self):
        """True while a multi-line body (CAPA's included) is flowing."""
        return self._server.in_body or self._capa_lines is not None

    # -- client -----------------------------------------------------------------

    def _drain(self):
        """Inspect the buffered client lines, unless the server must answer first."""
        lines = self._lines
        while self.phase is COMMAND and self._wait is not _SERVER:
            item = lines.pop()
            if item is None:
                break
            if self._wait is _SASL:
                self._sasl_line(item[0])
            else:
                self._line(item[0])
        if self.phase is COMMAND and lines.pending > HOLD_LIMIT:
            self._alert("POP3_SYNC_ERROR", "client sent %d bytes while waiting for the server" % lines.pending)
            self._close("sync", "client flood while waiting for the server")

    def _line(self, line):
        """One command line: refused by the rules, STLS, or forwarded."""
        self.commands += 1
        if line is LineBuffer.TOO_LONG:
            self._refuse("line_too_long", b"", "line too long")
            return
        verb, bare = rules.split_command(line)
        refusal = rules.command_refusal(line, verb)
        if refusal is None and verb == b"STLS":
            self._stls()
            return
        if refusal is None:
            refusal = rules.login_refusal(verb, self.secure_login, self.security)
        if refusal is not None:
            self._refuse(refusal[0], verb, refusal[1])
            return
        if len(self._pending) >= MAX_PENDING:
            self._close("queue_overflow", "pending queue overflow")
            return
        self.verbs[verb] += 1
        self._ev.append(ToServer(line + b"\r\n"))
        self._pending.append(_Pending(verb, rules.opens_body(verb, bare)))
        if rules.awaits_sasl(verb, bare):
            # What follows may be SASL responses, not commands: the
            # server's answer decides.
            self._wait = _SERVER

    def _stls(self):
        """STLS, as the rule's ``tls`` key says (see the module docstring)."""
        self.verbs[b"STLS"] += 1
        step = starttls_step(self.tls, self.security, self._lines.pending, self._pending)
        if step == TLS_INJECTION:
            self._alert("STARTTLS_INJECTION", "client pipelined data after STLS")
            self._close("starttls_injection", "STLS injection")
        elif step == TLS_SYNC:
            self._alert("POP3_SYNC_ERROR", "STLS before the previous response")
            self._close("sync", "STLS pipelined")
        elif step == TLS_FORWARD:
            self._ev.append(ToServer(b"STLS\r\n"))
            self._pending.append(_Pending(b"STLS"))
            self._wait = _SERVER
        elif step == TLS_START:
            self._ev.append(ToClient(REPLIES["tls_ready"]))
            self._ev.append(StartTLS("client"))
            self.security = replace(self.security, client_tls=True)
        else:
            self._answer(REPLIES[step])

    def _refuse(self, reply_name, verb, why):
        """Answer a refused command with the reply ``reply_name``; close after too many."""
        self.bad_commands += 1
        name = printable_verb(verb) if verb else "<line>"
        self._alert("POP3_INVALID_COMMAND", "Invalid POP3 command (%s): %s" % (name, why), verb=name)
        if self.bad_commands >= self.rule.max_bad_commands:
            self._close("too_many_errors", "too many errors")
            return
        self._answer(REPLIES[reply_name])

    def _sasl_line(self, line):
        """One SASL response (never logged); an invalid one cancels the exchange."""
        self._lines.limit = LINE_LIMIT
        if line is LineBuffer.TOO_LONG or not sasl_response_ok(line):
            self._alert("POP3_INVALID_COMMAND", "Invalid SASL response", verb="<sasl>")
            line = b"*"
        self._ev.append(ToServer(line + b"\r\n"))
        self._wait = _SERVER

    # -- server -------------------------------------------------------------------

    def _invalid_response(self, why):
        self._alert("POP3_INVALID_RESPONSE", "invalid response from server: %s" % why)
        self._close("invalid_response", "invalid response")

    def _server_item(self, kind, data):
        """One item of the server's framing: body octets, a CAPA line or a status line."""
        if kind is BODY or kind is BODY_END:
            self._ev.append(ToClient(data))
            if kind is BODY_END:
                self._end_body()
        elif self._capa_lines is not None:
            self._capa_line(data)
        else:
            self._response(data)

    def _response(self, line):
        """A status line: it answers the head of the pending queue."""
        pending = self._pending
        if not pending:
            if _status(line) is _ERR:
                # A server closing on its own (autologout) says why first.
                self._ev.append(ToClient(line))
            else:
                self._invalid_response("response without a command")
            return
        head = pending[0]
        if head.verb is _GREETING:
            pending.popleft()
            self._greeting_response(line)
            return
        if head.verb is _GW_STLS:
            pending.popleft()
            self._backend_stls(line)
            return
        status = _status(line)
        if status is None:
            self._challenge(line, head)
            return
        pending.popleft()
        if head.verb == b"STLS":
            self._stls_response(line, status is _OK)
        else:
            self._completed(head, line, status is _OK)

    def _greeting_response(self, line):
        """The server's greeting: relayed, or held while the gateway secures its own leg."""
        status = _status(line)
        if status is _OK and secures_backend(self.tls, self.rule.backend_tls, self.security):
            self.setup = asked(line)
            self._ev.append(ToServer(b"STLS\r\n"))
            self._pending.append(_Pending(_GW_STLS))
        elif status is _OK:
            self._relay_greeting(line)
        elif status is _ERR:
            self._ev.append(ToClient(line))
        else:
            self._invalid_response("invalid greeting")

    def _challenge(self, line, head):
        """A line that is neither +OK nor -ERR: valid only as a SASL challenge to AUTH."""
        if (line == b"+\r\n" or line.startswith(b"+ ")) and head.verb == b"AUTH" and self._wait is _SERVER:
            # The next client line is its response.
            self._ev.append(ToClient(line))
            self._wait = _SASL
            self._lines.limit = SASL_LIMIT
            self._drain()
            return
        self._invalid_response("not +OK or -ERR")

    def _completed(self, head, line, positive):
        """The server's +OK or -ERR to a forwarded command."""
        self._ev.append(ToClient(line))
        if positive and rules.logs_in(head.verb, head.multiline):
            self.security = replace(self.security, authenticated=True)
        if head.verb == b"AUTH":
            self._wait = None
            self._lines.limit = LINE_LIMIT
        if positive and head.multiline:
            if head.verb == b"CAPA":
                self._capa_lines = 0
            else:
                self._server.start_body()
            return
        self._flush_local()
        self._drain()

    def _stls_response(self, line, positive):
        """The server's answer to a forwarded STLS (tls = passthrough)."""
        if positive:
            if self._passthrough(line, self._server.buffered, self._lines.pending, b"STLS"):
                self._to("passthrough")
            return
        self._ev.append(ToClient(line))
        self._wait = None
        self._flush_local()
        self._drain()

    # -- the gateway's own leg to the server (tls = terminate) -----------------------

    def _backend_stls(self, line):
        """The server's answer to the gateway's own STLS."""
        status = _status(line)
        if status is _OK:
            if self._server.buffered:
                self._alert("STARTTLS_INJECTION", "server sent data after its +OK to STLS")
                self._take_greeting()
                self._close("backend_injection", "server STLS injection")
                return
            self.setup = self.setup.accepted()
            self._ev.append(StartTLS("server"))
            return
        if status is None:
            self._take_greeting()
            self._invalid_response("not +OK or -ERR")
            return
        if self.rule.backend_tls == "required":
            self._alert("BACKEND_TLS_MISSING", "mail server did not accept STLS")
            self._take_greeting()
            self._close("backend_tls_missing", "backend TLS required")
            return
        self._relay_greeting(self._take_greeting())

    def _relay_greeting(self, line):
        """The client gets the server's greeting: the session opens, early client bytes are inspected."""
        self._ev.append(ToClient(line))
        self._to("greeted")
        self._ev.append(Greeted())
        if self._held:
            held, self._held = self._held, b""
            self._lines.push(held)
            self._drain()

    def _end_body(self):
        self._capa_lines = None
        self._flush_local()
        self._drain()

    def _capa_line(self, line):
        """One line of a CAPA body: drop what the client must not use through the gateway."""
        if line == b".\r\n":
            for extra in rules.capability_additions(self.tls, self.security):
                self._ev.append(ToClient(extra))  # the gateway's own, whatever the server offers
            self._ev.append(ToClient(line))
            self._end_body()
            return
        self._capa_lines += 1
        if self._capa_lines > MAX_CAPA_LINES:
            self._invalid_response("CAPA response too long")
            return
        if rules.keep_capability(line, self.tls, self.secure_login, self.security):
            self._ev.append(ToClient(line))
