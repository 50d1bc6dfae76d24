"""End-to-end hardening tests: SMTP smuggling, early talkers, junk, invalid replies, unbounded lines.

Every test runs the real gateway on loopback in front of a real backend (the
embedded backend, strict or deliberately lenient, or aiosmtpd) and talks to
it with a raw socket client in a thread.  The smuggling tests run every
end-of-data variant as its own session through one gateway per test, so the
number of listeners stays small while every variant is proven separately.

Where a test says how the client's bytes are split, the split is made, not
hoped for: `ObservedClient` writes the next segment only once the gateway
has read the previous one, and `ReadLog` records the gateway's reads so the
test checks the cut it claims.  No test decides a segmentation with a sleep.
"""

import socket

from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from twisted.internet import defer, reactor, task, threads
from twisted.internet.threads import deferToThread

from mailguard.relay import ClientLeg
from mailguard.smtp import SASL_LIMIT
from tests.backends import AiosmtpdBackend, RecordingBackend, listenBackend
from tests.clients import LockstepClient, read_reply, wait_for
from tests.test_gateway import GatewayTestCase

#: Every end-of-data variant a vulnerable server has been known to accept
#: (CVE-2023-51764/51765/51766 and the SEC Consult list).
VARIANTS = (
    b"\n.\n",
    b"\n.\r",
    b"\r.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\r\r\n",
    b"\r\r\n.\r\r\n",
)

GOOD_FROM = b"good@client.example"
GOOD_RCPT = b"rcpt@server.example"
EVIL_FROM = b"evil@attacker.example"

#: What follows the fake end of data: a whole second transaction.  Its own
#: ``CRLF . CRLF`` (sent by the caller) is the client's one real end of data.
SMUGGLED = (
    b"MAIL FROM:<" + EVIL_FROM + b">\r\n"
    b"RCPT TO:<victim@server.example>\r\n"
    b"DATA\r\n"
    b"From: ceo@server.example\r\nSubject: smuggled\r\n\r\nwire the money\r\n"
)


def smuggling_payload(variant):
    """The DATA content of one smuggling attempt, real terminator included."""
    return b"From: a@client.example\r\nSubject: hello\r\n\r\nbody" + variant + SMUGGLED + b".\r\n"


def open_client(port):
    """A lockstep client with Nagle off, so small writes leave one by one."""
    client = LockstepClient(port)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


def _until(predicate, timeout=10.0):
    """A Deferred firing once ``predicate()`` holds, checked every millisecond, then one more reactor turn.

    The extra turn lets the gateway flush whatever it wrote while handling
    what made the predicate true.  Fails after ``timeout`` seconds.
    """
    deadline = reactor.seconds() + timeout

    def check():
        if predicate():
            return task.deferLater(reactor, 0, lambda: None)
        if reactor.seconds() > deadline:
            raise AssertionError("condition not reached in %.1f s" % timeout)
        return task.deferLater(reactor, 0.001, check)

    return task.deferLater(reactor, 0, check)


class ObservedClient(LockstepClient):
    """A lockstep client (run in a thread) that can see what the in-process gateway has read of its bytes.

    `segment` sends bytes and returns only once the gateway's session has
    read every byte sent so far: the next bytes can never share a read with
    them, so a test decides exactly where the gateway's reads are cut, on
    any machine.  `pending` tells what the gateway has sent that the client
    has not read yet, without waiting.
    """

    def __init__(self, port, tracker):
        super().__init__(port)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tracker = tracker
        self.sent = 0
        # The session is in the table from its accept on; the greeting was read.
        initiator = "%s:%d" % self.sock.getsockname()[:2]
        self.session = next(s for s in tracker.sessions.values() if s.initiator == initiator)

    def send(self, data):
        """Send raw bytes without waiting, counting them."""
        self.sock.sendall(data)
        self.sent += len(data)

    def command(self, line):
        """Send a line (CRLF added) and return the reply bytes."""
        self.send(line + b"\r\n")
        return read_reply(self.file)

    def consumed(self):
        """True once the gateway has read every byte sent, or has ended the session."""
        return self.session.client_bytes >= self.sent or self.session.id not in self.tracker.sessions

    def segment(self, data):
        """Send ``data`` as one segment: return once the gateway has read all of it (and had a turn to answer)."""
        self.send(data)
        threads.blockingCallFromThread(reactor, _until, self.consumed)

    def pending(self):
        """What the gateway sent that the socket holds unread, without waiting (b"" if nothing).

        Only meaningful when every reply read so far was read whole (the
        lockstep dialogue): then nothing else waits in the file's buffer.
        """
        timeout = self.sock.gettimeout()
        # A socket with a timeout would wait for data even with MSG_DONTWAIT.
        self.sock.setblocking(False)
        try:
            return self.sock.recv(65536, socket.MSG_PEEK)
        except BlockingIOError:
            return b""
        finally:
            self.sock.settimeout(timeout)


