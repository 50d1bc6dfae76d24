"""The shared phases and the mailbox session state (mailguard.phases, mailguard.mailbox_state)."""

from twisted.trial.unittest import SynchronousTestCase

from mailguard import imap, phases, pop3
from dataclasses import FrozenInstanceError

from mailguard.mailbox_state import (
    ASKED, HANDSHAKE, IDLE, MAILBOX_PHASES, NO_SETUP, PLAINTEXT, BackendSetup, Security, asked,
)
from mailguard.phases import CLOSED, COMMAND, GREETING, PASSTHROUGH, PhaseError, PhaseTable
from mailguard.policy import Rule


class PhaseTableTests(SynchronousTestCase):
    """A phase table moves only along the transitions it lists."""

    def test_mailbox_transitions(self):
        """Greeted, passthrough and close lead where the table says; close is allowed from every phase."""
        self.assertIs(MAILBOX_PHASES.next(GREETING, "greeted"), COMMAND)
        self.assertIs(MAILBOX_PHASES.next(COMMAND, "passthrough"), PASSTHROUGH)
        for phase in (GREETING, COMMAND, PASSTHROUGH, CLOSED):
            self.assertIs(MAILBOX_PHASES.next(phase, "close"), CLOSED)

    def test_refused_transitions(self):
        """A transition the table does not list raises PhaseError naming it."""
        for phase, event in ((GREETING, "passthrough"), (COMMAND, "greeted"), (CLOSED, "greeted"),
                             (PASSTHROUGH, "greeted"), (COMMAND, "nonsense")):
            with self.assertRaises(PhaseError) as caught:
                MAILBOX_PHASES.next(phase, event)
            self.assertIn(phase, str(caught.exception))
        with self.assertRaises(PhaseError):
            PhaseTable({}).next(GREETING, "greeted")

    def test_one_definition(self):
        """POP3 and IMAP use the shared phase objects, and their values are the names the session table shows."""
        for module in (pop3, imap):
            inspector = (pop3.POP3Inspector if module is pop3 else imap.IMAPInspector)(
                Rule(name="R", protocol=module.__name__.rsplit(".", 1)[1]))
            self.assertIs(inspector.phase, phases.GREETING)
        self.assertEqual([GREETING, COMMAND, PASSTHROUGH, CLOSED], ["GREETING", "COMMAND", "PASSTHROUGH", "CLOSED"])


class ValueTests(SynchronousTestCase):
    """The state values that replaced loose flags."""

    def test_security_defaults(self):
        """A session starts with no TLS on either leg and nobody logged in; the shared value cannot change."""
        self.assertEqual(PLAINTEXT, Security(client_tls=False, server_tls=False, authenticated=False))
        with self.assertRaises(FrozenInstanceError):
            PLAINTEXT.client_tls = True

    def test_backend_setup(self):
        """Asked holds the greeting, accepted keeps it for the handshake; busy until the setup is over."""
        self.assertFalse(NO_SETUP.busy)
        self.assertIs(NO_SETUP.stage, IDLE)
        setup = asked(b"+OK hello\r\n")
        self.assertTrue(setup.busy)
        self.assertIs(setup.stage, ASKED)
        setup = setup.accepted()
        self.assertIs(setup.stage, HANDSHAKE)
        self.assertEqual(setup.greeting, b"+OK hello\r\n")
        self.assertTrue(setup.busy)
        with self.assertRaises(FrozenInstanceError):
            setup.stage = IDLE

    def test_handshake_without_greeting_is_busy(self):
        """A handshake under way keeps the setup busy even once the greeting is gone."""
        self.assertTrue(BackendSetup(stage=HANDSHAKE).busy)

    def test_sessions_share_nothing_mutable(self):
        """TLS on one session's client leg leaves a fresh session (sharing the initial values) in plaintext."""
        rule = Rule(name="R", protocol="pop3", tls="terminate")
        one, two = pop3.POP3Inspector(rule), pop3.POP3Inspector(rule)
        one.client_tls_ready()
        self.assertTrue(one.client_tls)
        self.assertFalse(two.client_tls)
        self.assertIs(two.security, PLAINTEXT)
