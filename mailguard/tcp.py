"""The ``tcp`` inspector: no application inspection, bytes relayed both ways.

Only the session tracker applies (limits, timers, audit trail).
"""

from zope.interface import implementer

from mailguard.events import Close, Greeted, ToClient, ToServer
from mailguard.interfaces import IInspector


@implementer(IInspector)
class TCPInspector:
    """Relay bytes unchanged; the session is open as soon as the backend is."""

    phase = "RELAY"
    commands = 0
    #: Set by the shell (`mailguard.interfaces.IInspector`); a byte relay has no use for them.
    trace = False
    xclient = False
    peer = None
    #: A client's FIN is passed on to the server, whose remaining bytes still reach the client.
    relays_half_close = True

    def __init__(self, rule):
        self.rule = rule

    def server_connected(self):
        """The backend is up: nothing to wait for."""
        return [Greeted()]

    def client_data(self, data):
        """Forward the client's bytes as they are."""
        return [ToServer(data)]

    def server_data(self, data):
        """Forward the server's bytes as they are."""
        return [ToClient(data)]

    def server_lost(self):
        """The backend closed: close the client too."""
        return [Close("backend closed")]

    def client_lost(self):
        """The client closed: the backend leg is closed normally."""
        return []

    def in_message(self):
        """A byte relay never knows; closing is always clean."""
        return False

    def client_tls_ready(self):
        """An ``ssl:`` listener: nothing changes for a byte relay."""
        return []

    def server_tls_ready(self):
        """Never asked for: a byte relay starts no TLS."""
        return []

    def timeout_reply(self, reason):
        """A byte relay has no words: just close both sides."""
        return b"", b""