class ReadLog:
    """Every read the gateway's client legs make, by session id (patched into `ClientLeg.dataReceived`)."""

    def __init__(self, testcase):
        self.reads = {}
        original = ClientLeg.dataReceived

        def dataReceived(leg, data):
            self.reads.setdefault(leg.session.id, []).append(data)
            return original(leg, data)

        testcase.patch(ClientLeg, "dataReceived", dataReceived)

    def cut_at(self, session_id, pieces):
        """True when the session's reads hold ``pieces`` as consecutive reads of their own."""
        reads = self.reads.get(session_id, [])
        n = len(pieces)
        return any(reads[i : i + n] == pieces for i in range(len(reads) - n + 1))

    def within_one(self, session_id, data):
        """True when one read of the session holds all of ``data``."""
        return any(data in chunk for chunk in self.reads.get(session_id, []))


def smuggle(port, tracker, variant, split):
    """Run one smuggling session; return ``(replies before data, end-of-data reply, the rest, session id)``.

    Whole, the DATA content leaves in one write.  Split, the gateway reads
    the content before the fake terminator, then each octet of the fake
    terminator, then the rest, each in reads of their own (`ObservedClient`).
    """
    client = ObservedClient(port, tracker)
    try:
        replies = [client.greeting]
        for line in (b"EHLO client.example", b"MAIL FROM:<" + GOOD_FROM + b">",
                     b"RCPT TO:<" + GOOD_RCPT + b">", b"DATA"):
            replies.append(client.command(line))
        data = smuggling_payload(variant)
        try:
            if split:
                head, tail = data.split(variant, 1)
                client.segment(head)
                for byte in variant:
                    client.segment(bytes([byte]))
                client.segment(tail)
            else:
                client.send(data)
        except OSError:
            pass  # the gateway closed early: what it said is read below
        end = client.reply()
        if end.startswith(b"250"):
            client.send(b"QUIT\r\n")
        return replies, end, client.rest(), client.session.id
    finally:
        client.close()


class _CountingProtocol(RecordingBackend.protocol):
    """The recording backend's protocol, also logging each verb its own parser saw."""

    def commandReceived(self, verb, args):
        """Remember the verb, then answer as usual."""
        self.factory.verbs.append(verb)
        return super().commandReceived(verb, args)


class CountingBackend(RecordingBackend):
    """A RecordingBackend that lists every command verb its parser took as a command."""

    protocol = _CountingProtocol

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.verbs = []

    @property
    def mails(self):
        """MAIL commands received over all connections."""
        return self.verbs.count("MAIL")

    @property
    def delivered(self):
        """Messages accepted over all connections."""
        return len(self.messages)

    def idle(self):
        """True when every connection the backend had is closed."""
        return all(c.closed for c in self.connections)


class CountingAiosmtpd(AiosmtpdBackend):
    """aiosmtpd, also counting MAIL commands and closed connections (from its thread)."""

    def start(self):
        """Start aiosmtpd, then hook MAIL and connection loss for new sessions."""
        port = super().start()
        self.mail_count = 0
        self.opened = self.closed = 0
        controller = self._controller
        backend = self
        handler_class = type(controller.handler)

        class Handler(handler_class):
            async def handle_MAIL(self, server, session, envelope, address, options):
                backend.mail_count += 1
                envelope.mail_from = address
                envelope.mail_options.extend(options)
                return "250 OK"

        class Server(AiosmtpdSMTP):
            def connection_made(self, transport):
                backend.opened += 1
                super().connection_made(transport)

            def connection_lost(self, error):
                super().connection_lost(error)
                backend.closed += 1

        controller.handler = Handler(self)
        controller.factory = lambda: Server(controller.handler, **controller.SMTP_kwargs)
        return port

    @property
    def mails(self):
        """MAIL commands aiosmtpd accepted."""
        return self.mail_count

    @property
    def delivered(self):
        """Messages aiosmtpd accepted."""
        return len(self.envelopes)

    def idle(self):
        """True when every session aiosmtpd opened since start() is closed."""
        return self.closed == self.opened


