"""mailguard's side-by-side throughput benchmark (issue 8).

    python bench/bench.py [--quick] [--load auto|postfix|own] [--runs N]
                          [--markdown FILE] [--json FILE] [--installed]

In one run, on loopback, the same workload goes through:

  (a) direct: client -> sink
  (b) a plain Twisted TCP relay (twisted.protocols.portforward, TCP_NODELAY)
  (c) HAProxy in TCP mode (one thread), if ``haproxy`` is installed
  (d) mailguard, ``protocol = tcp``
  (e) mailguard, ``protocol = esmtp``
  (f) mailguard esmtp with ``tls = terminate`` (STARTTLS to the client and to the backend)
  (g) mailguard esmtp with ``[global] workers = 2``
  (h) mailguard esmtp + one trivial message filter, DATA
  (i) mailguard esmtp + one trivial message filter, BDAT
  (j) mailguard esmtp, BDAT, no filter (the reference of i)

Each relay, gateway and sink is its own process; rows that cannot run say
why ("not available: ..."), and light up by themselves once the feature
lands (f, g, h and i are detected by asking ``mailguard check`` whether the
policy keys are accepted).

The filter of rows h and i is ``bench-accept``
(``bench/filterplugin/mailguard/plugins/mailguard_bench_filter.py``, put on
the gateway's ``PYTHONPATH``): it accepts everything and counts the octets
of every header field and body piece, so those rows measure the seam itself
(spool file under the run's temporary directory, filter calls, delivery
from the spool).  Rows i and j send each message as one ``BDAT n LAST``
(``bench/smtpload.py --bdat`` against ``bench/smtpsink.py``, which offers
CHUNKING); ``smtp-source`` only does DATA, so they run under the Python load
only.  The "filter cost" lines give h over e and i over j (throughput and
gateway CPU per message, same tools, same run).

Load: Postfix's ``smtp-source`` against ``smtp-sink`` when they are
installed (Debian package ``postfix``), else ``bench/smtpload.py`` (an
asyncio generator that pipelines like an MTA) against ``bench/smtpsink.py``.
Rows (f), (i) and (j) always use the latter (smtp-source cannot STARTTLS or
BDAT); their ratios are taken against (a), (b) and (e) measured with the
same tools, shown primed when Postfix's tools are the main load.

Each figure is the median of ``--runs`` runs (min-max beside it); the rows
are interleaved within each run so drift hits them alike.  Gateway CPU is
utime+stime of the gateway process and its children, from /proc, around each
run.  Every run is bounded by a message count and a time limit; every
process started is ended on exit, error or Ctrl-C.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    FILTER_PLUGIN_PATH,
    HERE,
    Children,
    busy_processes,
    check_policy,
    cpu_seconds,
    cpu_steal,
    load_average,
    free_port,
    gateway_env,
    machine_info,
    mailguard_args,
    make_certificates,
    policy_text,
    process_tree,
    raise_nofile,
    wait_greeting,
)

KB = 1024
MB = 1024 * 1024
SIZES = {"1KB": KB, "100KB": 100 * KB, "1MB": MB}

#: Messages per run (at least), by size; and the fewest per session.
FULL_COUNTS = {"1KB": 3000, "100KB": 600, "1MB": 150}
QUICK_COUNTS = {"1KB": 1500, "100KB": 300, "1MB": 80}
PER_SESSION = {"1KB": 10, "100KB": 5, "1MB": 3}

FULL_WORKLOADS = [(size, s) for size in ("1KB", "100KB", "1MB") for s in (1, 20, 100)]
QUICK_WORKLOADS = [("1KB", 1), ("1KB", 100), ("100KB", 20), ("1MB", 20)]

TOOLS = {
    "postfix": "smtp-source -d against smtp-sink (Postfix; no pipelining, each session sends all its messages)",
    "own": "bench/smtpload.py against bench/smtpsink.py (pipelined MAIL/RCPT/DATA, QUIT after the last "
    "end of data, a new session every few messages)",
}

ROWS = [
    ("a", "direct client -> sink"),
    ("b", "plain Twisted relay (portforward)"),
    ("c", "HAProxy, mode tcp, 1 thread"),
    ("d", "mailguard protocol = tcp"),
    ("e", "mailguard esmtp"),
    ("f", "mailguard esmtp, tls = terminate"),
    ("g", "mailguard esmtp, workers = 2"),
    ("h", "mailguard esmtp + trivial filter, DATA"),
    ("i", "mailguard esmtp + trivial filter, BDAT"),
    ("j", "mailguard esmtp, BDAT, no filter"),
    ("x", "mailguard esmtp + experiment"),
]

#: Rows whose load sends BDAT (``bench/smtpload.py --bdat``): the Python load only.
BDAT_ROWS = "ij"
#: Rows with the ``bench-accept`` filter.
FILTER_ROWS = "hi"
#: The row each row's "filter cost" ratio is taken against.
COST_REFERENCE = {"h": "e", "i": "j", "j": "e"}
#: The [filter NAME] section of the filter rows.
FILTER_SECTION = "\n[filter bench]\nplugin = bench-accept\n"


def source_version():
    """Which source tree is measured: its commit, and whether it has uncommitted changes."""
    root = os.path.dirname(HERE)
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "mailguard"],
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "source tree %s" % root
    return "source tree %s at %s%s" % (
        root, commit or "?", (" + uncommitted changes in %d file(s) under mailguard/" % len(dirty)) if dirty else "")


def find_tool(name):
    """Path of an executable, looking in the sbin directories too."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin:/sbin"
    return shutil.which(name, path=path)


