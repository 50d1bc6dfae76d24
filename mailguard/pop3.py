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
Nothing here imports Twisted.
"""

import collections
import re
from dataclasses import dataclass

from zope.interface import implementer

from mailguard.commands import printable_verb
from mailguard.events import Close, Greeted, Passthrough, StartTLS, ToClient, ToServer
from mailguard.interfaces import IInspector
from mailguard.ordering import MAX_PENDING, OrderedReplies
from mailguard.wire import LineBuffer

GREETING = "GREETING"
COMMAND = "COMMAND"
PASSTHROUGH = "PASSTHROUGH"
CLOSED = "CLOSED"

#: Longest command or status line, CRLF included (RFC 2449 allows 255 and
#: 512; servers and clients stretch both).
LINE_LIMIT = 8192
#: Longest SASL response line (RFC 5034 section 4), CRLF included.
SASL_LIMIT = 12288
#: Client bytes held while the gateway waits for the server (after AUTH).
HOLD_LIMIT = 65536
#: Most lines in a CAPA response.
MAX_CAPA_LINES = 1000

#: The allowlist: each command with the arguments it may carry (after the
#: verb, matched in full; RFC 1939 section 3, RFC 2449, RFC 2595, RFC 5034).
COMMANDS = {
    b"USER": rb" \S+",
    b"PASS": rb" [^\r\n]+",  # a password may hold spaces (RFC 1939 section 7)
    b"APOP": rb" \S+ [0-9A-Fa-f]{32}",
    b"STAT": rb"",
    b"LIST": rb"(?: [0-9]{1,10})?",
    b"RETR": rb" [0-9]{1,10}",
    b"DELE": rb" [0-9]{1,10}",
    b"NOOP": rb"",
    b"RSET": rb"",
    b"QUIT": rb"",
    b"TOP": rb" [0-9]{1,10} [0-9]{1,10}",
    b"UIDL": rb"(?: [0-9]{1,10})?",
    b"CAPA": rb"",
    b"STLS": rb"",
    b"AUTH": rb"(?: [A-Za-z0-9_-]{1,20}(?: (?:[A-Za-z0-9+/]+={0,2}|=))?)?",
}
_ARGS = {verb: re.compile(args + rb" *\Z") for verb, args in COMMANDS.items()}

#: Commands whose +OK opens a multi-line body: always, or only without an argument.
_MULTI_ALWAYS = frozenset((b"RETR", b"TOP", b"CAPA"))
_MULTI_BARE = frozenset((b"LIST", b"UIDL", b"AUTH"))
#: The commands that log in (refused before TLS under secure-login).
_LOGIN = frozenset((b"USER", b"PASS", b"APOP", b"AUTH"))

_SASL_RESPONSE = re.compile(rb"(?:[A-Za-z0-9+/]*={0,2}|\*)\Z")

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


@dataclass(slots=True)
class _Pending:
    """One response the client is owed: from the server, or the gateway's own (``local``)."""

    verb: bytes
    multiline: bool = False
    local: bytes = None


