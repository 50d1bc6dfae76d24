"""End-to-end tests of content rules: real clients through the real gateway to the recording backend."""

import os
import random
import smtplib
import socket
from email.message import EmailMessage

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from mailguard.policy import GlobalSettings, parse_policy
from tests.backends import RecordingBackend, listenBackend
from tests.clients import bdat_session
from tests.harness import start_gateway

#: A body line with a word a body rule looks for, in each text part's encoding.
SECRET = "the launch code is swordfish"


def wire(m):
    """An EmailMessage as bytes with CRLF line ends."""
    return m.as_bytes(policy=m.policy.clone(linesep="\r\n"))


def base_message(subject="Hello", body="just a note\n", cte=None):
    """A plain text message (cte: quoted-printable or base64 for the text part)."""
    m = EmailMessage()
    m["From"] = "alice@example.org"
    m["To"] = "bob@example.net"
    m["Subject"] = subject
    if cte:
        m.set_content(body, cte=cte, charset="utf-8")
    else:
        m.set_content(body)
    return m


def with_attachment(filename, body="see attached\n", maintype="application", subtype="octet-stream"):
    """A message with one attachment called ``filename`` (the generator picks plain, RFC 2231 or RFC 2047 form)."""
    m = base_message(body=body)
    m.add_attachment(b"MZ\x90\x00" * 64, maintype=maintype, subtype=subtype, filename=filename)
    return m


def nested(body_html="<p>hi</p>\n", filename="report.pdf"):
    """multipart/alternative holding text/plain and a multipart/mixed (HTML + attachment)."""
    inner = EmailMessage()
    inner.set_content(body_html, subtype="html", cte="base64")
    inner.add_attachment(b"%PDF-1.4", maintype="application", subtype="pdf", filename=filename)
    m = base_message(body="plain part\n", cte="quoted-printable")
    m.make_alternative()
    m.attach(inner)
    return m


def rfc2047_filename(name_b64, plain="placeholder.bin"):
    """A message whose attachment's file name is an RFC 2047 encoded word (as some clients send it)."""
    data = wire(with_attachment(plain))
    return data.replace(('filename="%s"' % plain).encode(), b'filename="=?utf-8?b?' + name_b64 + b'?="')


class ContentRulesTestCase(TestCase):
    """Shared set-up: a recording backend, the gateway under a policy of matches, the log."""

    timeout = 60

    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.spool = os.path.abspath(self.mktemp())

    def gateway(self, matches, rule_keys="", **backend_kwargs):
        """Start a recording backend and the gateway with a rule using ``matches`` (name -> section body)."""
        self.backend = RecordingBackend(**backend_kwargs)
        bport = listenBackend(self, self.backend)
        text = "[inspect R]\nprotocol = esmtp\nmax-data = 2000000\nmatch = %s\n%s\n" % (", ".join(matches), rule_keys)
        for name, body in matches.items():
            text += "[match %s]\n%s\n" % (name, body)
        text += "[listener L]\nlisten = tcp:0\nbackend = tcp:host=127.0.0.1:port=%d\ninspect = R\n" % bport
        rule = parse_policy(text, path="test.ini").rules[0]
        self.tracker, self.port = start_gateway(self, rule, bport, GlobalSettings(spool_directory=self.spool))
        return self.port

    def received(self):
        """Every byte the backend received, over all connections."""
        return b"".join(bytes(c.received) for c in self.backend.connections)

    def matches_logged(self):
        """(match, action) of every SMTP_POLICY_MATCH logged."""
        return [(e.get("match"), e.get("action")) for e in self.events if e.get("tag") == "SMTP_POLICY_MATCH"]

    def send(self, messages, sender="alice@example.org", rcpts=("bob@example.net",)):
        """Send each message in one smtplib session; return per message the refusal code or the refused-recipients dict."""

        def talk():
            results = []
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as c:
                for m in messages:
                    try:
                        results.append(c.sendmail(sender, list(rcpts), m if isinstance(m, bytes) else wire(m)))
                    except smtplib.SMTPDataError as e:
                        results.append((e.smtp_code, e.smtp_error))
                    except smtplib.SMTPSenderRefused as e:
                        results.append((e.smtp_code, e.smtp_error))
                    except smtplib.SMTPRecipientsRefused as e:
                        results.append(("rcpts", e.recipients))
                    except smtplib.SMTPServerDisconnected:
                        results.append("closed")
                        break
            return results

        return deferToThread(talk)


