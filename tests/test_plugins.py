"""Inspector plugins: discovery with twisted.plugin, rule keys validated by plugins, and the
example plugin installed with pip into a virtualenv and used end to end."""

import io
import operator
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

from twisted.internet import defer, protocol, reactor
from twisted.internet.threads import deferToThread
from twisted.plugin import IPlugin
from twisted.protocols.basic import LineReceiver
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

import mailguard.plugins
from mailguard import cli, inspectors
from mailguard.inspectors import PluginError, load_registry, refusal_reply, registry
from mailguard.interfaces import IInspector, IInspectorFactory
from mailguard.policy import PolicyError, Rule, parse_policy
from tests.clients import free_port, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "mailguard-example-inspector")
EXAMPLE_FILTER = os.path.join(ROOT, "examples", "mailguard-example-filter")
BUILTINS = {"smtp", "esmtp", "mailguard", "tcp", "pop3", "imap"}

LISTENER = "[listener l]\nlisten = tcp:2525:interface=127.0.0.1\nbackend = tcp:host=127.0.0.1:port=110\ninspect = R\n"

FACTORY_MODULE = """
from types import MappingProxyType
from twisted.plugin import IPlugin
from zope.interface import implementer
from mailguard.interfaces import IInspectorFactory

@implementer(IPlugin, IInspectorFactory)
class Factory:
    options = MappingProxyType({{}})
    def __init__(self, name):
        self.name = name
    def validateOption(self, key, value):
        raise ValueError(key)
    def buildInspector(self, rule):
        from mailguard.tcp import TCPInspector
        return TCPInspector(rule)

plugin = Factory({name!r})
"""


class RegistryTests(SynchronousTestCase):
    """The registry is what twisted.plugin finds; the built-ins are found the same way."""

    def plugin_package(self, *names):
        """An importable package (a fresh name on sys.path) with one plugin module per protocol name."""
        base = self.mktemp()
        package = "mgtest_plugins_" + uuid.uuid4().hex
        os.makedirs(os.path.join(base, package))
        with open(os.path.join(base, package, "__init__.py"), "w") as f:
            f.write("")
        for i, name in enumerate(names):
            with open(os.path.join(base, package, "p%d.py" % i), "w") as f:
                f.write(FACTORY_MODULE.format(name=name))
        sys.path.insert(0, os.path.abspath(base))
        self.addCleanup(sys.path.remove, os.path.abspath(base))
        self.addCleanup(lambda: [sys.modules.pop(m) for m in list(sys.modules) if m.startswith(package)])
        return __import__(package)

    def test_builtins_are_plugins(self):
        """The six built-in protocols come from the mailguard.plugins package, through getPlugins."""
        found = load_registry([mailguard.plugins])
        self.assertEqual(set(found), BUILTINS)
        for name, factory in found.items():
            self.assertEqual(factory.name, name)
            self.assertTrue(verifyObject(IInspectorFactory, factory))
            self.assertTrue(verifyObject(IPlugin, factory))

    def test_registry(self):
        """registry() scans mailguard.plugins and twisted.plugins once and keeps the result."""
        self.assertTrue(BUILTINS <= set(registry()))
        self.assertIs(registry(), registry())
        self.assertIs(inspectors.inspector_factory("pop3"), registry()["pop3"])

    def test_builds_inspectors(self):
        """Every built-in factory builds an inspector declaring IInspector and providing all of it (attributes included)."""
        for name, factory in load_registry([mailguard.plugins]).items():
            inspector = factory.buildInspector(Rule(name="R", protocol=name))
            self.assertTrue(IInspector.implementedBy(type(inspector)), name)
            self.assertTrue(verifyObject(IInspector, inspector), name)

    def test_third_party(self):
        """A plugin module in a plugin package is found beside the built-ins."""
        package = self.plugin_package("extra")
        found = load_registry([mailguard.plugins, package])
        self.assertEqual(set(found), BUILTINS | {"extra"})

    def test_conflict(self):
        """Two plugins claiming one protocol name stop the registry with a one-line PolicyError."""
        package = self.plugin_package("smtp")
        e = self.assertRaises(PluginError, load_registry, [mailguard.plugins, package])
        self.assertIsInstance(e, PolicyError)
        self.assertIn("protocol 'smtp' is provided twice", str(e))
        self.assertEqual(len(str(e).splitlines()), 1)

    def test_bad_name(self):
        """A plugin whose name is not a lower-case word is refused."""
        package = self.plugin_package("Bad Name")
        e = self.assertRaises(PluginError, load_registry, [package])
        self.assertIn("invalid protocol name 'Bad Name'", str(e))

    def test_plugin_package_dance(self):
        """A mailguard/plugins/ directory without __init__.py anywhere on sys.path is searched, with no reactor imported."""
        extra = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(extra, "mailguard", "plugins"))
        with open(os.path.join(extra, "mailguard", "plugins", "mgtest_extra.py"), "w") as f:
            f.write(FACTORY_MODULE.format(name="extra"))
        code = (
            "import sys; from mailguard.inspectors import registry; r = registry(); "
            "print(sorted(r)); print('twisted.internet.reactor' in sys.modules)"
        )
        env = dict(os.environ, PYTHONPATH=extra + os.pathsep + os.environ.get("PYTHONPATH", ""))
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        names, reactor_imported = result.stdout.decode().splitlines()
        self.assertEqual(set(eval(names)), BUILTINS | {"extra"})
        self.assertEqual(reactor_imported, "False")


