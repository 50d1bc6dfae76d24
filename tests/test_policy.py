"""
Tests for L{mailguard.policy} and the C{mailguard check} command.
"""

from __future__ import annotations

import dataclasses
import io
import os
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from mailguard.cli import main
from mailguard.policy import (
    BUILTIN_PROTOCOLS,
    DEFAULT_EHLO_KEYWORDS,
    GLOBAL_KEYS,
    INSPECT_KEYS,
    LISTENER_KEYS,
    GlobalSettings,
    Listener,
    Policy,
    PolicyError,
    Rule,
    load_policy,
    parse_policy,
)
from mailguard.policy import _section_kinds

PATH = "etc/policy.ini"

EXAMPLE = """\
# mailguard example policy
[global]
max-incomplete-high = 800
max-incomplete-low = 600
one-minute-high = 700
one-minute-low = 300
max-incomplete-host = 20
block-time = 5
synwait-time = 15
finwait-time = 3
idle-time = 600
alert = on
audit-trail = yes

[inspect OUT-IN]
protocol = ESMTP            ; case does not matter
max-data = 10485760
alert = off
timeout = 120
mask-banner = on
ehlo-keywords = size pipelining
    8bitmime STARTTLS
max-recipients = 50
max-command-line = 1024
max-reply-line = 2048
bare-newline = reject
pregreet = ignore
max-bad-commands = 3

[inspect LEGACY]
protocol = mailguard

[inspect UNUSED]
protocol = tcp

[listener mail]
listen = tcp:2525:interface=127.0.0.1
backend = tcp:host=127.0.0.1:port=2526
inspect = OUT-IN

[listener local]
listen = tcp:2587
backend = embedded
inspect = LEGACY
maildir = spool/mail
"""

MINIMAL = """\
[inspect R]
protocol = esmtp

[listener l]
listen = tcp:2525
backend = embedded
inspect = R
"""


def parse(text: str, **kwargs: object) -> Policy:
    """
    Parse C{text} as if it were C{etc/policy.ini} under C{/srv/mailguard}.
    """
    kwargs.setdefault("base_dir", "/srv/mailguard")
    return parse_policy(text, PATH, **kwargs)  # type: ignore[arg-type]


def with_rule(body: str, protocol: str = "esmtp") -> str:
    """
    Return a runnable policy whose one rule C{R} has the extra lines C{body}.
    """
    return (
        f"[inspect R]\nprotocol = {protocol}\n{body}\n"
        "[listener l]\nlisten = tcp:2525\nbackend = embedded\ninspect = R\n"
    )


def with_listener(body: str) -> str:
    """
    Return a policy with rule C{R} and a listener C{mail} made of C{body}.
    """
    return f"[inspect R]\nprotocol = smtp\n\n[listener mail]\n{body}\n"


