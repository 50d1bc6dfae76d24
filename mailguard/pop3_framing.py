"""POP3 framing (sans-IO): the server's bytes as status lines and multi-line bodies.

The client's side is plain CRLF lines (`mailguard.wire.LineBuffer`).  The
server's side is read here by `ResponseReader`: CRLF-terminated lines of at
most ``limit`` octets, and, once the inspector says a multi-line body has
begun (`ResponseReader.start_body`), that body's octets streamed as they
come (never held) up to and including its ``CRLF . CRLF``.  Which response
opens a body is a rule (`mailguard.pop3_rules.opens_body`), not framing.
Nothing here imports Twisted.
"""

#: `ResponseReader.pop` item kinds.
LINE = "line"  # (LINE, one whole line with its CRLF)
BODY = "body"  # (BODY, body octets; the body goes on)
BODY_END = "body_end"  # (BODY_END, the body's last octets, ``CRLF . CRLF`` included)


class FramingError(Exception):
    """The server broke POP3's framing; ``str()`` says how."""


class DotEnd:
    """Find the ``CRLF . CRLF`` that ends a multi-line body, in any segmentation.

    The body starts right after its status line, so the status line's CRLF
    counts as the first CRLF.  Only a few octets are kept between feeds.
    """

    __slots__ = ("_tail",)

    def __init__(self):
        self._tail = b"\r\n"

    def feed(self, data):
        """Return how many octets of ``data`` belong to the body (terminator included), or -1 for all."""
        window = self._tail + data
        i = window.find(b"\r\n.\r\n")
        if i >= 0:
            return i + 5 - len(self._tail)
        self._tail = window[-4:]
        return -1


class ResponseReader:
    """Split the server's stream into lines and body octets (see the module docstring).

    `push` adds bytes; `pop` returns the next item or None when more bytes
    are needed, and raises `FramingError` for a line over ``limit`` octets
    (CRLF included) or one not ended by CRLF.  ``buffered`` is what was
    pushed but not popped: after a ``+OK`` to STLS it must be nothing.
    """

    __slots__ = ("limit", "_buf", "_dot")

    def __init__(self, limit):
        self.limit = limit
        self._buf = bytearray()
        self._dot = None  # a DotEnd while a body streams

    def push(self, data):
        """Add bytes received from the server."""
        self._buf += data

    @property
    def buffered(self):
        """Octets pushed but not yet returned by `pop`."""
        return len(self._buf)

    @property
    def in_body(self):
        """True while a multi-line body streams."""
        return self._dot is not None

    def start_body(self):
        """The octets after the line just popped are a multi-line body."""
        self._dot = DotEnd()

    def pop(self):
        """Return the next ``(kind, data)`` item, or None."""
        buf = self._buf
        if not buf:
            return None
        if self._dot is not None:
            n = self._dot.feed(bytes(buf))
            if n < 0:
                chunk = bytes(buf)
                del buf[:]
                return (BODY, chunk)
            chunk = bytes(buf[:n])
            del buf[:n]
            self._dot = None
            return (BODY_END, chunk)
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) >= self.limit:
                raise FramingError("response line too long")
            return None
        if end + 1 > self.limit:
            raise FramingError("response line too long")
        line = bytes(buf[: end + 1])
        del buf[: end + 1]
        if not line.endswith(b"\r\n"):
            raise FramingError("response line not ended by CRLF")
        return (LINE, line)