class PolicyOptionTests(SynchronousTestCase):
    """Rule keys the core does not know are validated by the selected protocol's factory."""

    def parse(self, rule):
        """Parse a one-rule policy against the installed registry."""
        return parse_policy("[inspect R]\n" + rule + LISTENER, path="p.ini", protocols=registry())

    def test_defaults(self):
        """A protocol's keys are always on the rule, defaults included."""
        self.assertEqual(dict(self.parse("protocol = pop3\n").rule("R").options), {"secure-login": False})
        self.assertEqual(dict(self.parse("protocol = esmtp\n").rule("R").options), {})

    def test_value(self):
        """A written value is parsed by the factory and kept in an immutable mapping."""
        options = self.parse("protocol = imap\nsecure-login = yes\n").rule("R").options
        self.assertEqual(options["secure-login"], True)
        self.assertRaises(TypeError, operator.setitem, options, "secure-login", False)

    def test_bad_value(self):
        """A value the factory refuses is the usual one-line error."""
        e = self.assertRaises(PolicyError, self.parse, "protocol = pop3\nsecure-login = maybe\n")
        self.assertEqual(
            str(e), "p.ini: [inspect R] secure-login: bad value 'maybe': expected on or off (or yes/no, true/false, 1/0)"
        )

    def test_other_protocol(self):
        """A key of another protocol is an unknown key."""
        e = self.assertRaises(PolicyError, self.parse, "protocol = esmtp\nsecure-login = on\n")
        self.assertEqual(str(e), "p.ini: [inspect R] secure-login: unknown key")

    def test_unknown_protocol_first(self):
        """With an unknown protocol, that is reported before its keys are called unknown."""
        e = self.assertRaises(PolicyError, self.parse, "protocol = pop4\nsecure-login = on\n")
        self.assertEqual(
            str(e),
            "p.ini: [inspect R] protocol: unknown protocol 'pop4' (known: %s)" % ", ".join(sorted(registry())),
        )

    def test_check_uses_registry(self):
        """`mailguard check` accepts the plugins' protocols and keys."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[inspect R]\nprotocol = imap\nsecure-login = on\n" + LISTENER)
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(cli.main(["check", "-c", path]), 0)
        self.assertEqual(out.getvalue(), "%s: OK (1 listener, 1 rule)\n" % path)


class ExampleCoreTests(SynchronousTestCase):
    """The example plugin's factory and sans-IO inspector, imported from examples/."""

    def setUp(self):
        sys.path.insert(0, EXAMPLE)
        self.addCleanup(sys.path.remove, EXAMPLE)
        import mailguard_example

        self.factory = mailguard_example.ExampleInspectorFactory()

    def run_lines(self, chunks, connected_first=True):
        """Feed client chunks to an inspector blocking "xyzzy"; return its events."""
        rule = parse_policy(
            "[inspect R]\nprotocol = example\nblocked-words = xyzzy\n" + LISTENER,
            protocols={"example": self.factory},
        ).rule("R")
        inspector = self.factory.buildInspector(rule)
        self.assertTrue(verifyObject(IInspector, inspector))
        events = inspector.server_connected() if connected_first else []
        for chunk in chunks:
            events += inspector.client_data(chunk)
        if not connected_first:
            events += inspector.server_connected()
        return events

    def test_factory(self):
        """The example factory provides the plugin interfaces and parses its keys."""
        self.assertTrue(verifyObject(IInspectorFactory, self.factory))
        self.assertTrue(verifyObject(IPlugin, self.factory))
        self.assertEqual(self.factory.validateOption("blocked-words", "A, b"), frozenset({"a", "b"}))
        self.assertRaises(ValueError, self.factory.validateOption, "blocked-words", "a!")

    def test_whole_and_bytewise(self):
        """Blocked lines are answered, the others forwarded, however the bytes arrive."""
        data = b"hello\r\nsay XYZZY now\r\nbye\r\n"
        whole = self.run_lines([data])
        bytewise = self.run_lines([data[i : i + 1] for i in range(len(data))])
        self.assertEqual(whole, bytewise)
        from mailguard.events import ToClient, ToServer

        self.assertEqual([e for e in whole if type(e) is ToServer], [ToServer(b"hello\r\n"), ToServer(b"bye\r\n")])
        self.assertEqual([e for e in whole if type(e) is ToClient], [ToClient(b"-ERR blocked by mailguard\r\n")])

    def test_refusal(self):
        """The example factory refuses in its own words; refusal_reply passes them through unchanged."""
        self.assertEqual(refusal_reply(self.factory, "overload"), b"ERR too many connections, try again later\r\n")
        self.assertEqual(refusal_reply(self.factory, "unreachable"), b"ERR server unreachable\r\n")
        self.assertEqual(refusal_reply(self.factory, "unknown"), b"")

    def test_client_first(self):
        """Lines sent before the backend is up are inspected once it is."""
        from mailguard.events import ToServer

        events = self.run_lines([b"early\r\n"], connected_first=False)
        self.assertIn(ToServer(b"early\r\n"), events)


