"""The rules POP3 and IMAP share (mailguard.mailbox_rules)."""

from twisted.trial.unittest import SynchronousTestCase

from mailguard.mailbox_rules import (
    TLS_FORWARD, TLS_INJECTION, TLS_START, TLS_SYNC, gateway_offers_tls, login_refused, relays_server_tls, sasl_response_ok,
    secures_backend, starttls_step, tls_refusal,
)
from mailguard.mailbox_state import Security


class MailboxRulesTests(SynchronousTestCase):
    """Each shared rule decides from the facts it is given."""

    def test_sasl_response(self):
        """A SASL response is base64 or '*'; anything else (spaces, NUL, bad padding) is not."""
        for line in (b"", b"*", b"dGVzdA==", b"AGJvYgBzZWNyZXQ="):
            self.assertTrue(sasl_response_ok(line), line)
        for line in (b"a b", b"dGVz\0dA==", b"**", b"dGVzdA===", b"USER bob"):
            self.assertFalse(sasl_response_ok(line), line)

    def test_tls_refusal(self):
        """strip always refuses; otherwise TLS is started once and only before login."""
        self.assertEqual(tls_refusal("strip", Security()), "tls_not_available")
        for tls in ("terminate", "passthrough"):
            self.assertIsNone(tls_refusal(tls, Security()))
            self.assertEqual(tls_refusal(tls, Security(client_tls=True)), "tls_active")
            self.assertEqual(tls_refusal(tls, Security(authenticated=True)), "tls_after_login")

    def test_starttls_step(self):
        """A refusal first, then bytes after the command, then commands in progress, then forward or start."""
        plain = Security()
        self.assertEqual(starttls_step("strip", plain, True, True), "tls_not_available")
        self.assertEqual(starttls_step("terminate", Security(client_tls=True), True, True), "tls_active")
        self.assertEqual(starttls_step("terminate", plain, True, True), TLS_INJECTION)
        self.assertEqual(starttls_step("passthrough", plain, False, True), TLS_SYNC)
        self.assertEqual(starttls_step("passthrough", plain, False, False), TLS_FORWARD)
        self.assertEqual(starttls_step("terminate", plain, False, False), TLS_START)

    def test_login_refused(self):
        """secure-login refuses logins only while the client's leg is plaintext."""
        self.assertTrue(login_refused(True, Security()))
        self.assertFalse(login_refused(True, Security(client_tls=True)))
        self.assertFalse(login_refused(False, Security()))

    def test_capability_rules(self):
        """The gateway offers TLS under terminate, the server's offer passes under passthrough, both before TLS."""
        plain, tls = Security(), Security(client_tls=True)
        self.assertEqual([gateway_offers_tls(t, plain) for t in ("strip", "terminate", "passthrough")],
                         [False, True, False])
        self.assertEqual([relays_server_tls(t, plain) for t in ("strip", "terminate", "passthrough")],
                         [False, False, True])
        self.assertFalse(gateway_offers_tls("terminate", tls))
        self.assertFalse(relays_server_tls("passthrough", tls))

    def test_secures_backend(self):
        """The gateway secures its own leg under terminate unless backend-tls is off or the leg is TLS already."""
        self.assertTrue(secures_backend("terminate", "opportunistic", Security()))
        self.assertTrue(secures_backend("terminate", "required", Security()))
        self.assertFalse(secures_backend("terminate", "off", Security()))
        self.assertFalse(secures_backend("terminate", "required", Security(server_tls=True)))
        self.assertFalse(secures_backend("passthrough", "required", Security()))
