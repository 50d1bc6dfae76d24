"""The public contract between mailguard and its inspectors (zope.interface).

An inspector plugs in as an `IInspectorFactory` (one per protocol name, e.g.
``esmtp``); for every accepted connection it builds an `IInspector`, the
sans-IO core of that session: bytes in from either peer, events out
(`mailguard.events`).  The Twisted shell carries the events out and never
looks inside the protocol.
"""

from zope.interface import Attribute, Interface


class IInspectorFactory(Interface):
    """Builds the per-session inspectors of one protocol."""

    name = Attribute("The protocol name a policy selects with `protocol = NAME`.")

    def buildInspector(rule):
        """Return a new `IInspector` for one session under ``rule``.

        ``rule`` is the immutable `mailguard.policy.Rule` of the listener
        that accepted the connection.  Must be cheap: it runs per connection.
        """


class IInspector(Interface):
    """The sans-IO core of one inspected session.

    Every method returns a list of events, in the order they must be carried
    out.  No method may raise for any input a peer can send: bad input
    becomes a reply to the client and/or a `Close` event.
    """

    phase = Attribute("A short name of the current state, for the session table.")
    commands = Attribute("How many commands (or requests) the client has issued.")

    def server_connected():
        """The backend connection is up; return events (e.g. bytes to send first)."""

    def client_data(data):
        """Inspect ``data`` received from the client."""

    def server_data(data):
        """Inspect ``data`` received from the backend."""

    def server_lost():
        """The backend closed; return what the client must be told."""

    def client_lost():
        """The client closed; return how the backend leg should end."""

    def in_message():
        """True while a message is being transferred (closing now loses it)."""
