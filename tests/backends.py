"""Test peers for the whole suite: recording SMTP backends and blocking clients.

All of them listen on, or connect to, 127.0.0.1 only.

 - L{RecordingBackend}: the embedded backend, in memory, with a scriptable greeting
   and scriptable replies; L{listenBackend} serves it for one test.
 - L{AiosmtpdBackend}: aiosmtpd in its own thread, recording envelopes, optionally
   with AUTH.
 - L{smtplibInThread}, L{connectSMTP} and L{rawConversation}: blocking clients, run
   in a thread because the reactor is busy running the gateway.
"""

from __future__ import annotations

import smtplib
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from twisted.internet import reactor as globalReactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailguard.embedded import EmbeddedBackendFactory, SMTPServerProtocol

#: Seconds any blocking client in the tests waits before giving up.
SMTP_TIMEOUT = 10.0

#: The only credentials L{AiosmtpdBackend} accepts when C{auth=True}.
AUTH_USER = "user"
AUTH_PASSWORD = "password"

_T = TypeVar("_T")


class _RecordingProtocol(SMTPServerProtocol):
    """
    The embedded server protocol with the scripting hooks of L{RecordingBackend}.
    """

    factory: RecordingBackend

    def greet(self) -> None:
        """
        Send the scripted greeting, or nothing for a backend that never greets.
        """
        if self.factory.greet:
            super().greet()

    def commandReceived(self, verb: str, args: bytes) -> bytes | None:
        """
        Answer with the scripted reply for C{verb}, if there is one.
        """
        override = self.factory.replyOverride.get(verb)
        if override is None or verb == "BDAT":
            # A BDAT reply only comes once its octets are in: see contentReceived.
            return super().commandReceived(verb, args)
        if _positive(override):
            super().commandReceived(verb, args)
        return override

    def contentReceived(self, verb: str, content: bytes | None, last: bool) -> bytes:
        """
        Answer a DATA message (key C{"."}) or a BDAT chunk (key C{"BDAT"}) as scripted.
        """
        override = self.factory.replyOverride.get("." if verb == "DATA" else verb)
        if override is None:
            return super().contentReceived(verb, content, last)
        if _positive(override):
            super().contentReceived(verb, content, last)
        else:
            # A refused chunk or message ends the transaction (RFC 3030 section 2).
            self.resetTransaction()
        return override


def _positive(reply: bytes) -> bool:
    """
    Whether a scripted reply lets its command take effect (2xx or 3xx).
    """
    return reply[:1] in (b"2", b"3")


