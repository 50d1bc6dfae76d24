"""Tests of ``mailguard replay``: transcripts replayed offline through the shipped policies.

The swaks transcripts are captured in the tests themselves: swaks talks
through a real gateway (each shipped policy's rule) to a recording backend,
and the replay of what swaks printed must send the server exactly the bytes
the backend really received.  The README's MailGuard transcript must replay
to exactly what the README shows.
"""

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from mailguard.cli import main
from mailguard.inspectors import inspector_factory
from mailguard.policy import Rule, load_policy
from mailguard.replay import TranscriptError, parse_transcript, replay
from tests.backends import RecordingBackend, listenBackend
from tests.clients import wait_for
from tests.harness import start_gateway

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
POLICIES = ("etc/policy.ini", "etc/ios-cbac.ini", "etc/pix-mailguard.ini")


def readme():
    """The README's text."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def policy_rule(path):
    """The rule of the first listener of a shipped policy."""
    from mailguard.inspectors import registry

    return load_policy(os.path.join(ROOT, path), protocols=registry()).listeners[0].rule


def replay_text(text, rule):
    """Replay a transcript (bytes) through a fresh inspector of ``rule``."""
    return replay(parse_transcript(text), inspector_factory(rule.protocol).buildInspector(rule))


def run_cli(*args):
    """Run the real ``mailguard replay`` command in a subprocess, in the source tree; return the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "mailguard.cli", "replay", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def run_main(*args):
    """Run ``mailguard replay`` in this process (quicker); return (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["replay", *args])
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


def shipped(path):
    """The absolute path of a shipped policy (trial runs in its own directory)."""
    return os.path.join(ROOT, path)


def readme_mailguard_block():
    """The lines of the README's MailGuard transcript, as (dialogue line, annotation or None)."""
    section = readme().split("### MailGuard mode", 1)[1]
    block = section.split("```\n", 2)[1]
    rows = []
    for row in block.splitlines():
        match = re.match(r"(.*?)\s{2,}\((.*)\)\Z", row)
        rows.append((match.group(1), match.group(2)) if match else (row, None))
    return rows


class ReadmeTests(SynchronousTestCase):
    """The README's MailGuard transcript and its replay example are true."""

    def test_mailguard_transcript(self):
        """The README's MailGuard dialogue replays through etc/pix-mailguard.ini to exactly what it shows."""
        rows = readme_mailguard_block()
        recorded = []
        for line, note in rows:
            if note is not None and note.startswith("server: "):
                line = "S: " + note[len("server: "):]
            recorded.append(line)
        transcript = ("\n".join(recorded) + "\n").encode()
        with open(os.path.join(DATA, "readme-mailguard.txt"), "rb") as f:
            self.assertEqual(b"\n".join(l for l in f.read().split(b"\n") if not l.startswith(b"#")).strip(),
                             transcript.strip())
        result = replay_text(transcript, policy_rule("etc/pix-mailguard.ini"))
        self.assertEqual(result.client_view, [line for line, _ in rows])
        self.assertEqual(rows[0][0], "S: 220" + "*" * 48 + "0")
        # What the annotations say the server received.
        output = "\n".join(result.lines)
        for line, note in rows:
            if note is None or not line.startswith("C: "):
                continue
            if note.startswith("the server received "):
                received = note[len("the server received "):]
            else:
                self.assertIn("x-ed", note)
                received = "x" * len(line[3:])
            self.assertIn("C: %s\n       server gets: %s\n" % (line[3:], received), output)
        self.assertEqual(result.status, 1)

    def test_readme_replay_example(self):
        """The README's replay example is the real output of the command, exit status included."""
        section = readme().split("### `mailguard replay`", 1)[1]
        block = section.split("```\n$ ", 1)[1].split("```", 1)[0]
        command, _, shown = block.partition("\n")
        args = command.split()
        self.assertEqual(args[:2], ["mailguard", "replay"])
        result = run_cli(*args[2:])
        self.assertEqual(result.stdout, shown)
        self.assertEqual(result.returncode, 1)