REJECTED = (550, b"5.7.1 Message rejected by policy")


class MessageCriteriaTests(ContentRulesTestCase):
    """Every message criterion: a message that has it is refused whole, one that has not is delivered."""

    @defer.inlineCallbacks
    def check(self, criterion, bad, good):
        """``bad`` is rejected before any of it reaches the server; ``good`` is then delivered intact."""
        self.gateway({"m": criterion + "\naction = reject"})
        results = yield self.send([bad, good])
        self.assertEqual(results, [REJECTED, {}], criterion)
        received = self.received()
        self.assertEqual(received.upper().count(b"DATA\r\n"), 1, criterion)  # only the good one's
        self.assertEqual(received.count(b"\r\n.\r\n"), 1, criterion)
        self.assertEqual(len(self.backend.messages), 1, criterion)
        good_bytes = good if isinstance(good, bytes) else wire(good)
        self.assertEqual(self.backend.messages[0].data, good_bytes.replace(b"\r\n", b"\n"), criterion)
        self.assertEqual(self.matches_logged(), [("m", "reject")], criterion)

    def test_header(self):
        """header: an unfolded, RFC 2047-decoded field as Name: value."""
        return self.check("header = (?i)^Subject: .*Überweisung",
                          base_message("Dringende Überweisung " + "x" * 80), base_message("Hallo"))

    def test_header_length(self):
        """header-length-gt: the header block's size."""
        return self.check("header-length-gt = 400", base_message("x" * 500), base_message("short"))

    def test_header_line_length(self):
        """header-line-length-gt: the longest header line, without its CRLF."""
        long_line = b"X-Long: " + b"y" * 1200 + b"\r\n"
        bad = long_line + wire(base_message())
        return self.check("header-line-length-gt = 998", bad, wire(base_message("ok")))

    def test_to_fields(self):
        """header-to-fields-count-gt: the number of To: fields."""
        bad = b"To: a@example.net\r\n" + wire(base_message())
        return self.check("header-to-fields-count-gt = 1", bad, base_message())

    def test_body_quoted_printable(self):
        """body: a line of a quoted-printable text part, decoded."""
        return self.check("body = swordfish$", base_message(body="héllo\n" + SECRET + "\n", cte="quoted-printable"),
                          base_message(body="héllo\nnothing here\n", cte="quoted-printable"))

    def test_body_base64_nested(self):
        """body: a line of a base64 HTML part inside multipart/mixed inside multipart/alternative."""
        return self.check("body = swordfish", nested("<p>" + SECRET + "</p>\n"), nested("<p>harmless</p>\n"))

    def test_body_length(self):
        """body-length-gt: the body's size in octets."""
        return self.check("body-length-gt = 5000", base_message(body=("z" * 70 + "\n") * 100), base_message())

    def test_body_line_length(self):
        """body-line-length-gt: the longest body line, without its CRLF."""
        bad = b"Subject: long\r\n\r\n" + b"w" * 1500 + b"\r\n"
        return self.check("body-line-length-gt = 998", bad, b"Subject: short\r\n\r\n" + b"w" * 900 + b"\r\n")

    def test_content_type(self):
        """mime-content-type: any part's type/subtype, nested parts included."""
        return self.check("mime-content-type = ^application/pdf$", nested(), base_message())

    def test_encoding(self):
        """mime-encoding: a part's transfer encoding in the list."""
        return self.check("mime-encoding = base64", with_attachment("a.bin"),
                          base_message(body="plain\n", cte="quoted-printable"))

    def test_filename_plain(self):
        """mime-filename: a plain file name."""
        return self.check("mime-filename = (?i)\\.(exe|scr|js|vbs|bat|cmd)$", with_attachment("setup.EXE"),
                          with_attachment("setup.txt"))

    def test_filename_rfc2231(self):
        """mime-filename: an RFC 2231 continued, charset-tagged file name is decoded before matching."""
        name = "Überweisungsträger für den Monat März und noch viel mehr Text damit es fortgesetzt wird.exe"
        bad = with_attachment(name)
        self.assertIn(b"filename*0*=utf-8''", wire(bad))
        return self.check("mime-filename = ^Überweisungsträger .*\\.exe$", bad, with_attachment("Überweisung.pdf"))

    def test_filename_rfc2047(self):
        """mime-filename: an RFC 2047 encoded-word file name is decoded before matching."""
        import base64

        bad = rfc2047_filename(base64.b64encode("rëchnung.scr".encode()))
        good = rfc2047_filename(base64.b64encode("rëchnung.pdf".encode()))
        return self.check("mime-filename = ^rëchnung\\.scr$", bad, good)

    def test_filename_length(self):
        """mime-filename-length-gt: the decoded file name's length in octets."""
        return self.check("mime-filename-length-gt = 255", with_attachment("n" * 300 + ".txt"),
                          with_attachment("n" * 200 + ".txt"))


