"""IMAP framing and syntax (sans-IO): fragments, literals, and the shape of commands and responses.

Both directions of an IMAP stream are split by a `Framer` into line
fragments and literal octets: a fragment ending in ``{n}``, ``{n+}`` (or
``~{n}``, ``~{n+}``) announces ``n`` octets that are data, whatever they
look like, and the command (or response) goes on after them.  Literal
octets are counted as they pass, never held.

The parsers below only say what a line is (a tagged command, a tagged
completion, an untagged status, a capability list); what is allowed is a
rule (`mailguard.imap_rules`).  Nothing here imports Twisted.
"""

import re

LINE = "line"  # a whole fragment within the limit: (LINE, data, literal)
LONG = "long"  # the first LIMIT octets of a longer fragment: (LONG, data, None)
MORE = "more"  # more of it, no line end yet: (MORE, data, None)
END = "end"  # its last octets, line end included: (END, data, literal)
LITERAL = "literal"  # literal octets: (LITERAL, data, last)

_MARKER = re.compile(rb"~?\{([0-9]{1,20})(\+?)\}\r?\n\Z")
_TAIL = 32


def literal_marker(fragment):
    """The literal a fragment announces at its end: ``(octets, synchronizing)``, or None."""
    m = _MARKER.search(fragment)
    if m is None:
        return None
    return int(m.group(1)), not m.group(2)


class Framer:
    """Split one direction of an IMAP stream into line fragments and literal octets.

    `push` adds bytes as they arrive; `pop` returns the next item (see the
    kinds above) or None when more bytes are needed.  A fragment ends at LF.
    Literal octets are counted only after `start_literal`: the consumer
    decides, because a synchronizing literal of a refused command is never
    sent.  Whatever the input, no more than ``limit`` octets of a fragment
    are kept; what `pop` has not returned yet is `buffered`.
    """

    def __init__(self, limit):
        self.limit = limit
        self._buf = bytearray()
        self._pos = 0
        self._literal = 0
        self._long = False
        self._tail = b""

    def push(self, data):
        """Add bytes received from the peer."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self):
        """Octets pushed but not yet returned by `pop`."""
        return len(self._buf) - self._pos

    @property
    def in_literal(self):
        """True while literal octets are still expected."""
        return self._literal > 0

    def start_literal(self, octets):
        """The next ``octets`` octets are literal data, whatever they contain."""
        self._literal = octets

    def pop(self):
        """Return the next item, or None."""
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if self._literal:
            if not avail:
                return None
            n = min(avail, self._literal)
            self._literal -= n
            self._pos = pos + n
            return (LITERAL, bytes(buf[pos : pos + n]), self._literal == 0)
        end = buf.find(b"\n", pos)
        if self._long:
            if end < 0:
                if not avail:
                    return None
                chunk = bytes(buf[pos:])
                self._pos = len(buf)
                self._tail = (self._tail + chunk)[-_TAIL:]
                return (MORE, chunk, None)
            chunk = bytes(buf[pos : end + 1])
            self._pos = end + 1
            tail, self._tail, self._long = (self._tail + chunk)[-_TAIL:], b"", False
            return (END, chunk, literal_marker(tail))
        if end < 0:
            if avail < self.limit:
                return None
        elif end + 1 - pos <= self.limit:
            line = bytes(buf[pos : end + 1])
            self._pos = end + 1
            return (LINE, line, literal_marker(line))
        head = bytes(buf[pos : pos + self.limit])
        self._pos = pos + self.limit
        self._long = True
        self._tail = head[-_TAIL:]
        return (LONG, head, None)


def text(fragment):
    """A fragment without its line end."""
    if fragment.endswith(b"\r\n"):
        return fragment[:-2]
    if fragment.endswith(b"\n"):
        return fragment[:-1]
    return fragment


_TAG_CHARS = bytes(c for c in range(0x21, 0x7F) if c not in b'(){%*"\\+')
_TAG = re.compile(rb"[" + re.escape(_TAG_CHARS) + rb"]+")
_COMMAND = re.compile(
    rb"([" + re.escape(_TAG_CHARS) + rb"]+) ([A-Za-z][A-Za-z0-9-]*)(?: ([A-Za-z][A-Za-z0-9-]*))?"
)
_TAGGED = re.compile(rb"([" + re.escape(_TAG_CHARS) + rb"]+) (OK|NO|BAD)(?:[ \r\n]|\Z)", re.I)
_STATUS = re.compile(rb"\* (OK|NO|BAD|BYE|PREAUTH)(?:[ \r\n]|\Z)", re.I)
_CAPABILITY = re.compile(rb"\* CAPABILITY(?= |\r?\n|\Z)", re.I)
_CAPABILITY_CODE = re.compile(rb"\[CAPABILITY ([^\]\r\n]*)\]", re.I)
_CAPABILITY_CODE_SP = re.compile(rb"\[CAPABILITY [^\]\r\n]*\] ?", re.I)
#: What starts a ``* CAPABILITY`` response, kept as the server wrote it.
CAPABILITY_PREFIX = len(b"* CAPABILITY")


def is_tag(word):
    """True when ``word`` is a valid tag (RFC 9051 ``tag``)."""
    return _TAG.fullmatch(word) is not None


def parse_command(data):
    """``(tag, VERB, second word or None, end)`` of ``tag SP verb [SP word]`` at the start of ``data``.

    ``VERB`` is upper-cased; ``end`` is where the match stopped.  None when
    ``data`` does not start with a tag and a verb.
    """
    m = _COMMAND.match(data)
    if m is None:
        return None
    return m.group(1), m.group(2).upper(), m.group(3), m.end()


def parse_tagged(text):
    """``(tag, OK|NO|BAD)`` of a tagged completion (status upper-cased), or None."""
    m = _TAGGED.match(text)
    if m is None:
        return None
    return m.group(1), m.group(2).upper()


def untagged_status(text):
    """The upper-cased status of ``* OK|NO|BAD|BYE|PREAUTH ...``, or None."""
    m = _STATUS.match(text)
    return None if m is None else m.group(1).upper()


def is_capability(text):
    """True for a ``* CAPABILITY`` response."""
    return _CAPABILITY.match(text) is not None


def capability_code(line):
    """The words of a ``[CAPABILITY ...]`` response code in ``line`` (bytes), or None."""
    m = _CAPABILITY_CODE.search(line)
    return None if m is None else m.group(1)


def replace_capability_code(line, words_for):
    """``line`` with its first ``[CAPABILITY ...]`` code's words replaced by ``words_for(words)``."""
    if b"[" not in line:
        return line

    def replace(m):
        return b"[CAPABILITY " + b" ".join(words_for(m.group(1).split())) + b"]"

    return _CAPABILITY_CODE.sub(replace, line, count=1)


def drop_capability_code(line):
    """``line`` without its first ``[CAPABILITY ...]`` code (and the space after it)."""
    return _CAPABILITY_CODE_SP.sub(b"", line, count=1)
