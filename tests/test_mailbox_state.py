"""The shared phases and the mailbox session state (mailguard.phases, mailguard.mailbox_state)."""

from twisted.trial.unittest import SynchronousTestCase

from mailguard import imap, phases, pop3
from mailguard.mailbox_state import ASKED, HANDSHAKE, IDLE, MAILBOX_PHASES, BackendSetup, Security
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
        """A session starts with no TLS on either leg and nobody logged in."""
        self.assertEqual(Security(), Security(client_tls=False, server_tls=False, authenticated=False))

    def test_backend_setup(self):
        """The setup holds the greeting from ask to release, and is busy until then (and during the handshake)."""
        setup = BackendSetup()
        self.assertFalse(setup.busy)
        self.assertIs(setup.stage, IDLE)
        setup.ask(b"+OK hello\r\n")
        self.assertTrue(setup.busy)
        self.assertIs(setup.stage, ASKED)
        setup.accepted()
        self.assertIs(setup.stage, HANDSHAKE)
        self.assertEqual(setup.release(), b"+OK hello\r\n")
        self.assertFalse(setup.busy)
        self.assertIs(setup.stage, IDLE)
        self.assertIsNone(setup.release())

    def test_handshake_without_greeting_is_busy(self):
        """A handshake under way keeps the setup busy even once the greeting is gone."""
        setup = BackendSetup(stage=HANDSHAKE)
        self.assertTrue(setup.busy)
