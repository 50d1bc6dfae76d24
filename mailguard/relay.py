"""The Twisted shell: two legs of a session moving bytes through an inspector.

`ClientLeg` faces the client (built by `InspectorFactory`, behind the
session tracker); `ServerLeg` is the backend client.  They only move bytes,
carry out the inspector's events and pause each other when one side reads
faster than the other writes (producer/consumer, as in
``twisted.protocols.portforward``).  All protocol decisions are the
inspector's.
"""


import functools
import os

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    ISSLTransport,
)
from twisted.logger import Logger
from zope.interface import implementer

from mailguard.events import (
    FILTER_EVENTS, AbortServer, Alert, Close, Greeted, MessageDone, MessageSent, Passthrough, PauseClient, ResumeClient,
    StartTLS, ToClient, ToServer,
)
from mailguard.inspectors import refusal_reply
from mailguard.writenow import write_sequence

log = Logger(namespace="mailguard")


def _nodelay(transport):
    # Without TCP_NODELAY a relay stalls ~40 ms on each reply that follows a
    # large write (Nagle against delayed ACK).
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError, error.ConnectionLost):
        pass


class _Throttle:
    """A leg as the push producer registered on the *other* leg's transport.

    When the other leg's write buffer fills up, Twisted pauses this leg's
    reading, and resumes it once that buffer drains (producer/consumer, as
    in ``portforward``).  The legs themselves play the producer, so a
    session costs no extra objects for it.  Twisted also stops a registered
    producer when the consumer's connection is lost; that is deliberately a
    no-op: one leg closing must never close the other behind the
    inspector's back (the client still has to be told what happened).
    """

    __slots__ = ()

    def pauseProducing(self):
        """The other leg's write buffer is full: stop reading this one."""
        self.transport.pauseProducing()

    def resumeProducing(self):
        """The other leg drained: read again."""
        self.transport.resumeProducing()

    def stopProducing(self):
        """The other leg is gone; this leg's fate is the session's decision."""


@implementer(IProtocol)
class _Leg(_Throttle):
    """What Twisted asks of a protocol (`IProtocol`), with slots instead of an instance dictionary.

    ``protocol.Protocol`` gives every instance a dictionary; a gateway
    holding ten thousand idle sessions holds two legs for each, so the legs
    implement the few methods the transports call themselves.
    """

    __slots__ = ("transport",)

    def makeConnection(self, transport):
        """Attach the transport, then `connectionMade` (as ``BaseProtocol`` does)."""
        self.transport = transport
        self.connectionMade()

    def connectionMade(self):
        """Called once the transport is attached."""

    def dataReceived(self, data):
        """Bytes arrived on this leg."""

    def connectionLost(self, reason=protocol.connectionDone):
        """This leg's connection is gone."""

    def logPrefix(self):
        """What Twisted's log lines of this connection start with."""
        return self.__class__.__name__


