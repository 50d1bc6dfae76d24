"""Shared test scaffolding: a gateway listening on loopback, and a driver for sans-IO inspectors."""

from twisted.cred import portal
from twisted.internet import endpoints, reactor
from zope.interface import implementer

from mailguard.events import ToClient, ToServer
from mailguard.policy import GlobalSettings, Listener
from mailguard.service import listener_factory
from mailguard.tracker import SessionTracker
from tests.clients import wait_for


def start_gateway(testcase, rule, backend_port, settings=None, listen="tcp:0", tls_context=None, **listener_keys):
    """Listen on 127.0.0.1 with a gateway for ``rule`` relaying to ``backend_port``.

    With ``tls_context`` the listener is implicit TLS (``ssl:``).  Returns
    ``(tracker, port number)``.  The test waits, when it ends, for the
    gateway to drop every session before the reactor is checked.
    """
    listener = Listener(name=rule.name.lower(), listen=listen, backend="tcp:127.0.0.1:%d" % backend_port,
                        rule=rule, **listener_keys)
    tracker = SessionTracker(settings or GlobalSettings(), reactor)
    backend = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", backend_port)
    factory = listener_factory(listener, tracker, reactor, backend)
    if tls_context is not None:
        port = reactor.listenSSL(0, factory, tls_context, interface="127.0.0.1")
    else:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    # Last: cancel the tracker's timers (the alert rate limit's report among them).
    testcase.addCleanup(tracker.stop)
    testcase.addCleanup(port.stopListening)
    testcase.addCleanup(lambda: wait_for(lambda: not tracker.sessions))
    return tracker, port.getHost().port


def drive(inspector, script, bytewise=False, tls=False):
    """Feed a dialogue (``("c"|"s", bytes)`` steps) to ``inspector``.

    Returns ``(bytes to the server, bytes to the client, all events)``.
    With ``bytewise`` every step arrives one byte at a time.
    """
    events = list(inspector.server_connected())
    if tls:
        events += inspector.client_tls_ready()
    for side, data in script:
        feed = inspector.client_data if side == "c" else inspector.server_data
        pieces = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
        for piece in pieces:
            events += feed(piece)
    to_server = b"".join(e.data for e in events if type(e) is ToServer)
    to_client = b"".join(e.data for e in events if type(e) is ToClient)
    return to_server, to_client, events


@implementer(portal.IRealm)
class OneAvatarRealm:
    """A realm giving every user the same avatar (the test mailbox or account)."""

    def __init__(self, interface, avatar):
        self.interface = interface
        self.avatar = avatar

    def requestAvatar(self, avatarId, mind, *interfaces):
        """The one avatar, with nothing to do at logout."""
        return self.interface, self.avatar, lambda: None
