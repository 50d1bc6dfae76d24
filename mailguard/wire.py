"""Sans-IO parsers for the SMTP wire format: replies, command lines, message data.

Each parser takes bytes as they arrive, in any segmentation, and hands back
complete units.  The RFC limits are built in: no parser buffers more than its
limit whatever the peer sends.  Nothing here imports Twisted.
"""

import re


class WireError(Exception):
    """The peer broke the wire format; ``str()`` says how."""


# -- Replies (server -> client) ---------------------------------------------


class ReplyMessage:
    """One complete SMTP reply: its code, its raw lines (each with CRLF) and all of it as sent.

    A plain slotted class rather than a frozen dataclass: one is made for
    every reply the server sends, and the frozen constructor's per-field
    ``object.__setattr__`` is most of its cost.  Nothing assigns to it.
    """

    __slots__ = ("code", "lines", "raw")

    def __init__(self, code, lines, raw=None):
        self.code = code
        self.lines = lines
        #: The reply exactly as the server sent it.
        self.raw = raw if raw is not None else b"".join(lines)

    def __eq__(self, other):
        if other.__class__ is not ReplyMessage:
            return NotImplemented
        return self.code == other.code and self.lines == other.lines

    def __repr__(self):
        return "ReplyMessage(code=%r, lines=%r)" % (self.code, self.lines)

    def texts(self):
        """The text of each line, after the code and separator, without CRLF."""
        return [line[4:-2] for line in self.lines]


# A whole valid reply line: code 200-599, then SP, "-" or the line end.
_WHOLE_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|(?=\r\n))[^\r\n]*\r\n")
# One or more whole single-line replies: what a server sends nearly always.
_FINAL_LINES = re.compile(rb"(?:[2-5][0-9][0-9](?: [^\r\n]*)?\r\n)+")


def _diagnose(line, max_line):
    """Why a complete reply line is invalid, in words."""
    if len(line) > max_line:
        return "reply line longer than %d octets" % max_line
    if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
        return "reply line not ended by CRLF"
    return "malformed reply line"


def whole_replies(data, max_line=512):
    """The replies in ``data`` when it is nothing but whole single-line replies, else None.

    What a server sends nearly always, validated in one regex pass with only
    the line lengths left to check; anything else (a multi-line reply, a
    partial line, an invalid one) is left to `ReplyParser`, which needs no
    state for this case.
    """
    if _FINAL_LINES.fullmatch(data) is None:
        return None
    if len(data) <= max_line and data.count(b"\n") == 1:
        return [ReplyMessage(int(data[:3]), (data,), data)]
    replies = []
    for line in data.splitlines(keepends=True):
        if len(line) > max_line:
            return None  # ReplyParser says why
        replies.append(ReplyMessage(int(line[:3]), (line,), line))
    return replies


class ReplyParser:
    """Reassemble complete, validated replies from the server's byte stream.

    A line is valid when it starts with a code 200-599 followed by SP, ``-``
    or CRLF and ends with CRLF; all lines of a multi-line reply carry the same
    code.  Anything else raises `WireError` (the caller closes the session:
    a reply we cannot parse is never relayed).
    """

    __slots__ = ("_buf", "_lines", "_max_line", "_max_lines")

    def __init__(self, max_line=512, max_lines=1000):
        self._buf = b""
        self._lines = None  # the lines of a multi-line reply still open
        self._max_line = max_line
        self._max_lines = max_lines

    def feed(self, data):
        """Add bytes; return the list of `ReplyMessage` completed by them."""
        if not self._buf and not self._lines:
            replies = whole_replies(data, self._max_line)
            if replies is not None:
                return replies
        replies = []
        self._buf = self._parse(self._buf + data if self._buf else data, replies)
        if len(self._buf) > self._max_line:
            raise WireError("reply line longer than %d octets" % self._max_line)
        if not self._lines:
            self._lines = None
        return replies

    def _parse(self, buf, replies):
        """Append the replies completed in ``buf`` to ``replies``; return the partial line left."""
        pos = 0
        n = len(buf)
        match = _WHOLE_LINE.match
        max_line = self._max_line
        lines = self._lines
        if lines is None:
            lines = self._lines = []
        while pos < n:
            m = match(buf, pos)
            if m is None:
                end = buf.find(b"\n", pos)
                if end < 0:
                    break  # a partial line: wait for the rest
                raise WireError(_diagnose(buf[pos : end + 1], max_line))
            end = m.end()
            if end - pos > max_line:
                raise WireError("reply line longer than %d octets" % max_line)
            line = buf[pos:end]
            pos = end
            if lines and lines[0][:3] != line[:3]:
                raise WireError("inconsistent codes in multi-line reply")
            if m.group(2) == b"-":
                lines.append(line)
                if len(lines) > self._max_lines:
                    raise WireError("multi-line reply too long")
                continue
            if lines:
                lines.append(line)
                replies.append(ReplyMessage(int(m.group(1)), tuple(lines)))
                lines = self._lines = []
            else:
                replies.append(ReplyMessage(int(m.group(1)), (line,)))
        return buf[pos:]

    @property
    def idle(self):
        """True when no partial reply is buffered."""
        return not self._buf and not self._lines


