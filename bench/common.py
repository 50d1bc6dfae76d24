"""Shared plumbing of the benchmark scripts: child processes, ports, /proc readings.

Everything here is loopback-only and stdlib-only.  `Children` owns every
process a benchmark starts: each runs in its own session (process group), and
`Children.stop_all` ends the groups it started, by their id, on normal exit,
on an exception and on SIGINT/SIGTERM.
"""

import atexit
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: Holds ``mailguard/plugins/mailguard_bench_filter.py``, the filter plugin ``bench-accept``.
FILTER_PLUGIN_PATH = os.path.join(HERE, "filterplugin")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

#: Runs twistd from whichever mailguard is first on sys.path.
TWISTD_BOOT = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
#: Runs ``mailguard check`` the same way.
CHECK_BOOT = "import sys; from mailguard.cli import main; sys.exit(main())"


def raise_nofile():
    """Raise the soft RLIMIT_NOFILE to the hard limit; return ``(soft, hard)``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _child_setup():
    raise_nofile()


class Children:
    """The processes one benchmark run started; all of them are ended on exit."""

    def __init__(self):
        self.procs = []
        self.cleanups = []  # callables run after the processes are stopped
        self._installed = False

    def install(self):
        """End every child at interpreter exit and on SIGINT/SIGTERM."""
        if self._installed:
            return
        self._installed = True
        atexit.register(self.stop_all)

        def on_signal(signum, frame):
            self.stop_all()
            # 128 + signal number, as a shell reports it.
            os._exit(128 + signum)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    def spawn(self, args, name, log_path=None, env=None, cwd=None, stdout=None):
        """Start ``args`` in a new session; stderr (and stdout) go to ``log_path``."""
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=stdout if stdout is not None else log,
                stderr=log,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_child_setup,
            )
        finally:
            if log_path:
                log.close()
        proc.bench_name = name
        self.procs.append(proc)
        return proc

    def stop(self, proc, grace=3.0):
        """End one child's process group: SIGTERM, then SIGKILL after ``grace`` s."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # The leader may be gone while members of its group live on.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self):
        """End every child still registered (newest first), then run the cleanups."""
        for proc in list(reversed(self.procs)):
            self.stop(proc)
        while self.cleanups:
            try:
                self.cleanups.pop()()
            except Exception:
                pass


def free_port():
    """An unused TCP port on 127.0.0.1 (free when this returns)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_greeting(port, proc=None, timeout=20.0, expect=b"220"):
    """Wait until ``127.0.0.1:port`` accepts a connection and greets with ``expect``.

    Raises RuntimeError (with the reason) when ``proc`` dies or time runs out.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("exited with status %s" % proc.returncode)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                data = b""
                while b"\n" not in data:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(expect):
                    try:
                        s.sendall(b"QUIT\r\n")
                    except OSError:
                        pass
                    return
                last = "greeting %r" % data[:60]
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise RuntimeError("no greeting on port %d within %.0f s (%s)" % (port, timeout, last))