class DotEnd:
    """Find the ``CRLF . CRLF`` that ends a multi-line body, in any segmentation.

    The body starts right after its status line, so the status line's CRLF
    counts as the first CRLF.  Only a few octets are kept between feeds.
    """

    def __init__(self):
        self._tail = b"\r\n"

    def feed(self, data):
        """Return how many octets of ``data`` belong to the body (terminator included), or -1 for all."""
        window = self._tail + data
        i = window.find(b"\r\n.\r\n")
        if i >= 0:
            return i + 5 - len(self._tail)
        self._tail = window[-4:]
        return -1


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
        self.client_tls = False
        self.server_tls = False
        self._greeting = None  # held while the gateway secures the backend leg
        self._server_tls_pending = False
        self._authenticated = False  # TRANSACTION state: STLS no longer allowed
        self.phase = GREETING
        self.commands = 0
        self.verbs = collections.Counter()
        self.bad_commands = 0
        self._lines = LineBuffer(LINE_LIMIT)
        self._held = b""  # pregreet bytes kept under pregreet = ignore
        self._pending = collections.deque()
        self._waiting = False  # AUTH in progress: hold client lines until the server answers
        self._sasl = False  # the next client line is a SASL response
        self._sbuf = bytearray()
        self._body = None  # None, "stream" or "capa" while a multi-line body flows
        self._dot = None
        self._capa_lines = 0
        self._ev = []

    def _local_entry(self, data):
        return _Pending(_LOCAL, local=data)

    def _held_limit(self):
        return LINE_LIMIT

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
        buf = self._sbuf
        buf += data
        while buf and self.phase is not CLOSED and self.phase is not PASSTHROUGH:
            if self._body == "stream":
                n = self._dot.feed(bytes(buf))
                if n < 0:
                    ev.append(ToClient(bytes(buf)))
                    del buf[:]
                    break
                ev.append(ToClient(bytes(buf[:n])))
                del buf[:n]
                self._end_body()
                continue
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) >= LINE_LIMIT:
                    self._invalid_response("response line too long")
                break
            if end + 1 > LINE_LIMIT:
                self._invalid_response("response line too long")
                break
            line = bytes(buf[: end + 1])
            del buf[: end + 1]
            if not line.endswith(b"\r\n"):
                self._invalid_response("response line not ended by CRLF")
                break
            if self._body == "capa":
                self._capa_line(line)
            else:
                self._response(line)
        return ev

    def server_lost(self):
        """The backend closed: tell the client, unless it asked to QUIT."""
        ev = self._ev = []
        if self.phase is CLOSED:
            return ev
        owed = [p.verb for p in self._pending if p.local is None]
        if self._greeting is not None or self._server_tls_pending:
            # Still securing the backend leg: the client has no greeting yet.
            self._close("backend_tls_failed", "backend TLS failed")
            return ev
        if owed and owed[0] == b"QUIT":
            ev.append(Close("server closed after QUIT"))
        elif self.phase is PASSTHROUGH:
            ev.append(Close("server closed"))
        elif self._body is not None or self.phase is GREETING:
            ev.append(Close("server closed"))
        else:
            self._close("backend_lost", "backend lost")
        self.phase = CLOSED
        return ev

    def client_lost(self):
        """The client closed; the backend leg is closed normally."""
        self.phase = CLOSED
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
        self.client_tls = True
        return []

    def server_tls_ready(self):
        """The gateway's own TLS handshake with the server is done: greet the client."""
        ev = self._ev = []
        self._server_tls_pending = False
        self.server_tls = True
        if self._greeting is not None and self.phase is GREETING:
            greeting, self._greeting = self._greeting, None
            self._relay_greeting(greeting)
        return ev

    # -- helpers --------------------------------------------------------------

    def _close(self, reply_name, reason):
        if reply_name is not None:
            self._ev.append(ToClient(REPLIES[reply_name]))
        self._ev.append(Close(reason))
        self.phase = CLOSED

    # -- client -----------------------------------------------------------------

    def _drain(self):
        """Inspect the buffered client lines, unless the server must answer first."""
        lines = self._lines
        while self.phase is COMMAND and not self._waiting:
            item = lines.pop()
            if item is None:
                break
            self._line(*item)
        if self.phase is COMMAND and lines.pending > HOLD_LIMIT:
            self._alert("POP3_SYNC_ERROR", "client sent %d bytes while waiting for the server" % lines.pending)
            self._close("sync", "client flood while waiting for the server")

    def _line(self, line, bare):
        if self._sasl:
            self._sasl_line(line)
            return
        self.commands += 1
        if line is LineBuffer.TOO_LONG:
            self._refuse(REPLIES["line_too_long"], b"", "line too long")
            return
        sp = line.find(b" ")
        verb = (line if sp < 0 else line[:sp]).upper()
        if b"\0" in line or b"\r" in line:
            self._refuse(REPLIES["not_allowed"], verb, "NUL or bare CR in command")
            return
        args = _ARGS.get(verb)
        if args is None:
            self._refuse(REPLIES["not_allowed"], verb, "not allowed")
            return
        if args.match(line, len(verb)) is None:
            self._refuse(REPLIES["bad_arguments"], verb, "invalid arguments")
            return
        if verb == b"STLS":
            self._stls()
            return
        if verb in _LOGIN and self.secure_login and not self.client_tls:
            self._refuse(REPLIES["secure_login"], verb, "login before TLS (secure-login)")
            return
        if len(self._pending) >= MAX_PENDING:
            self._close("queue_overflow", "pending queue overflow")
            return
        self.verbs[verb] += 1
        bare_verb = sp < 0 or not line[sp:].strip()
        multiline = verb in _MULTI_ALWAYS or (verb in _MULTI_BARE and bare_verb)
        self._ev.append(ToServer(line + b"\r\n"))
        self._pending.append(_Pending(verb, multiline))
        if verb == b"AUTH" and not bare_verb:
            # What follows may be SASL responses, not commands: the
            # server's answer decides.
            self._waiting = True

    def _stls(self):
        """STLS, as the rule's ``tls`` key says (see the module docstring)."""
        self.verbs[b"STLS"] += 1
        if self.tls == "strip":
            # The server never sees it, so nothing after it can be mistaken
            # for TLS-protected input.
            self._answer(REPLIES["tls_not_available"])
            return
        if self.client_tls:
            self._answer(REPLIES["tls_active"])
            return
        if self._authenticated:
            self._answer(REPLIES["tls_after_login"])  # RFC 2595: AUTHORIZATION state only
            return
        if self._lines.pending:
            # RFC 2595 section 3.1: bytes after STLS would be taken as if
            # they had come inside TLS.
            self._alert("STARTTLS_INJECTION", "client pipelined data after STLS")
            self._close("starttls_injection", "STLS injection")
            return
        if self._pending:
            self._alert("POP3_SYNC_ERROR", "STLS before the previous response")
            self._close("sync", "STLS pipelined")
            return
        if self.tls == "passthrough":
            # Forwarded; the client's next bytes wait for the server's answer.
            self._ev.append(ToServer(b"STLS\r\n"))
            self._pending.append(_Pending(b"STLS"))
            self._waiting = True
            return
        self._ev.append(ToClient(REPLIES["tls_ready"]))
        self._ev.append(StartTLS("client"))
        self.client_tls = True

    def _refuse(self, reply, verb, why):
        """Answer a refused command with ``reply``; close after too many."""
        self.bad_commands += 1
        name = printable_verb(verb) if verb else "<line>"
        self._alert("POP3_INVALID_COMMAND", "Invalid POP3 command (%s): %s" % (name, why), verb=name)
        if self.bad_commands >= self.rule.max_bad_commands:
            self._close("too_many_errors", "too many errors")
            return
        self._answer(reply)

    def _sasl_line(self, line):
        """One SASL response (never logged); an invalid one cancels the exchange."""
        self._sasl = False
        self._lines.limit = LINE_LIMIT
        if line is LineBuffer.TOO_LONG or b"\0" in line or _SASL_RESPONSE.match(line) is None:
            self._alert("POP3_INVALID_COMMAND", "Invalid SASL response", verb="<sasl>")
            line = b"*"
        self._ev.append(ToServer(line + b"\r\n"))
        self._waiting = True

    # -- server -------------------------------------------------------------------

    def _invalid_response(self, why):
        self._alert("POP3_INVALID_RESPONSE", "invalid response from server: %s" % why)
        self._close("invalid_response", "invalid response")

    def _response(self, line):
        pending = self._pending
        positive = line.startswith(b"+OK")
        negative = line.startswith(b"-ERR")
        if not pending:
            if negative:
                # A server closing on its own (autologout) says why first.
                self._ev.append(ToClient(line))
            else:
                self._invalid_response("response without a command")
            return
        head = pending[0]
        if head.verb is _GREETING:
            pending.popleft()
            if positive and self._wants_tls():
                # Secure the gateway's own leg before the client is greeted.
                self._greeting = line
                self._ev.append(ToServer(b"STLS\r\n"))
                pending.append(_Pending(_GW_STLS))
                return
            if positive:
                self._relay_greeting(line)
            elif negative:
                self._ev.append(ToClient(line))
            else:
                self._invalid_response("invalid greeting")
            return
        if head.verb is _GW_STLS:
            pending.popleft()
            self._backend_stls(positive, negative)
            return
        if not positive and not negative:
            if (line == b"+\r\n" or line.startswith(b"+ ")) and head.verb == b"AUTH" and self._waiting:
                # A SASL challenge: the next client line is its response.
                self._ev.append(ToClient(line))
                self._waiting = False
                self._sasl = True
                self._lines.limit = SASL_LIMIT
                self._drain()
                return
            self._invalid_response("not +OK or -ERR")
            return
        pending.popleft()
        if head.verb == b"STLS":
            self._stls_response(line, positive)
            return
        self._ev.append(ToClient(line))
        if positive and not head.multiline and head.verb in (b"PASS", b"APOP", b"AUTH"):
            self._authenticated = True
        if head.verb == b"AUTH":
            self._waiting = False
            self._sasl = False
            self._lines.limit = LINE_LIMIT
        if positive and head.multiline:
            if head.verb == b"CAPA":
                self._body = "capa"
                self._capa_lines = 0
            else:
                self._body = "stream"
                self._dot = DotEnd()
            return
        self._flush_local()
        self._drain()

    def _stls_response(self, line, positive):
        """The server's answer to a forwarded STLS (tls = passthrough)."""
        if positive:
            if self._sbuf:
                self._alert("STARTTLS_INJECTION", "server sent data after its +OK to STLS")
                self._close("backend_injection", "server STLS injection")
                return
            if self._lines.pending:
                self._alert("STARTTLS_INJECTION", "client sent data before the server's +OK to STLS")
                self._close("starttls_injection", "STLS injection")
                return
            self._ev.append(ToClient(line))
            self._alert("TLS_PASSTHROUGH", "TLS passthrough: session no longer inspected")
            self._ev.append(Passthrough())
            self.phase = PASSTHROUGH
            return
        self._ev.append(ToClient(line))
        self._waiting = False
        self._flush_local()
        self._drain()

    # -- the gateway's own leg to the server (tls = terminate) -----------------------

    def _wants_tls(self):
        return self.tls == "terminate" and self.rule.backend_tls != "off" and not self.server_tls

    def _backend_stls(self, positive, negative):
        """The server's answer to the gateway's own STLS."""
        if positive:
            if self._sbuf:
                self._alert("STARTTLS_INJECTION", "server sent data after its +OK to STLS")
                self._greeting = None
                self._close("backend_injection", "server STLS injection")
                return
            self._server_tls_pending = True
            self._ev.append(StartTLS("server"))
            return
        if not negative:
            self._greeting = None
            self._invalid_response("not +OK or -ERR")
            return
        if self.rule.backend_tls == "required":
            self._alert("BACKEND_TLS_MISSING", "mail server did not accept STLS")
            self._greeting = None
            self._close("backend_tls_missing", "backend TLS required")
            return
        greeting, self._greeting = self._greeting, None
        self._relay_greeting(greeting)

    def _relay_greeting(self, line):
        """The client gets the server's greeting: the session opens, early client bytes are inspected."""
        self._ev.append(ToClient(line))
        self.phase = COMMAND
        self._ev.append(Greeted())
        if self._held:
            held, self._held = self._held, b""
            self._lines.push(held)
            self._drain()

    def _end_body(self):
        self._body = None
        self._dot = None
        self._flush_local()
        self._drain()

    def _capa_line(self, line):
        """One line of a CAPA body: drop what the client must not use through the gateway."""
        if line == b".\r\n":
            if self.tls == "terminate" and not self.client_tls:
                self._ev.append(ToClient(b"STLS\r\n"))  # the gateway's own, whatever the server offers
            self._ev.append(ToClient(line))
            self._end_body()
            return
        self._capa_lines += 1
        if self._capa_lines > MAX_CAPA_LINES:
            self._invalid_response("CAPA response too long")
            return
        words = line.split()
        keyword = words[0].upper() if words else b""
        if keyword == b"STLS":
            if self.tls == "passthrough" and not self.client_tls:
                self._ev.append(ToClient(line))
            return
        if self.secure_login and not self.client_tls and keyword in (b"USER", b"SASL"):
            return
        self._ev.append(ToClient(line))
