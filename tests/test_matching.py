"""Tests for content rules: [match NAME] parsing, the dialogue criteria, and the content-rules message filter."""

from email.message import EmailMessage

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailguard import matching
from mailguard.filters import SessionFacts
from mailguard.interfaces import IMessageFilter, IMessageFilterFactory
from mailguard.matching import CONTENT_RULES, ContentRulesFactory, RateLimiter, dialogue_of, matches_of
from mailguard.message import BodyChunk, EndOfHeaders, HeaderField, MessageSplitter
from mailguard.policy import PolicyError, parse_policy
from zope.interface.verify import verifyObject

PATH = "etc/policy.ini"


def policy(matches, uses=None, protocol="esmtp"):
    """A policy with the given [match] sections (a dict of name -> body), used by one rule."""
    uses = list(matches) if uses is None else uses
    text = "[inspect R]\nprotocol = %s\n" % protocol
    if uses:
        text += "match = %s\n" % ", ".join(uses)
    for name, body in matches.items():
        text += "[match %s]\n%s\n" % (name, body)
    text += "[listener L]\nlisten = tcp:0\nbackend = tcp:host=127.0.0.1:port=25\ninspect = R\n"
    return parse_policy(text, path=PATH)


def one(body):
    """The Match parsed from one section body."""
    return matches_of(policy({"m": body}).rules[0])[0]


