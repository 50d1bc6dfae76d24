"""The state of a POP3 or IMAP session, apart from its rules: phases and small value objects.

Both mailbox protocols go through the same phases (`MAILBOX_PHASES`, one
table a reader sees at once)::

    GREETING --greeted--> COMMAND --passthrough--> PASSTHROUGH
        \\                   |                          |
         `------close--------+----------close-----------+--> CLOSED

What used to be loose flags is held in two value objects: `Security`
(which leg is TLS, whether the client has logged in) and `BackendSetup`
(the gateway securing its own leg to the server before the client is
greeted).  Nothing here imports Twisted.
"""

from dataclasses import dataclass

from mailguard.phases import CLOSED, COMMAND, GREETING, PASSTHROUGH, PhaseTable

#: Greeted: the server's greeting reached the client.  Passthrough: the
#: server accepted a forwarded STLS/STARTTLS.  Close: either side ended.
MAILBOX_PHASES = PhaseTable({
    GREETING: {"greeted": COMMAND, "close": CLOSED},
    COMMAND: {"passthrough": PASSTHROUGH, "close": CLOSED},
    PASSTHROUGH: {"close": CLOSED},
    CLOSED: {"close": CLOSED},
})


@dataclass(slots=True)
class Security:
    """What the session knows about its protection and its user."""

    client_tls: bool = False  # the client's leg is TLS (STLS/STARTTLS done, or an ssl: listener)
    server_tls: bool = False  # the gateway's own leg to the server is TLS
    authenticated: bool = False  # logged in: STLS/STARTTLS no longer allowed


#: `BackendSetup` stages.
IDLE = "idle"  # nothing in progress
ASKED = "asked"  # the gateway's STLS/STARTTLS is awaiting the server's answer
HANDSHAKE = "handshake"  # accepted: the TLS handshake with the server is under way


@dataclass(slots=True)
class BackendSetup:
    """The gateway securing its own leg (``tls = terminate``) while it holds the server's greeting."""

    greeting: bytes = None  # held until the leg is ready, then relayed
    stage: str = IDLE

    @property
    def busy(self):
        """True until the client has been greeted (or the setup has given up)."""
        return self.greeting is not None or self.stage is HANDSHAKE

    def ask(self, greeting):
        """Hold ``greeting`` while the gateway's own STLS/STARTTLS is answered."""
        self.greeting = greeting
        self.stage = ASKED

    def accepted(self):
        """The server said yes: the handshake starts."""
        self.stage = HANDSHAKE

    def release(self):
        """Return the held greeting (or None) and end the setup."""
        greeting, self.greeting, self.stage = self.greeting, None, IDLE
        return greeting