class ExampleTests(SynchronousTestCase):
    """
    A complete policy parses into the values it states.
    """

    def setUp(self) -> None:
        self.policy = parse(EXAMPLE)

    def test_global(self) -> None:
        """Every [global] key is read into L{GlobalSettings}."""
        self.assertEqual(
            self.policy.settings,
            GlobalSettings(
                max_incomplete_high=800,
                max_incomplete_low=600,
                one_minute_high=700,
                one_minute_low=300,
                max_incomplete_host=20,
                block_time=5,
                synwait_time=15,
                finwait_time=3,
                idle_time=600,
                alert=True,
                audit_trail=True,
            ),
        )

    def test_fullRule(self) -> None:
        """Every [inspect NAME] key is read into L{Rule}, keywords upper-cased."""
        self.assertEqual(
            self.policy.rule("OUT-IN"),
            Rule(
                name="OUT-IN",
                protocol="esmtp",
                max_data=10485760,
                alert=False,
                audit_trail=True,
                timeout=120,
                mask_banner="on",
                ehlo_keywords=frozenset({"SIZE", "PIPELINING", "8BITMIME", "STARTTLS"}),
                max_recipients=50,
                max_command_line=1024,
                max_reply_line=2048,
                bare_newline="reject",
                pregreet="ignore",
                max_bad_commands=3,
            ),
        )

    def test_rulesInFileOrder(self) -> None:
        """Rules keep the file's order, including one no listener uses."""
        self.assertEqual(
            [rule.name for rule in self.policy.rules], ["OUT-IN", "LEGACY", "UNUSED"]
        )
        self.assertEqual(self.policy.rule("UNUSED").protocol, "tcp")

    def test_listeners(self) -> None:
        """Listeners keep their endpoint descriptions and point at their rule objects."""
        self.assertEqual(
            self.policy.listeners,
            (
                Listener(
                    name="mail",
                    listen="tcp:2525:interface=127.0.0.1",
                    backend="tcp:host=127.0.0.1:port=2526",
                    rule=self.policy.rule("OUT-IN"),
                    maildir=None,
                ),
                Listener(
                    name="local",
                    listen="tcp:2587",
                    backend="embedded",
                    rule=self.policy.rule("LEGACY"),
                    maildir="/srv/mailguard/spool/mail",
                ),
            ),
        )
        self.assertIs(self.policy.listeners[0].rule, self.policy.rule("OUT-IN"))

    def test_path(self) -> None:
        """The policy remembers the name it was parsed under."""
        self.assertEqual(self.policy.path, PATH)

    def test_unknownRuleLookup(self) -> None:
        """L{Policy.rule} raises L{KeyError} for a name it does not have."""
        self.assertRaises(KeyError, self.policy.rule, "NOPE")

    def test_frozen(self) -> None:
        """The parsed objects cannot be changed after start-up."""
        self.assertRaises(
            dataclasses.FrozenInstanceError, setattr, self.policy.settings, "alert", False
        )
        self.assertRaises(
            dataclasses.FrozenInstanceError, setattr, self.policy.rules[0], "max_data", 1
        )
        self.assertRaises(
            dataclasses.FrozenInstanceError, setattr, self.policy.listeners[0], "listen", "x"
        )
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, self.policy, "rules", ())
        self.assertIsInstance(self.policy.rules[0].ehlo_keywords, frozenset)


class DefaultTests(SynchronousTestCase):
    """
    Keys left out take their documented defaults.
    """

    def test_globalDefaults(self) -> None:
        """Without a [global] section the settings are the documented defaults."""
        self.assertEqual(
            parse(MINIMAL).settings,
            GlobalSettings(
                max_incomplete_high=500,
                max_incomplete_low=400,
                one_minute_high=500,
                one_minute_low=400,
                max_incomplete_host=50,
                block_time=0,
                synwait_time=30,
                finwait_time=5,
                idle_time=3600,
                alert=True,
                audit_trail=False,
            ),
        )

    def test_emptyGlobal(self) -> None:
        """An empty [global] section gives the same settings as L{GlobalSettings()}."""
        self.assertEqual(parse("[global]\n" + MINIMAL).settings, GlobalSettings())

    def test_ruleDefaults(self) -> None:
        """A rule with only a protocol gets the documented defaults."""
        rule = parse(MINIMAL).rule("R")
        self.assertEqual(
            rule,
            Rule(
                name="R",
                protocol="esmtp",
                max_data=20000000,
                alert=True,
                audit_trail=False,
                timeout=3600,
                mask_banner="off",
                ehlo_keywords=frozenset(
                    "SIZE PIPELINING 8BITMIME BINARYMIME CHUNKING DSN "
                    "ENHANCEDSTATUSCODES ETRN AUTH SMTPUTF8 HELP".split()
                ),
                max_recipients=100,
                max_command_line=512,
                max_reply_line=512,
                bare_newline="normalize",
                pregreet="reject",
                max_bad_commands=10,
            ),
        )

    def test_ruleConstructorDefaults(self) -> None:
        """L{Rule} built in code with only a name and protocol equals a parsed default rule."""
        self.assertEqual(Rule(name="R", protocol="esmtp"), parse(MINIMAL).rule("R"))
        self.assertEqual(Rule(name="r", protocol="esmtp", max_data=100).max_data, 100)
        self.assertEqual(Rule(name="r", protocol="esmtp").ehlo_keywords, DEFAULT_EHLO_KEYWORDS)

    def test_defaultMaildir(self) -> None:
        """An embedded listener without maildir delivers to var/maildir in the base directory."""
        self.assertEqual(parse(MINIMAL).listeners[0].maildir, "/srv/mailguard/var/maildir")

    def test_maildirDefaultsToWorkingDirectory(self) -> None:
        """Without a base directory relative paths are resolved against the current directory."""
        policy = parse_policy(MINIMAL)
        self.assertEqual(
            policy.listeners[0].maildir, os.path.join(os.getcwd(), "var", "maildir")
        )
        self.assertEqual(policy.path, "<policy>")

    def test_relativeMaildir(self) -> None:
        """A relative maildir is stored absolute, resolved against the base directory."""
        policy = parse(with_rule("").replace("inspect = R", "inspect = R\nmaildir = ../mail"))
        self.assertEqual(policy.listeners[0].maildir, "/srv/mail")

    def test_relativeBaseDir(self) -> None:
        """A relative base directory is itself made absolute first."""
        policy = parse(MINIMAL, base_dir="run")
        self.assertEqual(
            policy.listeners[0].maildir, os.path.join(os.getcwd(), "run", "var", "maildir")
        )

    def test_absoluteMaildir(self) -> None:
        """An absolute maildir is kept as written."""
        policy = parse(with_rule("").replace("inspect = R", "inspect = R\nmaildir = /var/mail/"))
        self.assertEqual(policy.listeners[0].maildir, "/var/mail")

    def test_tables(self) -> None:
        """Every key of every table has a description and a row in the README's policy reference."""
        readme_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
        with open(readme_path, encoding="utf-8") as f:
            readme = f.read()
        for table in GLOBAL_KEYS, INSPECT_KEYS, LISTENER_KEYS:
            for key, spec in table.items():
                self.assertTrue(spec.description)
                self.assertIn("| `%s` |" % key, readme)


