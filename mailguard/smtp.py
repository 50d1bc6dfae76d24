"""The SMTP inspection state machine (sans-IO) for the smtp, esmtp and mailguard modes.

`SMTPInspector` is fed the client's and the server's bytes and returns the
events to carry out (`mailguard.events`).  It keeps the two sides in step:
every command forwarded or answered by the gateway has an entry in a
pending queue, so replies reach the client in exactly the order of its
commands, whether the server or the gateway wrote them.

Client side phases::

    GREETING --server greeting--> COMMAND --354--> DATA --CRLF.CRLF--> COMMAND
                                     |  \\--BDAT n--> CHUNK --n octets--> COMMAND
                                     \\--334--> (SASL line) --> COMMAND
    any --Close--> CLOSED
"""

import functools

from zope.interface import implementer

from mailguard import commands as C
from mailguard.interfaces import IInspector
from mailguard.ordering import MAX_PENDING, OrderedReplies
from mailguard.events import (
    DROPPED, REJECTED, TEMPFAILED, AbortServer, Close, DropSpool, FilterAbort, FilterReply, MessageDone, MessageSent,
    MessageSpooled, PauseClient, StartTLS, ToClient, ToServer, ToSpool, Trace, outcome_of,
)
from mailguard.filters import chain_of
from mailguard.matching import dialogue_of
from mailguard.replies import reply
from mailguard.smtp_dialogue import GatewayDialogue
from mailguard.smtp_rules import filter_ehlo
from mailguard.smtp_state import (
    CHUNK, CLOSED, COMMAND, DATA, DECIDE, END_OF_DATA, F_MAIL, F_RCPT, GREETING, GW_DATA, GW_EHLO, GW_MAIL, GW_RCPT,
    GW_RSET, GW_STARTTLS, GW_XCLIENT, ILLEGAL, PASSTHROUGH, SASL, SERVER_GREETING, TRANSITIONS, WAIT,
    Pending,
)
from mailguard.smtp_filtering import _LOGIN_USER, FilterSteps, _b64, _Chunk, _sasl_user
from mailguard.wire import DataScanner, LineBuffer, ReplyParser, WireError, whole_replies

#: Longest SASL response line (RFC 4954 section 4), CRLF included.
SASL_LIMIT = 12288

def _NOTHING_MASKED(keyword):
    return False


#: What the client may use before (or without) an EHLO reply; never mutated.
_NO_EXTENSIONS = C.Extensions()


@functools.lru_cache(maxsize=64)
def _command_line_limit(base):
    """The line buffer's bound: the longest command any extension allows."""
    return max(C.command_limit(b"MAIL", C.Extensions({b"AUTH": (), b"DSN": ()}), base), base)


