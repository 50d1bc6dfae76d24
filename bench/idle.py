"""Concurrent idle sessions: how many the gateway holds, and its memory per session.

    python bench/idle.py [--counts 1000 5000 10000] [--rows b,e] [--hold 5]
                         [--markdown FILE] [--installed]

For each count and each row, a fresh relay process is started in front of
``bench/smtpsink.py``; a holder process (this script with ``--holder``) opens
that many connections, waits until every one has been greeted (the sink's
220 relayed to it), keeps them idle for ``--hold`` seconds and checks that
none was closed.  The relay's RSS (from /proc/<pid>/statm, its children
included) is read before and after; the difference divided by the sessions
is the RSS per session.

Rows: (b) the plain Twisted relay (``bench/plainrelay.py``), (d) mailguard
``protocol = tcp``, (e) mailguard ``protocol = esmtp``, (g) mailguard esmtp
with ``[global] workers = 2`` (its RSS is that of the supervisor and both
workers).

Every relayed session costs the relay two file descriptors; the script
raises RLIMIT_NOFILE to the hard limit and, when the hard limit is too low
for a count, says so and measures the most sessions the limit allows in
one process.  Row (g) spreads the sessions over two processes, so it holds
twice as many under the same limit.
"""

import argparse
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    HERE,
    Children,
    check_policy,
    cpu_seconds,
    free_port,
    gateway_env,
    machine_info,
    mailguard_args,
    policy_text,
    raise_nofile,
    rss_bytes,
    wait_greeting,
)

ROWS = {
    "b": "plain Twisted relay (portforward)",
    "d": "mailguard protocol = tcp",
    "e": "mailguard esmtp",
    "g": "mailguard esmtp, workers = 2",
}
#: Descriptors a relay process needs besides two per session.
FD_MARGIN = 64
#: Sessions opened and closed before measuring, to warm every process up.
WARM_SESSIONS = 200


# -- the holder (a child process) ----------------------------------------------


def holder(port, count, hold, in_flight=256, timeout=120.0):
    """Open ``count`` sessions, wait for every greeting, hold them, report on stdout.

    Prints ``greeted N seconds failed reasons`` once all are greeted (or
    time ran out), then, after ``hold`` seconds, ``held N``; then keeps the
    sessions open until it is ended.
    """
    raise_nofile()
    sel = selectors.DefaultSelector()
    pending = count
    connecting = 0
    greeted = 0
    failed = 0
    reasons = {}
    socks = []
    start = time.monotonic()
    deadline = start + timeout

    def open_one():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect_ex(("127.0.0.1", port))
        except OSError as e:
            s.close()
            raise e
        sel.register(s, selectors.EVENT_READ, bytearray())
        socks.append(s)

    while (pending or connecting) and time.monotonic() < deadline:
        while pending and connecting < in_flight:
            try:
                open_one()
            except OSError as e:
                reasons[str(e)] = reasons.get(str(e), 0) + 1
                failed += 1
                pending -= 1
                continue
            pending -= 1
            connecting += 1
        for key, _ in sel.select(timeout=1.0):
            s, buf = key.fileobj, key.data
            try:
                data = s.recv(4096)
            except OSError as e:
                data = b""
                reasons[str(e)] = reasons.get(str(e), 0) + 1
            if not data:
                sel.unregister(s)
                connecting -= 1
                failed += 1
                if not buf:
                    reasons.setdefault("closed before greeting", 0)
                    reasons["closed before greeting"] += 1
                continue
            buf += data
            if b"\n" in buf:
                sel.unregister(s)
                connecting -= 1
                if buf.startswith(b"220"):
                    greeted += 1
                else:
                    failed += 1
                    text = "greeting %r" % bytes(buf[:40])
                    reasons[text] = reasons.get(text, 0) + 1
    elapsed = time.monotonic() - start
    print("greeted %d %.3f %d %r" % (greeted, elapsed, failed, reasons), flush=True)
    time.sleep(hold)
    # Anything readable now is an EOF or an unexpected byte: not held.
    alive = 0
    check = selectors.DefaultSelector()
    for s in socks:
        try:
            check.register(s, selectors.EVENT_READ)
        except (ValueError, OSError):
            pass
    readable = {key.fileobj for key, _ in check.select(timeout=0.5)}
    for s in socks:
        if s not in readable and s.fileno() >= 0:
            alive += 1
    print("held %d" % min(alive, greeted), flush=True)
    time.sleep(3600)


