"""End-to-end resilience tests: nothing lost, nothing half-delivered, memory bounded under backpressure.

Real peers on loopback only: raw socket clients in a thread, the embedded
backend and aiosmtpd in this process, the embedded backend as a child
process killed with SIGKILL, and the gateway itself as a child process when
its memory is what is measured.  Every test ends with the gateway's session
table empty (`GatewayTestCase` waits for it) and trial's dirty-reactor checks
on.
"""

import hashlib
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.threads import deferToThread

import mailguard
from tests.clients import LockstepClient, wait_for
from tests.test_gateway import GatewayTestCase
from tests.test_smuggling import CountingAiosmtpd, CountingBackend, ObservedClient, listenBackend

#: Where ``import mailguard`` must find the code under test in a child process.
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(mailguard.__file__)))

#: A child process running the embedded backend on an ephemeral loopback port
#: (printed on stdout), delivering into the Maildir argv[1].  With argv[2] ==
#: "hang" it takes whole messages but never answers their end of data, so a
#: test can kill it between the end of data and the reply.
BACKEND_SCRIPT = r"""
import sys
from twisted.internet import reactor
from mailguard.embedded import EmbeddedBackendFactory, SMTPServerProtocol

class Backend(SMTPServerProtocol):
    def contentReceived(self, verb, content, last):
        if sys.argv[2] == "hang" and last:
            return b""
        return super().contentReceived(verb, content, last)

factory = EmbeddedBackendFactory(maildir=sys.argv[1], timeout=None, record=False)
factory.protocol = Backend
port = reactor.listenTCP(0, factory, interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""

#: A child process running the gateway (esmtp, max-data argv[2]) on an
#: ephemeral loopback port (printed on stdout) in front of 127.0.0.1:argv[1].
GATEWAY_SCRIPT = r"""
import sys
from twisted.internet import endpoints, reactor
from mailguard.policy import GlobalSettings, Listener, Rule
from mailguard.service import listener_factory
from mailguard.tracker import SessionTracker

