"""The gateway's RSS while 100 concurrent 10 MB messages go through a milter (issue 16: the spool is on disk).

    python bench/spoolrss.py [--milter dkim|spam|virus] [--sessions 100] [--size-mb 10]
                             [--rows milter,none] [--markdown FILE] [--json FILE]

A rule with one milter spools every message to a file under the gateway's
``spool-directory`` and delivers it only after the milter accepted it, so
the gateway's memory must not grow with the messages in flight.  This
script starts the milter as the tests do (``tests/milters.py``; OpenDKIM by
default, which signs, so it reads every body octet), a mailguard esmtp
gateway with ``milters = NAME`` in front of Postfix's ``smtp-sink``, and
sends ``--sessions`` messages of ``--size-mb`` MB at once, one per session
(``bench/smtpload.py`` with the message of ``bench/contentbench.py``: every
session writes its whole message at once; ``--load postfix`` uses
``smtp-source -s 100 -m 100 -F`` instead, which opens the 100 sessions
but writes one message body at a time).  It samples the
gateway's RSS (/proc/<pid>/statm) and the spool directory's size every
second and reports the RSS at the start (after a warm-up), its peak, and
at the end (3 s after the last message).

``--rows milter,none`` also runs the same load through a gateway with no
milter (no spool: the message streams to the server) for comparison.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import raise_nofile, rss_bytes  # noqa: E402
from contentbench import MB, SIZES, Harness, footer_lines, harness_options, header_lines  # noqa: E402
from milterbench import milter_sections, start_milters  # noqa: E402


def spool_usage(directory, pid=None):
    """``(octets, files)`` of the spool now: the gateway's open files there (they have no name), or named files."""
    total = count = 0
    prefix = os.path.abspath(directory) + "/"
    if pid is not None:
        try:
            fds = os.listdir("/proc/%d/fd" % pid)
        except OSError:
            fds = []
        for fd in fds:
            path = "/proc/%d/fd/%s" % (pid, fd)
            try:
                if os.readlink(path).startswith(prefix):
                    size = os.stat(path).st_size
                    if size:  # an emptied file kept for the next message holds no message
                        total += size
                        count += 1
            except OSError:
                pass
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
                count += 1
            except OSError:
                pass
    return total, count


def sockets(pid):
    """Open sockets of process ``pid`` (client, server and milter connections, listeners)."""
    n = 0
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:"):
                    n += 1
            except OSError:
                pass
    except OSError:
        pass
    return n


