"""The whole gateway in one process, no sockets: CPU per message of the inspector, the relay and the tracker.

    python bench/shellproto.py [--size 1024] [--messages 10] [--sessions 300] [--lockstep] [--idle 100]
                               [--rules none|asa|six] [--message smtpload|contentbench]
                               [--server script|reactive] [--profile [--sort cumulative]] [--once] [--log FILE]

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
breakdown (by own time, or with ``--sort cumulative`` by time including
the callees), the Python calls per message (deterministic, a steadier
figure than time on a shared machine), and the top functions per message:
the profile of sessions with messages minus that of sessions without.

Content rules, as ``bench/contentbench.py`` measures them end to end:
``--rules asa`` is the ASA default map of ``etc/asa-esmtp.ini``, ``--rules
six`` the six matches (both built by contentbench's own functions), and
``--message contentbench`` sends contentbench's multipart message (a text
part and a base64 attachment) of about ``--size`` octets instead of
smtpload's.  A rule with message criteria spools the message (into a
temporary ``spool-directory``): the gateway answers DATA itself and sends
the server DATA and the message only after the verdict, so the server's
replies cannot be a fixed script: with ``--server reactive`` (the default
with ``--rules asa`` or ``six``) a `Sink` answers each line the gateway
sends, and a spool sent piece by piece is pulled from its producer as the
reactor would.  Compare rows run with the same ``--server``: the reactive
one costs a little more per message than the script.  Nothing on the
spool path needs the reactor (content rules answer at once, the spool is
read and written with ``os.pread``/``os.pwrite``).  Before measuring, one
session is checked: SystemExit unless the server received every message
whole, exactly once, and the client got a 250 at each end of data.

Instructions per message, deterministic (with ``PYTHONHASHSEED=0``)::

    PY=$(python -c 'import sys; print(sys.executable)')   # valgrind must run the interpreter, not a shim
    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        $PY bench/shellproto.py --once --rules asa --message contentbench --size 102400 --sessions 20 --messages 5
    # the same with --messages 0; then (I refs with 5 - I refs with 0) / (20 x 5)

The warm-up and the check are the same whatever ``--messages``, so they
cancel out of that difference.
"""

import argparse
import cProfile
import functools
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.getcwd())

import contentbench  # noqa: E402
import smtpload  # noqa: E402
from common import policy_text  # noqa: E402

GREETING = b"220 sink.example ESMTP\r\n"
EHLO_REPLY = (
    b"250-sink.example\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n250-8BITMIME\r\n"
    b"250-STARTTLS\r\n250 ENHANCEDSTATUSCODES\r\n"
)
ENVELOPE_REPLIES = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
#: What the server answers a command, by verb (`Sink`).
SINK_REPLIES = {
    b"EHLO": EHLO_REPLY,
    b"MAIL": b"250 2.1.0 Ok\r\n",
    b"RCPT": b"250 2.1.5 Ok\r\n",
    b"RSET": b"250 2.0.0 Ok\r\n",
    b"NOOP": b"250 2.0.0 Ok\r\n",
    b"DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
    b"QUIT": b"221 2.0.0 Bye\r\n",
}
END_OF_DATA = b"\r\n.\r\n"


def rules_policy(rules):
    """``(inspect_extra, sections)`` of the content rules ``none``, ``asa`` or ``six``, as contentbench builds them."""
    if rules == "asa":
        return contentbench.asa_policy()
    if rules == "six":
        return contentbench.SIX_RULE, contentbench.SIX_MATCHES
    return "", ""


def message(kind, size):
    """The message a client sends (dot-stuffed, CRLF, ``.CRLF`` included): smtpload's or contentbench's."""
    if kind == "contentbench":
        # As contentbench's own load sends it (Harness.OWN_LOAD).
        return contentbench.build_message(size).replace("\n", "\r\n").encode() + b".\r\n"
    return smtpload.build_message(size)


