"""Tests for the sans-IO SMTP inspector, driven directly (no network, no reactor)."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailguard.commands import MODES
from mailguard.events import AbortServer, Alert, Close, Greeted, MessageDone, MessageSent, ToClient, ToServer
from mailguard.policy import Rule
from mailguard.smtp import SMTPInspector

EHLO_REPLY = (
    b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n"
    b"250-AUTH PLAIN LOGIN\r\n250-DSN\r\n250-CHUNKING\r\n250-BINARYMIME\r\n"
    b"250-ETRN\r\n250-XEXCH50\r\n250-STARTTLS\r\n250 ENHANCEDSTATUSCODES\r\n"
)


class Dialogue:
    """Drive one inspector and collect what each side receives."""

    def __init__(self, protocol="esmtp", greet=True, **rule):
        rule.setdefault("max_data", 1000)
        if protocol == "mailguard":
            rule.setdefault("mask_banner", "pix")
        self.inspector = SMTPInspector(Rule(name="r", protocol=protocol, **rule), MODES[protocol])
        self.to_server = b""
        self.to_client = b""
        self.alerts = []
        self.closed = None
        self.aborted = False
        self.sent = []
        self.done = []
        self.take(self.inspector.server_connected())
        if greet:
            self.server(b"220 mx.example ESMTP\r\n")

    def take(self, events):
        for e in events:
            if isinstance(e, ToServer):
                assert self.closed is None, "bytes sent to the server after Close"
                self.to_server += e.data
            elif isinstance(e, ToClient):
                self.to_client += e.data
            elif isinstance(e, Alert):
                self.alerts.append(e.tag)
            elif isinstance(e, Close):
                self.closed = e.reason
            elif isinstance(e, AbortServer):
                self.aborted = True
            elif isinstance(e, MessageSent):
                self.sent.append(e.size)
            elif isinstance(e, MessageDone):
                self.done.append(e)
            else:
                assert isinstance(e, Greeted)
        return self

    def client(self, data):
        return self.take(self.inspector.client_data(data))

    def server(self, data):
        return self.take(self.inspector.server_data(data))

    def ehlo(self, reply=EHLO_REPLY):
        self.client(b"EHLO client\r\n").server(reply)
        self.to_server = self.to_client = b""
        self.alerts = []
        return self


class CommandTests(SynchronousTestCase):
    """Allowlists and the x rewrite."""

    def test_legal_command_forwarded(self):
        """A legal command reaches the server unchanged and its reply the client."""
        d = Dialogue("smtp").client(b"HELO me\r\n").server(b"250 mx\r\n")
        self.assertEqual(d.to_server, b"HELO me\r\n")
        self.assertTrue(d.to_client.endswith(b"250 mx\r\n"))

    def test_illegal_rewritten(self):
        """EXPN, TURN, an unknown verb and a non-command are overwritten with x, same length."""
        for line in (b"EXPN staff", b"TURN", b"XYZZY 1", b"hello there"):
            d = Dialogue("esmtp").client(line + b"\r\n")
            self.assertEqual(d.to_server, b"x" * len(line) + b"\r\n")
            self.assertEqual(d.alerts, ["SMTP_INVALID_COMMAND"])
            d.server(b"500 5.5.2 unknown\r\n")
            self.assertTrue(d.to_client.endswith(b"500 5.5.2 unknown\r\n"))

    def test_ehlo_illegal_in_smtp_mode(self):
        """In smtp mode EHLO is illegal and rewritten."""
        d = Dialogue("smtp").client(b"EHLO me\r\n")
        self.assertEqual(d.to_server, b"xxxxxxx\r\n")

    def test_nul_and_cr_illegal(self):
        """A line holding NUL or a bare CR is illegal."""
        for line in (b"NOOP\0", b"NO\rOP"):
            d = Dialogue("smtp").client(line + b"\r\n")
            self.assertEqual(d.to_server, b"x" * len(line) + b"\r\n")

    def test_mailguard_mode(self):
        """mailguard mode: only RFC 821 verbs; MAIL parameters make MAIL illegal."""
        d = Dialogue("mailguard")
        self.assertTrue(d.to_client.startswith(b"220*"))
        d.client(b"VRFY x\r\n").server(b"500 no\r\n")
        d.client(b"MAIL FROM:<a@b> BODY=8BITMIME\r\n").server(b"500 no\r\n")
        d.client(b"HELO me\r\n").server(b"250 ok\r\n")
        self.assertEqual(d.to_server, b"xxxxxx\r\n" + b"x" * len(b"MAIL FROM:<a@b> BODY=8BITMIME") + b"\r\nHELO me\r\n")

    def test_bare_lf_command_normalized(self):
        """A command ended by bare LF is forwarded with CRLF by default."""
        d = Dialogue("smtp").client(b"NOOP\n")
        self.assertEqual(d.to_server, b"NOOP\r\n")

    def test_bare_lf_command_rejected(self):
        """With bare-newline = reject, a bare-LF command gets 500 and is not forwarded."""
        d = Dialogue("smtp", bare_newline="reject").client(b"NOOP\n")
        self.assertEqual(d.to_server, b"")
        self.assertIn(b"500 5.5.2", d.to_client)

    def test_line_too_long(self):
        """An over-long command line is answered 500 5.5.2 by the gateway."""
        d = Dialogue("smtp").client(b"NOOP " + b"a" * 600 + b"\r\nNOOP\r\n")
        self.assertIn(b"500 5.5.2 Line too long", d.to_client)
        self.assertEqual(d.to_server, b"NOOP\r\n")

    def test_max_bad_commands(self):
        """The bad command that reaches max-bad-commands is not forwarded: 421 and close."""
        d = Dialogue("smtp", max_bad_commands=3)
        for _ in range(2):
            d.client(b"EXPN x\r\n").server(b"500 no\r\n")
        d.client(b"EXPN x\r\n")
        self.assertEqual(d.to_server.count(b"xxxxxx\r\n"), 2)
        self.assertTrue(d.to_client.endswith(b"421 4.7.0 Too many errors, closing connection\r\n"))
        self.assertIsNotNone(d.closed)

    def test_non_smtp(self):
        """An HTTP request line or a header line closes the session with 221 2.7.0."""
        for line in (b"GET / HTTP/1.1", b"Subject: hi"):
            d = Dialogue("esmtp").client(line + b"\r\n")
            self.assertEqual(d.to_server, b"")
            self.assertIn(b"221 2.7.0", d.to_client)
            self.assertEqual(d.alerts, ["NON_SMTP_COMMAND"])


class SequencingTests(SynchronousTestCase):
    """Reply ordering, pipelining and synchronisation."""

    def test_pipelined_group(self):
        """MAIL/RCPT/RCPT/DATA pipelined are forwarded and replies matched in order."""
        d = Dialogue().ehlo()
        d.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n")
        self.assertEqual(d.to_server.count(b"\r\n"), 4)
        d.server(b"250 1\r\n250 2\r\n250 3\r\n354 go\r\n")
        self.assertEqual(d.to_client, b"250 1\r\n250 2\r\n250 3\r\n354 go\r\n")

    def test_local_reply_in_order(self):
        """A gateway reply in the middle of a pipelined group keeps its place."""
        d = Dialogue(max_recipients=1).ehlo()
        d.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nRSET\r\n")
        self.assertNotIn(b"e@f", d.to_server)
        self.assertEqual(d.to_client, b"")
        d.server(b"250 1\r\n250 2\r\n250 3\r\n")
        self.assertEqual(d.to_client, b"250 1\r\n250 2\r\n452 4.5.3 Too many recipients\r\n250 3\r\n")

    def test_sync_without_pipelining(self):
        """Without PIPELINING, a command before the previous reply gets 554 and close."""
        d = Dialogue("smtp").client(b"HELO a\r\nNOOP\r\n")
        self.assertIn(b"554 5.5.0", d.to_client)
        self.assertIsNotNone(d.closed)

    def test_sync_after_group_end(self):
        """Even with PIPELINING, a command after DATA before the 354 is a sync error."""
        d = Dialogue().ehlo().client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nSubject: x\r\n")
        self.assertIn(b"554 5.5.0", d.to_client)

    def test_pregreet_rejected(self):
        """Bytes before the greeting get 554 and close (pregreet = reject)."""
        d = Dialogue(greet=False).client(b"EHLO early\r\n")
        self.assertIn(b"554 5.5.1", d.to_client)
        self.assertEqual(d.to_server, b"")
        self.assertEqual(d.alerts, ["PREGREET"])

    def test_pregreet_ignored(self):
        """With pregreet = ignore the early bytes are inspected after the greeting."""
        d = Dialogue("smtp", greet=False, pregreet="ignore").client(b"HELO early\r\n")
        self.assertEqual(d.to_server, b"")
        d.server(b"220 mx\r\n")
        self.assertEqual(d.to_server, b"HELO early\r\n")

    def test_invalid_reply(self):
        """A malformed server reply is never relayed: 421 4.4.0 and close."""
        d = Dialogue("smtp").client(b"NOOP\r\n").server(b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(d.to_client.endswith(b"421 4.4.0 Invalid reply from the mail server, closing connection\r\n"))
        self.assertNotIn(b"HTTP", d.to_client)

    def test_unsolicited_421(self):
        """A 421 without a pending command is relayed and closes the session."""
        d = Dialogue("smtp").server(b"421 4.4.2 bye\r\n")
        self.assertTrue(d.to_client.endswith(b"421 4.4.2 bye\r\n"))
        self.assertIsNotNone(d.closed)


class EsmtpTests(SynchronousTestCase):
    """EHLO filtering and extension parameters."""

    def test_ehlo_filtered(self):
        """Unlisted keywords are removed, SIZE capped, the reply re-terminated."""
        d = Dialogue(max_data=5000).client(b"EHLO c\r\n").server(EHLO_REPLY)
        reply = d.to_client.split(b"\r\n", 1)[1]
        self.assertNotIn(b"XEXCH50", reply)
        self.assertNotIn(b"STARTTLS", reply)
        self.assertIn(b"250-SIZE 5000\r\n", reply)
        self.assertTrue(reply.endswith(b"250-ETRN\r\n250 ENHANCEDSTATUSCODES\r\n"))
        self.assertEqual(d.alerts, ["EHLO_KEYWORD_REMOVED"] * 2)

    def test_size_param(self):
        """SIZE= over max-data gets 552 from the gateway and is not forwarded."""
        d = Dialogue(max_data=100).ehlo().client(b"MAIL FROM:<a@b> SIZE=101\r\n")
        self.assertEqual(d.to_server, b"")
        self.assertIn(b"552 5.3.4", d.to_client)

    def test_unadvertised_param_illegal(self):
        """A parameter of an extension that was not advertised makes MAIL illegal."""
        d = Dialogue().ehlo(b"250-mx\r\n250 PIPELINING\r\n").client(b"MAIL FROM:<a@b> BODY=8BITMIME\r\n")
        self.assertTrue(d.to_server.startswith(b"xxxx"))

    def test_params_validated(self):
        """Known parameters with good values pass; bad values are illegal."""
        good = [b"MAIL FROM:<a@b> BODY=8BITMIME SIZE=10 RET=HDRS ENVID=x+2Bz",
                b"RCPT TO:<c@d> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c@d"]
        bad = [b"MAIL FROM:<a@b> BODY=9BIT", b"MAIL FROM:<a@b> FOO=1", b"RCPT TO:<c@d> NOTIFY=NEVER,DELAY",
               b"MAIL FROM:<" + b"a" * 300 + b">", b"MAIL FROM:a@b"]
        for line in good:
            d = Dialogue().ehlo().client(line + b"\r\n")
            self.assertEqual(d.to_server, line + b"\r\n")
        for line in bad:
            d = Dialogue().ehlo().client(line + b"\r\n")
            self.assertEqual(d.to_server, b"x" * len(line) + b"\r\n", line)

    def test_auth_exchange(self):
        """After 334 the client's line is a SASL response, relayed and not parsed as a command."""
        d = Dialogue().ehlo().client(b"AUTH LOGIN\r\n").server(b"334 VXNlcm5hbWU6\r\n")
        d.client(b"dXNlcg==\r\n").server(b"334 UGFzc3dvcmQ6\r\n").client(b"cGFzcw==\r\n").server(b"235 ok\r\n")
        self.assertEqual(d.to_server, b"AUTH LOGIN\r\ndXNlcg==\r\ncGFzcw==\r\n")
        self.assertEqual(d.alerts, [])
        d.client(b"AUTH PLAIN\r\n")
        self.assertTrue(d.to_server.endswith(b"xxxxxxxxxx\r\n"))

    def test_auth_unadvertised_mechanism(self):
        """AUTH with a mechanism that was not advertised is illegal."""
        d = Dialogue().ehlo().client(b"AUTH CRAM-MD5\r\n")
        self.assertEqual(d.to_server, b"x" * 13 + b"\r\n")

    def test_bdat_chunk_is_data(self):
        """BDAT chunk bytes are relayed as opaque data, even CRLF.CRLF and commands."""
        chunk = b"a\r\n.\r\nRSET\r\n"
        d = Dialogue().ehlo().client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
        d.client(b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"QUIT\r\n")
        self.assertEqual(d.to_server, b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 12 LAST\r\n" + chunk + b"QUIT\r\n")

    def test_refused_bdat_consumes_chunk(self):
        """The octets of a BDAT refused for lack of CHUNKING are consumed, not parsed."""
        d = Dialogue().ehlo(b"250-mx\r\n250 PIPELINING\r\n")
        d.client(b"BDAT 6\r\nRSET\r\n")
        self.assertEqual(d.to_server, b"xxxxxx\r\n")

    def test_data_after_binarymime(self):
        """DATA after BODY=BINARYMIME gets 503 5.5.1 from the gateway."""
        d = Dialogue().ehlo().client(b"MAIL FROM:<a@b> BODY=BINARYMIME\r\n").server(b"250 ok\r\n")
        d.client(b"RCPT TO:<c@d>\r\n").server(b"250 ok\r\n").client(b"DATA\r\n")
        self.assertIn(b"503 5.5.1", d.to_client)
        self.assertNotIn(b"DATA", d.to_server)


class DataTests(SynchronousTestCase):
    """The DATA phase through the inspector."""

    def start_data(self, **rule):
        d = Dialogue("esmtp", **rule).ehlo()
        for cmd in (b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>"):
            d.client(cmd + b"\r\n").server(b"250 ok\r\n")
        d.client(b"DATA\r\n").server(b"354 go\r\n")
        d.to_server = d.to_client = b""
        return d

    def test_message_relayed(self):
        """Message data is relayed untouched and commands after the end are inspected."""
        d = self.start_data().client(b"RSET\r\n..x\r\n.\r\nEXPN x\r\n")
        self.assertEqual(d.to_server, b"RSET\r\n..x\r\n.\r\nxxxxxx\r\n")
        d.server(b"250 queued\r\n")
        self.assertEqual(d.to_client, b"250 queued\r\n")

    def test_max_data_exceeded(self):
        """Over max-data: the backend is aborted, the client gets 552 then 421 at its end."""
        d = self.start_data(max_data=10).client(b"0123456789\r\n")
        self.assertTrue(d.aborted)
        self.assertNotIn(b".\r\n", d.to_server)
        d.client(b".\r\n")
        self.assertEqual(d.to_client, b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
                         b"421 4.4.2 Closing connection\r\n")
        self.assertIn("SMTP_MAX_DATA", d.alerts)

    def test_bare_newline_rejected(self):
        """bare-newline = reject: the message is refused with 550 and never completed."""
        d = self.start_data(bare_newline="reject").client(b"a\n.\nMAIL FROM:<x@y>\r\n.\r\n")
        self.assertTrue(d.aborted)
        self.assertIn(b"550 5.5.2", d.to_client)
        self.assertNotIn(b".\r\n", d.to_server[-3:])

    def test_server_lost_mid_data(self):
        """The backend dying mid-message gets the client a 451, never a 250."""
        d = self.start_data().client(b"partial")
        d.take(d.inspector.server_lost())
        self.assertIn(b"451 4.3.0", d.to_client)

    def test_client_lost_mid_data(self):
        """The client leaving mid-message aborts the backend leg."""
        d = self.start_data().client(b"partial")
        d.take(d.inspector.client_lost())
        self.assertTrue(d.aborted)


class PropertyTests(SynchronousTestCase):
    """Properties of the whole inspector over arbitrary client input."""

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=300), st.sampled_from(["smtp", "esmtp", "mailguard"]))
    def test_no_input_raises_and_lines_legal(self, data, protocol):
        """No client input makes the inspector raise; each forwarded command line is legal or all x."""
        d = Dialogue(protocol, pregreet="reject").ehlo(b"250-mx\r\n250 PIPELINING\r\n")
        d.client(data)
        legal = MODES[protocol].verbs
        for line in d.to_server.split(b"\r\n")[:-1]:
            verb = line.split(b" ", 1)[0].upper()
            self.assertTrue(line == b"x" * len(line) or verb in legal, line)

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=200), st.integers(1, 7))
    def test_segmentation(self, body, step):
        """Feeding a dialogue in pieces gives the same bytes both ways as feeding it whole."""
        script = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"

        def run(chunks):
            d = Dialogue().ehlo()
            d.client(script)
            d.server(b"250 ok\r\n250 ok\r\n")
            d.client(b"DATA\r\n").server(b"354 go\r\n")
            for chunk in chunks:
                d.client(chunk)
            return d.to_server, d.to_client

        data = body + b"\r\n.\r\nQUIT\r\n"
        pieces = [data[i : i + step] for i in range(0, len(data), step)]
        self.assertEqual(run([data]), run(pieces))