class ParseTests(SynchronousTestCase):
    """[match NAME] sections become frozen Match values; mistakes are one-line errors."""

    def assertError(self, matches, expected, uses=None, protocol="esmtp"):
        """Parsing fails with exactly ``expected``."""
        with self.assertRaises(PolicyError) as cm:
            policy(matches, uses, protocol)
        self.assertEqual(str(cm.exception), expected)
        self.assertNotIn("\n", str(cm.exception))

    def test_issue_example(self):
        """The issue's example: three matches in order, each with its stage and action."""
        rule = policy({
            "long-command": "cmd-line-length-gt = 512\naction = drop-connection",
            "exe-attachment": "mime-filename = (?i)\\.(exe|scr|js|vbs|bat|cmd)$\naction = reject",
            "ceo-fraud": "sender-address = (?i)@example\\.com$\nheader = (?i)^Reply-To:.*@freemail\\.example\\b\n"
                         "action = drop-connection",
        }).rules[0]
        self.assertEqual(len(rule.matches), 1)
        config = rule.matches[0]
        self.assertIs(config.factory, CONTENT_RULES)
        self.assertTrue(IMessageFilterFactory.providedBy(config.factory))
        got = [(m.name, m.stage, m.action) for m in matches_of(rule)]
        self.assertEqual(got, [("long-command", "command", "drop-connection"),
                               ("exe-attachment", "message", "reject"),
                               ("ceo-fraud", "message", "drop-connection")])
        self.assertEqual(dialogue_of(rule).commands, matches_of(rule)[:1])

    def test_every_key(self):
        """Every criterion key parses, and lands on its stage."""
        cases = {
            "sender-address = x": "mail", "sender-address-length-gt = 320": "mail",
            "recipient-address = x": "rcpt", "recipient-count-gt = 100": "rcpt",
            "invalid-recipients-count-gt = 3": "rcpt", "cmd-verb = vrfy EXPN": "command",
            "cmd-line-length-gt = 512": "command", "ehlo-reply-parameter = others": "ehlo",
            "reply = ^5": "reply", "header = x": "message", "header-length-gt = 1": "message",
            "header-line-length-gt = 998": "message", "header-to-fields-count-gt = 1": "message",
            "body = x": "message", "body-length-gt = 1": "message", "body-line-length-gt = 998": "message",
            "mime-content-type = x": "message", "mime-encoding = base64 others": "message",
            "mime-filename = x": "message", "mime-filename-length-gt = 255": "message",
        }
        self.assertEqual({k.split(" =")[0] for k in cases}, set(matching.STAGES))
        for body, stage in cases.items():
            self.assertEqual(one(body).stage, stage, body)
        self.assertEqual(one("cmd-verb = vrfy EXPN").criteria[0].value, frozenset({"VRFY", "EXPN"}))
        self.assertEqual(one("mime-encoding = Base64 others").criteria[0].value, frozenset({"base64", "others"}))

    def test_actions(self):
        """Every action parses; rate-limit carries its number; negate inverts."""
        for action in ("log", "reject", "drop-connection", "reset"):
            self.assertEqual(one("body = x\naction = %s" % action).action, action)
        m = one("body = x\naction = rate-limit 10\nnegate = on")
        self.assertEqual((m.action, m.rate, m.negate), ("rate-limit", 10, True))
        self.assertEqual(one("cmd-verb = VRFY\naction = mask").action, "mask")
        self.assertEqual(one("ehlo-reply-parameter = others\naction = mask").action, "mask")
        self.assertEqual(one("body = x").action, "log")

    def test_mixed_envelope_and_message(self):
        """A section mixing envelope and message criteria is decided at the end of the message."""
        self.assertEqual(one("sender-address = x\nbody = y").stage, "message")
        self.assertEqual(one("sender-address = x\nrecipient-address = y").stage, "rcpt")

    def test_re2_refuses(self):
        """A lookaround or backreference is a one-line error saying RE2 refuses it and why."""
        self.assertError({"m": "body = (?<=a)b"},
                         "etc/policy.ini: [match m] body: bad value '(?<=a)b': not an RE2 regular expression "
                         "(invalid perl operator: (?<=; RE2 has no lookaround or backreference)")
        self.assertError({"m": "header = (a)\\1"},
                         "etc/policy.ini: [match m] header: bad value '(a)\\\\1': not an RE2 regular expression "
                         "(invalid escape sequence: \\1; RE2 has no lookaround or backreference)")
        self.assertError({"m": "mime-filename = ("},
                         "etc/policy.ini: [match m] mime-filename: bad value '(': not an RE2 regular expression "
                         "(missing ): ()")

    def test_action_does_not_fit(self):
        """mask on a body rule, reject on a reply, rate-limit on a command: one-line errors on action."""
        self.assertError({"m": "body = x\naction = mask"},
                         "etc/policy.ini: [match m] action: bad value 'mask': "
                         "mask only fits cmd-verb and ehlo-reply-parameter")
        self.assertError({"m": "cmd-line-length-gt = 5\naction = mask"},
                         "etc/policy.ini: [match m] action: bad value 'mask': "
                         "mask only fits cmd-verb and ehlo-reply-parameter")
        self.assertError({"m": "reply = x\naction = reject"},
                         "etc/policy.ini: [match m] action: bad value 'reject': reject does not fit reply "
                         "(expected one of log, drop-connection, reset)")
        self.assertError({"m": "cmd-verb = VRFY\naction = rate-limit 3"},
                         "etc/policy.ini: [match m] action: bad value 'rate-limit 3': rate-limit does not fit "
                         "cmd-verb (expected one of log, reject, drop-connection, reset, mask)")

    def test_bad_values(self):
        """Unknown keys, bad actions, numbers, lists and empty sections are one-line errors."""
        self.assertError({"m": "bodyy = x"}, "etc/policy.ini: [match m] bodyy: unknown key")
        self.assertError({"m": "body = x\naction = explode"},
                         "etc/policy.ini: [match m] action: bad value 'explode': "
                         "expected one of log, reject, drop-connection, reset, mask, rate-limit N")
        self.assertError({"m": "body = x\naction = rate-limit"},
                         "etc/policy.ini: [match m] action: bad value 'rate-limit': "
                         "expected rate-limit N (matching messages per minute per client host, N >= 1)")
        self.assertError({"m": "body-length-gt = -1"},
                         "etc/policy.ini: [match m] body-length-gt: bad value '-1': expected a whole number >= 0")
        self.assertError({"m": "mime-encoding = uuencode"},
                         "etc/policy.ini: [match m] mime-encoding: bad value 'uuencode': expected transfer "
                         "encodings out of 7bit 8bit binary base64 quoted-printable others ('uuencode' is not one)")
        self.assertError({"m": "cmd-verb = MA1L"},
                         "etc/policy.ini: [match m] cmd-verb: bad value 'MA1L': "
                         "expected SMTP verbs of letters ('MA1L' is not one)")
        self.assertError({"m": "action = log"},
                         "etc/policy.ini: [match m]: no criterion (expected at least one of "
                         + ", ".join(matching.STAGES) + ")")
        self.assertError({"m": "cmd-verb = VRFY\nbody = x"},
                         "etc/policy.ini: [match m] body: cannot be combined with cmd-verb "
                         "(a dialogue criterion is decided on its own command or reply)")

    def test_references(self):
        """The rule key match names existing sections, once each, in SMTP modes only."""
        self.assertError({"m": "body = x"}, "etc/policy.ini: [inspect R] match: no [match n] section", uses=["n"])
        self.assertError({"m": "body = x"}, "etc/policy.ini: [inspect R] match: 'm' is listed twice",
                         uses=["m", "m"])
        self.assertError({"m": "body = x"},
                         "etc/policy.ini: [inspect R] match: content rules need protocol = smtp, esmtp or "
                         "mailguard (not tcp)", protocol="tcp")
        self.assertEqual(policy({"m": "body = x"}, uses=[]).rules[0].matches, ())

    def test_body_regex_blocks(self):
        """A body regex finds a line inside a block of lines; \\A and \\z patterns skip the block search."""
        anchored = one("body = ^secret$").criteria[0].value
        self.assertIsNotNone(anchored.block)
        self.assertTrue(anchored.search_lines("a\nsecret\nb"))
        self.assertFalse(anchored.search_lines("a\nsecret b\nc"))
        spanning = one("body = a\\sb").criteria[0].value
        self.assertFalse(spanning.search_lines("xa\nbx"))  # a body regex never spans lines
        for pattern in ("\\Asecret", "secret\\z", "(?-m)^secret$"):
            value = one("body = " + pattern).criteria[0].value
            self.assertIsNone(value.block, pattern)
            self.assertTrue(value.search_lines("a\nsecret\nb"), pattern)

    def test_frozen(self):
        """Match values are frozen."""
        m = one("body = x")
        with self.assertRaises(AttributeError):
            m.action = "reject"


