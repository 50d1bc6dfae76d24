"""The embedded backend: a small ESMTP server that files every message it accepts.

The gateway starts it in its own process when a listener says ``backend = embedded``,
and the test suite uses it as a recording peer.  It accepts every envelope and stores
each message exactly as the client sent it (after SMTP dot-unstuffing) in a Maildir,
with CRLF line ends stored as LF, the Maildir convention.  Nothing else is altered.

The server is deliberately small and independent of ``twisted.mail.smtp``: one
protocol class with its own line buffer, one explicit command table, and two tiny
sans-IO readers for message content (L{DotDataReader} for DATA, a byte count for
BDAT).  It also records every byte it receives and sends on each connection, which
is what the gateway's end-to-end tests compare against.

The gateway reaches it through L{InProcessEndpoint}: each session gets its own
connected pair of UNIX sockets (C{socketpair()}), one end adopted by the backend,
the other by the gateway.  Nothing listens, so no other process can connect to
the backend and skip inspection.
"""

from __future__ import annotations

import mailbox
import os
import socket
from dataclasses import dataclass, field
from typing import Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "DEFAULT_MAX_SIZE",
    "MAX_LINE_LENGTH",
    "ConnectionRecord",
    "DataEnd",
    "DotDataReader",
    "EmbeddedBackendFactory",
    "InProcessEndpoint",
    "ReceivedMessage",
    "SMTPServerProtocol",
    "defaultExtensions",
]

#: Longest command line accepted, terminator included.  RFC 5321 asks for at least
#: 512 octets; extensions such as AUTH and long parameter lists need more.
MAX_LINE_LENGTH = 4096

#: Largest message accepted unless the factory is told otherwise (advertised as SIZE).
DEFAULT_MAX_SIZE = 100_000_000


def defaultExtensions(max_size: int = DEFAULT_MAX_SIZE) -> tuple[str, ...]:
    """
    Return the EHLO keywords the embedded backend advertises by default.

    @param max_size: the value advertised with SIZE.
    """
    return (
        "PIPELINING",
        f"SIZE {max_size}",
        "8BITMIME",
        "BINARYMIME",
        "CHUNKING",
        "DSN",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "HELP",
    )


def make_maildir(path):
    """The Maildir ``path``, created (mode 0700, as `mailbox` makes it) with its parents when missing.

    ``mailbox.Maildir(create=True)`` checks, then creates: two worker
    processes starting together could both see no Maildir and one fail
    with "File exists".  Creating each folder with ``exist_ok`` cannot.
    """
    for folder in ("", "tmp", "new", "cur"):
        os.makedirs(os.path.join(path, folder), mode=0o700, exist_ok=True)
    return mailbox.Maildir(path, factory=None, create=False)


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """
    One message the backend accepted.

    @ivar mail_from: the reverse-path without angle brackets (C{b""} for the null sender).
    @ivar rcpt_to: the forward-paths without angle brackets, in the order given.
    @ivar data: the message as stored: unstuffed, with CRLF line ends turned into LF.
    @ivar key: the Maildir key, or a C{mem-N} name when no Maildir is configured.
    @ivar command: C{"DATA"} or C{"BDAT"}, whichever carried the content.
    """

    mail_from: bytes
    rcpt_to: list[bytes]
    data: bytes
    key: str
    command: str


@dataclass(eq=False, slots=True)
class ConnectionRecord:
    """
    Every byte of one connection, in both directions, exactly as on the wire.

    @ivar received: all bytes received from the peer.
    @ivar sent: all bytes sent to the peer.
    @ivar closed: whether the connection has been lost.
    """

    received: bytearray = field(default_factory=bytearray)
    sent: bytearray = field(default_factory=bytearray)
    closed: bool = False


@dataclass(frozen=True, slots=True)
class DataEnd:
    """
    The end of a DATA message, as found by L{DotDataReader}.

    @ivar content: the unstuffed message with its original line ends, or L{None} when
        it was larger than the size limit and therefore discarded.
    @ivar rest: bytes that followed the end-of-data line (pipelined commands).
    """

    content: bytes | None
    rest: bytes


