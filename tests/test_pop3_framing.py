"""POP3 framing (mailguard.pop3_framing): status lines and multi-line bodies, whole and byte by byte."""

from twisted.trial.unittest import SynchronousTestCase

from mailguard.pop3_framing import BODY, BODY_END, LINE, DotEnd, FramingError, ResponseReader


def read(data, bytewise=False, bodies=(), limit=64):
    """Push ``data`` (whole or byte by byte) and pop everything; after each line in ``bodies`` a body starts."""
    reader = ResponseReader(limit)
    items = []
    for piece in [data[i : i + 1] for i in range(len(data))] if bytewise else [data]:
        reader.push(piece)
        while True:
            item = reader.pop()
            if item is None:
                break
            items.append(item)
            if item[0] is LINE and item[1] in bodies:
                reader.start_body()
    return reader, items


def merged(items):
    """Adjacent BODY pieces joined, so that whole and byte-by-byte runs compare equal."""
    out = []
    for kind, data in items:
        if out and out[-1][0] is BODY and kind in (BODY, BODY_END):
            out[-1] = (kind, out[-1][1] + data)
        else:
            out.append((kind, data))
    return out


class DotEndTests(SynchronousTestCase):
    """DotEnd finds the end of a multi-line body."""

    def test_dot_end(self):
        """DotEnd finds CRLF.CRLF across any split, counting the status line's CRLF."""
        data = b"a\r\n..\r\nb\r\n.\r\nrest"
        for cut in range(len(data) + 1):
            scanner = DotEnd()
            n = scanner.feed(data[:cut])
            total = n if n >= 0 else None
            if total is None:
                m = scanner.feed(data[cut:])
                total = cut + m
            self.assertEqual(total, len(data) - 4)


class ResponseReaderTests(SynchronousTestCase):
    """ResponseReader splits the server's stream the same way in any segmentation."""

    def test_lines(self):
        """Status lines come one by one with their CRLF; a partial line waits."""
        for bytewise in (False, True):
            reader, items = read(b"+OK ready\r\n-ERR no\r\n+OK par", bytewise)
            self.assertEqual(items, [(LINE, b"+OK ready\r\n"), (LINE, b"-ERR no\r\n")])
            self.assertEqual(reader.buffered, len(b"+OK par"))

    def test_body(self):
        """After start_body the octets up to CRLF.CRLF are the body, whatever they look like; then lines again."""
        data = b"+OK 2 octets\r\nline\r\n..stuffed\r\n+OK not a status\r\n.\r\n+OK next\r\n"
        body = b"line\r\n..stuffed\r\n+OK not a status\r\n.\r\n"
        for bytewise in (False, True):
            reader, items = read(data, bytewise, bodies=(b"+OK 2 octets\r\n",))
            self.assertEqual(merged(items), [(LINE, b"+OK 2 octets\r\n"), (BODY_END, body), (LINE, b"+OK next\r\n")])
            self.assertFalse(reader.in_body)

    def test_body_streams(self):
        """A body is handed on as it arrives, never held whole."""
        reader = ResponseReader(64)
        reader.push(b"+OK\r\n")
        self.assertEqual(reader.pop(), (LINE, b"+OK\r\n"))
        reader.start_body()
        reader.push(b"x" * 1000)
        self.assertEqual(reader.pop(), (BODY, b"x" * 1000))
        self.assertTrue(reader.in_body)
        self.assertEqual(reader.buffered, 0)
        reader.push(b"\r\n.\r\n")
        self.assertEqual(reader.pop(), (BODY_END, b"\r\n.\r\n"))

    def test_empty_body(self):
        """A body that is only the terminating dot ends at once (the status line's CRLF counts)."""
        for bytewise in (False, True):
            reader, items = read(b"+OK\r\n.\r\n", bytewise, bodies=(b"+OK\r\n",))
            self.assertEqual(merged(items), [(LINE, b"+OK\r\n"), (BODY_END, b".\r\n")])

    def test_too_long(self):
        """A line over the limit is a framing error, whether or not its LF has come."""
        for data in (b"+OK " + b"x" * 70 + b"\r\n", b"+OK " + b"x" * 70):
            for bytewise in (False, True):
                with self.assertRaises(FramingError) as caught:
                    read(data, bytewise)
                self.assertEqual(str(caught.exception), "response line too long")

    def test_bare_lf(self):
        """A line not ended by CRLF is a framing error."""
        for bytewise in (False, True):
            with self.assertRaises(FramingError) as caught:
                read(b"+OK\n", bytewise)
            self.assertEqual(str(caught.exception), "response line not ended by CRLF")
