"""Content rules under load: esmtp with the ASA default map and with six matches, against no rules (issue 15).

    python bench/contentbench.py [--sizes 100KB 1MB] [--sessions 20] [--runs 3]
                                 [--idle 2000] [--markdown FILE] [--json FILE]

Rows, each a mailguard process (``protocol = esmtp``) in front of Postfix's
``smtp-sink``:

  none   no content rules (the data path of bench.py's row e)
  asa    the ASA default map, read from ``etc/asa-esmtp.ini`` (its inspect
         keys and its seven ``[match]`` sections)
  six    six matches: a command length, a sender address AND a Reply-To
         header regex, a Subject regex, a body regex, an attachment file
         name regex, a MIME content-type regex

and, to see where the time goes, rows of one match each (not run unless
named in ``--rows``): ``dlg`` a command length (dialogue, no spool), ``hdr``
a header line length (spooled, no regex), ``body`` one body regex,
``fname`` one file name regex.

Load: ``smtp-source -d -F FILE`` (Postfix), ``--sessions`` sessions, the
same message for every row: a multipart/mixed message of the given size,
half a ``text/plain`` part of prose lines (what the body regex reads), half a
base64 PDF attachment with a file name (what the file name regex reads).
No rule matches it, so every message is delivered.  A row with a message
criterion spools every message (see "Message filters" in the README), so
the comparison includes that cost.

Each figure is the median of ``--runs`` runs (rows interleaved within a
run); gateway CPU per message is utime+stime of the gateway process, from
/proc.  Before each run the script waits until no other benchmark
(``bench/bench.py`` or ``bench/idle.py``) runs, polling every 10 s until
``--quiet-until`` (UTC ``HH:MM``, or ``+MINUTES``: 30 by default), then
measures anyway and says so.

``--idle N`` also holds N idle sessions on a gateway with no rules and on
one with the six matches and reports the RSS per session of each (as
``bench/idle.py`` does).

This module also holds the plumbing ``bench/milterbench.py`` and
``bench/spoolrss.py`` share (`Harness`, `build_message`).
"""

import argparse
import base64
import configparser
import datetime
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    HERE,
    ROOT,
    Children,
    check_policy,
    cpu_seconds,
    cpu_steal,
    free_port,
    gateway_env,
    load_average,
    machine_info,
    mailguard_args,
    policy_text,
    process_tree,
    raise_nofile,
    rss_bytes,
    wait_greeting,
)

KB = 1024
MB = 1024 * 1024
SIZES = {"1KB": KB, "100KB": 100 * KB, "1MB": MB, "10MB": 10 * MB}
#: Messages per run, by size.
COUNTS = {"1KB": 1500, "100KB": 600, "1MB": 150, "10MB": 100}
#: What another benchmark looks like in the process list.
OTHER_BENCH = "bench/bench.py|bench/idle.py"
SENDER = "bench@example.com"
RECIPIENT = "sink@example.org"

WORDS = ("the quarterly figures are attached please review them before monday meeting budget forecast "
         "revenue margin team plan customer contract delivery schedule office project update notes "
         "thanks regards invoice summary draft final version agenda").split()

SIX_MATCHES = """
[match long-command]
cmd-line-length-gt = 512
action = drop-connection

[match ceo-fraud]
sender-address = (?i)@example\\.com$
header = (?i)^Reply-To:.*@freemail\\.example\\b
action = drop-connection

[match subject-words]
header = (?i)^Subject:.*\\b(lottery|viagra|casino|inheritance)\\b
action = reject

[match body-words]
body = (?i)\\b(wire transfer|gift cards?|bitcoin wallet|verify your password)\\b
action = reject

[match exe-attachment]
mime-filename = (?i)\\.(exe|scr|js|vbs|bat|cmd)$
action = reject

[match executable-type]
mime-content-type = (?i)^application/(x-msdownload|x-dosexec|x-msdos-program)$
action = reject
"""
SIX_RULE = "match = long-command, ceo-fraud, subject-words, body-words, exe-attachment, executable-type\n"


