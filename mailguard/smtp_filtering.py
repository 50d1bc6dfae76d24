"""The message-filter seam, the inspector's side (sans-IO): envelope and message wait for the filters' verdicts.

`FilterSteps` is mixed into `mailguard.smtp.SMTPInspector` (used by
`mailguard.smtp.FilteredSMTPInspector`, the inspector of a rule with
filters).  A filtered ``MAIL``/``RCPT`` is held (`FilterEnvelope`, phase
``WAIT``) until ``envelope_verdict``; ``DATA`` is answered by the gateway and
the message goes to the spool (`ToSpool`), never to the server, until
``message_verdict``; an approved message is then delivered by the gateway
itself (recipient changes, ``DATA`` or ``BDAT n LAST`` and `SendSpool`).
The shell's side is `mailguard.filtering`.
"""

from mailguard import filters as F
from mailguard.events import (
    DISCARDED, DROPPED, QUARANTINED, REJECTED, TEMPFAILED, Close, DropSpool, FilterEnvelope, MessageDone,
    MessageSent, MessageSpooled, PauseClient, ResumeClient, SendSpool, ToClient, ToServer, outcome_of,
)
from mailguard.ordering import MAX_PENDING
from mailguard.replies import reply
from mailguard.smtp_state import (
    CLOSED, COMMAND, DECIDE, END_OF_DATA, F_MAIL, F_RCPT, GW_DATA, GW_MAIL, GW_RCPT, GW_RSET, HOLD_LIMIT, WAIT,
    Pending,
)


class _Recipient:
    """A filtered RCPT: its address, its line, and whether the server accepted it."""

    __slots__ = ("address", "line", "accepted")

    def __init__(self, address, line):
        self.address = address
        self.line = line
        self.accepted = None


class _Chunk:
    """A spooled BDAT chunk, complete once all its octets arrived."""

    __slots__ = ("complete",)

    def __init__(self):
        self.complete = False


class _FilteredTxn:
    """The transaction of a filtered session: what the gateway must replay once filters approve."""

    __slots__ = ("mail_line", "mail_ok", "recipients", "waiting", "stuffed", "size", "refused", "spooling")

    def __init__(self):
        self.mail_line = None
        self.mail_ok = None
        self.recipients = []
        self.waiting = None  # (verb, line, recipient) of the command awaiting its verdict
        self.stuffed = True
        self.size = 0
        self.refused = False
        self.spooling = False

    def accepted(self):
        """The recipients the server accepted."""
        return [r for r in self.recipients if r.accepted]


def _envelope_parts(rest):
    """``FROM:<path> params`` (already validated) -> (address without brackets, parameters)."""
    rest = rest[rest.index(b":") + 1 :].lstrip(b" ")
    if rest[:1] == b"<":
        end = rest.find(b">")
        return rest[1:end], rest[end + 1 :].strip()
    path, _, params = rest.partition(b" ")
    return path, params.strip()


# -- message filters: the core's side of the seam (the shell's is mailguard.filtering) --


