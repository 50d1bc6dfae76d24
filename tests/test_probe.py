"""End-to-end tests of ``mailguard probe`` against real servers on loopback.

The servers: the embedded backend, Postfix's smtp-sink, aiosmtpd (with
STARTTLS and AUTH), and two small servers written here: a lenient one that
takes any line holding only a dot as the end of data whatever its line ends
(a smuggling-prone server), and one with the STARTTLS injection bug (it
executes what was pipelined behind STARTTLS once TLS is up).  The probe is
blocking, so it runs in a thread (or as the real command, in a subprocess)
while the reactor serves.
"""

import json
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time

import trustme
from twisted.internet import defer, protocol, reactor
from twisted.internet.threads import deferToThread
from twisted.protocols.basic import LineReceiver
from twisted.trial.unittest import SkipTest, TestCase

from mailguard import probe
from mailguard.embedded import EmbeddedBackendFactory
from mailguard.policy import Rule
from mailguard.tls import server_context
from tests.backends import AiosmtpdBackend, listenBackend
from tests.harness import start_gateway
from tests.clients import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CA = trustme.CA()
SERVER_CERT = CA.issue_cert("mx.probe.test", "localhost", "127.0.0.1")

#: What the lenient server takes as the end of data: a line holding only a dot once trailing CRs are stripped.
LENIENT_ACCEPTS = ["\\r\\n.\\n", "\\n.\\n", "\\n.\\r\\n", "\\r\\n.\\r\\r\\n", "\\r\\r\\n.\\r\\r\\n"]

#: Every key of the JSON report, in the README's order (see test_json_keys_documented).
JSON_KEYS = [
    "backend", "error", "banner", "esmtp", "ehlo_keywords", "size", "pipelining", "chunking", "8bitmime",
    "smtputf8", "auth_before_tls", "auth_after_tls", "starttls", "starttls_injection", "smuggling", "risks",
    "recommendation", "status",
]


class ToyServer(LineReceiver):
    """A small ESMTP server: lenient about line ends, optionally with STARTTLS and its injection bug.

    Lines end at LF; trailing CRs are dropped, so ``\\n.\\n`` and
    ``\\r\\n.\\r\\r\\n`` end the data as ``\\r\\n.\\r\\n`` does.  STARTTLS
    keeps what the client pipelined behind it (the bug) unless the factory
    says ``discard``.
    """

    delimiter = b"\n"

    def connectionMade(self):
        """Greet."""
        self.data = None
        self.reply(b"220 toy.test ESMTP lenient")

    def reply(self, text):
        """Send one reply line."""
        self.transport.write(text + b"\r\n")

    def lineReceived(self, line):
        """Answer a command, or take a line of message data."""
        line = line.rstrip(b"\r")
        if self.data is not None:
            if line == b".":
                self.factory.messages.append(bytes(self.data))
                self.data = None
                self.reply(b"250 2.0.0 queued")
            else:
                self.data += line + b"\n"
            return
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"EHLO":
            keywords = [b"toy.test", b"PIPELINING", b"8BITMIME"]
            if self.factory.tls is not None and not self.transport.TLS:
                keywords.append(b"STARTTLS")
            for keyword in keywords[:-1]:
                self.reply(b"250-" + keyword)
            self.reply(b"250 " + keywords[-1])
        elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
            self.reply(b"250 2.0.0 ok")
        elif verb == b"DATA":
            self.data = b""
            self.reply(b"354 go ahead")
        elif verb == b"QUIT":
            self.reply(b"221 2.0.0 bye")
            self.transport.loseConnection()
        elif verb == b"STARTTLS" and self.factory.tls is not None:
            self.reply(b"220 2.0.0 ready")
            if self.factory.discard:
                self.clearLineBuffer()
            self.transport.startTLS(self.factory.tls)
        else:
            self.reply(b"500 5.5.2 unknown command")


class ToyFactory(protocol.ServerFactory):
    """Serves `ToyServer`; ``messages`` holds each message received."""

    protocol = ToyServer

    def __init__(self, tls=None, discard=False):
        self.tls = tls
        self.discard = discard
        self.messages = []


def run_probe(port, **kwargs):
    """Probe 127.0.0.1:``port`` in a thread; a Deferred firing with the `probe.Report`."""
    target = probe.parse_backend("tcp:host=127.0.0.1:port=%d" % port, timeout=10)
    return deferToThread(probe.probe, target, **kwargs)


