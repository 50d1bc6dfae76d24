"""Streaming message splitting (sans-IO): header fields, end of headers, body pieces.

`MessageSplitter` is fed a message's octets (CRLF line ends, no SMTP dot
stuffing) in pieces of any size and returns `HeaderField`, `EndOfHeaders`
and `BodyChunk` events.  It holds at most one header field (bounded by
``max_header_size``) and never the body.  `Unstuffer` turns the SMTP DATA
wire form back into message octets, also in pieces of any size.  The MIME
structure of the body (parts, encodings, file names) is read further by the
content-rules reader; this module is what every message filter shares.
"""

from dataclasses import dataclass

#: Default bound on one header field, folded lines included (64 KiB).
MAX_HEADER_SIZE = 65536

#: Largest body piece handed out at once.
BODY_CHUNK = 65536

_FTEXT = frozenset(range(33, 127)) - {ord(":")}


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One header field: ``name`` without the colon, ``value`` after it (leading space and folding kept).

    ``size`` is the field's whole length in octets, line ends included;
    when it exceeds the splitter's bound, ``value`` holds only its first
    octets and ``truncated`` is true.
    """

    name: bytes
    value: bytes
    size: int
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class EndOfHeaders:
    """The header block is over (``size``: its octets, the empty line included)."""

    size: int


@dataclass(frozen=True, slots=True)
class BodyChunk:
    """A piece of the body, as it stands in the message."""

    data: bytes


def _field_name(line):
    """The field name of a header line, or None when the line is not a header field."""
    colon = line.find(b":")
    if colon <= 0:
        return None
    name = line[:colon]
    if not _FTEXT.issuperset(name):
        return None
    return name


class MessageSplitter:
    """Split a message into header fields and body pieces, in one pass, in bounded memory.

    A line that is neither a header field nor a continuation ends the header
    block (it is the first body line), as mail servers treat it.
    """

    __slots__ = ("max_header_size", "_buf", "_field", "_field_size", "_truncated", "_in_body", "_header_size")

    def __init__(self, max_header_size=MAX_HEADER_SIZE):
        self.max_header_size = max_header_size
        self._buf = b""
        self._field = None  # [name, value pieces] of the field being read
        self._field_size = 0
        self._truncated = False
        self._in_body = False
        self._header_size = 0

    @property
    def in_body(self):
        """True once the header block is over."""
        return self._in_body

    def feed(self, data):
        """Take the next octets; return the events they complete."""
        if self._in_body:
            return _chunks(data)
        events = []
        buf = self._buf + data if self._buf else data
        pos = 0
        while not self._in_body:
            end = buf.find(b"\n", pos)
            if end < 0:
                break
            line = buf[pos : end + 1]
            pos = end + 1
            self._line(line, events)
        rest = buf[pos:]
        if self._in_body:
            self._buf = b""
            events += _chunks(rest)
        else:
            self._buf = self._bounded(rest)
        return events

    def close(self):
        """The message is over; return the events still held (a header block without a body)."""
        events = []
        if not self._in_body:
            if self._buf:
                self._line(self._buf, events)
                self._buf = b""
            if not self._in_body:
                self._end_field(events)
                self._in_body = True
                events.append(EndOfHeaders(self._header_size))
        return events

    def _bounded(self, partial):
        # A header line still without its end: keep at most the bound of it
        # (the field is truncated beyond that anyway).
        if len(partial) > self.max_header_size:
            self._field_size += len(partial) - self.max_header_size
            self._truncated = True
            self._header_size += len(partial) - self.max_header_size
            return partial[: self.max_header_size]
        return partial

    def _line(self, line, events):
        self._header_size += len(line)
        if line[:1] in (b" ", b"\t") and self._field is not None:
            self._add(line)
            return
        self._end_field(events)
        if line in (b"\r\n", b"\n"):
            self._in_body = True
            events.append(EndOfHeaders(self._header_size))
            return
        name = _field_name(line)
        if name is None:
            self._header_size -= len(line)
            self._in_body = True
            events.append(EndOfHeaders(self._header_size))
            events += _chunks(line)
            return
        self._field = [name, []]
        self._field_size = 0
        self._truncated = False
        self._add(line[len(name) + 1 :], len(name) + 1)

    def _add(self, piece, extra=0):
        self._field_size += len(piece) + extra
        if self._truncated:
            return
        held = self._field_size - len(piece)
        room = self.max_header_size - held
        if len(piece) > room:
            piece = piece[: max(room, 0)]
            self._truncated = True
        self._field[1].append(piece)

    def _end_field(self, events):
        if self._field is None:
            return
        name, pieces = self._field
        value = b"".join(pieces)
        if value.endswith(b"\r\n"):
            value = value[:-2]
        elif value.endswith(b"\n"):
            value = value[:-1]
        events.append(HeaderField(name, value, self._field_size, self._truncated))
        self._field = None


def _chunks(data):
    if not data:
        return []
    if len(data) <= BODY_CHUNK:
        return [BodyChunk(data)]
    return [BodyChunk(data[i : i + BODY_CHUNK]) for i in range(0, len(data), BODY_CHUNK)]


class _DotState:
    """Where the previous piece left off: at a line start, after a CR, or inside a line."""

    __slots__ = ("_state",)

    def __init__(self):
        self._state = _START

    def _next_state(self, data):
        if data.endswith(b"\r\n") or (data == b"\n" and self._state == _CR):
            return _START
        if data.endswith(b"\r"):
            return _CR
        return _MIDDLE


_START, _CR, _MIDDLE = 0, 1, 2


class Unstuffer(_DotState):
    """Undo SMTP dot stuffing (RFC 5321 4.5.2) on DATA wire octets, in pieces of any size.

    The input is the message as sent between ``354`` and the end of data
    (which is not included): a line starting with ``.`` loses that dot.
    """

    __slots__ = ()

    def feed(self, data):
        """Return ``data`` without its stuffing dots."""
        if not data:
            return data
        out = data.replace(b"\r\n.", b"\r\n")
        if self._state == _START and out[:1] == b".":
            out = out[1:]
        elif self._state == _CR and data[:2] == b"\n.":
            out = b"\n" + out[2:]
        self._state = self._next_state(data)
        return out


class Stuffer(_DotState):
    """Dot-stuff message octets for DATA (RFC 5321 4.5.2), in pieces of any size."""

    __slots__ = ()

    def feed(self, data):
        """Return ``data`` with a dot added before every line that starts with one."""
        if not data:
            return data
        out = data.replace(b"\r\n.", b"\r\n..")
        if self._state == _START and out[:1] == b".":
            out = b"." + out
        elif self._state == _CR and data[:2] == b"\n.":
            out = b"\n." + out[1:]
        self._state = self._next_state(data)
        return out
