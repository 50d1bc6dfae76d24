"""A streaming MIME reader (sans-IO): decoded header fields, MIME parts, decoded text lines.

`MimeReader` is fed a message's octets (CRLF line ends, no SMTP dot
stuffing) in pieces of any size and returns events:

- `Header`: one header field, unfolded, RFC 2047 encoded words decoded,
  as text (``part`` 0 for the message's own header block, the part's number
  for a MIME part's);
- `PartStart`: an entity begins (the message itself is part 0): its
  ``type/subtype``, transfer encoding and file name (Content-Disposition
  ``filename`` or Content-Type ``name``, RFC 2231 continuations and
  charsets and RFC 2047 encoded words decoded);
- `TextLine`: one line of a ``text/*`` part, its transfer encoding
  (base64, quoted-printable) decoded and its charset decoded to text;
- `MessageEnd`: the sizes (header block, body, longest lines).

The same message gives the same events whatever its segmentation.  The
reader never holds the message: it holds one header field (bounded by
``max_header_size``, through `mailguard.message.MessageSplitter`), one line
(bounded by ``max_line``; longer lines are counted and cut), and one
boundary per open multipart (at most ``max_depth``; a multipart deeper than
that is read as an opaque part).  Values are decoded with the standard
library's ``email`` helpers; its FeedParser is not used, since it keeps the
whole message.
"""

import binascii
import codecs
import functools
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.message import Message
from email.errors import MessageError

from mailguard.message import MAX_HEADER_SIZE, BodyChunk, EndOfHeaders, HeaderField, MessageSplitter, header_block

try:  # the same results at C speed
    from mailguard._scan import crlf_to_lf as _crlf_to_lf, find_dashes as _find_dashes, longest_line as _longest_line
except ImportError:  # pragma: no cover - the compiled module is optional

    def _find_dashes(data, start, end):
        return data.find(b"\n--", start, end)

    def _longest_line(data):
        return max(map(len, data.replace(b"\r\n", b"\n").split(b"\n")))

    def _crlf_to_lf(data):
        return data.replace(b"\r\n", b"\n")


#: Longest line held whole (body and decoded text); longer lines are cut to it.
MAX_LINE = 65536

#: Multiparts nested deeper than this are read as opaque parts.
MAX_DEPTH = 20

#: Transfer encodings by name; anything else is reported as written.
ENCODINGS = frozenset({"7bit", "8bit", "binary", "base64", "quoted-printable"})

# A boundary is at most 70 characters (RFC 2046 5.1.1); the line may carry
# "--" and some trailing white space.
_BOUNDARY_LINE = 70 + 4 + 32


@dataclass(frozen=True, slots=True)
class Header:
    """One header field of part ``part`` (0: the message): ``name`` and its unfolded, decoded ``value``.

    ``size`` is the field's octets as sent (line ends included),
    ``longest_line`` its longest line without the line end, ``truncated``
    whether the field exceeded ``max_header_size`` (``value`` then holds
    only its beginning).  A reader made with ``decode_headers=False``
    leaves ``value`` empty.
    """

    part: int
    name: str
    value: str
    size: int
    longest_line: int
    truncated: bool = False

    @property
    def text(self):
        """The field as ``Name: value``."""
        return "%s: %s" % (self.name, self.value)


@dataclass(frozen=True, slots=True)
class PartStart:
    """Entity ``part`` begins its body (0: the message itself), ``depth`` multiparts deep.

    ``content_type`` is ``type/subtype`` in lower case (``text/plain`` when
    missing or invalid, as RFC 2045 says); ``encoding`` the transfer
    encoding in lower case (``7bit`` when missing); ``filename`` the decoded
    file name, or None.
    """

    part: int
    depth: int
    content_type: str
    encoding: str
    filename: str | None = None


