"""The state of a POP3 or IMAP session, apart from its rules: phases and small value objects.

Both mailbox protocols go through the same phases (`MAILBOX_PHASES`, one
table a reader sees at once)::

    GREETING --greeted--> COMMAND --passthrough--> PASSTHROUGH
        \\                   |                          |
         `------close--------+----------close-----------+--> CLOSED

What used to be loose flags is held in two frozen values, replaced as the
session goes on: `Security` (which leg is TLS, whether the client has
logged in) and `BackendSetup` (the gateway securing its own leg to the
server before the client is greeted).  An idle session shares the
initial ones (`PLAINTEXT`, `NO_SETUP`).  Nothing here imports Twisted.
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


@dataclass(frozen=True, slots=True)
class Security:
    """What the session knows about its protection and its user (replaced, never changed)."""

    client_tls: bool = False  # the client's leg is TLS (STLS/STARTTLS done, or an ssl: listener)
    server_tls: bool = False  # the gateway's own leg to the server is TLS
    authenticated: bool = False  # logged in: STLS/STARTTLS no longer allowed


#: A session's security before anything has happened (shared: the values are frozen).
PLAINTEXT = Security()

#: `BackendSetup` stages.
IDLE = "idle"  # nothing in progress
ASKED = "asked"  # the gateway's STLS/STARTTLS is awaiting the server's answer
HANDSHAKE = "handshake"  # accepted: the TLS handshake with the server is under way


@dataclass(frozen=True, slots=True)
class BackendSetup:
    """The gateway securing its own leg (``tls = terminate``) while it holds the server's greeting."""

    greeting: bytes = None  # held until the leg is ready, then relayed
    stage: str = IDLE

    @property
    def busy(self):
        """True until the client has been greeted (or the setup has given up)."""
        return self.greeting is not None or self.stage is HANDSHAKE

    def accepted(self):
        """The server said yes: the same greeting held, the handshake under way."""
        return BackendSetup(self.greeting, HANDSHAKE)


#: No setup in progress, no greeting held.
NO_SETUP = BackendSetup()


def asked(greeting):
    """The setup once the gateway has sent its STLS/STARTTLS, holding ``greeting``."""
    return BackendSetup(greeting, ASKED)
