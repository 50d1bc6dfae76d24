"""Operating the gateway: start-up failures, reload, workers and their supervisor, bursts, with a real twistd."""

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from mailguard import cli
from tests.test_plugin import TWISTD, free_port

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=HERE)
RULE = "[inspect R]\nprotocol = esmtp\n"


def listener(name, listen, extra=""):
    """A [listener NAME] section delivering into the embedded backend."""
    return "[listener %s]\nlisten = %s\nbackend = embedded\ninspect = R\n%s" % (name, listen, extra)


def wait_until(predicate, what, seconds=30):
    """Poll ``predicate`` every 0.1 s until true; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.1)


def greeting(port, timeout=10):
    """The first reply line read from 127.0.0.1:``port``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        return s.makefile("rb").readline()


def answers(port):
    """True when something greets on 127.0.0.1:``port``."""
    try:
        return greeting(port, 2).startswith(b"220")
    except OSError:
        return False


def alive(pid):
    """True when ``pid`` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children(pid):
    """PIDs of the direct children of ``pid``."""
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class Workdir:
    """A directory holding one gateway's policy, pidfile and log."""

    def __init__(self, case):
        self.path = os.path.abspath(case.mktemp())
        os.makedirs(self.path)

    def write(self, text, name="policy.ini"):
        """Write the policy file."""
        with open(os.path.join(self.path, name), "w") as f:
            f.write(text)
        return name

    def join(self, *names):
        """A path inside the directory."""
        return os.path.join(self.path, *names)

    def run(self, *args, prefix=(), timeout=60):
        """Run twistd to completion (for failures); return the CompletedProcess."""
        return subprocess.run(list(prefix) + TWISTD + list(args), cwd=self.path, env=ENV, capture_output=True,
                              timeout=timeout)

    def log(self):
        """The daemon's log so far."""
        try:
            with open(self.join("twistd.log")) as f:
                return f.read()
        except OSError:
            return ""


DAEMON = ("--pidfile=twistd.pid", "--logfile=twistd.log")
FOREGROUND = ("-n", "--pidfile=")


class StartupFailureTests(TestCase):
    """Every start-up failure is one line naming file, section, key and problem, exit 1, no traceback."""

    timeout = 120

    def setUp(self):
        self.dir = Workdir(self)

    def assertOneLine(self, result, expected):
        lines = result.stderr.decode().splitlines()
        self.assertEqual((result.returncode, lines), (1, [expected]), result.stdout.decode()[-2000:])
        self.assertFalse(os.path.exists(self.dir.join("twistd.pid")))

    def test_port_in_use(self):
        """A port another program listens on: foreground and daemon say so in one line."""
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            self.dir.write(RULE + listener("l", "tcp:%d:interface=127.0.0.1" % port))
            expected = ("policy.ini: [listener l] listen: cannot listen on 127.0.0.1:%d: address already in use "
                        "(another program, or another gateway, listens there)" % port)
            for mode in (FOREGROUND, DAEMON):
                self.assertOneLine(self.dir.run(*mode, "mailguard", "-c", "policy.ini"), expected)

    def test_port_out_of_range(self):
        """listen = tcp:70000 is refused before anything is bound, in daemon mode too."""
        self.dir.write(RULE + listener("l", "tcp:70000"))
        self.assertOneLine(self.dir.run(*DAEMON, "mailguard", "-c", "policy.ini"),
                           "policy.ini: [listener l] listen: bad value 'tcp:70000': not a valid server endpoint "
                           "description (port 70000 out of range (0-65535))")

    def test_same_address_twice(self):
        """Two listeners on one address: one line at start-up, and from mailguard check."""
        port = free_port()
        self.dir.write(RULE + listener("a", "tcp:%d" % port) + listener("b", "tcp:%d:interface=127.0.0.1" % port))
        expected = ("policy.ini: [listener b] listen: 127.0.0.1:%d is already the address of [listener a] "
                    "(0.0.0.0:%d)" % (port, port))
        self.assertOneLine(self.dir.run(*DAEMON, "mailguard", "-c", "policy.ini"), expected)
        result = subprocess.run([sys.executable, "-m", "mailguard.cli", "check", "-c", "policy.ini"],
                                cwd=self.dir.path, env=ENV, capture_output=True, timeout=60)
        self.assertEqual((result.returncode, result.stderr.decode().splitlines()), (1, [expected]))

    def test_maildir_cannot_be_created(self):
        """A maildir under /proc is refused with the OS's reason, in daemon mode too."""
        self.dir.write(RULE + listener("l", "tcp:%d:interface=127.0.0.1" % free_port(), "maildir = /proc/nope\n"))
        self.assertOneLine(self.dir.run(*DAEMON, "mailguard", "-c", "policy.ini"),
                           "policy.ini: [listener l] maildir: cannot create /proc/nope: No such file or directory")

    def test_ipv6_colons(self):
        """An unescaped IPv6 interface gets the escaping rule, not Twisted's parser internals."""
        self.dir.write(RULE + listener("l", "tcp6:%d:interface=::1" % free_port()))
        result = self.dir.run(*FOREGROUND, "mailguard", "-c", "policy.ini")
        self.assertEqual(result.returncode, 1)
        self.assertIn(r"colons in an IPv6 address must be escaped as \:", result.stderr.decode())
        self.assertNotIn("_parseServer", result.stderr.decode())

    def without(self, *capabilities):
        """A setpriv prefix running twistd as root without ``capabilities`` (skipped without setpriv)."""
        if os.geteuid() != 0 or not os.path.exists("/usr/bin/setpriv"):
            raise SkipTest("needs root and setpriv (util-linux) to take a capability away")
        spec = ",".join("-" + c for c in capabilities)
        return ("/usr/bin/setpriv", "--bounding-set", spec, "--inh-caps", spec)

    def test_permission_denied(self):
        """Binding a port below 1024 without the capability: one line, daemon mode too."""
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            first = int(f.read())
        if first <= 1:
            raise SkipTest("every port is unprivileged on this host (net.ipv4.ip_unprivileged_port_start)")
        prefix = self.without("net_bind_service")
        port = first - 1
        self.dir.write(RULE + listener("l", "tcp:%d:interface=127.0.0.1" % port))
        self.assertOneLine(self.dir.run(*DAEMON, "mailguard", "-c", "policy.ini", prefix=prefix),
                           "policy.ini: [listener l] listen: cannot listen on 127.0.0.1:%d: permission denied "
                           "(ports below 1024 need root or CAP_NET_BIND_SERVICE)" % port)

    def test_unreadable_certificate(self):
        """An ssl: listener whose key file cannot be read: one line, daemon mode too."""
        import trustme

        cert = trustme.CA().issue_cert("localhost")
        pki = {"cert": self.dir.join("cert.pem"), "key": self.dir.join("key.pem")}
        cert.cert_chain_pems[0].write_to_path(pki["cert"])
        cert.private_key_pem.write_to_path(pki["key"])
        os.chmod(pki["key"], 0)
        prefix = self.without("dac_override", "dac_read_search")
        self.dir.write(RULE + listener("l", "ssl:%d:interface=127.0.0.1:privateKey=%s:certKey=%s"
                                       % (free_port(), pki["key"], pki["cert"])))
        result = self.dir.run(*DAEMON, "mailguard", "-c", "policy.ini", prefix=prefix)
        self.assertEqual(result.returncode, 1)
        [line] = result.stderr.decode().splitlines()
        self.assertTrue(line.startswith("policy.ini: [listener l] listen: bad value 'ssl:"), line)
        self.assertIn("Permission denied: %r" % pki["key"], line)
