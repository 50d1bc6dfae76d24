"""A milter under the real ``twistd mailguard``: policy file, embedded backend, status endpoint, show milters."""

import os
import smtplib
import subprocess
import sys

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from mailguard.milter import encode
from tests.milters import free_port
from tests.test_logs import Daemon
from tests.test_milter_client import TestMilter
from tests.test_plugin import installed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

POLICY = """
[global]
status = tcp:{status}:interface=127.0.0.1

[inspect IN]
protocol = esmtp
milters = scan

[milter scan]
endpoint = tcp:host=127.0.0.1:port={milter}
command-timeout = 10
content-timeout = 10

[listener mail]
listen = tcp:{port}:interface=127.0.0.1
backend = embedded
inspect = IN
"""

SPAM = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: spam\r\n\r\nbuy now\r\n"
HAM = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: ham\r\n\r\nhello\r\n"


class TwistdMilterTests(TestCase):
    """`twistd -c policy.ini` with a [milter] section asks the milter and delivers only what it accepts."""

    timeout = 120

    def setUp(self):
        if not installed():
            raise SkipTest("mailguard is not installed in this Python: run `pip install .` (tox does)")

    @defer.inlineCallbacks
    def test_twistd(self):
        """Refused: 550 and nothing in the maildir; accepted: delivered with the milter's header; show milters counts."""
        milter = TestMilter(script={b"E": [encode(b"y", b"550 5.7.1 Spam\0"),
                                           encode(b"h", b"X-Scan\0clean\0") + encode(b"a")]})
        listening = reactor.listenTCP(0, milter, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        port, status = free_port(), free_port()
        daemon = Daemon(self, POLICY.format(status=status, milter=listening.getHost().port, port=port))
        yield deferToThread(daemon.start)
        yield deferToThread(daemon.wait_port, port)

        def talk():
            outcomes = []
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
                for m in (SPAM, HAM):
                    try:
                        outcomes.append(c.sendmail("a@example.org", ["b@example.org"], m))
                    except smtplib.SMTPDataError as e:
                        outcomes.append((e.smtp_code, e.smtp_error))
            return outcomes

        outcomes = yield deferToThread(talk)
        self.assertEqual(outcomes, [(550, b"5.7.1 Spam"), {}])
        new = os.path.join(daemon.workdir, "var", "maildir", "new")
        (name,) = os.listdir(new)
        with open(os.path.join(new, name), "rb") as f:
            data = f.read()
        self.assertIn(b"X-Scan: clean\n", data)
        self.assertIn(b"Subject: ham", data)

        def show():
            return subprocess.run([sys.executable, "-m", "mailguard.cli", "show", "milters", "-c",
                                   os.path.join(daemon.workdir, "policy.ini")],
                                  cwd=daemon.workdir, capture_output=True, text=True, timeout=60,
                                  env=dict(os.environ, PYTHONPATH=ROOT))

        result = yield deferToThread(show)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        lines = result.stdout.splitlines()
        self.assertEqual(lines[1], "  Used by rules: IN")
        # The client said QUIT: its milter connection is closed again.
        self.assertTrue(lines[2].startswith("  State idle, sessions 1, connections 1 (0 open), answers "), lines[2])
        self.assertEqual(lines[3], "  Verdicts: accept 1, reject 1")
        yield deferToThread(daemon.stop)