# -- the driver -----------------------------------------------------------------------


class Idle:
    """Starts the sink, the relays and the holders; collects RSS per session."""

    def __init__(self, args):
        self.args = args
        self.children = Children()
        self.children.install()
        self.tmp = tempfile.mkdtemp(prefix="mailguard-idle-")
        import shutil

        self.children.cleanups.append(lambda: shutil.rmtree(self.tmp, ignore_errors=True))
        self.source = not args.installed
        self.results = []
        self.notes = []

    def start_relay(self, row, sink):
        port = free_port()
        log = os.path.join(self.tmp, "%s-%d.log" % (row, port))
        if row == "b":
            proc = self.children.spawn(
                [sys.executable, os.path.join(HERE, "plainrelay.py"), str(port), str(sink)], "plainrelay", log
            )
        else:
            protocol = {"d": "tcp", "e": "esmtp", "g": "esmtp"}[row]
            policy = os.path.join(self.tmp, "%s-%d.ini" % (row, port))
            with open(policy, "w") as f:
                f.write(policy_text(port, sink, protocol, global_extra="workers = 2\n" if row == "g" else ""))
            ok, why = check_policy(policy, self.source)
            if not ok:
                raise RuntimeError("policy refused: " + why)
            proc = self.children.spawn(
                mailguard_args(policy, log + ".twistd"), "mailguard", log, env=gateway_env(self.source), cwd=self.tmp
            )
        wait_greeting(port, proc, timeout=30)
        return port, proc

    def measure(self, row, count, sink):
        port, proc = self.start_relay(row, sink)
        try:
            # Warm up first: code paths allocate once on first use, in every
            # worker process, and that is not per-session memory.
            warm = self.children.spawn(
                [sys.executable, os.path.abspath(__file__), "--holder", str(port), str(WARM_SESSIONS),
                 "--hold", "0"],
                "holder", os.path.join(self.tmp, "warm.log"), stdout=subprocess.PIPE,
            )
            warm.stdout.readline()
            warm.stdout.readline()
            self.children.stop(warm)
            time.sleep(1.0)
            rss0 = rss_bytes(proc.pid)
            cpu0 = cpu_seconds(proc.pid)
            h = self.children.spawn(
                [sys.executable, os.path.abspath(__file__), "--holder", str(port), str(count),
                 "--hold", str(self.args.hold)],
                "holder",
                os.path.join(self.tmp, "holder.log"),
                stdout=subprocess.PIPE,
            )
            line = h.stdout.readline().decode().split(" ", 4)
            if not line or line[0] != "greeted":
                raise RuntimeError("holder failed (see %s)" % os.path.join(self.tmp, "holder.log"))
            greeted, secs, failed, reasons = int(line[1]), float(line[2]), int(line[3]), line[4].strip()
            time.sleep(1.0)
            rss1 = rss_bytes(proc.pid)
            cpu1 = cpu_seconds(proc.pid)
            held_line = h.stdout.readline().decode().split()
            held = int(held_line[1]) if held_line and held_line[0] == "held" else 0
            rss2 = rss_bytes(proc.pid)
            self.children.stop(h)
            alive = proc.poll() is None
            return {
                "row": row, "count": count, "greeted": greeted, "failed": failed, "reasons": reasons,
                "held": held, "connect_s": secs, "rss0": rss0, "rss1": max(rss1, rss2),
                "per_session": (max(rss1, rss2) - rss0) / greeted if greeted else None,
                "cpu_per_1000": (cpu1 - cpu0) / greeted * 1000 if greeted else None,
                "relay_alive": alive,
            }
        finally:
            self.children.stop(proc)

    def run(self):
        soft, hard = raise_nofile()
        self.limit = (soft, hard)
        sink = free_port()
        sink_proc = self.children.spawn(
            [sys.executable, os.path.join(HERE, "smtpsink.py"), str(sink)], "smtpsink",
            os.path.join(self.tmp, "sink.log"),
        )
        wait_greeting(sink, sink_proc)
        rows = [r for r in self.args.rows.split(",") if r in ROWS]
        for want in self.args.counts:
            count = want
            need = 2 * count + FD_MARGIN
            if need > hard and any(row != "g" for row in rows):
                count = (hard - FD_MARGIN) // 2
                note = ("%d sessions: a relay process needs 2 descriptors per session (~%d), the hard "
                        "RLIMIT_NOFILE is %d and this process may not raise it; one-process rows measured %d "
                        "instead" % (want, need, hard, count))
                if "g" in rows:
                    note += "; row (g) holds all %d in 2 processes" % want
                self.notes.append(note)
                print(note, flush=True)
            for row in rows:
                # Two workers share the sessions: each needs about half the descriptors.
                n = want if row == "g" and want + FD_MARGIN <= hard else count
                r = self.measure(row, n, sink)
                r["wanted"] = want
                self.results.append(r)
                print("%-2s %6d sessions: greeted %d (failed %d) in %.1f s, held %d; RSS %.1f -> %.1f MiB, "
                      "%s per session" % (
                          row, n, r["greeted"], r["failed"], r["connect_s"], r["held"], r["rss0"] / 2**20,
                          r["rss1"] / 2**20, ("%.1f KiB" % (r["per_session"] / 1024)) if r["per_session"] else "-"),
                      flush=True)
                if r["failed"]:
                    print("   failures: %s" % r["reasons"], flush=True)

    def render(self, markdown=False):
        lines = []
        if markdown:
            lines.append("| sessions | row | greeted / held | connect time | RSS before -> after | RSS per session | x (b) | CPU s / 1000 sessions |")
            lines.append("|---|---|---|---|---|---|---|---|")
        else:
            lines.append("%-9s %-36s %-15s %-9s %-20s %-12s %-6s %s" % (
                "sessions", "row", "greeted/held", "connect", "RSS MiB", "per session", "x(b)", "CPU s/1000"))
        for r in self.results:
            base = next((o for o in self.results if o["row"] == "b" and o["wanted"] == r["wanted"]), None)
            ratio = "-"
            if base and base.get("per_session") and r.get("per_session"):
                ratio = "%.2f" % (r["per_session"] / base["per_session"])
            per = "%.1f KiB" % (r["per_session"] / 1024) if r["per_session"] else "-"
            cpu = "%.2f" % r["cpu_per_1000"] if r["cpu_per_1000"] is not None else "-"
            sessions = "%d" % r["count"] + ("" if r["count"] == r["wanted"] else " (of %d)" % r["wanted"])
            rss = "%.1f -> %.1f" % (r["rss0"] / 2**20, r["rss1"] / 2**20)
            gh = "%d / %d" % (r["greeted"], r["held"])
            if markdown:
                lines.append("| %s | (%s) %s | %s | %.1f s | %s MiB | %s | %s | %s |" % (
                    sessions, r["row"], ROWS[r["row"]], gh, r["connect_s"], rss, per, ratio, cpu))
            else:
                lines.append("%-9s %-36s %-15s %-9s %-20s %-12s %-6s %s" % (
                    sessions, "(%s) %s" % (r["row"], ROWS[r["row"]]), gh, "%.1f s" % r["connect_s"], rss, per,
                    ratio, cpu))
        for note in self.notes:
            lines.append(("- " if markdown else "note: ") + note)
        return "\n".join(lines)

    def close(self):
        self.children.stop_all()
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--holder", nargs=2, type=int, metavar=("PORT", "COUNT"), help=argparse.SUPPRESS)
    parser.add_argument("--counts", nargs="*", type=int, default=[1000, 5000, 10000])
    parser.add_argument("--rows", default="b,e", help="comma-separated rows among b, d, e, g (default b,e)")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds to keep the sessions idle")
    parser.add_argument("--installed", action="store_true", help="run the installed mailguard, not the source tree")
    parser.add_argument("--markdown", help="also write the table as Markdown to this file")
    args = parser.parse_args(argv)
    if args.holder:
        holder(args.holder[0], args.holder[1], args.hold)
        return
    idle = Idle(args)
    try:
        info = machine_info()
        print("machine: %s x%s, %s, Python %s, Twisted %s; RLIMIT_NOFILE soft/hard %d/%d (after raising)" % (
            info.get("cpu", "?"), info["nproc"], info.get("memory", "?"), info["python"], info["twisted"],
            *raise_nofile()), flush=True)
        idle.run()
        text = idle.render()
        print()
        print(text)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(idle.render(markdown=True) + "\n")
    finally:
        idle.close()


if __name__ == "__main__":
    main()
