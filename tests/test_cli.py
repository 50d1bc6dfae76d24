"""The mailguard command line an administrator trusts: version, show inspect, check warnings, clear, debug."""

import io
import json
import os
import smtplib
import stat
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from mailguard import cli
from mailguard.control import ControlService, answer, send
from mailguard.policy import INSPECT_KEYS, GlobalSettings
from mailguard.tracker import SessionTracker
from tests.test_logs import Daemon
from tests.test_plugin import TWISTD, free_port, installed

BASE = ("[inspect R]\nprotocol = esmtp\n[listener l]\nlisten = tcp:2525:interface=127.0.0.1\n"
        "backend = tcp:host=127.0.0.1:port=2526\ninspect = R\n")


class CLITestCase(SynchronousTestCase):
    """Runs ``mailguard`` in-process and captures what it prints."""

    def run_cli(self, *argv):
        """Run the command line; return (exit code, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = cli.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def policy(self, text):
        """Write a policy file; return its path."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path


class VersionTests(CLITestCase):
    """`mailguard --version` and the version in `twistd mailguard --help`."""

    def test_version(self):
        """`mailguard --version` prints mailguard's version and exits 0."""
        from mailguard import __version__

        code, out, err = self.run_cli("--version")
        self.assertEqual((code, out, err), (0, "mailguard %s\n" % cli.version(), ""))
        self.assertEqual(cli.version().split(".")[:2], __version__.split(".")[:2])

    def test_twistd_help(self):
        """`twistd mailguard --help` names mailguard's version; `twistd mailguard --version` prints it."""
        if not installed():
            raise SkipTest("mailguard is not installed in this Python: run `pip install .` (tox does)")
        result = subprocess.run(TWISTD + ["mailguard", "--help"], capture_output=True, timeout=60, cwd="/")
        self.assertIn(b"mailguard %s" % cli.version().encode(), result.stdout)
        result = subprocess.run(TWISTD + ["mailguard", "--version"], capture_output=True, timeout=60, cwd="/")
        self.assertEqual(result.stdout.strip(), b"mailguard %s" % cli.version().encode())


class ShowInspectTests(CLITestCase):
    """`mailguard show inspect` shows every effective key, like postconf."""

    def test_default_scope_and_every_key(self):
        """Without `all` it shows all, and every rule lists every key with its default resolved."""
        path = self.policy("[global]\nidle-time = 77\n" + BASE + "[inspect P]\nprotocol = pop3\n")
        code, out, err = self.run_cli("show", "inspect", "-c", path)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.run_cli("show", "inspect", "all", "-c", path)[1], out)
        lines = out.splitlines()
        for name in ("R", "P"):
            start = lines.index(" Inspection name %s" % name)
            block = []
            for line in lines[start + 2 :]:
                if not line.startswith("    "):
                    break
                block.append(line.strip())
            keys = [line.split(" = ")[0] for line in block]
            self.assertEqual(keys[: len(INSPECT_KEYS)], list(INSPECT_KEYS))
            self.assertIn("timeout = 77", block)  # from [global] idle-time
        pop3 = lines[lines.index(" Inspection name P") :]
        self.assertEqual(pop3[len(INSPECT_KEYS) + 2], "    secure-login = off")  # the plugin's own key
        self.assertIn("    mask-banner = off", lines)
        self.assertIn("    ehlo-keywords = 8BITMIME AUTH BINARYMIME CHUNKING DSN ENHANCEDSTATUSCODES ETRN HELP "
                      "PIPELINING SIZE SMTPUTF8", lines)
        self.assertIn("Log format is text, log file rotated at 1000000 bytes", lines)