@dataclass(frozen=True, slots=True)
class TextLine:
    """One decoded line of text (no line end) of the ``text/*`` part ``part``; cut at ``max_line`` when ``truncated``."""

    part: int
    text: str
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class TextBlock:
    """Decoded lines of the ``text/*`` part ``part``, joined with ``\\n`` (``text_blocks`` mode).

    The same lines as the `TextLine` events of the default mode, several
    at a time; how they are grouped depends on the segmentation.
    """

    part: int
    text: str


@dataclass(frozen=True, slots=True)
class MessageEnd:
    """The message is over: its sizes in octets (line ends excluded from line lengths).

    ``too_deep`` is true when a multipart nested deeper than ``max_depth``
    was read as an opaque part.
    """

    header_size: int
    body_size: int
    longest_header_line: int
    longest_body_line: int
    parts: int
    too_deep: bool = False


def decode_words(text):
    """Decode the RFC 2047 encoded words of ``text`` (a str); unknown charsets decode with replacement."""
    if "=?" not in text:
        return text
    try:
        return str(make_header(decode_header(text)))
    except (LookupError, UnicodeError, ValueError, binascii.Error, AssertionError, MessageError):
        pass  # a charset the email package refuses (CharsetError), or bad encoding: decode piece by piece
    try:
        pieces = decode_header(text)
    except Exception:  # the email package raises assorted errors on garbage
        return text
    out = []
    for chunk, charset in pieces:
        if isinstance(chunk, str):
            out.append(chunk)
        else:
            out.append(_decode(chunk, charset))
    return "".join(out)


def _decode(data, charset):
    """Bytes to text in ``charset`` (UTF-8 when unknown or ASCII: 8-bit text is usually that)."""
    if not charset or charset.lower() in ("us-ascii", "ascii"):
        charset = "utf-8"
    try:
        return data.decode(charset, "replace")
    except (LookupError, ValueError):  # unknown, or not even a name (a NUL in it)
        return data.decode("utf-8", "replace")


def _unfold(value):
    """RFC 5322 2.2.3: remove the CRLFs of folding; strip the white space around the value."""
    return value.replace(b"\r\n", b"").replace(b"\n", b"").strip(b" \t")


def _line_lengths(field):
    """Longest line of a raw header field (``name:value`` with folding), line ends excluded."""
    longest = 0
    for line in field.split(b"\n"):
        n = len(line) - (1 if line.endswith(b"\r") else 0)
        if n > longest:
            longest = n
    return longest


#: The header fields that say how to read an entity's body.
_ENTITY_FIELDS = frozenset({"content-type", "content-transfer-encoding", "content-disposition"})


class _Entity:
    """What a MIME entity's header block says about its body (the first of each field counts)."""

    __slots__ = ("fields", "default_type")

    def __init__(self, default_type="text/plain"):
        self.fields = {}
        self.default_type = default_type

    def add(self, name, value):
        key = name.lower()
        if key in _ENTITY_FIELDS and key not in self.fields:
            self.fields[key] = value

    def describe(self):
        """Return ``(content_type, encoding, filename, boundary, charset)``."""
        fields = self.fields
        key = (fields.get("content-type"), fields.get("content-transfer-encoding"), fields.get("content-disposition"),
               self.default_type)
        if sum(len(v) for v in key if v is not None) <= _CACHED_FIELDS:
            return _describe_cached(*key)
        return _describe(*key)


#: Part headers up to this many characters in all are remembered (`_describe_cached`): the same ones recur.
_CACHED_FIELDS = 1024