class FilterSteps:
    """The filtered-session steps of `SMTPInspector`, kept in one place.

    Envelope commands wait for ``envelope_verdict``; a message goes to the
    spool (`ToSpool`), never to the server, and waits for ``message_verdict``;
    an approved message is delivered by the gateway itself (recipient
    changes, then ``DATA`` or ``BDAT n LAST`` and the spool).  While a verdict
    is pending the client's input is held (`WAIT`, `PauseClient`).
    """

    __slots__ = ()

    def _ask_filters(self, verb, rest, line):
        """Hold ``line`` (MAIL or RCPT) and ask the filters; False: not forwarded now."""
        address, params = _envelope_parts(rest)
        if verb == b"MAIL":
            self._txn = _FilteredTxn()
            self._txn.waiting = (verb, line, None)
        else:
            self._txn.waiting = (verb, line, _Recipient(address, line))
        self._enter(WAIT)
        self._ev.append(PauseClient())
        self._ev.append(FilterEnvelope(verb, address, params))
        return False

    def _hold(self, data):
        self._held += data
        if len(self._held) > HOLD_LIMIT:
            self._close("queue_overflow", "too much input while a verdict is pending")
        return b""

    def _resume(self):
        """Read the client again and handle what it sent meanwhile."""
        self._enter(COMMAND)
        self._ev.append(ResumeClient())
        if self._held:
            held, self._held = self._held, b""
            self._client(held)

    def envelope_verdict(self, verdict):
        """The filters answered the MAIL or RCPT being held; return the events to carry out."""
        ev = self._ev = []
        txn = self._txn
        if self.phase is not WAIT or txn is None or txn.waiting is None:
            self._ev = None
            return ev
        verb, line, recipient = txn.waiting
        txn.waiting = None
        action = verdict.action
        if action == F.CONTINUE:
            self._enter(COMMAND)
            if verb == b"MAIL":
                txn.mail_line = line
                self._forward(line + b"\r\n", F_MAIL)
            else:
                txn.recipients.append(recipient)
                self._forward(line + b"\r\n", F_RCPT, ref=recipient)
            self._resume()
        elif action in (F.REJECT, F.TEMPFAIL):
            self._alert("FILTER_REFUSED", "%s refused by filter%s" % (verb.decode(), _because(verdict)), verb=verb.decode())
            self._enter(COMMAND)
            self._answer(verdict.client_reply())
            if verb == b"MAIL":
                self._txn = None
                self._in_txn = False
            else:
                self._rcpts -= 1
            self._resume()
        else:
            self._refuse_session(verdict)
        self._ev = None
        return ev

    def _refuse_session(self, verdict):
        if verdict.action == F.RESET:
            self._alert("FILTER_RESET", "session reset by filter%s" % _because(verdict))
            self._ev.append(Close("reset by filter", reset=True))
            self._enter(CLOSED)
            return
        self._alert("FILTER_DROP", "session dropped by filter%s" % _because(verdict))
        answer = verdict.reply if verdict.reply is not None else reply("policy_drop")
        self._ev.append(ToClient(answer))
        self._ev.append(Close("dropped by filter"))
        self._enter(CLOSED)

    def _local_decision(self, entry):
        """Queue a reply the gateway decides when every earlier reply is in."""
        if len(self._pending) >= MAX_PENDING:
            self._close("queue_overflow", "pending queue overflow")
            return
        self._owe(entry)
        if len(self._pending) == 1:
            self._flush_local()

    def _flush_local(self):
        """Send the gateway's replies at the head of the queue, deciding those marked `DECIDE`."""
        pending = self._pending
        while pending and pending[0].local is not None:
            head = pending[0]
            out = head.local
            if out is DECIDE:
                out = self._decide(head)
                if out is None:
                    return  # waits (a chunk still arriving, or a verdict)
            del pending[0]
            if out:
                self._ev.append(ToClient(out))
            if self.phase is CLOSED:
                return

    def _decide(self, head):
        """The gateway's reply to a filtered DATA or BDAT, once every earlier reply is in; None: not yet."""
        if head.verb == b"DATA":
            return self._decide_data()
        return self._decide_chunk(head)

    def _envelope_refusal(self):
        """The reply to DATA or BDAT when the server accepted no MAIL or no recipient, else None."""
        txn = self._txn
        if txn is None or not txn.mail_ok:
            return reply("need_mail")
        if not txn.accepted():
            return reply("no_valid_recipients")
        return None

    def _decide_data(self):
        self._group_end -= 1
        refusal = self._envelope_refusal()
        if refusal is not None:
            return refusal
        if not self._start_data(self._buffered()):
            return b""
        self._txn.spooling = True
        return reply("start_input")

    def _decide_chunk(self, head):
        # BDAT: answered once its octets are in.
        if not head.ref.complete:
            return None
        txn = self._txn
        refusal = self._envelope_refusal()
        if refusal is not None:
            if txn is not None:
                txn.refused = True
            if head.last:
                self._end_refused_chunks()
            return refusal
        if not head.last:
            return reply("chunk_received")
        txn.size = self._chunk_size
        self._ev.append(MessageSpooled(self._chunk_size, False))
        return None  # the verdict answers it

    def _end_refused_chunks(self):
        if self._txn is not None and self._txn.spooling:
            self._txn.spooling = False
            self._ev.append(DropSpool())
        self._txn = None
        self._reset_txn()
        self._chunk_size = 0
        if self.phase is WAIT:
            self._resume()

    def _chunk_done(self):
        """A spooled chunk is complete: its reply may be decided; after LAST, hold the client."""
        for entry in self._pending:
            if entry.ref is not None and entry.ref.__class__ is _Chunk and not entry.ref.complete:
                entry.ref.complete = True
                break
        if self._chunk_last:
            self._enter(WAIT)
            self._ev.append(PauseClient())
        if self._pending and self._pending[0].local is DECIDE:
            self._flush_local()

    def message_verdict(self, verdict, size=None):
        """The filters' verdict on the spooled message; ``size`` is its size after modifications."""
        ev = self._ev = []
        txn = self._txn
        if txn is None or self.phase is CLOSED:
            self._ev = None
            return ev
        pending = self._pending
        if pending and pending[0].local is DECIDE:
            del pending[0]  # the BDAT ... LAST entry: answered below
        action = verdict.action
        if action == F.ACCEPT:
            self._deliver(verdict, txn.size if size is None else size)
        elif action in (F.REJECT, F.TEMPFAIL, F.DISCARD, F.QUARANTINE):
            if action == F.DISCARD:
                self._alert("MESSAGE_DISCARDED", "message discarded by filter%s" % _because(verdict))
                answer, outcome = reply("discarded"), DISCARDED
            elif action == F.QUARANTINE:
                self._alert("MESSAGE_QUARANTINED", "message quarantined by filter%s" % _because(verdict))
                answer, outcome = reply("quarantined"), QUARANTINED
            else:
                self._alert("MESSAGE_REFUSED", "message refused by filter%s" % _because(verdict))
                answer = verdict.client_reply()
                outcome = REJECTED if action == F.REJECT else TEMPFAILED
            self._ev.append(MessageDone(self._sender, self._accepted, txn.size, outcome, answer))
            self._ev.append(ToClient(answer))
            self._txn = None
            self._reset_txn()
            self._chunk_size = 0
            # The server saw MAIL and RCPT only: end that transaction.
            self._gateway_command(b"RSET\r\n", GW_RSET)
            self._resume()
        else:
            self._ev.append(MessageDone(self._sender, self._accepted, txn.size, DROPPED, b""))
            self._refuse_session(verdict)
        self._ev = None
        return ev

    def _delivery_step_done(self, r):
        """The server's reply to the gateway's MAIL or RCPT when delivering an approved message."""
        if r.code >= 300:
            self._alert("FILTER_DELIVERY_REFUSED", "mail server refused a command when delivering an approved "
                        "message (%d)" % r.code, code=r.code)

    def _delivery_data_done(self, r):
        """The server's reply to the gateway's DATA: send the spool, or that reply is the client's answer."""
        size = self._txn.size if self._txn is not None else 0
        if r.code == 354:
            self._ev.append(SendSpool(b".\r\n"))
            self._owe(Pending(END_OF_DATA, message=(self._sender, size)))
            self._ev.append(MessageSent(size))
            return
        # No delivery (no valid recipient left...): that is the answer.
        self._ev.append(MessageDone(self._sender, self._accepted, size, outcome_of(r.code), r.raw))
        self._ev.append(ToClient(r.raw))
        self._txn = None
        self._reset_txn()
        self._resume()

    def _deliver(self, verdict, size):
        txn = self._txn
        added = [m for m in verdict.modifications if m.__class__ is F.AddRecipient]
        deleted = {m.address.lower() for m in verdict.modifications if m.__class__ is F.DeleteRecipient}
        if added or deleted:
            self._gateway_command(b"RSET\r\n", GW_RSET)
            self._gateway_command(txn.mail_line + b"\r\n", GW_MAIL)
            for r in txn.accepted():
                if r.address.lower() not in deleted:
                    self._gateway_command(r.line + b"\r\n", GW_RCPT)
            for m in added:
                params = b" " + m.parameters if m.parameters else b""
                self._gateway_command(b"RCPT TO:<%s>%s\r\n" % (m.address, params), GW_RCPT)
        txn.size = size
        self._chunk_size = 0
        if txn.stuffed:
            self._gateway_command(b"DATA\r\n", GW_DATA)
        else:
            self._ev.append(ToServer(b"BDAT %d LAST\r\n" % size))
            self._ev.append(SendSpool(b""))
            self._owe(Pending(END_OF_DATA, message=(self._sender, size)))
            self._ev.append(MessageSent(size))


#: AUTH LOGIN without an initial response: the user name is the first SASL line.
_LOGIN_USER = object()


def _b64(data):
    import binascii

    try:
        return binascii.a2b_base64(data) or None
    except (binascii.Error, ValueError):
        return None


def _sasl_user(rest):
    """The user name an AUTH command (PLAIN or LOGIN) names, if it can be known; never logged."""
    words = rest.split()
    mechanism = words[0].upper() if words else b""
    initial = words[1] if len(words) > 1 and words[1] != b"=" else None
    if mechanism == b"PLAIN" and initial is not None:
        parts = (_b64(initial) or b"").split(b"\0")
        return parts[1] if len(parts) == 3 else None
    if mechanism == b"LOGIN":
        return _b64(initial) if initial is not None else _LOGIN_USER
    return None


def _because(verdict):
    return " (%s)" % verdict.reason if verdict.reason else ""
