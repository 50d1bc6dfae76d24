"""The SMTP core without a network: the gateway's own backend set-up, STARTTLS injection both ways, smuggling.

Each dialogue is fed whole and byte by byte (`tests.harness.drive`); the
events say what the server and the client would receive.
"""

from twisted.trial.unittest import SynchronousTestCase

from mailguard.commands import MODES
from mailguard.events import Alert, Close, StartTLS, ToClient, ToServer
from mailguard.policy import Rule
from mailguard.smtp import SMTPInspector
from mailguard.smtp_rules import filter_ehlo
from mailguard.smtp_state import TRANSITIONS

GREETING = b"220 mx.example ESMTP\r\n"


def inspector(**rule):
    """An esmtp inspector for a rule with these keys."""
    rule.setdefault("name", "R")
    rule.setdefault("protocol", "esmtp")
    return SMTPInspector(Rule(**rule), MODES[rule["protocol"]])


def run(insp, steps, bytewise=False):
    """Feed ``steps`` (("c"|"s"|"tls-server"|"tls-client", bytes)); return all events, in order."""
    events = list(insp.server_connected())
    for side, data in steps:
        if side == "tls-server":
            events += insp.server_tls_ready()
            continue
        feed = insp.client_data if side == "c" else insp.server_data
        for piece in ([data[i:i + 1] for i in range(len(data))] if bytewise else [data]):
            events += feed(piece)
    return events


def to_server(events):
    return b"".join(e.data for e in events if isinstance(e, ToServer))


def to_client(events):
    return b"".join(e.data for e in events if isinstance(e, ToClient))


def tags(events):
    return [e.tag for e in events if isinstance(e, Alert)]


class BackendSetupTests(SynchronousTestCase):
    """The gateway secures its own leg and passes the client's address before the client sees the greeting."""

    def test_starttls_then_xclient(self):
        """tls = terminate and xclient: EHLO, STARTTLS, TLS, EHLO again, XCLIENT, then (only then) the greeting."""
        for bytewise in (False, True):
            insp = inspector(tls="terminate", backend_tls="opportunistic")
            insp.xclient = True
            insp.peer = ("192.0.2.7", 40000)
            events = run(insp, [
                ("s", GREETING),
                ("s", b"250-mx.example\r\n250-STARTTLS\r\n250 XCLIENT ADDR PORT\r\n"),
                ("s", b"220 go ahead\r\n"),
                ("tls-server", b""),
                ("s", b"250-mx.example\r\n250 XCLIENT ADDR PORT NAME\r\n"),
            ], bytewise)
            self.assertEqual(to_server(events), b"EHLO localhost\r\nSTARTTLS\r\nEHLO localhost\r\n"
                                                b"XCLIENT ADDR=192.0.2.7 PORT=40000 NAME=[UNAVAILABLE]\r\n")
            self.assertIn(StartTLS("server"), events)
            self.assertEqual(to_client(events), b"")  # nothing before XCLIENT is answered
            events = insp.server_data(b"220 mx.example ESMTP again\r\n")
            self.assertEqual(to_client(events), GREETING)  # the original greeting, once
            self.assertEqual(insp.phase, "COMMAND")

    def test_required_tls_missing(self):
        """backend-tls = required and no STARTTLS offered: the client gets 421, never a greeting."""
        events = run(inspector(tls="terminate", backend_tls="required"),
                     [("s", GREETING), ("s", b"250 mx.example\r\n")])
        self.assertTrue(to_client(events).startswith(b"421 4.7.0"))
        self.assertIn("BACKEND_TLS_MISSING", tags(events))
        self.assertTrue(any(isinstance(e, Close) for e in events))

    def test_starttls_refused_opportunistic(self):
        """A server refusing the gateway's STARTTLS under opportunistic TLS: plaintext, and the greeting goes on."""
        events = run(inspector(tls="terminate"),
                     [("s", GREETING), ("s", b"250-mx.example\r\n250 STARTTLS\r\n"), ("s", b"454 not now\r\n")])
        self.assertEqual(to_server(events), b"EHLO localhost\r\nSTARTTLS\r\n")
        self.assertEqual(to_client(events), GREETING)

    def test_xclient_refused(self):
        """A server refusing XCLIENT is logged; the client still gets the greeting."""
        insp = inspector()
        insp.xclient = True
        insp.peer = ("192.0.2.7", 40000)
        events = run(insp, [("s", GREETING), ("s", b"250-mx.example\r\n250 XCLIENT ADDR\r\n"),
                            ("s", b"550 no\r\n")])
        self.assertIn("XCLIENT_REFUSED", tags(events))
        self.assertEqual(to_client(events), GREETING)


