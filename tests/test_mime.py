"""Tests for the streaming MIME reader (mailguard.mime)."""

import os
import sys
from email.message import EmailMessage

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mailguard import mime
from mailguard.mime import Header, MessageEnd, MimeReader, PartStart, TextLine, decode_words, read_message

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz"))
import fuzz_mime  # noqa: E402


def wire(message):
    """A message as the gateway spools it: CRLF line ends."""
    return message.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def of(events, kind):
    """The events of one type."""
    return [e for e in events if isinstance(e, kind)]


def sample_messages():
    """Messages built with EmailMessage that exercise every part of the reader."""
    plain = EmailMessage()
    plain["From"] = "alice@example.com"
    plain["To"] = "bob@example.net"
    plain["Subject"] = "Grüße aus Köln – a long subject that the generator has to fold over several lines"
    plain.set_content("first line\nsecond line ünïcode\n", cte="quoted-printable")
    plain.add_attachment(b"MZ\x90\x00" * 50, maintype="application", subtype="octet-stream", filename="setup.exe")
    plain.add_attachment(b"%PDF-1.4", maintype="application", subtype="pdf",
                         filename="Rechnung für März – sehr langer Dateiname damit er fortgesetzt wird.pdf")
    plain.add_attachment("base64 text ü\nline two\n", subtype="plain", cte="base64", filename="notes.txt")

    inner = EmailMessage()
    inner.set_content("<p>html body</p>\n", subtype="html")
    inner.add_attachment(b"PK\x03\x04", maintype="application", subtype="zip", filename="archive.zip")
    nested = EmailMessage()
    nested["Subject"] = "nested"
    nested.set_content("plain alternative\n", cte="base64")
    nested.make_alternative()
    nested.attach(inner)  # multipart/mixed inside multipart/alternative
    return [plain, nested]


def rfc2047_attachment():
    """A message whose attachment's file name is an RFC 2047 encoded word (as some clients write it)."""
    m = EmailMessage()
    m["Subject"] = "=?iso-8859-1?q?caf=E9?= and =?utf-8?b?w6k=?="
    m.set_content("see attachment\n")
    m.add_attachment(b"x", maintype="application", subtype="octet-stream", filename="placeholder")
    data = wire(m)
    return data.replace(b'filename="placeholder"', b'filename="=?utf-8?b?w6l0w6kuZXhl?="')


class HeaderTests(unittest.TestCase):
    """Header fields: unfolded, encoded words decoded, sizes counted."""

    def test_encoded_words_and_folding(self):
        """A folded Subject with encoded words in two charsets comes out as one decoded line."""
        events = read_message(rfc2047_attachment())
        subject = [h for h in of(events, Header) if h.part == 0 and h.name == "Subject"][0]
        self.assertEqual(subject.text, "Subject: café and é")
        folded = [h for h in of(read_message(wire(sample_messages()[0])), Header) if h.name == "Subject"][0]
        self.assertEqual(folded.value, str(sample_messages()[0]["Subject"]))

    def test_folded_value_is_unfolded(self):
        """The CRLF of folding is removed and the longest line is counted without it."""
        data = b"X-Long: one\r\n two\r\n\tthree\r\n\r\nbody\r\n"
        h = of(read_message(data), Header)[0]
        self.assertEqual(h.value, "one two\tthree")
        self.assertEqual(h.longest_line, len("X-Long: one"))
        self.assertEqual(h.size, len(b"X-Long: one\r\n two\r\n\tthree\r\n"))

    def test_sizes(self):
        """MessageEnd counts the header block, the body and the longest line of each."""
        data = b"A: 1\r\nLonger: 12345\r\n\r\n" + b"x" * 1000 + b"\r\nshort\r\n"
        end = read_message(data)[-1]
        self.assertEqual(end, MessageEnd(len(b"A: 1\r\nLonger: 12345\r\n\r\n"), 1000 + 2 + 7, len("Longer: 12345"), 1000, 1))

    def test_oversized_field_is_truncated(self):
        """A field beyond max-header-size is cut, flagged, and still counts its whole size."""
        data = b"X-Big: " + b"a" * 5000 + b"\r\n\r\nbody\r\n"
        h = of(read_message(data, max_header_size=100), Header)[0]
        self.assertTrue(h.truncated)
        self.assertLessEqual(len(h.value), 100)
        self.assertEqual(h.size, len(b"X-Big: ") + 5000 + 2)
        self.assertEqual(h.longest_line, len(b"X-Big: ") + 5000)

    def test_unknown_charset_in_encoded_word(self):
        """An encoded word naming a charset the email package refuses decodes with replacement, never raises."""
        from mailguard.mime import decode_words

        text = decode_words("=?ut\xd4f-8?q?caf=C3=A9?= folded")
        self.assertIn("caf", text)
        self.assertTrue(text.endswith("folded"))

    def test_field_name_beyond_bound(self):
        """A line whose colon lies beyond max-header-size is the first body line, whole or in pieces."""
        data = b"A: 1\r\n" + b"x" * 300 + b": v\r\n\r\nbody\r\n"
        whole = read_message(data, max_header_size=256)
        self.assertEqual([h.name for h in of(whole, Header)], ["A"])
        fuzz_mime.check(data, [10, 200, 290])

    def test_decode_words_unknown_charset(self):
        """An encoded word in an unknown charset decodes with replacement, never raises."""
        self.assertIn("abc", decode_words("=?x-unknown?q?abc?="))
        self.assertEqual(decode_words("plain text"), "plain text")