backend_port, max_data = int(sys.argv[1]), int(sys.argv[2])
rule = Rule(name="BACKPRESSURE", protocol="esmtp", max_data=max_data)
listener = Listener(name="bp", listen="tcp:0", backend="tcp:127.0.0.1:%d" % backend_port, rule=rule)
tracker = SessionTracker(GlobalSettings(), reactor)
backend = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", backend_port)
port = reactor.listenTCP(0, listener_factory(listener, tracker, reactor, backend), interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""


def spawn(test, script, *args):
    """Start ``script`` in a child Python; return ``(process, port it printed)``.

    The child is killed and reaped when the test ends.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = SOURCE_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen(
        [sys.executable, "-c", script] + [str(a) for a in args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env,
    )

    def reap():
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()

    test.addCleanup(reap)
    line = _read_line(proc, 20.0)
    if not line.strip().isdigit():
        raise AssertionError("child did not start: %r (status %r)" % (line, proc.poll()))
    return proc, int(line)


def _read_line(proc, timeout):
    """The first line of the child's stdout, waiting at most ``timeout`` seconds."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return b""
    return proc.stdout.readline()


def rss(pid):
    """Resident set size of process ``pid`` in bytes, from /proc."""
    with open("/proc/%d/statm" % pid) as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maildir_files(maildir):
    """Every file in the Maildir's new/ and tmp/ (a half-written message would be in tmp/)."""
    found = []
    for sub in ("new", "tmp", "cur"):
        path = os.path.join(maildir, sub)
        if os.path.isdir(path):
            found.extend(os.path.join(sub, name) for name in os.listdir(path))
    return found


def start_message(port, data=True, tracker=None):
    """Open a session and get through EHLO, MAIL, RCPT and (with ``data``) DATA; return the client.

    With ``tracker`` (the in-process gateway's) the client is an
    `ObservedClient`, whose `segment` waits until the gateway has read it.
    """
    if tracker is not None:
        client = ObservedClient(port, tracker)
    else:
        client = LockstepClient(port)
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    replies = [client.command(b"EHLO client.example")]
    replies.append(client.command(b"MAIL FROM:<a@client.example>"))
    replies.append(client.command(b"RCPT TO:<b@server.example>"))
    if data:
        replies.append(client.command(b"DATA"))
    codes = [r[:3] for r in replies]
    assert codes == [b"250", b"250", b"250", b"354"][: len(codes)], replies
    return client


def abort(client, how):
    """End the client's connection: ``fin`` (close) or ``rst`` (SO_LINGER 0, so the kernel sends RST)."""
    if how == "rst":
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


#: Where a client can stop mid-message: each of these partial DATA streams
#: must never become a message at the backend.
PARTIAL_DATA = (
    b"Subject: partial\r\n\r\nhalf a li",
    b"Subject: partial\r\n\r\nwhole lines\r\n",
    b"Subject: partial\r\n\r\nalmost\r\n.",
    b"Subject: partial\r\n\r\nalmost\r\n.\r",
    b"Subject: partial\r\n\r\nbare\n.",
)


class ClientAbortTests(GatewayTestCase):
    """A client that disappears mid-message leaves nothing at the backend."""

    @defer.inlineCallbacks
    def abort_everywhere(self, backend, bport):
        """Every partial stream, ended by FIN and by RST: nothing delivered, every backend leg closed."""
        port = self.gateway(bport)
        for partial in PARTIAL_DATA:
            for how in ("fin", "rst"):

                def talk(partial, how):
                    client = start_message(port, tracker=self.tracker)
                    # The gateway has read (and forwarded what it may of) the partial stream.
                    client.segment(partial)
                    abort(client, how)

                yield deferToThread(talk, partial, how)
                yield wait_for(lambda: not self.tracker.sessions and backend.idle())
                self.assertEqual(backend.delivered, 0, (partial, how))
        return port

    @defer.inlineCallbacks
    def test_embedded_backend(self):
        """Aborts mid-DATA (FIN or RST, anywhere in a line or terminator) deliver nothing to the embedded backend."""
        backend = CountingBackend()
        yield self.abort_everywhere(backend, listenBackend(self, backend))
        self.assertEqual(len(backend.connections), 2 * len(PARTIAL_DATA))
        for record in backend.connections:
            received = bytes(record.received)
            self.assertTrue(record.closed)
            self.assertFalse(received.endswith(b"\r\n.\r\n"), received)
            self.assertNotIn(b"QUIT", received)

    @defer.inlineCallbacks
    def test_aiosmtpd_backend(self):
        """Aborts mid-DATA deliver nothing to aiosmtpd, and every one of its sessions is closed."""
        backend = CountingAiosmtpd()
        bport = backend.start()
        self.addCleanup(backend.stop)
        yield self.abort_everywhere(backend, bport)
        self.assertEqual(backend.envelopes, [])

    @defer.inlineCallbacks
    def test_abort_mid_bdat_chunk(self):
        """A client gone in the middle of a BDAT LAST chunk leaves no message at the backend."""
        backend = CountingBackend()
        port = self.gateway(listenBackend(self, backend))
        for how in ("fin", "rst"):

            def talk(how):
                client = start_message(port, data=False, tracker=self.tracker)
                client.segment(b"BDAT 1000 LAST\r\n" + b"y" * 400)
                abort(client, how)

            yield deferToThread(talk, how)
            yield wait_for(lambda: not self.tracker.sessions and backend.idle())
        self.assertEqual(backend.delivered, 0)
        self.assertEqual(backend.verbs.count("BDAT"), 2)

    @defer.inlineCallbacks
    def test_max_data_refused_at_real_end(self):
        """Over max-data in a stream that keeps coming: never delivered, 552 5.3.4 only at the real end."""
        backend = CountingBackend()
        port = self.gateway(listenBackend(self, backend), max_data=1000)

        def talk():
            client = start_message(port, tracker=self.tracker)
            early = []
            # Exactly max-data: still fine.  The next line goes over the
            # limit, and more still comes; each is read by the gateway (and
            # answered, if it were to answer) before the client goes on.
            for segment in (b"z" * 998 + b"\r\n", b"more after the limit\r\n", b"and more\r\n"):
                client.segment(segment)
                early.append(client.pending())
            client.send(b".\r\n")
            return early, client.rest()

        early, rest = yield deferToThread(talk)
        yield wait_for(lambda: not self.tracker.sessions and backend.idle())
        self.assertEqual(early, [b"", b"", b""])
        self.assertEqual(backend.delivered, 0)
        self.assertEqual(
            rest,
            b"552 5.3.4 Message size exceeds fixed maximum message size\r\n421 4.4.2 Closing connection\r\n",
        )


class CleanEndTests(GatewayTestCase):
    """Sessions that end normally or by timer end cleanly on both legs."""

    @defer.inlineCallbacks
    def test_quit_then_nothing(self):
        """After QUIT the client reads the server's 221 and then the close, nothing else."""
        backend = CountingBackend()
        port = self.gateway(listenBackend(self, backend))

        def talk():
            client = LockstepClient(port)
            try:
                client.command(b"EHLO client.example")
                client.send(b"QUIT\r\n")
                return client.rest()
            finally:
                client.close()

        rest = yield deferToThread(talk)
        self.assertEqual(rest, b"221 2.0.0 Bye\r\n")
        yield wait_for(lambda: not self.tracker.sessions and backend.idle())

    @defer.inlineCallbacks
    def test_half_close_after_quit(self):
        """A client that half-closes after pipelining its end of data and QUIT still gets the 250 and the 221."""
        backend = CountingBackend()
        port = self.gateway(listenBackend(self, backend))

        def talk():
            client = start_message(port)
            client.send(b"Subject: batch\r\n\r\nsent by a script\r\n.\r\nQUIT\r\n")
            client.sock.shutdown(socket.SHUT_WR)
            try:
                return client.rest()
            finally:
                client.close()

        rest = yield deferToThread(talk)
        yield wait_for(lambda: not self.tracker.sessions and backend.idle())
        # The backend took the message either way: losing its 250 makes the client send it again.
        self.assertEqual(backend.delivered, 1)
        self.assertRegex(rest, rb"\A250 [^\r\n]*\r\n221 2\.0\.0 Bye\r\n\Z")

    @defer.inlineCallbacks
    def test_idle_timeout_mid_message(self):
        """A client silent mid-message gets 421 4.4.2 Idle timeout; the message never completes at the backend."""
        backend = CountingBackend()
        port = self.gateway(listenBackend(self, backend), timeout=1)

        def talk():
            client = start_message(port)
            client.send(b"Subject: stalled\r\n\r\nfirst line\r\n")
            try:
                return client.rest()
            finally:
                client.close()

        rest = yield deferToThread(talk)
        self.assertEqual(rest, b"421 4.4.2 Idle timeout, closing connection\r\n")
        yield wait_for(lambda: not self.tracker.sessions and backend.idle())
        self.assertEqual(backend.delivered, 0)
        self.assertFalse(bytes(backend.connections[0].received).endswith(b"\r\n.\r\n"))


class BackendDeathTests(GatewayTestCase):
    """A backend process killed with SIGKILL: the client is told, never with a 250."""

    @defer.inlineCallbacks
    def kill_during(self, prepare, mode="store"):
        """Run ``prepare(port)`` (a client up to the kill point), SIGKILL the backend, return what the client reads."""
        maildir = os.path.abspath(self.mktemp())
        proc, bport = spawn(self, BACKEND_SCRIPT, maildir, mode)
        port = self.gateway(bport)
        client, sent = yield deferToThread(prepare, port)
        # The gateway has taken every byte the client sent before the kill.
        yield wait_for(lambda: sum(s.client_bytes for s in self.tracker.sessions.values()) >= sent)
        os.kill(proc.pid, signal.SIGKILL)
        yield deferToThread(proc.wait, 10)

        def finish():
            try:
                return client.rest()
            finally:
                client.close()

        rest = yield deferToThread(finish)
        yield wait_for(lambda: not self.tracker.sessions)
        self.assertEqual(maildir_files(maildir), [])
        return rest

    @staticmethod
    def sent_so_far(client, data):
        """Send ``data``; return the client and how many bytes the gateway must have seen."""
        client.send(data)
        return client, len(b"EHLO client.example\r\nMAIL FROM:<a@client.example>\r\n"
                           b"RCPT TO:<b@server.example>\r\nDATA\r\n") + len(data)

    @defer.inlineCallbacks
    def test_killed_mid_data(self):
        """Backend killed mid-DATA: the client gets 451 4.3.0 and the close, nothing is stored."""
        rest = yield self.kill_during(lambda port: self.sent_so_far(start_message(port), b"Subject: x\r\n\r\nhalf"))
        self.assertEqual(rest, b"451 4.3.0 Connection to the mail server lost, message not delivered\r\n")

    @defer.inlineCallbacks
    def test_killed_after_end_of_data(self):
        """Backend killed after the end of data but before its reply: 451 4.3.0, never 250."""
        rest = yield self.kill_during(
            lambda port: self.sent_so_far(start_message(port), b"Subject: x\r\n\r\nwhole\r\n.\r\n"), mode="hang"
        )
        self.assertEqual(rest, b"451 4.3.0 Connection to the mail server lost, message not delivered\r\n")

    @defer.inlineCallbacks
    def test_killed_mid_bdat(self):
        """Backend killed in the middle of a BDAT chunk: 451 4.3.0, nothing stored."""

        def prepare(port):
            client = start_message(port, data=False)
            data = b"BDAT 5000 LAST\r\n" + b"c" * 1000
            client.send(data)
            return client, len(b"EHLO client.example\r\nMAIL FROM:<a@client.example>\r\n"
                               b"RCPT TO:<b@server.example>\r\n") + len(data)

        rest = yield self.kill_during(prepare)
        self.assertEqual(rest, b"451 4.3.0 Connection to the mail server lost, message not delivered\r\n")

    @defer.inlineCallbacks
    def test_killed_between_commands(self):
        """Backend killed in command phase: the client gets 421 4.4.2 and the close."""

        def prepare(port):
            client = start_message(port, data=False)
            return client, len(b"EHLO client.example\r\nMAIL FROM:<a@client.example>\r\n"
                               b"RCPT TO:<b@server.example>\r\n")

        rest = yield self.kill_during(prepare)
        self.assertEqual(rest, b"421 4.4.2 Connection to the mail server lost, closing connection\r\n")


class SlowSink(protocol.Protocol):
    """A minimal SMTP server that reads message data slowly.

    In DATA it pauses its transport each time it has read ``factory.budget``
    octets and resumes one ``factory.tick`` later, so it drains at most
    budget/tick octets per second whatever the sender does.  It hashes the
    DATA octets it receives (terminator included).
    """

    def connectionMade(self):
        self.factory.protocols.append(self)
        self.buf = b""
        self.data = False
        self.tail = b""
        self.received = 0
        self.digest = hashlib.sha256()
        self.left = self.factory.budget
        self.resume = None
        self.transport.write(b"220 slow.sink ESMTP\r\n")

    def dataReceived(self, data):
        if self.data:
            self._data(data)
            return
        self.buf += data
        while b"\r\n" in self.buf and not self.data:
            line, self.buf = self.buf.split(b"\r\n", 1)
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.transport.write(b"250-slow.sink\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                self.data = True
                self.transport.write(b"354 go ahead\r\n")
            elif verb == b"QUIT":
                self.transport.write(b"221 bye\r\n")
                self.transport.loseConnection()
            else:
                self.transport.write(b"250 ok\r\n")
        if self.data and self.buf:
            rest, self.buf = self.buf, b""
            self._data(rest)

    def _data(self, data):
        window = self.tail + data
        end = window.find(b"\r\n.\r\n")
        if end >= 0:
            used = end + 5 - len(self.tail)
            data, after = data[:used], data[used:]
        self.received += len(data)
        self.digest.update(data)
        if end >= 0:
            self.data = False
            self.tail = b""
            self.transport.write(b"250 2.0.0 all of it\r\n")
            if after:
                self.dataReceived(after)
            return
        self.tail = window[-4:]
        self.left -= len(data)
        if self.left <= 0 and self.resume is None:
            self.transport.pauseProducing()
            self.resume = reactor.callLater(self.factory.tick, self._resume)

    def _resume(self):
        self.resume = None
        self.left = self.factory.budget
        self.transport.resumeProducing()

    def connectionLost(self, reason):
        if self.resume is not None:
            self.resume.cancel()
            self.resume = None


class BackpressureTests(GatewayTestCase):
    """The gateway pauses the fast side instead of buffering for the slow one."""

    timeout = 180

    #: Octets pushed through the gateway in one message.
    TOTAL = 200 * 1024 * 1024
    #: The slow backend reads at most BUDGET octets per TICK seconds (~25 MB/s).
    BUDGET = 256 * 1024
    TICK = 0.01
    #: Allowed growth of the gateway's resident memory during the transfer.
    BOUND = 64 * 1024 * 1024

    @defer.inlineCallbacks
    def test_memory_flat_with_slow_backend(self):
        """200 MB through a gateway process to a backend reading ~25 MB/s: its RSS grows by less than 64 MB."""
        sink = protocol.ServerFactory.forProtocol(SlowSink)
        sink.protocols, sink.budget, sink.tick = [], self.BUDGET, self.TICK
        listening = reactor.listenTCP(0, sink, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        proc, port = spawn(self, GATEWAY_SCRIPT, listening.getHost().port, self.TOTAL * 2)
        self.addCleanup(lambda: [p.transport.abortConnection() for p in sink.protocols if p.transport.connected])

        # Warm up (imports, first session) before taking the baseline.
        yield deferToThread(self.send, port, 1)
        baseline = rss(proc.pid)
        peak = [baseline]

        def sample():
            peak[0] = max(peak[0], rss(proc.pid))

        sampler = task.LoopingCall(sample)
        sampler.start(0.05)
        try:
            started = time.monotonic()
            reply, digest = yield deferToThread(self.send, port, self.TOTAL // len(LINE_BLOCK))
            elapsed = time.monotonic() - started
        finally:
            sampler.stop()
        sample()
        yield wait_for(lambda: not any(p.transport.connected for p in sink.protocols))
        self.assertTrue(reply.startswith(b"250 2.0.0 all of it"), reply)
        last = sink.protocols[-1]
        self.assertEqual((last.received, last.digest.hexdigest()), digest)
        growth = peak[0] - baseline
        self.assertLess(
            growth, self.BOUND,
            "gateway RSS grew %.1f MB (baseline %.1f MB) in %.1f s" % (growth / 2**20, baseline / 2**20, elapsed),
        )
        # The sink really was the bottleneck, or the test proved nothing.
        self.assertGreater(elapsed, self.TOTAL / (self.BUDGET / self.TICK) * 0.8)

    @staticmethod
    def send(port, blocks):
        """Send one message of ``blocks`` 1 MB blocks; return (reply, (octets, sha256) of the DATA stream)."""
        client = LockstepClient(port, timeout=120)
        try:
            for line in (b"EHLO big.example", b"MAIL FROM:<a@client.example>", b"RCPT TO:<b@server.example>"):
                assert client.command(line)[:3] == b"250"
            assert client.command(b"DATA")[:3] == b"354"
            digest = hashlib.sha256()
            for _ in range(blocks):
                client.send(LINE_BLOCK)
                digest.update(LINE_BLOCK)
            client.send(b".\r\n")
            digest.update(b".\r\n")
            reply = client.reply()
            client.command(b"QUIT")
            return reply, (blocks * len(LINE_BLOCK) + 3, digest.hexdigest())
        finally:
            client.close()


#: 1 MiB of 1024-octet lines (clean CRLF data: the gateway's fast path).
LINE_BLOCK = (b"b" * 1022 + b"\r\n") * 1024