def mask_banner(raw, mode):
    """Mask a 220 greeting the way a firewall hides the server's identity.

    ``pix`` is the PIX MailGuard behaviour: every byte except ``2``, ``0``,
    CR and LF becomes ``*``, keeping the length; the ``-`` continuation
    marker of non-final lines is kept so clients still parse the reply.
    ``on`` keeps the reply code and separator and masks the rest.  Any other
    greeting (421, 554) and ``off`` return ``raw`` unchanged.
    """
    if mode == "off" or not raw.startswith(b"220"):
        return raw
    out = []
    for line in raw.splitlines(keepends=True):
        body, eol = line[:-2], line[-2:]
        if mode == "pix":
            masked = bytearray(body.translate(_PIX_TABLE))
            if body[3:4] == b"-":
                masked[3:4] = b"-"
        else:
            masked = bytearray(body[:4] + b"*" * (len(body) - 4))
        out.append(bytes(masked) + eol)
    return b"".join(out)


_PIX_TABLE = bytes(b if b in b"20" else ord("*") for b in range(256))


# -- Command lines (client -> server) -----------------------------------------


class LineBuffer:
    """Split the client's command stream into lines, with a hard length bound.

    `push` adds bytes; `pop` returns the next ``(line, bare_lf)`` pair, where
    ``line`` excludes its line end and ``bare_lf`` says it ended with LF
    alone, or None when no complete line is buffered.  A line longer than
    ``limit`` octets (counted with its CRLF) is reported once as `TOO_LONG`
    and its bytes are discarded up to the next LF, so the buffer never holds
    more than ``limit`` octets of a partial line.  Lines are popped one at a
    time because a command may switch the stream to raw data (BDAT).
    """

    TOO_LONG = object()

    __slots__ = ("limit", "_buf", "_pos", "_discarding")

    def __init__(self, limit):
        self.limit = limit
        self._buf = b""
        self._pos = 0
        self._discarding = False

    def push(self, data):
        """Add bytes received from the peer."""
        if self._pos:
            self._buf = self._buf[self._pos :]
            self._pos = 0
        self._buf = self._buf + data if self._buf else data

    def pop(self):
        """Return the next complete line (see the class docstring) or None."""
        buf = self._buf
        start = self._pos
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                if self._discarding:
                    self._buf, self._pos = b"", 0
                    return None
                if len(buf) - start >= self.limit:
                    # Cannot fit whatever follows: report it now and stop
                    # buffering, so a client streaming bytes without CRLF
                    # costs nothing.
                    self._discarding = True
                    self._buf, self._pos = b"", 0
                    return (self.TOO_LONG, False)
                self._pos = start
                return None
            self._pos = end + 1
            if self._discarding:
                self._discarding = False
                start = end + 1
                continue
            if end + 1 - start > self.limit:
                return (self.TOO_LONG, False)
            if end > start and buf[end - 1] == 13:
                return (buf[start : end - 1], False)
            return (buf[start:end], True)

    def take(self):
        """Return and forget whatever is buffered but not yet popped."""
        rest = self._buf[self._pos :]
        self._buf, self._pos = b"", 0
        return rest

    @property
    def pending(self):
        """Octets buffered but not yet popped."""
        return len(self._buf) - self._pos

    @property
    def idle(self):
        """True when nothing is buffered and no overlong line is being skipped."""
        return len(self._buf) == self._pos and not self._discarding