class DotDataReader:
    """
    Find the end of a DATA message incrementally and undo dot-stuffing (RFC 5321 4.5.2).

    Strictly, the message ends only at CRLF "." CRLF, where the start of the content
    counts as following a CRLF (so ".\\r\\n" straight after the 354 is an empty message).
    With C{lenient=True} a line holding only a dot ends the message whatever its line
    ends are (LF "." LF, LF "." CRLF, CRLF "." LF): that is how servers vulnerable to
    SMTP smuggling behaved, and the tests use it to prove the gateway never lets such a
    sequence through.

    Each byte is scanned a bounded number of times, so feeding a large message in
    small chunks stays linear.
    """

    def __init__(self, lenient: bool = False, max_size: int | None = None) -> None:
        """
        @param lenient: also end the message on a dot line with bare LF line ends.
        @param max_size: discard content beyond this many octets (L{None}: no limit).
        """
        # Each terminator is (pattern, length of the line end before the dot): the
        # message content keeps that line end.
        if lenient:
            self._terminators = ((b"\n.\n", 1), (b"\n.\r\n", 1))
            self._lineStart = b"\n"
        else:
            self._terminators = ((b"\r\n.\r\n", 2),)
            self._lineStart = b"\r\n"
        self._overlap = max(len(pattern) for pattern, _ in self._terminators) - 1
        self._maxSize = max_size
        # A virtual line end in front makes "the first line starts after a line end"
        # an ordinary search, and makes unstuffing one replace().
        self._buffer = bytearray(self._lineStart)
        self._scanFrom = 0
        self._oversized = False

    def feed(self, data: bytes) -> DataEnd | None:
        """
        Consume more message bytes.

        @return: L{None} while the message goes on, otherwise the L{DataEnd}.  The
            reader must not be fed after it returned a L{DataEnd}.
        """
        buffer = self._buffer
        buffer += data
        found = None
        for pattern, keep in self._terminators:
            index = buffer.find(pattern, self._scanFrom)
            if index != -1 and (found is None or index < found[0]):
                found = (index, len(pattern), keep)
        if found is None:
            # A terminator may straddle this chunk and the next one.
            self._scanFrom = max(len(buffer) - self._overlap, 0)
            self._limitSize()
            return None
        index, length, keep = found
        rest = bytes(buffer[index + length :])
        if self._oversized or (
            self._maxSize is not None
            and index + keep - len(self._lineStart) > self._maxSize
        ):
            return DataEnd(None, rest)
        content = bytes(buffer[: index + keep])
        unstuffed = content.replace(self._lineStart + b".", self._lineStart)
        return DataEnd(unstuffed[len(self._lineStart) :], rest)

    def _limitSize(self) -> None:
        """
        Drop the content of an oversized message, keeping only enough to find its end.
        """
        if self._maxSize is None:
            return
        if len(self._buffer) - len(self._lineStart) - self._overlap > self._maxSize:
            self._oversized = True
            del self._buffer[: -self._overlap]
            self._scanFrom = 0


_COMMAND, _DATA, _CHUNK = "command", "data", "chunk"


