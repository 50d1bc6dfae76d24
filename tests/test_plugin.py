"""Tests of the installed command-line tools: the twistd plugin and ``mailguard check``."""

import os
import signal
import smtplib
import subprocess
import sys
import time

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase
from tests.clients import free_port

TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


def installed():
    """True when mailguard is importable outside the source tree (pip install . was run)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import mailguard"], cwd="/", capture_output=True, timeout=60
    )
    return probe.returncode == 0




class TwistdPluginTests(TestCase):
    """``twistd mailguard`` as a user runs it, from an installed package."""

    timeout = 120

    def setUp(self):
        if not installed():
            raise SkipTest("mailguard is not installed in this Python: run `pip install .` (tox does)")
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)

    def run_twistd(self, *args, timeout=60):
        return subprocess.run(TWISTD + list(args), cwd=self.workdir, capture_output=True, timeout=timeout)

    def test_help_lists_plugin(self):
        """`twistd --help` lists the mailguard plugin after a non-editable install."""
        result = self.run_twistd("--help")
        self.assertIn(b"mailguard", result.stdout)

    def test_bad_policy_one_line(self):
        """A bad policy stops start-up with exit 1 and one stderr line naming file, section and key."""
        with open(os.path.join(self.workdir, "bad.ini"), "w") as f:
            f.write("[inspect X]\nprotocol = smtp\nmax-data = lots\n")
        result = self.run_twistd("-n", "--pidfile=", "mailguard", "-c", "bad.ini")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr.decode().splitlines(),
            ["bad.ini: [inspect X] max-data: bad value 'lots': expected a whole number >= 1"],
        )

    @defer.inlineCallbacks
    def test_run_and_deliver(self):
        """twistd -n mailguard with an embedded backend delivers a smtplib message into the Maildir."""
        port = free_port()
        with open(os.path.join(self.workdir, "policy.ini"), "w") as f:
            f.write(
                "[inspect R]\nprotocol = esmtp\n[listener l]\n"
                "listen = tcp:%d:interface=127.0.0.1\nbackend = embedded\ninspect = R\n" % port
            )
        proc = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "mailguard", "-c", "policy.ini"],
            cwd=self.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

        def stop():
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)

        self.addCleanup(stop)

        def send():
            deadline = time.monotonic() + 30
            while True:
                try:
                    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    time.sleep(0.1)
            with client:
                client.sendmail("a@example.org", ["b@example.org"], b"Subject: hi\r\n\r\nbody\r\n")

        yield deferToThread(send)
        new = os.path.join(self.workdir, "var", "maildir", "new")
        files = os.listdir(new)
        self.assertEqual(len(files), 1)
        with open(os.path.join(new, files[0]), "rb") as f:
            self.assertEqual(f.read(), b"Subject: hi\n\nbody\n")