# -- Message data (DATA) -------------------------------------------------------

_EOL = re.compile(rb"\r\n|\r|\n")

try:
    from mailguard._scan import scan as _scan
except ImportError:  # not compiled: the pure-Python path gives the same output
    _scan = None


class DataScanner:
    """Find the end of DATA and make the stream safe to forward.

    Only ``CRLF . CRLF`` ends the message (the DATA command's own CRLF counts
    for the first line).  A bare CR or LF is turned into CRLF, and a line
    beginning with ``.`` whose start or end came from such a conversion gets
    one more ``.``, so the backend can never see an end of data the client
    did not send; NUL becomes a space.  ``bare`` records whether any of that
    happened, ``nul`` whether a NUL did.

    ``size`` counts the message as RFC 1870 counts SIZE: what the backend
    will store, CRLFs included, stuffing dots and the final ``.CRLF``
    excluded.  Once it would exceed ``max_size`` the scanner stops returning
    data (``overflow`` is set) but still finds the real end.

    Clean chunks (CRLF line ends only, no NUL) take a fast path of C-speed
    ``bytes`` searches and are forwarded without per-line work.
    """

    #: A line starting with "." is held until its end is known, up to this
    #: many octets, so that stuffing does not depend on segmentation.
    HOLD_LIMIT = 1000

    __slots__ = ("max_size", "size", "bare", "nul", "overflow", "done", "_pend", "_start_conv", "_line_emitted")

    def __init__(self, max_size):
        self.max_size = max_size
        self.size = 0
        self.bare = False
        self.nul = False
        self.overflow = False
        self.done = False
        self._pend = b""
        self._start_conv = False
        self._line_emitted = False

    def feed(self, data):
        """Scan ``data``; return ``(segments, rest)``.

        ``segments`` are bytes to forward (ending with the ``.CRLF``
        terminator once the end is found); ``rest`` is None until the end of
        data, then the bytes that followed it (commands).
        """
        if (
            _scan is not None
            and data
            and not self._pend
            and not self._start_conv
            and not self.overflow
            and (self._line_emitted or data[:1] != b".")
        ):
            # One compiled pass proves the chunk clean, counts its stuffing
            # dots and finds the terminator; anything doubtful falls through.
            doubtful, dots, term = _scan(data)
            if doubtful < 0:
                out = []
                if term >= 0:
                    self._emit(out, data[: term + 2], dots)
                    self._line_emitted = False
                    return self._finish(out, data[term + 5 :])
                last = data.rfind(b"\r\n")
                if last < 0 or data[last + 2 : last + 3] != b".":
                    self._emit(out, data, dots)
                    self._line_emitted = not data.endswith(b"\r\n")
                    return out, None
        return self._python(data)

    def _python(self, data):
        """The Python paths: `_fast` for a chunk of clean CRLF lines, `_slow` for anything else."""
        pend = self._pend
        if (
            not self._start_conv
            and (not pend or (pend[-1] != 13 and b"\0" not in pend))
            and b"\0" not in data
            and data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")
        ):
            return self._fast(pend + data if pend else data)
        return self._slow(pend + data)

    def _emit(self, out, seg, dots):
        size = self.size + len(seg) - dots
        if self.overflow or size > self.max_size:
            self.overflow = True
            return
        self.size = size
        out.append(seg)

    def _finish(self, out, rest):
        self.done = True
        self._pend = b""
        if not self.overflow:
            out.append(b".\r\n")
        return out, rest

    def _fast(self, s):
        out = []
        at_start = not self._line_emitted
        if at_start and s.startswith(b".\r\n"):
            return self._finish(out, s[3:])
        lead = 1 if at_start and s[:1] == b"." else 0
        # One pass in the common case: no line starts with "." at all, so
        # there is neither a terminator nor a stuffed dot to look for.
        dots = s.count(b"\r\n.")
        idx = s.find(b"\r\n.\r\n") if dots else -1
        if idx >= 0:
            body = s[: idx + 2]
            self._emit(out, body, body.count(b"\r\n.") + lead)
            self._line_emitted = False
            return self._finish(out, s[idx + 5 :])
        last = s.rfind(b"\r\n")
        if last < 0:
            return self._inside_line(out, s, at_start, lead)
        tail = s[last + 2 :]
        if tail == b"" or (tail[:1] == b"." and len(tail) < self.HOLD_LIMIT):
            # Hold a partial line that may still turn out to be the terminator
            # (or need stuffing): its leading dot is counted when it is sent.
            seg, self._pend, self._line_emitted = s[: last + 2], tail, False
            if tail:
                dots -= 1  # the held line's "\r\n." is counted when it is sent
        else:
            seg, self._pend, self._line_emitted = s, b"", True
        self._emit(out, seg, dots + lead)
        return out, None

    def _inside_line(self, out, s, at_start, lead):
        """A clean chunk with no line end: it continues the current line, or is held at a line's start."""
        if at_start and (s == b"" or (lead and len(s) < self.HOLD_LIMIT)):
            self._pend = s
            return out, None
        self._emit(out, s, lead)
        self._line_emitted = True
        self._pend = b""
        return out, None

    def _slow(self, s):
        """Any chunk: bare CR/LF made CRLF, NUL made a space, line by line."""
        # Only the per-line loop is here: a line starting with "." and the
        # chunk's tail are steps of their own.  Against the unsplit loop
        # (Python path, no compiled scan, the bare-LF messages of 1 KB to
        # 1 MB of bench/scanproto.py, interleaved in one process) the time
        # ratio was 0.86 to 1.12 per row, median 0.96: no measurable cost.
        out = []
        pos = 0
        n = len(s)
        for m in _EOL.finditer(s):
            sep = m.group()
            if sep == b"\r" and m.end() == n:
                break  # a CR at the end may yet be half of a CRLF
            line = s[pos : m.start()]
            end_conv = sep != b"\r\n"
            if end_conv:
                self.bare = True
            lead = 0
            if line[:1] == b"." and not self._line_emitted:
                line = self._dot_line(line, end_conv)
                if line is None:
                    return self._finish(out, s[m.end() :])
                lead = 1
            if b"\0" in line:
                self.bare = self.nul = True
                line = line.replace(b"\0", b" ")
            self._emit(out, line + b"\r\n", lead)
            self._start_conv = end_conv
            self._line_emitted = False
            pos = m.end()
        return self._slow_tail(out, s[pos:])

    def _dot_line(self, line, end_conv):
        """A whole line starting with ``.``: None if it ends the data, else the line, stuffed when it must be."""
        if line == b"." and not self._start_conv and not end_conv:
            self._line_emitted = False
            return None
        if self._start_conv or (end_conv and len(line) < self.HOLD_LIMIT):
            return b"." + line
        return line

    def _slow_tail(self, out, tail):
        """What follows the last line end of a `_slow` chunk: held at a line's start, else forwarded."""
        cr = tail[-1:] == b"\r"
        text = tail[:-1] if cr else tail
        if not self._line_emitted and (
            text == b"" or (text[:1] == b"." and len(text) < self.HOLD_LIMIT)
        ):
            self._pend = tail
            return out, None
        lead = 0
        if not self._line_emitted and text[:1] == b".":
            lead = 1
            if self._start_conv:
                text = b"." + text
        if b"\0" in text:
            self.bare = self.nul = True
            text = text.replace(b"\0", b" ")
        self._emit(out, text, lead)
        self._line_emitted = True
        self._pend = b"\r" if cr else b""
        return out, None
