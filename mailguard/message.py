"""Streaming message splitting (sans-IO): header fields, end of headers, body pieces.

`MessageSplitter` is fed a message's octets (CRLF line ends, no SMTP dot
stuffing) in pieces of any size and returns `HeaderField`, `EndOfHeaders`
and `BodyChunk` events.  It holds at most one header field (bounded by
``max_header_size``) and never the body.  `Unstuffer` turns the SMTP DATA
wire form back into message octets, also in pieces of any size.  The MIME
structure of the body (parts, encodings, file names) is read further by the
content-rules reader; this module is what every message filter shares.
"""

import re
from dataclasses import dataclass

#: Default bound on one header field, folded lines included (64 KiB).
MAX_HEADER_SIZE = 65536

#: Largest body piece handed out at once.
BODY_CHUNK = 65536

#: The octets a field name may hold (RFC 5322 ftext: printable US-ASCII but the colon).
_FTEXT = bytes(sorted(set(range(33, 127)) - {ord(":")}))


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One header field: ``name`` without the colon, ``value`` after it (leading space and folding kept).

    ``size`` is the field's whole length in octets, line ends included;
    when it exceeds the splitter's bound the field is not held: ``value`` is
    empty and ``truncated`` is true (its size still counts).
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


#: A whole header block read line by line without any special case: header
#: fields (a name of ftext, the colon, the line and its folded lines), then
#: the empty line.  Each alternative begins with octets the others cannot
#: begin with, so a match is found or refused in one pass.
_BLOCK = re.compile(rb"(?:[!-9;-~]+:[^\n]*\n(?:[ \t][^\n]*\n)*)*\r?\n")
_FIELD = re.compile(rb"([!-9;-~]+):([^\n]*\n(?:[ \t][^\n]*\n)*)")


def header_block(data, pos, bound):
    """The fields of a whole, plain header block at ``data[pos:]``, or None.

    Plain: it ends with its empty line within ``data``, every line is a
    header field or the continuation of one, and it is no longer than
    ``bound`` (so no field needs cutting).  Returns ``(fields, end)``: the
    `HeaderField` events, the same ones `MessageSplitter` gives line by line,
    and where the empty line ends.  Anything else (a block not yet whole, a
    line that is not a field, a field over the bound) is None: read it line
    by line.
    """
    m = _BLOCK.match(data, pos)
    if m is None:
        return None
    end = m.end()
    if end - pos > bound:
        return None
    fields = []
    for name, rest in _FIELD.findall(data, pos, end):
        value = rest[:-2] if rest[-2:] == b"\r\n" else rest[:-1]
        fields.append(HeaderField(name, value, len(name) + 1 + len(rest)))
    return fields, end


def _field_name(line):
    """The field name of a header line, or None when the line is not a header field."""
    colon = line.find(b":")
    if colon <= 0:
        return None
    name = line[:colon]
    if name.translate(None, _FTEXT):  # an octet outside ftext is left
        return None
    return name