class SMTPServerProtocol(Protocol, TimeoutMixin):
    """
    One ESMTP server connection of the embedded backend.

    Complete command lines are handled in the order they arrive, so pipelined
    commands get their replies in order.  Message content is read by
    L{DotDataReader} (DATA) or by octet count (BDAT, RFC 3030), and anything pipelined
    after it is handled as commands again.

    Subclasses (the test suite's scripted backends) may override L{greet},
    L{commandReceived} and L{contentReceived}.

    @ivar factory: the L{EmbeddedBackendFactory} that made this protocol.
    @ivar record: the L{ConnectionRecord} of this connection.
    """

    factory: EmbeddedBackendFactory
    record: ConnectionRecord

    def __init__(self) -> None:
        """
        Start in command mode with an empty transaction.
        """
        self._pending = bytearray()
        self._mode = _COMMAND
        self._closing = False
        self._discardingLongLine = False
        self._dataReader: DotDataReader | None = None
        self._chunk = bytearray()
        self._chunkRemaining = 0
        self._chunkLast = False
        self._chunkError: bytes | None = None
        self.resetTransaction()

    # Twisted interface

    def connectionMade(self) -> None:
        """
        Register with the factory, arm the idle timer and greet the client.
        """
        self.record = ConnectionRecord()
        self.factory.connectionOpened(self)
        self.setTimeout(self.factory.timeout)
        self.greet()

    def dataReceived(self, data: bytes) -> None:
        """
        Record the bytes and handle everything they complete.
        """
        if self.factory.record:
            self.record.received += data
        if self._closing:
            return
        self.resetTimeout()
        self._pending += data
        self._drain()

    def connectionLost(self, reason: Failure) -> None:
        """
        Cancel the idle timer and tell the factory.
        """
        self.setTimeout(None)
        self.record.closed = True
        self.factory.connectionClosed(self)

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        """
        Schedule the idle timer on the factory's clock (see L{TimeoutMixin}).
        """
        return self.factory.clock().callLater(period, func)

    def timeoutConnection(self) -> None:
        """
        Say goodbye to a client that went quiet, as RFC 5321 4.5.3.2 allows.
        """
        self.sendBytes(b"421 4.4.2 %s Error: timeout exceeded\r\n" % self._hostname())
        self._closing = True
        self.transport.loseConnection()

    # Hooks

    def greet(self) -> None:
        """
        Send the factory's greeting.
        """
        self.sendBytes(self.factory.greeting)

    def commandReceived(self, verb: str, args: bytes) -> bytes | None:
        """
        Carry out one command.

        @param verb: the command verb, upper-cased (C{""} for an empty line).
        @param args: everything after the verb and its separating space.
        @return: the complete reply, or L{None} when the reply waits for content
            (BDAT).
        """
        handler = self._handlers.get(verb)
        if handler is None or (verb == "BDAT" and not self.factory.chunking):
            return b"500 5.5.2 Error: command not recognized\r\n"
        return handler(self, args)

    def contentReceived(self, verb: str, content: bytes | None, last: bool) -> bytes:
        """
        Take the content of a DATA message or of one BDAT chunk.

        @param verb: C{"DATA"} or C{"BDAT"}.
        @param content: the unstuffed DATA message or the BDAT chunk; L{None} when the
            DATA message exceeded the size limit.
        @param last: whether the message is now complete.
        @return: the reply to send.
        """
        if verb == "BDAT" and self._chunkError is not None:
            return self._chunkError
        if content is None:
            self.resetTransaction()
            return b"552 5.3.4 Error: message file too big\r\n"
        self._content += content
        if len(self._content) > self.factory.max_size:
            self.resetTransaction()
            return b"552 5.3.4 Error: message file too big\r\n"
        if not last:
            return b"250 2.0.0 Ok: %d octets received\r\n" % (len(content),)
        try:
            message = self.factory.store(
                self._mailFrom or b"", self._rcptTo, bytes(self._content), verb
            )
        except OSError as e:
            self.factory.log.warn("Could not store a message: {error}", error=e)
            return b"451 4.3.0 Error: could not store the message\r\n"
        finally:
            self.resetTransaction()
        key = message.key.encode("ascii")
        if verb == "BDAT":
            return b"250 2.0.0 Ok: %d octets received, queued as %s\r\n" % (
                len(content),
                key,
            )
        return b"250 2.0.0 Ok: queued as %s\r\n" % (key,)

    # Helpers for the hooks

    def sendBytes(self, data: bytes) -> None:
        """
        Send raw bytes to the client, recording them.
        """
        if self.factory.record:
            self.record.sent += data
        self.transport.write(data)

    def resetTransaction(self) -> None:
        """
        Forget the current envelope and any content received for it.
        """
        self._mailFrom: bytes | None = None
        self._rcptTo: list[bytes] = []
        self._content = bytearray()
        self._usedBdat = False

    # Input handling

    def _drain(self) -> None:
        """
        Handle everything in the input buffer, switching between commands and content.
        """
        while self._pending and not self._closing:
            if self._mode == _DATA:
                assert self._dataReader is not None
                chunk, self._pending = bytes(self._pending), bytearray()
                end = self._dataReader.feed(chunk)
                if end is not None:
                    self._pending = bytearray(end.rest)
                    self._mode = _COMMAND
                    self._dataReader = None
                    self.sendBytes(self.contentReceived("DATA", end.content, True))
            elif self._mode == _CHUNK:
                piece = bytes(self._pending[: self._chunkRemaining])
                del self._pending[: len(piece)]
                self._receiveChunkBytes(piece)
            else:
                self._readCommands()
                if self._mode == _COMMAND:
                    # Only an incomplete line is left.
                    break
        if self._mode == _CHUNK and self._chunkRemaining == 0 and not self._closing:
            # "BDAT 0" completes without any octets following it.
            self._receiveChunkBytes(b"")

    def _readCommands(self) -> None:
        """
        Handle the complete command lines in the buffer until the mode changes.
        """
        buffer = self._pending
        position = 0
        while self._mode == _COMMAND and not self._closing:
            newline = buffer.find(b"\n", position)
            if newline == -1:
                break
            line = bytes(buffer[position : newline + 1])
            position = newline + 1
            if self._discardingLongLine:
                self._discardingLongLine = False
            elif len(line) > MAX_LINE_LENGTH:
                self.sendBytes(b"500 5.5.2 Line too long\r\n")
            else:
                self._lineReceived(line)
        del buffer[:position]
        if self._mode == _COMMAND and not self._closing and len(buffer) >= MAX_LINE_LENGTH:
            # Even the line end still to come would put it over the limit; drop it
            # now rather than buffer an unbounded line.
            buffer.clear()
            if not self._discardingLongLine:
                self._discardingLongLine = True
                self.sendBytes(b"500 5.5.2 Line too long\r\n")

    def _lineReceived(self, line: bytes) -> None:
        """
        Split one command line into verb and arguments and answer it.
        """
        # CRLF ends a command line; a bare LF is tolerated as well.
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        verb, _, args = line.partition(b" ")
        reply = self.commandReceived(verb.decode("ascii", "replace").upper(), args)
        if reply is not None:
            self.sendBytes(reply)
        if self._closing:
            self.transport.loseConnection()

    def _receiveChunkBytes(self, piece: bytes) -> None:
        """
        Collect BDAT octets, answering once the announced count has arrived.
        """
        self._chunk += piece
        self._chunkRemaining -= len(piece)
        if self._chunkRemaining == 0:
            self._mode = _COMMAND
            chunk, self._chunk = bytes(self._chunk), bytearray()
            self.sendBytes(self.contentReceived("BDAT", chunk, self._chunkLast))

    def _hostname(self) -> bytes:
        """
        Return the server's name for replies.
        """
        return self.factory.hostname.encode("ascii")

    # Commands, one method each; the table after them is the whole command set.

    def _helo(self, args: bytes) -> bytes:
        self.resetTransaction()
        return b"250 %s\r\n" % (self._hostname(),)

    def _ehlo(self, args: bytes) -> bytes:
        self.resetTransaction()
        lines = [self._hostname()] + [e.encode("ascii") for e in self.factory.extensions]
        reply = b"".join(b"250-%s\r\n" % (line,) for line in lines[:-1])
        return reply + b"250 %s\r\n" % (lines[-1],)

    def _mail(self, args: bytes) -> bytes:
        if self._mailFrom is not None:
            return b"503 5.5.1 Error: nested MAIL command\r\n"
        path = _path(args, b"FROM:")
        if path is None:
            return b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
        self._mailFrom = path
        return b"250 2.1.0 Ok\r\n"

    def _rcpt(self, args: bytes) -> bytes:
        if self._mailFrom is None:
            return b"503 5.5.1 Error: need MAIL command\r\n"
        path = _path(args, b"TO:")
        if path is None:
            return b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"
        self._rcptTo.append(path)
        return b"250 2.1.5 Ok\r\n"

    def _data(self, args: bytes) -> bytes:
        if self._mailFrom is None:
            return b"503 5.5.1 Error: need MAIL command\r\n"
        if not self._rcptTo:
            return b"503 5.5.1 Error: need RCPT command\r\n"
        if self._usedBdat:
            # RFC 3030 section 2: DATA and BDAT do not mix in one transaction.
            return b"503 5.5.1 Error: DATA after BDAT\r\n"
        self._mode = _DATA
        self._dataReader = DotDataReader(
            lenient=self.factory.lenient_data_end, max_size=self.factory.max_size
        )
        return b"354 End data with <CR><LF>.<CR><LF>\r\n"

    def _bdat(self, args: bytes) -> bytes | None:
        words = args.split()
        if (
            not 1 <= len(words) <= 2
            or not words[0].isdigit()
            or (len(words) == 2 and words[1].upper() != b"LAST")
        ):
            return b"501 5.5.4 Syntax: BDAT <size> [LAST]\r\n"
        # RFC 3030 section 2: the octets follow whatever we think of the command, so
        # they are always read; an error is only reported once they are consumed.
        if self._mailFrom is None:
            self._chunkError = b"503 5.5.1 Error: need MAIL command\r\n"
        elif not self._rcptTo:
            self._chunkError = b"503 5.5.1 Error: need RCPT command\r\n"
        else:
            self._chunkError = None
            self._usedBdat = True
        self._mode = _CHUNK
        self._chunk = bytearray()
        self._chunkRemaining = int(words[0])
        self._chunkLast = len(words) == 2
        return None

    def _rset(self, args: bytes) -> bytes:
        self.resetTransaction()
        return b"250 2.0.0 Ok\r\n"

    def _noop(self, args: bytes) -> bytes:
        return b"250 2.0.0 Ok\r\n"

    def _quit(self, args: bytes) -> bytes:
        self._closing = True
        return b"221 2.0.0 Bye\r\n"

    def _vrfy(self, args: bytes) -> bytes:
        return b"252 2.0.0 Cannot VRFY user, but will accept message\r\n"

    def _help(self, args: bytes) -> bytes:
        return b"214 2.0.0 See RFC 5321\r\n"

    def _etrn(self, args: bytes) -> bytes:
        return b"250 2.0.0 Queuing started\r\n"

    def _auth(self, args: bytes) -> bytes:
        return b"504 5.5.4 Authentication not supported\r\n"

    _handlers: dict[str, Callable[[SMTPServerProtocol, bytes], bytes | None]] = {
        "HELO": _helo,
        "EHLO": _ehlo,
        "MAIL": _mail,
        "RCPT": _rcpt,
        "DATA": _data,
        "BDAT": _bdat,
        "RSET": _rset,
        "NOOP": _noop,
        "QUIT": _quit,
        "VRFY": _vrfy,
        "HELP": _help,
        "ETRN": _etrn,
        "AUTH": _auth,
    }