def _describe(content_type_field, encoding_field, disposition_field, default_type):
    """`_Entity.describe` of these three fields (None: absent)."""
    m = Message()
    for key, value in (("content-type", content_type_field), ("content-transfer-encoding", encoding_field),
                       ("content-disposition", disposition_field)):
        if value is not None:
            m[key] = value
    if content_type_field is not None:
        content_type = m.get_content_type()
    else:
        content_type = default_type
    if "/" not in content_type or content_type.count("/") != 1:
        content_type = "text/plain"
    encoding = (encoding_field if encoding_field is not None else "7bit").strip().lower() or "7bit"
    filename = boundary = charset = None
    try:
        filename = m.get_filename()
    except Exception:  # malformed parameters: no file name rather than no part
        filename = None
    if filename is not None:
        filename = decode_words(filename)
    if content_type.startswith("multipart/"):
        try:
            boundary = m.get_boundary()
        except Exception:
            boundary = None
    elif content_type.startswith("text/"):
        try:
            charset = m.get_content_charset()
        except Exception:
            charset = None
    return content_type, encoding, filename, boundary, charset


_describe_cached = functools.lru_cache(maxsize=512)(_describe)


class _Text:
    """Decoded octets of a text part, split into lines and decoded from their charset."""

    __slots__ = ("part", "charset", "max_line", "_buf", "_cut", "block")

    def __init__(self, part, charset, max_line):
        self.part = part
        self.charset = charset if charset else "utf-8"
        try:
            codecs.lookup(self.charset)
        except (LookupError, ValueError):  # unknown, or not even a name (a NUL in it)
            self.charset = "utf-8"
        self.max_line = max_line
        self._buf = b""
        self._cut = False
        self.block = None  # text_blocks mode: decoded lines collected here, not TextLine events

    def lines(self, data, out):
        """Like `feed`, many lines at once (``text_blocks`` mode only); the same lines, in C-level steps."""
        first = data.find(b"\n")
        if first < 0:
            self.feed(data, out)
            return
        self.feed(data[: first + 1], out)  # the line held from before ends here
        end = data.rfind(b"\n")
        if end > first:
            middle = data[first + 1 : end]  # whole lines, joined with LF
            if b"\r" in middle or _longest_line(middle) > self.max_line:
                cut = self.max_line
                middle = b"\n".join([(p[:-1] if p[-1:] == b"\r" else p)[:cut] for p in middle.split(b"\n")])
            self.block.append(_decode(middle, self.charset))
        self._hold(data[end + 1 :])

    def feed(self, data, out):
        pos = 0
        while True:
            end = data.find(b"\n", pos)
            if end < 0:
                break
            self._hold(data[pos:end])
            self._emit(out)
            pos = end + 1
        self._hold(data[pos:])

    def _hold(self, piece):
        if self._cut or not piece:
            return
        room = self.max_line + 1 - len(self._buf)  # one more for a CR before the LF
        if len(piece) > room:
            piece = piece[:room]
            self._cut = True
        self._buf += piece

    def _emit(self, out):
        line = self._buf
        cut = self._cut
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.max_line:
            line = line[: self.max_line]
            cut = True
        if self.block is not None:
            self.block.append(_decode(line, self.charset))
        else:
            out.append(TextLine(self.part, _decode(line, self.charset), cut))
        self._buf = b""
        self._cut = False

    def close(self, out):
        if self._buf or self._cut:
            self._emit(out)


class _Identity:
    """7bit, 8bit, binary (and unknown encodings): the line is the text.

    A line's end is passed on only when the next line begins: the CRLF
    before a boundary belongs to the boundary (RFC 2046 5.1.1).
    """

    __slots__ = ("text", "_nl")

    def __init__(self, text):
        self.text = text
        self._nl = False

    def segment(self, data, complete, out):
        if self._nl:
            data = b"\n" + data
        self._nl = complete
        self.text.feed(data, out)

    def region(self, data, out):
        """Whole lines (each with its line end), as `segment` would take them one by one."""
        data = _crlf_to_lf(data)[:-1]
        if self._nl:
            data = b"\n" + data
        self._nl = True
        self.text.lines(data, out)

    def close(self, out):
        self.text.close(out)