class RecordingBackend(EmbeddedBackendFactory):
    """
    The embedded backend kept in memory, recording every byte, with scriptable replies.

    Everything it receives and sends is in C{connections[i].received} / C{.sent};
    accepted messages are in C{messages} (see L{EmbeddedBackendFactory}).
    """

    protocol = _RecordingProtocol

    def __init__(
        self,
        greeting: bytes | None = None,
        greet: bool = True,
        replyOverride: Mapping[str, bytes] | None = None,
        maildir: str | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        """
        @param greeting: raw greeting bytes, CRLFs included (e.g. a multi-line
            greeting, or C{b"554 go away\\r\\n"}); default: the embedded greeting.
        @param greet: L{False} for a backend that accepts the connection but never
            greets.
        @param replyOverride: raw reply bytes by upper-case verb (C{"EHLO"},
            C{"RCPT"}, ...), C{"."} for the reply to a DATA message and C{"BDAT"} for
            the reply to each chunk.  A 2xx/3xx override lets the command take effect
            as usual; a 4xx/5xx one refuses it (a refused message is not stored).
        @param maildir: as for L{EmbeddedBackendFactory}; by default memory only.
        @param timeout: idle timeout; by default none, so no timer outlives a test.
        @param kwargs: the other L{EmbeddedBackendFactory} arguments (C{hostname},
            C{max_size}, C{extensions}, C{lenient_data_end}, C{reactor}).
        """
        super().__init__(maildir=maildir, timeout=timeout, **kwargs)
        if greeting is not None:
            self.greeting = greeting
        self.greet = greet
        self.replyOverride = dict(replyOverride or {})


def startBackend(factory: Any, reactor: Any = None) -> IListeningPort:
    """
    Listen with C{factory} on an ephemeral port of 127.0.0.1.

    The caller must stop listening (C{addCleanup(port.stopListening)}) and close the
    connections (C{addCleanup(factory.closeAll)}); L{listenBackend} does both.

    @return: the listening port; C{port.getHost().port} is its number.
    """
    if reactor is None:
        reactor = globalReactor
    return reactor.listenTCP(0, factory, interface="127.0.0.1")


def listenBackend(
    testCase: TestCase, factory: EmbeddedBackendFactory, reactor: Any = None
) -> int:
    """
    Serve C{factory} on 127.0.0.1 for the duration of one test.

    @return: the port number.
    """
    port = startBackend(factory, reactor)
    # Cleanups run last-in first-out: stop accepting, then close what is open.
    testCase.addCleanup(factory.closeAll)
    testCase.addCleanup(port.stopListening)
    return port.getHost().port


@dataclass(frozen=True, slots=True)
class ReceivedEnvelope:
    """
    One message aiosmtpd accepted.

    @ivar original_content: the message bytes as received (unstuffed, CRLF intact).
    @ivar authenticated: whether the session had authenticated with AUTH.
    """

    mail_from: str
    rcpt_tos: list[str]
    original_content: bytes
    mail_options: list[str]
    rcpt_options: list[str]
    authenticated: bool


class _Handler:
    """
    aiosmtpd handler that records every envelope in its L{AiosmtpdBackend}.
    """

    def __init__(self, backend: AiosmtpdBackend) -> None:
        self._backend = backend

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """
        Record the envelope (in aiosmtpd's thread) and accept the message.
        """
        self._backend._received(
            ReceivedEnvelope(
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                original_content=bytes(envelope.original_content or b""),
                mail_options=list(envelope.mail_options),
                rcpt_options=list(envelope.rcpt_options),
                authenticated=bool(session.authenticated),
            )
        )
        return "250 2.0.0 Message accepted for delivery"


def _authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, authData: Any
) -> AuthResult:
    """
    Accept L{AUTH_USER} / L{AUTH_PASSWORD} and nothing else.
    """
    ok = (
        isinstance(authData, LoginPassword)
        and authData.login == AUTH_USER.encode()
        and authData.password == AUTH_PASSWORD.encode()
    )
    # handled=False makes aiosmtpd send its own 535 reply on failure.
    return AuthResult(success=ok, handled=False)


class _BoundController(Controller):
    """
    An aiosmtpd Controller serving on a socket bound beforehand.

    Binding port 0 ourselves and handing the socket over avoids the race of picking a
    free port number and binding it later.
    """

    def __init__(self, handler: Any, sock: socket.socket, **kwargs: Any) -> None:
        super().__init__(
            handler, hostname="127.0.0.1", port=sock.getsockname()[1], **kwargs
        )
        self._sock = sock

    def _create_server(self) -> Any:
        return self.loop.create_server(
            self._factory_invoker, sock=self._sock, ssl=self.ssl_context
        )


