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
            raise SkipTest("needs root and /usr/bin/setpriv (Debian package util-linux) to take a capability away: "
                           "run the suite as root, as .ci/run does")
        spec = ",".join("-" + c for c in capabilities)
        return ("/usr/bin/setpriv", "--bounding-set", spec, "--inh-caps", spec)

    def test_permission_denied(self):
        """Binding a port below 1024 without the capability: one line, daemon mode too."""
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            first = int(f.read())
        if first <= 1:
            raise SkipTest("every port is unprivileged on this host (net.ipv4.ip_unprivileged_port_start is %d): "
                           "set it to 1024 to test binding a privileged port" % first)
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


class Gateway:
    """A daemonized twistd mailguard in a `Workdir`, driven from a test thread."""

    def __init__(self, workdir, policy, daemon=True):
        self.dir = workdir
        self.policy = workdir.join(workdir.write(policy))
        self.pidfile = workdir.join("twistd.pid")
        self.proc = None
        args = (DAEMON if daemon else FOREGROUND) + ("mailguard", "-c", self.policy)
        if daemon:
            result = workdir.run(*args)
            if result.returncode != 0:
                raise AssertionError("twistd did not start: %r" % result.stderr.decode())
            self.pid = wait_until(self._read_pid, "the pidfile")
        else:
            self.proc = subprocess.Popen(TWISTD + list(args), cwd=workdir.path, env=ENV,
                                         stdout=open(workdir.join("twistd.log"), "w"), stderr=subprocess.STDOUT)
            self.pid = self.proc.pid

    def _read_pid(self):
        try:
            with open(self.pidfile) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    def rewrite(self, policy):
        """Replace the policy file (the running gateway reads it on reload)."""
        self.dir.write(policy, os.path.basename(self.policy))

    def reload(self):
        """`mailguard reload` against this gateway's pidfile; its exit code."""
        return cli.main(["reload", "-c", self.policy, "--pidfile", self.pidfile])

    def wait_log(self, text, count=1, seconds=30):
        """Wait until ``text`` is in the log ``count`` times; return the log."""
        return wait_until(lambda: self.dir.log().count(text) >= count and self.dir.log(), text, seconds)

    def stop(self):
        """SIGTERM, then wait (bounded) for the process to go; SIGKILL what is left."""
        if alive(self.pid):
            os.kill(self.pid, signal.SIGTERM)
            try:
                wait_until(lambda: not alive(self.pid), "the gateway to stop", 60)
            except AssertionError:
                os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)


def connect_burst(port, count, during=None, after=50):
    """Open ``count`` connections one after another, calling ``during()`` after ``after`` of them.

    Returns how many were greeted with 220.
    """
    greeted = 0
    for i in range(count):
        if i == after and during is not None:
            during()
        try:
            if greeting(port).startswith(b"220"):
                greeted += 1
        except OSError:
            pass
    return greeted