class InheritanceTests(SynchronousTestCase):
    """
    Rules take alert, audit-trail and timeout from [global] unless they say otherwise.
    """

    GLOBAL = "[global]\nalert = off\naudit-trail = on\nidle-time = 90\n"

    def test_inherited(self) -> None:
        """A rule without alert, audit-trail or timeout takes the [global] values."""
        rule = parse(self.GLOBAL + with_rule("")).rule("R")
        self.assertEqual((rule.alert, rule.audit_trail, rule.timeout), (False, True, 90))

    def test_overridden(self) -> None:
        """A rule's own alert, audit-trail and timeout win over [global]."""
        rule = parse(
            self.GLOBAL + with_rule("alert = yes\naudit-trail = 0\ntimeout = 7")
        ).rule("R")
        self.assertEqual((rule.alert, rule.audit_trail, rule.timeout), (True, False, 7))

    def test_globalOrderIrrelevant(self) -> None:
        """A [global] section written after the rules still supplies their defaults."""
        rule = parse(with_rule("") + self.GLOBAL).rule("R")
        self.assertEqual((rule.alert, rule.audit_trail, rule.timeout), (False, True, 90))

    def test_booleanSpellings(self) -> None:
        """on/off, yes/no, true/false and 1/0 are all booleans, in any case."""
        for word, value in [
            ("on", True), ("OFF", False), ("Yes", True), ("no", False),
            ("TRUE", True), ("false", False), ("1", True), ("0", False),
        ]:
            rule = parse(with_rule(f"alert = {word}")).rule("R")
            self.assertIs(rule.alert, value, word)


class MaskBannerTests(SynchronousTestCase):
    """
    mask-banner defaults to pix for the mailguard protocol and off otherwise.
    """

    def test_defaultPerProtocol(self) -> None:
        """Only protocol = mailguard masks the banner by default."""
        for protocol, mask in [
            ("mailguard", "pix"), ("smtp", "off"), ("esmtp", "off"), ("tcp", "off"),
        ]:
            rule = parse(with_rule("", protocol=protocol)).rule("R")
            self.assertEqual((rule.protocol, rule.mask_banner), (protocol, mask))

    def test_explicit(self) -> None:
        """An explicit mask-banner wins over the protocol's default."""
        rule = parse(with_rule("mask-banner = OFF", protocol="mailguard")).rule("R")
        self.assertEqual(rule.mask_banner, "off")