class AiosmtpdBackend:
    """
    aiosmtpd's SMTP server in its own thread on 127.0.0.1, recording envelopes.

    aiosmtpd answers unknown commands with 500, which some tests rely on.  Call
    L{start} in the test and C{addCleanup(backend.stop)}.

    @ivar envelopes: every L{ReceivedEnvelope}, in order.
    @ivar port: the port number, once started.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        auth: bool = False,
        data_size_limit: int = 33554432,
        hostname: str = "aiosmtpd.test",
        reactor: Any = None,
        **smtpKwargs: Any,
    ) -> None:
        """
        @param auth: offer AUTH PLAIN and LOGIN without TLS, accepting only
            L{AUTH_USER} / L{AUTH_PASSWORD}.
        @param data_size_limit: the largest message accepted (advertised as SIZE).
        @param hostname: the server's name in its greeting and EHLO reply.
        @param reactor: the reactor L{whenMessages} fires in (default: global).
        @param smtpKwargs: more keyword arguments for C{aiosmtpd.smtp.SMTP}.
        """
        self.envelopes: list[ReceivedEnvelope] = []
        self.port: int | None = None
        self._reactor = globalReactor if reactor is None else reactor
        self._waiters: list[tuple[int, Deferred[list[ReceivedEnvelope]]]] = []
        self._lock = threading.Lock()
        self._smtpKwargs: dict[str, Any] = dict(
            data_size_limit=data_size_limit, server_hostname=hostname, **smtpKwargs
        )
        if auth:
            self._smtpKwargs.update(
                auth_require_tls=False, authenticator=_authenticate
            )
        self._controller: _BoundController | None = None

    def start(self) -> int:
        """
        Start serving (blocks briefly until aiosmtpd is ready).

        @return: the port number.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((self.host, 0))
            sock.listen(50)
            controller = _BoundController(_Handler(self), sock, **self._smtpKwargs)
            controller.start()
        except BaseException:
            sock.close()
            raise
        self._controller = controller
        self.port = sock.getsockname()[1]
        return self.port

    def stop(self) -> None:
        """
        Stop the server and its thread; safe to call when not started.
        """
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def whenMessages(self, count: int) -> Deferred[list[ReceivedEnvelope]]:
        """
        Return a Deferred firing with L{envelopes} once C{count} have arrived.
        """
        d: Deferred[list[ReceivedEnvelope]] = Deferred()
        self._waiters.append((count, d))
        self._check()
        return d

    def _received(self, envelope: ReceivedEnvelope) -> None:
        """
        Record an envelope (in aiosmtpd's thread) and wake waiters in the reactor's.
        """
        with self._lock:
            self.envelopes.append(envelope)
        self._reactor.callFromThread(self._check)

    def _check(self) -> None:
        """
        Fire the L{whenMessages} Deferreds whose count has been reached.
        """
        with self._lock:
            reached = len(self.envelopes)
        due = [d for count, d in self._waiters if count <= reached]
        self._waiters = [(c, d) for c, d in self._waiters if c > reached]
        for d in due:
            d.callback(self.envelopes)


def smtplibInThread(
    func: Callable[..., _T], *args: Any, **kwargs: Any
) -> Deferred[_T]:
    """
    Run blocking client code (smtplib, raw sockets) in a thread.

    Use L{connectSMTP} or pass C{timeout=SMTP_TIMEOUT} so nothing can hang.
    """
    return deferToThread(func, *args, **kwargs)


def connectSMTP(
    port: int, host: str = "127.0.0.1", timeout: float = SMTP_TIMEOUT
) -> smtplib.SMTP:
    """
    Open an smtplib connection with a timeout (call it inside the thread).
    """
    return smtplib.SMTP(host, port, local_hostname="client.test", timeout=timeout)


def rawConversation(
    port: int,
    data: bytes,
    host: str = "127.0.0.1",
    timeout: float = SMTP_TIMEOUT,
    waitForGreeting: bool = True,
) -> bytes:
    """
    Send C{data} in one write and return everything received until the peer closes.

    Blocking: run it with L{smtplibInThread}.  C{data} should end with QUIT, or the
    call waits for the peer to close until C{timeout} (then raises C{socket.timeout}).

    @param waitForGreeting: read the greeting line before sending, as a polite
        client would; the greeting is included in the result either way.
    """
    received = bytearray()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        if waitForGreeting:
            while b"\n" not in received:
                chunk = sock.recv(65536)
                if not chunk:
                    return bytes(received)
                received += chunk
        sock.sendall(data)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return bytes(received)
            received += chunk
