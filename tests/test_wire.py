"""Tests for the sans-IO wire parsers: replies, command lines, message data, banner masks."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mailguard.wire import DataScanner, LineBuffer, ReplyParser, WireError, mask_banner, whole_replies


def scan(chunks, max_size=10**9):
    """Feed chunks to a fresh scanner; return (forwarded bytes, rest or None, scanner)."""
    scanner = DataScanner(max_size)
    out = []
    rest = None
    for chunk in chunks:
        if rest is not None:
            rest += chunk  # what follows the end is the caller's again
            continue
        segs, rest = scanner.feed(chunk)
        out.extend(segs)
    return b"".join(out), rest, scanner


def bytewise(data):
    """Split ``data`` into one-byte chunks."""
    return [data[i : i + 1] for i in range(len(data))]


def unstuffed_size(forwarded):
    """What a server stores from forwarded DATA bytes (RFC 1870 counting)."""
    assert forwarded.endswith(b".\r\n")
    body = forwarded[:-3]
    lines = body.split(b"\r\n")
    return len(body) - sum(1 for line in lines if line.startswith(b"."))


class DataScannerTests(SynchronousTestCase):
    """The end-of-data scanner and its normalisation."""

    def check_both(self, data, forwarded, rest):
        """Assert the result whole and byte by byte."""
        for chunks in ([data], bytewise(data)):
            out, got_rest, _ = scan(chunks)
            self.assertEqual((out, got_rest), (forwarded, rest))

    def test_clean_message(self):
        """A clean message is forwarded unchanged, terminator included, rest returned."""
        self.check_both(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n", b"Subject: x\r\n\r\nbody\r\n.\r\n", b"QUIT\r\n")

    def test_empty_message(self):
        """A terminator right after the 354 ends an empty message."""
        self.check_both(b".\r\nRSET\r\n", b".\r\n", b"RSET\r\n")

    def test_stuffed_lines_untouched(self):
        """Lines the client dot-stuffed and lines that look like commands pass untouched."""
        body = b"..\r\n..x\r\nRSET\r\nMAIL FROM:<a@b>\r\n.\r\n"
        self.check_both(body, body, b"")

    def test_not_finished(self):
        """Without the terminator the scanner returns no rest."""
        out, rest, _ = scan([b"abc\r\n", b"def"])
        self.assertIsNone(rest)
        self.assertEqual(out, b"abc\r\ndef")

    def test_size_counts_unstuffed(self):
        """The size excludes stuffing dots and the final .CRLF, includes CRLFs."""
        _, _, scanner = scan([b"ab\r\n..c\r\n.\r\n"])
        self.assertEqual(scanner.size, len(b"ab\r\n.c\r\n"))

    def test_size_exact_limit(self):
        """A message of exactly max_size is forwarded whole."""
        msg = b"x" * 8 + b"\r\n"
        out, rest, scanner = scan([msg + b".\r\n"], max_size=10)
        self.assertEqual(out, msg + b".\r\n")
        self.assertFalse(scanner.overflow)

    def test_size_one_over(self):
        """One octet over max_size: overflow, no terminator forwarded, end still found."""
        msg = b"x" * 9 + b"\r\n"
        out, rest, scanner = scan(bytewise(msg + b".\r\nQUIT\r\n"), max_size=10)
        self.assertTrue(scanner.overflow)
        self.assertNotIn(b".\r\n", out[-3:])
        self.assertEqual(rest, b"QUIT\r\n")

    def test_bare_lf_normalized(self):
        """A bare LF becomes CRLF and the scanner records it."""
        out, rest, scanner = scan([b"a\nb\r\n.\r\n"])
        self.assertEqual(out, b"a\r\nb\r\n.\r\n")
        self.assertTrue(scanner.bare)

    def test_nul_becomes_space(self):
        """A NUL byte in message data becomes a space."""
        out, _, _ = scan([b"a\0b\r\n.\r\n"])
        self.assertEqual(out, b"a b\r\n.\r\n")

    def test_smuggling_variants(self):
        """No bare-newline end-of-data variant ends the message; the real end does."""
        variants = [
            b"\n.\n", b"\n.\r", b"\r.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n",
            b"\r\n\x00.\r\n", b"\r\n.\r\r\n", b"\r\r\n.\r\r\n",
        ]
        smuggled = b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nspoof\r\n"
        for variant in variants:
            data = b"hello" + variant + smuggled + b".\r\nQUIT\r\n"
            for chunks in ([data], bytewise(data)):
                out, rest, _ = scan(chunks)
                self.assertEqual(rest, b"QUIT\r\n", variant)
                # The forwarded stream holds exactly one end of data: its last line.
                self.assertEqual(out.count(b"\r\n.\r\n"), 1, (variant, out))
                self.assertTrue(out.endswith(b"\r\n.\r\n"))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200), st.lists(st.integers(1, 50), max_size=20))
    def test_segmentation_invariant(self, body, cuts):
        """Any segmentation of a DATA stream gives the same forwarded bytes and rest."""
        data = body + b"\r\n.\r\nNOOP\r\n"
        chunks, pos = [], 0
        for cut in cuts:
            chunks.append(data[pos : pos + cut])
            pos += cut
        chunks.append(data[pos:])
        self.assertEqual(scan(chunks)[:2], scan([data])[:2])

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def test_never_smuggles(self, data):
        """Forwarded bytes never hold an end of data before the last line, and sizes agree."""
        out, rest, scanner = scan([data])
        if rest is None:
            self.assertNotIn(b"\r\n.\r\n", b"\r\n" + out)
        else:
            self.assertEqual((b"\r\n" + out).find(b"\r\n.\r\n"), len(out) - 3)
            self.assertEqual(scanner.size, unstuffed_size(out))


class CompiledScanTests(SynchronousTestCase):
    """The optional compiled pass gives exactly the pure-Python path's output."""

    def setUp(self):
        from mailguard import wire

        if wire._scan is None:
            raise SkipTest("mailguard._scan is not compiled here (python setup.py build_ext --inplace; tox does it)")
        self.wire = wire

    def both(self, chunks):
        """Scan ``chunks`` with and without the compiled pass."""
        fast = scan(chunks)
        saved, self.wire._scan = self.wire._scan, None
        try:
            slow = scan(chunks)
        finally:
            self.wire._scan = saved
        return fast, slow

    @settings(max_examples=400, deadline=None)
    @given(st.lists(st.sampled_from([b"ab", b"\r\n", b".", b"\r", b"\n", b"\0", b"x" * 20, b"\r\n.\r\n",
                                     b"..", b"\r\n.."]), max_size=40),
           st.lists(st.integers(1, 40), max_size=10))
    def test_same_output(self, pieces, cuts):
        """Any data in any segmentation: same bytes forwarded, rest, size and flags."""
        data = b"".join(pieces) + b"\r\n.\r\nQUIT\r\n"
        chunks, pos = [], 0
        for cut in cuts:
            chunks.append(data[pos : pos + cut])
            pos += cut
        chunks.append(data[pos:])
        chunks = [c for c in chunks if c]
        fast, slow = self.both(chunks)
        self.assertEqual(fast[:2], slow[:2])
        self.assertEqual((fast[2].size, fast[2].bare, fast[2].overflow), (slow[2].size, slow[2].bare, slow[2].overflow))

    def test_large_clean_message(self):
        """A large clean message in 64 KB chunks is forwarded byte for byte, size counted."""
        body = (b"Lorem ipsum dolor sit amet\r\n..stuffed line\r\n" * 5000) + b".\r\nQUIT\r\n"
        chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
        fast, slow = self.both(chunks)
        self.assertEqual(fast[:2], slow[:2])
        self.assertEqual(fast[2].size, slow[2].size)