@implementer(IInspector)
class SMTPInspector(GatewayDialogue, FilterSteps, OrderedReplies):
    """Inspect one SMTP session under a `Rule` in one `commands.Mode`.

    Set ``trace`` to emit a `Trace` event per command and reply (``debug =
    smtp``): verb, length, state and code only, never AUTH payloads or data.
    """

    # Slots: thousands of idle sessions each hold one inspector.
    __slots__ = (
        "_authenticated",
        "_bare_logged",
        "_body_type",
        "_chunk_forward",
        "_chunk_last",
        "_chunk_left",
        "_chunk_size",
        "_drop",
        "_ev",

        "_ext",
        "_greeting",
        "_group_end",
        "_held",
        "_in_txn",
        "_internal",
        "_lines",
        "_line_limit",
        "_pending",
        "_rcpts",
        "_removed",
        "_replies",
        "_sasl",
        "_scanner",
        "_server_tls_pending",
        "_trailing",
        "_unread",
        "_txn_body",
        "_sender",
        "_accepted",
        "_xclient_done",
        "bad_commands",
        "client_tls",
        "commands",
        "mode",
        "phase",
        "rule",
        "server_tls",
        "verbs",
        "trace",
        "xclient",
        "peer",
    )

    #: The rule's dialogue content rules (`mailguard.matching.Dialogue`); only filtered sessions have them.
    _dialogue = None

    # Message filters: see `FilteredSMTPInspector` (an unfiltered session
    # holds none of its state).
    _filtered = False
    _txn = None
    helo = None
    authenticated_as = None

    def __init__(self, rule, mode):
        self.trace = False
        #: Send XCLIENT with ``peer`` when the backend offers it (listener key).
        self.xclient = False
        #: The real client's ``(host, port)``, set by the relay.
        self.peer = None
        self.rule = rule
        self.mode = mode
        self.client_tls = False
        self.server_tls = False
        self._greeting = None  # held while the gateway secures the backend leg
        self._internal = 0  # pending entries that are the gateway's own commands
        self._trailing = False
        self._unread = 0  # octets of the chunk after the command being handled
        self._server_tls_pending = False
        self._xclient_done = False
        self.phase = GREETING  # the start of TRANSITIONS
        self.commands = 0
        # Accepted commands by verb; created by the first one (idle sessions
        # are many, and each container costs memory).
        self.verbs = None
        self.bad_commands = 0
        # The line buffer and the reply parser exist only while they hold a
        # partial line or reply: an idle session has neither.
        self._line_limit = _command_line_limit(rule.max_command_line)
        self._lines = None
        self._replies = None
        # Replies owed, oldest first: a short list (one pipelined group), or
        # the empty tuple while nothing is owed (an idle session holds no list).
        self._pending = ()
        self._group_end = 0  # pending entries that end a pipelined group
        self._ext = _NO_EXTENSIONS
        self._removed = None  # EHLO keywords already alerted on
        self._held = b""  # pregreet bytes kept under pregreet = ignore
        self._ev = None  # the events being built, inside an entry point
        self._sasl = False
        self._authenticated = False
        self._in_txn = False
        self._rcpts = 0
        self._body_type = b"7BIT"
        self._txn_body = None  # "DATA" or "BDAT" once the body has begun
        self._sender = b""  # the reverse-path of the last MAIL (for the MESSAGE line)
        self._accepted = 0  # recipients the server accepted since its last MAIL reply
        self._scanner = None
        self._bare_logged = False
        self._drop = None  # why the current message is being refused
        self._chunk_left = 0
        self._chunk_forward = False
        self._chunk_size = 0
        self._chunk_last = False

    @property
    def _tls(self):
        """tls = strip | terminate | passthrough (esmtp only; the policy checks)."""
        return self.rule.tls if self.mode.esmtp else "strip"

    def _local_entry(self, data):
        return Pending(b"", local=data)

    def _held_limit(self):
        return self._line_limit

    # -- the IInspector interface -------------------------------------------

    def server_connected(self):
        """The backend connection is up; nothing to send before its greeting."""
        self._owe(Pending(SERVER_GREETING))
        return []

    def client_data(self, data):
        """Inspect bytes from the client; return the events to carry out."""
        ev = self._ev = []
        self._client(data)
        self._ev = None  # an idle session keeps no events (nor the bytes they hold)
        return ev

    def _client(self, data):
        while data and self.phase is not CLOSED:
            phase = self.phase
            if phase is COMMAND:
                data = self._command_bytes(data)
            elif phase is DATA:
                data = self._data_bytes(data)
            elif phase is CHUNK:
                data = self._chunk_bytes(data)
            elif phase is PASSTHROUGH:
                self._ev.append(ToServer(data))
                data = b""
            elif phase is WAIT:
                data = self._hold(data)
            else:
                data = self._pregreet(data)

    def server_data(self, data):
        """Inspect bytes from the server; return the events to carry out."""
        ev = self._ev = []
        self._server(data)
        self._ev = None
        return ev

    def _server(self, data):
        ev = self._ev
        if self.phase is CLOSED:
            return
        if self.phase is PASSTHROUGH:
            ev.append(ToClient(data))
            return
        parser = self._replies
        replies = None if parser is not None else whole_replies(data, self.rule.max_reply_line)
        if replies is None:
            if parser is None:
                parser = self._replies = ReplyParser(self.rule.max_reply_line)
            try:
                replies = parser.feed(data)
            except WireError as e:
                self._invalid_reply(str(e))
                return
            if parser.idle:
                self._replies = None
        last = len(replies) - 1
        for i, r in enumerate(replies):
            # Whether the server sent more after this reply (STARTTLS injection).
            self._trailing = i < last or self._replies is not None
            self._on_reply(r)
            if self.phase is CLOSED:
                break

    def server_lost(self):
        """The backend closed; tell the client what that means for it."""
        ev = self._ev = []
        if self.phase is CLOSED or self._drop is not None:
            # A refused message dropped the backend on purpose; the client is
            # answered at its end of data.
            return ev
        if self.phase is PASSTHROUGH:
            ev.append(Close("server closed"))
        elif self._server_tls_pending or (self._greeting is not None and self._wants_tls()):
            # Still securing the backend leg: the client has no greeting yet.
            self._close("backend_tls_failed", "backend TLS failed")
        elif self._greeting is not None:
            self._close("backend_lost", "backend lost before the greeting")
        else:
            self._lost_in_session()
        return ev

    def _lost_in_session(self):
        """The backend closed after the greeting: a normal end after QUIT, else the client is told."""
        if self.verbs and self.verbs.get(b"QUIT") and not self.in_message():
            # The client said QUIT: the server closing is the normal end.
            self._ev.append(Close("server closed after QUIT"))
        elif self.phase is DATA or self._chunk_forward or any(
                p.verb is END_OF_DATA and p.local is None for p in self._pending):
            self._message_lost(TEMPFAILED, reply("backend_lost_data"))
            self._close("backend_lost_data", "backend lost during message")
        else:
            self._close("backend_lost", "backend lost")

    def client_lost(self):
        """The client closed; return how to end the backend leg."""
        ev = self._ev = []
        if self.in_message():
            self._message_lost(DROPPED, b"")
            ev.append(AbortServer("client lost mid-message"))
        self._enter(CLOSED)
        return ev

    def timeout_reply(self, reason):
        """``421 4.4.2 ...`` to the client; QUIT to the server unless mid-message."""
        return reply(reason), (b"" if self.in_message() else b"QUIT\r\n")

    def partial_command(self):
        """True while part of a command line has arrived but not its end (``command-timeout``)."""
        return self.phase is COMMAND and self._lines is not None and self._lines.pending > 0

    def reading_data(self):
        """True while the client's bytes are message data (DATA, BDAT chunks: ``min-data-rate``)."""
        return self.phase is DATA or self.phase is CHUNK

    def awaiting_replies(self):
        """True while the client is owed replies (server's or the gateway's)."""
        return bool(self._pending) and self.phase is not CLOSED

    def in_message(self):
        """True while message data is flowing to the backend."""
        return self.phase is DATA or (self.phase is CHUNK and self._chunk_forward) or (
            self._txn_body == "BDAT"
        )

    def client_tls_ready(self):
        """The client leg is now TLS (implicit TLS listener, or STARTTLS done)."""
        self.client_tls = True
        return []

    # -- helpers --------------------------------------------------------------

    def _enter(self, phase):
        """Move to ``phase``, as `TRANSITIONS` allows; a transition it does not list is a bug (assertion)."""
        assert phase is self.phase or phase in TRANSITIONS[self.phase], (self.phase, phase)
        self.phase = phase

    def _max_line(self):
        return _command_line_limit(self.rule.max_command_line)

    def _close(self, reply_name, reason):
        if reply_name is not None:
            self._ev.append(ToClient(reply(reply_name)))
        self._ev.append(Close(reason))
        self._enter(CLOSED)

    def _forward(self, data, verb, last=False, ref=None, message=None):
        if len(self._pending) >= MAX_PENDING:
            self._close("queue_overflow", "pending queue overflow")
            return
        self._ev.append(ToServer(data))
        self._owe(Pending(verb, None, last, ref, message))
        if verb in C.GROUP_ENDING:
            self._group_end += 1

    def _owe(self, entry):
        """Queue one reply the client is owed."""
        if self._pending:
            self._pending.append(entry)
        else:
            self._pending = [entry]

    def _reset_txn(self):
        if self._txn is not None:
            # The filters' transaction ends without a verdict.
            if self._txn.spooling:
                self._ev.append(DropSpool())
            self._txn = None
            self._ev.append(FilterAbort())
        self._in_txn = False
        self._rcpts = 0
        self._body_type = b"7BIT"
        self._txn_body = None

    def _set_line_limit(self, limit):
        self._line_limit = limit
        if self._lines is not None:
            self._lines.limit = limit

    def _set_ext(self, ext):
        """What the client may use from now on (an EHLO reply, HELO, STARTTLS)."""
        self._ext = ext

    # -- client: before the greeting --------------------------------------------

    # -- client: command lines ------------------------------------------------------

    def _command_bytes(self, data):
        lines = self._lines
        if lines is None and data[-2:] == b"\r\n" and data.count(b"\n") == data.count(b"\r\n"):
            # Whole CRLF-ended lines and nothing held from before (a pipelined
            # group, as clients send it): split once instead of line by line.
            # What follows the line being handled counts as pending input
            # (``_unread``), as it would in the line buffer.
            end = len(data)
            pos = 0
            for line in data[:-2].split(b"\r\n"):
                pos += len(line) + 2
                self._unread = end - pos
                self._line(line if len(line) + 2 <= self._line_limit else LineBuffer.TOO_LONG, False)
                if self.phase is not COMMAND:
                    self._unread = 0
                    return data[pos:]
            self._unread = 0
            return b""
        if lines is None:
            lines = self._lines = LineBuffer(self._line_limit)
        lines.push(data)
        while self.phase is COMMAND:
            item = lines.pop()
            if item is None:
                if lines.idle:
                    self._lines = None
                return b""
            self._line(*item)
        rest = lines.take()
        if lines.idle:
            self._lines = None
        return rest

    def _buffered(self):
        """Client octets received but not yet handled as commands."""
        return self._unread + (self._lines.pending if self._lines is not None else 0)

    def _line(self, line, bare):
        """One client line: the framing's verdicts first (synchronisation, length, bare LF, SASL), then the command."""
        # The per-command path of every session: kept to plain attribute
        # reads and C-level bytes operations.
        if len(self._pending) > self._internal and (self._group_end or b"PIPELINING" not in self._ext.keywords):
            self._sync_error("command sent before the reply to the previous one")
        elif line is LineBuffer.TOO_LONG:
            self._bad(reply("line_too_long"), "SMTP_LINE_TOO_LONG", "line too long")
        elif bare and self.rule.bare_newline == "reject":
            self._bad(reply("bare_newline_command"), "SMTP_BARE_NEWLINE", "bare <LF> in command")
        elif self._sasl:
            self._sasl_line(line)
        else:
            self._command(line)

    def _sync_error(self, why):
        """The one PIPELINING synchronisation rule's consequence (RFC 2920): 554, and the session closes."""
        self._alert("SMTP_SYNC_ERROR", why)
        self._close("sync", "pipelining violation")

    def _command(self, line):
        """A command line: its verb against the mode's allowlist and the line limit, then its own rule."""
        sp = line.find(b" ")
        if sp < 0:
            verb, rest = line.upper(), b""
        else:
            verb, rest = line[:sp].upper(), line[sp + 1 :]
        self.commands += 1
        if self.trace:
            self._ev.append(Trace("client", C.loggable_verb(verb), len(line) + 2, self.phase))
        size = len(line) + 2
        base = self.rule.max_command_line
        # One rule for every verb, allowed or not: a line over the limit is
        # answered here and never forwarded.  command_limit() >= base: only
        # a line longer than base needs it.
        if size > base and size > C.command_limit(verb, self._ext, base):
            self._bad(reply("line_too_long"), "SMTP_LINE_TOO_LONG", "line too long")
            return
        if verb not in self.mode.verbs:
            # No allowed verb looks like HTTP or a header: only check the rest.
            if C.is_non_smtp(verb, rest):
                self._alert("NON_SMTP_COMMAND", "non-SMTP command (%s)" % C.loggable_verb(verb))
                self._close("non_smtp", "non-SMTP command")
            else:
                self._illegal(line, verb, "not allowed")
            return
        if b"\0" in line or b"\r" in line:
            self._illegal(line, verb, "not allowed")
            return
        if self._dialogue is not None and self._policy_command(verb, line):
            return
        self._allowed(verb, rest, line)

    def _allowed(self, verb, rest, line):
        """An allowed command: counted, checked by its verb's rule, then forwarded (unless the rule dealt with it)."""
        verbs = self.verbs
        if verbs is None:
            verbs = self.verbs = {}
        verbs[verb] = verbs.get(verb, 0) + 1
        handler = _VERB_HANDLERS.get(verb)
        if handler is not None:
            try:
                if handler(self, verb, rest, line) is False:
                    return
            except C.CommandError as e:
                self._illegal(line, verb, str(e))
                return
        self._forward(line + b"\r\n", verb)

    def _bad(self, answer, tag, text):
        """Count a bad command; answer it, or end the session at the limit."""
        self.bad_commands += 1
        self._alert(tag, text)
        if self.bad_commands >= self.rule.max_bad_commands:
            self._close("too_many_errors", "too many errors")
        elif answer is not None:
            self._answer(answer)
            return True
        return False

    def _illegal(self, line, verb, why):
        if verb == b"BDAT" and self.phase is COMMAND:
            self._consume_refused_chunk(line)
        self.bad_commands += 1
        self._alert(
            "SMTP_INVALID_COMMAND",
            "Invalid SMTP command (%s): %s" % (C.loggable_verb(verb), why),
            verb=C.loggable_verb(verb),
        )
        if self.bad_commands >= self.rule.max_bad_commands:
            self._close("too_many_errors", "too many errors")
            return
        self._forward(C.rewrite_illegal(line), ILLEGAL)

    def _sasl_line(self, line):
        self._sasl = False
        if self._filtered and self._auth_user is _LOGIN_USER:
            self._auth_user = _b64(line)
        if self.trace:
            self._ev.append(Trace("client", "<sasl>", len(line) + 2, self.phase))
        self._set_line_limit(self._max_line())
        if len(line) + 2 > SASL_LIMIT or not C.check_sasl_response(line):
            # Never log the content: it may be a credential.
            self._alert("SMTP_INVALID_COMMAND", "Invalid SASL response", verb="<sasl>")
            self._answer(b"501 5.5.2 Invalid SASL response\r\n")
            return
        self._forward(line + b"\r\n", SASL)

    # -- per-verb rules: (verb, the rest after it, the whole line); False when dealt with --

    def _mail(self, verb, rest, line):
        sender, size, body = C.check_mail_from(rest, self._ext, self.mode)
        if size is not None and size > self.rule.max_data:
            self._alert("SMTP_MAX_DATA", "declared SIZE %d exceeds max-data" % size)
            self._answer(reply("max_data"))
            return False
        self._reset_txn()
        self._in_txn = True
        self._body_type = body
        self._sender = sender
        if self._filtered:
            return self._ask_filters(verb, rest, line)

    def _rcpt(self, verb, rest, line):
        C.check_rcpt(rest, self._ext, self.mode)
        if self._rcpts >= self.rule.max_recipients:
            self._alert("SMTP_MAX_RECIPIENTS", "more than %d recipients" % self.rule.max_recipients)
            self._answer(reply("too_many_recipients"))
            return False
        self._rcpts += 1
        if self._filtered and self._txn is not None:
            return self._ask_filters(verb, rest, line)

    def _data(self, verb, rest, line):
        if self._body_type == b"BINARYMIME" or self._txn_body == "BDAT":
            self._answer(reply("bad_sequence"))
            return False
        if self._filtered:
            # Nothing reaches the server before the filters approve: the
            # gateway answers DATA itself, once the envelope's replies are in.
            self._group_end += 1
            self._local_decision(Pending(b"DATA", local=DECIDE))
            return False

    def _consume_refused_chunk(self, line):
        """RFC 3030: the octets announced by a refused BDAT are still chunk data."""
        try:
            size, last = C.parse_bdat(C.split_verb(line)[1])
        except C.CommandError:
            return
        self._enter(CHUNK)
        self._chunk_left = size
        self._chunk_last = last
        self._chunk_forward = False

    def _bdat(self, verb, rest, line):
        size, last = C.parse_bdat(rest)
        if not self._ext.has(b"CHUNKING"):
            raise C.CommandError("CHUNKING not advertised")
        if not self._in_txn or self._txn_body == "DATA":
            self._consume_refused_chunk(line)
            self._answer(reply("bad_sequence"))
            return False
        self._enter(CHUNK)
        self._chunk_left = size
        self._chunk_last = last
        self._txn_body = "BDAT"
        self._chunk_forward = True
        if self._filtered and self._txn is not None:
            chunk = _Chunk()
            self._txn.stuffed = False
            self._txn.spooling = True
            self._local_decision(Pending(b"BDAT", local=DECIDE, last=last, ref=chunk))
            return False
        self._forward(line + b"\r\n", verb, last=last,
                      message=(self._sender, self._chunk_size + size) if last else None)
        return False

    def _auth_needs_tls(self):
        """True while AUTH must wait for the client's STARTTLS (``auth-requires-tls``)."""
        return self.rule.auth_requires_tls and not self.client_tls

    def _auth(self, verb, rest, line):
        if self._auth_needs_tls():
            # RFC 4954 section 4: the credentials must not cross in clear.
            self._bad(reply("auth_needs_tls"), "SMTP_AUTH_WITHOUT_TLS", "AUTH before STARTTLS refused")
            return False
        if self._authenticated or self._in_txn:
            raise C.CommandError("AUTH not allowed now")
        C.check_auth(rest, self._ext)
        if self._filtered:
            self._auth_user = _sasl_user(rest)

    def _etrn(self, verb, rest, line):
        C.check_etrn(rest, self._ext)

    def _starttls(self, verb, rest, line):
        if rest:
            raise C.CommandError("STARTTLS takes no argument")
        if self._tls == "strip":
            # The gateway answers; the server never sees it, and what the
            # client pipelined after it stays ordinary plaintext.
            self._answer(reply("tls_not_available"))
            return False
        if self.client_tls:
            self._answer(reply("tls_again"))
            return False
        if self._buffered():
            # CVE-2011-0411 class: bytes after STARTTLS would be executed as
            # if they had come inside TLS.
            self._alert("STARTTLS_INJECTION", "client pipelined data after STARTTLS")
            self._close("starttls_injection", "STARTTLS injection")
            return False
        if self._pending:
            self._sync_error("STARTTLS before the previous reply")
            return False
        if self._tls == "passthrough":
            return None  # forwarded; the server's 220 switches to passthrough
        self._ev.append(ToClient(reply("tls_ready")))
        self._ev.append(StartTLS("client"))
        # RFC 3207 4.2: nothing learned before TLS survives it.
        self._set_ext(_NO_EXTENSIONS)
        self._authenticated = False
        if self._filtered:
            self.authenticated_as = None
        if self._in_txn:
            self._gateway_command(b"RSET\r\n", GW_RSET)
        self._reset_txn()
        self.client_tls = True
        return False

    def _hello(self, verb, rest, line):
        self._reset_txn()
        if self._filtered:
            self.helo = rest.strip() or None

    def _rset(self, verb, rest, line):
        self._reset_txn()

    # -- client: message data ------------------------------------------------

    # One path for the message whichever command carries it: DATA (after the
    # scanner's normalisation) and BDAT chunks meet in `_message_octets`,
    # `_refuse_message` and `_refused_end`.

    def _data_bytes(self, data):
        scanner = self._scanner
        segs, rest = scanner.feed(data)
        if self._drop is None:
            if scanner.bare and self.rule.bare_newline == "reject":
                if scanner.nul:
                    self._refuse_message("nul_data", "SMTP_BARE_NEWLINE", "NUL in message data, refused",
                                         "bare newline")
                else:
                    self._refuse_message("bare_newline_data", "SMTP_BARE_NEWLINE",
                                         "bare <CR> or <LF> in message data, refused", "bare newline")
            elif scanner.overflow:
                self._refuse_message("max_data", "SMTP_MAX_DATA", "message exceeds max-data %d" % self.rule.max_data,
                                     "max-data exceeded")
            elif segs:
                if scanner.bare and not self._bare_logged:
                    self._bare_logged = True
                    self._alert("SMTP_BARE_NEWLINE", "bare <CR> or <LF> in message data, normalized")
                data = segs[0] if len(segs) == 1 else b"".join(segs)
                if self._txn is not None and rest is not None:
                    data = data[:-3]  # the .CRLF end: the gateway sends its own once the filters approve
                self._message_octets(data, True)
        if rest is None:
            return b""
        self._scanner = None
        return self._data_end(scanner.size, rest)

    def _data_end(self, size, rest):
        """CRLF . CRLF: the message is over; ``rest`` is what the client sent after it."""
        if self._drop is not None:
            self._refused_end(size)
            return b""
        if self._txn is not None:
            # Whole in the spool: hold the client until the verdict.
            self._txn.size = size
            self._enter(WAIT)
            self._ev.append(PauseClient())
            self._ev.append(MessageSpooled(size, True))
            return rest
        self._enter(COMMAND)
        self._owe(Pending(END_OF_DATA, None, False, None, (self._sender, size)))
        self._ev.append(MessageSent(size))
        if self.trace:
            self._ev.append(Trace("client", "<end-of-data>", size, DATA))
        return rest

    def _message_octets(self, data, stuffed):
        """Octets of the message: to the server, or to the spool when the rule has filters (``stuffed``: DATA)."""
        if data:
            self._ev.append(ToServer(data) if self._txn is None else ToSpool(data, stuffed))

    def _refuse_message(self, name, tag, text, why):
        """The message will never complete at the server (reply ``name`` at its real end): drop the backend now."""
        self._drop = name
        self._alert(tag, text)
        self._ev.append(AbortServer(why))

    def _refused_end(self, size):
        """The real end of a refused message: the client gets the refusal, then 421, and the session closes."""
        self._ev.append(MessageDone(self._sender, self._accepted, size, REJECTED, reply(self._drop)))
        self._ev.append(ToClient(reply(self._drop)))
        self._close("closing", "message refused")

    def _chunk_bytes(self, data):
        n = self._chunk_left
        piece, rest = (data, b"") if len(data) <= n else (data[:n], data[n:])
        self._chunk_left = n - len(piece)
        if self._chunk_forward and self._drop is None:
            self._chunk_size += len(piece)
            if self._chunk_size > self.rule.max_data:
                self._refuse_message("max_data", "SMTP_MAX_DATA", "message exceeds max-data %d" % self.rule.max_data,
                                     "max-data exceeded")
            else:
                self._message_octets(piece, False)
        if self._chunk_left == 0:
            return self._chunk_end(rest)
        return rest

    def _chunk_end(self, rest):
        """The chunk's last octet: back to commands (or, a filtered message's last chunk, to its verdict)."""
        self._enter(COMMAND)
        forwarded, self._chunk_forward = self._chunk_forward, False
        if not forwarded:
            return rest  # a refused chunk's octets, consumed
        if self._drop is not None:
            self._refused_end(self._chunk_size)
            return b""
        if self._txn is not None:
            self._chunk_done()
        elif self._chunk_last:
            self._ev.append(MessageSent(self._chunk_size))
        return rest

    # -- server replies ---------------------------------------------------------

    def _invalid_reply(self, why):
        self._alert("SMTP_INVALID_REPLY", "invalid reply from server: %s" % why)
        self._close("invalid_reply", "invalid reply")

    def _on_reply(self, r):
        pending = self._pending
        if not pending:
            if r.code == 421:
                self._ev.append(ToClient(r.raw))
                self._ev.append(Close("server closing"))
                self._enter(CLOSED)
            else:
                self._invalid_reply("reply without a command")
            return
        head = pending.pop(0)
        if not pending:
            self._pending = ()
        verb = head.verb
        if self.trace:
            self._ev.append(Trace("server", C.printable_verb(verb), len(r.raw), self.phase, r.code))
        if verb in C.GROUP_ENDING:
            self._group_end -= 1
        rule = _REPLY_RULES.get(verb)
        # A rule returns what to relay, or None when it dealt with the reply.
        out = r.raw if rule is None else rule(self, head, r)
        if out is None:
            return
        if self._dialogue is not None and self._policy_reply(r):
            return
        self._ev.append(ToClient(out))
        if pending and pending[0].local is not None:
            self._flush_local()

    # -- what each reply means, by the command it answers -----------------------

    def _ehlo_reply(self, head, r):
        if r.code == 250 and self.mode.esmtp:
            return self._filter_ehlo(r)
        self._set_ext(_NO_EXTENSIONS)
        return r.raw

    def _helo_reply(self, head, r):
        self._set_ext(_NO_EXTENSIONS)
        return r.raw

    def _data_reply(self, head, r):
        if r.code == 354 and not self._start_data(self._buffered() or self._pending):
            return None
        return r.raw

    def _start_data(self, early):
        """A 354 (the server's, or the gateway's for a filtered rule): message data follows.

        ``early``: the client already sent bytes it had to hold back until
        the 354 (a synchronisation error: the session closes).  Returns
        whether the message may begin.
        """
        if early:
            self._sync_error("message data sent before the 354 reply")
            return False
        self._enter(DATA)
        self._txn_body = "DATA"
        self._scanner = DataScanner(self.rule.max_data)
        self._drop = None
        self._bare_logged = False
        return True

    def _end_of_data_reply(self, head, r):
        self._message_done(head, r)
        if self.phase is WAIT:
            # The gateway delivered an approved message: this is the
            # client's answer to its end of data; then read it again.
            self._ev.append(ToClient(r.raw))
            self._txn = None
            self._resume()
            return None
        self._reset_txn()
        return r.raw

    def _message_done(self, head, r):
        """The server answered a whole message: its fate, for the MESSAGE line."""
        sender, size = head.message or (self._sender, 0)
        self._ev.append(MessageDone(sender, self._accepted, size, outcome_of(r.code), r.raw))

    def _message_lost(self, outcome, answer):
        """The message in transfer (or awaiting its reply) will never be answered by the server."""
        entry = next((p for p in self._pending if p.message is not None), None)
        if entry is not None:
            sender, size = entry.message
        else:
            sender = self._sender
            size = self._scanner.size if self._scanner is not None else self._chunk_size
        self._ev.append(MessageDone(sender, self._accepted, size, outcome, answer))

    def _bdat_reply(self, head, r):
        if head.last:
            self._message_done(head, r)
        if head.last or r.code >= 400:
            self._reset_txn()
            self._chunk_size = 0
        return r.raw

    def _mail_reply(self, head, r):
        self._accepted = 0
        if r.code >= 300:
            self._in_txn = False
        if head.verb is F_MAIL and self._txn is not None:
            self._txn.mail_ok = r.code < 300
            self._ev.append(FilterReply(b"MAIL", r.code, b"\r\n".join(r.texts())))
        return r.raw

    def _filtered_rcpt_reply(self, head, r):
        head.ref.accepted = r.code < 300
        self._ev.append(FilterReply(b"RCPT", r.code, b"\r\n".join(r.texts())))
        return self._rcpt_reply(head, r)

    def _rcpt_reply(self, head, r):
        if r.code < 300:
            self._accepted += 1
        return r.raw

    def _starttls_reply(self, head, r):
        out = r.raw
        if r.code == 220:
            # The client cannot have sent more: STARTTLS with anything after it closed the session.
            if self._passthrough(out, self._trailing, False):
                self._enter(PASSTHROUGH)
            return None
        return out

    def _auth_reply(self, head, r):
        if r.code == 334:
            self._sasl = True
            self._set_line_limit(SASL_LIMIT)
        elif r.code == 235:
            self._authenticated = True
            if self._filtered and self._auth_user is not _LOGIN_USER:
                self.authenticated_as = self._auth_user
        return r.raw

    def _filter_ehlo(self, r):
        """The EHLO reply as the rule lets the client see it (`mailguard.smtp_rules.filter_ehlo`)."""
        view = filter_ehlo(
            r.code, r.texts(), self.rule, self._tls,
            offer_starttls=self._tls == "terminate" and not self.client_tls,
            hide_auth=self._auth_needs_tls(),
            masked=self._policy_ehlo if self._dialogue is not None else _NOTHING_MASKED,
        )
        if self.phase is CLOSED:
            return None  # a content rule dropped the session
        for kw in view.removed:
            if self._removed is None:
                self._removed = set()
            if kw not in self._removed:
                self._removed.add(kw)
                name = C.printable_verb(kw)
                self._alert("EHLO_KEYWORD_REMOVED", "%s removed from the EHLO reply" % name, keyword=name)
        self._set_ext(C.Extensions(view.keywords))
        return view.reply

    # -- content rules in the dialogue (mailguard.matching) ------------------------------

    def _policy(self, decision):
        """Alert each fired match; carry out drop-connection and reset; return the deciding action."""
        for m in decision.fired:
            self._alert("SMTP_POLICY_MATCH", decision.alert_text(m), match=m.name, action=m.action_text,
                        criterion=m.describe())
        if decision.action == "drop-connection":
            self._close("policy_drop", "policy match %s" % decision.match.name)
        elif decision.action == "reset":
            self._ev.append(Close("policy match %s" % decision.match.name, reset=True))
            self._enter(CLOSED)
        return decision.action

    def _policy_command(self, verb, line):
        """cmd-* matches on a command line; True when the command was dealt with."""
        decision = self._dialogue.on_command(verb, line)
        if decision is None or self._policy(decision) == "log":
            return False
        if decision.action in ("reject", "mask") and verb == b"BDAT":
            self._consume_refused_chunk(line)
        if decision.action == "reject":
            self._answer(reply("policy_command"))
        elif decision.action == "mask":
            self._forward(C.rewrite_illegal(line), ILLEGAL)
        return True

    def _policy_reply(self, r):
        """reply matches on a server reply about to be relayed; True when it must not be."""
        decision = self._dialogue.on_reply(r.code, r.texts())
        return decision is not None and self._policy(decision) != "log"

    def _policy_ehlo(self, keyword):
        """ehlo-reply-parameter matches on one offered keyword; True when it is removed."""
        decision = self._dialogue.on_ehlo_keyword(keyword)
        return decision is not None and self._policy(decision) != "log"