class DataSession:
    """An SMTP session on a raw socket that can stop in the middle of a message."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.lines = self.sock.makefile("rb")
        self.reply()

    def reply(self):
        """The next whole reply (its last line)."""
        while True:
            line = self.lines.readline()
            if line[3:4] != b"-":
                return line

    def command(self, line):
        """Send a command line; return its reply."""
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self):
        """Close the socket."""
        self.sock.close()


def big_body(size):
    """``size`` bytes of message body in 78-octet lines."""
    line = b"x" * 76 + b"\r\n"
    return b"Subject: big\r\n\r\n" + line * (size // len(line))


class ReloadTests(TestCase):
    """SIGHUP and `mailguard reload`: all or nothing, sessions keep their policy, sockets stay open."""

    timeout = 240

    def setUp(self):
        self.dir = Workdir(self)

    def start(self, policy, daemon=True):
        gateway = Gateway(self.dir, policy, daemon)
        self.addCleanup(gateway.stop)
        return gateway

    @defer.inlineCallbacks
    def test_reload_single_process(self):
        """A 5 MB message in flight completes with 250, 200 connections are all greeted, new sessions get the new policy."""
        keep, gone, new = free_port(), free_port(), free_port()
        before = RULE + listener("keep", "tcp:%d:interface=127.0.0.1" % keep) + \
            listener("gone", "tcp:%d:interface=127.0.0.1" % gone)
        after = RULE + "max-data = 1000\n" + listener("keep", "tcp:%d:interface=127.0.0.1" % keep) + \
            listener("new", "tcp:%d:interface=127.0.0.1" % new)

        def scenario():
            gateway = Gateway(self.dir, before)
            self.addCleanup(gateway.stop)
            wait_until(lambda: answers(keep), "the gateway to greet")
            body = big_body(5 * 1024 * 1024)
            inflight = DataSession(keep)
            for line in (b"EHLO test", b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.org>"):
                assert inflight.command(line).startswith(b"250"), line
            assert inflight.command(b"DATA").startswith(b"354")
            inflight.sock.sendall(body[: len(body) // 2])

            def hup():
                gateway.rewrite(after)
                assert gateway.reload() == 0

            greeted = connect_burst(keep, 200, hup)
            log = gateway.wait_log("POLICY_RELOADED")
            inflight.sock.sendall(body[len(body) // 2:] + b".\r\n")
            final = inflight.reply()
            inflight.close()
            with smtplib.SMTP("127.0.0.1", keep, timeout=30) as client:
                try:
                    client.sendmail("a@example.org", ["b@example.org"], big_body(5000))
                    refused = None
                except (smtplib.SMTPDataError, smtplib.SMTPSenderRefused) as e:
                    refused = e.smtp_code
            return final, greeted, refused, answers(new), answers(gone), log

        final, greeted, refused, new_up, gone_up, log = yield deferToThread(scenario)
        self.assertTrue(final.startswith(b"250"), final)
        self.assertEqual(greeted, 200)
        self.assertEqual(refused, 552)
        self.assertTrue(new_up)
        self.assertFalse(gone_up)
        self.assertNotIn("Traceback", log)
        self.assertEqual(len(os.listdir(self.dir.join("var", "maildir", "new"))), 1)

    @defer.inlineCallbacks
    def test_failed_reload_keeps_old_policy(self):
        """A policy that fails: `mailguard reload` refuses it, SIGHUP logs one line, the old policy serves on."""
        port = free_port()
        good = RULE + listener("l", "tcp:%d:interface=127.0.0.1" % port)

        def scenario():
            gateway = Gateway(self.dir, good)
            self.addCleanup(gateway.stop)
            wait_until(lambda: answers(port), "the gateway to greet")
            gateway.rewrite(good.replace("protocol = esmtp\n", "protocol = esmtp\nmax-data = lots\n"))
            refused = gateway.reload()
            os.kill(gateway.pid, signal.SIGHUP)
            log = gateway.wait_log("POLICY_RELOAD_FAILED")
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.sendmail("a@example.org", ["b@example.org"], big_body(50000))
            return refused, log, alive(gateway.pid)

        refused, log, up = yield deferToThread(scenario)
        self.assertEqual(refused, 1)
        self.assertTrue(up)
        [line] = [x for x in log.splitlines() if "POLICY_RELOAD_FAILED" in x]
        self.assertTrue(line.endswith("POLICY_RELOAD_FAILED: %s: [inspect R] max-data: bad value 'lots': "
                                      "expected a whole number >= 1" % self.dir.join("policy.ini")), line)
        self.assertNotIn("POLICY_RELOADED", log)
        self.assertEqual(len(os.listdir(self.dir.join("var", "maildir", "new"))), 1)

    def test_reload_without_gateway(self):
        """`mailguard reload` with no live process behind the pidfile exits 1."""
        path = self.dir.join(self.dir.write(RULE + listener("l", "tcp:%d:interface=127.0.0.1" % free_port())))
        with open(self.dir.join("twistd.pid"), "w") as f:
            f.write("999999999\n")
        self.assertEqual(cli.main(["reload", "-c", path, "--pidfile", self.dir.join("twistd.pid")]), 1)


class WorkerOperationTests(TestCase):
    """workers = 2 in daemon mode: reload through the supervisor, and workers that never outlive it."""

    timeout = 240

    def setUp(self):
        self.dir = Workdir(self)

    def policy(self, port, extra=""):
        return "[global]\nworkers = 2\n" + RULE + extra + listener("l", "tcp:%d:interface=127.0.0.1" % port)

    @defer.inlineCallbacks
    def test_reload_with_workers(self):
        """A reload starts new workers on the new policy, drains the old, and greets all 200 connections meanwhile."""
        port = free_port()

        def scenario():
            gateway = Gateway(self.dir, self.policy(port))
            self.addCleanup(gateway.stop)
            wait_until(lambda: len(children(gateway.pid)) == 2 and answers(port), "two workers")
            old = sorted(children(gateway.pid))

            def hup():
                gateway.rewrite(self.policy(port, "max-data = 1000\n"))
                assert gateway.reload() == 0

            greeted = connect_burst(port, 200, hup)
            log = gateway.wait_log("POLICY_RELOADED")
            wait_until(lambda: not any(alive(pid) for pid in old), "the old workers to drain and exit")
            new = sorted(children(gateway.pid))
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                try:
                    client.sendmail("a@example.org", ["b@example.org"], big_body(5000))
                    refused = None
                except (smtplib.SMTPDataError, smtplib.SMTPSenderRefused) as e:
                    refused = e.smtp_code
            return old, new, greeted, refused, log

        old, new, greeted, refused, log = yield deferToThread(scenario)
        self.assertEqual(greeted, 200)
        self.assertEqual(len(new), 2)
        self.assertFalse(set(old) & set(new))
        self.assertEqual(refused, 552)
        self.assertNotIn("Traceback", log)

    @defer.inlineCallbacks
    def test_failed_worker_reload(self):
        """With workers, a policy that fails keeps the same workers serving and logs one line."""
        port = free_port()

        def scenario():
            gateway = Gateway(self.dir, self.policy(port))
            self.addCleanup(gateway.stop)
            wait_until(lambda: len(children(gateway.pid)) == 2 and answers(port), "two workers")
            old = sorted(children(gateway.pid))
            gateway.rewrite(self.policy(port).replace("workers = 2", "workers = 3"))
            os.kill(gateway.pid, signal.SIGHUP)
            log = gateway.wait_log("POLICY_RELOAD_FAILED")
            return old, sorted(children(gateway.pid)), answers(port), log

        old, now, up, log = yield deferToThread(scenario)
        self.assertEqual(old, now)
        self.assertTrue(up)
        self.assertIn("[global] workers: changing the number of workers (2 to 3) needs a restart", log)

    @defer.inlineCallbacks
    def test_supervisor_killed(self):
        """The pidfile names the supervisor; SIGKILL to it leaves no worker alive once they drain."""
        port = free_port()

        def scenario():
            gateway = Gateway(self.dir, self.policy(port))
            self.addCleanup(gateway.stop)
            workers = wait_until(lambda: len(children(gateway.pid)) == 2 and answers(port)
                                 and children(gateway.pid), "two workers")
            with open("/proc/%d/cmdline" % gateway.pid, "rb") as f:
                supervisor = f.read()
            os.kill(gateway.pid, signal.SIGKILL)
            wait_until(lambda: not any(alive(pid) for pid in workers), "the workers to exit", 60)
            return supervisor, workers, answers(port)

        supervisor, workers, up = yield deferToThread(scenario)
        self.assertIn(b"mailguard", supervisor)
        self.assertNotIn(b"mailguard.workers", supervisor)
        self.assertEqual(len(workers), 2)
        self.assertFalse(up)

    @defer.inlineCallbacks
    def test_supervisor_killed_foreground(self):
        """In the foreground, each worker that loses its supervisor says so in the log before it exits."""
        port = free_port()

        def scenario():
            gateway = Gateway(self.dir, self.policy(port), daemon=False)
            self.addCleanup(gateway.stop)
            workers = wait_until(lambda: len(children(gateway.pid)) == 2 and answers(port)
                                 and children(gateway.pid), "two workers")
            gateway.proc.kill()
            gateway.proc.wait(30)
            wait_until(lambda: not any(alive(pid) for pid in workers), "the workers to exit", 60)
            return gateway.wait_log("SUPERVISOR_LOST", 2)

        log = yield deferToThread(scenario)
        self.assertEqual(log.count("SUPERVISOR_LOST: the supervisor is gone; draining and exiting"), 2)


def burst(port, count, seconds):
    """Open ``count`` connections at once and read their greetings; return how many got a 220.

    Every connect is started before any greeting is read; the whole burst
    is bounded by ``seconds``.
    """
    import selectors

    selector = selectors.DefaultSelector()
    pending = {}
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        selector.register(s, selectors.EVENT_READ)
        pending[s] = b""
    greeted = 0
    deadline = time.monotonic() + seconds
    try:
        while pending and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                s = key.fileobj
                try:
                    data = s.recv(512)
                except OSError:
                    data = b""
                pending[s] += data
                if b"\n" in pending[s] or not data:
                    greeted += pending[s].startswith(b"220")
                    selector.unregister(s)
                    del pending[s]
                    s.close()
    finally:
        for s in pending:
            s.close()
        selector.close()
    return greeted


class BurstTests(TestCase):
    """A deep accept backlog: bursts of connections are queued by the kernel, not dropped."""

    timeout = 180

    @defer.inlineCallbacks
    def test_thousand_at_once(self):
        """1,000 simultaneous connections, under limits that admit them all, are all greeted."""
        workdir = Workdir(self)
        port = free_port()
        policy = ("[global]\nmax-incomplete-high = 5000\nmax-incomplete-low = 4000\none-minute-high = 5000\n"
                  "one-minute-low = 4000\nmax-incomplete-host = 5000\n" + RULE
                  + listener("l", "tcp:%d:interface=127.0.0.1" % port))

        def scenario():
            gateway = Gateway(workdir, policy, daemon=False)
            self.addCleanup(gateway.stop)
            wait_until(lambda: answers(port), "the gateway to greet")
            queue = None
            if os.path.exists("/usr/bin/ss"):
                out = subprocess.run(["/usr/bin/ss", "-ltnH", "sport = :%d" % port], capture_output=True,
                                     text=True, timeout=30).stdout.split()
                queue = int(out[2]) if len(out) > 2 else None
            # Generous: the point is that none waits out SYN retransmission, not speed.
            return burst(port, 1000, 90), queue

        greeted, queue = yield deferToThread(scenario)
        self.assertEqual(greeted, 1000)
        if queue is not None:  # ss shows a listener's accept backlog as its Send-Q
            self.assertEqual(queue, 1024)


class AfterEOFServer:
    """A loopback server that reads until the client's FIN, then answers with what it read, upper-cased, and closes."""

    def __init__(self):
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(60)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        """Answer one connection after another until closed."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(30)
                data = b""
                try:
                    while True:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(data.upper())
                except OSError:
                    pass

    def close(self):
        """Stop accepting."""
        self.sock.close()


class HalfCloseTests(TestCase):
    """protocol = tcp passes a client's FIN on and relays the server's answer back."""

    timeout = 120

    @defer.inlineCallbacks
    def test_half_close_relayed(self):
        """A client that writes, then shuts down its sending side, gets the answer the server sends after the FIN."""
        server = AfterEOFServer()
        self.addCleanup(server.close)
        workdir = Workdir(self)
        port = free_port()
        policy = ("[inspect RAW]\nprotocol = tcp\n[listener l]\nlisten = tcp:%d:interface=127.0.0.1\n"
                  "backend = tcp:host=127.0.0.1:port=%d\ninspect = RAW\n" % (port, server.port))

        def exchange(payload, pause=False):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                if pause:
                    time.sleep(0.5)  # the backend is connected before the FIN, in this variant
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                got = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        return got
                    got += chunk

        def scenario():
            gateway = Gateway(workdir, policy, daemon=False)
            self.addCleanup(gateway.stop)

            def up():
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=2):
                        return True
                except OSError:
                    return False

            wait_until(up, "the gateway to listen")
            return exchange(b"hello\r\n"), exchange(b"x" * 300000, pause=True)

        early, late = yield deferToThread(scenario)
        self.assertEqual(early, b"HELLO\r\n")
        self.assertEqual(late, b"X" * 300000)


class PrivilegeTests(TestCase):
    """twistd -u/-g: sockets, Maildir and imports are done as root, the sessions run as the user."""

    timeout = 120

    @defer.inlineCallbacks
    def test_user_and_group(self):
        """With -u/-g nobody, a message is delivered into a Maildir owned by that user, served by that user."""
        if os.geteuid() != 0:
            raise SkipTest("twistd -u/-g needs root: run the suite as root, as .ci/run does")
        workdir = Workdir(self)
        # The user must reach its Maildir: open up the test's own directories (mkdtemp makes them 0700).
        path = workdir.path
        while os.path.basename(path) != "_trial_temp" and path != os.path.dirname(path):
            os.chmod(path, 0o755)
            path = os.path.dirname(path)
        port = free_port()

        def scenario():
            gateway = Gateway.__new__(Gateway)
            gateway.dir, gateway.proc = workdir, None
            gateway.policy = workdir.join(workdir.write(RULE + listener("l", "tcp:%d:interface=127.0.0.1" % port)))
            gateway.pidfile = workdir.join("twistd.pid")
            result = workdir.run(*DAEMON, "-u", "65534", "-g", "65534", "mailguard", "-c", gateway.policy)
            assert result.returncode == 0, result.stderr
            gateway.pid = wait_until(gateway._read_pid, "the pidfile")
            self.addCleanup(gateway.stop)
            wait_until(lambda: answers(port), "the gateway to greet")
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo()
                client.sendmail("a@example.org", ["b@example.org"], b"Subject: as nobody\r\n\r\nbody\r\n")
            with open("/proc/%d/status" % gateway.pid) as f:
                uids = [line.split()[1:] for line in f if line.startswith(("Uid:", "Gid:"))]
            new = workdir.join("var", "maildir", "new")
            files = os.listdir(new)
            owners = {(os.stat(p).st_uid, os.stat(p).st_gid) for p in [new] + [os.path.join(new, f) for f in files]}
            return uids, len(files), owners, workdir.log()

        uids, count, owners, log = yield deferToThread(scenario)
        self.assertEqual(uids, [["65534"] * 4, ["65534"] * 4])
        self.assertEqual(count, 1)
        self.assertEqual(owners, {(65534, 65534)})
        self.assertNotIn("Traceback", log)


class OneInstanceTests(TestCase):
    """A second gateway on the same listen address is refused, naming the running one."""

    timeout = 120

    @defer.inlineCallbacks
    def test_second_gateway_refused(self):
        """With workers or without, a second twistd on the address exits 1 with one line naming the first's pid."""
        from mailguard.service import LOCK_DIR

        port = free_port()
        first, second = Workdir(self), Workdir(self)
        policy = "[global]\nworkers = 2\n" + RULE + listener("l", "tcp:%d:interface=127.0.0.1" % port)

        def scenario():
            gateway = Gateway(first, policy)
            self.addCleanup(gateway.stop)
            wait_until(lambda: answers(port), "the first gateway to greet")
            second.write(policy)
            with_workers = second.run(*DAEMON, "mailguard", "-c", "policy.ini")
            second.write(policy.replace("workers = 2\n", ""))
            alone = second.run(*FOREGROUND, "mailguard", "-c", "policy.ini")
            return gateway.pid, with_workers, alone, answers(port)

        pid, with_workers, alone, up = yield deferToThread(scenario)
        expected = ("policy.ini: [listener l] listen: 127.0.0.1:%d is served by the running gateway with pid %d "
                    "(lock %s)" % (port, pid, os.path.join(LOCK_DIR, "mailguard-127.0.0.1:%d.lock" % port)))
        for result in (with_workers, alone):
            self.assertEqual((result.returncode, result.stderr.decode().splitlines()), (1, [expected]))
        self.assertTrue(up)


