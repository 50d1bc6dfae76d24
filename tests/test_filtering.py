"""The message-filter seam end to end: real clients, the real gateway, filters, and the recording backend."""

import errno
import os
import smtplib
import stat
from email.message import EmailMessage

from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailguard import filters as F
from mailguard.commands import MODES
from mailguard.events import FilterEnvelope, MessageSpooled, PauseClient, ResumeClient, ToClient, ToServer, ToSpool
from mailguard.interfaces import IInlineMessageFilter, IMessageFilter, IMessageFilterFactory
from mailguard.policy import GlobalSettings, Rule
from mailguard.smtp import build
from tests.backends import AUTH_PASSWORD, AUTH_USER, AiosmtpdBackend, RecordingBackend, listenBackend
from tests.clients import bdat_session
from tests.harness import start_gateway


@implementer(IMessageFilter)
class ScriptedFilter:
    """A filter whose answers are plain functions of what it saw (the tests' own filter)."""

    def __init__(self, config, session):
        self.options = config.options
        self.session = session
        self.headers = []
        self.seen = config.options["log"]
        self.seen.append(("session", session))

    def envelopeFrom(self, session, sender, parameters):
        self.seen.append(("MAIL", sender))
        self.options["auth"].append(session.auth)
        return F.Verdict.CONTINUE

    def envelopeRecipient(self, recipient, parameters):
        self.seen.append(("RCPT", recipient))
        if recipient.startswith(b"refuse"):
            return F.reject(b"550 5.7.1 Recipient refused by test filter\r\n")
        return F.Verdict.CONTINUE

    def serverReply(self, command, code, text):
        self.seen.append(("reply", command, code))

    def header(self, name, value):
        self.headers.append((name, value))

    def endOfHeaders(self):
        return None

    def body(self, chunk):
        return None

    def endOfMessage(self):
        decide = self.options["decide"]
        headers, self.headers = self.headers, []
        return decide(headers)

    def abort(self):
        self.seen.append(("abort",))

    def close(self):
        self.seen.append(("close",))


@implementer(IMessageFilterFactory)
class ScriptedFactory:
    """Builds `ScriptedFilter` instances."""

    name = "scripted"
    options = {}

    def validateOption(self, key, value):
        """No keys of its own."""
        raise ValueError("no keys")

    def buildFilter(self, config, session):
        """One filter per session."""
        return ScriptedFilter(config, session)


@implementer(IInlineMessageFilter)
class InlineFilter(ScriptedFilter):
    """A scripted filter that reads the message as it is spooled; ``decide`` gets the whole message's octets."""

    def __init__(self, config, session):
        super().__init__(config, session)
        self.data = []

    def messageData(self, data):
        if self.options.get("raise"):
            raise RuntimeError("broken reader")
        self.data.append(data)

    def endOfMessage(self):
        data, self.data = b"".join(self.data), []
        self.seen.append(("inline", data))
        return self.options["decide"](data)


@implementer(IMessageFilterFactory)
class InlineFactory(ScriptedFactory):
    """Builds `InlineFilter` instances."""

    name = "inline"

    def buildFilter(self, config, session):
        """One filter per session."""
        return InlineFilter(config, session)


def subject_rejecter(word):
    """A decision rejecting messages whose Subject holds ``word``."""

    def decide(headers):
        for name, value in headers:
            if name.lower() == b"subject" and word in value:
                return F.reject(b"550 5.7.1 Subject refused\r\n", reason="subject")
        return F.Verdict.ACCEPT

    return decide


def later(seconds, verdict):
    """A decision answering ``verdict`` after ``seconds`` (a slow network scanner)."""

    def decide(headers):
        return task.deferLater(reactor, seconds, lambda: verdict)

    return decide


def never(headers):
    """A decision that never comes."""
    return defer.Deferred()


