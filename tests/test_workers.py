"""Worker processes: shared ports, restart of a dead worker, drain on SIGTERM, per-worker status."""

import os
import signal
import smtplib
import subprocess
import time
import urllib.request

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailguard.policy import GlobalSettings, parse_policy
from mailguard.workers import WorkersError, check_policy, split_tcp, worker_settings, worker_status
from tests.test_plugin import TWISTD, free_port


class WorkerPolicyTests(SynchronousTestCase):
    """How a policy is shared between workers."""

    def test_thresholds_split(self):
        """Each worker enforces its share of the gateway-wide thresholds, rounded up."""
        share = worker_settings(GlobalSettings(max_incomplete_high=500, max_incomplete_host=5), 2)
        self.assertEqual((share.max_incomplete_high, share.max_incomplete_low, share.max_incomplete_host),
                         (250, 200, 3))

    def test_status_port_per_worker(self):
        """Worker i serves its status on the configured port plus i, options kept."""
        self.assertEqual(worker_status("tcp:8025:interface=127.0.0.1", 1), "tcp:8026:interface=127.0.0.1")
        self.assertEqual(split_tcp(r"tcp6:25:interface=\:\:1"), ("tcp6", 25, {"interface": "::1"}))

    def test_non_tcp_listener_refused(self):
        """A listener that cannot be shared with SO_REUSEPORT is refused on one line."""
        policy = parse_policy("[global]\nworkers = 2\n[inspect R]\nprotocol = smtp\n[listener l]\n"
                              "listen = unix:/tmp/x.sock\nbackend = tcp:host=mx:port=25\ninspect = R\n",
                              path="w.ini")
        with self.assertRaises(WorkersError) as cm:
            check_policy(policy)
        self.assertIn("w.ini: [listener l] listen: workers > 1 needs a tcp: or tcp6: listener", str(cm.exception))


def children(pid):
    """PIDs of the direct children of ``pid``."""
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class WorkerPoolTests(TestCase):
    """twistd mailguard with workers = 2, end to end."""

    timeout = 120

    @defer.inlineCallbacks
    def test_two_workers(self):
        """Two workers share the port and deliver; a killed worker comes back; SIGTERM stops everything."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        port, status = free_port(), free_port(2)  # a status port per worker
        while port in (status, status + 1):
            status = free_port(2)
        with open(os.path.join(workdir, "policy.ini"), "w") as f:
            f.write("[global]\nworkers = 2\nstatus = tcp:%d:interface=127.0.0.1\n"
                    "[inspect R]\nprotocol = esmtp\n[listener l]\n"
                    "listen = tcp:%d:interface=127.0.0.1\nbackend = embedded\ninspect = R\n" % (status, port))
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        proc = subprocess.Popen(TWISTD + ["-n", "--pidfile=", "mailguard", "-c", "policy.ini"], cwd=workdir,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def stop():
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)

        self.addCleanup(stop)

        def wait_until(predicate, what, seconds=30):
            deadline = time.monotonic() + seconds
            while not predicate():
                if time.monotonic() > deadline:
                    raise AssertionError("timed out waiting for " + what)
                time.sleep(0.1)

        def scenario():
            def up():
                try:
                    for p in (status, status + 1):
                        urllib.request.urlopen("http://127.0.0.1:%d/sessions" % p, timeout=2).read()
                    return True
                except OSError:
                    return False

            wait_until(up, "both workers' status endpoints")
            workers = children(proc.pid)
            for i in range(20):
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                    client.sendmail("a@example.org", ["b@example.org"], b"Subject: %d\r\n\r\nbody\r\n" % i)
            totals = []
            for p in (status, status + 1):
                text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % p, timeout=5).read().decode()
                line = [x for x in text.splitlines() if x.startswith("mailguard_sessions_total")][0]
                totals.append((line.split("{")[1].split("}")[0], float(line.rsplit(" ", 1)[1])))
            os.kill(workers[0], signal.SIGKILL)
            wait_until(lambda: len(children(proc.pid)) == 2 and workers[0] not in children(proc.pid),
                       "the killed worker to be replaced")
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.sendmail("a@example.org", ["b@example.org"], b"Subject: after\r\n\r\nbody\r\n")
            live = children(proc.pid)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
            leftovers = [pid for pid in live if os.path.exists("/proc/%d" % pid)
                         and open("/proc/%d/stat" % pid).read().split()[2] != "Z"]
            return workers, totals, code, leftovers

        workers, totals, code, leftovers = yield deferToThread(scenario)
        self.assertEqual(len(workers), 2)
        # twistd shuts down cleanly, then exits by the signal it was sent.
        self.assertIn(code, (0, -signal.SIGTERM))
        self.assertEqual(leftovers, [])
        self.assertEqual(sorted(label for label, _ in totals), ['worker="0"', 'worker="1"'])
        self.assertEqual(sum(count for _, count in totals), 20)
        new = os.listdir(os.path.join(workdir, "var", "maildir", "new"))
        self.assertEqual(len(new), 21)


class DrainTests(SynchronousTestCase):
    """Stopping a gateway lets its sessions finish, for a bounded time."""

    def make(self):
        from twisted.internet.task import Clock

        from mailguard.workers import DrainService

        class Leg:
            aborted = False

            def abortSession(self):
                self.aborted = True

        class Session:
            leg = Leg()

        class Tracker:
            sessions = {1: Session()}

        clock = Clock()
        tracker = Tracker()
        drain = DrainService(tracker, clock, seconds=30)
        drain.startService()
        return drain, tracker, clock

    def test_waits_for_sessions(self):
        """stopService fires once the last session has ended, without aborting it."""
        drain, tracker, clock = self.make()
        d = drain.stopService()
        clock.advance(5)
        self.assertNoResult(d)
        leg = tracker.sessions[1].leg
        tracker.sessions.clear()
        clock.advance(0.1)
        self.successResultOf(d)
        self.assertFalse(leg.aborted)

    def test_bounded(self):
        """Sessions still open after the drain time are aborted and stopping completes."""
        drain, tracker, clock = self.make()
        d = drain.stopService()
        clock.pump([0.1] * 301)
        self.successResultOf(d)
        self.assertTrue(tracker.sessions[1].leg.aborted)
