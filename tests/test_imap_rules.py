"""The IMAP rules (mailguard.imap_rules): allowlist, command checks, literals, capability filtering."""

from twisted.trial.unittest import SynchronousTestCase

from mailguard.imap_framing import parse_command
from mailguard.imap_rules import (
    LITERAL_MINUS_LIMIT, command_name, command_refusal, filter_capabilities, literal_limit, nonsync_refused,
    offers_starttls,
)
from mailguard.mailbox_state import Security


def refusal(text, literal=None, secure_login=False, security=None, limit=0):
    """command_refusal for one command line (without its line end)."""
    tag, verb, sub, end = parse_command(text)
    return command_refusal(verb, sub, end, text, literal, secure_login, security or Security(), limit)


class CommandTests(SynchronousTestCase):
    """Which IMAP commands reach the server."""

    def test_names(self):
        """UID commands are named with their sub-command, and only six may follow UID."""
        self.assertEqual(command_name(b"UID", b"fetch"), (b"UID FETCH", True))
        self.assertEqual(command_name(b"UID", b"LOGIN"), (b"UID LOGIN", False))
        self.assertEqual(command_name(b"UID", None), (b"UID ", False))
        self.assertEqual(command_name(b"NOOP", None), (b"NOOP", True))
        self.assertEqual(command_name(b"XYZZY", None), (b"XYZZY", False))

    def test_allowed(self):
        """Ordinary commands, with arguments, are allowed."""
        for text in (b"a NOOP", b"a SELECT INBOX", b"a UID FETCH 1:* FLAGS", b"a STARTTLS", b"a LOGIN bob pw",
                     b'a LIST "" *'):
            self.assertIsNone(refusal(text), text)

    def test_refused(self):
        """Each refusal comes with the reply that says why."""
        self.assertEqual(refusal(b"a XYZZY"), ("not_allowed", "not allowed"))
        self.assertEqual(refusal(b"a UID LOGIN x"), ("not_allowed", "not allowed"))
        self.assertEqual(refusal(b"a NOOP\0"), ("bad_command", "invalid characters"))
        self.assertEqual(refusal(b"a NOOP\rx"), ("bad_command", "invalid characters"))
        self.assertEqual(refusal(b"a NOOP(x)"), ("bad_command", "invalid characters"))
        self.assertEqual(refusal(b"a STARTTLS now"), ("bad_command", "STARTTLS takes no argument"))
        self.assertEqual(refusal(b"a STARTTLS", literal=(1, True)), ("bad_command", "STARTTLS takes no argument"))

    def test_secure_login(self):
        """LOGIN and AUTHENTICATE wait for TLS under secure-login."""
        for text in (b"a LOGIN bob pw", b"a AUTHENTICATE PLAIN"):
            self.assertEqual(refusal(text, secure_login=True)[0], "secure_login")
            self.assertIsNone(refusal(text, secure_login=True, security=Security(client_tls=True)))

    def test_literals(self):
        """A non-synchronizing literal is allowed only up to what the server advertised; synchronizing ones always."""
        self.assertEqual(refusal(b"a APPEND x {5+}", literal=(5, False))[0], "literal_plus")
        self.assertIsNone(refusal(b"a APPEND x {5+}", literal=(5, False), limit=LITERAL_MINUS_LIMIT))
        self.assertIsNone(refusal(b"a APPEND x {5000}", literal=(5000, True)))
        self.assertTrue(nonsync_refused((4097, False), LITERAL_MINUS_LIMIT))
        self.assertFalse(nonsync_refused((4096, False), LITERAL_MINUS_LIMIT))
        self.assertFalse(nonsync_refused(None, 0))


class CapabilityTests(SynchronousTestCase):
    """What a capability list becomes on its way to the client."""

    def test_literal_limit(self):
        """LITERAL+ is unbounded, LITERAL- and IMAP4rev2 take 4096 octets, otherwise none."""
        self.assertEqual(literal_limit([b"LITERAL+"]), 1 << 64)
        self.assertEqual(literal_limit([b"LITERAL-"]), LITERAL_MINUS_LIMIT)
        self.assertEqual(literal_limit([b"IMAP4REV2"]), LITERAL_MINUS_LIMIT)
        self.assertEqual(literal_limit([b"IMAP4REV1"]), 0)

    def test_filter(self):
        """STARTTLS follows the tls key, secure-login hides AUTH= and adds LOGINDISABLED; case is kept."""
        words = [b"IMAP4rev1", b"starttls", b"AUTH=PLAIN", b"Literal+"]
        plain = Security()
        self.assertEqual(filter_capabilities(words, "strip", False, plain),
                         ([b"IMAP4rev1", b"AUTH=PLAIN", b"Literal+"], 1 << 64))
        self.assertEqual(filter_capabilities(words, "passthrough", False, plain)[0], words)
        self.assertEqual(filter_capabilities(words, "terminate", True, plain)[0],
                         [b"IMAP4rev1", b"Literal+", b"STARTTLS", b"LOGINDISABLED"])
        self.assertEqual(filter_capabilities(words + [b"LOGINDISABLED"], "terminate", False, Security(client_tls=True)),
                         ([b"IMAP4rev1", b"AUTH=PLAIN", b"Literal+", b"LOGINDISABLED"], 1 << 64))

    def test_greeting_offers_starttls(self):
        """Only a greeting whose capability code lacks STARTTLS says the server cannot do it."""
        self.assertTrue(offers_starttls(None))
        self.assertTrue(offers_starttls(b"IMAP4rev1 starttls"))
        self.assertFalse(offers_starttls(b"IMAP4rev1 LOGINDISABLED"))