class InjectionTests(SynchronousTestCase):
    """STARTTLS command injection (CVE-2011-0411 class) is refused both ways."""

    def test_client_pipelines_after_starttls(self):
        """Bytes a client sends in the same segment as STARTTLS close the session: they never reach the server."""
        insp = inspector(tls="terminate", backend_tls="off", tls_certificate="c", tls_key="k")
        events = run(insp, [("s", GREETING), ("c", b"EHLO c\r\n"), ("s", b"250-mx\r\n250 PIPELINING\r\n"),
                            ("c", b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n")])
        self.assertNotIn(b"MAIL", to_server(events))
        self.assertIn("STARTTLS_INJECTION", tags(events))
        self.assertNotIn(StartTLS("client"), events)

    def test_server_sends_after_its_220(self):
        """Bytes a server sends after its 220 to the gateway's STARTTLS are never relayed: the client gets 421."""
        # A whole injected reply, and a partial one (the start of a reply with the 220).
        for after in (b"250 injected\r\n", b"250 inj"):
            insp = inspector(tls="terminate")
            events = run(insp, [("s", GREETING), ("s", b"250-mx\r\n250 STARTTLS\r\n"),
                                ("s", b"220 go ahead\r\n" + after)])
            self.assertIn("STARTTLS_INJECTION", tags(events), after)
            self.assertNotIn(StartTLS("server"), events)
            self.assertTrue(to_client(events).startswith(b"421 4.7.0"), after)


class SmugglingTests(SynchronousTestCase):
    """No end of data the client did not send as CRLF . CRLF ever reaches the server."""

    VARIANTS = [b"\r\n.\n", b"\n.\n", b"\n.\r", b"\r.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n\x00.\r\n",
                b"\r\n.\r\r\n", b"\r\r\n.\r\r\n"]

    def test_variants_normalized(self):
        """Each variant, whole and byte by byte: the server sees one end of data, the client's real one."""
        for variant in self.VARIANTS:
            for bytewise in (False, True):
                insp = inspector()
                events = run(insp, [
                    ("s", GREETING), ("c", b"EHLO c\r\n"), ("s", b"250-mx\r\n250 PIPELINING\r\n"),
                    ("c", b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n"), ("s", b"250 ok\r\n250 ok\r\n354 go\r\n"),
                    ("c", b"Subject: x\r\n\r\nbody" + variant + b"MAIL FROM:<evil@x>\r\n.\r\n"),
                ], bytewise)
                sent = to_server(events).split(b"DATA\r\n", 1)[1]
                self.assertEqual(sent.count(b"\r\n.\r\n"), 1, (variant, bytewise))
                self.assertTrue(sent.endswith(b"\r\n.\r\n"), (variant, bytewise))

    def test_variants_rejected(self):
        """With bare-newline = reject the message never completes at the server and the client is told why."""
        for variant in self.VARIANTS:
            insp = inspector(bare_newline="reject")
            events = run(insp, [
                ("s", GREETING), ("c", b"EHLO c\r\n"), ("s", b"250-mx\r\n250 PIPELINING\r\n"),
                ("c", b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n"), ("s", b"250 ok\r\n250 ok\r\n354 go\r\n"),
                ("c", b"Subject: x\r\n\r\nbody" + variant + b"MAIL FROM:<evil@x>\r\n.\r\n"),
            ])
            self.assertNotIn(b"\r\n.\r\n", to_server(events).split(b"DATA\r\n", 1)[1], variant)
            self.assertRegex(to_client(events).split(b"354 go\r\n", 1)[1], rb"^550 5\.5\.2 ", variant)


class StateTableTests(SynchronousTestCase):
    """The phase table is whole: every phase named, every target a phase."""

    def test_table(self):
        """Every transition leads to a phase of the table, and every phase but CLOSED can close."""
        for phase, targets in TRANSITIONS.items():
            for target in targets:
                self.assertIn(target, TRANSITIONS)
            if phase != "CLOSED":
                self.assertIn("CLOSED", targets)


class EhloRuleTests(SynchronousTestCase):
    """The EHLO rule alone: allowlist, SIZE cap, AUTH hidden before TLS, the gateway's STARTTLS."""

    def test_rule(self):
        """Only allowed keywords pass, SIZE is capped at max-data, BINARYMIME needs CHUNKING."""
        rule = Rule(name="R", protocol="esmtp", max_data=1000, ehlo_keywords=frozenset({"SIZE", "AUTH", "BINARYMIME"}))
        view = filter_ehlo(250, [b"mx", b"SIZE 99999", b"AUTH PLAIN", b"X-SECRET", b"BINARYMIME", b"STARTTLS"],
                           rule, "strip", offer_starttls=False)
        self.assertEqual(view.reply, b"250-mx\r\n250-SIZE 1000\r\n250 AUTH PLAIN\r\n")
        self.assertEqual(view.removed, (b"X-SECRET", b"BINARYMIME", b"STARTTLS"))
        view = filter_ehlo(250, [b"mx", b"AUTH PLAIN"], rule, "terminate", offer_starttls=True, hide_auth=True)
        self.assertEqual(view.reply, b"250-mx\r\n250 STARTTLS\r\n")
        self.assertEqual(view.removed, ())