class FilteredSMTPInspector(SMTPInspector):
    """`SMTPInspector` for a rule with message filters (content rules, milters, plugins).

    Envelope commands wait for the filters, messages go to the spool and
    reach the server only once approved (see `mailguard.smtp_filtering.FilterSteps`).
    """

    __slots__ = ("_txn", "helo", "authenticated_as", "_auth_user", "_dialogue")

    _filtered = True

    def __init__(self, rule, mode):
        super().__init__(rule, mode)
        self._dialogue = dialogue_of(rule)  # content rules of the dialogue, or None
        self._txn = None
        #: The client's HELO/EHLO name.
        self.helo = None
        #: The user name the server accepted with AUTH (never logged).
        self.authenticated_as = None
        self._auth_user = None  # the name being tried, until 235


class DialogueSMTPInspector(SMTPInspector):
    """`SMTPInspector` for a rule whose content rules all act in the dialogue (commands, replies, EHLO).

    No message filter: nothing is held or spooled.
    """

    __slots__ = ("_dialogue",)

    def __init__(self, rule, mode):
        super().__init__(rule, mode)
        self._dialogue = dialogue_of(rule)


def build(rule, mode):
    """The inspector of one session under ``rule``: filtered when the rule has message filters."""
    if chain_of(rule):
        return FilteredSMTPInspector(rule, mode)
    if dialogue_of(rule) is not None:
        return DialogueSMTPInspector(rule, mode)
    return SMTPInspector(rule, mode)


