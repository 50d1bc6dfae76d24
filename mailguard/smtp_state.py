"""The SMTP inspector's state (sans-IO): its phases and their transitions, in one table, and the reply queue's entries.

The client side of a session is always in one phase.  `TRANSITIONS` is the
whole machine: what each phase may become, and why.  The inspector changes
phase only through ``_enter``, which checks the table, so a transition the
table does not list is a bug the tests and the fuzz harness catch.

Every reply the client is owed has a `Pending` entry in the inspector's
queue, in the order of the client's commands; the markers below name the
entries that do not answer a client verb (the greeting, the end of data,
the gateway's own commands on the backend leg).
"""

from dataclasses import dataclass

from mailguard.phases import CHUNK, CLOSED, COMMAND, DATA, GREETING, PASSTHROUGH, WAIT  # noqa: F401 (re-exported)

#: phase -> {next phase: what makes it so}.
TRANSITIONS = {
    GREETING: {
        COMMAND: "the server's greeting is relayed (after the gateway's own backend set-up)",
        CLOSED: "greeting refused, backend lost, pregreet",
    },
    COMMAND: {
        DATA: "354 to DATA (the server's, or the gateway's for a filtered rule)",
        CHUNK: "BDAT n: n octets of chunk data follow",
        WAIT: "a filtered MAIL or RCPT, or the last chunk of a filtered message",
        PASSTHROUGH: "220 to STARTTLS with tls = passthrough",
        CLOSED: "QUIT answered, too many errors, sync error, injection, ...",
    },
    DATA: {
        COMMAND: "CRLF . CRLF",
        WAIT: "CRLF . CRLF of a filtered message (in the spool, awaiting its verdict)",
        CLOSED: "message refused (max-data, bare newline), then 421",
    },
    CHUNK: {
        COMMAND: "the chunk's last octet",
        CLOSED: "message refused (max-data), then 421",
    },
    WAIT: {
        COMMAND: "the filters answered (and an approved message was delivered)",
        CLOSED: "drop or reset by a filter",
    },
    PASSTHROUGH: {
        CLOSED: "either side closed",
    },
    CLOSED: {},
}


# Pending-queue markers for replies that do not answer a client verb.
SERVER_GREETING = b"<greeting>"
END_OF_DATA = b"<end-of-data>"
SASL = b"<sasl>"
ILLEGAL = b"<illegal>"
# The gateway's own commands on the backend leg; their replies are not relayed.
GW_EHLO = b"<gateway EHLO>"
GW_STARTTLS = b"<gateway STARTTLS>"
GW_RSET = b"<gateway RSET>"
GW_XCLIENT = b"<gateway XCLIENT>"
# Message filters: envelope commands whose replies the filters are told, and
# the gateway's own delivery of an approved message.
F_MAIL = b"<filtered MAIL>"
F_RCPT = b"<filtered RCPT>"
GW_MAIL = b"<gateway MAIL>"
GW_RCPT = b"<gateway RCPT>"
GW_DATA = b"<gateway DATA>"
#: A pending entry whose reply the gateway decides when it reaches the head of the queue.
DECIDE = object()
#: Most client octets held while a verdict is pending (the shell stops reading).
HOLD_LIMIT = 1 << 20


@dataclass(slots=True)
class Pending:
    """One reply the client is owed: from the server, or the gateway's own."""

    verb: bytes
    local: bytes = None  # the gateway's reply, when it answers itself (or DECIDE)
    last: bool = False  # BDAT ... LAST
    ref: object = None  # a filtered recipient or chunk this reply concerns
    message: tuple = None  # (sender, size) of the message this reply settles
