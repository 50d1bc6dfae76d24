"""MAIL FROM checks (mailguard.commands.check_mail): one check per parameter, against what was advertised."""

from twisted.trial.unittest import SynchronousTestCase

from mailguard.commands import MAIL_PARAMETERS, MODES, CommandError, Extensions, check_mail

ALL = Extensions({k: [] for k in (b"SIZE", b"8BITMIME", b"BINARYMIME", b"DSN", b"AUTH", b"SMTPUTF8")})


class CheckMailTests(SynchronousTestCase):
    """check_mail returns SIZE and BODY, and refuses what was not advertised or is malformed."""

    def refused(self, rest, ext=ALL, mode="esmtp"):
        """The reason check_mail gives for refusing ``rest``."""
        with self.assertRaises(CommandError) as caught:
            check_mail(rest, ext, MODES[mode])
        return str(caught.exception)

    def test_plain(self):
        """A bare path gives no SIZE and BODY 7BIT, in every mode."""
        for mode in MODES.values():
            self.assertEqual(check_mail(b"FROM:<a@example.org>", Extensions(), mode), (None, b"7BIT"))

    def test_values(self):
        """SIZE and BODY come back; every other parameter is only checked."""
        rest = b"FROM:<a@example.org> SIZE=1234 BODY=8bitmime RET=HDRS ENVID=x+2B AUTH=<> SMTPUTF8"
        self.assertEqual(check_mail(rest, ALL, MODES["esmtp"]), (1234, b"8BITMIME"))
        self.assertEqual(check_mail(b"FROM:<> BODY=BINARYMIME", ALL, MODES["esmtp"]), (None, b"BINARYMIME"))

    def test_not_advertised(self):
        """Each parameter needs its extension in the EHLO reply."""
        for param, keyword in ((b"SIZE=1", "SIZE"), (b"BODY=8BITMIME", "8BITMIME"), (b"BODY=BINARYMIME", "BINARYMIME"),
                               (b"RET=FULL", "DSN"), (b"ENVID=x", "DSN"), (b"AUTH=<>", "AUTH"),
                               (b"SMTPUTF8", "SMTPUTF8")):
            self.assertIn("without %s advertised" % keyword, self.refused(b"FROM:<> " + param, Extensions()))

    def test_bad_values(self):
        """A malformed value is refused with the parameter's name."""
        for param, why in ((b"SIZE=x", "bad SIZE value"), (b"SIZE", "bad SIZE value"), (b"SIZE=" + b"9" * 21,
                           "bad SIZE value"), (b"BODY=9BIT", "bad BODY value"), (b"RET=ALL", "bad RET value"),
                           (b"ENVID=a+zz", "bad ENVID value"), (b"AUTH", "bad AUTH value"),
                           (b"SMTPUTF8=yes", "SMTPUTF8 takes no value"), (b"XFOO=1", "unknown MAIL parameter XFOO")):
            self.assertEqual(self.refused(b"FROM:<> " + param), why)

    def test_mailguard_mode(self):
        """mailguard mode allows no parameter at all."""
        self.assertEqual(self.refused(b"FROM:<> SIZE=1", mode="mailguard"), "parameters not allowed")

    def test_one_table(self):
        """Every MAIL parameter the gateway knows has exactly one check."""
        self.assertEqual(sorted(MAIL_PARAMETERS), sorted([b"SIZE", b"BODY", b"RET", b"ENVID", b"AUTH", b"SMTPUTF8"]))


class ParsePathTests(SynchronousTestCase):
    """parse_path's one-match shortcut for plain paths gives what the general parser gives, errors included."""

    def outcome(self, parse, rest, prefix, utf8_ok):
        """The path and parameters ``parse`` returns, or its error's words."""
        try:
            return parse(rest, prefix, utf8_ok)
        except CommandError as e:
            return "error: %s" % e

    def test_same_as_general_parser(self):
        """Random lines built from the pieces that matter (quotes, escapes, spacing, duplicates) parse alike both ways."""
        from hypothesis import given, settings, strategies as st

        from mailguard.commands import _parse_path, parse_path

        piece = st.sampled_from([
            b"FROM:", b"from:", b"TO:", b"To:", b" ", b"  ", b"\t", b"<", b">", b"<>", b"<a@example.org>", b"\"q x\"",
            b"\\", b"@", b"a", b"\xc3\xa9", b"=", b"SIZE", b"size=1", b" SIZE=1024", b" BODY=8BITMIME", b" NOTIFY=NEVER",
            b" X-Y", b" -X", b"\r", b"\0", b"x" * 300,
        ])
        # Mostly well-shaped lines (prefix, path, parameters), each part sometimes odd.
        shaped = st.tuples(
            st.sampled_from([b"FROM:", b"from:", b"TO:", b"FROM: ", b"TO:  ", b"FROM"]),
            st.sampled_from([b"<a@example.org>", b"<>", b"<\xc3\xa9@x>", b"<\"a b\"@x>", b"<a\\@x>", b"<" + b"a" * 260 + b">",
                             b"a@x", b"<a@x"]),
            st.lists(st.sampled_from([b" SIZE=1024", b" size=1", b" BODY=8BITMIME", b" NOTIFY=NEVER", b" SMTPUTF8",
                                      b"  SIZE=2", b" X=", b" =1", b" A=b=c", b"\tRET=FULL", b"X", b" -X"]),
                     max_size=4),
        ).map(lambda t: t[0] + t[1] + b"".join(t[2]))
        lines = st.one_of(shaped, st.lists(piece, max_size=8).map(b"".join))

        @settings(max_examples=1000, deadline=None)
        @given(lines, st.sampled_from([b"FROM:", b"TO:"]), st.booleans())
        def check(rest, prefix, utf8_ok):
            self.assertEqual(self.outcome(parse_path, rest, prefix, utf8_ok),
                             self.outcome(_parse_path, rest, prefix, utf8_ok), rest)

        check()
