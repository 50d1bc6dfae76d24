"""Profile the mailguard gateway process under load, with py-spy (sampling, attached by pid).

    python bench/hotspots.py [--protocol esmtp] [--size 1024] [--sessions 20]
                            [--seconds 8] [--load own|postfix] [--out DIR]

Starts ``bench/smtpsink.py`` (or ``smtp-sink``), a mailguard gateway from the
source tree in front of it, attaches ``py-spy record`` to the gateway, and
drives it with the load generator for ``--seconds``.  Prints where the
gateway's time goes: self time by function and by source line, and
inclusive time of mailguard's own functions.  ``--out`` keeps the raw
collapsed stacks (``py-spy`` "raw" format; feed them to flamegraph.pl or
speedscope).

py-spy is on PyPI (``pip install py-spy``); it needs ptrace rights over the
gateway (root, or ``kernel.yama.ptrace_scope = 0``).
"""

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    HERE,
    Children,
    free_port,
    gateway_env,
    mailguard_args,
    policy_text,
    wait_greeting,
)


def summarize(path, top=25):
    """Text summary of a py-spy raw (collapsed) profile."""
    self_fn = collections.Counter()
    self_line = collections.Counter()
    incl = collections.Counter()
    area = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            leaf = frames[-1]
            self_line[leaf] += n
            fn = leaf.split(" (")[0] + " (" + leaf.split(" (")[-1].split(":")[0] + ")" if " (" in leaf else leaf
            self_fn[fn] += n
            # Where the leaf lives: mailguard, Twisted, or elsewhere.
            if "mailguard/" in leaf:
                area["mailguard (inspection, relay shell)"] += n
            elif "twisted/" in leaf:
                area["twisted (reactor, transports, logging)"] += n
            else:
                area["other (stdlib, idle)"] += n
            seen = set()
            for fr in frames:
                name = fr.split(" (")[0] + " (" + fr.split(" (")[-1].split(":")[0] + ")" if " (" in fr else fr
                if name not in seen:
                    seen.add(name)
                    incl[name] += n
    out = ["samples: %d" % total, "", "self time by area:"]
    for k, v in area.most_common():
        out.append("  %5.1f%%  %s" % (100.0 * v / total, k))
    out += ["", "self time by function (top %d):" % top]
    for k, v in self_fn.most_common(top):
        out.append("  %5.1f%%  %s" % (100.0 * v / total, k))
    out += ["", "self time by line (top %d):" % top]
    for k, v in self_line.most_common(top):
        out.append("  %5.1f%%  %s" % (100.0 * v / total, k))
    out += ["", "inclusive time of mailguard functions (top %d):" % top]
    mg = [(k, v) for k, v in incl.most_common() if "mailguard/" in k]
    for k, v in mg[:top]:
        out.append("  %5.1f%%  %s" % (100.0 * v / total, k))
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", default="esmtp", choices=("esmtp", "smtp", "mailguard", "tcp"))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--per-session", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--load", choices=("own", "postfix"), default="own")
    parser.add_argument("--installed", action="store_true")
    parser.add_argument("--experiment", help="apply these bench/experiments.py patches to the gateway")
    parser.add_argument("--out", help="keep the raw profile and summary in this directory")
    args = parser.parse_args(argv)

    pyspy = shutil.which("py-spy")
    if not pyspy:
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    children = Children()
    children.install()
    tmp = tempfile.mkdtemp(prefix="mailguard-profile-")
    children.cleanups.append(lambda: shutil.rmtree(tmp, ignore_errors=True))
    try:
        sink = free_port()
        if args.load == "postfix":
            sink_args = [shutil.which("smtp-sink", path=os.environ["PATH"] + ":/usr/sbin"), "-u", "nobody",
                         "-m", "4000", "127.0.0.1:%d" % sink, "4096"]
        else:
            sink_args = [sys.executable, os.path.join(HERE, "smtpsink.py"), str(sink)]
        sp = children.spawn(sink_args, "sink", os.path.join(tmp, "sink.log"))
        wait_greeting(sink, sp)
        port = free_port()
        policy = os.path.join(tmp, "policy.ini")
        with open(policy, "w") as f:
            f.write(policy_text(port, sink, args.protocol))
        gw = children.spawn(mailguard_args(policy, os.path.join(tmp, "gw.log"), args.experiment), "mailguard",
                            os.path.join(tmp, "gw.stderr"), env=gateway_env(not args.installed), cwd=tmp)
        wait_greeting(port, gw, timeout=30)
        raw = os.path.join(tmp, "profile.txt")
        spy = children.spawn(
            [pyspy, "record", "--pid", str(gw.pid), "--rate", str(args.rate), "--format", "raw",
             "--output", raw, "--duration", str(int(args.seconds) + 1), "--nonblocking"],
            "py-spy", os.path.join(tmp, "py-spy.log"),
        )
        time.sleep(1.0)
        if args.load == "postfix":
            count = 10 ** 7 // max(args.size, 1) + 1000
            load = [shutil.which("smtp-source", path=os.environ["PATH"] + ":/usr/sbin"), "-d",
                    "-s", str(args.sessions), "-m", str(count), "-l", str(args.size), "127.0.0.1:%d" % port]
            lp = children.spawn(load, "load", os.path.join(tmp, "load.log"))
            time.sleep(args.seconds)
            children.stop(lp)
            print("load: smtp-source, %d sessions, %d-octet messages, %.0f s" % (args.sessions, args.size, args.seconds))
        else:
            load = [sys.executable, os.path.join(HERE, "smtpload.py"), str(port), "--sessions", str(args.sessions),
                    "--messages", "100000000", "--size", str(args.size), "--per-session", str(args.per_session),
                    "--timeout", str(args.seconds)]
            out = subprocess.run(load, capture_output=True, text=True, timeout=args.seconds + 60).stdout
            print("load: bench/smtpload.py, %d sessions, %d-octet messages: %s" % (args.sessions, args.size, out.strip()))
        spy.wait(timeout=args.seconds + 30)
        if not os.path.exists(raw):
            with open(os.path.join(tmp, "py-spy.log")) as f:
                raise SystemExit("py-spy wrote no profile:\n" + f.read())
        text = summarize(raw)
        print(text)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            name = "%s-%d-x%d%s" % (args.protocol, args.size, args.sessions,
                                    "+" + args.experiment.replace(",", "+") if args.experiment else "")
            shutil.copy(raw, os.path.join(args.out, name + ".collapsed.txt"))
            with open(os.path.join(args.out, name + ".summary.txt"), "w") as f:
                f.write(text + "\n")
    finally:
        children.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