class EnvelopeCriteriaTests(ContentRulesTestCase):
    """Envelope criteria act on the command that makes them true; a refused command never reaches the server."""

    @defer.inlineCallbacks
    def test_sender(self):
        """sender-address reject: 550 5.7.1 Sender rejected; the MAIL never reaches the server; others pass."""
        self.gateway({"s": "sender-address = (?i)@spam\\.example$\naction = reject"})
        results = yield self.send([base_message()], sender="x@SPAM.example")
        self.assertEqual(results, [(550, b"5.7.1 Sender rejected by policy")])
        self.assertNotIn(b"spam", self.received().lower())
        results = yield self.send([base_message()], sender="x@ham.example")
        self.assertEqual(results, [{}])
        self.assertEqual(self.backend.messages[0].mail_from, b"x@ham.example")

    @defer.inlineCallbacks
    def test_sender_length(self):
        """sender-address-length-gt drop-connection: 421 4.7.1 and the session ends; nothing reached the server."""
        self.gateway({"l": "sender-address-length-gt = 64\naction = drop-connection"})

        def talk():
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as c:
                c.ehlo()
                code, text = c.mail("a" * 70 + "@example.org")
                try:
                    c.noop()
                    alive = True
                except smtplib.SMTPServerDisconnected:
                    alive = False
                return code, text, alive

        code, text, alive = yield deferToThread(talk)
        self.assertEqual((code, text, alive), (421, b"4.7.1 Connection closed by policy", False))
        self.assertNotIn(b"MAIL", self.received().upper())
        yield self.assertEqual((yield self.send([base_message()], sender="short@example.org")), [{}])

    @defer.inlineCallbacks
    def test_recipient_address_and_count(self):
        """recipient-address refuses that RCPT only; recipient-count-gt 2 refuses the 3rd forwarded RCPT."""
        self.gateway({"pm": "recipient-address = ^postmaster@\naction = reject",
                      "many": "recipient-count-gt = 2\naction = reject"})
        results = yield self.send([base_message()],
                                  rcpts=("postmaster@example.net", "a@example.net", "b@example.net", "c@example.net"))
        self.assertEqual(results, [{"postmaster@example.net": (550, b"5.7.1 Recipient rejected by policy"),
                                    "c@example.net": (550, b"5.7.1 Recipient rejected by policy")}])
        self.assertEqual(self.backend.messages[0].rcpt_to, [b"a@example.net", b"b@example.net"])
        received = self.received()
        self.assertNotIn(b"postmaster", received)
        self.assertNotIn(b"c@example.net", received)

    @defer.inlineCallbacks
    def test_invalid_recipients(self):
        """invalid-recipients-count-gt 1: after the server's 2nd refusal every RCPT is refused by the gateway."""
        self.gateway({"inv": "invalid-recipients-count-gt = 1\naction = reject"},
                     replyOverride={"RCPT": b"550 5.1.1 No such user\r\n"})
        results = yield self.send([base_message()], rcpts=("u1@example.net", "u2@example.net", "u3@example.net"))
        self.assertEqual(results, [("rcpts", {"u1@example.net": (550, b"5.1.1 No such user"),
                                              "u2@example.net": (550, b"5.1.1 No such user"),
                                              "u3@example.net": (550, b"5.7.1 Recipient rejected by policy")})])
        received = self.received()
        self.assertIn(b"u2@example.net", received)
        self.assertNotIn(b"u3@example.net", received)


