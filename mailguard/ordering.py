"""What every line-based inspector shares: replies owed in order, alerts, early talkers.

`OrderedReplies` is mixed into the SMTP, POP3 and IMAP inspectors.  Each
command forwarded or answered gets an entry in ``self._pending``; the
gateway's own replies wait there behind the server's replies still owed,
so the client sees them in the order of its commands.
"""

from mailguard.events import Alert, ToClient

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