def format_address(address):
    """``host:port`` of a Twisted address (IPv4-mapped IPv6 shown as IPv4)."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        if hasattr(address, "name"):
            # A UNIX socket: its path, or "" for an unnamed (client) end.
            name = address.name
            return name.decode("utf-8", "replace") if isinstance(name, bytes) else (name or "")
        return str(address)
    return _host_port(host, port)


def _tls_failure(reason):
    """Whether a backend leg ended because its TLS (or the certificate check) failed."""
    from OpenSSL import SSL
    from service_identity import VerificationError

    return reason is not None and reason.check(SSL.Error, VerificationError) is not None


def _tls_reason(reason):
    """The words of a TLS failure, on one line."""
    value = reason.value
    args = getattr(value, "args", None)
    if args and isinstance(args[0], list) and args[0] and isinstance(args[0][0], tuple):
        # pyOpenSSL: [(library, function, reason), ...]
        text = "; ".join(str(entry[-1]) for entry in args[0])
    else:
        text = str(value) or value.__class__.__name__
    return " ".join(text.split())


@functools.lru_cache(maxsize=256)
def shared_address_text(host, port):
    """`format_address` of an address many sessions share (their backend): one string for all."""
    return _host_port(host, port)


def _host_port(host, port):
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    if ":" in host:
        return "[%s]:%s" % (host, port)
    return "%s:%s" % (host, port)


@implementer(IHandshakeListener, IPushProducer, IProtocolFactory)
class ServerLeg(_Leg):
    """The backend connection of one session: hands everything to its `ClientLeg`.

    The leg is also its own one-shot `IProtocolFactory`, whether it is
    connected through the backend's endpoint or, for a plain ``tcp:``
    backend, with ``connectTCP`` itself (see `direct_tcp`).  The direct way
    spares each session the endpoint's wrapping factory and protocol (one
    more call on every backend read) and its Deferred, which is what an
    idle session's memory is made of.
    """

    __slots__ = ("client",)
    noisy = False

    def __init__(self, client):
        self.client = client
        self.transport = None

    # -- IProtocolFactory, for the one connection this leg is made for ----------

    def doStart(self):
        """Nothing to start: the factory lives as long as its one connection."""

    def doStop(self):
        """Nothing to stop."""

    def startedConnecting(self, connector):
        """The connection attempt has begun."""

    def buildProtocol(self, addr):
        """The backend connection is up: this leg is its protocol."""
        return self

    def clientConnectionFailed(self, connector, reason):
        """Refused, unreachable, timed out or abandoned: the client leg decides."""
        self.client._backendFailed(reason)

    def clientConnectionLost(self, connector, reason):
        """Reported to the client leg by `connectionLost` already."""

    # -- IProtocol -------------------------------------------------------------------

    def connectionMade(self):
        """Couple the two legs and tell the inspector the backend is up."""
        _nodelay(self.transport)
        self.client.serverConnected(self)

    def dataReceived(self, data):
        """Bytes from the backend go to the inspector."""
        self.client.serverData(data)

    def connectionLost(self, reason):
        """The backend leg is gone."""
        self.client.serverLost(reason)

    def handshakeCompleted(self):
        """The gateway's TLS handshake with the backend is done."""
        self.client.serverTLSReady()


def _lose(transport):
    """Close one leg after what was written to it.

    The other leg stops being its producer first: Twisted's TLS transport
    sends its close alert only once no producer is registered, so a TLS leg
    would otherwise stay open until finwait aborts it.
    """
    transport.unregisterProducer()
    transport.loseConnection()


def direct_tcp(endpoint):
    """``(reactor, host, port, bindAddress)`` of a plain TCP backend, else None.

    The backend was made by `mailguard.endpoints.client_endpoint` from the
    policy's description; only its parsed values are reused, so ``tcp:``
    keeps every option the description can carry.
    """
    from mailguard.endpoints import PlainTCPClient

    if type(endpoint) is not PlainTCPClient:
        return None
    return endpoint.reactor, endpoint.host, endpoint.port, endpoint.bindAddress


