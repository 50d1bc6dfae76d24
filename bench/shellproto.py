"""The whole gateway in one process, no sockets: CPU per message of the inspector, the relay and the tracker.

    python bench/shellproto.py [--size 1024] [--messages 10] [--sessions 300] [--lockstep] [--idle 100]
                               [--profile] [--once] [--log FILE]

Like ``bench/coreproto.py``, but a session goes through what the running
gateway builds for the benchmark policy (``bench/common.policy_text``): the
tracker, the listener's factory chain, the client and backend legs and their
event loop (`ClientLeg._run`), and the log, written as the gateway writes its text lines to
``--log`` (default: a temporary file).  The two legs' transports are
Twisted's ``StringTransport`` and connections are recorded by a ``MemoryReactor``, so
what is measured is mailguard's own Python per message, without the kernel,
the reactor's loop and the load generator: the part that changed between two
trees.  Works on older trees too (it only uses ``load_policy``,
``SessionTracker`` and ``service.listener_factory``).

``--idle`` sessions stay open meanwhile, as in a loaded gateway (the
tracker's timer heap holds their entries).  ``--profile`` prints a cProfile
breakdown; the call count per message it
prints is deterministic, a steadier figure than time on a shared machine.
"""

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.getcwd())

from common import policy_text  # noqa: E402
from smtpload import build_message  # noqa: E402

GREETING = b"220 sink.example ESMTP\r\n"
EHLO_REPLY = (
    b"250-sink.example\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n250-8BITMIME\r\n"
    b"250-STARTTLS\r\n250 ENHANCEDSTATUSCODES\r\n"
)
ENVELOPE_REPLIES = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"


class Gateway:
    """The benchmark policy's listener, built as the gateway builds it, on a memory reactor."""

    def __init__(self, protocol, log_path):
        from twisted.internet import reactor as real
        from twisted.internet.testing import MemoryReactor
        from twisted.logger import FileLogObserver, formatEventAsClassicLogText, globalLogBeginner

        from mailguard import service
        from mailguard.policy import load_policy
        from mailguard.tracker import SessionTracker

        self.tmp = tempfile.mkdtemp(prefix="mailguard-shellproto-")
        path = os.path.join(self.tmp, "policy.ini")
        with open(path, "w") as f:
            f.write(policy_text(2525, 2526, protocol))
        log_path = log_path or os.path.join(self.tmp, "twistd.log")
        try:
            from mailguard.logs import log_observer
        except ImportError:  # an older tree: twistd's own observer of its log file
            from twisted.python.logfile import LogFile

            observer = FileLogObserver(LogFile.fromFullPath(log_path, rotateLength=None), formatEventAsClassicLogText)
        else:
            observer = log_observer("text", {"logfile": log_path}, 0)
        globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
        policy = load_policy(path)
        listener = policy.listeners[0]
        # Connections are recorded, never made; timers are the real
        # reactor's (its DelayedCall heap costs what it costs in the
        # gateway), though the reactor never runs.
        self.reactor = MemoryReactor()
        self.reactor.callLater = real.callLater
        self.reactor.seconds = real.seconds
        self.reactor.getDelayedCalls = real.getDelayedCalls
        self.tracker = SessionTracker(policy.settings, self.reactor)
        try:
            from mailguard.endpoints import client_endpoint
        except ImportError:  # an older tree
            from twisted.internet.endpoints import clientFromString as client_endpoint
        backend = client_endpoint(self.reactor, listener.backend)
        self.factory = service.listener_factory(listener, self.tracker, self.reactor, backend, listener.backend)
        self.port = 30000

    def connect(self):
        """A new session: ``(client protocol, client transport, server protocol, server transport)``."""
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        self.port = self.port % 30000 + 30001
        peer = IPv4Address("TCP", "127.0.0.1", self.port)
        client = self.factory.buildProtocol(peer)
        ct = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 2525), peerAddress=peer)
        client.makeConnection(ct)
        host, port, leg_factory = self.reactor.tcpClients.pop()[:3]
        server = leg_factory.buildProtocol(IPv4Address("TCP", host, port))
        st = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 40000),
                             peerAddress=IPv4Address("TCP", host, port))
        server.makeConnection(st)
        return client, ct, server, st