def run_cli(*args):
    """Run the real ``mailguard probe`` command in a thread; a Deferred firing with the CompletedProcess."""
    return deferToThread(
        subprocess.run, [sys.executable, "-m", "mailguard.cli", "probe", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )




class ProbeTestCase(TestCase):
    """Shared set-up: the test CA in a file, toy servers on ephemeral ports."""

    def setUp(self):
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        self.ca_file = os.path.join(d, "ca.pem")
        CA.cert_pem.write_to_path(self.ca_file)
        self.cert_file = os.path.join(d, "cert.pem")
        self.key_file = os.path.join(d, "key.pem")
        SERVER_CERT.cert_chain_pems[0].write_to_path(self.cert_file)
        SERVER_CERT.private_key_pem.write_to_path(self.key_file)

    def toy(self, tls=False, discard=False):
        factory = ToyFactory(server_context(self.cert_file, self.key_file) if tls else None, discard)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port


class EmbeddedTests(ProbeTestCase):
    """The embedded backend: a strict, well-behaved ESMTP server."""

    @defer.inlineCallbacks
    def test_embedded_backend(self):
        """Banner, keywords, SIZE, working PIPELINING, CHUNKING; no variant accepted; one message per variant."""
        factory = EmbeddedBackendFactory(timeout=None)
        port = listenBackend(self, factory)
        report = yield run_probe(port, rcpt="postmaster@probe.test", sender="probe@probe.test")
        self.assertEqual(report.banner, "220 localhost ESMTP mailguard embedded backend")
        self.assertTrue(report.esmtp)
        self.assertEqual(report.size, 100000000)
        self.assertEqual(report.pipelining, {"offered": True, "works": True,
                                             "detail": "a pipelined group was answered in order"})
        data = report.as_dict()
        self.assertEqual((data["chunking"], data["8bitmime"], data["smtputf8"]), (True, True, True))
        self.assertEqual(report.auth_before_tls, [])
        self.assertEqual(report.starttls, {"offered": False})
        self.assertEqual([v["variant"] for v in report.smuggling["variants"]],
                         [probe.variant_name(v) for v in probe.VARIANTS])
        self.assertEqual({v["result"] for v in report.smuggling["variants"]}, {"not accepted"})
        self.assertEqual(report.status, 0)
        self.assertEqual(len(factory.messages), 10)
        for variant, message in zip(probe.VARIANTS, factory.messages):
            self.assertIn(b"Subject: mailguard probe " + probe.variant_name(variant).encode() + b"\n", message.data)
            self.assertEqual(message.rcpt_to, [b"postmaster@probe.test"])
        self.assertIn("bare-newline = normalize", probe.recommendation(report))

    @defer.inlineCallbacks
    def test_without_rcpt_no_message(self):
        """Without --rcpt the smuggling checks are skipped, the table says so, and nothing is delivered."""
        factory = EmbeddedBackendFactory(timeout=None)
        port = listenBackend(self, factory)
        result = yield run_cli("tcp:host=127.0.0.1:port=%d" % port)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("smuggling           skipped: --rcpt not given", result.stdout)
        self.assertIn("[inspect PROBED]\nprotocol = esmtp\n", result.stdout)
        self.assertEqual(factory.messages, [])


class LenientTests(ProbeTestCase):
    """A server that takes bare-LF dot lines as the end of data."""

    @defer.inlineCallbacks
    def test_names_exactly_the_accepted_variants(self):
        """The probe names exactly the five variants the lenient server takes as the end of data, and is risky."""
        factory, port = self.toy()
        report = yield run_probe(port, rcpt="victim@probe.test")
        accepted = [v["variant"] for v in report.smuggling["variants"] if v["result"] == "accepted"]
        self.assertEqual(accepted, LENIENT_ACCEPTS)
        others = {v["result"] for v in report.smuggling["variants"] if v["variant"] not in LENIENT_ACCEPTS}
        self.assertEqual(others, {"not accepted"})
        self.assertEqual(report.status, 1)
        self.assertEqual(report.risks, ["takes %s as the end of message data (SMTP smuggling)" % ", ".join(accepted)])
        self.assertIn("bare-newline = reject", probe.recommendation(report))
        # At most one message per variant.
        self.assertEqual(len(factory.messages), 10)
        table = probe.render_table(report)
        for name in LENIENT_ACCEPTS:
            self.assertIn("smuggling %s" % name, table)
            self.assertRegex(table, r"smuggling %s +ACCEPTED" % re.escape(name))


class GatewayTests(ProbeTestCase):
    """The probe pointed at mailguard itself, in front of the lenient server."""

    @defer.inlineCallbacks
    def test_gateway_hides_the_lenient_server(self):
        """Through an esmtp gateway (bare-newline = normalize) no variant reaches the lenient server as an end."""
        factory, port = self.toy()
        _, gateway_port = start_gateway(self, Rule(name="PROBED", protocol="esmtp"), port)
        report = yield run_probe(gateway_port, rcpt="victim@probe.test")
        self.assertEqual({v["result"] for v in report.smuggling["variants"]}, {"not accepted"})
        self.assertEqual(report.status, 0)
        self.assertEqual(len(factory.messages), 10)


class StartTLSTests(ProbeTestCase):
    """STARTTLS details, verification and command injection."""

    @defer.inlineCallbacks
    def test_injection_bug_reported(self):
        """A server that executes what was pipelined behind STARTTLS is reported, risky, and told tls = strip."""
        factory, port = self.toy(tls=True)
        report = yield run_probe(port, ca=self.ca_file)
        self.assertTrue(report.starttls_injection["tested"])
        self.assertIs(report.starttls_injection["executed"], True)
        self.assertIn("executes commands injected after STARTTLS", report.risks)
        self.assertEqual(report.status, 1)
        self.assertIn("tls = strip", probe.recommendation(report))

    @defer.inlineCallbacks
    def test_injection_discarded(self):
        """The same server discarding its buffer at STARTTLS: not executed, certificate verified, nothing risky."""
        factory, port = self.toy(tls=True, discard=True)
        report = yield run_probe(port, ca=self.ca_file)
        self.assertIs(report.starttls_injection["executed"], False)
        tls = report.starttls
        self.assertTrue(tls["offered"])
        self.assertIn(tls["version"], ("TLSv1.2", "TLSv1.3"))
        self.assertTrue(tls["cipher"])
        self.assertEqual(tls["names"], ["mx.probe.test", "localhost", "127.0.0.1"])
        self.assertIs(tls["verified"], True)
        self.assertEqual(report.risks, [])
        self.assertEqual(report.status, 0)
        self.assertIn("backend-tls = required", probe.recommendation(report))

    @defer.inlineCallbacks
    def test_implicit_tls(self):
        """An ssl: BACKEND: TLS details and verification of the implicit-TLS session, no STARTTLS checks."""
        factory = ToyFactory()
        listening = reactor.listenSSL(0, factory, server_context(self.cert_file, self.key_file), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        target = probe.parse_backend("ssl:host=127.0.0.1:port=%d" % listening.getHost().port)
        report = yield deferToThread(probe.probe, target, ca=self.ca_file)
        self.assertEqual(report.banner, "220 toy.test ESMTP lenient")
        self.assertIs(report.starttls["implicit"], True)
        self.assertIs(report.starttls["offered"], False)
        self.assertIs(report.starttls["verified"], True)
        self.assertIn("mx.probe.test", report.starttls["names"])
        self.assertIs(report.starttls_injection["tested"], False)
        self.assertEqual(report.status, 0)

    @defer.inlineCallbacks
    def test_aiosmtpd_starttls_and_auth(self):
        """aiosmtpd with STARTTLS and AUTH: details, AUTH before TLS is risky, the system store does not verify it."""
        # aiosmtpd logs the handshake the probe aborts (untrusted CA) with a traceback: expected here.
        aiosmtpd_log = logging.getLogger("mail.log")
        self.addCleanup(aiosmtpd_log.setLevel, aiosmtpd_log.level)
        aiosmtpd_log.setLevel(logging.CRITICAL)
        backend = AiosmtpdBackend(auth=True, tls_context=_aiosmtpd_context(self.cert_file, self.key_file))
        port = backend.start()
        self.addCleanup(backend.stop)
        report = yield run_probe(port)
        self.assertEqual(report.auth_before_tls, ["LOGIN", "PLAIN"])
        self.assertEqual(report.auth_after_tls, ["LOGIN", "PLAIN"])
        tls = report.starttls
        self.assertTrue(tls["subject"])
        self.assertIn("mx.probe.test", tls["names"])
        self.assertRegex(tls["not_after"], r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z")
        self.assertIs(tls["verified"], False)
        self.assertIn("certificate", tls["verify_error"])
        self.assertIs(report.starttls_injection["executed"], False)
        self.assertEqual(report.risks, ["offers AUTH before TLS (LOGIN PLAIN)"])
        self.assertEqual(report.status, 1)
        with_ca = yield run_probe(port, ca=self.ca_file)
        self.assertIs(with_ca.starttls["verified"], True)


def _aiosmtpd_context(cert_file, key_file):
    """An ssl server context for aiosmtpd's STARTTLS."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


class SmtpSinkTests(ProbeTestCase):
    """Postfix's smtp-sink, driven through the real command with --json."""

    def start_sink(self):
        """Start smtp-sink on a free port of 127.0.0.1 (blocking); stopped at cleanup."""
        sink = shutil.which("smtp-sink") or ("/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else None)
        if sink is None:
            raise SkipTest("smtp-sink is not installed (Debian package postfix; .ci/run installs it)")
        port = free_port()
        command = [sink]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]  # smtp-sink refuses to run as root otherwise
        command += ["127.0.0.1:%d" % port, "10"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def stop():
            process.terminate()
            process.wait(10)
            process.stderr.close()

        self.addCleanup(stop)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                time.sleep(0.05)
        self.fail("smtp-sink did not start listening")

    @defer.inlineCallbacks
    def test_smtp_sink_json(self):
        """smtp-sink offers AUTH in clear text (exit 1); the JSON holds every key and all ten variants."""
        port = yield deferToThread(self.start_sink)
        result = yield run_cli("tcp:host=127.0.0.1:port=%d" % port, "--rcpt", "sink@probe.test", "--json")
        self.assertEqual(result.returncode, 1, result.stderr)
        data = json.loads(result.stdout)
        self.assertEqual(list(data), JSON_KEYS)
        self.assertEqual(data["banner"], "220 smtp-sink ESMTP")
        self.assertEqual(data["auth_before_tls"], ["PLAIN", "LOGIN"])
        self.assertIs(data["pipelining"]["works"], True)
        self.assertIs(data["chunking"], False)
        self.assertNotIn("", data["ehlo_keywords"])
        self.assertEqual([v["variant"] for v in data["smuggling"]["variants"]],
                         [probe.variant_name(v) for v in probe.VARIANTS])
        self.assertNotIn("error", {v["result"] for v in data["smuggling"]["variants"]})
        self.assertEqual(data["status"], 1)
        self.assertIn("offers AUTH before TLS (PLAIN LOGIN)", data["risks"])


    @defer.inlineCallbacks
    def test_readme_example(self):
        """The README's smtp-sink example is the real table output (on the port of this test's smtp-sink)."""
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            section = f.read().split("### `mailguard probe`", 1)[1]
        block = section.split("```\n$ ", 1)[1].split("\n$ echo $?", 1)[0]
        command, _, shown = block.partition("\n")
        args = command.split()
        self.assertEqual(args[:2], ["mailguard", "probe"])
        port = yield deferToThread(self.start_sink)
        args = [a.replace("port=2526", "port=%d" % port) for a in args[2:]]
        result = yield run_cli(*args)
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stdout, shown.replace("port=2526", "port=%d" % port) + "\n")


class CommandTests(ProbeTestCase):
    """Exit statuses and the README's promises."""

    @defer.inlineCallbacks
    def test_unreachable_exit_3(self):
        """Nothing listening: exit 3 and one line saying so."""
        result = yield run_cli("tcp:host=127.0.0.1:port=%d" % free_port())
        self.assertEqual(result.returncode, 3)
        self.assertEqual(len(result.stdout.strip().splitlines()), 1)
        self.assertIn("could not be probed: cannot connect to", result.stdout)

    @defer.inlineCallbacks
    def test_bad_backend_exit_2(self):
        """A BACKEND Twisted cannot parse, or one the probe cannot reach, is a one-line usage error (exit 2)."""
        for backend in ("nonsense:foo", "tcp:host=127.0.0.1"):
            result = yield run_cli(backend)
            self.assertEqual(result.returncode, 2, backend)
            self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
            self.assertTrue(result.stderr.startswith(backend + ": "), result.stderr)

    def test_json_keys_documented(self):
        """Every key of the JSON report is documented in the README's probe section, and no other."""
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        section = readme.split("### `mailguard probe`", 1)[1].split("\n### ", 1)[0]
        table = section.split("| JSON key |", 1)[1]
        documented = re.findall(r"^\| `([a-z0-9_]+)` \|", table, re.M)
        self.assertEqual(documented, JSON_KEYS)
        self.assertEqual(list(probe.Report("tcp:x:1").as_dict()), JSON_KEYS)