class CheckTests(SynchronousTestCase):
    """mailguard check warns of a match no rule uses, and still exits 0."""

    def test_unused_match_warning(self):
        """An unused [match] is a warning on stderr with exit 0; a bad one is an error with exit 1."""
        import io
        from contextlib import redirect_stderr, redirect_stdout

        from mailguard.cli import main

        path = self.mktemp()
        body = ("[inspect R]\nprotocol = esmtp\nmatch = a\n[match a]\nbody = x\n[match spare]\nbody = y\n"
                "[listener L]\nlisten = tcp:0\nbackend = tcp:host=127.0.0.1:port=25\ninspect = R\n")
        with open(path, "w") as f:
            f.write(body)
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(["check", "-c", path])
        self.assertEqual(code, 0)
        self.assertEqual(err.getvalue(), "%s: [match spare]: warning: no rule uses this match\n" % path)
        with open(path, "w") as f:
            f.write(body.replace("body = y", "body = (?=y)"))
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(["check", "-c", path])
        self.assertEqual(code, 1)
        self.assertEqual(len(err.getvalue().splitlines()), 1)
        self.assertIn("[match spare] body", err.getvalue())


    def test_unused_match_warning_at_startup(self):
        """twistd mailguard's service maker prints the same warning for an unused match, and starts."""
        import io
        from contextlib import redirect_stderr

        from mailguard.service import makeService

        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[inspect R]\nprotocol = esmtp\n[match spare]\nbody = y\n"
                    "[listener L]\nlisten = tcp:0\nbackend = tcp:host=127.0.0.1:port=25\ninspect = R\n")
        err = io.StringIO()
        with redirect_stderr(err):
            service = makeService({"config": path})
        self.assertIsNotNone(service)
        self.assertEqual(err.getvalue(), "%s: [match spare]: warning: no rule uses this match\n" % path)


