"""Soak run: many concurrent clients with random faults through a real gateway process.

    python bench/soak.py [--clients N] [--seconds M] [--seed S] [--installed]
                         [--json FILE] [--keep]

Not a test: a run of a few minutes whose figures go in a report.  It starts
``twistd mailguard`` (esmtp inspection, audit trail on, status endpoint on,
``backend = embedded`` delivering into a fresh Maildir) as a child process on
loopback, warms it up, then runs N client threads for M seconds.  Each
session picks one scenario at random: clean messages, pipelined ones, slow
writers, junk and over-long command lines, bare newlines in the body, SMTP
smuggling attempts, non-SMTP lines, early talkers, endless lines, clients
that abort (FIN or RST) mid-message or between commands, and clients that
stall mid-message past the idle timeout.

Afterwards it checks, and exits 1 if any check fails:

- every message the gateway accepted (a 2xx to its end of data) is in the
  Maildir exactly once and intact (SHA-256 of the stored content against
  what the client meant to send);
- no message that was aborted, refused or timed out is in the Maildir
  (nothing half-delivered), and no file exists that a client did not send
  (nothing smuggled);
- the session table is empty (``/sessions`` of the status endpoint) and the
  log holds as many ``SESS_AUDIT_TRAIL`` stops as ``SESS_AUDIT_TRAIL_START``
  starts;
- the gateway's file descriptors (/proc/<pid>/fd) are back to their count
  after warm-up, and its RSS is back near it.

Every process started is ended on exit, error or Ctrl-C (bench/common.py).
"""

import argparse
import collections
import hashlib
import itertools
import json
import os
import random
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Children, free_port, gateway_env, mailguard_args, raise_nofile, wait_greeting  # noqa: E402

#: Seconds a client waits for any one reply before giving up on the session.
REPLY_TIMEOUT = 30.0
#: The rule's idle timeout; the "stall" scenario sleeps past it.
IDLE_TIMEOUT = 4
#: Allowed RSS growth between warm-up and the end, in bytes ("back near its start").
RSS_SLACK = 32 * 1024 * 1024

#: Scenario weights.
SCENARIOS = {
    "clean": 20,
    "pipelined": 10,
    "slow": 6,
    "junk": 8,
    "long_line": 5,
    "bare_newlines": 8,
    "smuggle": 8,
    "rset_then_mail": 5,
    "abort_fin": 6,
    "abort_rst": 6,
    "abort_command": 4,
    "non_smtp": 3,
    "pregreet": 3,
    "endless_line": 2,
    "stall": 1,
}

SMUGGLE_VARIANTS = (b"\n.\n", b"\n.\r", b"\r.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n",
                    b"\r\n\x00.\r\n", b"\r\n.\r\r\n", b"\r\r\n.\r\r\n")


def policy(port, status_port, maildir):
    """The soak policy: thresholds out of the way, audit trail and status on."""
    return (
        "[global]\n"
        "max-incomplete-high = 100000\nmax-incomplete-low = 100000\n"
        "one-minute-high = 10000000\none-minute-low = 10000000\n"
        "max-incomplete-host = 100000\n"
        "finwait-time = 5\n"
        "alert = on\naudit-trail = on\n"
        "status = tcp:%d:interface=127.0.0.1\n"
        "\n[inspect SOAK]\n"
        "protocol = esmtp\nmax-data = 2000000\ntimeout = %d\nbare-newline = normalize\n"
        "\n[listener soak]\n"
        "listen = tcp:%d:interface=127.0.0.1:backlog=1024\n"
        "backend = embedded\nmaildir = %s\ninspect = SOAK\n"
    ) % (status_port, IDLE_TIMEOUT, port, maildir)


# -- one client session ------------------------------------------------------------


class Closed(Exception):
    """The gateway closed the connection (what it said last is in ``args[0]``)."""