class CheckWarningTests(CLITestCase):
    """`mailguard check`: warnings (exit 0), errors with --strict."""

    def check(self, text, *extra):
        return self.run_cli("check", "-c", self.policy(text), *extra)

    def test_clean(self):
        """A sensible policy: OK and no warning."""
        code, out, err = self.check(BASE)
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(out.endswith(": OK (1 listener, 1 rule)\n"))

    def test_each_warning(self):
        """Each almost-surely-wrong setting gives its own warning line, naming section and key."""
        cases = {
            BASE + "[inspect UNUSED]\nprotocol = smtp\n": "[inspect UNUSED]: no listener uses this rule",
            BASE.replace("protocol = esmtp", "protocol = esmtp\nehlo-keywords = SIZE STARTTLS"):
                "[inspect R] ehlo-keywords: STARTTLS is listed but tls = strip removes it",
            BASE.replace("protocol = esmtp", "protocol = esmtp\ntls = passthrough"):
                "[inspect R] tls: passthrough turns all inspection off after STARTTLS, SMTP smuggling defence",
            BASE.replace("port=2526", "port=2525"): "[listener l] backend: tcp:host=127.0.0.1:port=2525 is the "
                                                    "gateway's own listener l",
            BASE.replace("protocol = esmtp", "protocol = esmtp\nmax-data = 3000000000"):
                "[inspect R] max-data: 3000000000 is above 2^31 octets",
            BASE.replace("protocol = esmtp", "protocol = esmtp\ntimeout = 90000"):
                "[inspect R] timeout: 90000 seconds is more than a day",
            "[global]\nidle-time = 100000\n" + BASE.replace("protocol = esmtp", "protocol = esmtp\ntimeout = 60"): "[global] idle-time: 100000 seconds is more than a day",
        }
        for text, expected in cases.items():
            code, out, err = self.check(text)
            self.assertEqual(code, 0, err)
            self.assertIn(expected, err)
            self.assertTrue(err.startswith("warning: "), err)
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertIn(": OK (", out)
            code, out, err = self.check(text, "--strict")
            self.assertEqual((code, out), (1, ""))
            self.assertTrue(err.startswith("error: ") and expected in err, err)

    def test_loop_everywhere(self):
        """A listener on every interface and a backend on loopback at its port is a loop; another host is not."""
        text = BASE.replace("tcp:2525:interface=127.0.0.1", "tcp:2525")
        self.assertIn("mail would loop", self.check(text.replace("port=2526", "port=2525"))[2])
        self.assertEqual(self.check(text.replace("127.0.0.1:port=2526", "192.0.2.8:port=2525"))[2], "")


class ControlUnitTests(SynchronousTestCase):
    """The control socket's commands, on a tracker."""

    def test_answers(self):
        """debug switches the tracker's trace; an unknown session or command is an ERR line."""
        from twisted.internet.task import Clock

        tracker = SessionTracker(GlobalSettings(), Clock())
        self.assertEqual(answer(tracker, "debug smtp on"), "OK debug smtp on")
        self.assertTrue(tracker.tracing)
        self.assertEqual(answer(tracker, "DEBUG SMTP OFF"), "OK debug smtp off")
        self.assertFalse(tracker.tracing)
        self.assertEqual(answer(tracker, "clear session 4"), "ERR no session 4")
        self.assertTrue(answer(tracker, "reload").startswith("ERR unknown command"))


class ControlSocketTests(TestCase):
    """The control socket on a real unix socket."""

    @defer.inlineCallbacks
    def test_socket_mode_and_answers(self):
        """The socket is mode 0600 and answers each command line with one line."""
        from twisted.internet.task import Clock

        directory = tempfile.mkdtemp(prefix="mg", dir="/tmp")
        self.addCleanup(os.rmdir, directory)
        path = os.path.join(directory, "run", "c.sock")
        self.addCleanup(os.rmdir, os.path.dirname(path))
        tracker = SessionTracker(GlobalSettings(), Clock())
        service = ControlService(path, tracker, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)
        got = yield deferToThread(send, path, "debug smtp on")
        self.assertEqual(got, "OK debug smtp on")
        self.assertTrue(tracker.tracing)