# -- the example plugin, installed with pip --------------------------------------------

_venv = None


def venv_env():
    """The environment for commands run in the test virtualenv: ours without PYTHONPATH.

    ``trial -j`` hands its workers its whole ``sys.path`` in PYTHONPATH; in
    the virtualenv that would put the source tree (and another
    setuptools' metadata) before what was installed, so the tests would no
    longer see the installed package.  The virtualenv reaches the parent's
    packages through a ``.pth`` file instead.
    """
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


class CommandFailed(AssertionError):
    """A command the test needs failed: a failure of the test, with the command's whole output."""


def _run(args, timeout=300, skip=False, **kw):
    """Run a command; when it fails raise `CommandFailed` with its output (`SkipTest` with ``skip``).

    ``skip`` is only for probes of the machine (can it make a virtualenv,
    does it have pip): installing mailguard or the example plugin, and
    using them, must never turn into a skip, or a packaging regression
    would pass unnoticed.
    """
    kw.setdefault("env", venv_env())
    result = subprocess.run(args, capture_output=True, timeout=timeout, **kw)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace").strip()
        if skip:
            raise SkipTest("this machine cannot make a virtualenv with pip (Debian package python3-venv): %s failed: %s"
                           % (" ".join(args[:4]), " / ".join(output.splitlines()[-3:])))
        raise CommandFailed("%s exited with %d:\n%s" % (" ".join(args), result.returncode, output))
    return result


def _copy(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "dropin.cache", "build", "*.egg-info"))


def example_venv():
    """A virtualenv holding this tree's mailguard and the example plugin (built once per run).

    Returns (directory, python).  Raises SkipTest, with the reason, when the
    machine cannot make one (no venv module, no pip, no setuptools able to
    build wheels and no way to fetch one); raises `CommandFailed`, with
    pip's output, when installing mailguard or the example plugin fails.
    """
    global _venv
    if isinstance(_venv, Exception):
        raise _venv
    if _venv is not None:
        return _venv
    needed = ("mailguard", "twisted", "setup.py", "README.md", EXAMPLE, EXAMPLE_FILTER)
    missing = [p for p in needed if not os.path.exists(os.path.join(ROOT, p))]
    if missing:
        _venv = SkipTest("not a whole source tree (missing %s): run the tests from a checkout" % ", ".join(missing))
        raise _venv
    import atexit

    work = tempfile.mkdtemp(prefix="mailguard-venv-")
    atexit.register(shutil.rmtree, work, True)
    try:
        _venv = _build_venv(work)
    except Exception as e:
        # Built once per run, even when it fails.
        shutil.rmtree(work, True)
        _venv = e
        raise
    return _venv


