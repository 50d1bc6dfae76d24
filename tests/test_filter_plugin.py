"""The example message-filter plugin, pip-installed into a virtualenv, run by a real twistd in front of a real server."""

import os
import signal
import smtplib
import subprocess
import textwrap
import time

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.backends import RecordingBackend, listenBackend
from tests.test_plugins import example_venv, free_port, venv_env

# One listener per behaviour, each with its own [filter] section.
_FILTERS = {
    "reject": "reject-subject-words = forbidden",
    "recipient": "refuse-recipients = refuse@example.org",
    "slow": "delay = 2",
    "silent": "delay = 60\ntimeout = 1",
    "discard": "discard-subject-words = junk",
    "mark": "add-header = X-Example-Filter: passed",
}


def _message(subject):
    return ("From: a@example.org\r\nTo: b@example.org\r\nSubject: %s\r\n\r\nbody line\r\n.dotted\r\n" % subject).encode()


class ExampleFilterPluginTests(TestCase):
    """``plugin = example-filter`` through twistd: each behaviour observed at the client and at the server."""

    timeout = 300

    @defer.inlineCallbacks
    def setUp(self):
        self.work, self.python = yield deferToThread(example_venv)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.backend = RecordingBackend()
        backend_port = listenBackend(self, self.backend)
        self.ports = {name: free_port() for name in _FILTERS}
        sections = []
        for name, keys in _FILTERS.items():
            sections.append(textwrap.dedent(f"""\
                [inspect {name}]
                protocol = esmtp
                filters = {name}
                [filter {name}]
                plugin = example-filter
                """) + keys + textwrap.dedent(f"""
                [listener {name}]
                listen = tcp:{self.ports[name]}:interface=127.0.0.1
                backend = tcp:host=127.0.0.1:port={backend_port}
                inspect = {name}
                """))
        with open(os.path.join(self.dir, "policy.ini"), "w") as f:
            f.write("[global]\nspool-directory = spool\n" + "\n".join(sections))

    def start(self):
        """Run twistd mailguard on the policy."""
        twistd = [self.python, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]
        self.proc = subprocess.Popen(twistd + ["-n", "--pidfile=", "mailguard", "-c", "policy.ini"], cwd=self.dir,
                                     env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.output = []
        self.addCleanup(self.stop)

    def stop(self):
        """Stop twistd (SIGTERM) and return what it logged."""
        if not self.output:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.output.append(self.proc.communicate(timeout=30)[0])
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.output.append(self.proc.communicate()[0])
        return self.output[0]

    def connect(self, name):
        """smtplib connected to listener ``name``, once twistd listens."""
        deadline = time.monotonic() + 60
        while True:
            try:
                return smtplib.SMTP("127.0.0.1", self.ports[name], timeout=15)
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.1)

    @defer.inlineCallbacks
    def test_behaviours(self):
        """Reject, refuse a recipient, answer late, time out, discard and add a header, as the policy says."""
        self.start()

        def talk():
            results = {}
            with self.connect("reject") as c:
                try:
                    c.sendmail("a@example.org", ["b@example.org"], _message("a forbidden word"))
                except smtplib.SMTPDataError as e:
                    results["reject"] = e.smtp_code
                c.sendmail("a@example.org", ["b@example.org"], _message("fine one"))
            with self.connect("recipient") as c:
                results["recipient"] = c.sendmail("a@example.org", ["refuse@example.org", "ok@example.org"],
                                                  _message("fine two"))
            with self.connect("slow") as c:
                results["slow"] = c.sendmail("a@example.org", ["b@example.org"], _message("fine three"))
            with self.connect("silent") as c:
                try:
                    c.sendmail("a@example.org", ["b@example.org"], _message("never answered"))
                except smtplib.SMTPDataError as e:
                    results["silent"] = e.smtp_code
            with self.connect("discard") as c:
                results["discard"] = c.sendmail("a@example.org", ["b@example.org"], _message("junk mail"))
            with self.connect("mark") as c:
                c.sendmail("a@example.org", ["b@example.org"], _message("fine four"))
            return results

        results = yield deferToThread(talk)
        self.assertEqual(results, {"reject": 550, "recipient": {"refuse@example.org": (
            550, b"5.7.1 Recipient refused by example-filter")}, "slow": {}, "silent": 451, "discard": {}})
        subjects = [m.data.split(b"Subject: ")[1].split(b"\n")[0] for m in self.backend.messages]
        self.assertEqual(subjects, [b"fine one", b"fine two", b"fine three", b"fine four"])
        self.assertEqual(self.backend.messages[1].rcpt_to, [b"ok@example.org"])
        self.assertIn(b"\nX-Example-Filter: passed\n\nbody line\n.dotted\n", self.backend.messages[3].data)
        received = b"".join(bytes(c.received) for c in self.backend.connections)
        for never in (b"forbidden", b"refuse@", b"never answered", b"junk"):
            self.assertNotIn(never, received)
        log = yield deferToThread(self.stop)
        self.assertIn(b"FILTER_FAILED", log)
        self.assertIn(b"MESSAGE_DISCARDED", log)
        self.assertEqual(os.listdir(os.path.join(self.dir, "spool")), [])

    def test_check(self):
        """`mailguard check` loads the installed filter plugin and reports its bad values on one line."""
        mailguard = os.path.join(os.path.dirname(self.python), "mailguard")
        result = subprocess.run([mailguard, "check", "-c", "policy.ini"], cwd=self.dir, capture_output=True, timeout=60,
                                env=venv_env())
        self.assertEqual(result.returncode, 0, result.stderr)
        with open(os.path.join(self.dir, "policy.ini")) as f:
            text = f.read()
        with open(os.path.join(self.dir, "bad.ini"), "w") as f:
            f.write(text.replace("delay = 2", "delay = soon"))
        result = subprocess.run([mailguard, "check", "-c", "bad.ini"], cwd=self.dir, capture_output=True, timeout=60,
                                env=venv_env())
        self.assertEqual((result.returncode, result.stderr.decode()),
                         (1, "bad.ini: [filter slow] delay: bad value 'soon': expected a number of seconds\n"))