class ProtocolTests(SynchronousTestCase):
    """
    The protocol key names exactly one known inspection.
    """

    def test_smtpAndEsmtp(self) -> None:
        """Both smtp and esmtp parse, each on its own."""
        self.assertEqual(parse(with_rule("", protocol="smtp")).rule("R").protocol, "smtp")
        self.assertEqual(parse(with_rule("", protocol="esmtp")).rule("R").protocol, "esmtp")

    def test_simultaneous(self) -> None:
        """smtp and esmtp together, in any spelling or order, are refused with the PIX message."""
        for value in ["smtp, esmtp", "esmtp smtp", "ESMTP,SMTP", "smtp esmtp tcp"]:
            text = f"[inspect X]\nprotocol = {value}\n"
            e = self.assertRaises(PolicyError, parse, text)
            self.assertEqual(
                str(e),
                "etc/policy.ini: [inspect X] protocol: "
                "SMTP and ESMTP inspection cannot be configured simultaneously",
            )

    def test_unknown(self) -> None:
        """An unknown protocol is named along with the known ones."""
        e = self.assertRaises(PolicyError, parse, with_rule("", protocol="x"))
        self.assertEqual(
            str(e),
            "etc/policy.ini: [inspect R] protocol: "
            "unknown protocol 'x' (known: esmtp, mailguard, smtp, tcp)",
        )

    def test_several(self) -> None:
        """Two different protocols other than smtp with esmtp are still refused."""
        e = self.assertRaises(PolicyError, parse, with_rule("", protocol="smtp tcp"))
        self.assertEqual(
            str(e),
            "etc/policy.ini: [inspect R] protocol: bad value 'smtp tcp': "
            "expected exactly one of esmtp, mailguard, smtp, tcp",
        )

    def test_missing(self) -> None:
        """A rule without a protocol is refused."""
        e = self.assertRaises(
            PolicyError, parse, with_rule("").replace("protocol = esmtp\n", "max-data = 5\n")
        )
        self.assertEqual(str(e), "etc/policy.ini: [inspect R] protocol: missing required key")

    def test_registry(self) -> None:
        """The known protocols come from the caller, as a collection or a mapping."""
        rule = parse(with_rule("", protocol="LMTP"), protocols={"lmtp": object()}).rule("R")
        self.assertEqual(rule.protocol, "lmtp")
        e = self.assertRaises(
            PolicyError, parse, with_rule("", protocol="smtp"), protocols=["lmtp", "tcp"]
        )
        self.assertEqual(e.problem, "unknown protocol 'smtp' (known: lmtp, tcp)")
        self.assertEqual(BUILTIN_PROTOCOLS, {"smtp", "esmtp", "mailguard", "tcp"})


