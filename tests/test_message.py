"""The streaming message splitter and dot (un)stuffing: whole, byte by byte and in random pieces alike."""

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailguard.message import (
    BODY_CHUNK, MAX_HEADER_SIZE, BodyChunk, EndOfHeaders, HeaderField, MessageSplitter, Stuffer, Unstuffer,
    header_block,
)

MESSAGE = (
    b"Received: from a\r\n\tby b\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\nX-Empty:\r\n.Dot: legal\r\n\r\n"
    b"body\r\n.line\r\n\r\nFrom: not a header\r\n"
)


def split(data, pieces=None, **kw):
    """The events of ``data`` fed in ``pieces`` (offsets), body chunks joined."""
    s = MessageSplitter(**kw)
    events = []
    cuts = [0] + sorted(pieces or []) + [len(data)]
    for a, b in zip(cuts, cuts[1:]):
        events += s.feed(data[a:b])
    events += s.close()
    out, body = [], b""
    for e in events:
        if isinstance(e, BodyChunk):
            body += e.data
        else:
            out.append(e)
    return out, body


def cuts_of(data):
    return st.lists(st.integers(min_value=0, max_value=len(data)), max_size=12)


class SplitterTests(SynchronousTestCase):
    """Header fields, end of headers and body, as the message has them."""

    def test_fields(self):
        """Fields keep their leading space and folding; the empty line ends the headers; the body is untouched."""
        events, body = split(MESSAGE)
        self.assertEqual(events, [
            HeaderField(b"Received", b" from a\r\n\tby b", 25),
            HeaderField(b"Subject", b" =?utf-8?q?caf=C3=A9?=", 32),
            HeaderField(b"X-Empty", b"", 10),
            HeaderField(b".Dot", b" legal", 13),
            EndOfHeaders(82),
        ])
        self.assertEqual(body, b"body\r\n.line\r\n\r\nFrom: not a header\r\n")

    def test_bytewise(self):
        """Fed one byte at a time, the events are the same."""
        self.assertEqual(split(MESSAGE, list(range(1, len(MESSAGE)))), split(MESSAGE))

    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def test_anyPieces(self, data):
        """Fed in any pieces, the events are the same (hypothesis)."""
        self.assertEqual(split(MESSAGE, data.draw(cuts_of(MESSAGE))), split(MESSAGE))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300), st.data())
    def test_anyInput(self, blob, data):
        """Any octets split the same way in any pieces, and header plus body account for every octet."""
        whole = split(blob)
        self.assertEqual(split(blob, data.draw(cuts_of(blob))), whole)
        events, body = whole
        end = [e for e in events if isinstance(e, EndOfHeaders)]
        self.assertEqual(len(end), 1)
        self.assertEqual(end[0].size + len(body), len(blob))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from([b"A: ", b"xyz", b"\r\n", b"\n", b" ", b"\t", b":", b"B:"]), max_size=40)
           .map(b"".join), st.data())
    def test_boundedPieces(self, blob, data):
        """With a tiny bound (truncating fields), any pieces give the same events and sizes count every octet."""
        whole = split(blob, max_header_size=8)
        self.assertEqual(split(blob, data.draw(cuts_of(blob)), max_header_size=8), whole)
        events, body = whole
        self.assertEqual(events[-1].size + len(body), len(blob))
        fields = [e for e in events if isinstance(e, HeaderField)]
        self.assertLessEqual(sum(f.size for f in fields), events[-1].size)
        self.assertTrue(all(len(f.value) <= 8 for f in fields))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from([b"A: 1", b"To:", b"x", b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b"\xe9",
                                     b"--b:c"]), max_size=30).map(b"".join),
           st.sampled_from([8, 20, MAX_HEADER_SIZE]))
    def test_wholeBlockAsLineByLine(self, blob, bound):
        """A header block read at once (`header_block`) gives the events of the same block read byte by byte."""
        self.assertEqual(split(blob, max_header_size=bound),
                         split(blob, list(range(1, len(blob))), max_header_size=bound))

    def test_headerBlockPlainOnly(self):
        """`header_block` reads a whole plain block, and leaves any other to the line-by-line reading."""
        fields, end = header_block(b"A: 1\r\n folded\r\nB:2\n\r\nbody", 0, 100)
        self.assertEqual(fields, [HeaderField(b"A", b" 1\r\n folded", 15), HeaderField(b"B", b"2", 4)])
        self.assertEqual(end, 21)
        self.assertIsNone(header_block(b"A: 1\r\nB: 2\r\n", 0, 100))  # not whole yet
        self.assertIsNone(header_block(b"A: 1\r\nnot a field\r\n\r\n", 0, 100))
        self.assertIsNone(header_block(b"A: 1\r\n\r\n", 0, 5))  # over the bound

    def test_notAHeaderEndsHeaders(self):
        """A line that is no header field starts the body."""
        events, body = split(b"A: 1\r\nno colon here\r\nB: 2\r\n")
        self.assertEqual(events, [HeaderField(b"A", b" 1", 6), EndOfHeaders(6)])
        self.assertEqual(body, b"no colon here\r\nB: 2\r\n")

    def test_oversizedFieldBounded(self):
        """A field over the bound is truncated, its whole size still counted, memory bounded."""
        value = b"x" * 100000
        s = MessageSplitter(max_header_size=1000)
        events = []
        for i in range(0, len(value), 4096):
            events += s.feed((b"Big: " if i == 0 else b"") + value[i:i + 4096])
            self.assertLessEqual(len(s._buf), 1000 + 2)  # the bound, and room for the line end
        events += s.feed(b"\r\n\r\nbody")
        field = events[0]
        self.assertTrue(field.truncated)
        self.assertEqual(field.size, 4 + 1 + len(value) + 2)
        self.assertEqual(field.value, b"")

    def test_bodyChunksBounded(self):
        """The body comes out in pieces no larger than BODY_CHUNK."""
        s = MessageSplitter()
        events = s.feed(b"A: 1\r\n\r\n" + b"y" * (3 * BODY_CHUNK + 5))
        self.assertTrue(all(len(e.data) <= BODY_CHUNK for e in events if isinstance(e, BodyChunk)))


class StuffingTests(SynchronousTestCase):
    """Dot stuffing for DATA, and its undoing, in any pieces."""

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"\r\n."]), max_size=30).map(b"".join),
           st.data())
    def test_roundTrip(self, text, data):
        """Stuffing then unstuffing, each in any pieces, gives the message back; no stuffed line starts with one dot."""
        wire = Stuffer().feed(text)
        for line in wire.split(b"\r\n")[1:]:
            self.assertFalse(line.startswith(b".") and not line.startswith(b".."))
        for fn, src, expected in ((Stuffer, text, wire), (Unstuffer, wire, text)):
            cuts = [0] + sorted(data.draw(cuts_of(src))) + [len(src)]
            f = fn()
            self.assertEqual(b"".join(f.feed(src[a:b]) for a, b in zip(cuts, cuts[1:])), expected)
