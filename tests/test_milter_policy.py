"""The ``[milter NAME]`` policy sections, the ``milters`` rule key, and ``mailguard check``'s warning."""

import io
import os
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from mailguard import cli
from mailguard.interfaces import IMessageFilterFactory
from mailguard.milterclient import PLUGIN, MilterFilterFactory
from mailguard.policy import MILTER_KEYS, PolicyError, parse_policy

BASE = """
[inspect IN]
protocol = esmtp
{rule}

[listener L]
listen = tcp:0
backend = tcp:host=127.0.0.1:port=25
inspect = IN
"""

SPAM = """
[milter spam]
endpoint = tcp:host=127.0.0.1:port=11332
"""


def policy(rule="", sections=SPAM):
    """Parse a policy with one rule (extra ``rule`` keys) and the given milter sections."""
    return parse_policy(BASE.format(rule=rule) + sections, path="p.ini")


class MilterSectionTests(SynchronousTestCase):
    """``[milter NAME]`` becomes a FilterConfig that the rule's ``milters`` key lists in order."""

    def test_defaults(self):
        """A section with only an endpoint gets Postfix's timeouts and tempfail."""
        config = policy("milters = spam").rule("IN").milters[0]
        self.assertEqual(config.name, "spam")
        self.assertEqual(config.plugin, PLUGIN)
        self.assertEqual(config.default_action, "tempfail")
        self.assertEqual(dict(config.options), {
            "endpoint": "tcp:host=127.0.0.1:port=11332",
            "connect_timeout": 30.0, "command_timeout": 30.0, "content_timeout": 300.0})
        self.assertTrue(IMessageFilterFactory.providedBy(config.factory))
        self.assertIsInstance(config.factory, MilterFilterFactory)
        # The gateway's own wait must not fire before the client's timeouts.
        self.assertGreater(config.timeout, 30 + 30 + 300)

    def test_order(self):
        """Milters are called in the order the rule lists them, not the file's order."""
        sections = SPAM + "[milter virus]\nendpoint = unix:path=/run/clamav/milter.sock\n" \
            "default-action = accept\nconnect-timeout = 1.5\ncommand-timeout = 2\ncontent-timeout = 60\n"
        milters = policy("milters = virus, spam", sections).rule("IN").milters
        self.assertEqual([m.name for m in milters], ["virus", "spam"])
        self.assertEqual(milters[0].default_action, "accept")
        self.assertEqual(milters[0].options["connect_timeout"], 1.5)
        self.assertEqual(milters[0].options["content_timeout"], 60.0)

    def test_noMilters(self):
        """A rule without the key has no milters, and the policy still lists the sections."""
        parsed = policy()
        self.assertEqual(parsed.rule("IN").milters, ())
        self.assertEqual([m.name for m in parsed.milters], ["spam"])

    def assertError(self, text, rule="milters = spam", sections=SPAM):
        """Parsing fails with exactly the one-line ``text``."""
        with self.assertRaises(PolicyError) as caught:
            policy(rule, sections)
        self.assertEqual(str(caught.exception), text)
        self.assertNotIn("\n", str(caught.exception))

    def test_missingEndpoint(self):
        """The endpoint is required."""
        self.assertError("p.ini: [milter spam] endpoint: missing required key", sections="[milter spam]\n")

    def test_badEndpoint(self):
        """An endpoint Twisted cannot parse is named with Twisted's reason."""
        with self.assertRaises(PolicyError) as caught:
            policy(sections="[milter spam]\nendpoint = bogus:thing\n")
        self.assertTrue(str(caught.exception).startswith(
            "p.ini: [milter spam] endpoint: bad value 'bogus:thing': not a valid client endpoint description"))

    def test_badDefaultAction(self):
        """default-action is one of tempfail, accept, reject."""
        self.assertError("p.ini: [milter spam] default-action: bad value 'discard': "
                         "expected one of tempfail, accept, reject",
                         sections=SPAM + "default-action = discard\n")

    def test_badTimeouts(self):
        """Each timeout is a positive number of seconds."""
        for key in ("connect-timeout", "command-timeout", "content-timeout"):
            self.assertError(f"p.ini: [milter spam] {key}: bad value '0': expected a number of seconds > 0",
                             sections=SPAM + f"{key} = 0\n")

    def test_unknownKey(self):
        """A key the section does not have is refused."""
        self.assertError("p.ini: [milter spam] timeout: unknown key", sections=SPAM + "timeout = 3\n")

    def test_unknownMilter(self):
        """A rule naming a milter section that does not exist is refused."""
        self.assertError("p.ini: [inspect IN] milters: no [milter ham] section", rule="milters = ham")

    def test_twice(self):
        """A milter listed twice is refused."""
        self.assertError("p.ini: [inspect IN] milters: 'spam' is listed twice", rule="milters = spam, spam")

    def test_needsSMTP(self):
        """Milters need an SMTP inspection protocol."""
        text = BASE.format(rule="milters = spam").replace("protocol = esmtp", "protocol = tcp") + SPAM
        with self.assertRaises(PolicyError) as caught:
            parse_policy(text, path="p.ini")
        self.assertEqual(str(caught.exception),
                         "p.ini: [inspect IN] milters: milters need protocol = smtp, esmtp or mailguard (not tcp)")

    def test_missingName(self):
        """``[milter]`` without a name is refused."""
        self.assertError("p.ini: [milter]: missing name (expected [milter NAME])", sections="[milter]\n")

    def test_tablesDocumented(self):
        """Every [milter NAME] key has a description and a row in the README."""
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
        with open(path, encoding="utf-8") as f:
            readme = f.read()
        self.assertIn("| `milters` |", readme)
        for key, spec in MILTER_KEYS.items():
            self.assertTrue(spec.description)
            self.assertIn("| `%s` |" % key, readme)


class CheckTests(SynchronousTestCase):
    """``mailguard check`` validates milter sections without connecting, and warns about unused ones."""

    def check(self, text):
        """Run ``mailguard check`` on ``text``; return (exit code, stdout, stderr)."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli.main(["check", "-c", path])
        return code, out.getvalue(), err.getvalue().replace(path, "P")

    def test_unused(self):
        """A [milter] section no rule names is a warning, and the exit code stays 0."""
        code, out, err = self.check(BASE.format(rule="milters = spam") + SPAM
                                    + "[milter dkim]\nendpoint = tcp:host=127.0.0.1:port=8891\n")
        self.assertEqual(code, 0)
        self.assertIn("OK (1 listener, 1 rule)", out)
        self.assertEqual(err, "warning: P: [milter dkim]: no rule names this milter (milters = ...)\n")

    def test_allUsed(self):
        """No warning when every milter is named (nothing listens there: check does not connect)."""
        code, out, err = self.check(BASE.format(rule="milters = spam") + SPAM)
        self.assertEqual((code, err), (0, ""))

    def test_error(self):
        """A bad milter section fails the check with its one line."""
        code, out, err = self.check(BASE.format(rule="milters = spam") + SPAM + "command-timeout = soon\n")
        self.assertEqual(code, 1)
        self.assertEqual(err, "P: [milter spam] command-timeout: bad value 'soon': expected a number of seconds > 0\n")