class CompiledMessageHelpersTests(SynchronousTestCase):
    """The compiled message helpers return exactly what their bytes expressions do."""

    def setUp(self):
        try:
            from mailguard import _scan
        except ImportError:
            raise SkipTest("mailguard._scan is not compiled here (python setup.py build_ext --inplace; tox does it)")
        self.scan = _scan

    @settings(max_examples=600, deadline=None)
    @given(st.lists(st.sampled_from([b"ab", b"\r\n", b".", b"\r", b"\n", b"\0", b"x" * 20, b"\r\n.", b"..",
                                     b"\r\r\n", b"-", b"\n--"]), max_size=40))
    def test_same_as_python(self, pieces):
        """longest_line, crlf_to_lf, unstuff and find_dashes agree with the expressions they replace."""
        data = b"".join(pieces)
        self.assertEqual(self.scan.longest_line(data), max(map(len, data.replace(b"\r\n", b"\n").split(b"\n"))))
        self.assertEqual(self.scan.crlf_to_lf(data), data.replace(b"\r\n", b"\n"))
        self.assertEqual(self.scan.unstuff(data), data.replace(b"\r\n.", b"\r\n"))
        for start in range(0, len(data) + 1, 7):
            for end in (start, start + 3, len(data) // 2, len(data)):
                self.assertEqual(self.scan.find_dashes(data, start, end), data.find(b"\n--", start, end))

    def test_large(self):
        """A 200 KB message of mixed line ends and stuffed lines gives the same results."""
        data = (b"Lorem ipsum\r\n..stuffed\r\nbare\rcr\n" + b"y" * 1500 + b"\r\n") * 120
        self.assertEqual(self.scan.longest_line(data), 1500)
        self.assertEqual(self.scan.crlf_to_lf(data), data.replace(b"\r\n", b"\n"))
        self.assertEqual(self.scan.unstuff(data), data.replace(b"\r\n.", b"\r\n"))

    def test_unchanged_is_the_same_object(self):
        """unstuff returns its argument itself when there is no stuffing dot (no copy)."""
        data = b"no stuffing\r\nhere.\r\n"
        self.assertIs(self.scan.unstuff(data), data)


class ReplyParserTests(SynchronousTestCase):
    """Reassembly and validation of server replies."""

    def test_multiline_any_segmentation(self):
        """A multi-line reply is returned once complete, whatever the segmentation."""
        raw = b"250-mx\r\n250-SIZE 10\r\n250 HELP\r\n"
        for chunks in ([raw], bytewise(raw)):
            parser = ReplyParser()
            replies = [r for c in chunks for r in parser.feed(c)]
            self.assertEqual(len(replies), 1)
            self.assertEqual((replies[0].code, replies[0].raw), (250, raw))

    def test_code_only_line(self):
        """A reply of the code alone and CRLF is valid."""
        self.assertEqual(ReplyParser().feed(b"250\r\n")[0].code, 250)

    def test_invalid_replies(self):
        """Malformed, inconsistent, bare-LF or over-long replies raise WireError."""
        for bad in (b"hello\r\n", b"600 x\r\n", b"250-a\r\n251 b\r\n", b"250 x\n", b"25 x\r\n",
                    b"250 " + b"x" * 600 + b"\r\n", b"250x\r\n"):
            self.assertRaises(WireError, ReplyParser().feed, bad)

    def test_unterminated_overlong(self):
        """A partial reply line longer than the limit raises without waiting for CRLF."""
        self.assertRaises(WireError, ReplyParser(max_line=512).feed, b"2" * 600)


_REPLY_LINES = st.lists(
    st.tuples(
        st.sampled_from([b"250", b"354", b"421", b"550", b"199", b"600"]),
        st.sampled_from([b" ", b"-", b"", b"x"]),
        st.binary(max_size=12),
        st.sampled_from([b"\r\n", b"\n", b""]),
    ),
    min_size=1,
    max_size=5,
)


class WholeRepliesTests(SynchronousTestCase):
    """The stateless fast path for chunks of whole single-line replies."""

    def test_pipelined_group(self):
        """Three single-line replies come back as three replies, each its own bytes."""
        data = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n"
        replies = whole_replies(data)
        self.assertEqual([(r.code, r.raw) for r in replies],
                         [(250, b"250 2.1.0 Ok\r\n"), (250, b"250 2.1.5 Ok\r\n"), (354, b"354 go\r\n")])

    def test_leaves_the_rest_to_the_parser(self):
        """Multi-line, partial, invalid and over-long input is not taken (None)."""
        for data in (b"250-a\r\n250 b\r\n", b"250 partial", b"250 x\n", b"600 x\r\n", b"250x\r\n",
                     b"250 " + b"x" * 600 + b"\r\n", b""):
            self.assertIsNone(whole_replies(data, 512), data)

    @settings(max_examples=300, deadline=None)
    @given(_REPLY_LINES)
    def test_agrees_with_the_parser(self, parts):
        """Whenever the fast path answers, a fresh ReplyParser gives the same replies."""
        data = b"".join(code + sep + text + eol for code, sep, text, eol in parts)
        fast = whole_replies(data, 64)
        if fast is None:
            return
        self.assertEqual(fast, ReplyParser(max_line=64).feed(data))


class LineBufferTests(SynchronousTestCase):
    """Command line splitting and its length bound."""

    def test_lines_and_bare_lf(self):
        """CRLF and bare-LF lines are split and marked."""
        buf = LineBuffer(512)
        buf.push(b"HELO a\r\nNOOP\nRS")
        self.assertEqual(buf.pop(), (b"HELO a", False))
        self.assertEqual(buf.pop(), (b"NOOP", True))
        self.assertIsNone(buf.pop())
        buf.push(b"ET\r\n")
        self.assertEqual(buf.pop(), (b"RSET", False))

    def test_too_long_bounded(self):
        """Streaming bytes without LF is reported once and the buffer stays bounded."""
        buf = LineBuffer(16)
        buf.push(b"x" * 20)
        self.assertIs(buf.pop()[0], LineBuffer.TOO_LONG)
        for _ in range(100):
            buf.push(b"y" * 1000)
            self.assertIsNone(buf.pop())
            self.assertEqual(buf.pending, 0)
        buf.push(b"zz\r\nNOOP\r\n")
        self.assertEqual(buf.pop(), (b"NOOP", False))

    def test_limit_counts_crlf(self):
        """A line of exactly the limit with its CRLF passes; one more octet does not."""
        buf = LineBuffer(8)
        buf.push(b"123456\r\n1234567\r\n")
        self.assertEqual(buf.pop(), (b"123456", False))
        self.assertIs(buf.pop()[0], LineBuffer.TOO_LONG)


class BannerMaskTests(SynchronousTestCase):
    """Greeting masking in pix and on modes."""

    def test_pix_single_line(self):
        """PIX mode keeps only 2, 0 and CRLF, as the PIX did."""
        raw = b"220 mx.example.com ESMTP Postfix (Debian/GNU) 3.7.10\r\n"
        self.assertEqual(mask_banner(raw, "pix"), b"220" + b"*" * 48 + b"0\r\n")

    def test_pix_multiline_keeps_continuation(self):
        """PIX mode keeps the 4th-byte '-' of non-final lines."""
        raw = b"220-mx one\r\n220 two\r\n"
        self.assertEqual(mask_banner(raw, "pix"), b"220-******\r\n220****\r\n")

    def test_on_mode(self):
        """'on' keeps the code and separator and masks the rest."""
        raw = b"220-mx one\r\n220 two\r\n"
        self.assertEqual(mask_banner(raw, "on"), b"220-******\r\n220 ***\r\n")

    def test_non_220_untouched(self):
        """A 421 or 554 greeting is not masked."""
        for raw in (b"421 busy\r\n", b"554 go away\r\n"):
            self.assertEqual(mask_banner(raw, "pix"), raw)