class DialogueTests(SynchronousTestCase):
    """The dialogue criteria: a pure object answering per command, reply and EHLO keyword."""

    def dialogue(self, matches):
        """The Dialogue of a rule using the given matches in order."""
        return dialogue_of(policy(matches).rules[0])

    def test_command(self):
        """cmd-verb and cmd-line-length-gt (CRLF counted) fire on the command that makes them true."""
        d = self.dialogue({"v": "cmd-verb = VRFY EXPN\naction = reject",
                           "len": "cmd-line-length-gt = 20\naction = drop-connection"})
        self.assertIsNone(d.on_command(b"MAIL", b"MAIL FROM:<a@b>"))
        hit = d.on_command(b"VRFY", b"VRFY root")
        self.assertEqual((hit.action, hit.match.name), ("reject", "v"))
        self.assertIsNone(d.on_command(b"NOOP", b"N" * 18))  # 18 + CRLF = 20: not greater
        self.assertEqual(d.on_command(b"NOOP", b"N" * 19).action, "drop-connection")
        both = d.on_command(b"VRFY", b"VRFY " + b"x" * 30)
        self.assertEqual([m.name for m in both.fired], ["v", "len"])
        self.assertEqual(both.action, "reject")

    def test_log_then_action(self):
        """The first action other than log, in match order, decides; every fired match is listed."""
        d = self.dialogue({"a": "cmd-verb = VRFY", "b": "cmd-verb = VRFY\naction = mask"})
        hit = d.on_command(b"VRFY", b"VRFY x")
        self.assertEqual(([m.name for m in hit.fired], hit.action, hit.match.name), (["a", "b"], "mask", "b"))
        only_log = self.dialogue({"a": "cmd-verb = VRFY"}).on_command(b"VRFY", b"VRFY x")
        self.assertEqual(only_log.action, "log")

    def test_negate(self):
        """negate = on fires when the criteria do not hold."""
        d = self.dialogue({"n": "cmd-verb = HELO EHLO MAIL RCPT DATA QUIT RSET\nnegate = on\naction = mask"})
        self.assertIsNone(d.on_command(b"MAIL", b"MAIL FROM:<>"))
        self.assertEqual(d.on_command(b"VRFY", b"VRFY x").action, "mask")

    def test_reply(self):
        """reply matches a server reply's text (any line), not its code."""
        d = self.dialogue({"r": "reply = (?i)backdoor\naction = drop-connection"})
        self.assertIsNone(d.on_reply(250, [b"OK"]))
        self.assertEqual(d.on_reply(250, [b"mx.example", b"X-BACKDOOR"]).action, "drop-connection")
        self.assertIsNone(self.dialogue({"r": "reply = ^250"}).on_reply(250, [b"OK"]))

    def test_ehlo_keywords(self):
        """ehlo-reply-parameter names keywords; others is every keyword outside the ASA's named set."""
        d = self.dialogue({"o": "ehlo-reply-parameter = others\naction = mask"})
        for keyword in matching.ASA_EHLO_KEYWORDS:
            self.assertIsNone(d.on_ehlo_keyword(keyword.encode()), keyword)
        self.assertEqual(d.on_ehlo_keyword(b"X-LINK2STATE").action, "mask")
        self.assertEqual(d.on_ehlo_keyword(b"chunking").action, "mask")
        named = self.dialogue({"p": "ehlo-reply-parameter = PIPELINING\naction = mask"})
        self.assertEqual(named.on_ehlo_keyword(b"PIPELINING").action, "mask")
        self.assertIsNone(named.on_ehlo_keyword(b"SIZE"))

    def test_inactive(self):
        """A rule whose matches are all envelope or message criteria has no dialogue to ask."""
        self.assertIsNone(dialogue_of(policy({"b": "body = x"}).rules[0]))

    def test_hits_counted(self):
        """Each firing counts once per (match, action) in this process."""
        d = self.dialogue({"count-me": "cmd-verb = HELP\naction = reject"})
        before = matching.HITS[("count-me", "reject")]
        d.on_command(b"HELP", b"HELP")
        d.on_command(b"HELP", b"HELP")
        self.assertEqual(matching.HITS[("count-me", "reject")], before + 2)


def wire(message):
    """A message with CRLF line ends."""
    return message.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def exe_message(filename="invoice.exe", body="Hello,\nplease pay.\n"):
    """A message with a text body and one attachment."""
    m = EmailMessage()
    m["From"] = "boss@example.com"
    m["To"] = "clerk@example.net"
    m["Reply-To"] = "boss@freemail.example"
    m["Subject"] = "Urgent"
    m.set_content(body, cte="quoted-printable")
    m.add_attachment(b"MZ" * 100, maintype="application", subtype="octet-stream", filename=filename)
    return wire(m)


class Recorder:
    """Collects alerts instead of logging them."""

    def __init__(self):
        self.alerts = []

    def __call__(self, text, **fields):
        self.alerts.append((text, fields))


