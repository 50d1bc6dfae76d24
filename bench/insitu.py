"""Where a running gateway's CPU goes per message: inspection, carrying out events, the rest.

    python bench/insitu.py [--protocol esmtp] [--size 1024] [--sessions 100]
                           [--messages 4000] [--per-session 10]

Starts ``bench/smtpsink.py`` and a mailguard gateway (source tree) with the
``timing`` patch of ``bench/experiments.py``, drives it with
``bench/smtpload.py``, stops it and prints microseconds per message:

- ``inspector, client side`` / ``server side``: inside
  ``SMTPInspector.client_data`` / ``server_data``, measured in the running
  gateway (a sans-IO benchmark such as ``bench/coreproto.py`` runs the same
  code hot in the caches and reads about half of this);
- ``carrying out events``: ``ClientLeg._run``, which includes Twisted's
  write calls;
- ``leg callbacks, other``: the rest of ``dataReceived`` / ``serverData``
  (session counters, activity time);
- ``gateway CPU, all``: the process's utime+stime over the load, which
  adds the reactor, the kernel and session set-up and tear-down.

The timers themselves cost about 0.3 us per call.  Every process started is
ended on exit.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    HERE,
    Children,
    cpu_seconds,
    free_port,
    gateway_env,
    mailguard_args,
    start_own_sink,
    wait_greeting,
    write_policy,
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", default="esmtp", choices=("esmtp", "smtp", "mailguard"))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--per-session", type=int, default=10)
    args = parser.parse_args(argv)

    children = Children()
    children.install()
    tmp = tempfile.mkdtemp(prefix="mailguard-insitu-")
    children.cleanups.append(lambda: shutil.rmtree(tmp, ignore_errors=True))
    sink = start_own_sink(children, tmp)
    port = free_port()
    policy = write_policy(tmp, port, sink, args.protocol)
    env = gateway_env(True)
    env["MAILGUARD_TIMING"] = timing = os.path.join(tmp, "timing.json")
    gw = children.spawn(mailguard_args(policy, os.path.join(tmp, "twistd.log"), "timing"), "mailguard",
                        os.path.join(tmp, "gateway.log"), env=env, cwd=tmp)
    wait_greeting(port, gw)
    cpu0 = cpu_seconds(gw.pid)
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "smtpload.py"), str(port), "--sessions", str(args.sessions),
         "--messages", str(args.messages), "--per-session", str(args.per_session), "--size", str(args.size)],
        capture_output=True, check=True, timeout=600,
    )
    cpu = cpu_seconds(gw.pid) - cpu0
    children.stop(gw)
    report = json.loads(out.stdout.decode().strip().splitlines()[-1])
    n = report["messages"]
    with open(timing) as f:
        timing_data = json.load(f)
    t, calls = timing_data["seconds"], timing_data["calls"]
    children.stop_all()
    us = lambda seconds: seconds / n * 1e6  # noqa: E731
    other = t["client_leg"] + t["server_leg"] - t["client_data"] - t["server_data"] - t["run"]
    print("%s, %d-octet messages, %d sessions, %d messages (%d per session); microseconds per message:" % (
        args.protocol, args.size, args.sessions, n, args.per_session))
    for label, value, key in (
        ("inspector, client side", t["client_data"], "client_data"),
        ("inspector, server side", t["server_data"], "server_data"),
        ("carrying out events (incl. Twisted writes)", t["run"], "run"),
        ("leg callbacks, other", other, None),
        ("gateway CPU, all", cpu, None),
    ):
        per = " (%.1f calls per message)" % (calls[key] / n) if key else ""
        print("  %-44s %7.1f%s" % (label, us(value), per))


if __name__ == "__main__":
    main()