class TraceTests(SynchronousTestCase):
    """debug = smtp trace points."""

    def test_traces_without_payloads(self):
        """With trace on, commands and replies give Trace events; SASL content never appears."""
        from mailguard.events import Trace

        d = Dialogue().ehlo()
        d.inspector.trace = True
        events = d.inspector.client_data(b"AUTH LOGIN\r\n")
        events += d.inspector.server_data(b"334 VXNlcm5hbWU6\r\n")
        events += d.inspector.client_data(b"c2VjcmV0\r\n")
        traces = [e for e in events if isinstance(e, Trace)]
        self.assertEqual([(t.direction, t.verb, t.code) for t in traces],
                         [("client", "AUTH", 0), ("server", "AUTH", 334), ("client", "<sasl>", 0)])
        self.assertNotIn("c2VjcmV0", repr(traces))

    def test_no_traces_by_default(self):
        """Without trace, no Trace events are produced."""
        from mailguard.events import Trace

        d = Dialogue().ehlo()
        events = d.inspector.client_data(b"NOOP\r\n") + d.inspector.server_data(b"250 ok\r\n")
        self.assertFalse([e for e in events if isinstance(e, Trace)])


class MessageSentTests(SynchronousTestCase):
    """The inspector reports each whole message sent to the backend."""

    def test_data_size(self):
        """End of DATA gives MessageSent with the size as SIZE counts it."""
        from mailguard.events import MessageSent

        d = Dialogue().ehlo()
        d.client(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n").server(b"250 ok\r\n250 ok\r\n")
        d.client(b"DATA\r\n").server(b"354 go\r\n")
        events = d.inspector.client_data(b"ab\r\n..c\r\n.\r\n")
        self.assertEqual([e for e in events if isinstance(e, MessageSent)], [MessageSent(len(b"ab\r\n.c\r\n"))])