def wait_listening(port, proc=None, timeout=20.0):
    """Wait until something accepts connections on ``127.0.0.1:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("exited with status %s" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("nothing listening on port %d within %.0f s" % (port, timeout))


def process_tree(pid):
    """``pid`` and all its descendants (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pid, tree=True):
    """utime + stime of ``pid`` (and its descendants), in seconds, from /proc/<pid>/stat."""
    total = 0
    for p in process_tree(pid) if tree else [pid]:
        try:
            with open("/proc/%d/stat" % p, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        # fields[0] is field 3 (state): utime is field 14, stime field 15.
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def rss_bytes(pid, tree=True):
    """Resident set size of ``pid`` (and its descendants), in bytes, from /proc/<pid>/statm."""
    total = 0
    for p in process_tree(pid) if tree else [pid]:
        try:
            with open("/proc/%d/statm" % p) as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            continue
    return total


def busy_processes(exclude=(), interval=1.0, threshold=0.1):
    """Processes (other than ``exclude`` and this one) using more than ``threshold`` of a CPU now.

    Returns ``[(pid, share, command)]``: a benchmark on a shared machine
    should say when something else was competing for the cores.
    """
    def sample():
        out = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % entry, "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2 :].split()
            out[int(entry)] = int(fields[11]) + int(fields[12])
        return out

    first = sample()
    time.sleep(interval)
    second = sample()
    skip = set(exclude) | {os.getpid()}
    busy = []
    for pid, ticks in second.items():
        share = (ticks - first.get(pid, ticks)) / CLK_TCK / interval
        if share >= threshold and pid not in skip:
            try:
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                cmd = "?"
            busy.append((pid, share, cmd[:100]))
    return busy


def load_average():
    """The 1-minute load average, as text."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "?"


def cpu_steal():
    """``(steal, total)`` jiffies of all CPUs from /proc/stat, or None.

    On a virtual machine, "steal" is time the hypervisor gave to other
    guests while this one wanted the CPU: the usual cause of run-to-run
    swings that no process here explains.
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 8:
        return None
    return fields[7], sum(fields[:8])


def machine_info():
    """One dict describing this machine and the software under test."""
    info = {"nproc": os.cpu_count(), "kernel": platform.release(), "python": sys.version.split()[0]}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        info["memory"] = "%.1f GiB" % (kb / 1024 / 1024)
    except OSError:
        pass
    try:
        import twisted

        info["twisted"] = twisted.__version__
    except ImportError:
        info["twisted"] = "missing"
    info["nofile"] = "%d/%d" % resource.getrlimit(resource.RLIMIT_NOFILE)
    return info


def gateway_env(source, extra_path=()):
    """Environment for a mailguard child: the source tree first on the path, or the installed package.

    ``extra_path`` directories follow (e.g. `FILTER_PLUGIN_PATH`, whose
    ``mailguard/plugins`` the gateway's plugin discovery then searches too).
    """
    env = dict(os.environ)
    paths = ([ROOT] if source else []) + list(extra_path)
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def check_policy(path, source, extra_path=()):
    """Run ``mailguard check`` on ``path``; return ``(ok, one-line message)``."""
    r = subprocess.run(
        [sys.executable, "-c", CHECK_BOOT, "check", "-c", path],
        env=gateway_env(source, extra_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    text = (r.stderr.strip() or r.stdout.strip()).splitlines()
    return r.returncode == 0, (text[-1] if text else "exit status %d" % r.returncode)


def mailguard_args(policy, log_path, experiment=None):
    """The command line of a foreground twistd running mailguard on ``policy``.

    ``experiment`` names patches of ``bench/experiments.py`` to apply first.
    """
    boot = ["-c", TWISTD_BOOT] if not experiment else [os.path.join(HERE, "experiments.py"), experiment, "--"]
    return [
        sys.executable,
        *boot,
        "-n",
        "--pidfile=",
        "--logfile",
        log_path,
        "mailguard",
        "-c",
        policy,
    ]


def policy_text(port, backend_port, protocol, global_extra="", inspect_extra="", sections=""):
    """A benchmark policy: one listener on 127.0.0.1:port relaying to the sink.

    ``sections`` is appended as is (e.g. a ``[filter NAME]`` section).

    Thresholds are raised so that a benchmark measures the data path, not
    the tracker's load shedding (IOS defaults would refuse the reconnect
    rate of a 1 KB run once they are enforced).
    """
    return (
        "[global]\n"
        "max-incomplete-high = 100000\n"
        "max-incomplete-low = 100000\n"
        "one-minute-high = 10000000\n"
        "one-minute-low = 10000000\n"
        "max-incomplete-host = 100000\n"
        "alert = on\n"
        "audit-trail = off\n"
        "%s"
        "\n[inspect BENCH]\n"
        "protocol = %s\n"
        "max-data = 20000000\n"
        "%s"
        "\n[listener bench]\n"
        "listen = tcp:%d:interface=127.0.0.1:backlog=4096\n"
        "backend = tcp:host=127.0.0.1:port=%d\n"
        "inspect = BENCH\n"
        "%s"
    ) % (global_extra, protocol, inspect_extra, port, backend_port, sections)


def start_own_sink(children, tmp):
    """Start ``bench/smtpsink.py`` on a free loopback port as one of ``children``; return the port."""
    port = free_port()
    proc = children.spawn([sys.executable, os.path.join(HERE, "smtpsink.py"), str(port)], "smtpsink",
                          os.path.join(tmp, "sink.log"))
    wait_greeting(port, proc)
    return port


def write_policy(tmp, port, sink, protocol):
    """Write the benchmark policy (`policy_text`) to ``tmp/policy.ini``; return its path."""
    path = os.path.join(tmp, "policy.ini")
    with open(path, "w") as f:
        f.write(policy_text(port, sink, protocol))
    return path


def make_certificates(directory):
    """A CA and a ``localhost``/127.0.0.1 server certificate, as PEM files in ``directory``.

    Returns ``{"ca": path, "cert": path, "key": path}``.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailguard bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {name: os.path.join(directory, name + ".pem") for name in ("ca", "cert", "key")}
    with open(paths["ca"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["key"], "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    os.chmod(paths["key"], 0o600)
    return paths