class Gateway:
    """The benchmark policy's listener, built as the gateway builds it, on a memory reactor."""

    def __init__(self, protocol, log_path, rules="none"):
        from twisted.internet import reactor as real
        from twisted.internet.testing import MemoryReactor
        from twisted.logger import FileLogObserver, formatEventAsClassicLogText, globalLogBeginner

        from mailguard import service
        from mailguard.policy import load_policy
        from mailguard.tracker import SessionTracker

        self.tmp = tempfile.mkdtemp(prefix="mailguard-shellproto-")
        path = os.path.join(self.tmp, "policy.ini")
        with open(path, "w") as f:
            inspect_extra, sections = rules_policy(rules)
            # A rule with message criteria spools: a private directory of its own.
            spool = "spool-directory = %s\n" % os.path.join(self.tmp, "spool") if rules != "none" else ""
            f.write(policy_text(2525, 2526, protocol, spool, inspect_extra, sections))
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


def session(gw, size, messages, body, lockstep=False, sink=None):
    """One session of ``messages`` messages, the server side scripted; returns what each leg was sent (`_end`).

    Pipelined (MAIL, RCPT and DATA in one segment, their replies in one), or
    with ``lockstep`` one command or reply per segment, as Postfix's
    ``smtp-source`` sends them.  The server's replies are a fixed script (the
    gateway without content rules forwards every command as it comes), so
    ``sink`` is not used.
    """
    client, ct, server, st = gw.connect()
    server.dataReceived(GREETING)
    client.dataReceived(b"EHLO bench.example.org\r\n")
    server.dataReceived(EHLO_REPLY)
    group = envelope(size)
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
    return _end(client, ct, server, st)


def envelope(size):
    """The client's MAIL, RCPT and DATA of one message."""
    return b"MAIL FROM:<bench@example.org> SIZE=%d\r\nRCPT TO:<sink@example.org>\r\nDATA\r\n" % size


def _end(client, ct, server, st):
    """Close both legs; return ``(octets the server was sent, octets the client was sent)`` not yet cleared."""
    from twisted.internet import error
    from twisted.python import failure

    sent = st.value(), ct.value()
    server.connectionLost(failure.Failure(error.ConnectionDone()))
    client.connectionLost(failure.Failure(error.ConnectionDone()))
    return sent


class Sink:
    """The server's side of the backend leg: answers each command line the gateway sends, as an SMTP server.

    A gateway with content rules decides itself when the server sees
    ``DATA`` and the message (after the verdict), so its replies cannot be
    scripted.  ``feed`` takes what the gateway wrote and returns the reply
    octets; a message ends at ``CRLF.CRLF`` and is answered ``250 ... queued
    as``.  With ``keep``, the messages received (``.CRLF`` included) are
    kept in ``messages`` for `check`; otherwise only counted.
    """

    def __init__(self, keep=False):
        self.buffer = b""
        self.pieces = None  # the message so far while in DATA, else None
        self.tail = b""  # its last four octets, where CRLF.CRLF may begin
        self.count = 0
        self.messages = [] if keep else None

    def feed(self, data):
        """What the gateway wrote to the server; returns the server's replies."""
        out = []
        while data:
            if self.pieces is None:
                data = self._commands(data, out)
            else:
                data = self._message(data, out)
        return b"".join(out)

    def _commands(self, data, out):
        buffer = self.buffer + data
        start = 0
        while True:
            end = buffer.find(b"\r\n", start)
            if end < 0:
                self.buffer = buffer[start:]
                return b""
            verb = buffer[start : start + 4].upper()
            out.append(SINK_REPLIES.get(verb, b"502 5.5.2 Error: command not recognized\r\n"))
            start = end + 2
            if verb == b"DATA":
                self.buffer, self.pieces, self.tail = b"", [], b"\r\n"
                return buffer[start:]

    def _message(self, data, out):
        # Only the end of a write is looked at (no search through the
        # message, which would cost more than some of what is measured): the
        # gateway writes nothing after a message's end before the reply.  If
        # it ever did, the message would never be answered, which `check`
        # reports.
        if self.messages is not None:
            self.pieces.append(data)
        end = (self.tail + data[-5:])[-5:]
        if end != END_OF_DATA:
            self.tail = end[-4:]
            return b""
        if self.messages is not None:
            self.messages.append(b"".join(self.pieces))
        self.pieces = None
        out.append(b"250 2.0.0 Ok: queued as 4XyZ%05d\r\n" % self.count)
        self.count += 1
        return b""


