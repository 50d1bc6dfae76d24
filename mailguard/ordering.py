"""What every line-based inspector shares: replies owed in order, alerts, early talkers.

`OrderedReplies` is mixed into the SMTP, POP3 and IMAP inspectors.  Each
command forwarded or answered gets an entry in ``self._pending``; the
gateway's own replies wait there behind the server's replies still owed,
so the client sees them in the order of its commands.
"""

from mailguard.events import Alert, Passthrough, ToClient

#: Most replies owed to a client at once; more closes the session.
MAX_PENDING = 1000


class OrderedReplies:
    """Mixin for an inspector with ``_pending`` (a list or deque), ``_ev`` (the events being built),
    ``_held`` (pregreet bytes), ``rule`` and ``_close(reply_name, reason)``.

    Subclasses say how a local reply is queued (`_local_entry`) and how much
    a client may send before the greeting under ``pregreet = ignore``
    (`_held_limit`).
    """

    __slots__ = ()

    def _local_entry(self, data):
        """The pending-queue entry holding the gateway's own reply ``data``."""
        raise NotImplementedError

    def _held_limit(self):
        """Most bytes held from a client that talks before the greeting."""
        raise NotImplementedError

    def _alert(self, tag, text, **fields):
        self._ev.append(Alert(tag, text, fields))

    def _answer(self, data):
        """Send the gateway's own reply now, or queue it behind the replies still owed."""
        if not self._pending:
            self._ev.append(ToClient(data))
        elif len(self._pending) >= MAX_PENDING:
            self._close("queue_overflow", "pending queue overflow")
        else:
            self._pending.append(self._local_entry(data))

    def _flush_local(self):
        """Send the gateway's replies that have reached the head of the queue."""
        pending = self._pending  # a list or a deque
        while pending and pending[0].local is not None:
            self._ev.append(ToClient(pending[0].local))
            del pending[0]

    def _pregreet(self, data):
        """The client talked before the greeting: refuse, or hold (bounded) under ``ignore``."""
        self._alert("PREGREET", "client sent %d bytes before the greeting" % len(data))
        if self.rule.pregreet == "reject":
            self._close("pregreet", "pregreet")
            return b""
        self._held += data
        if len(self._held) > self._held_limit():
            self._close("pregreet", "pregreet overflow")
        return b""

    def _passthrough(self, answer, server_extra, client_extra, command=b"STARTTLS"):
        """The server accepted a relayed STARTTLS/STLS (``tls = passthrough``): relay ``answer``, then stop inspecting.

        The injection rule, both ways (CVE-2011-0411, RFC 2595): server bytes
        after its positive answer (``server_extra``) or client bytes sent
        before it (``client_extra``) close the session instead.  Returns
        whether the session is now passed through; the caller changes phase.
        """
        name = command.decode("ascii")
        if server_extra:
            self._alert("STARTTLS_INJECTION", "server sent data after its positive answer to %s" % name)
            self._close("backend_injection", "server %s injection" % name)
            return False
        if client_extra:
            self._alert("STARTTLS_INJECTION", "client sent data before the server's answer to %s" % name)
            self._close("starttls_injection", "%s injection" % name)
            return False
        self._ev.append(ToClient(answer))
        self._alert("TLS_PASSTHROUGH", "TLS passthrough: session no longer inspected")
        self._ev.append(Passthrough())
        return True