class MessageSplitter:
    """Split a message into header fields and body pieces, in one pass, in bounded memory.

    A line that is neither a header field nor a continuation ends the header
    block (it is the first body line), as mail servers treat it.  Of a
    header line longer than ``max_header_size`` only that many octets are
    kept (the field is `truncated`); sizes always count every octet.
    """

    __slots__ = ("max_header_size", "_buf", "_dropped", "_field", "_field_size", "_held", "_truncated", "_in_body",
                 "_header_size")

    def __init__(self, max_header_size=MAX_HEADER_SIZE):
        self.max_header_size = max_header_size
        self._buf = b""  # the start of a header line still without its end
        self._dropped = 0  # octets of that line beyond the bound
        self._field = None  # [name, value pieces] of the field being read
        self._field_size = 0
        self._held = 0  # octets of the field's value held so far
        self._truncated = False
        self._in_body = False
        self._header_size = 0

    @property
    def fresh(self):
        """True while nothing has been fed (or all of it was empty)."""
        return self._field is None and not self._buf and not self._dropped and not self._in_body

    @property
    def in_body(self):
        """True once the header block is over."""
        return self._in_body

    def feed(self, data):
        """Take the next octets; return the events they complete."""
        if self._in_body:
            return _chunks(data)
        events = []
        pos, n = 0, len(data)
        if self.fresh:
            whole = header_block(data, 0, self.max_header_size)
            if whole is not None:
                events, pos = whole
                self._header_size += pos
                self._in_body = True
                events.append(EndOfHeaders(self._header_size))
                if pos < n:
                    events += _chunks(data[pos:])
                return events
        short = self.max_header_size + 1  # a line this long or shorter is held whole, whatever its line end
        while pos < n and not self._in_body:
            end = data.find(b"\n", pos)
            if end < 0:
                self._partial(data[pos:], events)
                pos = n
                break
            piece = data[pos : end + 1]
            pos = end + 1
            if self._buf or self._dropped or len(piece) > short:
                line, extra = self._complete(piece)
                self._line(line, extra, events)
            else:
                self._line(piece, 0, events)
        if self._in_body and pos < n:
            events += _chunks(data[pos:])
        return events

    def close(self):
        """The message is over; return the events still held (a header block without a body)."""
        events = []
        if not self._in_body and (self._buf or self._dropped):
            line, extra = self._buf, self._dropped
            self._buf, self._dropped = b"", 0
            self._line(line, extra, events)
        if not self._in_body:
            self._end_field(events)
            self._in_body = True
            events.append(EndOfHeaders(self._header_size))
        return events

    def _partial(self, piece, events):
        """Keep the start of an unfinished line (the bound, and room for its line end); past it, decide what it is."""
        room = self.max_header_size + 2 - len(self._buf)
        if self._dropped == 0 and len(piece) <= room:
            self._buf += piece
            return
        if self._dropped == 0:
            self._buf += piece[:room]
            piece = piece[room:]
            if not self._header_like(self._buf[: self.max_header_size]):
                # Too long for a header line and no field name: the body begins.
                held, self._buf = self._buf, b""
                self._end_field(events)
                self._in_body = True
                events.append(EndOfHeaders(self._header_size))
                events += _chunks(held + piece)
                return
        self._dropped += len(piece)

    def _header_like(self, start):
        if start[:1] in (b" ", b"\t") and self._field is not None:
            return True
        return _field_name(start) is not None

    def _complete(self, piece):
        """The whole line ending with ``piece`` (bounded), and how many of its octets were left out."""
        whole = self._buf + piece if self._buf else piece
        ending = b"\r\n" if whole.endswith(b"\r\n") else b"\n"
        dropped, self._buf, self._dropped = self._dropped, b"", 0
        if not dropped and (len(whole) <= self.max_header_size + len(ending)
                            or not self._header_like(whole[: self.max_header_size])):
            # Short enough, or no header line at all (the body keeps every octet).
            return whole, 0
        text = whole[: -len(ending)]
        keep = text[: self.max_header_size]
        return keep + ending, dropped + len(text) - len(keep)

    def _line(self, line, extra, events):
        self._header_size += len(line) + extra
        if line[:1] in (b" ", b"\t") and self._field is not None:
            self._add(line, extra)
            return
        self._end_field(events)
        if line in (b"\r\n", b"\n") and not extra:
            self._in_body = True
            events.append(EndOfHeaders(self._header_size))
            return
        # The name must end within the bound, as `_partial` decides for a
        # line that comes in pieces.
        name = _field_name(line[: self.max_header_size])
        if name is None:
            self._header_size -= len(line) + extra
            self._in_body = True
            events.append(EndOfHeaders(self._header_size))
            events += _chunks(line)
            return
        self._field = [name, []]
        self._field_size = len(name) + 1
        self._held = 0
        self._truncated = False
        self._add(line[len(name) + 1 :], extra)

    def _add(self, piece, extra):
        self._field_size += len(piece) + extra
        if extra:
            self._truncated = True
        room = self.max_header_size - self._held
        if len(piece) > room:
            piece = piece[: max(room, 0)]
            self._truncated = True
        if piece:
            self._field[1].append(piece)
            self._held += len(piece)

    def _end_field(self, events):
        if self._field is None:
            return
        name, pieces = self._field
        value = b"".join(pieces)
        if value.endswith(b"\r\n"):
            value = value[:-2]
        elif value.endswith(b"\n"):
            value = value[:-1]
        if self._truncated:
            value = b""  # not held: whatever part of it survived depends on segmentation
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


try:
    from mailguard._scan import unstuff as _unstuff  # the same result at C speed
except ImportError:  # pragma: no cover - the compiled module is optional

    def _unstuff(data):
        return data.replace(b"\r\n.", b"\r\n")


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
        out = _unstuff(data)
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