class RunningGatewayTests(TestCase):
    """clear and debug against a daemonized twistd with two workers."""

    timeout = 180

    def setUp(self):
        if not installed():
            raise SkipTest("mailguard is not installed in this Python: run `pip install .` (tox does)")

    @defer.inlineCallbacks
    def test_clear_and_debug_with_workers(self):
        """show sessions lists <worker>-<n> ids; clear session closes that one; debug smtp on/off switches traces."""
        port, status = free_port(), free_port(2)  # a status port per worker
        while port in (status, status + 1):
            status = free_port(2)
        daemon = Daemon(self, "[global]\nworkers = 2\nlog-format = json\naudit-trail = on\nstatus = tcp:%d:interface=127.0.0.1\n"
                              "[inspect R]\nprotocol = esmtp\n[listener l]\nlisten = tcp:%d:interface=127.0.0.1\n"
                              "backend = embedded\ninspect = R\n" % (status, port))
        config = os.path.join(daemon.workdir, "policy.ini")
        cwd = os.getcwd()

        def mailguard(*argv):
            # The CLI resolves the policy's relative paths from where it runs, as an operator would.
            os.chdir(daemon.workdir)
            try:
                out, err = io.StringIO(), io.StringIO()
                old = sys.stdout, sys.stderr
                sys.stdout, sys.stderr = out, err
                try:
                    code = cli.main(list(argv) + ["-c", config])
                finally:
                    sys.stdout, sys.stderr = old
                return code, out.getvalue(), err.getvalue()
            finally:
                os.chdir(cwd)

        def traces():
            return [l for l in daemon.read().splitlines() if '"SMTP_TRACE"' in l]

        def scenario():
            daemon.start()
            daemon.wait_port(port, 2)
            sockets = [os.path.join(daemon.workdir, "var", "run", "mailguard.sock.%d" % i) for i in (0, 1)]
            modes = [stat.S_IMODE(os.stat(p).st_mode) for p in sockets]
            client = smtplib.SMTP("127.0.0.1", port, timeout=10)
            client.ehlo()
            deadline = time.monotonic() + 30
            while True:
                code, table, err = mailguard("show", "sessions")
                if code == 0 and "Session " in table:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError("no session shown: %r %r" % (table, err))
                time.sleep(0.2)
            sid = table.split()[1]
            unknown = mailguard("clear", "session", "9-1")
            cleared = mailguard("clear", "session", sid)
            try:
                client.noop()
                still = True
            except (smtplib.SMTPServerDisconnected, OSError):
                still = False
            client.close()
            before = len(traces())
            on = mailguard("debug", "smtp", "on")
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                c.ehlo()
            daemon.wait_log(lambda lines: len(traces()) > before, "traces")
            # The traced session is over (its audit trail logged), so no
            # more of its trace lines can follow the count below.
            daemon.wait_log(lambda lines: sum('"SESS_AUDIT_TRAIL"' in l for l in lines) >= 2, "2 sessions")
            off = mailguard("debug", "smtp", "off")
            after_off = len(traces())
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                c.ehlo()
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                c.ehlo()
            daemon.wait_log(lambda lines: sum('"SESS_AUDIT_TRAIL"' in l for l in lines) >= 4, "4 sessions")
            final = len(traces())
            daemon.stop()
            return modes, sid, unknown, cleared, still, on, off, after_off, final

        modes, sid, unknown, cleared, still, on, off, after_off, final = yield deferToThread(scenario)
        self.assertEqual(modes, [0o600, 0o600])
        self.assertRegex(sid, r"^[01]-\d+$")
        self.assertEqual(unknown[0], 1)
        self.assertIn("with workers a session id is <worker>-<n>", unknown[2])
        self.assertEqual(cleared[:2], (0, "session %s cleared\n" % sid))
        self.assertFalse(still)
        self.assertEqual(on[0], 0)
        self.assertEqual(len(on[1].splitlines()), 2)  # both workers answered
        self.assertEqual(off[0], 0)
        self.assertEqual(final, after_off)
        cleared_lines = [json.loads(l) for l in daemon.read().splitlines() if '"SESSION_CLEARED"' in l]
        self.assertEqual([o["session_id"] for o in cleared_lines], [sid])

    def test_no_gateway(self):
        """With nothing listening on the control socket, clear says so on one line and exits 1."""
        directory = tempfile.mkdtemp(prefix="mg", dir="/tmp")
        self.addCleanup(os.rmdir, directory)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[global]\ncontrol-socket = %s/c.sock\n" % directory + BASE)
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        self.assertEqual(cli.main(["clear", "session", "3", "-c", path]), 1)
        self.assertEqual(len(err.getvalue().splitlines()), 1)
        self.assertIn("no answer from the control socket %s/c.sock" % directory, err.getvalue())
