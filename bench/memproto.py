"""Where an idle session's memory goes: the gateway in-process, under tracemalloc.

    python bench/memproto.py [--sessions 2000] [--protocol esmtp] [--top 25]

Runs the mailguard service (``mailguard.service.build_service``) in this
process with tracemalloc on, in front of ``bench/smtpsink.py``; a holder
process (``bench/idle.py --holder``) opens ``--sessions`` sessions and waits
for every greeting.  Then the Python heap is compared with the snapshot
taken before: bytes per session by allocating source line, and the biggest
allocation tracebacks.  tracemalloc sees Python objects only (not kernel
socket buffers, which RSS does not count either); it slows the gateway, so
use this for "where", and ``bench/idle.py`` for "how much".
"""

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import HERE, Children, free_port, raise_nofile, start_own_sink, wait_greeting, write_policy  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--protocol", default="esmtp")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--frames", type=int, default=8)
    args = parser.parse_args(argv)
    raise_nofile()
    children = Children()
    children.install()
    tmp = tempfile.mkdtemp(prefix="mailguard-mem-")
    import shutil

    children.cleanups.append(lambda: shutil.rmtree(tmp, ignore_errors=True))
    sink = start_own_sink(children, tmp)
    port = free_port()
    path = write_policy(tmp, port, sink, args.protocol)

    from twisted.internet import reactor

    from mailguard.policy import load_policy
    from mailguard.service import build_service

    try:
        from mailguard.inspectors import registry

        policy = load_policy(path, protocols=registry())
    except (ImportError, TypeError):
        policy = load_policy(path)
    svc = build_service(policy, reactor)
    svc.startService()
    result = {}

    def drive():
        try:
            wait_greeting(port, None, timeout=30)
            # Warm the code paths (first-use allocations are not per session).
            warm = subprocess.Popen([sys.executable, os.path.join(HERE, "idle.py"), "--holder", str(port), "50",
                                     "--hold", "0"], stdout=subprocess.PIPE)
            warm.stdout.readline()
            warm.stdout.readline()
            warm.kill()
            warm.wait()
            import time

            time.sleep(1.0)
            done = threading.Event()
            reactor.callFromThread(lambda: (result.__setitem__("base", tracemalloc.take_snapshot()), done.set()))
            done.wait()
            h = subprocess.Popen([sys.executable, os.path.join(HERE, "idle.py"), "--holder", str(port),
                                  str(args.sessions), "--hold", "2"], stdout=subprocess.PIPE)
            result["greeted"] = h.stdout.readline().decode().strip()
            time.sleep(1.0)
            done.clear()
            reactor.callFromThread(lambda: (result.__setitem__("after", tracemalloc.take_snapshot()), done.set()))
            done.wait()
            h.kill()
            h.wait()
        finally:
            reactor.callFromThread(reactor.stop)

    tracemalloc.start(args.frames)
    threading.Thread(target=drive, daemon=True).start()
    reactor.run()
    children.stop_all()
    if "after" not in result:
        raise SystemExit("no snapshot taken")
    n = int(result["greeted"].split()[1])
    flt = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
    base = result["base"].filter_traces(flt)
    after = result["after"].filter_traces(flt)
    stats = after.compare_to(base, "lineno")
    total = sum(s.size_diff for s in stats)
    print("%s; %d sessions; Python heap grew %.1f KiB = %.0f bytes per session" % (
        args.protocol, n, total / 1024, total / n))
    print("\nbytes per session by allocating line (top %d):" % args.top)
    for s in stats[: args.top]:
        frame = s.traceback[0]
        print("  %7.0f  %6.2f objs  %s:%d" % (s.size_diff / n, s.count_diff / n,
                                               frame.filename.replace(os.path.dirname(HERE) + "/", ""), frame.lineno))
    tb = after.compare_to(base, "traceback")
    print("\nlargest allocation sites with their callers (top 8):")
    for s in tb[:8]:
        print("  %.0f bytes/session, %.2f objects/session" % (s.size_diff / n, s.count_diff / n))
        for frame in s.traceback[: args.frames]:
            print("      %s:%d" % (frame.filename.replace(os.path.dirname(HERE) + "/", ""), frame.lineno))


if __name__ == "__main__":
    main()