class ErrorTests(SynchronousTestCase):
    """
    Every mistake is one L{PolicyError} line naming file, section, key and problem.
    """

    def assertError(
        self, text: str, expected: str, section: str | None = None, key: str | None = None
    ) -> PolicyError:
        """
        Assert that parsing C{text} fails with exactly the one line C{expected}.
        """
        e = self.assertRaises(PolicyError, parse, text)
        self.assertEqual(str(e), expected)
        self.assertNotIn("\n", str(e))
        self.assertEqual((e.path, e.section, e.key), (PATH, section, key))
        self.assertTrue(expected.endswith(e.problem), (expected, e.problem))
        return e

    def test_badWholeNumber(self) -> None:
        """A value that is not a whole number names the section, key, value and expectation."""
        self.assertError(
            "[inspect OUT-IN]\nprotocol = esmtp\nmax-data = abc\n",
            "etc/policy.ini: [inspect OUT-IN] max-data: "
            "bad value 'abc': expected a whole number >= 1",
            "inspect OUT-IN", "max-data",
        )

    def test_wholeNumberMinimum(self) -> None:
        """Numbers below a key's minimum, negative or signed numbers are refused."""
        for body, key, minimum in [
            ("max-data = 0", "max-data", 1),
            ("max-command-line = 63", "max-command-line", 64),
            ("max-reply-line = -512", "max-reply-line", 64),
            ("timeout = +5", "timeout", 1),
            ("max-recipients = 1_000", "max-recipients", 1),
        ]:
            e = self.assertRaises(PolicyError, parse, with_rule(body))
            self.assertEqual(e.key, key)
            self.assertTrue(str(e).endswith(f": expected a whole number >= {minimum}"), str(e))

    def test_zeroBlockTime(self) -> None:
        """block-time may be 0 but synwait-time may not."""
        self.assertEqual(parse("[global]\nblock-time = 0\n" + MINIMAL).settings.block_time, 0)
        self.assertError(
            "[global]\nsynwait-time = 0\n" + MINIMAL,
            "etc/policy.ini: [global] synwait-time: bad value '0': expected a whole number >= 1",
            "global", "synwait-time",
        )

    def test_badBoolean(self) -> None:
        """A boolean key refuses other words."""
        self.assertError(
            "[global]\nalert = maybe\n" + MINIMAL,
            "etc/policy.ini: [global] alert: bad value 'maybe': "
            "expected on or off (or yes/no, true/false, 1/0)",
            "global", "alert",
        )

    def test_badChoice(self) -> None:
        """A choice key names the words it accepts."""
        self.assertError(
            with_rule("bare-newline = keep"),
            "etc/policy.ini: [inspect R] bare-newline: bad value 'keep': "
            "expected one of normalize, reject",
            "inspect R", "bare-newline",
        )
        self.assertError(
            with_rule("mask-banner = yes"),
            "etc/policy.ini: [inspect R] mask-banner: bad value 'yes': "
            "expected one of off, on, pix",
            "inspect R", "mask-banner",
        )

    def test_badKeyword(self) -> None:
        """An ESMTP keyword outside RFC 5321's syntax is refused."""
        self.assertError(
            with_rule("ehlo-keywords = SIZE -X"),
            "etc/policy.ini: [inspect R] ehlo-keywords: bad value 'SIZE -X': "
            "expected ESMTP keywords of letters, digits and '-' ('-X' is not one)",
            "inspect R", "ehlo-keywords",
        )

    def test_emptyKeywords(self) -> None:
        """An empty ehlo-keywords list lets no extension through."""
        self.assertEqual(parse(with_rule("ehlo-keywords =")).rule("R").ehlo_keywords, frozenset())

    def test_unknownKey(self) -> None:
        """A key the section does not have is refused."""
        self.assertError(
            "[global]\nfoo = 1\n" + MINIMAL,
            "etc/policy.ini: [global] foo: unknown key",
            "global", "foo",
        )

    def test_keyOfAnotherSection(self) -> None:
        """A key valid only in another section is unknown where it is written."""
        self.assertError(
            with_rule("idle-time = 5"),
            "etc/policy.ini: [inspect R] idle-time: unknown key",
            "inspect R", "idle-time",
        )

    def test_keysAreCaseInsensitive(self) -> None:
        """Keys are matched and reported in lower case."""
        self.assertEqual(parse(with_rule("Max-Data = 7")).rule("R").max_data, 7)
        self.assertError(
            with_rule("Bogus-Key = 7"),
            "etc/policy.ini: [inspect R] bogus-key: unknown key",
            "inspect R", "bogus-key",
        )

    def test_unknownSection(self) -> None:
        """A section of an unknown kind is refused, listing the kinds there are."""
        self.assertError(
            "[bogus]\n" + MINIMAL,
            "etc/policy.ini: [bogus]: unknown section "
            f"({_section_kinds()})",
            "bogus",
        )

    def test_defaultSectionIsUnknown(self) -> None:
        """configparser's [DEFAULT] gets no special meaning."""
        self.assertError(
            "[DEFAULT]\nalert = off\n" + MINIMAL,
            "etc/policy.ini: [DEFAULT]: unknown section "
            f"({_section_kinds()})",
            "DEFAULT",
        )

    def test_namedGlobal(self) -> None:
        """[global] takes no name."""
        self.assertError(
            "[global x]\n" + MINIMAL,
            "etc/policy.ini: [global x]: unknown section "
            f"({_section_kinds()})",
            "global x",
        )

    def test_unnamedSection(self) -> None:
        """Rules and listeners must have a name."""
        self.assertError(
            "[inspect]\nprotocol = smtp\n" + MINIMAL,
            "etc/policy.ini: [inspect]: missing name (expected [inspect NAME])",
            "inspect",
        )
        self.assertError(
            MINIMAL + "[listener ]\n",
            "etc/policy.ini: [listener ]: missing name (expected [listener NAME])",
            "listener ",
        )

    def test_duplicateSection(self) -> None:
        """A section written twice is refused by configparser, in the one-line form."""
        self.assertError(
            MINIMAL + "[inspect R]\nprotocol = smtp\n",
            "etc/policy.ini: [inspect R]: duplicate section (again at line 8)",
            "inspect R",
        )

    def test_duplicateSectionSpacing(self) -> None:
        """Two headers naming the same rule with different spacing are still a duplicate."""
        self.assertError(
            MINIMAL + "[inspect   R]\nprotocol = smtp\n",
            "etc/policy.ini: [inspect   R]: duplicate section (same as [inspect R])",
            "inspect   R",
        )

    def test_duplicateKey(self) -> None:
        """A key written twice in a section is refused by configparser, in the one-line form."""
        self.assertError(
            with_rule("max-data = 1\nmax-data = 2"),
            "etc/policy.ini: [inspect R] max-data: duplicate key (again at line 4)",
            "inspect R", "max-data",
        )

    def test_syntaxError(self) -> None:
        """A line that is neither a key nor a header is reported with its number."""
        self.assertError(
            "[global]\nalert\n" + MINIMAL,
            "etc/policy.ini: line 2: cannot parse 'alert' (expected KEY = VALUE or [SECTION])",
        )

    def test_keyBeforeSection(self) -> None:
        """A key before any section header is reported with its number."""
        self.assertError(
            "# comment\nalert = on\n" + MINIMAL,
            "etc/policy.ini: line 2: 'alert = on' is outside any section "
            f"({_section_kinds()})",
        )

    def test_continuationStaysOneLine(self) -> None:
        """A bad value spread over continuation lines is still reported on one line."""
        self.assertError(
            with_rule("max-data = 1\n  2"),
            "etc/policy.ini: [inspect R] max-data: bad value '1\\n2': "
            "expected a whole number >= 1",
            "inspect R", "max-data",
        )

    def test_lowAboveHigh(self) -> None:
        """A low-water mark above its high-water mark is blamed on the -low key."""
        self.assertError(
            "[global]\nmax-incomplete-low = 600\n" + MINIMAL,
            "etc/policy.ini: [global] max-incomplete-low: "
            "600 is greater than max-incomplete-high (500)",
            "global", "max-incomplete-low",
        )
        self.assertError(
            "[global]\none-minute-high = 100\n" + MINIMAL,
            "etc/policy.ini: [global] one-minute-low: "
            "400 is greater than one-minute-high (100)",
            "global", "one-minute-low",
        )

    def test_lowEqualsHigh(self) -> None:
        """A low-water mark equal to its high-water mark is fine."""
        settings = parse("[global]\nmax-incomplete-high = 400\n" + MINIMAL).settings
        self.assertEqual((settings.max_incomplete_low, settings.max_incomplete_high), (400, 400))

    def test_noSuchRule(self) -> None:
        """A listener naming a rule that does not exist is refused."""
        self.assertError(
            with_listener("listen = tcp:25\nbackend = embedded\ninspect = NOPE"),
            "etc/policy.ini: [listener mail] inspect: no [inspect NOPE] section",
            "listener mail", "inspect",
        )

    def test_ruleNamesAreCaseSensitive(self) -> None:
        """A listener must spell its rule's name exactly."""
        self.assertError(
            with_listener("listen = tcp:25\nbackend = embedded\ninspect = r"),
            "etc/policy.ini: [listener mail] inspect: no [inspect r] section",
            "listener mail", "inspect",
        )

    def test_missingListen(self) -> None:
        """A listener without listen is refused."""
        self.assertError(
            with_listener("backend = embedded\ninspect = R"),
            "etc/policy.ini: [listener mail] listen: missing required key",
            "listener mail", "listen",
        )

    def test_missingBackendAndInspect(self) -> None:
        """A listener without backend or inspect is refused."""
        self.assertError(
            with_listener("listen = tcp:25\ninspect = R"),
            "etc/policy.ini: [listener mail] backend: missing required key",
            "listener mail", "backend",
        )
        self.assertError(
            with_listener("listen = tcp:25\nbackend = embedded"),
            "etc/policy.ini: [listener mail] inspect: missing required key",
            "listener mail", "inspect",
        )

    def test_badListen(self) -> None:
        """A listen value Twisted cannot parse is refused with Twisted's reason."""
        self.assertError(
            with_listener("listen = tcp:notaport\nbackend = embedded\ninspect = R"),
            "etc/policy.ini: [listener mail] listen: bad value 'tcp:notaport': "
            "not a valid server endpoint description "
            "(port 'notaport' is not a number)",
            "listener mail", "listen",
        )
        e = self.assertRaises(
            PolicyError, parse,
            with_listener("listen = bogus:25\nbackend = embedded\ninspect = R"),
        )
        self.assertIn("Unknown endpoint type: 'bogus'", str(e))

    def test_badBackend(self) -> None:
        """A backend value Twisted cannot parse is refused with Twisted's reason."""
        e = self.assertRaises(
            PolicyError, parse,
            with_listener("listen = tcp:25\nbackend = tcp:host=x\ninspect = R"),
        )
        self.assertEqual((e.section, e.key), ("listener mail", "backend"))
        self.assertTrue(
            str(e).startswith(
                "etc/policy.ini: [listener mail] backend: bad value 'tcp:host=x': "
                "not a valid client endpoint description ("
            ),
            str(e),
        )
        self.assertNotIn("\n", str(e))

    def test_endpointKinds(self) -> None:
        """Other endpoint types are accepted and kept exactly as written."""
        policy = parse(
            with_listener(
                "listen = tcp6:2525:interface=\\:\\:1\n"
                "backend = unix:path=/run/postfix.sock\ninspect = R"
            )
        )
        self.assertEqual(
            (policy.listeners[0].listen, policy.listeners[0].backend),
            ("tcp6:2525:interface=\\:\\:1", "unix:path=/run/postfix.sock"),
        )

    def test_maildirWithRelay(self) -> None:
        """maildir is refused on a listener that relays to a backend."""
        self.assertError(
            with_listener(
                "listen = tcp:25\nbackend = tcp:host=127.0.0.1:port=26\n"
                "inspect = R\nmaildir = var/mail"
            ),
            "etc/policy.ini: [listener mail] maildir: only allowed with backend = embedded",
            "listener mail", "maildir",
        )

    def test_noListener(self) -> None:
        """A policy with no listener has nothing to run and is refused."""
        self.assertError(
            "[inspect R]\nprotocol = smtp\n",
            "etc/policy.ini: no [listener NAME] section: nothing to run",
        )
        self.assertError("", "etc/policy.ini: no [listener NAME] section: nothing to run")

    def test_errorAttributes(self) -> None:
        """L{PolicyError} leaves out the parts it was not given."""
        self.assertEqual(str(PolicyError("p", None, None, "x")), "p: x")
        self.assertEqual(str(PolicyError("p", "s", None, "x")), "p: [s]: x")
        self.assertEqual(str(PolicyError("p", "s", "k", "x")), "p: [s] k: x")
        self.assertEqual(str(PolicyError("p", "s", "k", "two\nlines")), "p: [s] k: two lines")