def _pump(server, st, sink):
    """Answer what the gateway wrote to the server until it writes nothing more.

    A spool larger than what the gateway writes at once is sent by a pull
    producer on the server transport: it is asked for more here, as the
    reactor asks it when the socket drained.
    """
    while True:
        written = st.value()
        if written:
            st.clear()
            answer = sink.feed(written)
            if answer:
                server.dataReceived(answer)
        elif st.producer is not None and not st.streaming:
            st.producer.resumeProducing()
        else:
            return


def reactive_session(gw, size, messages, body, lockstep=False, sink=None):
    """One session of ``messages`` messages, the server answering what it is sent (`Sink`).

    Every command and piece of the message is answered before the next
    goes: the client waits for the 354 and the end-of-data reply as
    smtp-source does.  Returns ``(sink, octets the client was sent)``.
    """
    client, ct, server, st = gw.connect()
    sink = sink or Sink()

    def send(data):
        client.dataReceived(data)
        _pump(server, st, sink)

    server.dataReceived(GREETING)
    send(b"EHLO bench.example.org\r\n")
    group = envelope(size)
    commands = group.splitlines(keepends=True) if lockstep else [group]
    pieces = _pieces(body)
    for _ in range(messages):
        for command in commands:
            send(command)
        for piece in pieces:
            send(piece)
    send(b"QUIT\r\n")
    return sink, _end(client, ct, server, st)[1]


@functools.lru_cache(maxsize=1)
def _pieces(body):
    """``body`` in the 64 KiB segments a client sends, cut once (cutting it costs as much as some of what is measured)."""
    return [body[start : start + 65536] for start in range(0, len(body), 65536)]


