"""mailguard-example-inspector: a small line filter, written as a mailguard inspector plugin.

Protocol ``example`` relays any CRLF line protocol both ways, except the
client lines that contain one of the rule's ``blocked-words``: those never
reach the server.  The gateway answers them itself with the rule's
``blocked-reply`` and logs the alert ``EXAMPLE_BLOCKED``.

The module is sans-IO: it imports neither Twisted's reactor nor anything
that does.  ``mailguard/plugins/mailguard_example.py`` registers the factory.
"""

import re
from types import MappingProxyType

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailguard.events import Alert, Close, Greeted, ToClient, ToServer
from mailguard.interfaces import IInspector, IInspectorFactory

#: Longest client line, CRLF included; a longer one closes the session.
MAX_LINE = 4096

_WORD = re.compile(r"[A-Za-z0-9_-]+")

#: What a refused client reads before the gateway closes: overloaded, or no server.
_REFUSALS = {
    "overload": b"ERR too many connections, try again later\r\n",
    "unreachable": b"ERR server unreachable\r\n",
}


@implementer(IPlugin, IInspectorFactory)
class ExampleInspectorFactory:
    """Protocol ``example``: its rule keys, and one `ExampleInspector` per session."""

    name = "example"
    options = MappingProxyType({"blocked-words": "", "blocked-reply": "-ERR blocked by mailguard"})

    def validateOption(self, key, value):
        """Parse ``blocked-words`` (a list of words) or ``blocked-reply`` (one line of text)."""
        if key == "blocked-words":
            words = value.replace(",", " ").split()
            for word in words:
                if not _WORD.fullmatch(word):
                    raise ValueError("expected words of letters, digits, '-' and '_' (%r is not one)" % word)
            return frozenset(word.lower() for word in words)
        if key == "blocked-reply":
            if not value or not value.isprintable() or not value.isascii():
                raise ValueError("expected one line of printable ASCII text")
            return value.encode("ascii") + b"\r\n"
        raise ValueError("not a key of protocol example")

    def buildInspector(self, rule):
        """A new inspector for one session."""
        return ExampleInspector(rule)

    def refusalReply(self, reason):
        """One line for a client the gateway turns away before the session starts."""
        return _REFUSALS.get(reason, b"")


@implementer(IInspector)
class ExampleInspector:
    """Relay lines both ways; answer the client's lines holding a blocked word."""

    # Set by the gateway on every inspector; a line filter has no use for them.
    trace = False
    xclient = False
    peer = None
    #: A client's FIN goes on to the server, whose answer still comes back.
    relays_half_close = True

    def __init__(self, rule):
        # A Rule built by hand (in tests) may carry no options: use the defaults.
        factory = ExampleInspectorFactory()
        options = rule.options or {k: factory.validateOption(k, v) for k, v in factory.options.items()}
        self.blocked = options["blocked-words"]
        self.reply = options["blocked-reply"]
        self.phase = "CONNECTING"
        self.commands = 0
        self._buf = b""

    def server_connected(self):
        """Line protocols need not greet: the session is open as soon as the server is.

        Lines the client sent while the server connection was being set up
        are inspected now.
        """
        self.phase = "RELAY"
        return [Greeted()] + self.client_data(b"")

    def client_data(self, data):
        """Cut the client's bytes into lines; forward each, or refuse it.

        Until the server is connected the bytes are only held (at most
        MAX_LINE of them).
        """
        if self.phase == "CLOSED":
            return []
        self._buf += data
        events = []
        while self.phase == "RELAY":
            end = self._buf.find(b"\n")
            if end < 0:
                break
            line, self._buf = self._buf[: end + 1], self._buf[end + 1 :]
            self.commands += 1
            words = {w.lower() for w in _WORD.findall(line.decode("latin-1"))}
            hit = sorted(words & self.blocked)
            if hit:
                # Log the word, never the line: it may hold anything.
                events.append(Alert("EXAMPLE_BLOCKED", "client line with blocked word %s" % hit[0], {"word": hit[0]}))
                events.append(ToClient(self.reply))
            else:
                events.append(ToServer(line))
        if len(self._buf) >= MAX_LINE:
            self.phase = "CLOSED"
            events.append(Alert("EXAMPLE_LINE_TOO_LONG", "client line over %d octets" % MAX_LINE))
            events.append(Close("line too long"))
        return events

    def server_data(self, data):
        """The server's bytes go to the client unchanged."""
        return [ToClient(data)]

    def server_lost(self):
        """The server closed: close the client too."""
        return [Close("backend closed")]

    def client_lost(self):
        """The client closed: close the server leg normally."""
        return []

    def in_message(self):
        """Lines are forwarded whole: closing is always clean."""
        return False

    def client_tls_ready(self):
        """On a TLS listener nothing changes."""
        return []

    def server_tls_ready(self):
        """The gateway never starts TLS towards this backend."""
        return []

    def timeout_reply(self, reason):
        """On a tracker timeout, tell the client in one line; close the server silently."""
        return b"ERR session timed out\r\n", b""