class SwaksCaptureTests(TestCase):
    """Transcripts captured from swaks through a real gateway, replayed through every shipped policy."""

    def setUp(self):
        if shutil.which("swaks") is None:
            raise SkipTest("swaks is not installed (apt-get install swaks; .ci/run does)")

    @defer.inlineCallbacks
    def capture(self, rule):
        """Run swaks through a gateway with ``rule`` to a recording backend; return (transcript, received)."""
        backend = RecordingBackend(greeting=b"220 mx.example.com ESMTP Postfix (Debian/GNU) 3.7.10\r\n")
        bport = listenBackend(self, backend)
        if rule.mask_banner == "pix":
            # swaks waits forever on a PIX-masked banner; the strict-client setting (see the README).
            rule = replace(rule, mask_banner="on")
        _, port = start_gateway(self, rule, bport)
        result = yield deferToThread(
            subprocess.run,
            ["swaks", "--server", "127.0.0.1:%d" % port, "--from", "a@example.org", "--to", "b@example.org",
             "--helo", "client.example", "--header", "Subject: replay", "--body", "captured for replay",
             "--timeout", "10"],
            capture_output=True, timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        yield wait_for(lambda: backend.connections and backend.connections[0].closed)
        return result.stdout, bytes(backend.connections[0].received)

    @defer.inlineCallbacks
    def test_each_shipped_policy(self):
        """For each shipped policy, its swaks transcript replays to exactly the bytes the backend received."""
        for path in POLICIES:
            rule = policy_rule(path)
            transcript, received = yield self.capture(rule)
            result = replay_text(transcript, rule)
            self.assertEqual(bytes(result.to_server), received, path)
            if rule.protocol == "esmtp":
                self.assertEqual(result.status, 0, path)
                self.assertEqual(result.alerts, [])
            else:
                # swaks tries EHLO first: x-ed by MailGuard, then HELO.
                self.assertEqual(result.status, 1, path)
                self.assertEqual(result.alerts, ["SMTP_INVALID_COMMAND"])
                self.assertTrue(received.startswith(b"x" * len(b"EHLO client.example") + b"\r\nHELO client.example\r\n"))

    @defer.inlineCallbacks
    def test_esmtp_transcript_through_mailguard(self):
        """A transcript captured through esmtp, replayed through PIX MailGuard: EHLO x-ed, its 250 replaced by 500."""
        transcript, _ = yield self.capture(policy_rule("etc/policy.ini"))
        result = replay_text(transcript, policy_rule("etc/pix-mailguard.ini"))
        self.assertEqual(result.status, 1)
        self.assertTrue(bytes(result.to_server).startswith(b"x" * 19 + b"\r\nMAIL FROM:<a@example.org>\r\n"))
        self.assertIn("S: 500 5.5.2 Error: command not recognized", result.client_view)
        self.assertIn("replayed as its error reply", "\n".join(result.lines))


ILLEGAL = b"""\
S: 220 mx.example ESMTP
C: EHLO client.example
S: 250-mx.example
S: 250-PIPELINING
S: 250 EXPN
C: EXPN staff
S: 250 staff@mx.example
C: QUIT
S: 221 bye
"""

SMUGGLING = b"""\
S: 220 mx.example ESMTP
C: EHLO client.example
S: 250-mx.example
S: 250 PIPELINING
C: MAIL FROM:<a@client.example>
S: 250 ok
C: RCPT TO:<b@mx.example>
S: 250 ok
C: DATA
S: 354 go ahead
C: Subject: hello
C:
C: body\\n.\\nMAIL FROM:<evil@attacker.example>
C: RCPT TO:<victim@mx.example>
C: DATA
C: Subject: smuggled
C: .
S: 250 queued
C: QUIT
S: 221 bye
"""


class DialogueTests(SynchronousTestCase):
    """Replays of hand-written C:/S: transcripts, and the command line."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def write(self, name, data):
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_illegal_command(self):
        """EXPN is x-ed for the server, the recorded 250 becomes the server's 500, the alert is shown; exit 1."""
        result = run_main("-c", shipped("etc/policy.ini"), self.write("expn.txt", ILLEGAL))
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("   6 C: EXPN staff\n       server gets: xxxxxxxxxx\n"
                      "       alert SMTP_INVALID_COMMAND: Invalid SMTP command (EXPN): not allowed\n", result.stdout)
        self.assertIn("   7 S: 250 staff@mx.example\n"
                      "       the server received the x-ed line, not the recorded command: replayed as its error reply\n"
                      "       server answers: 500 5.5.2 Error: command not recognized\n"
                      "       client sees: (same)\n", result.stdout)
        self.assertIn("EHLO_KEYWORD_REMOVED", result.stdout)

    def test_smuggling_normalized(self):
        """A bare-LF end of data is normalized and dot-stuffed for the server: one message, alert, exit 1."""
        result = replay_text(SMUGGLING, policy_rule("etc/policy.ini"))
        self.assertEqual(result.status, 1)
        self.assertEqual(result.alerts, ["SMTP_BARE_NEWLINE"])
        self.assertIn(b"body\r\n..\r\nMAIL FROM:<evil@attacker.example>\r\n", bytes(result.to_server))
        self.assertEqual(bytes(result.to_server).count(b"\r\n.\r\n"), 1)
        self.assertIn("S: 250 queued", result.client_view)

    def test_smuggling_rejected(self):
        """Under bare-newline = reject the message never completes: 550, then the session closes."""
        with open(os.path.join(ROOT, "etc/policy.ini"), "rb") as f:
            policy = f.read().replace(b"max-data = 20000000", b"max-data = 20000000\nbare-newline = reject")
        path = self.write("reject.ini", policy)
        result = run_main("-c", path, self.write("smuggle.txt", SMUGGLING))
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("client sees: 550 5.5.2 bare <CR> or <LF> received", result.stdout)
        self.assertIn("the gateway drops the server connection (bare newline)", result.stdout)
        self.assertIn("dropped: the gateway has closed the session", result.stdout)
        self.assertNotIn("evil@attacker.example>\n       server gets: (same)", result.stdout)

    def test_gateway_answers_starttls(self):
        """Under tls = strip the gateway answers STARTTLS itself: the recorded 220 is dropped."""
        transcript = (b"S: 220 mx\nC: EHLO c\nS: 250-mx\nS: 250 STARTTLS\nC: STARTTLS\n"
                      b"S: 220 2.0.0 Ready to start TLS\nC: QUIT\nS: 221 bye\n")
        result = replay_text(transcript, policy_rule("etc/policy.ini"))
        self.assertIn("S: 454 4.7.0 TLS not available", result.client_view)
        self.assertIn("dropped: the server never received STARTTLS (the gateway answered or refused it)",
                      "\n".join(result.lines))
        self.assertEqual(bytes(result.to_server), b"EHLO c\r\nQUIT\r\n")
        self.assertEqual(result.status, 1)

    def test_terminate_gateway_commands(self):
        """Under tls = terminate the gateway's own EHLO, STARTTLS and RSET get replies; the client's STARTTLS does not reach the server."""
        rule = Rule(name="T", protocol="esmtp", tls="terminate", tls_certificate="cert.pem", tls_key="key.pem")
        transcript = (b"S: 220 mx\nC: EHLO c\nS: 250-mx\nS: 250-PIPELINING\nS: 250 STARTTLS\n"
                      b"C: MAIL FROM:<a@b>\nS: 250 ok\nC: STARTTLS\nS: 220 ready\nC: EHLO c\nS: 250 mx\n"
                      b"C: QUIT\nS: 221 bye\n")
        result = replay_text(transcript, rule)
        self.assertEqual(bytes(result.to_server),
                         b"EHLO localhost\r\nSTARTTLS\r\nEHLO c\r\nMAIL FROM:<a@b>\r\nRSET\r\nEHLO c\r\nQUIT\r\n")
        self.assertEqual(result.client_view[:1], ["S: 220 mx"])
        self.assertIn("S: 220 2.0.0 Ready to start TLS", result.client_view)
        output = "\n".join(result.lines)
        self.assertIn("       server answers the gateway: 220 2.0.0 Ready to start TLS\n"
                      "       TLS starts on the server leg\n"
                      "       client sees: 220 mx\n", output)
        self.assertIn("dropped: the server never received STARTTLS", output)
        self.assertEqual(result.status, 1)

    def test_escapes(self):
        """\\r, \\n, \\0, \\xHH and \\\\ write any byte; each C: line stands for its text and CRLF."""
        lines = parse_transcript(b"S: 220 x\nC: a\\rb\\nc\\0d\\x41\\\\\nC:\n")
        self.assertEqual([l.data for l in lines], [b"220 x\r\n", b"a\rb\nc\0dA\\\r\n", b"\r\n"])
        self.assertEqual([l.number for l in lines], [1, 2, 3])

    def test_swaks_data_line_ends(self):
        """In swaks' data a CR LF line was CRLF, an LF-only line a bare LF, and the final '.' is '.CRLF'."""
        text = (b"<-  220 x\n -> DATA\n<-  354 go\n -> a\r\n -> b\n -> .\n -> c\r\n -> .\n<-  250 ok\n"
                b"=== Connection closed with remote host.\n")
        lines = parse_transcript(text)
        self.assertEqual([l.data for l in lines],
                         [b"220 x\r\n", b"DATA\r\n", b"354 go\r\n", b"a\r\n", b"b\n", b".\n", b"c\r\n", b".\r\n",
                          b"250 ok\r\n"])

    def test_malformed_transcripts(self):
        """A malformed transcript: exit 3 and one line naming the file and the line number."""
        cases = {
            b"S: 220 x\nC: EHLO a\nS: 250 ok\nhello\n": (4, "expected a line starting with 'C: ' or 'S: '"),
            b"S: 220 x\nC: bad \\q escape\n": (2, "unknown escape"),
            b"S: 220 x\nC: EHLO a\nS: hello\n": (3, "not an SMTP reply line"),
            b"S: 220 x\nC: EHLO a\nS: 250-a\nS: 250-b\n": (4, "ends in the middle of a multi-line reply"),
            b"<-  220 x\n -> EHLO a\nsomething else\n": (3, "not a swaks transcript line"),
            b"# nothing\n\n": (2, "no dialogue"),
        }
        for n, (text, (number, problem)) in enumerate(cases.items()):
            path = self.write("bad%d.txt" % n, text)
            result = run_main("-c", shipped("etc/policy.ini"), path)
            self.assertEqual(result.returncode, 3, text)
            self.assertEqual(result.stdout, "")
            self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
            self.assertTrue(result.stderr.startswith("%s: line %d: " % (path, number)), result.stderr)
            self.assertIn(problem, result.stderr)
            with self.assertRaises(TranscriptError):
                parse_transcript(text)

    def test_unknown_listener(self):
        """--listener with an unknown name is a one-line error (exit 2); a known one picks its rule."""
        path = os.path.join(DATA, "readme-mailguard.txt")
        result = run_main("-c", shipped("etc/pix-mailguard.ini"), "--listener", "nope", path)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr, shipped("etc/pix-mailguard.ini") + ": no [listener nope] (listeners: mail)\n")
        result = run_main("-c", shipped("etc/pix-mailguard.ini"), "--listener", "mail", path)
        self.assertEqual(result.returncode, 1)
        self.assertTrue(result.stdout.startswith("listener mail: rule MAILGUARD (protocol mailguard)\n"))

    def test_unchanged_dialogue_exit_0(self):
        """A dialogue the policy lets through untouched exits 0."""
        transcript = b"S: 220 mx\nC: HELO c\nS: 250 mx\nC: NOOP\nS: 250 ok\nC: QUIT\nS: 221 bye\n"
        result = run_main("-c", shipped("etc/policy.ini"), self.write("ok.txt", transcript))
        self.assertEqual(result.returncode, 0, result.stdout)
        self.assertTrue(result.stdout.endswith("verdict: every client line reaches the server unchanged, no alert (exit 0)\n"))