class Instance:
    """One row as run with one load tool: its process (if any) and where clients connect."""

    def __init__(self, row, label, tool, port, proc=None, note="", title=None):
        self.title = title or dict(ROWS)[row]
        self.row = row
        self.label = label
        self.tool = tool
        self.port = port
        self.proc = proc
        self.note = note
        self.runs = {}  # workload -> [result dict]
        self.failed = None

    @property
    def key(self):
        return self.label


class Bench:
    """Sets up the sinks and rows, runs the workloads, prints the table."""

    def __init__(self, args):
        self.args = args
        self.children = Children()
        self.children.install()
        self.tmp = tempfile.mkdtemp(prefix="mailguard-bench-")
        if not args.keep:
            self.children.cleanups.append(lambda: shutil.rmtree(self.tmp, ignore_errors=True))
        self.instances = []
        self.unavailable = []  # (row, label, reason)
        self.missing = []
        self.competition = []
        self._steal0 = None  # /proc/stat steal at the first report
        self.source = not args.installed

    # -- output -------------------------------------------------------------

    def say(self, text=""):
        print(text, flush=True)

    # -- setting up ---------------------------------------------------------------

    def choose_tools(self):
        self.smtp_source = find_tool("smtp-source")
        self.smtp_sink = find_tool("smtp-sink")
        self.haproxy = find_tool("haproxy")
        postfix = bool(self.smtp_source and self.smtp_sink)
        if not postfix:
            self.missing.append(
                "smtp-source/smtp-sink: not installed (Debian package postfix); "
                "using bench/smtpload.py and bench/smtpsink.py"
            )
        if not self.haproxy:
            self.missing.append("haproxy: not installed (Debian package haproxy); row (c) skipped")
        load = self.args.load
        if load in ("postfix", "both") and not postfix:
            raise SystemExit("--load %s: smtp-source/smtp-sink not installed (Debian package postfix)" % load)
        if load == "auto":
            load = "both" if postfix else "own"
        self.tools = ["postfix", "own"] if load == "both" else [load]
        self.main_tool = self.tools[0]

    def start_sinks(self):
        self.sinks = {}
        if "postfix" in self.tools:
            port = free_port()
            args = [self.smtp_sink]
            if os.geteuid() == 0:
                args += ["-u", "nobody"]
            args += ["-m", "4000", "127.0.0.1:%d" % port, "4096"]
            proc = self.children.spawn(args, "smtp-sink", os.path.join(self.tmp, "smtp-sink.log"))
            wait_greeting(port, proc)
            self.sinks["postfix"] = port
        port = free_port()
        args = [sys.executable, os.path.join(HERE, "smtpsink.py"), str(port)]
        if self.certs:
            args += ["--cert", self.certs["cert"], "--key", self.certs["key"]]
        proc = self.children.spawn(args, "smtpsink", os.path.join(self.tmp, "smtpsink.log"))
        wait_greeting(port, proc)
        self.sinks["own"] = port

    def start_plain_relay(self, backend):
        port = free_port()
        proc = self.children.spawn(
            [sys.executable, os.path.join(HERE, "plainrelay.py"), str(port), str(backend)],
            "plainrelay",
            os.path.join(self.tmp, "plainrelay-%d.log" % port),
        )
        wait_greeting(port, proc)
        return port, proc

    def start_haproxy(self, backend):
        port = free_port()
        cfg = os.path.join(self.tmp, "haproxy-%d.cfg" % port)
        with open(cfg, "w") as f:
            f.write(
                "global\n"
                "    maxconn 4000\n"
                "    nbthread 1\n"
                "defaults\n"
                "    mode tcp\n"
                "    timeout connect 5s\n"
                "    timeout client 120s\n"
                "    timeout server 120s\n"
                "frontend bench\n"
                "    bind 127.0.0.1:%d\n"
                "    default_backend sink\n"
                "backend sink\n"
                "    server sink 127.0.0.1:%d\n" % (port, backend)
            )
        proc = self.children.spawn(
            [self.haproxy, "-db", "-f", cfg], "haproxy", os.path.join(self.tmp, "haproxy-%d.log" % port)
        )
        wait_greeting(port, proc)
        return port, proc

    def write_policy(self, name, port, backend, protocol, global_extra="", inspect_extra="", sections=""):
        path = os.path.join(self.tmp, name + ".ini")
        with open(path, "w") as f:
            f.write(policy_text(port, backend, protocol, global_extra, inspect_extra, sections))
        return path

    def filter_policy(self, name):
        """``(global_extra, inspect_extra, sections)`` of a filter row: its own spool, the filter ``bench``."""
        spool = os.path.join(self.tmp, "spool-" + name)
        return "spool-directory = %s\n" % spool, "filters = bench\n", FILTER_SECTION

    def tls_extra(self):
        c = self.certs
        return (
            "tls = terminate\n"
            "tls-certificate = %s\n"
            "tls-key = %s\n"
            "backend-tls = required\n"
            "backend-ca = %s\n"
            "backend-hostname = localhost\n" % (c["cert"], c["key"], c["ca"])
        )

    def start_mailguard(self, name, backend, protocol, global_extra="", inspect_extra="", experiment=None,
                        sections=""):
        port = free_port()
        policy = self.write_policy(name, port, backend, protocol, global_extra, inspect_extra, sections)
        extra_path = (FILTER_PLUGIN_PATH,) if sections else ()
        ok, why = check_policy(policy, self.source, extra_path)
        if not ok:
            raise RuntimeError("policy refused: " + why)
        log = os.path.join(self.tmp, name + ".log")
        # Each gateway runs in a directory of its own: the relative paths of
        # its defaults (control socket and its lock, spool) must not collide.
        workdir = os.path.join(self.tmp, name + ".d")
        os.makedirs(workdir, exist_ok=True)
        proc = self.children.spawn(
            mailguard_args(policy, log, experiment),
            name,
            os.path.join(self.tmp, name + ".stderr"),
            env=gateway_env(self.source, extra_path),
            cwd=workdir,
        )
        try:
            wait_greeting(port, proc, timeout=30)
        except RuntimeError as e:
            tail = ""
            for path in (log, os.path.join(self.tmp, name + ".stderr")):
                if os.path.exists(path):
                    with open(path, errors="replace") as f:
                        lines = [l.strip() for l in f if l.strip()]
                    if lines:
                        tail = lines[-1][-200:]
            raise RuntimeError("%s%s" % (e, (": " + tail) if tail else "")) from None
        return port, proc

    def detect(self, row):
        """None when the row's feature is there, else the reason it is not."""
        if row == "c" and not self.haproxy:
            return "haproxy not installed (Debian package haproxy)"
        if row == "f":
            if self.certs is None:
                return "cannot make test certificates: %s" % self.cert_error
            path = self.write_policy("probe-tls", 1, 2, "esmtp", inspect_extra=self.tls_extra())
            ok, why = check_policy(path, self.source)
            return None if ok else "policy has no TLS termination yet (mailguard check: %s)" % why
        if row == "g":
            path = self.write_policy("probe-workers", 1, 2, "esmtp", global_extra="workers = 2\n")
            ok, why = check_policy(path, self.source)
            return None if ok else "policy has no worker processes yet (mailguard check: %s)" % why
        if row in FILTER_ROWS:
            path = self.write_policy("probe-filter", 1, 2, "esmtp", *self.filter_policy("probe"))
            ok, why = check_policy(path, self.source, (FILTER_PLUGIN_PATH,))
            return None if ok else "policy has no message filters yet (mailguard check: %s)" % why
        return None

    def start_row(self, row, tool, experiment=None):
        """Start one row's process for ``tool``; return the Instance."""
        sink = self.sinks[tool]
        suffix = "" if tool == self.main_tool else "'"
        label = row + suffix
        if row == "x":
            port, proc = self.start_mailguard("mailguard-x-%s-%s" % (experiment.replace(",", "+"), tool), sink,
                                              "esmtp", experiment=experiment)
            index = self.args.experiment.index(experiment) + 1
            return Instance(row, "x%d%s" % (index, suffix), tool, port, proc,
                            title="mailguard esmtp + %s (bench/experiments.py)" % experiment)
        if row == "a":
            return Instance(row, label, tool, sink, note="no relay")
        if row == "b":
            port, proc = self.start_plain_relay(sink)
        elif row == "c":
            port, proc = self.start_haproxy(sink)
        elif row == "d":
            port, proc = self.start_mailguard("mailguard-tcp-" + tool, sink, "tcp")
        elif row == "e":
            port, proc = self.start_mailguard("mailguard-esmtp-" + tool, sink, "esmtp")
        elif row == "f":
            port, proc = self.start_mailguard("mailguard-tls", sink, "esmtp", inspect_extra=self.tls_extra())
        elif row == "g":
            port, proc = self.start_mailguard("mailguard-workers", sink, "esmtp", global_extra="workers = 2\n")
        elif row in FILTER_ROWS:
            name = "mailguard-filter-%s-%s" % (row, tool)
            global_extra, inspect_extra, sections = self.filter_policy(name)
            port, proc = self.start_mailguard(name, sink, "esmtp", global_extra, inspect_extra, sections=sections)
        elif row == "j":
            port, proc = self.start_mailguard("mailguard-bdat", sink, "esmtp")
        return Instance(row, label, tool, port, proc)

    def setup(self):
        soft, hard = raise_nofile()
        self.choose_tools()
        try:
            self.certs = make_certificates(self.tmp)
            self.cert_error = None
        except Exception as e:  # cryptography missing or broken: only row (f) suffers
            self.certs = None
            self.cert_error = str(e)
        self.start_sinks()
        wanted = [r for r, _ in ROWS if r in self.args.rows]
        plan = []
        for row in wanted:
            reason = self.detect(row)
            if reason:
                self.unavailable.append((row, reason))
                continue
            if row == "f" or row in BDAT_ROWS:
                # smtp-source cannot STARTTLS nor BDAT: these rows run with
                # the own tools, and so do the reference rows of their ratios.
                plan.append((row, "own"))
                if "own" not in self.tools:
                    refs = ("a", "b") if row == "f" else ("a", "b", "e")
                    plan += [(ref, "own") for ref in refs if ref in wanted and (ref, "own") not in plan]
                continue
            for tool in self.tools:
                plan.append((row, tool))
        order = {r: i for i, (r, _) in enumerate(ROWS)}
        plan.sort(key=lambda p: (p[1] != self.main_tool, order[p[0]]))
        self.plan_tools = sorted({p[1] for p in plan}, key=lambda t: t != self.main_tool)
        for exp in self.args.experiment or []:
            for tool in self.tools:
                plan.append(("x", tool, exp))
        for row, tool, *exp in plan:
            try:
                self.instances.append(self.start_row(row, tool, *exp))
            except RuntimeError as e:
                self.unavailable.append((row, "failed to start: %s" % e))

    # -- measuring -----------------------------------------------------------------

    def count(self, size_name, sessions):
        counts = QUICK_COUNTS if self.args.quick else FULL_COUNTS
        n = max(counts[size_name], sessions * PER_SESSION[size_name])
        return int(n * self.args.scale)

    def load_command(self, inst, size_name, sessions, messages):
        size = SIZES[size_name]
        if inst.tool == "postfix":
            return [
                self.smtp_source, "-d", "-s", str(sessions), "-m", str(messages), "-l", str(size),
                "-f", "bench@example.org", "-t", "sink@example.org", "-M", "bench.example.org",
                "127.0.0.1:%d" % inst.port,
            ]
        cmd = [
            sys.executable, os.path.join(HERE, "smtpload.py"), str(inst.port),
            "--sessions", str(sessions), "--messages", str(messages), "--size", str(size),
            "--per-session", str(PER_SESSION[size_name]), "--timeout", str(self.args.run_timeout),
            "--procs", str(self.args.load_procs),
        ]
        if inst.row == "f":
            cmd += ["--starttls", "--ca", self.certs["ca"]]
        if inst.row in BDAT_ROWS:
            cmd.append("--bdat")
        return cmd

    def measure(self, inst, size_name, sessions, messages=None):
        messages = messages or self.count(size_name, sessions)
        cmd = self.load_command(inst, size_name, sessions, messages)
        pid = inst.proc.pid if inst.proc else None
        cpu0 = cpu_seconds(pid) if pid else None
        start = time.monotonic()
        proc = self.children.spawn(cmd, "load", None, stdout=subprocess.PIPE)
        proc.stderr_path = None
        try:
            out, _ = proc.communicate(timeout=self.args.run_timeout + 15)
            timed_out = False
        except subprocess.TimeoutExpired:
            self.children.stop(proc)
            out, timed_out = b"", True
        elapsed = time.monotonic() - start
        cpu1 = cpu_seconds(pid) if pid else None
        if proc in self.children.procs:
            self.children.procs.remove(proc)
        result = {"cpu": (cpu1 - cpu0) if pid else None}
        if inst.tool == "postfix":
            ok = proc.returncode == 0 and not timed_out
            result.update(
                messages=messages if ok else 0,
                elapsed=elapsed,
                error=None if ok else ("timed out" if timed_out else "smtp-source exit %s" % proc.returncode),
            )
        else:
            try:
                r = json.loads(out.decode().strip().splitlines()[-1])
            except (ValueError, IndexError):
                r = {"messages": 0, "elapsed": elapsed, "errors": 1, "reasons": ["no report"], "timed_out": timed_out}
            err = None
            if r.get("timed_out"):
                err = "timed out after %d of %d messages" % (r["messages"], messages)
            elif r.get("errors"):
                err = "%d errors: %s" % (r["errors"], "; ".join(r.get("reasons", [])[:2]))
            result.update(messages=r["messages"], elapsed=r["elapsed"], error=err)
        if inst.proc is not None and inst.proc.poll() is not None:
            result["error"] = "gateway exited with status %s" % inst.proc.returncode
        result["bytes"] = result["messages"] * SIZES[size_name]
        return result

    def warm_up(self):
        for inst in list(self.instances):
            r = self.measure(inst, "1KB", 4, 200)
            if r["error"] or r["messages"] == 0:
                self.say("  %s: warm-up failed (%s); row skipped" % (inst.label, r["error"]))
                self.instances.remove(inst)
                self.unavailable.append((inst.row, "warm-up failed: %s" % r["error"]))
                if inst.proc:
                    self.children.stop(inst.proc)

    def run(self):
        workloads = QUICK_WORKLOADS if self.args.quick else FULL_WORKLOADS
        if self.args.sizes:
            workloads = [w for w in workloads if w[0] in self.args.sizes]
        if self.args.sessions:
            workloads = [w for w in workloads if w[1] in self.args.sessions]
        self.workloads = workloads
        deadline = time.monotonic() + self.args.max_time
        for n in range(self.args.runs):
            self.say("run %d/%d" % (n + 1, self.args.runs))
            for size_name, sessions in workloads:
                line = []
                for inst in self.instances:
                    if time.monotonic() > deadline:
                        self.say("  --max-time reached: stopping early")
                        return
                    r = self.measure(inst, size_name, sessions)
                    inst.runs.setdefault((size_name, sessions), []).append(r)
                    if r["error"]:
                        line.append("%s: ERROR %s" % (inst.label, r["error"]))
                    else:
                        line.append("%s %.0f" % (inst.label, r["messages"] / r["elapsed"]))
                self.say("  %-5s x%-3d msg/s  %s" % (size_name, sessions, "  ".join(line)))

    # -- reporting ---------------------------------------------------------------------

    def stats(self, inst, workload):
        runs = [r for r in inst.runs.get(workload, []) if not r["error"] and r["messages"]]
        if not runs:
            errs = [r["error"] for r in inst.runs.get(workload, []) if r["error"]]
            return {"error": errs[0] if errs else "no runs"}
        rates = [r["messages"] / r["elapsed"] for r in runs]
        mbs = [r["bytes"] / r["elapsed"] / 1e6 for r in runs]
        cpu = [r["cpu"] / r["messages"] * 1000 for r in runs if r["cpu"] is not None]
        return {
            "n": len(runs),
            "failed": len(inst.runs.get(workload, [])) - len(runs),
            "rate": statistics.median(rates),
            "rate_min": min(rates),
            "rate_max": max(rates),
            "mbs": statistics.median(mbs),
            "mbs_min": min(mbs),
            "mbs_max": max(mbs),
            "cpu": statistics.median(cpu) if cpu else None,
            "cpu_min": min(cpu) if cpu else None,
            "cpu_max": max(cpu) if cpu else None,
        }

    def reference(self, inst, row):
        for other in self.instances:
            if other.row == row and other.tool == inst.tool:
                return other
        return None

    def table(self):
        """Rows of the result table (dicts), per workload and instance."""
        out = []
        for w in self.workloads:
            for inst in self.instances:
                s = self.stats(inst, w)
                entry = {"workload": "%s x%d" % w, "size": w[0], "sessions": w[1], "row": inst.row,
                         "label": inst.label, "title": inst.title, "tool": inst.tool, **s}
                for ref in ("a", "b"):
                    other = self.reference(inst, ref)
                    so = self.stats(other, w) if other else {}
                    if "rate" in s and "rate" in so:
                        entry["x" + ref] = s["rate"] / so["rate"]
                    if ref == "b" and s.get("cpu") and so.get("cpu"):
                        # CPU per message against the plain relay's: steadier
                        # than throughput on a small shared machine.
                        entry["cpu_xb"] = s["cpu"] / so["cpu"]
                cost_ref = COST_REFERENCE.get(inst.row)
                other = self.reference(inst, cost_ref) if cost_ref else None
                if other is not None:
                    so = self.stats(other, w)
                    entry["ref"] = other.label
                    if "rate" in s and "rate" in so:
                        entry["xref"] = s["rate"] / so["rate"]
                    if s.get("cpu") and so.get("cpu"):
                        entry["cpu_xref"] = s["cpu"] / so["cpu"]
                out.append(entry)
        return out

    def targets(self, table):
        """The issue-8 targets, per load tool, each as (text, value or None, goal, note)."""
        def find(row, size, sessions, tool):
            for e in table:
                if (e["row"], e["size"], e["sessions"], e["tool"]) == (row, size, sessions, tool) and "rate" in e:
                    return e
            return None

        results = []
        for tool in self.plan_tools:
            tag = "[%s load] " % tool if len(self.plan_tools) > 1 else ""
            for size, goal in (("1KB", 0.8), ("100KB", 0.9), ("1MB", 0.9)):
                for sessions in (1, 20, 100):
                    e = find("e", size, sessions, tool)
                    if e is None:
                        continue
                    b = find("b", size, sessions, tool)
                    note = ""
                    if b is not None and b.get("xa", 0) >= 0.85:
                        # The relay is nearly as fast as no relay: the load
                        # tools, not the relays, set the pace.
                        note = "load-bound: (b) runs at %.2f x (a)" % b["xa"]
                    results.append(("%sesmtp / plain relay, %s x%d" % (tag, size, sessions), e.get("xb"), goal, note))
            g = find("g", "1KB", 100, tool)
            e = find("e", "1KB", 100, tool)
            if e is not None:
                results.append(("%s2 workers / 1 worker, 1KB x100" % tag,
                                g["rate"] / e["rate"] if g else None, 1.3, "" if g else "row (g) not available"))
        return results

    def render(self, markdown=False):
        table = self.table()
        lines = []
        labels = {r: t for r, t in ROWS}
        if markdown:
            lines.append("| workload | row | msg/s median (min-max) | MB/s median (min-max) | gateway CPU s / 1000 msg | x (a) | x (b) | CPU x (b) |")
            lines.append("|---|---|---|---|---|---|---|---|")
        else:
            lines.append("%-11s %-3s %-50s %-26s %-24s %-18s %6s %6s %8s" % (
                "workload", "row", "", "msg/s median (min-max)", "MB/s median (min-max)", "CPU s/1000 msg", "x(a)", "x(b)",
                "CPU x(b)"))
        for e in table:
            name = e["title"] + ("" if e["tool"] == self.main_tool else " [%s load]" % e["tool"])
            if "rate" in e:
                rate = "%.0f (%.0f-%.0f)" % (e["rate"], e["rate_min"], e["rate_max"])
                mbs = "%.1f (%.1f-%.1f)" % (e["mbs"], e["mbs_min"], e["mbs_max"])
                cpu = "%.2f (%.2f-%.2f)" % (e["cpu"], e["cpu_min"], e["cpu_max"]) if e["cpu"] is not None else "-"
                if e.get("failed"):
                    rate += " [%d failed]" % e["failed"]
            else:
                rate, mbs, cpu = "ERROR: %s" % e["error"], "", ""
            xa = "%.2f" % e["xa"] if "xa" in e else "-"
            xb = "%.2f" % e["xb"] if "xb" in e else "-"
            cxb = "%.2f" % e["cpu_xb"] if "cpu_xb" in e else "-"
            if markdown:
                lines.append("| %s | (%s) %s | %s | %s | %s | %s | %s | %s |" % (
                    e["workload"], e["label"], name, rate, mbs, cpu, xa, xb, cxb))
            else:
                lines.append("%-11s %-3s %-50s %-26s %-24s %-18s %6s %6s %8s" % (
                    e["workload"], e["label"], name[:50], rate, mbs, cpu, xa, xb, cxb))
        for row, reason in self.unavailable:
            text = "(%s) %s: not available: %s" % (row, labels[row], reason)
            lines.append(("| - | %s | | | | | | |" % text) if markdown else text)
        lines += self.render_cost(table, markdown)
        lines.append("")
        lines.append("Targets (issue 8):")
        bullet = "- " if markdown else "  "
        for text, value, goal, note in self.targets(table):
            if value is None:
                verdict = "n/a "
            else:
                verdict = "%.2f  %s" % (value, "met" if value >= goal else "NOT met")
            lines.append("%s%-52s goal >= %.1f: %s%s" % (bullet, text, goal, verdict, ("  (%s)" % note) if note else ""))
        return "\n".join(lines), table

    def render_cost(self, table, markdown):
        """The "filter cost" lines: rows h, i and j over their reference rows (`COST_REFERENCE`)."""
        costs = [e for e in table if "ref" in e]
        if not costs:
            return []
        bdat = any(e["row"] in BDAT_ROWS for e in costs)
        lines = ["", "Filter cost (same tools, same run; msg/s ratio, then gateway CPU per message ratio):"]
        if bdat:
            lines.append("(rows i and j send BDAT with bench/smtpload.py --bdat; smtp-source only does DATA, "
                         "so they run under the Python load only; their x(a)/x(b) above are against DATA rows)")
        if markdown:
            lines += ["", "| workload | row | over | msg/s x | CPU/msg x |", "|---|---|---|---|---|"]
        for e in costs:
            xref = "%.2f" % e["xref"] if "xref" in e else "-"
            cxref = "%.2f" % e["cpu_xref"] if "cpu_xref" in e else "-"
            what = "(%s) %s" % (e["label"], e["title"])
            if markdown:
                lines.append("| %s | %s | (%s) | %s | %s |" % (e["workload"], what, e["ref"], xref, cxref))
            else:
                lines.append("  %-11s %-50s over %-5s msg/s x %5s   CPU/msg x %5s" % (
                    e["workload"], what[:50], "(%s)" % e["ref"], xref, cxref))
        return lines

    def header(self):
        info = machine_info()
        lines = [
            "machine: %s x%s, %s, Python %s, Twisted %s, kernel %s, RLIMIT_NOFILE %s" % (
                info.get("cpu", "?"), info["nproc"], info.get("memory", "?"), info["python"],
                info["twisted"], info["kernel"], info["nofile"]),
            "mailguard: %s" % (source_version() if self.source else "installed package"),
            "load: " + "; ".join(
                ("%s = %s" % ("unprimed rows" if t == self.main_tool else "primed rows", TOOLS[t])) for t in self.plan_tools
            ),
            "runs per figure: %d (median, min-max); rows interleaved within each run" % self.args.runs,
        ]
        return lines, info

    def report_competition(self, when):
        """Say whether anything outside this benchmark is using the CPUs."""
        ours = set()
        for proc in self.children.procs:
            ours.update(process_tree(proc.pid))
        busy = busy_processes(exclude=ours)
        text = "load average %s %s" % (load_average(), when)
        steal = cpu_steal()
        if steal is not None:
            if self._steal0 is None:
                self._steal0 = steal
            else:
                d_steal, d_total = steal[0] - self._steal0[0], steal[1] - self._steal0[1]
                text += "; CPU steal during the runs %.1f%%" % (100.0 * d_steal / max(d_total, 1))
        if busy:
            text += "; WARNING, other busy processes: " + "; ".join(
                "pid %d at %.0f%% (%s)" % (pid, share * 100, cmd) for pid, share, cmd in busy)
        self.competition.append(text)
        self.say(text)

    def close(self):
        self.children.stop_all()
        if not self.args.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 workloads, smaller counts (under 3 minutes)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--load", choices=("auto", "postfix", "own", "both"), default="auto",
                        help="postfix: smtp-source -> smtp-sink; own: bench/smtpload.py -> bench/smtpsink.py; "
                        "both: each row with each; auto (default): both when Postfix's tools are installed, else own")
    parser.add_argument("--rows", default="abcdefghij", help="which rows to run (default abcdefghij)")
    parser.add_argument("--sizes", nargs="*", choices=tuple(SIZES), help="only these message sizes")
    parser.add_argument("--sessions", nargs="*", type=int, help="only these concurrencies")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the message counts")
    parser.add_argument("--run-timeout", type=float, default=60.0, help="time limit of one run, seconds")
    parser.add_argument("--max-time", type=float, default=3600.0, help="stop starting runs after this many seconds")
    parser.add_argument("--load-procs", type=int, default=1, help="processes of bench/smtpload.py per run")
    parser.add_argument("--installed", action="store_true", help="run the installed mailguard, not the source tree")
    parser.add_argument("--experiment", action="append",
                        help="add a row: mailguard esmtp with these bench/experiments.py patches (e.g. timing)")
    parser.add_argument("--markdown", help="also write the table as Markdown to this file")
    parser.add_argument("--json", help="also write every run as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (policies, logs)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.monotonic()
    bench = Bench(args)
    try:
        bench.setup()
        head, info = bench.header()
        for line in head:
            bench.say(line)
        for line in bench.missing:
            bench.say("missing: " + line)
        for row, reason in bench.unavailable:
            bench.say("(%s) not available: %s" % (row, reason))
        bench.say("rows: " + ", ".join("%s on :%d" % (i.label, i.port) for i in bench.instances))
        bench.report_competition("before the runs")
        bench.say("warming up")
        bench.warm_up()
        bench.run()
        bench.report_competition("after the runs")
        text, table = bench.render()
        bench.say()
        bench.say(text)
        bench.say("\ntotal time %.0f s" % (time.monotonic() - started))
        if args.markdown:
            md, _ = bench.render(markdown=True)
            with open(args.markdown, "w") as f:
                for line in head:
                    f.write("- %s\n" % line)
                for line in bench.missing:
                    f.write("- missing: %s\n" % line)
                for line in bench.competition:
                    f.write("- %s\n" % line)
                f.write("\n" + md + "\n")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({
                    "machine": info,
                    "args": vars(args),
                    "main_tool": bench.main_tool,
                    "unavailable": bench.unavailable,
                    "table": table,
                    "runs": {i.label: {"%s x%d" % w: r for w, r in i.runs.items()} for i in bench.instances},
                }, f, indent=1)
    finally:
        bench.close()


if __name__ == "__main__":
    main()