class PartTests(unittest.TestCase):
    """MIME parts: types, encodings, file names, nesting, decoded text."""

    def test_attachment_file_names(self):
        """Plain, RFC 2231 continued charset-tagged and RFC 2047 file names are all decoded."""
        plain = read_message(wire(sample_messages()[0]))
        names = [p.filename for p in of(plain, PartStart) if p.filename]
        self.assertEqual(names, ["setup.exe", "Rechnung für März – sehr langer Dateiname damit er fortgesetzt wird.pdf",
                                 "notes.txt"])
        self.assertIn(b"filename*0*=utf-8''", wire(sample_messages()[0]))  # really RFC 2231 continued
        encoded = read_message(rfc2047_attachment())
        self.assertEqual([p.filename for p in of(encoded, PartStart) if p.filename], ["été.exe"])

    def test_content_type_name_parameter(self):
        """Without Content-Disposition, the Content-Type name parameter is the file name."""
        data = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
                b"Content-Type: application/x-msdownload; name=\"run.scr\"\r\n\r\nMZ\r\n--b--\r\n")
        parts = of(read_message(data), PartStart)
        self.assertEqual([(p.content_type, p.filename) for p in parts],
                         [("multipart/mixed", None), ("application/x-msdownload", "run.scr")])

    def test_nested_multiparts(self):
        """multipart/mixed inside multipart/alternative: every part at its depth, with its encoding."""
        events = read_message(wire(sample_messages()[1]))
        parts = [(p.depth, p.content_type, p.encoding) for p in of(events, PartStart)]
        self.assertEqual(parts, [
            (0, "multipart/alternative", "7bit"),
            (1, "text/plain", "base64"),
            (1, "multipart/mixed", "7bit"),
            (2, "text/html", "7bit"),
            (2, "application/zip", "base64"),
        ])
        self.assertEqual([(t.part, t.text) for t in of(events, TextLine)],
                         [(1, "plain alternative"), (3, "<p>html body</p>")])

    def test_decoded_text(self):
        """Quoted-printable and base64 text parts come out as decoded lines; binary parts do not."""
        events = read_message(wire(sample_messages()[0]))
        self.assertEqual([t.text for t in of(events, TextLine)],
                         ["first line", "second line ünïcode", "base64 text ü", "line two"])

    def test_soft_line_break(self):
        """A quoted-printable soft line break joins two encoded lines into one text line."""
        data = (b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
                b"caf=E9 and a soft =\r\nbreak\r\nnext\r\n")
        self.assertEqual([t.text for t in of(read_message(data), TextLine)], ["café and a soft break", "next"])

    def test_depth_limit(self):
        """Multiparts nested beyond max_depth are read as opaque parts and flagged."""
        data = b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
        for i in range(1, 30):
            data += b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i - 1, i)
        data += b"--b29\r\n\r\ntext\r\n"
        reader = MimeReader(max_depth=5)
        events = reader.feed(data)
        self.assertLessEqual(len(reader._stack), 5)
        events += reader.close()
        self.assertTrue(events[-1].too_deep)
        self.assertEqual(max(p.depth for p in of(events, PartStart)), 5)

    def test_outer_boundary_closes_inner(self):
        """An outer boundary ends every inner multipart still open."""
        data = (b"Content-Type: multipart/mixed; boundary=out\r\n\r\n--out\r\n"
                b"Content-Type: multipart/mixed; boundary=in\r\n\r\n--in\r\n\r\ninner\r\n"
                b"--out\r\n\r\nouter\r\n--out--\r\n")
        events = read_message(data)
        self.assertEqual([(t.part, t.text) for t in of(events, TextLine)], [(2, "inner"), (3, "outer")])
        self.assertEqual([p.depth for p in of(events, PartStart)], [0, 1, 2, 1])

    def test_long_line_is_cut(self):
        """A text line longer than max_line is cut to it and flagged; its length still counts."""
        data = b"\r\n" + b"y" * 1000 + b"\r\nok\r\n"
        reader = MimeReader(max_line=100)
        events = []
        for i in range(0, len(data), 7):
            events += reader.feed(data[i : i + 7])
            self.assertLessEqual(len(reader._line), 101)
        events += reader.close()
        lines = of(events, TextLine)
        self.assertEqual([(len(t.text), t.truncated) for t in lines], [(100, True), (2, False)])
        self.assertEqual(events[-1].longest_body_line, 1000)

    def test_bounded_on_large_message(self):
        """A 5 MB message fed in 64 KiB pieces never makes the reader hold more than a line."""
        m = EmailMessage()
        m.set_content("line of text\n" * 1000)
        m.add_attachment(os.urandom(5_000_000), maintype="application", subtype="octet-stream", filename="big.bin")
        data = wire(m)
        reader = MimeReader()
        for i in range(0, len(data), 65536):
            reader.feed(data[i : i + 65536])
            self.assertLessEqual(len(reader._line), mime.MAX_LINE + 1)
        end = reader.close()[-1]
        self.assertEqual(end.header_size + end.body_size, len(data))


