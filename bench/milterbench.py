"""Milters under load: esmtp with rspamd, and with rspamd + ClamAV + OpenDKIM, against no milter (issue 16).

    python bench/milterbench.py [--sizes 1KB 100KB] [--sessions 20] [--runs 3]
                                [--markdown FILE] [--json FILE]

The real programs are started as the tests start them (``tests/milters.py``:
private configurations in a temporary directory, loopback ports, no
network): rspamd's proxy worker in milter mode (one worker, self_scan),
clamd with a one-signature database behind clamav-milter, and OpenDKIM
signing for example.com.  Rows, each a mailguard process
(``protocol = esmtp``) in front of Postfix's ``smtp-sink``:

  none   no milter
  rspamd ``milters = spam``
  all3   ``milters = spam, virus, dkim`` (rspamd, then ClamAV, then OpenDKIM)

The message and the load are those of ``bench/contentbench.py``
(``smtp-source -d -F``, a multipart/mixed message with a text part and a
base64 attachment, From ``bench@example.com`` so that OpenDKIM signs it);
every message is delivered.  Beside the gateway's CPU per message the table
gives the milters' own CPU per message (rspamd, clamd, clamav-milter and
opendkim processes, from /proc): on a small machine they share the cores
with the gateway and usually set the pace.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ROOT, process_tree, raise_nofile  # noqa: E402
from contentbench import (  # noqa: E402
    Harness,
    harness_options,
    footer_lines,
    header_lines,
    summarize,
    throughput_table,
)

sys.path.insert(0, ROOT)

#: Messages per run, by size (the milters are slower than the gateway).
COUNTS = {"1KB": 600, "100KB": 200, "1MB": 40}

ROWS = [
    ("none", "esmtp, no milter"),
    ("rspamd", "esmtp + rspamd milter"),
    ("all3", "esmtp + rspamd, ClamAV, OpenDKIM milters"),
]


def milter_sections(endpoints):
    """``[milter NAME]`` sections for the started programs."""
    return "".join("\n[milter %s]\nendpoint = %s\ndefault-action = tempfail\n" % (name, ep)
                   for name, ep in endpoints.items())


def start_milters(h, which=("spam", "virus", "dkim")):
    """Start the wanted programs (stopped with the harness); return ``(endpoints, programs)``."""
    from tests.milters import ClamAV, OpenDKIM, Rspamd

    classes = {"spam": Rspamd, "virus": ClamAV, "dkim": OpenDKIM}
    endpoints, started = {}, {}
    for name in which:
        directory = tempfile.mkdtemp(prefix=name + "-", dir=h.tmp)
        os.chmod(directory, 0o755)
        program = classes[name](directory)
        t = time.monotonic()
        program.start()
        h.children.cleanups.append(program.stop)
        h.say("started %s (%s) in %.1f s" % (name, program.endpoint, time.monotonic() - t))
        endpoints[name] = program.endpoint
        started[name] = program
    return endpoints, started


def milter_pids(programs):
    """Every process of the started milters (rspamd forks workers)."""
    roots = []
    for p in programs.values():
        if hasattr(p, "programs"):
            roots += [q.process.pid for q in p.programs]
        elif p.program is not None:
            roots.append(p.program.process.pid)
    pids = []
    for r in roots:
        pids += process_tree(r)
    return pids


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=["1KB", "100KB"], choices=tuple(COUNTS))
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", default="none,rspamd,all3")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the message counts")
    parser.add_argument("--run-timeout", type=float, default=120.0)
    harness_options(parser)
    parser.add_argument("--markdown", help="write the table as Markdown to this file")
    parser.add_argument("--json", help="write every run as JSON to this file")
    args = parser.parse_args(argv)
    raise_nofile()
    h = Harness(args, "mailguard-milterbench-")
    try:
        head = header_lines(h, args)
        for line in head:
            h.say(line)
        h.start_sink()
        wanted = args.rows.split(",")
        rows = [r for r in ROWS if r[0] in wanted]
        need = ("spam", "virus", "dkim") if "all3" in wanted else ("spam",) if "rspamd" in wanted else ()
        endpoints, programs = start_milters(h, need)
        sections = milter_sections(endpoints)
        milters = {"none": "", "rspamd": "milters = spam\n", "all3": "milters = spam, virus, dkim\n"}
        gws = {}
        for name, title in rows:
            # Every [milter] section is in every policy; a row names those it uses.
            gws[name] = h.start_gateway("gw-" + name, milters[name], sections if milters[name] else "")
        pids = milter_pids(programs)
        h.warm_up(gws, 40)
        runs = h.interleaved_runs(gws, args, COUNTS, extra_pids=lambda name: pids if name != "none" else ())
        results = {k: summarize(v) for k, v in runs.items()}
        table = throughput_table(rows, results, args.sizes, args.sessions,
                                 extra_title="milters' CPU s / 1000 msg")
        foot = footer_lines(h)
        h.say()
        h.say(table)
        for line in foot:
            h.say(line)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write("".join("- %s\n" % l for l in head + foot))
                f.write("\n" + table + "\n")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"runs": {"%s %s" % k: v for k, v in runs.items()}}, f, indent=1)
    finally:
        h.close()


if __name__ == "__main__":
    main()