def _path(args: bytes, prefix: bytes) -> bytes | None:
    """
    Extract the address from C{FROM:<a@b> PARAMS} or C{TO:<a@b> PARAMS}.

    @return: the address without angle brackets, or L{None} if C{args} does not start
        with C{prefix} (case-insensitively).
    """
    if args[: len(prefix)].upper() != prefix:
        return None
    rest = args[len(prefix) :].lstrip(b" ")
    if rest.startswith(b"<"):
        return rest[1:].partition(b">")[0]
    return rest.partition(b" ")[0]


class EmbeddedBackendFactory(ServerFactory):
    """
    Make L{SMTPServerProtocol}s, store their messages and keep their byte records.

    @ivar messages: every L{ReceivedMessage} accepted, in order.
    @ivar connections: a L{ConnectionRecord} for every connection, in order.
    @ivar greeting: the greeting line sent on connect.
    """

    protocol = SMTPServerProtocol
    log = Logger()
    noisy = False

    def __init__(
        self,
        maildir: str | os.PathLike[str] | None = None,
        hostname: str = "localhost",
        max_size: int = DEFAULT_MAX_SIZE,
        extensions: Sequence[str] | None = None,
        lenient_data_end: bool = False,
        timeout: float | None = 300,
        reactor: IReactorTime | None = None,
        record: bool = True,
    ) -> None:
        """
        @param maildir: the Maildir folder to deliver into (created, with its parents,
            if missing), or L{None} to keep messages in memory only.
        @param hostname: the name used in the greeting and the EHLO reply.
        @param max_size: the largest message accepted, in octets.
        @param extensions: the EHLO keywords to advertise (default:
            L{defaultExtensions}).  BDAT is only understood when CHUNKING is listed.
        @param lenient_data_end: end DATA on a dot line with bare LF line ends too,
            like servers vulnerable to SMTP smuggling (tests only!).
        @param timeout: seconds of client silence before the connection is closed,
            or L{None} for no limit.
        @param reactor: the clock for the idle timer (default: the global reactor).
        @param record: keep every message and every byte in memory (tests);
            L{False} for the gateway's embedded backend, which must not grow.
        """
        self.record = record
        self.hostname = hostname
        self.max_size = max_size
        self.extensions = tuple(
            defaultExtensions(max_size) if extensions is None else extensions
        )
        self.chunking = any(e.upper() == "CHUNKING" for e in self.extensions)
        self.lenient_data_end = lenient_data_end
        self.timeout = timeout
        self._reactor = reactor
        self.greeting = b"220 %s ESMTP mailguard embedded backend\r\n" % (
            hostname.encode("ascii"),
        )
        self.maildir: mailbox.Maildir | None = None
        if maildir is not None:
            self.maildir = make_maildir(maildir)
        self.messages: list[ReceivedMessage] = []
        self.connections: list[ConnectionRecord] = []
        self._open: set[SMTPServerProtocol] = set()
        self._closedCount = 0
        self._messageWaiters: list[tuple[int, Deferred[list[ReceivedMessage]]]] = []
        self._closeWaiters: list[tuple[int, Deferred[list[ConnectionRecord]]]] = []

    def clock(self) -> IReactorTime:
        """
        Return the clock timers are scheduled on, importing the reactor only if needed.
        """
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor  # type: ignore[assignment]
        return self._reactor  # type: ignore[return-value]

    def store(
        self, mail_from: bytes, rcpt_to: list[bytes], content: bytes, command: str
    ) -> ReceivedMessage:
        """
        File one complete message and remember it.

        @param content: the message as received (unstuffed); CRLF becomes LF here.
        @raise OSError: if the Maildir cannot be written.
        """
        data = content.replace(b"\r\n", b"\n")
        if self.maildir is not None:
            key = self.maildir.add(data)
        else:
            key = f"mem-{len(self.messages) + 1}"
        message = ReceivedMessage(mail_from, list(rcpt_to), data, key, command)
        if not self.record:
            return message
        self.messages.append(message)
        self._messageWaiters = _fire(
            self._messageWaiters, len(self.messages), self.messages
        )
        return message

    def connectionOpened(self, protocol: SMTPServerProtocol) -> None:
        """
        Start tracking a new connection (called by the protocol).
        """
        if self.record:
            self.connections.append(protocol.record)
        self._open.add(protocol)

    def connectionClosed(self, protocol: SMTPServerProtocol) -> None:
        """
        Stop tracking a lost connection and wake whoever waits for it.
        """
        self._open.discard(protocol)
        self._closedCount += 1
        self._closeWaiters = _fire(
            self._closeWaiters, self._closedCount, self.connections
        )

    def whenMessages(self, count: int) -> Deferred[list[ReceivedMessage]]:
        """
        Return a Deferred that fires with L{messages} once C{count} are stored.
        """
        d: Deferred[list[ReceivedMessage]] = Deferred()
        self._messageWaiters = _fire(
            self._messageWaiters + [(count, d)], len(self.messages), self.messages
        )
        return d

    def whenConnectionClosed(self, count: int) -> Deferred[list[ConnectionRecord]]:
        """
        Return a Deferred that fires with L{connections} once C{count} have closed.
        """
        d: Deferred[list[ConnectionRecord]] = Deferred()
        self._closeWaiters = _fire(
            self._closeWaiters + [(count, d)], self._closedCount, self.connections
        )
        return d

    def closeAll(self) -> Deferred[None]:
        """
        Close every open connection.

        @return: a Deferred that fires when all of them are closed.
        """
        target = self._closedCount + len(self._open)
        for protocol in list(self._open):
            protocol.transport.loseConnection()
        return self.whenConnectionClosed(target).addCallback(lambda _: None)