def check(gw, run, size, body, lockstep, messages=3):
    """One session of ``messages`` messages: SystemExit unless each reached the server whole, once, and got a 250.

    So that a figure cannot measure a broken path (a message refused, lost,
    cut or sent twice).
    """
    if run is reactive_session:
        sink = Sink(keep=True)
        replies = reactive_session(gw, size, messages, body, lockstep, sink)[1]
        received = sink.messages
    else:
        wire, replies = session(gw, size, messages, body, lockstep)
        head, tail = b"EHLO bench.example.org\r\n", b"QUIT\r\n"
        ok = wire.startswith(head) and wire.endswith(tail)
        received = wire[len(head) : -len(tail)].split(envelope(size))[1:] if ok else []
    bad = sum(1 for m in received if m != body)
    queued = replies.count(b"250 2.0.0 Ok: queued as")
    refused = [line for line in replies.split(b"\r\n") if line[:1] in (b"4", b"5")]
    if len(received) != messages or bad or queued != messages or refused:
        raise SystemExit("broken path: the server received %d of %d messages (%d not as sent), the client got "
                         "%d of %d 250 replies at end of data%s" % (
                             len(received), messages, bad, queued, messages,
                             ", and %r" % refused[:3] if refused else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--messages", type=int, default=10)
    parser.add_argument("--sessions", type=int, default=300)
    parser.add_argument("--protocol", default="esmtp")
    parser.add_argument("--rules", choices=("none", "asa", "six"), default="none",
                        help="content rules: none, the ASA default map or six matches (as bench/contentbench.py)")
    parser.add_argument("--message", choices=("smtpload", "contentbench"), default="smtpload",
                        help="the message: smtpload's (header, lines of x) or contentbench's (multipart, text and "
                        "a base64 attachment)")
    parser.add_argument("--server", choices=("script", "reactive"), default=None,
                        help="the server's replies: a fixed script, or each command answered as it comes (the "
                        "default with --rules asa or six, which need it)")
    parser.add_argument("--lockstep", action="store_true", help="one command or reply per segment (smtp-source)")
    parser.add_argument("--idle", type=int, default=100, help="sessions kept open and idle meanwhile")
    parser.add_argument("--log", default=None, help="the log file (default: a temporary one)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sort", default="tottime", choices=("tottime", "cumulative"),
                        help="--profile's order: own time, or time including the callees")
    parser.add_argument("--once", action="store_true",
                        help="run --sessions sessions once, untimed (for valgrind: instructions per message are "
                             "the difference between --messages N and --messages 0, over sessions x N)")
    args = parser.parse_args(argv)
    server_kind = args.server or ("script" if args.rules == "none" else "reactive")
    if server_kind == "script" and args.rules != "none":
        parser.error("--rules %s spools the message: the server must be --server reactive" % args.rules)
    run = session if server_kind == "script" else reactive_session

    gw = Gateway(args.protocol, args.log, args.rules)
    body = message(args.message, args.size)
    for _ in range(args.idle):  # sessions that stay open, as a loaded gateway has them
        client, ct, server, st = gw.connect()
        server.dataReceived(GREETING)
        client.dataReceived(b"EHLO idle.example.org\r\n")
        server.dataReceived(EHLO_REPLY)
    # Warm up (imports, caches), then check the path; both the same whatever
    # --messages, so that they cancel out of the difference --once is for.
    for _ in range(20):
        run(gw, args.size, 2, body, args.lockstep)
    check(gw, run, args.size, body, args.lockstep)
    if args.once:
        for _ in range(args.sessions):
            run(gw, args.size, args.messages, body, args.lockstep)
        return
    best = {}
    for messages in (args.messages, 0):
        runs = []
        for _ in range(5):
            t = time.process_time()
            for _ in range(args.sessions):
                run(gw, args.size, messages, body, args.lockstep)
            runs.append((time.process_time() - t) / args.sessions)
        best[messages] = sorted(runs)[len(runs) // 2]
    per_message = (best[args.messages] - best[0]) / max(args.messages, 1)
    label = args.protocol
    if (args.rules, args.message, run) != ("none", "smtpload", session):
        label += " (rules %s, %s message, %s server)" % (args.rules, args.message, server_kind)
    print("%s, %d-octet messages, %d per session: %.1f us per session, of which setup+EHLO+QUIT %.1f us; "
          "%.1f us per message (medians of 5)" % (
              label, len(body) - 3, args.messages, best[args.messages] * 1e6, best[0] * 1e6, per_message * 1e6))
    if args.profile:
        profile(gw, run, args, body)


def profile(gw, run, args, body):
    """Print cProfile's breakdown of 100 sessions, the Python calls per message and the top functions per message."""
    stats = {}
    for messages in (args.messages, 0):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            run(gw, args.size, messages, body, args.lockstep)
        prof.disable()
        stats[messages] = pstats.Stats(prof)
    stats[args.messages].sort_stats(args.sort).print_stats(35)
    count = 100 * max(args.messages, 1)
    print("Python calls per message: %.1f" % ((stats[args.messages].total_calls - stats[0].total_calls) / count))
    print(profile_per_message(stats[args.messages], stats[0], count, args.sort))

def profile_per_message(with_messages, without, count, sort, top=25):
    """The ``top`` functions by ``sort`` of the profile ``with_messages`` minus ``without``, over ``count`` messages.

    What sessions cost whatever their messages (connection, EHLO, QUIT)
    cancels out: what is left is the cost of a message.
    """
    base = without.stats
    rows = []
    for where, (_, calls, own, total, _) in with_messages.stats.items():
        _, calls0, own0, total0, _ = base.get(where, (0, 0, 0.0, 0.0, None))
        rows.append(((calls - calls0) / count, (own - own0) / count * 1e6, (total - total0) / count * 1e6, where))
    rows.sort(key=lambda r: r[2] if sort == "cumulative" else r[1], reverse=True)
    lines = ["Per message (with messages minus without), by %s:" % sort,
             "%10s %10s %10s  function" % ("calls", "own us", "incl us")]
    for calls, own, total, (path, line, name) in rows[:top]:
        lines.append("%10.1f %10.2f %10.2f  %s:%d(%s)" % (calls, own, total, _short(path), line, name))
    return "\n".join(lines)


def _short(path):
    """``path`` relative to the tree, or its last two parts."""
    if path.startswith(os.getcwd() + os.sep):
        return os.path.relpath(path)
    return "/".join(path.split(os.sep)[-2:])

if __name__ == "__main__":
    main()
