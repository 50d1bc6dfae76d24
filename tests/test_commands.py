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
