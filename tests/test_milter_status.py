"""What the gateway shows of its milters: ``/milters``, Prometheus metrics, ``mailguard show milters``."""

import json
import os
import subprocess
import sys
import urllib.request

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailguard import filters, milterclient
from mailguard.milter import encode
from mailguard.policy import GlobalSettings
from mailguard.status import status_site
from mailguard.tracker import SessionTracker
from tests.test_milter_client import SILENT, ClientTestsMixin, TestMilter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

POLICY = """
[global]
status = tcp:{status}:interface=127.0.0.1

[inspect IN]
protocol = esmtp
milters = test

[listener L]
listen = tcp:0
backend = tcp:host=127.0.0.1:port=25
inspect = IN

[milter test]
endpoint = tcp:host=127.0.0.1:port={milter}

[milter spare]
endpoint = unix:path=/run/spare.sock
default-action = accept
"""


class StatusTests(ClientTestsMixin, TestCase):
    """A milter's verdicts and answer times reach /metrics, /milters and `mailguard show milters`."""

    @defer.inlineCallbacks
    def test_figures(self):
        """One refused and one accepted message, one failure: counted per milter and verdict."""
        flt = self.start(TestMilter(script={b"E": [encode(b"r"), encode(b"c")], b"B": [None, None, SILENT]}),
                         content_timeout=20.0)
        self.patch(milterclient, "_default", self.factory)
        answers = yield self.transaction(flt)
        self.assertEqual(answers[-1].action, filters.REJECT)
        answers = yield self.transaction(flt)
        self.assertEqual(answers[-1], filters.Verdict.ACCEPT)
        d = self.transaction(flt)
        yield self.milter.when(b"B")
        self.clock.advance(20)
        answers = yield d
        self.assertEqual(answers[-2].action, filters.TEMPFAIL)

        status = reactor.listenTCP(0, status_site(SessionTracker(GlobalSettings(), reactor), reactor),
                                   interface="127.0.0.1")
        self.addCleanup(status.stopListening)
        base = "http://127.0.0.1:%d" % status.getHost().port

        def get(path):
            with urllib.request.urlopen(base + path, timeout=10) as response:
                return response.read().decode()

        metrics = yield deferToThread(get, "/metrics")
        self.assertIn('mailguard_milter_verdicts_total{milter="test",verdict="reject"} 1.0', metrics)
        self.assertIn('mailguard_milter_verdicts_total{milter="test",verdict="accept"} 1.0', metrics)
        self.assertIn('mailguard_milter_verdicts_total{milter="test",verdict="failed"} 1.0', metrics)
        # Every awaited step of the three transactions was answered and timed (the silent one was not).
        count = [line for line in metrics.splitlines() if line.startswith("mailguard_milter_latency_seconds_count")]
        (line,) = count
        answered = float(line.split()[-1])
        self.assertGreater(answered, 20)
        self.assertIn('mailguard_milter_latency_seconds_bucket{le="+Inf",milter="test"} %s' % line.split()[-1],
                      metrics)

        (row,) = json.loads((yield deferToThread(get, "/milters")))["milters"]
        self.assertEqual(row["name"], "test")
        self.assertEqual(row["state"], "down")
        self.assertEqual((row["sessions"], row["connections"], row["open"]), (1, 1, 0))
        self.assertEqual(row["verdicts"], {"accept": 1, "failed": 1, "reject": 1})
        self.assertEqual(row["last_failure"], "no answer to body within 20 s")

        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(POLICY.format(status=status.getHost().port, milter=9))

        def show():
            return subprocess.run([sys.executable, "-m", "mailguard.cli", "show", "milters", "-c", path],
                                  cwd=ROOT, capture_output=True, text=True, timeout=60)

        result = yield deferToThread(show)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertEqual(result.stdout.splitlines(), [
            "Milter test (tcp:host=127.0.0.1:port=9), default-action tempfail, timeouts connect 30 command 30 content 300 s",
            "  Used by rules: IN",
            "  State down, sessions 1, connections 1 (0 open), answers %d in %.3f s"
            % (answered, row["answer_seconds"]),
            "  Verdicts: accept 1, failed 1, reject 1",
            "  Last failure: no answer to body within 20 s",
            "Milter spare (unix:path=/run/spare.sock), default-action accept, timeouts connect 30 command 30 content 300 s",
            "  Used by rules: none",
            "  State idle, no session yet",
        ])

    def test_showWithoutStatus(self):
        """Without a status key, `show milters` prints the configuration and says why there are no figures."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(POLICY.format(status=1, milter=9).replace("status = tcp:1:interface=127.0.0.1", ""))
        result = subprocess.run([sys.executable, "-m", "mailguard.cli", "show", "milters", "-c", path],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0)
        self.assertEqual(result.stdout.splitlines()[-1], "(no live figures: [global] status is not set)")
        self.assertIn("  Used by rules: IN", result.stdout)


class MergeTests(TestCase):
    """`show milters` adds up the workers' figures."""

    def test_merge(self):
        """Counts are added per milter; a milter up in one worker is up."""
        from mailguard.cli import _merge_milters

        row = {"name": "spam", "endpoint": "e", "state": "down", "sessions": 1, "connections": 1, "open": 0,
               "verdicts": {"reject": 1}, "last_failure": "x", "answers": 3, "answer_seconds": 0.5}
        other = dict(row, state="up", open=1, verdicts={"accept": 2, "reject": 1}, last_failure=None)
        merged = _merge_milters([{"milters": [row]}, {"milters": [other, dict(row, name="dkim")]}])
        spam = merged["milters"][1]
        self.assertEqual([r["name"] for r in merged["milters"]], ["dkim", "spam"])
        self.assertEqual((spam["state"], spam["sessions"], spam["open"], spam["answers"]), ("up", 2, 1, 6))
        self.assertEqual(spam["verdicts"], {"accept": 2, "reject": 2})
        self.assertEqual(spam["last_failure"], "x")