class DescribeTests(unittest.TestCase):
    """A part's description is the same whether its header fields are short (remembered) or long (not)."""

    def test_short_and_long_fields(self):
        """Short fields are described once and remembered; long ones are described each time, alike."""
        for name in ("report.pdf", "r" * 3000 + ".exe"):
            entity = mime._Entity()
            entity.add("Content-Type", 'application/octet-stream; name="x"')
            entity.add("Content-Disposition", 'attachment; filename="%s"' % name)
            entity.add("Content-Transfer-Encoding", "Base64")
            self.assertEqual(entity.describe(), ("application/octet-stream", "base64", name, None, None))
            self.assertEqual(entity.describe(), mime._describe(*(entity.fields.get(k) for k in (
                "content-type", "content-transfer-encoding", "content-disposition")), "text/plain"))
        before = mime._describe_cached.cache_info().hits
        entity = mime._Entity()
        entity.add("Content-Type", "text/plain; charset=utf-8")
        entity.describe()
        entity.describe()
        self.assertGreater(mime._describe_cached.cache_info().hits, before)


class SegmentationTests(unittest.TestCase):
    """The same message gives the same events whatever its segmentation."""

    @settings(max_examples=60, deadline=None)
    @given(st.sampled_from(range(3)), st.lists(st.integers(0, 10_000), max_size=12))
    def test_random_pieces(self, which, cuts):
        """Built messages cut at random offsets give the events of the whole message."""
        data = [wire(m) for m in sample_messages()] + [rfc2047_attachment()]
        fuzz_mime.check(data[which], cuts)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.sampled_from([b"--X", b"--X--", b"\r\n", b"\n", b"=", b"=C3=A9", b"w6k=", b" ", b"a" * 70,
                                     b"Content-Type: multipart/mixed; boundary=X\r\n",
                                     b"Content-Transfer-Encoding: quoted-printable\r\n",
                                     b"Content-Transfer-Encoding: base64\r\n", b"Subject: =?utf-8?q?x?=\r\n"]),
                    max_size=40),
           st.lists(st.integers(0, 2000), max_size=8))
    def test_random_structures(self, pieces, cuts):
        """Random boundary, header and encoding fragments: same events whole, cut and byte by byte."""
        fuzz_mime.check(b"".join(pieces), cuts)

    def test_part_header_boundary_with_colon(self):
        """A boundary holding a colon ends a part's header block, read at once or line by line."""
        data = (b"Content-Type: multipart/mixed; boundary=\"a:b\"\r\n\r\n--a:b\r\nX-A: 1\r\n"
                b"--a:b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--a:b--\r\n")
        events = fuzz_mime.check(data, [5, 60])
        self.assertEqual([(p.part, p.content_type) for p in of(events, PartStart)],
                         [(0, "multipart/mixed"), (1, "text/plain"), (2, "text/plain")])
        self.assertEqual([t.text for t in of(events, TextLine)], ["hello"])

    def test_part_header_bare_lf(self):
        """A part's header line ending in a bare LF counts as CRLF, read at once or line by line (found by fuzzing)."""
        data = (b"Content-Type: multipart/mixed; boundary=X\r\n\r\n--X\r\n"
                b"Content-Type: text/plain\n\r\nhi\r\n--X--\r\n")
        events = fuzz_mime.check(data, [50, 60])
        self.assertEqual([h.size for h in of(events, Header) if h.part == 1], [26])

    def test_fuzz_seeds(self):
        """The fuzz target's seed corpus passes every property without atheris."""
        for seed in fuzz_mime.seeds():
            events = fuzz_mime.check(seed, [3, 17, 101])
            self.assertIsInstance(events[-1], MessageEnd)
        fuzz_mime.TestOneInput(b"\1" * 8 + fuzz_mime.seeds()[2])

    def test_part_without_header_long_first_line(self):
        """A part whose long first line is not a header field gives that line as text, whole or cut inside it."""
        data = (b"Content-Type: multipart/mixed; boundary=A\r\n\r\n--A\r\n"
                b"not a header " + b"x" * 80 + b"\r\nnext\r\n--A--\r\n")
        start = data.index(b"not a header")

        def run(pieces):
            reader = MimeReader(max_header_size=64, max_line=8)
            events = []
            for piece in pieces:
                events += reader.feed(piece)
            return events + reader.close()

        whole = run([data])
        self.assertEqual([(t.part, t.text, t.truncated) for t in of(whole, TextLine)],
                         [(1, "not a he", True), (1, "next", False)])
        for cut in (start + 10, start + 40, start + 70, start + 92):
            self.assertEqual(run([data[:cut], data[cut:]]), whole)

    def test_fuzz_part_without_header_cut_at_end(self):
        """The fuzz finding: a part's only line, not a header and longer than both bounds, cut before its last octet."""
        data = b"Content-Type:multipart/;boundary=A\n--A\nC" + b"\xff" * 258 + b"\x00"
        fuzz_mime.check(data, [len(data) - 1])
        self.assertEqual(of(fuzz_mime._run([data]), TextLine), [TextLine(1, "C" + "\ufffd" * 63, True)])

    def qp_lines(self, body, pieces_at):
        """The text lines of a quoted-printable message with ``body``, whole and cut at ``pieces_at`` (max_line 64)."""
        data = b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + body

        def run(pieces):
            reader = MimeReader(max_header_size=256, max_line=64)
            events = []
            for piece in pieces:
                events += reader.feed(piece)
            return events + reader.close()

        whole = run([data])
        for cut in pieces_at:
            cut += len(data) - len(body)
            self.assertEqual(run([data[:cut], data[cut:]]), whole, "cut at %d" % cut)
        return [t.text for t in of(whole, TextLine)]

    def test_qp_equals_before_cr(self):
        """The fuzz finding: '=' before a CR inside a long quoted-printable line does not swallow the rest of the piece."""
        body = b"afsoft=\rname=\"=?utf-8?b?w6kuZXhl?=\"; filename*0*=utf-8''%C3%A9t%C3"
        self.assertEqual(self.qp_lines(body, [len(body) - 1, 8, 30]),
                         ["afsoft\rname=\"=?utf-8?b?w6kuZXhl?=\"; filename*0*=utf-8''%C3%A9t%C"])

    def test_qp_double_equals(self):
        """'==' is one literal '=' (as binascii reads it) wherever the line is cut, and only an odd run is a soft break."""
        body = b"=41" * 22 + b"==41 and ==\r\nnext ===\r\nlast\r\n"
        self.assertEqual(self.qp_lines(body, [67, 68, 76, 85, 86]), ["A" * 22 + "=41 and =", "next =last"])

    def test_qp_trailing_white_space(self):
        """White space before a line end is removed even when a cut falls inside it; inside a line it stays."""
        body = b"=41" * 22 + b"  \t \r\n" + b"=41" * 22 + b"  \t x\r\n"
        self.assertEqual(self.qp_lines(body, [67, 68, 69, 139, 140]), ["A" * 22, "A" * 22 + "  \t x"])
