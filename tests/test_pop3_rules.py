"""The POP3 rules (mailguard.pop3_rules): allowlist, arguments, bodies, CAPA filtering."""

from twisted.trial.unittest import SynchronousTestCase

from mailguard.mailbox_state import Security
from mailguard.pop3_rules import (
    COMMANDS, awaits_sasl, capability_additions, command_refusal, keep_capability, login_refusal, logs_in,
    opens_body, split_command,
)


def refusal(line):
    """command_refusal for ``line`` with its own verb."""
    return command_refusal(line, split_command(line)[0])


class CommandTests(SynchronousTestCase):
    """Which command lines reach the server."""

    def test_split(self):
        """The verb is upper-cased; a command with only spaces after it counts as bare."""
        self.assertEqual(split_command(b"list"), (b"LIST", True))
        self.assertEqual(split_command(b"LIST  "), (b"LIST", True))
        self.assertEqual(split_command(b"list 1"), (b"LIST", False))

    def test_allowed(self):
        """Every allowlisted command with the arguments its RFC gives is allowed."""
        for line in (b"USER bob", b"PASS two words", b"APOP bob " + b"a" * 32, b"STAT", b"LIST", b"LIST 1",
                     b"RETR 1", b"DELE 1", b"NOOP", b"RSET", b"QUIT", b"TOP 1 10", b"UIDL", b"UIDL 2", b"CAPA",
                     b"STLS", b"AUTH", b"AUTH PLAIN", b"AUTH PLAIN dGVzdA==", b"AUTH PLAIN =", b"quit "):
            self.assertIsNone(refusal(line), line)
        self.assertEqual(set(COMMANDS), {split_command(v)[0] for v in COMMANDS})

    def test_refused(self):
        """Unknown verbs, bad arguments, NUL and bare CR are refused with the reply that says so."""
        self.assertEqual(refusal(b"XTND XMIT"), ("not_allowed", "not allowed"))
        self.assertEqual(refusal(b"RETR x"), ("bad_arguments", "invalid arguments"))
        self.assertEqual(refusal(b"STAT 1"), ("bad_arguments", "invalid arguments"))
        self.assertEqual(refusal(b"APOP bob short"), ("bad_arguments", "invalid arguments"))
        self.assertEqual(refusal(b"NOOP\0"), ("not_allowed", "NUL or bare CR in command"))
        self.assertEqual(refusal(b"USER a\rb"), ("not_allowed", "NUL or bare CR in command"))

    def test_secure_login(self):
        """Under secure-login the login commands wait for TLS; others never do."""
        for verb in (b"USER", b"PASS", b"APOP", b"AUTH"):
            self.assertEqual(login_refusal(verb, True, Security())[0], "secure_login")
            self.assertIsNone(login_refusal(verb, True, Security(client_tls=True)))
            self.assertIsNone(login_refusal(verb, False, Security()))
        self.assertIsNone(login_refusal(b"CAPA", True, Security()))

    def test_bodies(self):
        """RETR, TOP and CAPA always open a body; LIST, UIDL and AUTH only without an argument."""
        for verb in (b"RETR", b"TOP", b"CAPA"):
            self.assertTrue(opens_body(verb, False))
        for verb in (b"LIST", b"UIDL", b"AUTH"):
            self.assertTrue(opens_body(verb, True))
            self.assertFalse(opens_body(verb, False))
        self.assertFalse(opens_body(b"STAT", True))

    def test_login_and_sasl(self):
        """AUTH with a mechanism waits for the server; a single-line +OK to PASS, APOP or AUTH logs in."""
        self.assertTrue(awaits_sasl(b"AUTH", False))
        self.assertFalse(awaits_sasl(b"AUTH", True))
        for verb in (b"PASS", b"APOP", b"AUTH"):
            self.assertTrue(logs_in(verb, False))
            self.assertFalse(logs_in(verb, True))
        self.assertFalse(logs_in(b"USER", False))


class CapaTests(SynchronousTestCase):
    """Which CAPA lines the client sees."""

    def test_stls(self):
        """The server's STLS passes only under passthrough before TLS; terminate adds the gateway's own."""
        plain = Security()
        self.assertFalse(keep_capability(b"STLS\r\n", "strip", False, plain))
        self.assertFalse(keep_capability(b"stls\r\n", "terminate", False, plain))
        self.assertTrue(keep_capability(b"STLS\r\n", "passthrough", False, plain))
        self.assertFalse(keep_capability(b"STLS\r\n", "passthrough", False, Security(client_tls=True)))
        self.assertEqual(capability_additions("terminate", plain), [b"STLS\r\n"])
        self.assertEqual(capability_additions("terminate", Security(client_tls=True)), [])
        self.assertEqual(capability_additions("passthrough", plain), [])

    def test_secure_login(self):
        """USER and SASL are hidden while secure-login refuses logins; other lines always pass."""
        self.assertFalse(keep_capability(b"USER\r\n", "strip", True, Security()))
        self.assertFalse(keep_capability(b"SASL PLAIN\r\n", "strip", True, Security()))
        self.assertTrue(keep_capability(b"SASL PLAIN\r\n", "strip", True, Security(client_tls=True)))
        self.assertTrue(keep_capability(b"USER\r\n", "strip", False, Security()))
        self.assertTrue(keep_capability(b"TOP\r\n", "strip", True, Security()))
        self.assertTrue(keep_capability(b"\r\n", "strip", True, Security()))