def _build_venv(work):
    import site

    venv = os.path.join(work, "venv")
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], timeout=120, skip=True)
    python = os.path.join(venv, "bin", "python")
    # See what this interpreter sees (Twisted, pip...), even when it is itself a
    # virtualenv (tox): the new one's own site-packages still come first.
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.decode().strip()
    ours = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    with open(os.path.join(purelib, "mailguard-test-parent.pth"), "w") as f:
        f.write("\n".join(ours) + "\n")
    pip = [python, "-m", "pip", "--disable-pip-version-check", "--no-input", "install", "-q"]
    _run([python, "-m", "pip", "--version"], skip=True)
    probe = "import setuptools, sys; sys.exit(tuple(map(int, setuptools.__version__.split('.')[:2])) < (70, 1))"
    if subprocess.run([python, "-c", probe], capture_output=True, timeout=60, env=venv_env()).returncode != 0:
        # Older setuptools cannot build a wheel without the wheel package.
        _run(pip + ["setuptools>=70.1"], skip=True)
    src = os.path.join(work, "mailguard-src")
    os.makedirs(src)
    for name in ("mailguard", "twisted"):
        _copy(os.path.join(ROOT, name), os.path.join(src, name))
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src)
    for plugins in ("mailguard/plugins", "twisted/plugins"):
        # As in a tree where the tests ran: the install must not ship these.
        with open(os.path.join(src, plugins, "dropin.cache"), "wb") as f:
            f.write(b"stale")
    example = os.path.join(work, "example-src")
    _copy(EXAMPLE, example)
    example_filter = os.path.join(work, "example-filter-src")
    _copy(EXAMPLE_FILTER, example_filter)
    for project in (src, example, example_filter):
        _run(pip + ["--no-deps", "--no-build-isolation", "--no-index", project])
    return work, python


class EchoLines(LineReceiver):
    """A line server answering each line with ``echo <line>``; it records what it got."""

    def connectionMade(self):
        """Count the connection."""
        self.factory.open += 1

    def lineReceived(self, line):
        """Record and echo."""
        self.factory.lines.append(line)
        self.sendLine(b"echo " + line)

    def connectionLost(self, reason):
        """Count the end of the connection."""
        self.factory.open -= 1


class EchoFactory(protocol.ServerFactory):
    """Builds `EchoLines`."""

    protocol = EchoLines

    def __init__(self):
        self.lines = []
        self.open = 0