class DialogueCriteriaTests(ContentRulesTestCase):
    """cmd-*, reply and ehlo-reply-parameter act in the dialogue."""

    @defer.inlineCallbacks
    def test_cmd_verb_reject_and_mask(self):
        """cmd-verb reject answers 550 5.7.1 without the server; mask sends x's; other verbs pass."""
        self.gateway({"v": "cmd-verb = VRFY\naction = reject", "h": "cmd-verb = HELP\naction = mask"})

        def talk():
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as c:
                return [c.docmd("VRFY", "root"), c.docmd("HELP"), c.noop()]

        vrfy, help_, noop = yield deferToThread(talk)
        self.assertEqual(vrfy, (550, b"5.7.1 Command rejected by policy"))
        self.assertEqual(help_[0] // 100, 5)
        self.assertEqual(noop[0], 250)
        received = self.received()
        self.assertNotIn(b"VRFY", received)
        self.assertIn(b"xxxx\r\n", received)
        self.assertIn(b"NOOP\r\n", received.upper())
        self.assertEqual(self.matches_logged(), [("v", "reject"), ("h", "mask")])

    @defer.inlineCallbacks
    def test_cmd_line_length_drop(self):
        """cmd-line-length-gt 512 drop-connection (max-command-line raised): 421 4.7.1, and the line never reaches the server."""
        self.gateway({"long": "cmd-line-length-gt = 512\naction = drop-connection"}, rule_keys="max-command-line = 2048")
        line = b"NOOP " + b"n" * 600 + b"\r\n"
        reply = yield deferToThread(self.raw, [b"EHLO c\r\n", b"NOOP short\r\n", line])
        self.assertTrue(reply.endswith(b"421 4.7.1 Connection closed by policy\r\n"), reply)
        self.assertIn(b"NOOP short", self.received())
        self.assertNotIn(b"n" * 600, self.received())

    def raw(self, lines, reset_ok=False):
        """Send lines one by one, reading replies, until the gateway closes; return all it sent."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        got = b""
        try:
            got += s.recv(4096)
            for line in lines:
                s.sendall(line)
                data = s.recv(65536)
                got += data
                if not data:
                    break
            while True:
                data = s.recv(65536)
                if not data:
                    break
                got += data
        except ConnectionResetError:
            if not reset_ok:
                raise
            got += b"<RST>"
        finally:
            s.close()
        return got

    @defer.inlineCallbacks
    def test_cmd_reset(self):
        """reset: the client connection is reset (RST), no reply."""
        self.gateway({"r": "cmd-verb = ETRN\naction = reset"}, rule_keys="ehlo-keywords = PIPELINING ETRN")
        got = yield deferToThread(self.raw, [b"HELO c\r\n", b"ETRN example.org\r\n"], True)
        self.assertTrue(got.endswith(b"<RST>"), got)
        self.assertEqual(got.count(b"\r\n"), 2, got)  # the greeting and the HELO reply only
        self.assertNotIn(b"ETRN", self.received())
        self.assertNotIn(b"Connection closed by policy", got)

    @defer.inlineCallbacks
    def test_reply(self):
        """reply drop-connection: a server reply matching the regex is not relayed; the client gets 421 4.7.1."""
        self.gateway({"leak": "reply = (?i)internal-host\\.corp\naction = drop-connection"},
                     replyOverride={"NOOP": b"250 2.0.0 Ok from internal-host.corp\r\n"})

        def talk():
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as c:
                ehlo = c.ehlo()
                return ehlo[0], c.noop()

        ehlo, noop = yield deferToThread(talk)
        self.assertEqual(ehlo, 250)  # replies that do not match are relayed
        self.assertEqual(noop, (421, b"4.7.1 Connection closed by policy"))
        self.assertEqual(self.matches_logged(), [("leak", "drop-connection")])

    @defer.inlineCallbacks
    def test_ehlo_others_mask(self):
        """ehlo-reply-parameter others mask: keywords outside the ASA set leave the EHLO reply; the named ones stay."""
        self.gateway({"x": "ehlo-reply-parameter = others\naction = mask"})

        def talk():
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as c:
                c.ehlo()
                return dict(c.esmtp_features)

        features = yield deferToThread(talk)
        self.assertIn("pipelining", features)
        self.assertIn("8bitmime", features)
        self.assertNotIn("chunking", features)
        self.assertNotIn("smtputf8", features)
        self.assertNotIn("help", features)


class ActionTests(ContentRulesTestCase):
    """Each action on a message criterion, as the client and the server see it."""

    @defer.inlineCallbacks
    def test_drop_connection(self):
        """drop-connection: 421 4.7.1 at the end of data, the session closes, nothing reached the server."""
        self.gateway({"d": "body = swordfish\naction = drop-connection"})
        results = yield self.send([base_message(body=SECRET + "\n")])
        self.assertEqual(results, [(421, b"4.7.1 Connection closed by policy")])
        self.assertNotIn(b"DATA", self.received().upper())
        self.assertEqual(self.backend.messages, [])

    @defer.inlineCallbacks
    def test_reset(self):
        """reset: the client's connection is reset at the end of data; nothing reached the server."""
        self.gateway({"r": "body = swordfish\naction = reset"})

        def talk():
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as c:
                try:
                    c.sendmail("a@example.org", ["b@example.net"], wire(base_message(body=SECRET + "\n")))
                except (smtplib.SMTPServerDisconnected, ConnectionResetError) as e:
                    return type(e).__name__
                return "delivered"

        outcome = yield deferToThread(talk)
        self.assertIn(outcome, ("SMTPServerDisconnected", "ConnectionResetError"))
        self.assertNotIn(b"DATA", self.received().upper())
        self.assertEqual(self.backend.messages, [])

    @defer.inlineCallbacks
    def test_rate_limit(self):
        """rate-limit 2: two matching messages per minute from this host pass, the third gets 450 4.7.1."""
        self.gateway({"rl-e2e": "mime-filename = \\.zip$\naction = rate-limit 2"})
        m = with_attachment("a.zip")
        results = yield self.send([m, m, m, base_message()])
        self.assertEqual(results, [{}, {}, (450, b"4.7.1 Rate limit exceeded"), {}])
        self.assertEqual(len(self.backend.messages), 3)

    @defer.inlineCallbacks
    def test_log(self):
        """log: the message is delivered and SMTP_POLICY_MATCH logged with match, action, client, criterion; no content."""
        self.gateway({"watch": "body = swordfish"})
        results = yield self.send([base_message(body=SECRET + "\n")])
        self.assertEqual(results, [{}])
        self.assertEqual(len(self.backend.messages), 1)
        [alert] = [e for e in self.events if e.get("tag") == "SMTP_POLICY_MATCH"]
        self.assertEqual((alert["match"], alert["action"], alert["client"], alert["criterion"]),
                         ("watch", "log", "127.0.0.1", "body swordfish"))
        self.assertNotIn("launch code", repr(alert))

    @defer.inlineCallbacks
    def test_negate_and_order(self):
        """negate inverts a section; the first non-log action in match order decides, every fired match logs."""
        self.gateway({"note": "mime-content-type = ^text/plain$",
                      "no-binary": "mime-encoding = base64\naction = reject",
                      "late": "mime-content-type = ^application/\naction = drop-connection",
                      "unsigned": "header = ^X-Signed: yes$\nnegate = on"})
        signed = base_message()
        signed["X-Signed"] = "yes"
        results = yield self.send([with_attachment("x.bin"), signed])
        self.assertEqual(results, [REJECTED, {}])
        self.assertEqual(self.matches_logged(), [("note", "log"), ("no-binary", "reject"), ("late", "drop-connection"),
                                                 ("unsigned", "log"), ("note", "log")])
        self.assertEqual(len(self.backend.messages), 1)


class BdatTests(ContentRulesTestCase):
    """A raw BDAT client sending an 8-bit body."""

    def bdat(self, messages):
        """Send each message with BDAT (two chunks) in one session; return the reply codes."""
        return bdat_session(self.port, messages, mail_parameters=b"BODY=8BITMIME")

    @defer.inlineCallbacks
    def test_8bit_body(self):
        """body matches an 8-bit UTF-8 line sent with BDAT; its BDAT LAST never reaches the server; the next is delivered."""
        self.gateway({"b": "body = Schwertfisch\naction = reject"})
        bad = "Subject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" \
              "Grüße, der Code ist Schwertfisch\r\n".encode()
        good = bad.replace("Schwertfisch".encode(), "Thunfisch".encode())
        codes = yield deferToThread(self.bdat, [bad, good])
        self.assertEqual(codes, [b"220", b"250", b"250", b"250", b"250", b"550", b"250", b"250", b"250", b"250",
                                 b"221"])
        received = self.received()
        self.assertNotIn("Schwertfisch".encode(), received)
        self.assertEqual(received.count(b"LAST"), 1)
        self.assertEqual(self.backend.messages[0].data, good.replace(b"\r\n", b"\n"))


class SegmentationTests(ContentRulesTestCase):
    """The same messages fed byte by byte and in random pieces get the same verdicts."""

    def data_session(self, messages, cut):
        """Send each message with DATA over a raw socket, its octets in pieces chosen by ``cut``; return the final codes."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=20)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")

        def reply():
            lines = [f.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(f.readline())
            return lines[-1][:3]

        reply()
        s.sendall(b"EHLO c\r\n")
        reply()
        codes = []
        for msg in messages:
            s.sendall(b"MAIL FROM:<a@x.org>\r\n")
            reply()
            s.sendall(b"RCPT TO:<b@x.org>\r\n")
            reply()
            s.sendall(b"DATA\r\n")
            reply()
            payload = msg.replace(b"\r\n.", b"\r\n..") + b".\r\n"
            for piece in cut(payload):
                s.sendall(piece)
            codes.append(reply())
        s.sendall(b"QUIT\r\n")
        reply()
        s.close()
        return codes

    @defer.inlineCallbacks
    def test_same_verdicts(self):
        """Whole, byte by byte and in random pieces, a message set gets the same verdicts through the gateway."""
        self.gateway({"exe": "mime-filename = (?i)\\.exe$\naction = reject",
                      "word": "body = swordfish\naction = reject",
                      "hdr": "header = ^Subject: .*Überweisung\naction = reject"})
        messages = [wire(m) for m in (with_attachment("a.exe"), base_message(body="fine\n", cte="base64"),
                                      base_message(body=SECRET + "\n", cte="quoted-printable"),
                                      nested(), base_message("Eine Überweisung"), with_attachment("b.pdf"))]
        expected = [b"550", b"250", b"550", b"250", b"550", b"250"]
        whole = yield deferToThread(self.data_session, messages, lambda p: [p])
        self.assertEqual(whole, expected)
        bytewise = yield deferToThread(self.data_session, messages, lambda p: [p[i : i + 1] for i in range(len(p))])
        self.assertEqual(bytewise, expected)
        for seed in range(3):
            rng = random.Random(seed)

            def pieces(p, rng=rng):
                cuts = sorted(rng.sample(range(1, len(p)), min(len(p) - 1, rng.randrange(1, 40))))
                return [p[a:b] for a, b in zip([0] + cuts, cuts + [len(p)])]

            codes = yield deferToThread(self.data_session, messages, pieces)
            self.assertEqual(codes, expected, seed)
        self.assertEqual(len(self.backend.messages), 3 * 5)


class AsaDefaultMapTests(ContentRulesTestCase):
    """etc/asa-esmtp.ini, the ASA's _default_esmtp_map, through the gateway."""

    def asa(self):
        """Start the gateway under the shipped file's rule."""
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "asa-esmtp.ini")
        with open(path, encoding="utf-8") as f:
            rule = parse_policy(f.read(), path=path).rules[0]
        self.backend = RecordingBackend()
        bport = listenBackend(self, self.backend)
        self.tracker, self.port = start_gateway(self, rule, bport, GlobalSettings(spool_directory=self.spool))
        return rule

    def test_shipped_file(self):
        """The file parses into the seven matches in the ASA's order, with the built-in limits raised."""
        from mailguard.matching import matches_of

        rule = self.asa()
        self.assertEqual([(m.name, m.action) for m in matches_of(rule)], [
            ("asa-cmd-line-length", "drop-connection"), ("asa-rcpt-count", "drop-connection"),
            ("asa-body-line-length", "log"), ("asa-header-line-length", "drop-connection"),
            ("asa-sender-length", "drop-connection"), ("asa-mime-filename-length", "drop-connection"),
            ("asa-ehlo-others", "mask")])
        self.assertEqual((rule.mask_banner, rule.tls, rule.max_command_line, rule.max_recipients),
                         ("on", "strip", 2048, 1000))

    @defer.inlineCallbacks
    def test_recipients(self):
        """100 recipients are delivered; the 101st gets 421 4.7.1 and never reaches the server."""
        self.asa()
        rcpts = ["r%d@example.net" % i for i in range(101)]
        results = yield self.send([base_message()], rcpts=rcpts[:100])
        self.assertEqual(results, [{}])
        results = yield self.send([base_message()], rcpts=rcpts)
        self.assertEqual(results, [("rcpts", {"r100@example.net": (421, b"4.7.1 Connection closed by policy")})])
        self.assertNotIn(b"r100@", self.received())
        self.assertEqual(len(self.backend.messages), 1)

    @defer.inlineCallbacks
    def test_lines_and_names(self):
        """A 999-octet body line is only logged; a 999-octet header line or a 256-octet file name drops the session."""
        self.asa()
        long_body = b"Subject: a\r\n\r\n" + b"b" * 999 + b"\r\n"
        results = yield self.send([long_body])
        self.assertEqual(results, [{}])
        for bad in (b"X-Long: " + b"h" * 991 + b"\r\n" + wire(base_message()), with_attachment("f" * 252 + ".exe")):
            results = yield self.send([bad, base_message()])
            self.assertEqual(results, [(421, b"4.7.1 Connection closed by policy"), "closed"])
        self.assertEqual(len(self.backend.messages), 1)
        logged = [m for m in self.matches_logged() if m[0] != "asa-ehlo-others"]
        self.assertEqual(logged, [("asa-body-line-length", "log"),
                                                 ("asa-header-line-length", "drop-connection"),
                                                 ("asa-mime-filename-length", "drop-connection")])

    @defer.inlineCallbacks
    def test_dialogue(self):
        """The banner is masked, keywords outside the ASA set are masked, a 513-octet command drops the session."""
        self.asa()

        def talk():
            c = smtplib.SMTP(timeout=10)
            banner = c.connect("127.0.0.1", self.port)
            c.ehlo()
            features = dict(c.esmtp_features)
            code = c.docmd("NOOP", "n" * 506)  # 5 + 506 + CRLF = 513
            c.close()
            return banner, features, code

        banner, features, code = yield deferToThread(talk)
        self.assertEqual(banner[0], 220)
        self.assertEqual(set(banner[1]), {ord("*")})
        self.assertEqual(sorted(features), ["8bitmime", "dsn", "enhancedstatuscodes", "pipelining", "size"])
        self.assertEqual(code, (421, b"4.7.1 Connection closed by policy"))