class _SmugglingMixin:
    """Every variant, whole and split, through one gateway in front of one backend kind."""

    def start_backend(self):
        """Start this class's backend; return ``(backend, port)``."""
        raise NotImplementedError

    def contents(self, backend):
        """(sender, content) of every message ``backend`` delivered."""
        raise NotImplementedError

    @defer.inlineCallbacks
    def run_variants(self, mode):
        """Run every variant as its own session; fail listing each variant that misbehaved."""
        backend, bport = self.start_backend()
        port = self.gateway(bport, bare_newline=mode)
        log = ReadLog(self)
        failures = []
        sessions = 0
        for variant in VARIANTS:
            for split in (False, True):
                mails, delivered = backend.mails, backend.delivered
                replies, end, rest, sid = yield deferToThread(smuggle, port, self.tracker, variant, split)
                sessions += 1
                # Both legs closed: the backend has acted on every byte it got.
                yield wait_for(lambda: not self.tracker.sessions and backend.idle())
                got = (backend.mails - mails, backend.delivered - delivered)
                label = "%r %s" % (variant, "split" if split else "whole")
                # The gateway saw the fake terminator as the test says it did.
                if split and not log.cut_at(sid, [bytes([b]) for b in variant]):
                    failures.append("%s: terminator not read octet by octet: %r" % (label, log.reads.get(sid)))
                    continue
                if not split and not log.within_one(sid, variant):
                    failures.append("%s: terminator not read in one piece: %r" % (label, log.reads.get(sid)))
                    continue
                if [r[:3] for r in replies[1:]] != [b"250", b"250", b"250", b"354"]:
                    failures.append("%s: replies before data %r" % (label, replies))
                    continue
                if mode == "normalize":
                    if got != (1, 1) or not end.startswith(b"250") or not rest.startswith(b"221 ") or b"250" in rest:
                        failures.append("%s: MAIL/messages %r, end %r, then %r" % (label, got, end, rest))
                else:
                    if got != (1, 0) or not end.startswith(b"550 5.5.2") or b"250" in rest:
                        failures.append("%s: MAIL/messages %r, end %r, then %r" % (label, got, end, rest))
        self.assertEqual(failures, [], "\n".join(failures))
        self.assertEqual(backend.delivered, sessions if mode == "normalize" else 0)
        self.assertTrue(self.alerts("SMTP_BARE_NEWLINE"))
        return backend

    @defer.inlineCallbacks
    def test_normalize(self):
        """bare-newline = normalize: each variant gives exactly one MAIL and one message, the smuggled one inside it."""
        backend = yield self.run_variants("normalize")
        for sender, content in self.contents(backend):
            self.assertEqual(sender, GOOD_FROM)
            self.assertIn(b"MAIL FROM:<" + EVIL_FROM + b">", content)

    def test_reject(self):
        """bare-newline = reject: each variant gives one MAIL, no message, and 550 5.5.2 to the client."""
        return self.run_variants("reject")


class StrictBackendSmugglingTests(_SmugglingMixin, GatewayTestCase):
    """Smuggling variants against the strict embedded backend (ends DATA only on CRLF.CRLF)."""

    def start_backend(self):
        """A strict counting backend on loopback."""
        backend = CountingBackend()
        return backend, listenBackend(self, backend)

    def contents(self, backend):
        """(sender, content) of every message delivered."""
        return [(m.mail_from, m.data) for m in backend.messages]


class LenientBackendSmugglingTests(StrictBackendSmugglingTests):
    """Smuggling variants against a backend that ends DATA on LF.LF, like the vulnerable servers."""

    def start_backend(self):
        """A lenient counting backend on loopback."""
        backend = CountingBackend(lenient_data_end=True)
        return backend, listenBackend(self, backend)