def build_message(size, seed=1):
    """A multipart/mixed message of about ``size`` octets on the wire (CRLF line ends), as LF text.

    Half of it is a ``text/plain`` part of prose lines, half a base64
    ``application/pdf`` attachment named ``report.pdf``.  No line starts
    with a dot.  smtp-source turns each LF into CRLF.
    """
    rnd = random.Random(seed)
    head = [
        "From: Bench <%s>" % SENDER,
        "To: <%s>" % RECIPIENT,
        "Subject: quarterly report",
        "Date: Wed, 02 Dec 2026 12:00:00 +0000",
        "Message-ID: <bench.%d@example.com>" % size,
        "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="==bench-boundary=="',
        "",
        "--==bench-boundary==",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 7bit",
        "",
    ]
    mid = [
        "",
        "--==bench-boundary==",
        'Content-Type: application/pdf; name="report.pdf"',
        "Content-Transfer-Encoding: base64",
        'Content-Disposition: attachment; filename="report.pdf"',
        "",
    ]
    tail = ["--==bench-boundary==--", ""]

    def octets(lines):
        return sum(len(l) + 2 for l in lines)

    budget = max(size - octets(head) - octets(mid) - octets(tail), 200)
    text_budget = budget // 2
    text = []
    used = 0
    while used < text_budget:
        line = []
        n = 0
        while n < 66:
            w = rnd.choice(WORDS)
            line.append(w)
            n += len(w) + 1
        s = " ".join(line).capitalize() + "."
        text.append(s)
        used += len(s) + 2
    attach_budget = max(budget - used, 80)
    raw = rnd.randbytes(attach_budget * 3 // 4 * 76 // 78)
    b64 = base64.encodebytes(raw).decode().rstrip("\n").split("\n")
    return "\n".join(head + text + mid + b64 + tail)


def quiet_deadline(text):
    """Until when to wait for other benchmarks: ``HH:MM`` (UTC, today), ``+MINUTES`` from now, or None for ``none``."""
    if not text or text == "none":
        return None
    now = datetime.datetime.now(datetime.timezone.utc)
    if text.startswith("+"):
        return now + datetime.timedelta(minutes=float(text[1:]))
    hh, mm = (int(x) for x in text.split(":"))
    return now.replace(hour=hh, minute=mm, second=0, microsecond=0)


def find_tool(name):
    """Path of an executable, looking in the sbin directories too."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin:/sbin"
    return shutil.which(name, path=path)


def source_version():
    """The commit measured, and whether mailguard/ has uncommitted changes."""
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "mailguard"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ROOT
    return "%s at %s%s" % (ROOT, commit or "?", " (mailguard/ modified)" if dirty else "")


def harness_options(parser):
    """The command-line options every `Harness` script takes (``--quiet-until``, ``--installed``, ``--keep``)."""
    parser.add_argument("--quiet-until", default="+30",
                        help="wait for other benchmarks to end until this UTC time (HH:MM) or for +MINUTES "
                        "(default +30), 'none' not to wait")
    parser.add_argument("--installed", action="store_true")
    parser.add_argument("--keep", action="store_true")


class Harness:
    """The sink, the gateways, the load runs and the waiting for a quiet machine."""

    def __init__(self, args, prefix):
        self.args = args
        self.children = Children()
        self.children.install()
        self.tmp = tempfile.mkdtemp(prefix=prefix)
        if not getattr(args, "keep", False):
            self.children.cleanups.append(lambda: shutil.rmtree(self.tmp, ignore_errors=True))
        self.source = not getattr(args, "installed", False)
        self.smtp_source = find_tool("smtp-source")
        self.smtp_sink = find_tool("smtp-sink")
        if not (self.smtp_source and self.smtp_sink):
            raise SystemExit("smtp-source/smtp-sink not installed (Debian package postfix)")
        self.deadline = quiet_deadline(getattr(args, "quiet_until", None))
        self.notes = []
        self.waited = 0.0
        self.forced = 0
        self.overlaps = 0
        self._steal0 = cpu_steal()
        self.messages = {}

    def say(self, text=""):
        print(text, flush=True)

    # -- the machine ----------------------------------------------------------

    def others(self):
        """Pids of other benchmarks running now (not ours)."""
        r = subprocess.run(["pgrep", "-f", OTHER_BENCH], capture_output=True, text=True)
        ours = set()
        for proc in self.children.procs:
            ours.update(process_tree(proc.pid))
        ours.add(os.getpid())
        return [int(p) for p in r.stdout.split() if int(p) not in ours]

    def wait_quiet(self):
        """Wait (polling every 10 s) until no other benchmark runs, or the deadline passed."""
        if self.deadline is None:
            return
        start = time.monotonic()
        said = False
        while self.others():
            if datetime.datetime.now(datetime.timezone.utc) >= self.deadline:
                self.forced += 1
                if not said:
                    self.say("  another benchmark still runs at %s UTC: measuring anyway"
                             % self.deadline.strftime("%H:%M"))
                break
            if not said:
                self.say("  another benchmark runs (pid %s): waiting" % self.others())
                said = True
            time.sleep(10)
        self.waited += time.monotonic() - start

    def steal(self):
        """CPU steal since the harness started, in percent, or None."""
        now = cpu_steal()
        if now is None or self._steal0 is None:
            return None
        return 100.0 * (now[0] - self._steal0[0]) / max(now[1] - self._steal0[1], 1)

    # -- processes -------------------------------------------------------------

    def start_sink(self):
        port = free_port()
        args = [self.smtp_sink]
        if os.geteuid() == 0:
            args += ["-u", "nobody"]
        args += ["-m", "4000", "127.0.0.1:%d" % port, "4096"]
        proc = self.children.spawn(args, "smtp-sink", os.path.join(self.tmp, "smtp-sink.log"))
        wait_greeting(port, proc)
        self.sink = port
        return port

    def start_gateway(self, name, inspect_extra="", sections="", global_extra=""):
        """Start mailguard esmtp in front of the sink with extra policy text; return ``(port, proc)``."""
        port = free_port()
        path = os.path.join(self.tmp, name + ".ini")
        with open(path, "w") as f:
            f.write(policy_text(port, self.sink, "esmtp", global_extra, inspect_extra) + sections)
        ok, why = check_policy(path, self.source)
        if not ok:
            raise RuntimeError("%s: policy refused: %s" % (name, why))
        log = os.path.join(self.tmp, name + ".log")
        # Its own working directory: the control socket and the spool live there.
        cwd = os.path.join(self.tmp, name)
        os.makedirs(cwd, exist_ok=True)
        proc = self.children.spawn(mailguard_args(path, log), name, os.path.join(self.tmp, name + ".stderr"),
                                   env=gateway_env(self.source), cwd=cwd)
        try:
            wait_greeting(port, proc, timeout=30)
        except RuntimeError as e:
            raise RuntimeError("%s: %s (see %s)" % (name, e, log)) from None
        return port, proc

    def message_file(self, size_name):
        """The message file for one size (made once)."""
        if size_name not in self.messages:
            path = os.path.join(self.tmp, "message-%s.eml" % size_name)
            with open(path, "w") as f:
                f.write(build_message(SIZES[size_name]))
            self.messages[size_name] = path
        return self.messages[size_name]

    #: Runs bench/smtpload.py with this module's message instead of its own.
    OWN_LOAD = ("import sys; sys.path.insert(0, %r); import smtpload, contentbench; "
                "smtpload.build_message = lambda size: contentbench.build_message(size).replace('\\n', '\\r\\n')"
                ".encode() + b'.\\r\\n'; smtpload.main(sys.argv[1:])" % HERE)

    def load_command(self, port, size_name, sessions, messages):
        if getattr(self.args, "load", "postfix") == "own":
            # Every session writes its whole message at once (asyncio), where
            # smtp-source writes one message body at a time.
            return [sys.executable, "-c", self.OWN_LOAD, str(port), "--sessions", str(sessions), "--messages",
                    str(messages), "--per-session", "1", "--size", str(SIZES[size_name]),
                    "--timeout", str(getattr(self.args, "run_timeout", 600))]
        return [self.smtp_source, "-d", "-s", str(sessions), "-m", str(messages), "-F", self.message_file(size_name),
                "-f", SENDER, "-t", RECIPIENT, "-M", "bench.example.com", "127.0.0.1:%d" % port]

    def warm_up(self, gws, messages):
        """``messages`` 1 KB messages through every gateway of ``gws`` (name -> (port, process)) first."""
        self.say("warming up")
        for name, (port, proc) in gws.items():
            r = self.run_load(port, proc, "1KB", 4, messages, 60)
            if r["error"]:
                raise SystemExit("%s: warm-up failed: %s" % (name, r["error"]))

    def interleaved_runs(self, gws, args, counts, extra_pids=lambda name: ()):
        """``args.runs`` rounds of every size in ``args.sizes``, the gateways interleaved in each.

        Returns ``{(name, size): [run, ...]}``; ``extra_pids(name)`` names
        other processes whose CPU a row reports (its milters).
        """
        runs = {}
        for n in range(args.runs):
            for size in args.sizes:
                line = []
                for name, (port, proc) in gws.items():
                    r = self.run_load(port, proc, size, args.sessions, int(counts[size] * args.scale),
                                      args.run_timeout, extra_pids=extra_pids(name))
                    runs.setdefault((name, size), []).append(r)
                    line.append("%s %s" % (name, ("%.0f msg/s %.2f CPU s/1000" % (r["rate"], r["cpu_per_1000"]))
                                           if not r["error"] else "ERROR " + r["error"]))
                self.say("run %d %-5s x%d: %s" % (n + 1, size, args.sessions, "; ".join(line)))
        return runs

    def run_load(self, port, proc, size_name, sessions, messages, timeout, extra_pids=(), sampler=None):
        """One run: ``messages`` through ``port``; returns a dict (rate, CPU per message, error...).

        ``extra_pids``: other processes (milters) whose CPU is reported too.
        ``sampler``: called about every second while the load runs.
        """
        self.wait_quiet()
        cpu0 = cpu_seconds(proc.pid)
        extra0 = sum(cpu_seconds(p) for p in extra_pids)
        start = time.monotonic()
        load = self.children.spawn(self.load_command(port, size_name, sessions, messages), "load",
                                   os.path.join(self.tmp, "load.log"), stdout=subprocess.PIPE)
        timed_out = False
        while True:
            try:
                load.wait(1.0)
                break
            except subprocess.TimeoutExpired:
                if sampler is not None:
                    sampler()
                if time.monotonic() - start > timeout:
                    timed_out = True
                    self.children.stop(load)
                    break
        elapsed = time.monotonic() - start
        cpu1 = cpu_seconds(proc.pid)
        extra1 = sum(cpu_seconds(p) for p in extra_pids)
        overlap = bool(self.others())
        if overlap:
            self.overlaps += 1
        if load in self.children.procs:
            self.children.procs.remove(load)
        err = None
        if timed_out:
            err = "timed out after %.0f s" % timeout
        elif load.returncode != 0:
            err = "load exit %s: %s" % (load.returncode, self.last_line(os.path.join(self.tmp, "load.log")))
        elif getattr(self.args, "load", "postfix") == "own":
            try:
                report = json.loads(load.stdout.read().decode().strip().splitlines()[-1])
            except (ValueError, IndexError):
                report = {"messages": 0, "errors": 1, "reasons": ["no report"]}
            if report.get("errors") or report.get("messages") != messages:
                err = "%s of %s messages accepted; %s" % (report.get("messages"), messages,
                                                          "; ".join(report.get("reasons", [])[:2]))
        if proc.poll() is not None:
            err = "gateway exited with status %s" % proc.returncode
        return {"messages": messages if not err else 0, "elapsed": elapsed, "cpu": cpu1 - cpu0,
                "extra_cpu": extra1 - extra0, "error": err, "overlap": overlap,
                "rate": messages / elapsed if not err else None,
                "cpu_per_1000": (cpu1 - cpu0) / messages * 1000 if not err else None,
                "extra_per_1000": (extra1 - extra0) / messages * 1000 if not err else None}

    @staticmethod
    def last_line(path):
        try:
            with open(path, errors="replace") as f:
                lines = [l.strip() for l in f if l.strip()]
            return lines[-1][-200:] if lines else ""
        except OSError:
            return ""

    def close(self):
        self.children.stop_all()


def summarize(runs):
    """Median and min-max of rate and CPU per 1000 messages over the good runs."""
    good = [r for r in runs if not r["error"]]
    if not good:
        return {"error": runs[0]["error"] if runs else "no runs"}
    rates = [r["rate"] for r in good]
    cpus = [r["cpu_per_1000"] for r in good]
    extra = [r["extra_per_1000"] for r in good]
    return {"n": len(good), "failed": len(runs) - len(good), "rate": statistics.median(rates),
            "rate_min": min(rates), "rate_max": max(rates), "cpu": statistics.median(cpus),
            "cpu_min": min(cpus), "cpu_max": max(cpus), "extra": statistics.median(extra),
            "overlaps": sum(1 for r in runs if r["overlap"])}


def throughput_table(rows, results, sizes, sessions, base="none", extra_title=None):
    """A Markdown table: per size and row, msg/s, gateway CPU, and both against the ``base`` row."""
    head = "| size x sessions | row | msg/s median (min-max) | gateway CPU s / 1000 msg (min-max) | msg/s x %s | CPU x %s |" % (
        base, base)
    sep = "|---|---|---|---|---|---|"
    if extra_title:
        head += " %s |" % extra_title
        sep += "---|"
    lines = [head, sep]
    for size in sizes:
        b = results.get((base, size), {})
        for row, title in rows:
            s = results.get((row, size), {"error": "not run"})
            if "error" in s:
                lines.append("| %s x%d | %s (%s) | ERROR: %s | | | |%s" % (size, sessions, row, title, s["error"],
                                                                       " |" if extra_title else ""))
                continue
            rx = "%.2f" % (s["rate"] / b["rate"]) if "rate" in b else "-"
            cx = "%.2f" % (s["cpu"] / b["cpu"]) if b.get("cpu") else "-"
            rate = "%.0f (%.0f-%.0f)" % (s["rate"], s["rate_min"], s["rate_max"])
            if s["failed"]:
                rate += " [%d failed]" % s["failed"]
            if s["overlaps"]:
                rate += " [%d overlapped another benchmark]" % s["overlaps"]
            cpu = "%.2f (%.2f-%.2f)" % (s["cpu"], s["cpu_min"], s["cpu_max"])
            line = "| %s x%d | %s (%s) | %s | %s | %s | %s |" % (size, sessions, row, title, rate, cpu, rx, cx)
            if extra_title:
                line += " %.2f |" % s["extra"]
            lines.append(line)
    return "\n".join(lines)


def header_lines(h, args):
    info = machine_info()
    return [
        "date: %s UTC" % datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine: %s x%s, %s, Python %s, Twisted %s, kernel %s" % (
            info.get("cpu", "?"), info["nproc"], info.get("memory", "?"), info["python"], info["twisted"],
            info["kernel"]),
        "mailguard: %s" % (source_version() if h.source else "installed package"),
        "command: python %s" % " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "load: %s, the message multipart/mixed (half text/plain prose, half a base64 attachment report.pdf), "
        "against smtp-sink; %d run(s) per figure (median, min-max), rows interleaved" % (
            ("bench/smtpload.py --sessions %d --per-session 1 (every session writes its message at once)"
             % args.sessions) if getattr(args, "load", "postfix") == "own" else
            "smtp-source -d -s %d -F message" % args.sessions, args.runs),
    ]


def footer_lines(h):
    lines = ["load average %s at the end" % load_average()]
    st = h.steal()
    if st is not None:
        lines.append("CPU steal during the runs: %.1f%%" % st)
    if h.waited >= 5:
        lines.append("waited %.0f s for other benchmarks to finish" % h.waited)
    if h.forced:
        lines.append("%d run(s) started while another benchmark still ran (the wait gave up at the deadline)"
                     % h.forced)
    if h.overlaps:
        lines.append("%d run(s) ended with another benchmark running: their figures are marked" % h.overlaps)
    return lines


# -- the content-rule rows ---------------------------------------------------------


def asa_policy():
    """``(inspect_extra, sections)`` of etc/asa-esmtp.ini's rule and its [match] sections."""
    cp = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    cp.read(os.path.join(ROOT, "etc", "asa-esmtp.ini"))
    inspect = next(s for s in cp.sections() if s.startswith("inspect "))
    extra = "".join("%s = %s\n" % (k, " ".join(v.split())) for k, v in cp[inspect].items() if k != "protocol")
    sections = ""
    for s in cp.sections():
        if s.startswith("match "):
            sections += "\n[%s]\n" % s + "".join("%s = %s\n" % (k, v) for k, v in cp[s].items())
    return extra, sections


#: Rows that say where the time goes (``--rows none,dlg,hdr,body``): one match each.
PART_ROWS = [
    ("dlg", "esmtp + one dialogue match (cmd-line-length-gt)",
     "match = m\n", "\n[match m]\ncmd-line-length-gt = 512\naction = drop-connection\n"),
    ("hdr", "esmtp + one header match (header-line-length-gt): spool, no regex",
     "match = m\n", "\n[match m]\nheader-line-length-gt = 998\naction = drop-connection\n"),
    ("body", "esmtp + one body regex",
     "match = m\n", "\n[match m]\nbody = (?i)\\b(wire transfer|gift cards?)\\b\naction = reject\n"),
    ("fname", "esmtp + one file name regex",
     "match = m\n", "\n[match m]\nmime-filename = (?i)\\.(exe|scr|js|vbs|bat|cmd)$\naction = reject\n"),
]


def content_rows():
    asa_extra, asa_sections = asa_policy()
    return [
        ("none", "esmtp, no rules", "", ""),
        ("asa", "esmtp + ASA default map (etc/asa-esmtp.ini)", asa_extra, asa_sections),
        ("six", "esmtp + six matches (body and file name regexes)", SIX_RULE, SIX_MATCHES),
    ] + PART_ROWS


def holder_main(port, count, hold):
    """Run bench/idle.py's idle-session holder (without its name in the process list)."""
    from idle import holder

    holder(port, count, hold)


def idle_rss(h, name, inspect_extra, sections, count, hold):
    """RSS per idle session of one gateway: ``count`` sessions greeted and held."""
    port, proc = h.start_gateway(name, inspect_extra, sections)
    try:
        h.wait_quiet()
        warm = h.children.spawn([sys.executable, os.path.abspath(__file__), "--holder", str(port), "200",
                                 "--hold", "0"], "holder", os.path.join(h.tmp, "holder.log"), stdout=subprocess.PIPE)
        warm.stdout.readline()
        warm.stdout.readline()
        h.children.stop(warm)
        time.sleep(1.0)
        rss0 = rss_bytes(proc.pid)
        held = h.children.spawn([sys.executable, os.path.abspath(__file__), "--holder", str(port), str(count),
                                 "--hold", str(hold)], "holder", os.path.join(h.tmp, "holder.log"),
                                stdout=subprocess.PIPE)
        line = held.stdout.readline().decode().split(" ", 4)
        if not line or line[0] != "greeted":
            raise RuntimeError("holder failed (see %s)" % os.path.join(h.tmp, "holder.log"))
        greeted = int(line[1])
        time.sleep(1.0)
        rss1 = rss_bytes(proc.pid)
        held_line = held.stdout.readline().decode().split()
        n_held = int(held_line[1]) if held_line and held_line[0] == "held" else 0
        rss2 = rss_bytes(proc.pid)
        h.children.stop(held)
        return {"row": name, "count": count, "greeted": greeted, "held": n_held, "rss0": rss0,
                "rss1": max(rss1, rss2), "per_session": (max(rss1, rss2) - rss0) / greeted if greeted else None}
    finally:
        h.children.stop(proc)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--holder", nargs=2, type=int, metavar=("PORT", "COUNT"), help=argparse.SUPPRESS)
    parser.add_argument("--hold", type=float, default=3.0, help="seconds to hold the idle sessions")
    parser.add_argument("--sizes", nargs="*", default=["100KB", "1MB"], choices=("1KB", "100KB", "1MB"))
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", default="none,asa,six",
                        help="comma-separated, among none, asa, six and (where the time goes) dlg, hdr, body, fname")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the message counts")
    parser.add_argument("--idle", type=int, default=2000, help="idle sessions for the RSS figure (0: skip)")
    parser.add_argument("--run-timeout", type=float, default=120.0)
    harness_options(parser)
    parser.add_argument("--markdown", help="write the tables as Markdown to this file")
    parser.add_argument("--json", help="write every run as JSON to this file")
    args = parser.parse_args(argv)
    if args.holder:
        holder_main(args.holder[0], args.holder[1], args.hold)
        return
    raise_nofile()
    h = Harness(args, "mailguard-contentbench-")
    try:
        head = header_lines(h, args)
        for line in head:
            h.say(line)
        h.start_sink()
        wanted = args.rows.split(",")
        rows = [r for r in content_rows() if r[0] in wanted]
        if not any(r[0] == "none" for r in rows):
            raise SystemExit("--rows must include none (the reference)")
        gws = {}
        for name, title, extra, sections in rows:
            gws[name] = h.start_gateway("gw-" + name, extra, sections)
        h.warm_up(gws, 100)
        runs = h.interleaved_runs(gws, args, COUNTS)
        results = {k: summarize(v) for k, v in runs.items()}
        for g in gws.values():
            h.children.stop(g[1])
        table = throughput_table([(r[0], r[1]) for r in rows], results, args.sizes, args.sessions)
        idle = []
        if args.idle:
            for name, title, extra, sections in rows:
                if name in ("none", "six"):
                    r = idle_rss(h, "idle-" + name, extra, sections, args.idle, args.hold)
                    idle.append(r)
                    h.say("idle %s: %d greeted, %d held, RSS %.1f -> %.1f MiB, %.2f KiB per session" % (
                        name, r["greeted"], r["held"], r["rss0"] / 2**20, r["rss1"] / 2**20,
                        (r["per_session"] or 0) / 1024))
        idle_lines = []
        if idle:
            idle_lines = ["| idle sessions | row | greeted / held | RSS before -> after | RSS per session |",
                          "|---|---|---|---|---|"]
            for r in idle:
                idle_lines.append("| %d | %s | %d / %d | %.1f -> %.1f MiB | %.2f KiB |" % (
                    r["count"], r["row"], r["greeted"], r["held"], r["rss0"] / 2**20, r["rss1"] / 2**20,
                    (r["per_session"] or 0) / 1024))
        foot = footer_lines(h)
        h.say()
        h.say(table)
        if idle_lines:
            h.say()
            h.say("\n".join(idle_lines))
        for line in foot:
            h.say(line)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write("".join("- %s\n" % l for l in head + foot))
                f.write("\n" + table + "\n")
                if idle_lines:
                    f.write("\n" + "\n".join(idle_lines) + "\n")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"runs": {"%s %s" % k: v for k, v in runs.items()}, "idle": idle}, f, indent=1)
    finally:
        h.close()


if __name__ == "__main__":
    main()