class ControlSocketTests(TestCase):
    """Two gateways in one directory: the second is refused on one line, naming who holds the control socket."""

    timeout = 90

    @defer.inlineCallbacks
    def test_second_gateway_same_directory(self):
        """A second gateway (other port, same directory) exits 1 with one line about [global] control-socket."""
        work = Workdir(self)
        first, second = free_port(), free_port()

        def scenario():
            gateway = Gateway(work, RULE + listener("l", "tcp:%d:interface=127.0.0.1" % first))
            self.addCleanup(gateway.stop)
            wait_until(lambda: answers(first), "the first gateway to greet")
            work.write(RULE + listener("l", "tcp:%d:interface=127.0.0.1" % second), name="other.ini")
            return gateway.pid, work.run(*FOREGROUND, "mailguard", "-c", "other.ini")

        pid, result = yield deferToThread(scenario)
        self.assertEqual((result.returncode, result.stderr.decode().splitlines()), (1, [
            "other.ini: [global] control-socket: %s is held by the running gateway with pid %d (give each gateway "
            "its own control-socket, or run it in its own directory)" % ("var/run/mailguard.sock", pid)]))
        self.assertFalse(answers(second))


class SamePidfileTests(TestCase):
    """A second gateway given the pidfile of a running one is refused on one line naming its pid."""

    timeout = 60

    @defer.inlineCallbacks
    def test_same_pidfile_refused(self):
        """twistd --pidfile naming a live process exits 1 with one line, before anything is bound."""
        work = Workdir(self)
        port = free_port()
        work.write(RULE + listener("l", "tcp:%d:interface=127.0.0.1" % port))
        live = os.getpid()  # this test process stands for the running gateway
        with open(work.join("twistd.pid"), "w") as f:
            f.write("%d\n" % live)
        result = yield deferToThread(work.run, *DAEMON, "mailguard", "-c", "policy.ini")
        self.assertEqual((result.returncode, result.stderr.decode().splitlines()),
                         (1, ["twistd.pid: a gateway is already running with pid %d (stop it, or give another "
                              "--pidfile)" % live]))
        self.assertFalse(answers(port))


