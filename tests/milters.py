"""Start the real milters (rspamd, clamd + clamav-milter, OpenDKIM) on loopback with private configurations.

Each starter writes its configuration into a private directory, picks free
loopback ports, starts the programs in the foreground and waits (bounded)
until they listen.  Nothing here needs the network: rspamd's DNS points at
a dead loopback port, ClamAV's database is one MD5 signature made with
``sigtool --md5``, OpenDKIM finds its key with ``TestDNSData``.  A missing
Debian package raises ``SkipTest`` with the reason; anything else that
fails raises with the program's log.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import time

from twisted.trial.unittest import SkipTest
from tests.clients import free_port

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
"""The anti-spam test pattern rspamd refuses."""

VIRUS = b"mailguard test virus: this line is what the test signature matches\n"
"""The file the ClamAV test signature (its MD5) detects."""


def require(*programs):
    """Skip, saying which Debian package is missing, unless every program is installed."""
    packages = {"rspamd": "rspamd", "clamd": "clamav-daemon", "clamav-milter": "clamav-milter",
                "sigtool": "clamav", "opendkim": "opendkim", "opendkim-genkey": "opendkim-tools"}
    for program in programs:
        if shutil.which(program) is None and not os.path.exists(os.path.join("/usr/sbin", program)):
            raise SkipTest("%s is not installed (Debian package %s)" % (program, packages.get(program, program)))


def _program(name):
    return shutil.which(name) or os.path.join("/usr/sbin", name)




def _listening(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path, lines=20):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _die_with_parent():
    """In the child: be sent SIGTERM when the test process dies (Linux), so no program outlives a killed run."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Program:
    """One started process, its output in a file, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, argv, log):
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, preexec_fn=_die_with_parent)

    def wait_port(self, port, timeout, logs=()):
        """Wait (at most ``timeout`` s) until something listens on ``port``; raise with the logs if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _listening(port):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        text = "".join(_tail(p) for p in (self.log, *logs))
        raise RuntimeError("%s did not listen on %d:\n%s" % (os.path.basename(self.process.args[0]), port, text))

    def wait_path(self, path, timeout):
        """Wait (at most ``timeout`` s) for a UNIX socket to appear."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not os.path.exists(path):
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        if not os.path.exists(path):
            self.stop()
            raise RuntimeError("%s did not create %s:\n%s" % (self.process.args[0], path, _tail(self.log)))

    def stop(self):
        """Terminate the process group; bounded wait."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def _run_as():
    return ["-u", "root", "-g", "root"] if os.geteuid() == 0 else []


class Rspamd:
    """rspamd's proxy worker in milter mode (self_scan), with the milter_headers module."""

    def __init__(self, directory):
        require("rspamd")
        self.directory = directory
        self.port = free_port()
        self.endpoint = "tcp:host=127.0.0.1:port=%d" % self.port
        # The hyperscan cache survives restarts: only the first start compiles it.
        os.makedirs(os.path.join(directory, "hs"), exist_ok=True)
        self.config = os.path.join(directory, "rspamd.conf")
        with open(self.config, "w") as f:
            f.write(RSPAMD_CONF.format(dir=directory, port=self.port, dns=free_port()))
        self.program = None

    def start(self, timeout=120):
        """Start rspamd and wait until it listens (the first start compiles its caches)."""
        self.program = Program([_program("rspamd"), "-c", self.config, "-f", "-i", *_run_as()],
                               os.path.join(self.directory, "stdout.log"))
        self.program.wait_port(self.port, timeout, [os.path.join(self.directory, "rspamd.log")])

    def stop(self):
        """Stop it, and wait until the port is closed."""
        if self.program is not None:
            self.program.stop()
            self.program = None
        deadline = time.monotonic() + 10
        while _listening(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)


RSPAMD_CONF = """
options {{
  pidfile = "{dir}/rspamd.pid";
  dns {{ nameserver = ["127.0.0.1:{dns}"]; timeout = 0.2s; retransmits = 1; }}
  hs_cache_dir = "{dir}/hs";
  filters = "";
  tempdir = "{dir}";
  url_tld = "/usr/share/rspamd/effective_tld_names.dat";
  cache_file = "{dir}/symbols.cache";
}}
logging {{ type = "file"; filename = "{dir}/rspamd.log"; level = "info"; }}
worker "rspamd_proxy" {{
  bind_socket = "127.0.0.1:{port}";
  milter = yes;
  timeout = 60s;
  count = 1;
  upstream "local" {{ default = yes; self_scan = yes; }}
}}
modules {{ path = "/usr/share/rspamd/plugins"; }}
milter_headers {{ use = ["x-spamd-result", "x-spam-status"]; skip_local = false; skip_authenticated = false; }}
actions {{ reject = 15; add_header = 6; greylist = 4; }}
"""