def _qp(data):
    """``binascii.a2b_qp`` on a piece of one line; a CR inside the line is kept and ends nothing.

    ``a2b_qp`` reads ``=`` before a CR as a soft line break and drops
    everything up to the next LF, which a piece of a line does not hold:
    how much it dropped would depend on where the line was cut.  Here the
    ``=`` is dropped alone (as ``a2b_qp`` drops a ``=`` that ends its input).
    """
    if b"\r" in data:
        return b"\r".join([binascii.a2b_qp(p) for p in data.split(b"\r")])
    return binascii.a2b_qp(data)


def _equals_run(data, end):
    """How many ``=`` end ``data[:end]`` (``a2b_qp`` reads ``==`` as one literal ``=``: only an odd run starts an escape)."""
    start = end
    while start > 0 and data[start - 1] == 0x3D:
        start -= 1
    return end - start


def _soft(line):
    """True if the encoded ``line`` (trailing white space removed) ends with a soft line break."""
    return line[-1:] == b"=" and _equals_run(line, len(line)) % 2 == 1


class _QuotedPrintable:
    """Quoted-printable decoded segment by segment.

    What a segment's end means depends on what follows, so it waits for
    the next segment: an escape begun there (``=`` or ``=X``) and trailing
    white space (removed if the line ends after it, RFC 2045 6.7).  Of the
    white space only ``max_line + 1`` octets are kept: more than that fills
    the text line to its cut anyway.
    """

    __slots__ = ("text", "_tail", "_nl")

    def __init__(self, text):
        self.text = text
        self._tail = b""
        self._nl = False  # a hard line end waits for the next line (see _Identity)

    def segment(self, data, complete, out):
        data = self._tail + data if self._tail else data
        self._tail = b""
        if self._nl:
            self._nl = False
            self.text.feed(b"\n", out)
        if complete:
            stripped = data.rstrip(b" \t")
            soft = _soft(stripped)
            if soft:
                stripped = stripped[:-1]
            self.text.feed(_qp(stripped), out)
            self._nl = not soft
            return
        end = len(data.rstrip(b" \t"))
        start = end
        if _equals_run(data, end) % 2:
            start = end - 1
        elif end >= 2 and data[end - 2] == 0x3D and data[end - 1] != 0x3D and _equals_run(data, end - 1) % 2:
            start = end - 2
        data, self._tail = data[:start], data[start : start + 2 + self.text.max_line + 1]
        self.text.feed(_qp(data), out)

    def region(self, data, out):
        """Whole lines (each with its line end), as `segment` would take them one by one."""
        pieces = [b"\n"] if self._nl else []
        nl = False
        for line in data.replace(b"\r\n", b"\n")[:-1].split(b"\n"):
            if nl:
                pieces.append(b"\n")
            line = line.rstrip(b" \t")
            nl = not _soft(line)
            pieces.append(_qp(line) if nl else _qp(line[:-1]))
        self._nl = nl
        self.text.lines(b"".join(pieces), out)

    def close(self, out):
        if self._tail:
            self.text.feed(_qp(self._tail), out)
            self._tail = b""
        self.text.close(out)