class Client:
    """A blocking SMTP client on a raw socket."""

    def __init__(self, port, greet=True):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.greeting = self.reply() if greet else None

    def send(self, data):
        self.sock.sendall(data)

    def reply(self):
        """One complete reply (multi-line replies joined)."""
        out = b""
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise Closed(out + self.buf)
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            out += line + b"\n"
            if line[3:4] != b"-":
                return out

    def command(self, line):
        self.send(line + b"\r\n")
        return self.reply()

    def rest(self):
        """Everything until the gateway closes."""
        out, self.buf = self.buf, b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return out
            out += chunk

    def abort(self, rst):
        if rst:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self):
        self.sock.close()


def make_body(rng, ident, bare=False):
    """A message: ``(bytes on the wire, what the Maildir must hold)``.

    Lines starting with "." are dot-stuffed on the wire.  With ``bare`` some
    line ends are a lone LF or CR (never before an empty line, which would
    turn CR + LF into one CRLF), and no line starts with ".".
    """
    lines = [b"X-Soak-ID: " + ident, b"Subject: soak " + ident, b""]
    size = rng.choice((200, 2000, 20000, 60000, 300000)) * rng.uniform(0.5, 1.5)
    total = 0
    while total < size:
        n = rng.choice((0, 10, 60, 76, 200, 998))
        text = bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789 .,:-") for _ in range(min(n, 80)))
        text = (text * (n // 80 + 1))[:n] if n else b""
        if not bare and rng.random() < 0.05:
            text = b"." + text[:997]
        if bare:
            text = text.lstrip(b".") or b"x"
        lines.append(text)
        total += len(text) + 2
    wire = []
    for i, line in enumerate(lines):
        stuffed = b"." + line if line.startswith(b".") else line
        end = b"\r\n"
        if bare and i > 2 and i < len(lines) - 1 and lines[i + 1] and rng.random() < 0.2:
            end = rng.choice((b"\n", b"\r"))
        wire.append(stuffed + end)
    stored = b"".join(line + b"\n" for line in lines)
    return b"".join(wire), stored


def envelope(client, ident, pipelined=False):
    """EHLO, MAIL, RCPT, DATA; raises on any unexpected reply."""
    expect(client.command(b"EHLO soak.example"), b"250")
    sender = b"MAIL FROM:<" + ident + b"@soak.example>"
    if pipelined:
        client.send(sender + b"\r\nRCPT TO:<rcpt@soak.example>\r\nDATA\r\n")
        for code in (b"250", b"250", b"354"):
            expect(client.reply(), code)
    else:
        expect(client.command(sender), b"250")
        expect(client.command(b"RCPT TO:<rcpt@soak.example>"), b"250")
        expect(client.command(b"DATA"), b"354")


class Unexpected(Exception):
    """A reply the scenario did not expect."""


def expect(reply, code):
    if not reply.startswith(code):
        raise Unexpected("expected %s, got %r" % (code.decode(), reply[:120]))
    return reply


class Ledger:
    """What the clients did, shared by the threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.accepted = {}  # ident -> sha256 of what the Maildir must hold (or None: check by structure)
        self.not_delivered = set()  # idents that must never reach the Maildir
        self.ambiguous = set()  # end of data sent but no reply seen
        self.scenarios = collections.Counter()
        self.outcomes = collections.Counter()
        self.errors = []
        self.bytes_sent = 0

    def note(self, scenario, outcome, error=None):
        with self.lock:
            self.scenarios[scenario] += 1
            self.outcomes[outcome] += 1
            if error is not None and len(self.errors) < 50:
                self.errors.append("%s: %s" % (scenario, error))


def send_message(client, ledger, ident, wire, stored, check_hash=True, writer=None):
    """Send a body and its end of data; record what the reply means."""
    try:
        (writer or client.send)(wire + b".\r\n")
        with ledger.lock:
            ledger.bytes_sent += len(wire) + 3
        reply = client.reply()
    except (OSError, Closed):
        with ledger.lock:
            ledger.ambiguous.add(ident)
        raise
    if reply.startswith(b"2"):
        with ledger.lock:
            ledger.accepted[ident] = hashlib.sha256(stored).hexdigest() if check_hash else None
        return True
    with ledger.lock:
        ledger.not_delivered.add(ident)
    raise Unexpected("end of data answered %r" % reply[:120])


def run_session(port, rng, ledger, serial, scenario=None):
    """One session of ``scenario`` (by default one picked at random)."""
    if scenario is None:
        scenario = rng.choices(list(SCENARIOS), weights=list(SCENARIOS.values()))[0]
    ident = b"%d-%08x" % (serial, rng.getrandbits(32))
    client = None
    try:
        if scenario == "pregreet":
            client = Client(port, greet=False)
            client.send(b"EHLO early.example\r\n")
            got = client.rest()
            # Refused (554), or the greeting won the race: both are fine.
            ok = got.startswith(b"554 5.5.1") or got.startswith(b"220")
            ledger.note(scenario, "pregreet_refused" if got.startswith(b"554") else "pregreet_raced",
                        None if ok else "got %r" % got[:120])
            return
        client = Client(port)
        expect(client.greeting, b"220")
        if scenario == "non_smtp":
            client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            got = client.rest()
            ledger.note(scenario, "closed", None if got.startswith(b"221 2.7.0") else "got %r" % got[:120])
            return
        if scenario == "endless_line":
            for _ in range(8):
                client.send(b"A" * 16384)
            expect(client.reply(), b"500 5.5.2")
            client.send(b"\r\n")
            expect(client.command(b"QUIT"), b"221")
            ledger.note(scenario, "line_too_long")
            return
        if scenario == "abort_command":
            expect(client.command(b"EHLO soak.example"), b"250")
            client.send(b"MAIL FROM:<" + ident + b"@soak.example>\r\n")
            client.abort(rng.random() < 0.5)
            client = None
            ledger.note(scenario, "aborted")
            return
        if scenario == "junk":
            for line in rng.sample([b"EXPN root", b"XYZZY", b"TURN", b"WIZ", b"DEBUG", b"XEXCH50 1 2"], 3):
                expect(client.command(line), b"5")
        if scenario == "long_line":
            expect(client.command(b"NOOP " + b"n" * rng.randint(1200, 5000)), b"500")
        if scenario == "rset_then_mail":
            expect(client.command(b"EHLO soak.example"), b"250")
            expect(client.command(b"MAIL FROM:<discard@soak.example>"), b"250")
            expect(client.command(b"RSET"), b"250")
        envelope(client, ident, pipelined=scenario == "pipelined")
        bare = scenario == "bare_newlines"
        wire, stored = make_body(rng, ident, bare=bare)
        if scenario in ("abort_fin", "abort_rst", "stall"):
            cut = rng.randrange(1, len(wire))
            client.send(wire[:cut])
            with ledger.lock:
                ledger.not_delivered.add(ident)
            if scenario == "stall":
                time.sleep(IDLE_TIMEOUT + 1.5)
                got = client.rest()
                ledger.note(scenario, "idle_timeout",
                            None if got.startswith(b"421 4.4.2") else "got %r" % got[:120])
                return
            time.sleep(rng.random() * 0.05)
            client.abort(scenario == "abort_rst")
            client = None
            ledger.note(scenario, "aborted")
            return
        if scenario == "smuggle":
            variant = rng.choice(SMUGGLE_VARIANTS)
            wire = (b"X-Soak-ID: " + ident + b"\r\n\r\nhello" + variant + b"MAIL FROM:<evil@soak.example>\r\n"
                    b"RCPT TO:<victim@soak.example>\r\nDATA\r\nX-Soak-Smuggled: " + ident + b"\r\n\r\nspoof\r\n")
            send_message(client, ledger, ident, wire, b"", check_hash=False)
        elif scenario == "slow":

            def dribble(data):
                step = max(1, len(data) // 40)
                for i in range(0, len(data), step):
                    client.send(data[i : i + step])
                    time.sleep(0.02)

            send_message(client, ledger, ident, wire, stored, writer=dribble)
        else:
            send_message(client, ledger, ident, wire, stored)
        expect(client.command(b"QUIT"), b"221")
        ledger.note(scenario, "delivered")
    except (Unexpected, Closed, OSError) as e:
        ledger.note(scenario, "error", "%s: %s" % (type(e).__name__, e))
    finally:
        if client is not None:
            client.close()


def worker(port, seed, deadline, ledger, serials):
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        run_session(port, rng, ledger, next(serials))


# -- measurements ---------------------------------------------------------------------


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def rss(pid):
    with open("/proc/%d/statm" % pid) as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sessions(status_port):
    with urllib.request.urlopen("http://127.0.0.1:%d/sessions" % status_port, timeout=10) as r:
        return json.load(r)["sessions"]


def wait_empty(status_port, timeout):
    deadline = time.monotonic() + timeout
    table = None
    while time.monotonic() < deadline:
        table = sessions(status_port)
        if not table:
            return []
        time.sleep(0.2)
    return table


def check_maildir(maildir, ledger):
    """Compare the Maildir with the ledger; return (figures, problems)."""
    found = collections.defaultdict(list)
    problems = []
    files = 0
    for sub in ("new", "cur", "tmp"):
        path = os.path.join(maildir, sub)
        if not os.path.isdir(path):
            continue
        for name in os.listdir(path):
            files += 1
            with open(os.path.join(path, name), "rb") as f:
                data = f.read()
            if sub == "tmp":
                problems.append("half-written file in tmp/: %s" % name)
            first = data.split(b"\n", 1)[0]
            if not first.startswith(b"X-Soak-ID: "):
                problems.append("file %s not sent by any client (smuggled?): %r" % (name, data[:80]))
                continue
            found[first[11:]].append(data)
    intact = 0
    for ident, digest in ledger.accepted.items():
        copies = found.get(ident, [])
        if len(copies) != 1:
            problems.append("accepted message %s found %d times" % (ident.decode(), len(copies)))
            continue
        if digest is None:
            data = copies[0]
            if b"X-Soak-Smuggled: " + ident not in data or data.count(b"X-Soak-ID: ") != 1:
                problems.append("smuggling message %s stored wrongly: %r" % (ident.decode(), data[:120]))
            else:
                intact += 1
        elif hashlib.sha256(copies[0]).hexdigest() != digest:
            problems.append("accepted message %s corrupted" % ident.decode())
        else:
            intact += 1
    half = [i for i in ledger.not_delivered if i in found]
    for ident in half:
        problems.append("message %s was aborted/refused but is in the Maildir" % ident.decode())
    unknown = [i for i in found if i not in ledger.accepted and i not in ledger.not_delivered
               and i not in ledger.ambiguous]
    for ident in unknown:
        problems.append("message %s in the Maildir was never accepted" % ident.decode())
    return {"files": files, "accepted": len(ledger.accepted), "intact": intact,
            "ambiguous": len(ledger.ambiguous), "never_delivered": len(ledger.not_delivered)}, problems


def audit_counts(log_path):
    """SESS_AUDIT_TRAIL_START and SESS_AUDIT_TRAIL records in the log and its rotated parts (log.1, ...)."""
    starts = stops = 0
    directory, base = os.path.split(log_path)
    for name in os.listdir(directory):
        if name != base and not (name.startswith(base + ".") and name[len(base) + 1 :].isdigit()):
            continue
        with open(os.path.join(directory, name), "rb") as f:
            for line in f:
                if b"SESS_AUDIT_TRAIL_START:" in line:
                    starts += 1
                elif b"SESS_AUDIT_TRAIL:" in line:
                    stops += 1
    return starts, stops


# -- main --------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--seconds", type=float, default=20, help="how long the clients run (default 20)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--installed", action="store_true", help="run the installed mailguard, not the source tree")
    parser.add_argument("--json", help="also write the figures as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (policy, log, Maildir)")
    args = parser.parse_args(argv)

    raise_nofile()
    children = Children()
    children.install()
    work = tempfile.mkdtemp(prefix="mailguard-soak-")
    maildir = os.path.join(work, "maildir")
    log_path = os.path.join(work, "gateway.log")
    port, status_port = free_port(), free_port()
    policy_path = os.path.join(work, "soak.ini")
    with open(policy_path, "w") as f:
        f.write(policy(port, status_port, maildir))
    try:
        proc = children.spawn(mailguard_args(policy_path, log_path), "gateway",
                              log_path=os.path.join(work, "gateway.err"),
                              env=gateway_env(not args.installed), cwd=work)
        wait_greeting(port, proc)
        pid = proc.pid

        # Warm up: a few clean sessions, then take the baseline.
        warm = Ledger()
        serials = itertools.count()
        rng = random.Random(args.seed ^ 0x5EED)
        for _ in range(20):
            run_session(port, rng, warm, next(serials), "clean")
        left = wait_empty(status_port, 30)
        time.sleep(1.0)  # the status request's own connection is gone too
        base_fds, base_rss = fd_count(pid), rss(pid)

        ledger = Ledger()
        ledger.accepted.update(warm.accepted)
        peak = {"rss": base_rss, "fds": base_fds}
        stop = threading.Event()

        def monitor():
            while not stop.wait(0.5):
                try:
                    peak["rss"] = max(peak["rss"], rss(pid))
                    peak["fds"] = max(peak["fds"], fd_count(pid))
                except OSError:
                    return

        watcher = threading.Thread(target=monitor, daemon=True)
        watcher.start()
        started = time.monotonic()
        deadline = started + args.seconds
        threads = [threading.Thread(target=worker, args=(port, args.seed * 1000 + i, deadline, ledger, serials),
                                    daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.seconds + 4 * REPLY_TIMEOUT)
        ran = time.monotonic() - started
        stuck = sum(t.is_alive() for t in threads)
        left = wait_empty(status_port, 30)
        stop.set()
        watcher.join(5)
        time.sleep(1.0)  # the last audit records reach the log; the status connection closes
        end_fds, end_rss = fd_count(pid), rss(pid)
        figures, problems = check_maildir(maildir, ledger)
        starts, stops = audit_counts(log_path)

        if ledger.outcomes["error"]:
            problems.append("%d sessions saw an unexpected reply or close (client_errors)" % ledger.outcomes["error"])
        if warm.outcomes["error"]:
            problems.append("warm-up sessions failed: %s" % warm.errors)
        if stuck:
            problems.append("%d client threads did not finish" % stuck)
        if left:
            problems.append("session table not empty: %d sessions" % len(left))
        # Every client session (and wait_greeting's probe) has its records.
        opened = sum(ledger.scenarios.values()) + sum(warm.scenarios.values()) + 1
        if starts != stops or starts != opened:
            problems.append("audit trail: %d starts, %d stops, %d sessions opened" % (starts, stops, opened))
        if end_fds > base_fds:
            problems.append("file descriptors: %d after warm-up, %d at the end" % (base_fds, end_fds))
        if end_rss > base_rss + RSS_SLACK:
            problems.append("RSS: %.1f MB after warm-up, %.1f MB at the end" % (base_rss / 2**20, end_rss / 2**20))
        if proc.poll() is not None:
            problems.append("the gateway exited with status %s" % proc.returncode)
        sessions_total = sum(ledger.scenarios.values())
        report = {
            "clients": args.clients, "seconds": round(ran, 1), "seed": args.seed,
            "sessions": sessions_total, "sessions_per_second": round(sessions_total / ran, 1),
            "megabytes_sent_as_data": round(ledger.bytes_sent / 2**20, 1),
            "scenarios": dict(sorted(ledger.scenarios.items())),
            "outcomes": dict(sorted(ledger.outcomes.items())),
            "maildir": figures,
            "audit_trail": {"starts": starts, "stops": stops, "client_sessions": opened},
            "session_table_after": len(left),
            "fds": {"after_warmup": base_fds, "peak": peak["fds"], "end": end_fds},
            "rss_mb": {"after_warmup": round(base_rss / 2**20, 1), "peak": round(peak["rss"] / 2**20, 1),
                       "end": round(end_rss / 2**20, 1)},
            "client_errors": ledger.errors,
            "problems": problems,
            "work_dir": work if args.keep else None,
        }
        print(json.dumps(report, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        print("soak: %s" % ("OK" if not problems else "FAILED (%d problems)" % len(problems)))
        return 1 if problems else 0
    finally:
        children.stop_all()
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