GatewayDialogue.INTERNAL_REPLIES.update({
    GW_MAIL: FilterSteps._delivery_step_done,
    GW_RCPT: FilterSteps._delivery_step_done,
    GW_DATA: FilterSteps._delivery_data_done,
})

_VERB_HANDLERS = {
    b"MAIL": SMTPInspector._mail,
    b"RCPT": SMTPInspector._rcpt,
    b"DATA": SMTPInspector._data,
    b"BDAT": SMTPInspector._bdat,
    b"AUTH": SMTPInspector._auth,
    b"ETRN": SMTPInspector._etrn,
    b"STARTTLS": SMTPInspector._starttls,
    b"HELO": SMTPInspector._hello,
    b"EHLO": SMTPInspector._hello,
    b"RSET": SMTPInspector._rset,
}

_REPLY_RULES = {
    SERVER_GREETING: SMTPInspector._greeting_reply,
    GW_EHLO: SMTPInspector._gateway_reply,
    GW_STARTTLS: SMTPInspector._gateway_reply,
    GW_RSET: SMTPInspector._gateway_reply,
    GW_XCLIENT: SMTPInspector._gateway_reply,
    b"EHLO": SMTPInspector._ehlo_reply,
    b"HELO": SMTPInspector._helo_reply,
    b"DATA": SMTPInspector._data_reply,
    END_OF_DATA: SMTPInspector._end_of_data_reply,
    b"BDAT": SMTPInspector._bdat_reply,
    b"MAIL": SMTPInspector._mail_reply,
    F_MAIL: SMTPInspector._mail_reply,
    F_RCPT: SMTPInspector._filtered_rcpt_reply,
    GW_MAIL: SMTPInspector._gateway_reply,
    GW_RCPT: SMTPInspector._gateway_reply,
    GW_DATA: SMTPInspector._gateway_reply,
    b"RCPT": SMTPInspector._rcpt_reply,
    b"STARTTLS": SMTPInspector._starttls_reply,
    b"AUTH": SMTPInspector._auth_reply,
    SASL: SMTPInspector._auth_reply,
}