def _fire(waiters: list[tuple[int, Deferred]], reached: int, result: object) -> list:
    """
    Fire the waiters whose count has been reached; return the others.
    """
    remaining = [(count, d) for count, d in waiters if count > reached]
    for count, d in waiters:
        if count <= reached:
            d.callback(result)
    return remaining


class _Capture:
    """
    The client side's factory for one adopted socket: remembers the protocol built.
    """

    def __init__(self, factory: object) -> None:
        self.factory = factory
        self.protocol: object = None

    def doStart(self) -> None:
        """
        Nothing to start (adopted connections do not call it).
        """

    def doStop(self) -> None:
        """
        Nothing to stop.
        """

    def buildProtocol(self, addr: object) -> object:
        """
        Build and remember the wrapped factory's protocol.
        """
        self.protocol = self.factory.buildProtocol(addr)  # type: ignore[attr-defined]
        return self.protocol


@implementer(IStreamClientEndpoint)
class InProcessEndpoint:
    """
    A client endpoint connecting to a server factory in this process, through no listener.

    Each C{connect} makes a C{socketpair()} and hands one end to C{factory}
    (the embedded backend) and the other to the caller's factory, both with
    C{IReactorSocket.adoptStreamConnection}.  The sockets have no name in the
    file system or the network: only this process holds them.  They are real
    kernel sockets, so the relay's flow control, half-close and abort work
    on them exactly as on TCP.
    """

    def __init__(self, reactor: object, factory: ServerFactory) -> None:
        """
        @param reactor: an C{IReactorSocket} and C{IReactorTime} (the reactor).
        @param factory: the server side's factory.
        """
        self.reactor = reactor
        self.factory = factory

    def connect(self, protocolFactory: object) -> Deferred:
        """
        Connect C{protocolFactory} to the server factory on the next reactor turn.

        @return: a Deferred firing with the connected protocol (cancellable
            until then, like a TCP connection attempt).
        """
        pending = []
        d: Deferred = Deferred(lambda d: pending and pending[0].cancel())

        def connect() -> None:
            pending.clear()
            capture = _Capture(protocolFactory)
            try:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            except OSError:
                d.errback()
                return
            try:
                # adoptStreamConnection wants non-blocking sockets, and
                # duplicates each descriptor: ours are closed below.
                ours.setblocking(False)
                theirs.setblocking(False)
                self.reactor.adoptStreamConnection(  # type: ignore[attr-defined]
                    theirs.fileno(), socket.AF_UNIX, self.factory)
                self.reactor.adoptStreamConnection(  # type: ignore[attr-defined]
                    ours.fileno(), socket.AF_UNIX, capture)
            except Exception:
                d.errback()
                return
            finally:
                ours.close()
                theirs.close()
            d.callback(capture.protocol)

        pending.append(self.reactor.callLater(0, connect))  # type: ignore[attr-defined]
        return d
