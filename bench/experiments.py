"""Run the mailguard gateway with bench-only monkeypatches applied.

    python bench/experiments.py PATCH[,PATCH...] -- <twistd arguments>

Used by ``bench/bench.py --experiment PATCH`` (an extra row, measured in the
same run against the same baselines) and by ``bench/insitu.py``.  Nothing
here is imported by mailguard.  The proposals measured this way earlier
(the compiled DATA scan, ``isascii``, one write per leg per batch) are part
of mailguard now.

Patches:

  timing   Time, inside the running gateway, the inspector's client and
           server entry points and the relay's carrying-out of their events
           (``time.perf_counter`` around each call), and the leg callbacks
           around them; the totals are written as JSON to the file named by
           ``MAILGUARD_TIMING`` when the reactor shuts down.

  nomessagelog
           Do not write the per-message ``MESSAGE`` log line
           (``SessionTracker.message`` does nothing): what that line costs.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def patch_timing():
    from mailguard import relay, smtp

    totals = dict.fromkeys(("client_data", "server_data", "run", "client_leg", "server_leg"), 0.0)
    calls = dict.fromkeys(totals, 0)
    clock = time.perf_counter

    def timed(cls, name, key):
        original = getattr(cls, name)

        def wrapper(self, arg):
            start = clock()
            try:
                return original(self, arg)
            finally:
                totals[key] += clock() - start
                calls[key] += 1

        setattr(cls, name, wrapper)

    timed(smtp.SMTPInspector, "client_data", "client_data")
    timed(smtp.SMTPInspector, "server_data", "server_data")
    timed(relay.ClientLeg, "_run", "run")
    timed(relay.ClientLeg, "dataReceived", "client_leg")
    timed(relay.ClientLeg, "serverData", "server_leg")

    def dump():
        path = os.environ.get("MAILGUARD_TIMING")
        if path:
            with open(path, "w") as f:
                json.dump({"seconds": totals, "calls": calls}, f)

    from twisted.internet import reactor

    reactor.addSystemEventTrigger("before", "shutdown", dump)


def patch_nomessagelog():
    from mailguard import tracker

    tracker.SessionTracker.message = lambda self, session, done: None


PATCHES = {"timing": patch_timing, "nomessagelog": patch_nomessagelog}


def main():
    names = sys.argv[1].split(",")
    rest = sys.argv[2:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    for name in names:
        PATCHES[name]()
    from twisted.scripts.twistd import run

    sys.argv = ["twistd"] + rest
    run()


if __name__ == "__main__":
    main()