class ClamAV:
    """clamd with a one-signature database (the MD5 of `VIRUS`) and clamav-milter in front of it."""

    def __init__(self, directory):
        require("clamd", "clamav-milter", "sigtool")
        self.directory = directory
        db = os.path.join(directory, "db")
        os.makedirs(db, exist_ok=True)
        sample = os.path.join(directory, "mailguard-test-virus.txt")
        with open(sample, "wb") as f:
            f.write(VIRUS)
        with open(os.path.join(db, "test.hdb"), "wb") as f:
            f.write(subprocess.run([_program("sigtool"), "--md5", sample], check=True, capture_output=True,
                                   timeout=60).stdout)
        self.socket = os.path.join(directory, "clamd.sock")
        self.port = free_port()
        self.endpoint = "tcp:host=127.0.0.1:port=%d" % self.port
        user = "User root\n" if os.geteuid() == 0 else ""
        with open(os.path.join(directory, "clamd.conf"), "w") as f:
            f.write("Foreground yes\nDatabaseDirectory %s\nLocalSocket %s\nLogFile %s/clamd.log\n"
                    "TemporaryDirectory %s\n%s" % (db, self.socket, directory, directory, user))
        with open(os.path.join(directory, "milter.conf"), "w") as f:
            f.write("Foreground yes\nMilterSocket inet:%d@127.0.0.1\nClamdSocket unix:%s\n"
                    "LogFile %s/milter.log\nOnInfected Reject\nOnFail Defer\nAddHeader Replace\n"
                    "LogInfected Basic\n%s" % (self.port, self.socket, directory, user))
        self.programs = []

    def start(self, timeout=60):
        """Start clamd, then clamav-milter."""
        clamd = Program([_program("clamd"), "-c", os.path.join(self.directory, "clamd.conf")],
                        os.path.join(self.directory, "clamd.out"))
        self.programs.append(clamd)
        clamd.wait_path(self.socket, timeout)
        milter = Program([_program("clamav-milter"), "-c", os.path.join(self.directory, "milter.conf")],
                         os.path.join(self.directory, "milter.out"))
        self.programs.append(milter)
        milter.wait_port(self.port, timeout, [os.path.join(self.directory, "milter.log")])

    def stop(self):
        """Stop both."""
        for program in reversed(self.programs):
            program.stop()
        self.programs = []


class OpenDKIM:
    """OpenDKIM signing for example.com with a key made by opendkim-genkey, found through TestDNSData."""

    domain = "example.com"
    selector = "test"

    def __init__(self, directory):
        require("opendkim", "opendkim-genkey")
        self.directory = directory
        subprocess.run([_program("opendkim-genkey"), "-D", directory, "-d", self.domain, "-s", self.selector],
                       check=True, capture_output=True, timeout=60)
        with open(os.path.join(directory, self.selector + ".txt")) as f:
            self.record = "".join(re.findall(r'"([^"]*)"', f.read())).encode()
        with open(os.path.join(directory, "dns.txt"), "wb") as f:
            f.write(b"%s._domainkey.%s %s\n" % (self.selector.encode(), self.domain.encode(), self.record))
        self.port = free_port()
        self.endpoint = "tcp:host=127.0.0.1:port=%d" % self.port
        user = "UserID root\n" if os.geteuid() == 0 else ""
        with open(os.path.join(directory, "opendkim.conf"), "w") as f:
            f.write(OPENDKIM_CONF.format(dir=directory, port=self.port, domain=self.domain,
                                         selector=self.selector) + user)
        self.program = None

    def dns(self, name, timeout=5):
        """dkimpy's DNS lookup, answered with the key's record."""
        if name.rstrip(b".") == b"%s._domainkey.%s" % (self.selector.encode(), self.domain.encode()):
            return self.record
        return None

    def start(self, timeout=60):
        """Start OpenDKIM in the foreground."""
        self.program = Program([_program("opendkim"), "-f", "-l", "-x", os.path.join(self.directory, "opendkim.conf")],
                               os.path.join(self.directory, "opendkim.out"))
        self.program.wait_port(self.port, timeout)

    def stop(self):
        """Stop it."""
        if self.program is not None:
            self.program.stop()
            self.program = None


OPENDKIM_CONF = """Syslog no
Background no
Mode sv
Domain {domain}
Selector {selector}
KeyFile {dir}/{selector}.private
Socket inet:{port}@127.0.0.1
PidFile {dir}/opendkim.pid
RequireSafeKeys false
TestDNSData {dir}/dns.txt
Canonicalization simple/simple
"""