class PolicyMapTests(ContentRulesTestCase):
    """Hits per match: Prometheus mailguard_matches_total and `mailguard show policy-map`, from a live gateway."""

    @defer.inlineCallbacks
    def test_metrics_and_show_policy_map(self):
        """Two rejected messages and one logged command show as hits in /metrics and in show policy-map."""
        import subprocess
        import sys
        import urllib.request

        from twisted.internet import reactor

        from mailguard.status import status_site

        self.gateway({"pm-exe": "mime-filename = \\.exe$\naction = reject", "pm-noop": "cmd-verb = NOOP"})
        status = reactor.listenTCP(0, status_site(self.tracker, reactor), interface="127.0.0.1")
        self.addCleanup(status.stopListening)
        sport = status.getHost().port
        results = yield self.send([with_attachment("a.exe"), with_attachment("b.exe"), base_message()])
        self.assertEqual(results, [REJECTED, REJECTED, {}])

        def talk():
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as c:
                return c.noop()[0]

        self.assertEqual((yield deferToThread(talk)), 250)

        def get():
            with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % sport, timeout=10) as response:
                return response.read().decode()

        metrics = yield deferToThread(get)
        self.assertIn('mailguard_matches_total{action="reject",match="pm-exe"} 2.0', metrics)
        self.assertIn('mailguard_matches_total{action="log",match="pm-noop"} 1.0', metrics)

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("[global]\nstatus = tcp:%d:interface=127.0.0.1\n[inspect R]\nprotocol = esmtp\nmatch = pm-exe, pm-noop\n"
                    "[match pm-exe]\nmime-filename = \\.exe$\naction = reject\n[match pm-noop]\ncmd-verb = NOOP\n"
                    "[listener L]\nlisten = tcp:0\nbackend = tcp:host=127.0.0.1:port=25\ninspect = R\n" % sport)

        def show():
            return subprocess.run([sys.executable, "-m", "mailguard.cli", "show", "policy-map", "-c", path],
                                  cwd=root, capture_output=True, text=True, timeout=30)

        result = yield deferToThread(show)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertEqual(result.stdout.splitlines(), [
            " Policy-map: R (esmtp)",
            "  Match: pm-exe", "   mime-filename \\.exe$", "   Action: reject, hits 2",
            "  Match: pm-noop", "   cmd-verb NOOP", "   Action: log, hits 1",
        ])