def session(gw, size, messages, body, lockstep=False):
    """One session of ``messages`` messages; returns the octets the server received.

    Pipelined (MAIL, RCPT and DATA in one segment, their replies in one), or
    with ``lockstep`` one command or reply per segment, as Postfix's
    ``smtp-source`` sends them.
    """
    from twisted.internet import error
    from twisted.python import failure

    client, ct, server, st = gw.connect()
    server.dataReceived(GREETING)
    client.dataReceived(b"EHLO bench.example.org\r\n")
    server.dataReceived(EHLO_REPLY)
    group = b"MAIL FROM:<bench@example.org> SIZE=%d\r\nRCPT TO:<sink@example.org>\r\nDATA\r\n" % size
    commands = group.splitlines(keepends=True)
    replies = ENVELOPE_REPLIES.splitlines(keepends=True)
    for i in range(messages):
        if lockstep:
            for command, answer in zip(commands, replies):
                client.dataReceived(command)
                server.dataReceived(answer)
        else:
            client.dataReceived(group)
            server.dataReceived(ENVELOPE_REPLIES)
        for start in range(0, len(body), 65536):
            client.dataReceived(body[start : start + 65536])
        server.dataReceived(b"250 2.0.0 Ok: queued as 4XyZ%05d\r\n" % i)
    client.dataReceived(b"QUIT\r\n")
    server.dataReceived(b"221 2.0.0 Bye\r\n")
    received = len(st.value())
    server.connectionLost(failure.Failure(error.ConnectionDone()))
    client.connectionLost(failure.Failure(error.ConnectionDone()))
    return received


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--messages", type=int, default=10)
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--protocol", default="esmtp")
    parser.add_argument("--lockstep", action="store_true", help="one command or reply per segment (smtp-source)")
    parser.add_argument("--idle", type=int, default=100, help="sessions kept open and idle meanwhile")
    parser.add_argument("--log", default=None, help="the log file (default: a temporary one)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--once", action="store_true",
                        help="run --sessions sessions once, untimed (for valgrind: instructions per message are "
                             "the difference between --messages N and --messages 0, over sessions x N)")
    args = parser.parse_args(argv)

    gw = Gateway(args.protocol, args.log)
    body = build_message(args.size)
    for _ in range(args.idle):  # sessions that stay open, as a loaded gateway has them
        client, ct, server, st = gw.connect()
        server.dataReceived(GREETING)
        client.dataReceived(b"EHLO idle.example.org\r\n")
        server.dataReceived(EHLO_REPLY)
    for _ in range(20):  # warm up: imports, caches
        session(gw, args.size, args.messages, body, args.lockstep)
    if args.once:
        for _ in range(args.sessions):
            session(gw, args.size, args.messages, body, args.lockstep)
        return
    best = {}
    for messages in (args.messages, 0):
        runs = []
        for _ in range(5):
            t = time.process_time()
            for _ in range(args.sessions):
                session(gw, args.size, messages, body, args.lockstep)
            runs.append((time.process_time() - t) / args.sessions)
        best[messages] = sorted(runs)[len(runs) // 2]
    per_message = (best[args.messages] - best[0]) / max(args.messages, 1)
    print("%s, %d-octet messages, %d per session: %.1f us per session, of which setup+EHLO+QUIT %.1f us; "
          "%.1f us per message (medians of 5)" % (
              args.protocol, args.size, args.messages, best[args.messages] * 1e6, best[0] * 1e6, per_message * 1e6))
    if args.profile:
        calls = {}
        for messages in (args.messages, 0):
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(100):
                session(gw, args.size, messages, body, args.lockstep)
            prof.disable()
            stats = pstats.Stats(prof)
            calls[messages] = stats.total_calls
            if messages:
                stats.sort_stats("tottime").print_stats(35)
        print("Python calls per message: %.1f" % ((calls[args.messages] - calls[0]) / 100.0 / max(args.messages, 1)))


if __name__ == "__main__":
    main()