#: Lines random transcripts are made of: commands, data, bare newlines, NULs, replies of every kind.
_PIECES = [
    b"S: 220 mx ESMTP", b"S: 250-mx", b"S: 250-PIPELINING", b"S: 250-STARTTLS", b"S: 250 CHUNKING",
    b"S: 250 ok", b"S: 354 go", b"S: 221 bye", b"S: 500 what", b"S: 334 VXNlcg==", b"S: 421 closing",
    b"S: 220 ready", b"C: EHLO c", b"C: HELO c", b"C: MAIL FROM:<a@b>", b"C: RCPT TO:<c@d>", b"C: DATA",
    b"C: .", b"C: body\\n.\\nMAIL FROM:<e@f>", b"C: x\\0y", b"C: STARTTLS", b"C: AUTH PLAIN",
    b"C: BDAT 3 LAST", b"C: abc", b"C: QUIT", b"C: EXPN x", b"C: \\r\\n", b"C:", b"# note",
]


class PropertyTests(SynchronousTestCase):
    """The transcript reader and the replay never fail in any other way than they promise."""

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300))
    def test_parse_or_transcript_error(self, raw):
        """Any bytes either parse into C/S lines ending in a line end, or raise TranscriptError."""
        try:
            lines = parse_transcript(raw)
        except TranscriptError as e:
            self.assertEqual(len(str(e).splitlines()), 1)
            return
        for line in lines:
            self.assertIn(line.side, ("C", "S"))
            self.assertTrue(line.data.endswith(b"\n"))

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.sampled_from(_PIECES), max_size=25), st.sampled_from(POLICIES))
    def test_replay_any_dialogue(self, pieces, path):
        """Any readable transcript replays through every shipped policy to a report and status 0 or 1."""
        try:
            lines = parse_transcript(b"\n".join(pieces) + b"\n")
        except TranscriptError:
            return
        rule = policy_rule(path)
        result = replay(lines, inspector_factory(rule.protocol).buildInspector(rule))
        self.assertIn(result.status, (0, 1))
        self.assertTrue(result.lines[-1].startswith("verdict: "))