@implementer(IHandshakeListener, IHalfCloseableProtocol, IPushProducer)
class ClientLeg(_Leg):
    """The client side of a session: drives the inspector and the backend leg.

    ``session`` (a `mailguard.tracker.Session`) is attached by the session
    tracker before the connection is made; its counters are updated here.
    """

    __slots__ = (
        "factory", "inspector", "session", "server", "_connecting", "_closing", "_server_gone",
        "_client_gone", "_early", "_refusing", "_filtering", "_client_fin", "_depth", "_pause_wanted",
    )

    def __init__(self, factory, inspector):
        self.factory = factory
        self.inspector = inspector
        self.session = None
        self.transport = None
        self.server = None
        self._connecting = None  # a Deferred (endpoint) or an IConnector (direct TCP)
        self._closing = False
        self._server_gone = False
        self._client_gone = False
        self._early = None  # client bytes held until the backend is up
        self._refusing = False
        self._filtering = None  # the session's message filters, from its first filter event
        self._client_fin = False  # the client half-closed; the backend gets the FIN once up
        self._depth = 0  # nested _run calls (a filter verdict given at once runs inside the event that asked)
        self._pause_wanted = False  # a PauseClient not carried out yet (see _run)

    # -- client side ---------------------------------------------------------

    def connectionMade(self):
        """Open the backend connection as soon as the client is accepted."""
        _nodelay(self.transport)
        if ISSLTransport.providedBy(self.transport):
            # An implicit-TLS listener (ssl:465): never offer STARTTLS.
            self.inspector.client_tls_ready()
        if getattr(self.inspector, "xclient", False):
            # Behind a haproxy: listener this is the real client, not the proxy.
            peer = self.transport.getPeer()
            if getattr(peer, "host", None) is not None:
                self.inspector.peer = (peer.host, peer.port)
        factory = self.factory
        direct = factory.direct
        if direct is not None:
            reactor, host, port, bind = direct
            self._connecting = reactor.connectTCP(
                host, port, ServerLeg(self), timeout=factory.connect_timeout, bindAddress=bind)
            return
        d = factory.backend.connect(ServerLeg(self))
        d.addTimeout(factory.connect_timeout, factory.clock)
        d.addErrback(self._backendFailed)
        self._connecting = d

    def _stopConnecting(self):
        connecting, self._connecting = self._connecting, None
        if isinstance(connecting, defer.Deferred):
            connecting.cancel()
        else:
            connecting.stopConnecting()

    def dataReceived(self, data):
        """Bytes from the client go to the inspector."""
        self.session.client_bytes += len(data)
        self.session.touch()
        self._run(self.inspector.client_data(data))
        self.factory.tracker.progress(self.session)

    def pauseProducing(self):
        """The backend's write buffer is full: stop reading the client (its data-rate clock stops too)."""
        self.transport.pauseProducing()
        self.factory.tracker.reading_paused(self.session)

    def resumeProducing(self):
        """The backend drained: read the client again."""
        self.transport.resumeProducing()
        self.factory.tracker.reading_resumed(self.session)

    def readConnectionLost(self):
        """The client half-closed: deliver the replies it still waits for, then close.

        A script that writes its end of data and QUIT and then shuts down its
        sending side must still get the 250: losing it would make it send the
        message again.  A half-close mid-message ends the session as a close.
        """
        if getattr(self.inspector, "relays_half_close", False):
            # A byte relay: the server gets the FIN and its answer still comes
            # back until it closes (bounded by the idle timeout).
            self._client_fin = True
            self._finToServer()
            return
        awaiting = getattr(self.inspector, "awaiting_replies", None)
        if self.inspector.in_message() or awaiting is None or not awaiting():
            self.transport.loseConnection()
            return
        self.factory.tracker.closing(self.session)  # finwait bounds the wait

    def _finToServer(self):
        if self.server is None or self._server_gone or self._early:
            return  # sent by serverConnected, after the bytes held for the backend
        try:
            self.server.transport.loseWriteConnection()
        except (AttributeError, NotImplementedError):
            pass  # a transport that cannot half-close: the server's close ends the session

    def writeConnectionLost(self):
        """The client no longer reads: nothing more can be told to it."""
        self.transport.loseConnection()

    def connectionLost(self, reason):
        """The client is gone: end the backend leg as the inspector says."""
        self._closing = True
        if self._connecting is not None:
            self._stopConnecting()
        events = self.inspector.client_lost()
        self._client_gone = True
        if self._filtering is not None:
            self._filtering.close()
        if self.server is not None and not self._server_gone:
            self.factory.tracker.closing(self.session)  # finwait bounds the backend leg
            if any(e.__class__ is AbortServer for e in events):
                self.server.transport.abortConnection()
            else:
                _lose(self.server.transport)
        else:
            # The session leaves the table only once both legs are closed.
            self.factory.tracker.closed(self.session)

    # -- server side ---------------------------------------------------------------

    def _backendFailed(self, failure):
        self._connecting = None
        if failure.check(defer.CancelledError, error.UserError) and self._closing:
            return None  # abandoned on purpose (cancel, stopConnecting)
        self.factory.tracker.backend_unreachable(self.session, self.factory.backend_name, failure.getErrorMessage())
        self.factory.tracker.closing(self.session)
        if self.factory.unreachable_reply:
            self.transport.write(self.factory.unreachable_reply)
        self.transport.loseConnection()
        return None

    def serverConnected(self, server):
        """The backend leg is up."""
        self._connecting = None
        self.server = server
        self.session.set_responder(server.transport.getPeer())
        if self._closing:
            server.transport.loseConnection()
            return
        if self.factory.listener.backend_proxy_protocol != "off":
            from mailguard.proxyheader import proxy_header

            peer, host = self.transport.getPeer(), self.transport.getHost()
            server.transport.write(proxy_header(
                self.factory.listener.backend_proxy_protocol,
                (getattr(peer, "host", None), getattr(peer, "port", 0)),
                (getattr(host, "host", None), getattr(host, "port", 0)),
            ))
        # Each leg pauses the other when its own write buffer fills up.
        self.transport.registerProducer(server, True)
        server.transport.registerProducer(self, True)
        self._run(self.inspector.server_connected())
        if self._early:
            early, self._early = self._early, None
            server.transport.writeSequence(early)
            self.transport.resumeProducing()
        if self._client_fin:
            self._finToServer()

    def serverData(self, data):
        """Bytes from the backend go to the inspector."""
        self.session.server_bytes += len(data)
        self.session.touch()
        self._run(self.inspector.server_data(data))
        self.factory.tracker.progress(self.session)

    def handshakeCompleted(self):
        """The client's TLS handshake (STARTTLS or implicit TLS) is done."""
        self._run(self.inspector.client_tls_ready())

    def serverTLSReady(self):
        """The backend leg is secured."""
        self._run(self.inspector.server_tls_ready())

    def serverLost(self, reason):
        """The backend leg is gone."""
        if _tls_failure(reason):
            self.factory.tracker.backend_tls_failed(self.session, _tls_reason(reason))
        self._server_gone = True
        self.factory.tracker.server_closed(
            self.session, client_busy=self._refusing and not self._client_gone)
        self.server = None
        if self._client_gone:
            self.factory.tracker.closed(self.session)
            return
        if self._closing:
            return
        # The client may have been paused for a backend that no longer reads.
        self.transport.resumeProducing()
        self._run(self.inspector.server_lost())

    # -- carrying out events -----------------------------------------------------------

    def _run(self, events):
        # Consecutive payloads for one leg go out in one writeSequence: a
        # pipelined group costs one write per leg, not one per command or
        # reply.  Any other event first flushes what came before it, so
        # every leg sees its bytes and its closes in the inspector's order.
        # PauseClient takes effect when the outermost _run returns: nothing
        # is read from the client before then anyway, and a verdict given at
        # once (content rules) resumes the client inside the same run, so
        # the pair then costs no system call.
        self._depth += 1
        try:
            to_server = []
            to_client = []
            for event in events:
                cls = event.__class__
                if cls is ToServer:
                    to_server.append(event.data)
                    continue
                if cls is ToClient:
                    to_client.append(event.data)
                    continue
                if to_server:
                    self._toServer(to_server)
                    to_server = []
                if to_client:
                    write_sequence(self.transport, to_client)
                    to_client = []
                if cls is MessageDone or cls is MessageSent:
                    # One or two per message: first, before the rarer events.
                    self.factory.tracker.event(self.session, event)
                elif cls is Alert:
                    self.factory.tracker.alert(self.session, event)
                elif cls is Greeted:
                    self.factory.tracker.opened(self.session)
                elif cls is AbortServer:
                    self._refusing = True
                    if self.server is not None and not self._server_gone:
                        self._server_gone = True
                        self.server.transport.abortConnection()
                elif cls is Close:
                    if event.reset:
                        self.abortSession()
                    else:
                        self.closeSession(event.reason)
                elif cls is PauseClient:
                    self._pause_wanted = True
                elif cls is ResumeClient:
                    if self._pause_wanted:
                        self._pause_wanted = False
                    else:
                        self.transport.resumeProducing()
                elif cls in FILTER_EVENTS:
                    self._filters().handle(event)
                elif cls is StartTLS:
                    self._startTLS(event.side)
                elif cls is Passthrough:
                    pass  # the inspector relays blindly from now on; nothing to do here
                else:
                    self.factory.tracker.event(self.session, event)
            if to_server:
                self._toServer(to_server)
            if to_client:
                write_sequence(self.transport, to_client)
        finally:
            self._depth -= 1
            if self._depth == 0 and self._pause_wanted:
                self._pause_wanted = False
                self.transport.pauseProducing()

    def _filters(self):
        filtering = self._filtering
        if filtering is None:
            from mailguard.filtering import FilterSession, chain_of

            factory = self.factory
            filtering = self._filtering = FilterSession(
                self, chain_of(factory.rule), factory.clock, factory.spool_directory, factory.quarantine_directory)
        return filtering

    def _toServer(self, data):
        if self.server is not None and not self._server_gone:
            write_sequence(self.server.transport, data)
        elif self._connecting is not None:
            # The client talked first (tcp): hold its bytes, and stop
            # reading it, until the backend is up.
            if self._early is None:
                self._early = []
            self._early.extend(data)
            self.transport.pauseProducing()

    def _startTLS(self, side):
        if side == "client":
            self.transport.startTLS(self.factory.tls_server)
        elif self.server is not None and not self._server_gone:
            self.server.transport.startTLS(self.factory.tls_client)

    # -- called by the session tracker ------------------------------------------------

    def timeoutSession(self, reply_name):
        """End the session on a tracker timer: tell the client, QUIT the backend.

        ``reply_name`` names the gateway reply (``idle_timeout``,
        ``synwait_timeout``).  A message in transfer is aborted, never completed.
        """
        if self._closing:
            return
        if self._connecting is not None:
            self._closing = True
            self._stopConnecting()
            self._closing = False
        to_client, to_server = self.inspector.timeout_reply(reply_name)
        if self.server is not None and not self._server_gone:
            if self.inspector.in_message():
                self._server_gone = True
                self.server.transport.abortConnection()
            elif to_server:
                self.server.transport.write(to_server)
        self.closeSession("timeout", to_client or None)

    def abortSession(self):
        """Drop both legs at once (finwait expired, or the tracker sheds load)."""
        self._closing = True
        if self.server is not None and not self._server_gone:
            self._server_gone = True
            self.server.transport.abortConnection()
        self.transport.abortConnection()

    def closeSession(self, reason, message=None):
        """Close both legs, after what was already written to them."""
        if self._closing:
            return
        self._closing = True
        self.factory.tracker.closing(self.session)  # finwait bounds the close
        if message is not None:
            self.transport.write(message)
        if self.server is not None and not self._server_gone:
            _lose(self.server.transport)
        _lose(self.transport)