class AiosmtpdSmugglingTests(_SmugglingMixin, GatewayTestCase):
    """Smuggling variants against aiosmtpd."""

    def start_backend(self):
        """aiosmtpd on loopback, counting MAIL commands."""
        backend = CountingAiosmtpd()
        port = backend.start()
        self.addCleanup(backend.stop)
        return backend, port

    def contents(self, backend):
        """(sender, content) of every message delivered."""
        return [(e.mail_from.encode(), e.original_content) for e in backend.envelopes]


class HeldBackend(CountingBackend):
    """A counting backend that does not greet by itself; ``opened`` lists its protocols."""

    def __init__(self):
        super().__init__(greet=False)
        self.opened = []

    def connectionOpened(self, protocol):
        """Keep the protocol so the test can make it greet."""
        super().connectionOpened(protocol)
        self.opened.append(protocol)


class EarlyTalkerTests(GatewayTestCase):
    """Clients that talk before the greeting has been relayed to them."""

    def held_backend(self):
        """A recording backend whose greeting is sent only when the test says so."""
        backend = HeldBackend()
        return backend, listenBackend(self, backend), backend.opened

    @staticmethod
    def early(port, first):
        """Connect and send ``first`` at once, then read until the gateway closes (QUIT after a 250)."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            sock.sendall(first)
            received = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return received
                received += chunk
                if b"\r\n250 " in received and b"QUIT" not in first:
                    first += b"QUIT\r\n"
                    sock.sendall(b"QUIT\r\n")
        finally:
            sock.close()

    @defer.inlineCallbacks
    def test_pregreet_reject(self):
        """pregreet = reject: bytes before the greeting get 554 5.5.1, the session closes, the backend sees nothing."""
        backend, bport, opened = self.held_backend()
        port = self.gateway(bport, pregreet="reject")
        got = yield deferToThread(self.early, port, b"EHLO early.example\r\n")
        self.assertEqual(got, b"554 5.5.1 Error: protocol error: data sent before greeting\r\n")
        yield wait_for(lambda: not self.tracker.sessions and backend.idle())
        self.assertEqual(bytes(backend.connections[0].received), b"")
        self.assertEqual(len(self.alerts("PREGREET")), 1)

    @defer.inlineCallbacks
    def test_pregreet_ignore(self):
        """pregreet = ignore: early bytes are held, then inspected and forwarded after the greeting."""
        backend, bport, opened = self.held_backend()
        port = self.gateway(bport, pregreet="ignore")
        talk = deferToThread(self.early, port, b"EHLO early.example\r\n")
        # Greet only once the gateway holds the early bytes.
        yield wait_for(lambda: opened and any(s.client_bytes for s in self.tracker.sessions.values()))
        backend.greet = True
        opened[0].greet()
        got = yield talk
        self.assertTrue(got.startswith(b"220 localhost ESMTP"), got)
        self.assertIn(b"\r\n250 ", got)
        self.assertIn(b"\r\n250 HELP\r\n221 2.0.0 Bye\r\n", got)
        yield wait_for(lambda: not self.tracker.sessions and backend.idle())
        self.assertEqual(backend.verbs, ["EHLO", "QUIT"])
        self.assertEqual(len(self.alerts("PREGREET")), 1)


def converse(port, lines, read_rest=True):
    """Greeting, then one reply per line; then everything until the gateway closes."""
    client = open_client(port)
    try:
        replies = [client.greeting] + [client.command(line) for line in lines]
        return replies, (client.rest() if read_rest else b"")
    finally:
        client.close()


class JunkTests(GatewayTestCase):
    """Non-SMTP clients, repeated bad commands, invalid server replies, endless lines."""

    @defer.inlineCallbacks
    def test_non_smtp_lines_close(self):
        """HTTP and proxy requests and header lines get 221 2.7.0 and close; the backend never sees them."""
        backend = CountingBackend()
        port = self.gateway(listenBackend(self, backend))
        lines = [b"GET / HTTP/1.1", b"POST /form HTTP/1.0", b"CONNECT mx.example:25 HTTP/1.1",
                 b"HEAD / HTTP/1.1", b"Subject: hello"]
        for line in lines:
            replies, rest = yield deferToThread(converse, port, [line])
            self.assertEqual((replies[1], rest), (b"221 2.7.0 Error: non-SMTP command\r\n", b""), line)
            yield wait_for(lambda: not self.tracker.sessions and backend.idle())
        self.assertEqual(backend.verbs, [])
        self.assertEqual(len(self.alerts("NON_SMTP_COMMAND")), len(lines))

    @defer.inlineCallbacks
    def test_max_bad_commands(self):
        """The bad command that reaches max-bad-commands is not forwarded: 421 4.7.0 and close."""
        backend = CountingBackend()
        port = self.gateway(listenBackend(self, backend), max_bad_commands=4)
        lines = [b"EXPN staff", b"XYZZY", b"A" * 2000, b"TURN"]
        replies, rest = yield deferToThread(converse, port, lines)
        self.assertEqual([r[:3] for r in replies[1:4]], [b"500", b"500", b"500"])
        self.assertEqual(replies[3], b"500 5.5.2 Line too long\r\n")
        self.assertEqual((replies[4], rest), (b"421 4.7.0 Too many errors, closing connection\r\n", b""))
        yield wait_for(lambda: not self.tracker.sessions and backend.idle())
        # The two x-ed commands reached the server; the long line and TURN did not.
        self.assertEqual(bytes(backend.connections[0].received), b"x" * 10 + b"\r\n" + b"x" * 5 + b"\r\n")

    @defer.inlineCallbacks
    def test_invalid_server_replies(self):
        """An invalid reply from the server never reaches the client, which gets 421 4.4.0."""
        backend = CountingBackend()
        port = self.gateway(listenBackend(self, backend))
        invalid = {
            b"no code": b"hello there\r\n",
            b"code 600": b"600 nope\r\n",
            b"code 199": b"199 nope\r\n",
            b"bad separator": b"250_ok\r\n",
            b"bare LF": b"250 ok\n",
            b"bare CR inside": b"250 o\rk\r\n",
            b"mixed codes": b"250-first\r\n251 second\r\n",
            b"reply without command": b"250 ok\r\n250 surplus\r\n",
            b"too long": b"250 " + b"y" * 600 + b"\r\n",
        }
        for name, bad in invalid.items():
            backend.replyOverride["NOOP"] = bad
            replies, rest = yield deferToThread(converse, port, [b"EHLO c.example", b"NOOP"])
            seen = replies[2] + rest
            self.assertTrue(seen.endswith(b"421 4.4.0 Invalid reply from the mail server, closing connection\r\n"),
                            (name, seen))
            self.assertNotIn(bad.strip(b"\r\n").split(b"\r\n")[-1], seen, name)
            yield wait_for(lambda: not self.tracker.sessions and backend.idle())
        self.assertEqual(len(self.alerts("SMTP_INVALID_REPLY")), len(invalid))

    @defer.inlineCallbacks
    def test_endless_line_bounded(self):
        """1 MB without CRLF in command phase: one 500 5.5.2 Line too long, a bounded buffer, then SMTP goes on."""
        backend = CountingBackend()
        port = self.gateway(listenBackend(self, backend))
        peak = [0]

        def sample():
            # The inspector's command-line buffer: what a client without CRLF costs.
            for session in self.tracker.sessions.values():
                inspector = session.inspector
                if inspector is not None:
                    peak[0] = max(peak[0], inspector._buffered())

        sampler = task.LoopingCall(sample)
        sampler.start(0.001)
        self.addCleanup(lambda: sampler.running and sampler.stop())

        def flood():
            client = open_client(port)
            try:
                for _ in range(16):
                    client.send(b"A" * 65536)
                first = client.reply()
                client.send(b"\r\n")  # ends the discarded line: swallowed, no reply of its own
                return first, client.command(b"QUIT")
            finally:
                client.close()

        first, bye = yield deferToThread(flood)
        sampler.stop()
        self.assertEqual(first, b"500 5.5.2 Line too long\r\n")
        self.assertTrue(bye.startswith(b"221"), bye)
        yield wait_for(lambda: not self.tracker.sessions and backend.idle())
        # Bounded by the longest line the inspector ever accepts, not by the 1 MB sent.
        self.assertLessEqual(peak[0], SASL_LIMIT)
        self.assertEqual(bytes(backend.connections[0].received), b"QUIT\r\n")
