"""IMAP framing and syntax (mailguard.imap_framing): fragments, literals, commands and responses."""

from twisted.trial.unittest import SynchronousTestCase

from mailguard.imap_framing import (
    END, LINE, LITERAL, LONG, MORE, Framer, capability_code, drop_capability_code, is_capability, is_tag,
    literal_marker, parse_command, parse_tagged, replace_capability_code, text, untagged_status,
)


class FramerTests(SynchronousTestCase):
    """The framer splits lines and counts literals, in any segmentation."""

    def items(self, framer, data, bytewise=False, literals=True):
        """Push ``data`` and pop everything; start every announced literal when ``literals``."""
        out = []
        for piece in [data[i : i + 1] for i in range(len(data))] if bytewise else [data]:
            framer.push(piece)
            while True:
                item = framer.pop()
                if item is None:
                    break
                out.append(item)
                if literals and item[0] in (LINE, END) and item[2] is not None:
                    framer.start_literal(item[2][0])
        return out

    def test_marker(self):
        """Literal markers are found only at the very end of a fragment."""
        self.assertEqual(literal_marker(b"a APPEND x {12}\r\n"), (12, True))
        self.assertEqual(literal_marker(b"a APPEND x {12+}\r\n"), (12, False))
        self.assertEqual(literal_marker(b"a APPEND x ~{3}\n"), (3, True))
        self.assertIsNone(literal_marker(b"a SEARCH {12} x\r\n"))
        self.assertIsNone(literal_marker(b'a LOGIN "{1}"\r\n'))

    def test_literal_is_data(self):
        """Octets of a literal are returned as data, even when they hold line ends and tags."""
        data = b"a1 APPEND INBOX {13}\r\nb1 LOGOUT\r\n\r\nc1 NOOP\r\n"
        for bytewise in (False, True):
            items = self.items(Framer(100), data, bytewise)
            literal = b"".join(i[1] for i in items if i[0] is LITERAL)
            lines = [i[1] for i in items if i[0] is LINE]
            self.assertEqual(literal, b"b1 LOGOUT\r\n\r\n")
            self.assertEqual(lines, [b"a1 APPEND INBOX {13}\r\n", b"c1 NOOP\r\n"])

    def test_unstarted_literal(self):
        """Announced octets are lines again unless the consumer starts the literal."""
        items = self.items(Framer(100), b"a LOGIN {5}\r\nb NOOP\r\n", literals=False)
        self.assertEqual([i[1] for i in items], [b"a LOGIN {5}\r\n", b"b NOOP\r\n"])

    def test_long_line(self):
        """A fragment over the limit comes as LONG, MORE..., END, keeping its literal marker."""
        data = b"x" * 30 + b" {3}\r\nabc\r\n"
        for bytewise in (False, True):
            framer = Framer(16)
            items = self.items(framer, data, bytewise)
            kinds = [i[0] for i in items]
            self.assertEqual(kinds[0], LONG)
            self.assertEqual(len(items[0][1]), 16)
            end = kinds.index(END)
            self.assertTrue(all(k is MORE for k in kinds[1:end]))
            self.assertEqual(items[end][2], (3, True))
            self.assertEqual(b"".join(i[1] for i in items[: end + 1]), data[:36])
            self.assertEqual(items[-1], (LINE, b"\r\n", None))

    def test_bounded(self):
        """A peer sending endless bytes without LF never makes the framer hold more than its limit."""
        framer = Framer(64)
        for _ in range(100):
            framer.push(b"y" * 50)
            while framer.pop() is not None:
                pass
            self.assertLessEqual(framer.buffered, 64)


class SyntaxTests(SynchronousTestCase):
    """The parsers say what a line is, nothing about whether it is allowed."""

    def test_parse_command(self):
        """A command is a tag, a verb (upper-cased) and perhaps a second word; the rest is left alone."""
        self.assertEqual(parse_command(b"a1 uid fetch 1:* FLAGS"), (b"a1", b"UID", b"fetch", 12))
        self.assertEqual(parse_command(b"a1 NOOP"), (b"a1", b"NOOP", None, 7))
        self.assertEqual(parse_command(b"a1 LOGIN {5}"), (b"a1", b"LOGIN", None, 8))
        self.assertIsNone(parse_command(b"a1"))
        self.assertIsNone(parse_command(b"* NOOP"))
        self.assertIsNone(parse_command(b"a1 1NOOP"))

    def test_tag(self):
        """Tags are astring characters without '+'; '*', parentheses and quotes are not tags."""
        self.assertTrue(is_tag(b"A001"))
        for word in (b"*", b"a+1", b"(a)", b'"a"', b""):
            self.assertFalse(is_tag(word), word)

    def test_responses(self):
        """Tagged completions, untagged statuses and capability lists are recognised, case-insensitively."""
        self.assertEqual(parse_tagged(b"a1 ok done"), (b"a1", b"OK"))
        self.assertEqual(parse_tagged(b"a1 BAD"), (b"a1", b"BAD"))
        self.assertIsNone(parse_tagged(b"a1 OKAY"))
        self.assertEqual(untagged_status(b"* bye later"), b"BYE")
        self.assertEqual(untagged_status(b"* PREAUTH"), b"PREAUTH")
        self.assertIsNone(untagged_status(b"* 3 EXISTS"))
        self.assertTrue(is_capability(b"* capability IMAP4rev2"))
        self.assertFalse(is_capability(b"* CAPABILITYX"))

    def test_text(self):
        """A fragment's text drops CRLF or a bare LF, and nothing else."""
        self.assertEqual([text(b"a\r\n"), text(b"a\n"), text(b"a")], [b"a", b"a", b"a"])

    def test_capability_code(self):
        """The [CAPABILITY ...] response code can be read, rewritten or dropped."""
        line = b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n"
        self.assertEqual(capability_code(line), b"IMAP4rev1 STARTTLS")
        self.assertIsNone(capability_code(b"* OK ready\r\n"))
        self.assertEqual(replace_capability_code(line, lambda words: words[:1]), b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
        self.assertEqual(drop_capability_code(line), b"* OK ready\r\n")
        self.assertEqual(replace_capability_code(b"* OK ready\r\n", lambda words: []), b"* OK ready\r\n")