class FilterTests(SynchronousTestCase):
    """The content-rules filter, driven the way the gateway's filter driver calls it."""

    def build(self, matches, now=None):
        """The rule's content-rules filter for one session from 192.0.2.7, with recorded alerts."""
        config = policy(matches).rules[0].matches[0]
        self.alerts = Recorder()
        factory = ContentRulesFactory(alert=self.alerts, limiter=RateLimiter(now=now or (lambda: 0.0)))
        f = factory.buildFilter(config, SessionFacts(client=("192.0.2.7", 4000)))
        verifyObject(IMessageFilter, f)
        verifyObject(IMessageFilterFactory, factory)
        return f

    def message(self, f, data, sender=b"<boss@example.com>", rcpts=(b"<clerk@example.net>",)):
        """Run one transaction through the filter as the driver does; return the last verdict."""
        v = f.envelopeFrom(SessionFacts(client=("192.0.2.7", 4000)), sender, b"")
        if v.final:
            return v
        for r in rcpts:
            v = f.envelopeRecipient(r, b"")
            if v.final:
                return v
            f.serverReply(b"RCPT", 250, b"OK")
        splitter = MessageSplitter()
        for event in splitter.feed(data) + splitter.close():
            if isinstance(event, HeaderField):
                f.header(event.name, event.value)
            elif isinstance(event, EndOfHeaders):
                f.endOfHeaders()
            elif isinstance(event, BodyChunk):
                f.body(event.data)
        return f.endOfMessage()

    def test_message_reject(self):
        """mime-filename fires on the attachment's name at the end of the message: 550 and an alert."""
        f = self.build({"exe": "mime-filename = (?i)\\.exe$\naction = reject"})
        v = self.message(f, exe_message())
        self.assertEqual((v.action, v.reply), ("reject", b"550 5.7.1 Message rejected by policy\r\n"))
        text, fields = self.alerts.alerts[0]
        self.assertEqual(fields, {"match": "exe", "action": "reject", "client": "192.0.2.7",
                                  "criterion": "mime-filename (?i)\\.exe$"})
        self.assertIn("SMTP_POLICY_MATCH", text)
        self.assertNotIn("please pay", text)
        v = self.message(f, exe_message("invoice.pdf"))
        self.assertEqual(v.action, "accept")

    def test_every_message_criterion(self):
        """Each message criterion fires on a message that has it and not on one that does not."""
        yes, no = exe_message(body="wire the money\n"), wire(EmailMessage())
        cases = [
            "header = (?i)^Reply-To:.*@freemail\\.example\\b", "header-length-gt = 50",
            "header-line-length-gt = 30", "header-to-fields-count-gt = 0", "body = (?i)wire the money",
            "body-length-gt = 100", "body-line-length-gt = 40", "mime-content-type = ^application/",
            "mime-encoding = base64", "mime-filename = invoice", "mime-filename-length-gt = 5",
        ]
        for case in cases:
            f = self.build({"m": case + "\naction = reject"})
            self.assertEqual(self.message(f, yes).action, "reject", case)
            self.assertEqual(self.message(f, no).action, "accept", case)

    def test_mime_encoding_others(self):
        """mime-encoding others matches a transfer encoding outside the named five."""
        f = self.build({"m": "mime-encoding = others\naction = reject"})
        data = b"Content-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 a\r\n"
        self.assertEqual(self.message(f, data).action, "reject")
        self.assertEqual(self.message(f, b"Subject: x\r\n\r\nbody\r\n").action, "accept")

    def test_sender(self):
        """sender-address and its length act on MAIL, with the sender reply."""
        f = self.build({"s": "sender-address = (?i)@spam\\.example$\naction = reject",
                        "l": "sender-address-length-gt = 20\naction = drop-connection"})
        v = f.envelopeFrom(None, b"<x@SPAM.example>", b"")
        self.assertEqual((v.action, v.reply), ("reject", b"550 5.7.1 Sender rejected by policy\r\n"))
        v = f.envelopeFrom(None, b"<" + b"a" * 21 + b">", b"")
        self.assertEqual((v.action, v.reply), ("drop", b"421 4.7.1 Connection closed by policy\r\n"))
        self.assertEqual(f.envelopeFrom(None, b"<ok@example.org>", b"").action, "continue")

    def test_recipients(self):
        """recipient-address on that RCPT; recipient-count-gt N on the (N+1)th; invalid-recipients after refusals."""
        f = self.build({"a": "recipient-address = ^postmaster@\naction = reject",
                        "c": "recipient-count-gt = 2\naction = reject",
                        "i": "invalid-recipients-count-gt = 1\naction = drop-connection"})
        f.envelopeFrom(None, b"<s@example.org>", b"")
        v = f.envelopeRecipient(b"<postmaster@example.org>", b"")
        self.assertEqual((v.action, v.reply), ("reject", b"550 5.7.1 Recipient rejected by policy\r\n"))
        self.assertEqual(f.envelopeRecipient(b"<r1@example.org>", b"").action, "continue")
        f.serverReply(b"RCPT", 550, b"no such user")
        self.assertEqual(f.envelopeRecipient(b"<r2@example.org>", b"").action, "continue")
        f.serverReply(b"RCPT", 550, b"no such user")
        self.assertEqual(f.envelopeRecipient(b"<r3@example.org>", b"").action, "reject")  # the 3rd forwarded
        f.abort()
        f.envelopeFrom(None, b"<s@example.org>", b"")
        v = f.envelopeRecipient(b"<r4@example.org>", b"")  # 2 refusals so far > 1
        self.assertEqual(v.action, "drop")

    def test_negated_envelope(self):
        """negate on a recipient-address match fires on every recipient outside the pattern."""
        f = self.build({"local": "recipient-address = @example\\.net$\nnegate = on\naction = reject"})
        f.envelopeFrom(None, b"<s@example.org>", b"")
        self.assertEqual(f.envelopeRecipient(b"<a@example.net>", b"").action, "continue")
        self.assertEqual(f.envelopeRecipient(b"<a@elsewhere.org>", b"").action, "reject")

    def test_mixed_decided_at_end(self):
        """Sender and header criteria together fire only at the end of the message, when both held."""
        f = self.build({"ceo": "sender-address = (?i)@example\\.com$\nheader = (?i)^Reply-To:.*@freemail\\.example\\b\n"
                               "action = drop-connection"})
        self.assertEqual(self.message(f, exe_message()).action, "drop")
        self.assertEqual(self.message(f, exe_message(), sender=b"<boss@example.org>").action, "accept")

    def test_rate_limit(self):
        """rate-limit N: N matching messages per minute per client host pass, the next get 450."""
        clock = [0.0]
        f = self.build({"r": "body = .\naction = rate-limit 2"}, now=lambda: clock[0])
        msg = b"Subject: x\r\n\r\nhello\r\n"
        self.assertEqual([self.message(f, msg).action for _ in range(3)], ["accept", "accept", "tempfail"])
        self.assertEqual(self.message(f, msg).reply, b"450 4.7.1 Rate limit exceeded\r\n")
        clock[0] = 61.0
        self.assertEqual(self.message(f, msg).action, "accept")
        self.assertEqual(self.message(f, b"Subject: x\r\n\r\n").action, "accept")  # no text line: no match

    def test_log_only(self):
        """A log match alerts and accepts."""
        f = self.build({"l": "header-to-fields-count-gt = 0"})
        self.assertEqual(self.message(f, exe_message()).action, "accept")
        self.assertEqual(len(self.alerts.alerts), 1)

    def test_header_regex_within_one_field(self):
        """A header regex matches within one field, never across two, even when fields are searched together."""
        data = b"Subject: hello\r\nTo: =?utf-8?q?a=0Ab?=\r\nFrom: x@example.org\r\n\r\nbody\r\n"
        for pattern, action in [("(?s)Subject:.*From:", "accept"), ("(?i)^subject: hello$", "reject"),
                                ("^To: a$", "accept"), ("(?s)^To: a.b$", "reject"), ("^From: x@", "reject")]:
            f = self.build({"h": "header = %s\naction = reject" % pattern})
            self.assertEqual(self.message(f, data).action, action, pattern)

    def test_header_regex_many_fields(self):
        """A field past the characters held for one search is still searched, whatever its place."""
        from mailguard.matching import HELD_FIELDS

        fields = [b"X-%d: %s\r\n" % (i, b"y" * 900) for i in range(2 * HELD_FIELDS // 900)]
        filler = b"".join(fields)
        for place in (b"", b"".join(fields[: len(fields) // 2]), filler):
            data = place + b"Subject: lottery\r\n" + filler + b"\r\nbody\r\n"
            f = self.build({"h": "header = ^Subject: lottery$\naction = reject"})
            self.assertEqual(self.message(f, data).action, "reject")

    def test_header_fields_held_bounded(self):
        """Fields wait to be searched together only up to HELD_FIELDS characters, however long the header block."""
        from mailguard.matching import HELD_FIELDS

        f = self.build({"h": "header = ^Subject: lottery$\naction = reject"})
        f.envelopeFrom(None, b"<a@b>", b"")
        for i in range(300):
            f.messageData(b"X-%d: %s\r\n" % (i, b"y" * 900))
            self.assertLessEqual(sum(map(len, f._state._fields)), HELD_FIELDS + 1000)
        f.messageData(b"Subject: lottery\r\n\r\nbody\r\n")
        self.assertEqual(f.endOfMessage().action, "reject")

    def test_pieces_same_verdict(self):
        """The same message fed whole or byte by byte through body() gets the same verdict."""
        f = self.build({"b": "body = (?i)pay\\.$\naction = reject"})
        data = exe_message()
        head, _, body = data.partition(b"\r\n\r\n")
        for pieces in ([body], [body[i : i + 1] for i in range(len(body))]):
            f.envelopeFrom(None, b"<a@b>", b"")
            for line in head.split(b"\r\n"):
                if line[:1] not in (b" ", b"\t"):
                    name, _, value = line.partition(b":")
                    f.header(name, value)
            f.endOfHeaders()
            for p in pieces:
                f.body(p)
            self.assertEqual(f.endOfMessage().action, "reject")


class InspectorTests(SynchronousTestCase):
    """The dialogue criteria carried out by the SMTP core (SMTPInspector, driven directly)."""

    def inspector(self, matches, **rule_keys):
        """An esmtp inspector under a rule with the given matches, greeted and past EHLO."""
        from mailguard.commands import MODES
        from mailguard.smtp import DialogueSMTPInspector, build

        rule = policy(matches).rules[0]
        for key, value in rule_keys.items():
            rule = __import__("dataclasses").replace(rule, **{key: value})
        self.i = build(rule, MODES["esmtp"])
        # Dialogue criteria only: applied by the core, nothing held or spooled.
        self.assertIsInstance(self.i, DialogueSMTPInspector)
        self.events = []
        self.events += self.i.server_connected()
        self.events += self.i.server_data(b"220 mx.example ESMTP\r\n")
        self.events += self.i.client_data(b"EHLO me\r\n")
        self.events += self.i.server_data(b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n"
                                          b"250-X-LINK2STATE\r\n250-CHUNKING\r\n250 8BITMIME\r\n")
        return self.i

    def take(self, events):
        """What each side got, the alerts' match names, and whether the session closed or was reset."""
        from mailguard.events import Alert, Close, ToClient, ToServer

        got = {"server": b"", "client": b"", "matches": [], "end": None}
        for e in events:
            if isinstance(e, ToServer):
                got["server"] += e.data
            elif isinstance(e, ToClient):
                got["client"] += e.data
            elif isinstance(e, Alert) and e.tag == "SMTP_POLICY_MATCH":
                got["matches"].append(e.fields["match"])
            elif isinstance(e, Close):
                got["end"] = "reset" if e.reset else "close"
        return got

    def test_reject_command(self):
        """cmd-verb reject: the gateway answers 550 5.7.1, the server never sees the command."""
        i = self.inspector({"v": "cmd-verb = ETRN\naction = reject"}, ehlo_keywords=frozenset({"ETRN", "PIPELINING"}))
        got = self.take(i.client_data(b"NOOP\r\n"))
        self.assertEqual((got["server"], got["matches"]), (b"NOOP\r\n", []))
        i.server_data(b"250 ok\r\n")
        got = self.take(i.client_data(b"ETRN example.org\r\n"))
        self.assertEqual(got["server"], b"")
        self.assertEqual(got["client"], b"550 5.7.1 Command rejected by policy\r\n")
        self.assertEqual(got["matches"], ["v"])

    def test_mask_command(self):
        """cmd-verb mask: the line reaches the server as x's, as an illegal command does."""
        i = self.inspector({"v": "cmd-verb = NOOP\naction = mask"})
        got = self.take(i.client_data(b"NOOP hi\r\n"))
        self.assertEqual(got["server"], b"xxxxxxx\r\n")
        self.assertEqual(self.take(i.server_data(b"500 5.5.2 unknown\r\n"))["client"], b"500 5.5.2 unknown\r\n")

    def test_drop_and_reset(self):
        """cmd-line-length-gt drop-connection: 421 4.7.1 and close; reset: a Reset event and no reply."""
        i = self.inspector({"l": "cmd-line-length-gt = 20\naction = drop-connection"})
        got = self.take(i.client_data(b"MAIL FROM:<aaaaaaaaaaaa@example.org>\r\n"))
        self.assertEqual((got["server"], got["client"], got["end"]),
                         (b"", b"421 4.7.1 Connection closed by policy\r\n", "close"))
        i = self.inspector({"l": "cmd-verb = RSET\naction = reset"})
        got = self.take(i.client_data(b"RSET\r\n"))
        self.assertEqual((got["server"], got["client"], got["end"]), (b"", b"", "reset"))

    def test_builtin_limit_first(self):
        """max-command-line acts before any match: an over-long line gets 500, not the match."""
        i = self.inspector({"l": "cmd-line-length-gt = 20\naction = drop-connection"})
        got = self.take(i.client_data(b"NOOP " + b"x" * 600 + b"\r\n"))
        self.assertEqual((got["client"], got["matches"]), (b"500 5.5.2 Line too long\r\n", []))

    def test_log_only(self):
        """A log match alerts and the command goes on."""
        i = self.inspector({"v": "cmd-verb = NOOP"})
        got = self.take(i.client_data(b"NOOP\r\n"))
        self.assertEqual((got["server"], got["matches"]), (b"NOOP\r\n", ["v"]))

    def test_reply_drop(self):
        """reply drop-connection: the matching reply is never relayed; the client gets 421 4.7.1."""
        i = self.inspector({"r": "reply = (?i)secret\naction = drop-connection"})
        i.client_data(b"NOOP\r\n")
        got = self.take(i.server_data(b"250 2.0.0 secret inside\r\n"))
        self.assertEqual((got["client"], got["end"]), (b"421 4.7.1 Connection closed by policy\r\n", "close"))
        i = self.inspector({"r": "reply = (?i)secret\naction = drop-connection"})
        i.client_data(b"NOOP\r\n")
        self.assertEqual(self.take(i.server_data(b"250 2.0.0 Ok\r\n"))["client"], b"250 2.0.0 Ok\r\n")

    def test_ehlo_mask(self):
        """ehlo-reply-parameter others mask: keywords outside the ASA set are removed from the EHLO reply."""
        i = self.inspector({"e": "ehlo-reply-parameter = others\naction = mask"},
                           ehlo_keywords=frozenset({"PIPELINING", "SIZE", "X-LINK2STATE", "CHUNKING", "8BITMIME"}))
        got = self.take(self.events)
        self.assertIn(b"250-PIPELINING\r\n", got["client"])
        self.assertIn(b"250 8BITMIME\r\n", got["client"])
        self.assertNotIn(b"X-LINK2STATE", got["client"])
        self.assertNotIn(b"CHUNKING", got["client"])
        self.assertEqual(sorted(got["matches"]), ["e", "e"])
        # CHUNKING was masked: BDAT is now illegal for the client.
        got = self.take(i.client_data(b"BDAT 1 LAST\r\n"))
        self.assertEqual(got["server"], b"xxxxxxxxxxx\r\n")


class VerdictSegmentationTests(SynchronousTestCase):
    """The content-rules filter's verdict does not depend on how the body is cut into pieces."""

    MATCHES = {"exe": "mime-filename = (?i)\\.exe$\naction = reject",
               "word": "body = swordfish\naction = drop-connection",
               "long": "body-line-length-gt = 80\naction = reset",
               "enc": "mime-encoding = quoted-printable"}

    def verdicts(self, messages, cuts):
        """The verdict of each message, its body fed in the pieces ``cuts`` makes."""
        config = policy(self.MATCHES).rules[0].matches[0]
        f = ContentRulesFactory(alert=Recorder()).buildFilter(config, SessionFacts(client=("192.0.2.9", 1)))
        out = []
        for data in messages:
            f.envelopeFrom(None, b"<a@b>", b"")
            splitter = MessageSplitter()
            events = splitter.feed(data) + splitter.close()
            body = b"".join(e.data for e in events if isinstance(e, BodyChunk))
            for e in events:
                if isinstance(e, HeaderField):
                    f.header(e.name, e.value)
            f.endOfHeaders()
            offsets = sorted({c % (len(body) + 1) for c in cuts})
            for a, b in zip([0] + offsets, offsets + [len(body)]):
                f.body(body[a:b])
            out.append(f.endOfMessage().action)
        return out

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.integers(0, 5000), max_size=20))
    def test_random_pieces(self, cuts):
        """Random cuts of each body give the verdicts of the whole bodies."""
        messages = [exe_message(), exe_message("a.pdf", body="the code is swordfish\n"),
                    b"Subject: long\r\n\r\n" + b"x" * 100 + b"\r\n", exe_message("a.pdf")]
        self.assertEqual(self.verdicts(messages, cuts), ["reject", "drop", "reset", "accept"])