def measure(h, name, port, proc, size_name, sessions, timeout, spool):
    """Send ``sessions`` concurrent messages, sampling RSS and spool size; return the figures."""
    samples = []
    t0 = time.monotonic()

    def sample():
        octets, files = spool_usage(spool, proc.pid)
        samples.append((round(time.monotonic() - t0, 1), rss_bytes(proc.pid), octets, files, sockets(proc.pid)))

    time.sleep(1.0)
    sample()
    start_rss = samples[0][1]
    r = h.run_load(port, proc, size_name, sessions, sessions, timeout, sampler=sample)
    sample()
    for _ in range(3):
        time.sleep(1.0)
        sample()
    rss = [s[1] for s in samples]
    return {"row": name, "messages": r["messages"], "elapsed": r["elapsed"], "error": r["error"],
            "overlap": r["overlap"], "cpu": r["cpu"], "start": start_rss, "peak": max(rss), "end": rss[-1],
            "spool_peak": max(s[2] for s in samples), "spool_files_peak": max(s[3] for s in samples),
            "sockets_peak": max(s[4] for s in samples), "samples": samples}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--milter", default="dkim", choices=("dkim", "spam", "virus"),
                        help="which program: dkim (OpenDKIM, default), spam (rspamd), virus (ClamAV)")
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--size-mb", type=int, default=10)
    parser.add_argument("--rows", default="milter", help="milter, or milter,none")
    parser.add_argument("--load", default="own", choices=("own", "postfix"),
                        help="own (default): bench/smtpload.py, every session writes its whole message at once; "
                        "postfix: smtp-source -s N -m N -F, which writes one message body at a time")
    parser.add_argument("--run-timeout", type=float, default=600.0)
    harness_options(parser)
    parser.add_argument("--markdown", help="write the table as Markdown to this file")
    parser.add_argument("--json", help="write the samples as JSON to this file")
    args = parser.parse_args(argv)
    args.runs = 1
    raise_nofile()
    size_name = "%dMB" % args.size_mb
    SIZES[size_name] = args.size_mb * MB
    h = Harness(args, "mailguard-spoolrss-")
    try:
        head = header_lines(h, args)
        for line in head:
            h.say(line)
        h.start_sink()
        results = []
        for row in args.rows.split(","):
            if row == "milter":
                endpoints, _ = start_milters(h, (args.milter,))
                port, proc = h.start_gateway("gw-milter", "milters = %s\n" % args.milter, milter_sections(endpoints))
                title = "esmtp + %s milter (spooled)" % {"dkim": "OpenDKIM", "spam": "rspamd",
                                                         "virus": "ClamAV"}[args.milter]
            else:
                port, proc = h.start_gateway("gw-none")
                title = "esmtp, no milter (streamed)"
            r = h.run_load(port, proc, "1KB", 4, 40, 60)
            if r["error"]:
                raise SystemExit("%s: warm-up failed: %s" % (row, r["error"]))
            spool = os.path.join(h.tmp, "gw-" + row, "var", "spool")
            m = measure(h, row, port, proc, size_name, args.sessions, args.run_timeout, spool)
            m["title"] = title
            results.append(m)
            h.say("%s: %d x %s in %.1f s%s; RSS start %.1f MiB, peak %.1f MiB, end %.1f MiB; spool peak %.0f MiB" % (
                title, m["messages"], size_name, m["elapsed"], (" ERROR " + m["error"]) if m["error"] else "",
                m["start"] / 2**20, m["peak"] / 2**20, m["end"] / 2**20, m["spool_peak"] / 2**20))
            h.say("  RSS MiB every ~1 s: " + " ".join("%.0f" % (s[1] / 2**20) for s in m["samples"]))
            h.say("  spool MiB (files) every ~1 s: " + " ".join("%.0f(%d)" % (s[2] / 2**20, s[3]) for s in m["samples"]))
            h.say("  gateway sockets every ~1 s: " + " ".join("%d" % s[4] for s in m["samples"]))
            h.children.stop(proc)
        table = ["| row | messages | time | RSS start | RSS peak | RSS end | peak - start | spool peak on disk "
                 "(files) | gateway sockets peak |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for m in results:
            table.append("| %s | %s | %.1f s | %.1f MiB | %.1f MiB | %.1f MiB | %+.1f MiB | %.0f MiB (%d) | %d |" % (
                m["title"], ("%d x %s" % (m["messages"], size_name)) if not m["error"] else "ERROR: " + m["error"],
                m["elapsed"], m["start"] / 2**20, m["peak"] / 2**20, m["end"] / 2**20,
                (m["peak"] - m["start"]) / 2**20, m["spool_peak"] / 2**20, m["spool_files_peak"],
                m["sockets_peak"]))
        series = []
        for m in results:
            series.append("- RSS of %s, MiB, every ~1 s: %s" % (m["title"], " ".join(
                "%.0f" % (s[1] / 2**20) for s in m["samples"])))
            series.append("- its spool, MiB (files): %s" % " ".join("%.0f(%d)" % (s[2] / 2**20, s[3])
                                                                 for s in m["samples"]))
            series.append("- its open sockets: %s" % " ".join("%d" % s[4] for s in m["samples"]))
        foot = footer_lines(h)
        h.say()
        h.say("\n".join(table))
        for line in foot:
            h.say(line)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write("".join("- %s\n" % l for l in head + foot))
                f.write("\n" + "\n".join(table) + "\n\n" + "\n".join(series) + "\n")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        h.close()


if __name__ == "__main__":
    main()