_B64 = bytes(range(256)).translate(None, b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


class _Base64:
    """Base64 decoded in whole quanta; characters outside the alphabet are skipped (RFC 2045 6.8)."""

    __slots__ = ("text", "_tail", "_done")

    def __init__(self, text):
        self.text = text
        self._tail = b""
        self._done = False

    def segment(self, data, complete, out):
        if self._done:
            return
        pad = data.find(b"=")
        if pad >= 0:
            # Padding ends the encoded data; what follows is ignored.
            data = data[:pad]
            self._done = True
        data = self._tail + data.translate(None, _B64)
        n = len(data) - len(data) % 4
        self._tail = data[n:]
        if n:
            self.text.feed(binascii.a2b_base64(data[:n]), out)
        if self._done:
            self._flush(out)

    def region(self, data, out):
        """Whole lines: line ends are outside the alphabet anyway."""
        self.segment(data, True, out)

    def _flush(self, out):
        tail, self._tail = self._tail, b""
        if len(tail) >= 2:
            self.text.feed(binascii.a2b_base64(tail + b"=" * (4 - len(tail))), out)

    def close(self, out):
        self._flush(out)
        self.text.close(out)


class _Ignore:
    """A part whose content is not read (not text, or a multipart's preamble or epilogue)."""

    __slots__ = ()

    def segment(self, data, complete, out):
        pass

    def region(self, data, out):
        pass

    def close(self, out):
        pass


_IGNORE = _Ignore()


class MimeReader:
    """Read a message's MIME structure and text in one pass, in bounded memory.

    ``feed(data)`` returns the events the octets complete; ``close()`` the
    rest, ending with `MessageEnd`.
    """

    __slots__ = (
        "max_header_size", "max_line", "max_depth", "decode_text", "text_blocks", "measure_lines", "decode_headers",
        "_text",
        "_splitter", "_entity", "_part_headers", "_stack", "_content", "_parts", "_depth",
        "_line", "_line_len", "_line_started", "_header_size", "_body_size",
        "_longest_header", "_longest_body", "_too_deep", "_closed", "_out",
    )

    def __init__(self, max_header_size=MAX_HEADER_SIZE, max_line=MAX_LINE, max_depth=MAX_DEPTH, decode_text=True,
                 text_blocks=False, measure_lines=True, decode_headers=True):
        self.max_header_size = max_header_size
        self.max_line = max_line
        self.max_depth = max_depth
        #: False: no `TextLine` events (text parts are skimmed like attachments).
        self.decode_text = decode_text
        #: True: decoded text comes as `TextBlock` events (several lines each), read region by region.
        self.text_blocks = text_blocks
        #: False: the lines of parts that are not read are not measured
        #: (`MessageEnd.longest_body_line` then counts only the lines read).
        self.measure_lines = measure_lines
        #: False: `Header` events carry no value (names, sizes and line lengths only).
        self.decode_headers = decode_headers
        self._text = None  # the current text part's _Text (text_blocks mode)
        self._splitter = MessageSplitter(max_header_size)
        self._entity = _Entity()
        self._part_headers = None  # the splitter of a part's header block being read
        self._stack = []  # open multiparts: [boundary, default type of their parts]
        self._content = _IGNORE  # the decoder of the current part's content
        self._parts = 0
        self._depth = 0  # multiparts around the current part
        self._line = b""
        self._line_len = 0
        self._line_started = False
        self._header_size = 0
        self._body_size = 0
        self._longest_header = 0
        self._longest_body = 0
        self._too_deep = False
        self._closed = False
        self._out = None

    def feed(self, data):
        """Take the next octets of the message; return the events they complete."""
        out = self._out = []
        if self._splitter is None:
            self._body(data)
        else:
            self._top(self._splitter.feed(data))
        if self._text is not None and self._text.block:
            self._flush_text()
        self._out = None
        return out

    def _flush_text(self):
        block = self._text.block
        self._out.append(TextBlock(self._text.part, "\n".join(block)))
        block.clear()

    def close(self):
        """The message is over: return the events still held, then `MessageEnd`."""
        if self._closed:
            return []
        self._closed = True
        out = self._out = []
        if self._splitter is not None:
            self._top(self._splitter.close())
        if self._line or self._line_started:
            self._complete(b"")
        self._finish_part()
        out.append(MessageEnd(self._header_size, self._body_size, self._longest_header,
                              self._longest_body, self._parts, self._too_deep))
        self._out = None
        return out

    # -- the message's own header block ------------------------------------------

    def _top(self, events):
        for event in events:
            if isinstance(event, HeaderField):
                self._header(0, event, self._entity, top=True)
            elif isinstance(event, EndOfHeaders):
                self._header_size = event.size
                self._splitter = None
                self._begin(self._entity)
            elif isinstance(event, BodyChunk):
                self._body(event.data)

    def _header(self, part, event, entity, top=False):
        if event.truncated or b"\n" in event.value:
            raw = event.name + b":" + event.value
            longest = _line_lengths(raw)
            if event.truncated:
                # The field's tail was not held: its last line may go on that long.
                last = len(raw) - raw.rfind(b"\n") - 1
                longest = max(longest, last + event.size - len(raw) - 2)
        else:  # one line: its length, but a final CR (as `_line_lengths` counts)
            longest = len(event.name) + 1 + len(event.value) - (event.value[-1:] == b"\r")
        if top and longest > self._longest_header:
            self._longest_header = longest
        name = event.name.decode("ascii", "replace")
        if self.decode_headers:
            value = _unfold(event.value).decode("utf-8", "replace")
            entity.add(name, value)
            value = decode_words(value)
        else:
            if name.lower() in _ENTITY_FIELDS:
                entity.add(name, _unfold(event.value).decode("utf-8", "replace"))
            value = ""
        self._out.append(Header(part, name, value, event.size, longest, event.truncated))

    # -- the body, line by line ---------------------------------------------------

    def _body(self, data):
        """Split body octets into lines; a line longer than ``max_line`` is passed on in segments."""
        self._body_size += len(data)
        pos = 0
        n = len(data)
        while pos < n:
            if self._line_len == 0:
                if self._part_headers is None:
                    if self._content is _IGNORE or self.text_blocks:
                        pos = self._skim(data, pos)
                        if pos >= n:
                            return
                elif self._part_headers.fresh:
                    pos = self._part_header_block(data, pos)
            end = data.find(b"\n", pos)
            if end < 0:
                self._partial(data[pos:])
                return
            self._complete(data[pos:end])
            pos = end + 1

    def _skim(self, data, pos):
        """Whole lines from ``pos`` whose content is not read: count their lengths at C speed.

        Stops at the last line start, or at a line that may be a boundary
        (it is then handled line by line); returns where it stopped.
        """
        last = data.rfind(b"\n", pos)
        if last < 0:
            return pos
        stop = last + 1
        if self._stack:
            if data.startswith(b"--", pos):
                return pos
            candidate = _find_dashes(data, pos, stop)
            if candidate >= 0:
                stop = candidate + 1
        if stop > pos:
            region = data[pos:stop]
            if self.measure_lines:
                longest = _longest_line(region)
                if longest > self._longest_body:
                    self._longest_body = longest
            self._content.region(region, self._out)
        return stop

    def _part_header_block(self, data, pos):
        """A part's whole header block at ``pos``, read at once when it is plain; returns where the body begins.

        Plain: no line that may be a boundary, none longer than
        ``max_line``, every line ending in CRLF, a whole block
        (`mailguard.message.header_block`): then the events are those of its
        lines read one by one.
        """
        bound = min(self.max_header_size, self.max_line)
        whole = header_block(data, pos, bound)
        if whole is None:
            return pos
        fields, end = whole
        if data.startswith(b"--", pos) or _find_dashes(data, pos, end) >= 0:
            return pos
        region = data[pos:end]
        if region.count(b"\n") != region.count(b"\r\n"):
            return pos  # line by line, a part's header lines end in CRLF whatever they ended with
        longest = _longest_line(region)
        if longest > self._longest_body:
            self._longest_body = longest
        self._part_header_events(fields + [EndOfHeaders(end - pos)], True)
        return end

    def _partial(self, piece):
        line = self._line + piece if self._line else piece
        self._line_len += len(piece)
        if len(line) > self.max_line:
            # Keep a final CR back: it may be the CR of the CRLF.
            keep = 1 if line.endswith(b"\r") else 0
            self._segment(line[: len(line) - keep], not self._line_started, False)
            self._line_started = True
            line = line[len(line) - keep :]
        self._line = line

    def _complete(self, piece):
        line = self._line + piece if self._line else piece
        length = self._line_len + len(piece)
        if line.endswith(b"\r"):
            line = line[:-1]
            length -= 1
        if length > self._longest_body:
            self._longest_body = length
        first = not self._line_started
        self._line = b""
        self._line_len = 0
        self._line_started = False
        self._segment(line, first, True)

    def _segment(self, data, first, complete):
        """One body line (``first`` and ``complete``), or a segment of a long one."""
        if first and complete and self._stack and data[:2] == b"--" and len(data) <= _BOUNDARY_LINE:
            if self._boundary(data):
                return
        if self._part_headers is not None:
            self._part_header_events(self._part_headers.feed(data + b"\r\n" if complete else data), complete)
            return
        self._content.segment(data, complete, self._out)

    def _boundary(self, line):
        """Handle ``line`` if it delimits one of the open multiparts; True if it did."""
        candidate = line[2:].rstrip(b" \t")
        for level in range(len(self._stack) - 1, -1, -1):
            boundary = self._stack[level][0]
            if candidate == boundary:
                closing = False
            elif candidate == boundary + b"--":
                closing = True
            else:
                continue
            self._finish_part()
            default = self._stack[level][1]
            del self._stack[level + 1 :]
            if closing:
                del self._stack[level]
                self._content = _IGNORE  # the epilogue
                self._depth = len(self._stack)
            else:
                self._depth = level + 1
                self._part_headers = MessageSplitter(self.max_header_size)
                self._entity = _Entity(default)
            return True
        return False

    def _part_header_events(self, events, complete):
        """Handle what a part's header splitter returned for a line (``complete``) or a segment of one."""
        part = self._parts
        chunks = []
        for event in events:
            if isinstance(event, HeaderField):
                self._header(part, event, self._entity)
            elif isinstance(event, EndOfHeaders):
                self._part_headers = None
                self._begin(self._entity)
            elif isinstance(event, BodyChunk):
                chunks.append(event.data)
        if chunks:
            # A line that is not a header field ends a malformed part's
            # header block and is its body's first line (as mail readers
            # show it).  Whether the splitter decided on the whole line or
            # on its first segments (the rest then comes here as content)
            # depends on the segmentation, so the octets it has seen go to
            # the content either way, and the CRLF added above comes off.
            data = b"".join(chunks)
            if complete:
                data = data[:-2]
            self._content.segment(data, complete, self._out)

    def _finish_part(self):
        self._content.close(self._out)
        self._content = _IGNORE
        if self._text is not None:
            if self._text.block:
                self._flush_text()
            self._text = None
        if self._part_headers is not None:
            # The part's header block did not end: a part without a body.
            self._part_header_events(self._part_headers.close(), False)
            self._content.close(self._out)
            self._content = _IGNORE

    def _begin(self, entity):
        """An entity's header block is over: announce it and choose how to read its body."""
        part = self._parts
        self._parts += 1
        content_type, encoding, filename, boundary, charset = entity.describe()
        self._out.append(PartStart(part, self._depth, content_type, encoding, filename))
        self._entity = None
        if content_type.startswith("multipart/") and boundary:
            if len(self._stack) < self.max_depth:
                default = "message/rfc822" if content_type == "multipart/digest" else "text/plain"
                self._stack.append((boundary.encode("utf-8", "replace"), default))
                self._content = _IGNORE  # the preamble
                return
            self._too_deep = True
        if content_type.startswith("text/") and self.decode_text:
            text = _Text(part, charset, self.max_line)
            if self.text_blocks:
                text.block = []
                self._text = text
            if encoding == "base64":
                self._content = _Base64(text)
            elif encoding == "quoted-printable":
                self._content = _QuotedPrintable(text)
            else:
                self._content = _Identity(text)
        else:
            self._content = _IGNORE


def read_message(data, max_header_size=MAX_HEADER_SIZE, max_line=MAX_LINE, max_depth=MAX_DEPTH, decode_text=True):
    """All events of the whole message ``data`` (for tests and tools)."""
    reader = MimeReader(max_header_size, max_line, max_depth, decode_text)
    return reader.feed(data) + reader.close()