class LoadTests(SynchronousTestCase):
    """
    L{load_policy} reads a file as UTF-8 and parses it.
    """

    def write(self, content: bytes) -> str:
        """
        Write C{content} to a fresh file and return its name.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_load(self) -> None:
        """A readable file is parsed under its own name."""
        path = self.write(EXAMPLE.encode("utf-8"))
        policy = load_policy(path, base_dir="/srv/mailguard")
        self.assertEqual(policy, parse_policy(EXAMPLE, path, base_dir="/srv/mailguard"))
        self.assertEqual(policy.path, path)

    def test_missingFile(self) -> None:
        """A file that does not exist gives one line with the OS's reason."""
        e = self.assertRaises(PolicyError, load_policy, "nope.ini")
        self.assertEqual(str(e), "nope.ini: cannot read policy file: No such file or directory")
        self.assertEqual((e.path, e.section, e.key), ("nope.ini", None, None))

    def test_notUTF8(self) -> None:
        """A file that is not UTF-8 gives one line naming the offending byte."""
        path = self.write(b"[global]\nalert = \xff\n")
        e = self.assertRaises(PolicyError, load_policy, path)
        self.assertEqual(
            str(e), f"{path}: cannot read policy file: not UTF-8 (byte 0xff at offset 17)"
        )

    def test_errorNamesFile(self) -> None:
        """Errors found while parsing a loaded file name that file."""
        path = self.write(b"[bogus]\n")
        e = self.assertRaises(PolicyError, load_policy, path)
        self.assertTrue(str(e).startswith(f"{path}: [bogus]: unknown section"), str(e))