class InspectorFactory(protocol.ServerFactory):
    """Builds the inspected `ClientLeg` of each session of one listener.

    ``backend`` is a Twisted client endpoint; ``inspectors`` the
    `IInspectorFactory` of the listener's rule.
    """

    noisy = False

    def __init__(self, listener, inspectors, backend, tracker, clock, backend_name=None):
        self.listener = listener
        self.rule = listener.rule
        self.inspectors = inspectors
        self.backend = backend
        # A plain tcp: backend is connected directly (see ServerLeg).
        self.direct = direct_tcp(backend)
        self.backend_name = backend_name or listener.backend
        self.tracker = tracker
        self.clock = clock
        self.connect_timeout = tracker.settings.synwait_time
        self.spool_directory = getattr(tracker.settings, "spool_directory", None) or os.path.abspath("var/spool")
        self.quarantine_directory = getattr(self.rule, "quarantine", None) or os.path.abspath("var/quarantine")
        self.tls_server, self.tls_client = _tls_contexts(listener)
        # What the client is told when the backend cannot be reached, in its protocol.
        self.unreachable_reply = refusal_reply(inspectors, "unreachable")

    def buildProtocol(self, addr):
        """A new session: a fresh inspector and its client leg."""
        inspector = self.inspectors.buildInspector(self.rule)
        if self.tracker.tracing:
            inspector.trace = True
        if self.listener.xclient:
            inspector.xclient = True
        return ClientLeg(self, inspector)


def _tls_contexts(listener):
    """The TLS server context (client leg) and client creator (backend leg) of a listener."""
    rule = listener.rule
    if getattr(rule, "tls", "strip") != "terminate":
        return None, None
    from mailguard import tls

    server = tls.server_context(rule.tls_certificate, rule.tls_key, rule.tls_ciphers)
    required = rule.backend_tls == "required"
    from mailguard.endpoints import client_host

    hostname = rule.backend_hostname or client_host(listener.backend) or "localhost"
    client = tls.client_creator(hostname, rule.backend_ca, verify=required)
    return server, client