def message(subject, body="hello\r\n.dot line\r\n"):
    """An RFC 5322 message as bytes."""
    m = EmailMessage()
    m["From"] = "a@example.org"
    m["To"] = "b@example.org"
    m["Subject"] = subject
    m.set_content(body)
    return m.as_bytes(policy=m.policy.clone(linesep="\r\n"))


def open_spool_files(directory):
    """``(mode, size)`` of every file this process holds open in the spool ``directory`` (they have no name)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink("/proc/self/fd/" + fd).startswith(directory + "/"):
                st = os.stat("/proc/self/fd/" + fd)
                found.append((stat.S_IMODE(st.st_mode), st.st_size))
        except OSError:
            continue
    return found


def refused_then_delivered(port, bad, good):
    """One smtplib session: ``bad`` must be refused at its end of data, then ``good`` is sent; return bad's code."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        try:
            c.sendmail("a@example.org", ["b@example.org"], bad)
        except smtplib.SMTPDataError as e:
            code = e.smtp_code
        else:
            raise AssertionError("the message was not refused")
        c.sendmail("a@example.org", ["b@example.org"], good)
        return code


class FilterGatewayTests(TestCase):
    """Filters decide before the server sees anything; the session goes on."""

    timeout = 30

    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.log = []
        self.session_auth = []
        self.spool = os.path.abspath(self.mktemp())
        self.quarantine = os.path.abspath(self.mktemp())

    def gateway(self, decide, backend_port, timeout=5.0, default_action="tempfail"):
        config = F.FilterConfig(name="test", plugin="scripted", timeout=timeout, default_action=default_action,
                                options={"decide": decide, "log": self.log, "auth": self.session_auth}, factory=ScriptedFactory())
        rule = Rule(name="TEST", protocol="esmtp", max_data=1000000, filters=(config,), quarantine=self.quarantine)
        settings = GlobalSettings(spool_directory=self.spool)
        self.tracker, port = start_gateway(self, rule, backend_port, settings)
        return port

    def inline_gateway(self, decide, backend_port, then=None, **options):
        """A gateway whose chain is an `InlineFilter`, then (with ``then``) a `ScriptedFilter` deciding ``then``."""
        chain = [F.FilterConfig(name="inline", plugin="inline", timeout=5.0, default_action="tempfail",
                                options=dict(options, decide=decide, log=self.log, auth=self.session_auth),
                                factory=InlineFactory())]
        if then is not None:
            chain.append(F.FilterConfig(name="test", plugin="scripted", timeout=5.0, default_action="tempfail",
                                        options={"decide": then, "log": self.log, "auth": self.session_auth},
                                        factory=ScriptedFactory()))
        rule = Rule(name="TEST", protocol="esmtp", max_data=1000000, filters=tuple(chain), quarantine=self.quarantine)
        self.tracker, port = start_gateway(self, rule, backend_port, GlobalSettings(spool_directory=self.spool))
        return port

    def recording(self, **kwargs):
        factory = RecordingBackend(**kwargs)
        return factory, listenBackend(self, factory)

    def alerts(self, tag):
        return [e for e in self.events if e.get("tag") == tag]

    @defer.inlineCallbacks
    def test_rejectedMessageNeverReachesServer(self):
        """A message a filter rejects is refused with its reply; the server saw no DATA; the next one is delivered."""
        backend, bport = self.recording()
        port = self.gateway(subject_rejecter(b"forbidden"), bport)
        bad, good = message("a forbidden word"), message("fine")
        code = yield deferToThread(refused_then_delivered, port, bad, good)
        self.assertEqual(code, 550)
        received = bytes(backend.connections[0].received)
        self.assertEqual(received.lower().count(b"data\r\n"), 1)
        self.assertNotIn(b"forbidden", received)
        self.assertEqual(len(backend.messages), 1)
        self.assertEqual(backend.messages[0].data, good.replace(b"\r\n", b"\n"))
        self.assertTrue(self.alerts("MESSAGE_REFUSED"))

    @defer.inlineCallbacks
    def test_recipientRefusedBeforeServer(self):
        """A recipient a filter refuses gets the filter's reply and never reaches the server; the others get the mail."""
        backend, bport = self.recording()
        port = self.gateway(lambda h: F.Verdict.ACCEPT, bport)

        def talk():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                return c.sendmail("a@example.org", ["refuse@example.org", "ok@example.org"], message("hi"))

        refused = yield deferToThread(talk)
        self.assertEqual(refused, {"refuse@example.org": (550, b"5.7.1 Recipient refused by test filter")})
        received = bytes(backend.connections[0].received)
        self.assertNotIn(b"refuse@", received)
        self.assertEqual(backend.messages[0].rcpt_to, [b"ok@example.org"])
        self.assertIn(("RCPT", b"refuse@example.org"), self.log)
        self.assertIn(("reply", b"RCPT", 250), self.log)

    @defer.inlineCallbacks
    def test_slowFilter(self):
        """A filter answering after 2 seconds holds the message, then lets it through whole."""
        backend, bport = self.recording()
        port = self.gateway(later(2, F.Verdict.ACCEPT), bport)
        m = message("slow")
        yield deferToThread(lambda: smtplib.SMTP("127.0.0.1", port, timeout=10).sendmail("a@x.org", ["b@x.org"], m))
        self.assertEqual(backend.messages[0].data, m.replace(b"\r\n", b"\n"))

    @defer.inlineCallbacks
    def test_silentFilterTimesOut(self):
        """A filter that never answers gets its default action (tempfail: 451), logged as FILTER_FAILED."""
        backend, bport = self.recording()
        port = self.gateway(never, bport, timeout=1.0)

        def talk():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                with self.assertRaises(smtplib.SMTPDataError) as e:
                    c.sendmail("a@example.org", ["b@example.org"], message("x"))
                c.noop()
                return e.exception.smtp_code

        code = yield deferToThread(talk)
        self.assertEqual(code, 451)
        self.assertEqual(backend.messages, [])
        self.assertNotIn(b"data\r\n", bytes(backend.connections[0].received).lower())
        self.assertTrue(self.alerts("FILTER_FAILED"))

    @defer.inlineCallbacks
    def test_silentFilterDefaultAccept(self):
        """With default-action = accept, a silent filter lets the message through."""
        backend, bport = self.recording()
        port = self.gateway(never, bport, timeout=0.5, default_action="accept")
        m = message("x")
        yield deferToThread(lambda: smtplib.SMTP("127.0.0.1", port, timeout=10).sendmail("a@x.org", ["b@x.org"], m))
        self.assertEqual(backend.messages[0].data, m.replace(b"\r\n", b"\n"))

    @defer.inlineCallbacks
    def test_discard(self):
        """A discarded message gets 250, is not delivered, and MESSAGE_DISCARDED is logged."""
        backend, bport = self.recording()
        port = self.gateway(lambda h: F.Verdict(F.DISCARD, reason="test"), bport)
        refused = yield deferToThread(
            lambda: smtplib.SMTP("127.0.0.1", port, timeout=10).sendmail("a@x.org", ["b@x.org"], message("x")))
        self.assertEqual(refused, {})
        self.assertEqual(backend.messages, [])
        self.assertNotIn(b"data\r\n", bytes(backend.connections[0].received).lower())
        self.assertEqual(len(self.alerts("MESSAGE_DISCARDED")), 1)

    @defer.inlineCallbacks
    def test_quarantine(self):
        """A quarantined message gets 250, lands in the quarantine Maildir, not at the server."""
        backend, bport = self.recording()
        port = self.gateway(lambda h: F.Verdict(F.QUARANTINE), bport)
        m = message("keep me")
        yield deferToThread(lambda: smtplib.SMTP("127.0.0.1", port, timeout=10).sendmail("a@x.org", ["b@x.org"], m))
        self.assertEqual(backend.messages, [])
        new = os.path.join(self.quarantine, "new")
        files = os.listdir(new)
        self.assertEqual(len(files), 1)
        with open(os.path.join(new, files[0]), "rb") as f:
            self.assertEqual(f.read(), m)
        self.assertEqual(len(self.alerts("MESSAGE_QUARANTINED")), 1)

    @defer.inlineCallbacks
    def test_addHeaderAndRecipient(self):
        """Accept with modifications: the server receives the added header and the added recipient."""
        backend, bport = self.recording()
        mods = (F.AddHeader(b"X-Scanned", b" yes"), F.AddRecipient(b"extra@example.org"),
                F.ChangeHeader(b"Subject", 1, b" changed"))
        port = self.gateway(lambda h: F.Verdict(F.ACCEPT, modifications=mods), bport)
        m = message("original")
        yield deferToThread(lambda: smtplib.SMTP("127.0.0.1", port, timeout=10).sendmail("a@x.org", ["b@x.org"], m))
        self.assertEqual(backend.messages[0].rcpt_to, [b"b@x.org", b"extra@example.org"])
        data = backend.messages[0].data
        self.assertIn(b"Subject: changed\n", data)
        self.assertNotIn(b"original", data)
        self.assertTrue(data.split(b"\n\n", 1)[0].endswith(b"X-Scanned: yes"))
        self.assertTrue(data.endswith(b"hello\n.dot line\n"))

    @defer.inlineCallbacks
    def test_inlineFilterReadsTheSpooledMessage(self):
        """An inline filter reads the DATA message as spooled, dots unstuffed; its refusal stops the chain and the server."""
        backend, bport = self.recording()
        port = self.inline_gateway(lambda data: F.reject(b"550 5.7.1 No\r\n") if b"bad" in data else F.Verdict.ACCEPT,
                                   bport, then=lambda headers: F.Verdict.ACCEPT)
        bad = b"Subject: bad\r\n\r\n.leading dot\r\n..two dots\r\n" + b"x" * 70000 + b"\r\n"
        good = b"Subject: good\r\n\r\n.leading dot\r\nend\r\n"
        code = yield deferToThread(refused_then_delivered, port, bad, good)
        self.assertEqual(code, 550)
        self.assertEqual([e[1] for e in self.log if e[0] == "inline"], [bad, good])
        received = bytes(backend.connections[0].received)
        self.assertNotIn(b"bad", received)
        self.assertEqual(received.lower().count(b"data\r\n"), 1)
        self.assertEqual(backend.messages[0].data, good.replace(b"\r\n", b"\n"))

    @defer.inlineCallbacks
    def test_spooledSizesArriveWhole(self):
        """Approved messages below and above the one-write size arrive byte for byte (written at once, or streamed)."""
        from mailguard.filtering import WHOLE_SEND

        backend, bport = self.recording()
        port = self.inline_gateway(lambda data: F.Verdict.ACCEPT, bport)
        line = b".dotted line of the message, stuffed on the wire\r\n"
        small = b"Subject: small\r\n\r\n" + line * (WHOLE_SEND // len(line) // 2)
        large = b"Subject: large\r\n\r\n" + line * (WHOLE_SEND // len(line) * 3)

        def talk():
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
                c.sendmail("a@x.org", ["b@x.org"], small)
                c.sendmail("a@x.org", ["b@x.org"], large)

        yield deferToThread(talk)
        self.assertEqual([len(e[1]) for e in self.log if e[0] == "inline"], [len(small), len(large)])
        self.assertEqual([m.data for m in backend.messages], [small.replace(b"\r\n", b"\n"), large.replace(b"\r\n", b"\n")])

    @defer.inlineCallbacks
    def test_inlineFilterBdat(self):
        """With BDAT the inline filter reads the chunks' octets as sent, and an accepted message arrives whole."""
        backend, bport = self.recording()
        port = self.inline_gateway(lambda data: F.Verdict.ACCEPT, bport)
        msg = b"Subject: b\r\n\r\n.not stuffed\r\nbinary\x00body\r\n"
        codes = yield deferToThread(bdat_session, port, (msg,))
        self.assertEqual(codes, [b"220", b"250", b"250", b"250", b"250", b"250", b"221"])
        self.assertEqual([e[1] for e in self.log if e[0] == "inline"], [msg])
        self.assertEqual(backend.messages[0].data, msg.replace(b"\r\n", b"\n"))

    @defer.inlineCallbacks
    def test_inlineFilterRaising(self):
        """An inline filter that raises while reading gets its default action (tempfail) and FILTER_FAILED; nothing is sent."""
        backend, bport = self.recording()
        port = self.inline_gateway(lambda data: F.Verdict.ACCEPT, bport, **{"raise": True})

        def talk():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                with self.assertRaises(smtplib.SMTPDataError) as e:
                    c.sendmail("a@x.org", ["b@x.org"], message("x"))
                return e.exception.smtp_code

        code = yield deferToThread(talk)
        self.assertEqual(code, 451)
        failed = self.alerts("FILTER_FAILED")
        self.assertEqual(len(failed), 1)
        self.assertEqual((failed[0]["filter"], failed[0]["reason"]), ("inline", "raised RuntimeError: broken reader"))
        self.assertEqual(backend.messages, [])

    @defer.inlineCallbacks
    def test_bdatRejectedNeverEnds(self):
        """A raw BDAT client: a rejected message's end (BDAT ... LAST) never reaches the server; the next is delivered."""
        backend, bport = self.recording()
        port = self.gateway(subject_rejecter(b"bad"), bport)
        bad, good = b"Subject: bad\r\n\r\nbody\r\n", b"Subject: good\r\n\r\nbinary\x00body\r\n"

        codes = yield deferToThread(bdat_session, port, (bad, good))
        self.assertEqual(codes, [b"220", b"250", b"250", b"250", b"250", b"550", b"250", b"250", b"250", b"250",
                                 b"221"])
        received = bytes(backend.connections[0].received)
        self.assertNotIn(b"bad", received)
        self.assertEqual(received.count(b"BDAT"), 1)
        self.assertEqual(backend.messages[0].data, good.replace(b"\r\n", b"\n"))

    @defer.inlineCallbacks
    def test_authenticatedSessionGoesOn(self):
        """Against an AUTH-requiring server: after a refused message the authenticated session delivers the next one."""
        backend = AiosmtpdBackend(auth=True, auth_required=True)
        bport = backend.start()
        self.addCleanup(backend.stop)
        port = self.gateway(subject_rejecter(b"spam"), bport)
        good = message("fine")

        def talk():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                c.login(AUTH_USER, AUTH_PASSWORD)
                with self.assertRaises(smtplib.SMTPDataError):
                    c.sendmail("a@example.org", ["b@example.org"], message("spam spam"))
                c.sendmail("a@example.org", ["b@example.org"], good)

        yield deferToThread(talk)
        envelopes = yield backend.whenMessages(1)
        self.assertEqual(len(envelopes), 1)
        self.assertEqual(envelopes[0].original_content, good)
        facts = [f for f in self.log if f[0] == "MAIL"]
        self.assertEqual(len(facts), 2)
        self.assertEqual(self.session_auth, [AUTH_USER.encode()] * 2)

    @defer.inlineCallbacks
    def test_spoolPrivateAndRemoved(self):
        """The spool directory is 0700; the message waits in an unnamed 0600 file, emptied once delivered."""
        backend, bport = self.recording()
        seen = []
        body = message("x" * 5000)

        def decide(headers):
            seen.append((os.listdir(self.spool), open_spool_files(self.spool)))
            return F.Verdict.ACCEPT

        port = self.gateway(decide, bport)
        yield deferToThread(lambda: smtplib.SMTP("127.0.0.1", port, timeout=10).sendmail("a@x.org", ["b@x.org"], body))
        (names, files), = seen
        self.assertEqual(names, [])  # nothing in the directory a crash could leave behind
        self.assertEqual([mode for mode, size in files], [0o600])
        self.assertGreater(files[0][1], 5000)
        self.assertEqual(stat.S_IMODE(os.stat(self.spool).st_mode), 0o700)
        self.assertEqual(os.listdir(self.spool), [])
        self.assertEqual([size for mode, size in open_spool_files(self.spool)], [0])  # emptied, kept for the next message
        self.assertEqual(len(backend.messages), 1)


class FilterCoreTests(SynchronousTestCase):
    """The inspector's side of the seam, without any network (sans-IO)."""

    def inspector(self):
        config = F.FilterConfig(name="t", plugin="t", factory=ScriptedFactory(), options={"log": [], "auth": []})
        insp = build(Rule(name="R", protocol="esmtp", filters=(config,)), MODES["esmtp"])
        insp.server_connected()
        insp.server_data(b"220 hi\r\n")
        insp.client_data(b"EHLO c\r\n")
        insp.server_data(b"250-hi\r\n250 PIPELINING\r\n")
        return insp

    def test_pipelinedCommandsWaitForVerdict(self):
        """A pipelined MAIL RCPT DATA group: nothing after MAIL is forwarded before the MAIL verdict."""
        insp = self.inspector()
        events = insp.client_data(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n")
        self.assertEqual([e for e in events if isinstance(e, ToServer)], [])
        self.assertIn(PauseClient(), events)
        self.assertEqual([e for e in events if isinstance(e, FilterEnvelope)], [FilterEnvelope(b"MAIL", b"a@x", b"")])
        events = insp.envelope_verdict(F.Verdict.CONTINUE)
        self.assertEqual([e.data for e in events if isinstance(e, ToServer)], [b"MAIL FROM:<a@x>\r\n"])
        self.assertEqual([e for e in events if isinstance(e, FilterEnvelope)], [FilterEnvelope(b"RCPT", b"b@x", b"")])
        self.assertIn(ResumeClient(), events)
        events = insp.envelope_verdict(F.reject())
        self.assertEqual([e.data for e in events if isinstance(e, ToServer)], [])
        events = insp.server_data(b"250 ok\r\n")
        # MAIL's reply, the refused RCPT's 550, then DATA decided: no valid recipients.
        self.assertEqual(b"".join(e.data for e in events if isinstance(e, ToClient)),
                         b"250 ok\r\n550 5.7.1 Rejected by filter\r\n554 5.5.1 Error: no valid recipients\r\n")

    def test_messageSpooledNotForwarded(self):
        """Message data goes to the spool, never to the server, and the end waits for the verdict (whole and bytewise)."""
        for bytewise in (False, True):
            insp = self.inspector()
            insp.client_data(b"MAIL FROM:<a@x>\r\n")
            insp.envelope_verdict(F.Verdict.CONTINUE)
            insp.client_data(b"RCPT TO:<b@x>\r\n")
            insp.envelope_verdict(F.Verdict.CONTINUE)
            insp.server_data(b"250 ok\r\n250 ok\r\n")
            events = insp.client_data(b"DATA\r\n")
            self.assertIn(ToClient(b"354 End data with <CR><LF>.<CR><LF>\r\n"), events)
            data = b"Subject: x\r\n\r\n..dot\r\nbody\r\n.\r\nQUIT\r\n"
            pieces = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
            events = []
            for p in pieces:
                events += insp.client_data(p)
            self.assertEqual([e for e in events if isinstance(e, ToServer)], [])
            self.assertEqual(b"".join(e.data for e in events if isinstance(e, ToSpool)), b"Subject: x\r\n\r\n..dot\r\nbody\r\n")
            self.assertIn(MessageSpooled(len(b"Subject: x\r\n\r\n.dot\r\nbody\r\n"), True), events)
            events = insp.message_verdict(F.reject())
            # The refusal, the gateway's RSET to the server, then the held QUIT.
            self.assertEqual([e.data for e in events if isinstance(e, ToServer)], [b"RSET\r\n", b"QUIT\r\n"])

    def test_interfaces(self):
        """The test filter and its factory provide the public interfaces."""
        self.assertTrue(verifyObject(IMessageFilterFactory, ScriptedFactory()))
        config = F.FilterConfig(name="t", plugin="t", options={"decide": None, "log": [], "auth": []})
        self.assertTrue(verifyObject(IMessageFilter, ScriptedFilter(config, F.SessionFacts())))


class SpoolStartTests(SynchronousTestCase):
    """The spool directory is prepared at start-up: private, stale files gone, failure on one line."""

    def policy(self, spool):
        from mailguard.policy import parse_policy

        text = ("[global]\nspool-directory = %s\n[inspect R]\nprotocol = esmtp\nfilters = f\n"
                "[filter f]\nplugin = scripted\n[listener l]\nlisten = tcp:0\nbackend = tcp:host=127.0.0.1:port=1\n"
                "inspect = R\n" % spool)
        return parse_policy(text, path="p.ini", filter_plugins={"scripted": ScriptedFactory()})

    def test_staleRemoved(self):
        """A stale spool file from an earlier run is removed and the directory made 0700."""
        from mailguard.service import _prepare_spool

        spool = os.path.abspath(self.mktemp())
        os.makedirs(spool, mode=0o755)
        with open(os.path.join(spool, "msg-1-2-3"), "wb") as f:
            f.write(b"old")
        _prepare_spool(self.policy(spool))
        self.assertEqual(os.listdir(spool), [])
        self.assertEqual(stat.S_IMODE(os.stat(spool).st_mode), 0o700)

    def test_cannotCreate(self):
        """A spool directory that cannot be created is one policy line naming [global] spool-directory."""
        from mailguard.policy import PolicyError
        from mailguard.service import _prepare_spool

        blocker = os.path.abspath(self.mktemp())
        with open(blocker, "w") as f:
            f.write("a file, not a directory")
        e = self.assertRaises(PolicyError, _prepare_spool, self.policy(os.path.join(blocker, "spool")))
        self.assertTrue(str(e).startswith("p.ini: [global] spool-directory: cannot create "), str(e))
        self.assertNotIn("\n", str(e))


class FilterPolicyTests(SynchronousTestCase):
    """[filter NAME] sections: the plugin's keys checked, one-line errors."""

    TEXT = ("[inspect R]\nprotocol = esmtp\nfilters = %s\n[filter f]\nplugin = %s\n%s"
            "[listener l]\nlisten = tcp:0\nbackend = tcp:host=127.0.0.1:port=1\ninspect = R\n")

    def parse(self, filters="f", plugin="scripted", extra=""):
        from mailguard.policy import parse_policy

        return parse_policy(self.TEXT % (filters, plugin, extra), path="p.ini",
                            filter_plugins={"scripted": ScriptedFactory()})

    def test_parsed(self):
        """A rule's filters are FilterConfig values with the section's timeout and default action."""
        rule = self.parse(extra="timeout = 2.5\ndefault-action = accept\n").rule("R")
        (config,) = rule.filters
        self.assertEqual((config.name, config.plugin, config.timeout, config.default_action),
                         ("f", "scripted", 2.5, "accept"))
        self.assertIsInstance(config.factory, ScriptedFactory)

    def test_errors(self):
        """Unknown plugin, unknown key, bad default action, missing section: each one line naming where."""
        from mailguard.policy import PolicyError

        cases = [
            (dict(plugin="nope"), "p.ini: [filter f] plugin: unknown filter plugin 'nope' (known: scripted)"),
            (dict(extra="colour = red\n"), "p.ini: [filter f] colour: unknown key"),
            (dict(extra="default-action = maybe\n"),
             "p.ini: [filter f] default-action: bad value 'maybe': expected one of tempfail, accept, reject"),
            (dict(filters="f, g"), "p.ini: [inspect R] filters: no [filter g] section"),
            (dict(extra="timeout = 0\n"), "p.ini: [filter f] timeout: bad value '0': expected a number of seconds > 0"),
        ]
        for kwargs, expected in cases:
            e = self.assertRaises(PolicyError, self.parse, **kwargs)
            self.assertEqual(str(e), expected)


class _Collecting:
    """A transport that keeps what is written to it."""

    def __init__(self):
        self.written = []

    def write(self, data):
        """Keep ``data``."""
        self.written.append(data)


class SpoolFileTests(SynchronousTestCase):
    """A spool file: unnamed, private, read back whole, emptied and reused."""

    def roundTrip(self, directory):
        """Write, read back, remove and reuse a spool file in ``directory``, checking it all along."""
        from mailguard.filtering import SpoolFile

        data = b"line\r\n" * 30000
        first = SpoolFile(directory)
        first.write(data[:100000])
        first.write(data[100000:])
        self.assertEqual(b"".join(first.pieces()), data)
        self.assertEqual(b"".join(first.pieces(7)), data)
        self.assertEqual(b"".join(first.pieces(7, 12345)), data[12345:])  # the rest, after a partial sendfile
        self.assertEqual(os.listdir(directory), [])
        self.assertIn((0o600, len(data)), open_spool_files(directory))
        first.remove()
        first.remove()
        self.assertEqual([size for mode, size in open_spool_files(directory)], [0])
        second = SpoolFile(directory)
        self.assertIsNotNone(second.fileno())
        self.assertEqual(b"".join(second.pieces()), b"")
        second.write(b"next")
        self.assertEqual(b"".join(second.pieces()), b"next")
        second.remove()
        self.assertEqual(len(open_spool_files(directory)), 1)  # the same file, reused

    def test_unsent(self):
        """After a partial sendfile of message and end of data, exactly the rest is left to write, in order."""
        from mailguard.filtering import SpoolFile, unsent

        spool = SpoolFile(os.path.abspath(self.mktemp()))
        spool.write(b"0123456789")
        spool.place_after(b".\r\n")
        self.assertEqual(b"".join(spool.pieces()), b"0123456789")  # the end of data is not part of the message
        for sent in range(14):
            self.assertEqual(b"".join(unsent(spool, b".\r\n", sent)), b"0123456789.\r\n"[sent:], sent)
        self.assertEqual(unsent(spool, b"", 10), [])
        spool.remove()

    def test_unnamedAndReused(self):
        """A message's file has no name, is 0600, reads back whole in any piece size, and is emptied for reuse."""
        self.roundTrip(os.path.abspath(self.mktemp()))

    def test_withoutTmpfile(self):
        """Where O_TMPFILE is refused, a named file is opened and its name removed at once: the same guarantees."""
        real_open = os.open

        def no_tmpfile(path, flags, mode=0o777):
            if flags & getattr(os, "O_TMPFILE", 0) == getattr(os, "O_TMPFILE", -1):
                raise OSError(errno.EOPNOTSUPP, "not supported")
            return real_open(path, flags, mode)

        self.patch(os, "open", no_tmpfile)
        self.roundTrip(os.path.abspath(self.mktemp()))

    def test_senderGivesTheFileBack(self):
        """A spool being sent is given back when the server leg goes away mid-way, and when the sending ends."""
        from mailguard.filtering import READ_SIZE, SpoolFile, _SpoolSender

        directory = os.path.abspath(self.mktemp())
        for stop in (True, False):
            spool = SpoolFile(directory)
            spool.write(b"x" * (READ_SIZE * 3))
            transport = _Collecting()
            written = transport.written
            sender = _SpoolSender(spool, transport, b".\r\n")
            sender.done = spool.remove
            sender.resumeProducing()
            if stop:
                sender.stopProducing()
                self.assertEqual(len(written), 1)
            else:
                for _ in range(4):
                    sender.resumeProducing()
                self.assertEqual(b"".join(written), b"x" * (READ_SIZE * 3) + b".\r\n")
            self.assertIsNone(spool.fileno())
            self.assertEqual([size for mode, size in open_spool_files(directory)], [0])