class CheckCommandTests(SynchronousTestCase):
    """
    C{mailguard check} reports whether a policy file would load.
    """

    def mailguard(self, *argv: str) -> tuple[int, str, str]:
        """
        Run L{main} with C{argv}; return its exit code, stdout and stderr.
        """
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def write(self, text: str) -> str:
        """
        Write C{text} to a fresh file and return its name.
        """
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_ok(self) -> None:
        """A good policy prints one OK line with its counts and exits 0."""
        path = self.write(EXAMPLE)
        code, out, err = self.mailguard("check", "-c", path)
        self.assertEqual((code, out), (0, f"{path}: OK (2 listeners, 3 rules)\n"))
        # EXAMPLE lists STARTTLS under tls = strip: warnings only (see tests.test_cli).
        self.assertTrue(all(line.startswith("warning: ") for line in err.splitlines()), err)

    def test_okSingular(self) -> None:
        """Counts of one are written in the singular."""
        path = self.write(MINIMAL)
        self.assertEqual(
            self.mailguard("check", "--config", path),
            (0, f"{path}: OK (1 listener, 1 rule)\n", ""),
        )

    def test_policyError(self) -> None:
        """A bad policy prints its one error line to stderr and exits 1."""
        path = self.write("[global]\nfoo = 1\n" + MINIMAL)
        self.assertEqual(
            self.mailguard("check", "-c", path), (1, "", f"{path}: [global] foo: unknown key\n")
        )

    def test_missingFile(self) -> None:
        """A missing policy file prints one line to stderr, no traceback, and exits 1."""
        self.assertEqual(
            self.mailguard("check", "-c", "nope.ini"),
            (1, "", "nope.ini: cannot read policy file: No such file or directory\n"),
        )

    def test_defaultFile(self) -> None:
        """Without -c the command checks etc/policy.ini in the current directory."""
        directory = self.mktemp()
        os.makedirs(os.path.join(directory, "etc"))
        with open(os.path.join(directory, "etc", "policy.ini"), "w", encoding="utf-8") as f:
            f.write(MINIMAL)
        cwd = os.getcwd()
        os.chdir(directory)
        self.addCleanup(os.chdir, cwd)
        self.assertEqual(
            self.mailguard("check"), (0, "etc/policy.ini: OK (1 listener, 1 rule)\n", "")
        )

    def test_usageError(self) -> None:
        """A missing or unknown subcommand is a usage error with exit code 2."""
        code, out, err = self.mailguard()
        self.assertEqual((code, out), (2, ""))
        self.assertIn("usage: mailguard", err)
        self.assertEqual(self.mailguard("frobnicate")[0], 2)

    def test_help(self) -> None:
        """--help prints the usage to stdout and exits 0."""
        code, out, err = self.mailguard("check", "--help")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("-c FILE, --config FILE", out)