ACTIVATE = """\
import os, socket, sys
# What systemd does for a socket unit: the listening socket is fd 3, named in the environment.
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="smtp")
os.execv(sys.executable, [sys.executable, "-c",
         "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"] + sys.argv[2:])
"""


class SystemdTests(TestCase):
    """Socket activation: a systemd: listener accepts on the socket systemd passes."""

    timeout = 120

    @defer.inlineCallbacks
    def test_socket_activation(self):
        """listen = systemd:domain=INET:index=0 serves the inherited socket; without one, one line."""
        workdir = Workdir(self)
        workdir.write(ACTIVATE, "activate.py")
        workdir.write(RULE + listener("l", "systemd:domain=INET:index=0"))
        port = free_port()

        def scenario():
            proc = subprocess.Popen([sys.executable, "activate.py", str(port), "-n", "--pidfile=", "mailguard", "-c",
                                     "policy.ini"], cwd=workdir.path, env=ENV, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            try:
                wait_until(lambda: answers(port), "the activated gateway to greet")
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                    client.sendmail("a@example.org", ["b@example.org"], b"Subject: activated\r\n\r\nbody\r\n")
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
            return workdir.run(*FOREGROUND, "mailguard", "-c", "policy.ini")

        without = yield deferToThread(scenario)
        self.assertEqual(len(os.listdir(workdir.join("var", "maildir", "new"))), 1)
        self.assertEqual((without.returncode, without.stderr.decode().splitlines()),
                         (1, ["policy.ini: [listener l] listen: systemd passed no socket for "
                              "systemd:domain=INET:index=0 (is the gateway started by a socket unit, with LISTEN_FDS?)"]))


class ReloadUnitTests(TestCase):
    """Gateway.reload in this process: which sockets stay, which factories change."""

    def test_status_page_shows_reloaded_policy(self):
        """After a reload the status page's configuration (listeners, rules, load time) is the new policy's."""
        from twisted.internet import reactor

        from mailguard.inspectors import registry
        from mailguard.policy import load_policy
        from mailguard.service import build_service

        workdir = Workdir(self)
        status = "[global]\nstatus = tcp:0:interface=127.0.0.1\ncontrol-socket = off\n"
        path = workdir.join(workdir.write(status + RULE + listener("one", "tcp:0:interface=127.0.0.1")))
        gateway = build_service(load_policy(path, protocols=registry()), reactor)
        for service in list(gateway):
            port = getattr(service, "port", None)
            if port is not None:
                self.addCleanup(port.stopListening)
        before = gateway.status_source.info
        self.assertEqual([entry["name"] for entry in before["listeners"]], ["one"])
        workdir.write(status + RULE + listener("two", "tcp:0:interface=127.0.0.1"))
        self.assertTrue(gateway.reload())
        for service in gateway.listeners.values():
            self.addCleanup(service.port.stopListening)
        after = gateway.status_source.info
        self.assertEqual([entry["name"] for entry in after["listeners"]], ["two"])
        self.assertGreaterEqual(after["policy"]["loaded"], before["policy"]["loaded"])
        self.assertIsNot(after, before)

    def test_ssl_listener_keeps_socket_and_tls_wrapper(self):
        """An unchanged ssl: listener keeps its socket; its certificate is read again and the gateway behind it is new."""
        import trustme
        from twisted.internet import reactor

        from mailguard.inspectors import registry
        from mailguard.policy import load_policy
        from mailguard.service import build_service

        workdir = Workdir(self)
        cert = trustme.CA().issue_cert("localhost")
        cert.cert_chain_pems[0].write_to_path(workdir.join("cert.pem"))
        cert.private_key_pem.write_to_path(workdir.join("key.pem"))
        listen = "ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s" % (workdir.join("key.pem"),
                                                                          workdir.join("cert.pem"))
        path = workdir.join(workdir.write(RULE + listener("l", listen) + listener("plain", "tcp:0:interface=127.0.0.1")))
        gateway = build_service(load_policy(path, protocols=registry()), reactor)
        for service in gateway.listeners.values():
            self.addCleanup(service.port.stopListening)
        ssl_service, plain_service = gateway.listeners[listen], gateway.listeners["tcp:0:interface=127.0.0.1"]
        wrapper, old = ssl_service.port.factory, ssl_service.factory
        self.assertIs(wrapper.wrappedFactory, old)
        # The certificate is renewed on disk: the reload reads it again.
        renewed = trustme.CA().issue_cert("localhost")
        renewed.cert_chain_pems[0].write_to_path(workdir.join("cert.pem"))
        renewed.private_key_pem.write_to_path(workdir.join("key.pem"))
        workdir.write(RULE.replace("esmtp", "smtp") + listener("l", listen))
        self.assertTrue(gateway.reload())
        self.assertIs(gateway.listeners[listen], ssl_service)
        port = ssl_service.port
        self.assertIsNot(port.factory, wrapper)  # a new TLS wrapper for new connections, on the same socket
        self.assertIs(port.factory.wrappedFactory, ssl_service.factory)
        self.assertIsNot(ssl_service.factory, old)
        from cryptography import x509

        served = ssl_service.tls_options.certificate
        expected = x509.load_pem_x509_certificate(renewed.cert_chain_pems[0].bytes())
        self.assertEqual(served.serial_number, expected.serial_number)
        self.assertEqual(ssl_service.factory.listener.rule.protocol, "smtp")
        self.assertNotIn(plain_service, list(gateway))
        self.assertEqual(list(gateway.listeners), [listen])