class ExamplePluginTests(TestCase):
    """The example plugin, pip-installed into a virtualenv, selected by a policy and run by twistd."""

    timeout = 300

    @defer.inlineCallbacks
    def setUp(self):
        self.work, self.python = yield deferToThread(example_venv)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def write_policy(self, listen_port, backend_port, words="xyzzy plugh"):
        """Write policy.ini selecting protocol example; return its name."""
        with open(os.path.join(self.dir, "policy.ini"), "w") as f:
            f.write(
                textwrap.dedent(
                    f"""\
                    [inspect LINES]
                    protocol = example
                    blocked-words = {words}
                    [listener lines]
                    listen = tcp:{listen_port}:interface=127.0.0.1
                    backend = tcp:host=127.0.0.1:port={backend_port}
                    inspect = LINES
                    """
                )
            )
        return "policy.ini"

    def test_installed(self):
        """The installed registry has the example beside the built-ins; no dropin.cache is shipped, no __init__ clashes."""
        code = (
            "import sys, importlib.metadata as m; from mailguard.inspectors import registry; "
            "print(sorted(registry())); print('twisted.internet.reactor' in sys.modules); "
            "print([str(f) for d in ('mailguard', 'mailguard-example-inspector') for f in m.files(d)])"
        )
        result = _run([self.python, "-c", code], cwd=self.dir)
        names, reactor_imported, files = result.stdout.decode().splitlines()
        self.assertEqual(set(eval(names)), BUILTINS | {"example"})
        self.assertEqual(reactor_imported, "False")
        files = eval(files)
        self.assertIn("mailguard/plugins/mailguard_builtin.py", files)
        self.assertIn("mailguard/plugins/mailguard_example.py", files)
        self.assertFalse([f for f in files if f.endswith("dropin.cache")])
        self.assertEqual(files.count("mailguard/plugins/__init__.py"), 1)

    def test_check(self):
        """`mailguard check` in the virtualenv accepts protocol example and reports its bad values on one line."""
        mailguard = os.path.join(os.path.dirname(self.python), "mailguard")
        self.write_policy(7000, 7001)
        result = subprocess.run([mailguard, "check", "-c", "policy.ini"], cwd=self.dir, capture_output=True, timeout=60,
                                env=venv_env())
        self.assertEqual((result.returncode, result.stdout), (0, b"policy.ini: OK (1 listener, 1 rule)\n"))
        self.write_policy(7000, 7001, words="a!")
        result = subprocess.run([mailguard, "check", "-c", "policy.ini"], cwd=self.dir, capture_output=True, timeout=60,
                                env=venv_env())
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr.decode(),
            "policy.ini: [inspect LINES] blocked-words: bad value 'a!': "
            "expected words of letters, digits, '-' and '_' ('a!' is not one)\n",
        )

    def twistd(self):
        """Start ``twistd mailguard -c policy.ini`` in the virtualenv; return a function that stops it and returns its log."""
        twistd = [self.python, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]
        proc = subprocess.Popen(
            twistd + ["-n", "--pidfile=", "mailguard", "-c", "policy.ini"],
            cwd=self.dir,
            env=venv_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

        output = []

        def stop():
            if not output:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                try:
                    output.append(proc.communicate(timeout=30)[0])
                except subprocess.TimeoutExpired:
                    proc.kill()
                    output.append(proc.communicate()[0])
            return output[0]

        self.addCleanup(stop)
        stop.proc = proc
        return stop

    @staticmethod
    def connect(port, proc):
        """Connect to the gateway once ``twistd`` listens (retrying while it starts, at most 30 s)."""
        deadline = time.monotonic() + 30
        while True:
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=10)
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)

    @defer.inlineCallbacks
    def test_session(self):
        """twistd mailguard in the virtualenv relays lines to a real server and answers blocked ones itself."""
        echo = EchoFactory()
        backend = reactor.listenTCP(0, echo, interface="127.0.0.1")
        self.addCleanup(backend.stopListening)
        self.addCleanup(lambda: wait_for(lambda: echo.open == 0))
        port = free_port()
        self.write_policy(port, backend.getHost().port)
        stop = self.twistd()

        def talk():
            sock = self.connect(port, stop.proc)
            with sock, sock.makefile("rb") as f:
                sock.sendall(b"hello\r\n")
                first = f.readline()
                sock.sendall(b"go XYZZY now\r\n")
                second = f.readline()
                sock.sendall(b"bye\r\n")
                third = f.readline()
            return first, second, third

        replies = yield deferToThread(talk)
        self.assertEqual(replies, (b"echo hello\r\n", b"-ERR blocked by mailguard\r\n", b"echo bye\r\n"))
        self.assertEqual(echo.lines, [b"hello", b"bye"])
        yield wait_for(lambda: echo.open == 0)
        log = yield deferToThread(stop)
        self.assertIn(b"EXAMPLE_BLOCKED", log)

    @defer.inlineCallbacks
    def test_unreachable_in_plugin_words(self):
        """With no server behind it, the installed gateway tells an example client the plugin's own refusal line."""
        port = free_port()
        self.write_policy(port, free_port())
        stop = self.twistd()

        def talk():
            with self.connect(port, stop.proc) as sock, sock.makefile("rb") as f:
                return f.read()

        got = yield deferToThread(talk)
        self.assertEqual(got, b"ERR server unreachable\r\n")
        yield deferToThread(stop)


class RunTests(SynchronousTestCase):
    """The helper that installs packages for the plugin tests fails loudly; it never hides a failure as a skip."""

    def test_failure_is_a_failure(self):
        """A failing command raises CommandFailed carrying its whole output."""
        script = "import sys; print('first line'); print('pip said no', file=sys.stderr); sys.exit(3)"
        e = self.assertRaises(CommandFailed, _run, [sys.executable, "-c", script])
        self.assertIn("exited with 3", str(e))
        self.assertIn("first line", str(e))
        self.assertIn("pip said no", str(e))

    def test_probe_may_skip(self):
        """Only a probe of the machine (skip=True) turns a failure into a skip, with the reason."""
        e = self.assertRaises(SkipTest, _run, [sys.executable, "-c", "raise SystemExit('no venv here')"], skip=True)
        self.assertIn("no venv here", str(e))

    def test_broken_package_fails(self):
        """pip failing to install a project is a CommandFailed with pip's own output, as a packaging regression must be."""
        project = self.mktemp()
        os.makedirs(project)
        with open(os.path.join(project, "setup.py"), "w") as f:
            f.write("raise SystemExit('this setup.py is broken on purpose')\n")
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "install", "-q", "--no-deps",
               "--no-build-isolation", "--no-index", "--dry-run", project]
        e = self.assertRaises(CommandFailed, _run, pip)
        self.assertIn("this setup.py is broken on purpose", str(e))
