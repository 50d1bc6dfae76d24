"""POP3 inspection: the sans-IO core, and poplib through the gateway to Twisted's POP3 server."""

import hashlib
import poplib
import socket
from types import MappingProxyType

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred import checkers, portal
from twisted.internet import defer, protocol, reactor
from twisted.internet.threads import deferToThread
from twisted.mail import pop3
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailguard.events import Alert, Close, Greeted, Passthrough, StartTLS, ToClient, ToServer
from mailguard.interfaces import IInspector
from mailguard.policy import Rule
from mailguard.pop3 import COMMANDS, POP3Inspector
from tests.clients import wait_for
from tests.harness import OneAvatarRealm, drive, start_gateway

GREETING = b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n"
CAPA = b"+OK Capability list follows\r\nTOP\r\nUSER\r\nSASL PLAIN\r\nSTLS\r\nUIDL\r\nPIPELINING\r\n.\r\n"


#: (tls, backend-tls) pairs the property test runs under.
TLS_MODES = [("strip", "off"), ("terminate", "off"), ("terminate", "opportunistic"),
             ("terminate", "required"), ("passthrough", "off")]


def rule(secure_login=False, **kw):
    """A pop3 rule as the policy would build it."""
    return Rule(name="R", protocol="pop3", options=MappingProxyType({"secure-login": secure_login}), **kw)


def run(script, bytewise=False, tls=False, **kw):
    """Feed a dialogue to a fresh inspector; return (to_server, to_client, events)."""
    return drive(POP3Inspector(rule(**kw)), script, bytewise, tls)


def alerts(events, tag="POP3_INVALID_COMMAND"):
    """The alerts with ``tag`` among ``events``."""
    return [e for e in events if type(e) is Alert and e.tag == tag]


class CoreTests(SynchronousTestCase):
    """The sans-IO POP3 inspector, fed whole and byte by byte."""

    def both(self, script, **kw):
        """Run ``script`` whole and byte by byte; assert the same bytes come out; return the whole run."""
        whole = run(script, **kw)
        bytewise = run(script, bytewise=True, **kw)
        self.assertEqual(whole[:2], bytewise[:2])
        self.assertEqual(alerts(whole[2]), alerts(bytewise[2]))
        return whole

    def test_interface(self):
        """The inspector provides IInspector."""
        self.assertTrue(verifyObject(IInspector, POP3Inspector(rule())))

    def test_greeting(self):
        """The server's +OK greeting is relayed and opens the session."""
        to_server, to_client, events = self.both([("s", GREETING)])
        self.assertEqual(to_client, GREETING)
        self.assertIn(Greeted(), events)

    def test_session(self):
        """A whole session with multi-line LIST, RETR and TOP passes unchanged in both directions."""
        body = b"Subject: x\r\n\r\n..leading dot\r\nQUIT\r\nDELE 1\r\n"
        client = b"USER bob\r\nPASS secret word\r\nSTAT\r\nLIST\r\nRETR 1\r\nTOP 1 0\r\nUIDL 1\r\nQUIT\r\n"
        server = (
            b"+OK\r\n+OK\r\n+OK 1 40\r\n+OK\r\n1 40\r\n.\r\n+OK 40 octets\r\n" + body + b".\r\n"
            b"+OK\r\nSubject: x\r\n\r\n.\r\n+OK 1 abc\r\n+OK bye\r\n"
        )
        to_server, to_client, events = self.both([("s", GREETING), ("c", client), ("s", server)])
        self.assertEqual(to_server, client)
        self.assertEqual(to_client, GREETING + server)
        self.assertEqual(alerts(events), [])

    def test_body_lines_are_data(self):
        """Lines of a RETR body that look like responses or terminators are relayed as body."""
        body = b"+OK fake\r\n-ERR fake\r\n.x\r\n"
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"RETR 1\r\nNOOP\r\n"), ("s", b"+OK\r\n" + body + b".\r\n+OK noop\r\n")]
        )
        self.assertEqual(to_client, GREETING + b"+OK\r\n" + body + b".\r\n+OK noop\r\n")
        self.assertEqual(alerts(events, "POP3_INVALID_RESPONSE"), [])

    def test_empty_body(self):
        """An empty multi-line body (the terminator right after +OK) ends at once."""
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"LIST\r\nNOOP\r\n"), ("s", b"+OK 0 messages\r\n.\r\n+OK\r\n")]
        )
        self.assertEqual(to_client, GREETING + b"+OK 0 messages\r\n.\r\n+OK\r\n")

    def test_illegal_command(self):
        """A command outside the allowlist is answered -ERR by the gateway and never forwarded."""
        to_server, to_client, events = self.both([("s", GREETING), ("c", b"XTND XMIT\r\nLAST\r\nRPOP x\r\n")])
        self.assertEqual(to_server, b"")
        self.assertEqual(to_client, GREETING + b"-ERR Command not allowed\r\n" * 3)
        self.assertEqual([a.fields["verb"] for a in alerts(events)], ["XTND", "LAST", "RPOP"])

    def test_bad_arguments(self):
        """Allowed verbs with arguments their RFC does not allow are refused."""
        lines = [b"RETR one", b"STAT 1", b"TOP 1", b"APOP bob short", b"USER", b"DELE 1 2"]
        to_server, to_client, events = self.both([("s", GREETING), ("c", b"".join(l + b"\r\n" for l in lines))])
        self.assertEqual(to_server, b"")
        self.assertEqual(to_client, GREETING + b"-ERR Invalid command arguments\r\n" * len(lines))

    def test_allowlist(self):
        """Every RFC 1939/2449 command of the allowlist is accepted in some form."""
        self.assertEqual(
            set(COMMANDS),
            set(b"USER PASS APOP STAT LIST RETR DELE NOOP RSET QUIT TOP UIDL CAPA STLS AUTH".split()),
        )
        lines = b"user bob\r\nApop bob " + b"0" * 32 + b"\r\nnoop\r\nrset\r\nlist 1\r\nuidl\r\ncapa\r\ndele 2\r\n"
        to_server, to_client, events = self.both([("s", GREETING), ("c", lines)])
        self.assertEqual(to_server, lines)

    def test_nul_and_bare_cr(self):
        """A command holding NUL or a bare CR is refused."""
        to_server, to_client, events = self.both([("s", GREETING), ("c", b"USER a\0b\r\nUSER a\rRETR 1\r\n")])
        self.assertEqual(to_server, b"")
        self.assertEqual(len(alerts(events)), 2)

    def test_pipelined_order(self):
        """The gateway's own -ERR waits for the responses owed before it."""
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"STAT\r\nXTND\r\nNOOP\r\n"), ("s", b"+OK 0 0\r\n+OK\r\n")]
        )
        self.assertEqual(to_server, b"STAT\r\nNOOP\r\n")
        self.assertEqual(to_client, GREETING + b"+OK 0 0\r\n-ERR Command not allowed\r\n+OK\r\n")

    def test_refused_after_multiline(self):
        """A refusal queued behind a multi-line response comes after its terminator."""
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"LIST\r\nXTND\r\n"), ("s", b"+OK\r\n1 10\r\n.\r\n")]
        )
        self.assertEqual(to_client, GREETING + b"+OK\r\n1 10\r\n.\r\n-ERR Command not allowed\r\n")

    def test_stls(self):
        """STLS is answered -ERR by the gateway and removed from CAPA."""
        to_server, to_client, events = self.both([("s", GREETING), ("c", b"STLS\r\nCAPA\r\n"), ("s", CAPA)])
        self.assertEqual(to_server, b"CAPA\r\n")
        self.assertEqual(
            to_client,
            GREETING + b"-ERR TLS not available\r\n" + CAPA.replace(b"STLS\r\n", b""),
        )

    def test_secure_login(self):
        """secure-login refuses USER, PASS, APOP and AUTH before TLS and hides USER and SASL in CAPA."""
        lines = b"USER bob\r\nPASS x\r\nAPOP bob " + b"a" * 32 + b"\r\nAUTH PLAIN\r\nCAPA\r\n"
        to_server, to_client, events = self.both([("s", GREETING), ("c", lines), ("s", CAPA)], secure_login=True)
        self.assertEqual(to_server, b"CAPA\r\n")
        refusal = b"-ERR [SYS/PERM] Login refused before TLS (secure-login)\r\n"
        capa = b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nPIPELINING\r\n.\r\n"
        self.assertEqual(to_client, GREETING + refusal * 4 + capa)
        self.assertEqual(len(alerts(events)), 4)

    def test_secure_login_tls(self):
        """On a TLS client leg secure-login lets logins through."""
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"USER bob\r\nPASS x\r\n")], secure_login=True, tls=True
        )
        self.assertEqual(to_server, b"USER bob\r\nPASS x\r\n")

    def test_auth_exchange(self):
        """After AUTH, lines answering the server's "+ " are SASL data, not commands."""
        to_server, to_client, events = self.both(
            [
                ("s", GREETING),
                ("c", b"AUTH PLAIN\r\n"),
                ("s", b"+ \r\n"),
                ("c", b"XTND\r\n"),  # valid base64 characters: a SASL response here
                ("s", b"+OK logged in\r\n"),
                ("c", b"XTND\r\n"),
            ]
        )
        self.assertEqual(to_server, b"AUTH PLAIN\r\nXTND\r\n")
        self.assertEqual(to_client, GREETING + b"+ \r\n+OK logged in\r\n-ERR Command not allowed\r\n")

    def test_auth_held(self):
        """Lines a client sends before the server answered AUTH wait for that answer."""
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"AUTH PLAIN\r\nAGJvYgBzZWNyZXQ=\r\n"), ("s", b"+ \r\n+OK\r\n")]
        )
        self.assertEqual(to_server, b"AUTH PLAIN\r\nAGJvYgBzZWNyZXQ=\r\n")
        self.assertEqual(alerts(events), [])

    def test_auth_invalid_response(self):
        """An invalid SASL response is replaced by the cancel line "*" (and never logged)."""
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"AUTH PLAIN\r\n"), ("s", b"+ \r\n"), ("c", b"not base64!\r\n")]
        )
        self.assertEqual(to_server, b"AUTH PLAIN\r\n*\r\n")
        self.assertEqual([a.text for a in alerts(events)], ["Invalid SASL response"])

    def test_auth_mechanism_list(self):
        """AUTH without a mechanism gets a multi-line list, relayed whole."""
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"AUTH\r\nNOOP\r\n"), ("s", b"+OK\r\nPLAIN\r\n.\r\n+OK\r\n")]
        )
        self.assertEqual(to_client, GREETING + b"+OK\r\nPLAIN\r\n.\r\n+OK\r\n")

    def test_line_too_long(self):
        """A command line over 8 KB is refused and its bytes are not kept."""
        to_server, to_client, events = run([("s", GREETING), ("c", b"USER " + b"a" * 9000 + b"\r\nNOOP\r\n")])
        self.assertEqual(to_server, b"NOOP\r\n")
        self.assertEqual(to_client, GREETING + b"-ERR Line too long\r\n")

    def test_too_many_errors(self):
        """The refused command that reaches max-bad-commands closes the session."""
        to_server, to_client, events = run([("s", GREETING), ("c", b"XTND\r\n" * 3)], max_bad_commands=3)
        refused = b"-ERR Command not allowed\r\n"
        self.assertEqual(to_client, GREETING + refused * 2 + b"-ERR Too many errors, closing connection\r\n")
        self.assertIsInstance(events[-1], Close)

    def test_pregreet(self):
        """A client talking before the greeting is refused and closed (pregreet = reject)."""
        to_server, to_client, events = run([("c", b"USER bob\r\n")])
        self.assertEqual(to_server, b"")
        self.assertEqual(len(alerts(events, "PREGREET")), 1)
        self.assertIsInstance(events[-1], Close)

    def test_pregreet_ignore(self):
        """With pregreet = ignore early commands are inspected once the greeting is relayed."""
        to_server, to_client, events = run([("c", b"NOOP\r\n"), ("s", GREETING)], pregreet="ignore")
        self.assertEqual(to_server, b"NOOP\r\n")

    def test_invalid_response(self):
        """A server line that is neither +OK nor -ERR closes the session."""
        to_server, to_client, events = run([("s", GREETING), ("c", b"NOOP\r\n"), ("s", b"250 ok\r\n")])
        self.assertEqual(len(alerts(events, "POP3_INVALID_RESPONSE")), 1)
        self.assertIsInstance(events[-1], Close)

    def test_server_lost(self):
        """The backend closing mid-session gets the client -ERR; after QUIT it is a plain close."""
        inspector = POP3Inspector(rule())
        inspector.server_connected()
        inspector.server_data(GREETING)
        self.assertEqual(inspector.server_lost()[0], ToClient(b"-ERR Connection to the mail server lost\r\n"))
        inspector = POP3Inspector(rule())
        inspector.server_connected()
        inspector.server_data(GREETING)
        inspector.client_data(b"QUIT\r\n")
        self.assertEqual(inspector.server_lost(), [Close("server closed after QUIT")])

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from("cs"),
                st.lists(
                    st.sampled_from(
                        [b"USER bob", b"RETR 1", b"LIST", b"CAPA", b"AUTH PLAIN", b"STLS", b"+OK", b"-ERR",
                         b"+ ", b".", b"..", b"\r\n", b"\n", b"\r", b"\0", b"x" * 40]
                    )
                    | st.binary(max_size=20),
                    max_size=6,
                ).map(b"".join),
            ),
            max_size=25,
        ),
        st.booleans(),
        st.sampled_from(TLS_MODES),
    )
    def test_never_raises(self, script, secure, tls):
        """Whatever both peers send, in every tls mode, the inspector returns events and never raises."""
        inspector = POP3Inspector(rule(secure, max_bad_commands=5, tls=tls[0], backend_tls=tls[1]))
        inspector.server_connected()
        inspector.server_data(GREETING)
        for side, data in script:
            events = (inspector.client_data if side == "c" else inspector.server_data)(data)
            self.assertIsInstance(events, list)
        inspector.server_lost()
        inspector.client_lost()


def tls_events(events):
    """The StartTLS and Passthrough events among ``events``."""
    return [e for e in events if type(e) in (StartTLS, Passthrough)]


def stls_run(script, bytewise=False, mode="strip", **kw):
    """Feed a dialogue to a fresh inspector under ``tls = mode``; return (to_server, to_client, events)."""
    return drive(POP3Inspector(rule(tls=mode, **kw)), script, bytewise)


class STLSTests(SynchronousTestCase):
    """STLS under tls = terminate and passthrough, and the injection defence both ways (RFC 2595)."""

    def both(self, script, **kw):
        """Run ``script`` whole and byte by byte; assert the same bytes and events come out; return the whole run."""
        whole = stls_run(script, **kw)
        bytewise = stls_run(script, bytewise=True, **kw)
        self.assertEqual(whole[:2], bytewise[:2])
        self.assertEqual(tls_events(whole[2]), tls_events(bytewise[2]))
        return whole

    def terminate(self, script, **kw):
        """``both`` under tls = terminate, with the gateway's own backend STLS off."""
        return self.both(script, mode="terminate", backend_tls="off", **kw)

    def test_terminate_capa(self):
        """terminate: CAPA shows the gateway's STLS (the server's is dropped) until the client leg is TLS."""
        to_server, to_client, events = self.terminate(
            [("s", GREETING), ("c", b"CAPA\r\n"), ("s", CAPA), ("c", b"STLS\r\n"), ("c", b"CAPA\r\n"), ("s", CAPA)]
        )
        without = CAPA.replace(b"STLS\r\n", b"")
        self.assertEqual(to_client, GREETING + without[:-3] + b"STLS\r\n.\r\n"
                         + b"+OK Begin TLS negotiation\r\n" + without)
        self.assertEqual(to_server, b"CAPA\r\nCAPA\r\n")

    def test_terminate_stls(self):
        """terminate: the gateway answers STLS itself and starts TLS on the client leg; the server never sees it."""
        to_server, to_client, events = self.terminate([("s", GREETING), ("c", b"STLS\r\n")])
        self.assertEqual(to_server, b"")
        self.assertEqual(to_client, GREETING + b"+OK Begin TLS negotiation\r\n")
        self.assertEqual(tls_events(events), [StartTLS("client")])
        # The +OK is written before the handshake starts.
        self.assertLess(events.index(ToClient(b"+OK Begin TLS negotiation\r\n")), events.index(StartTLS("client")))

    def test_terminate_secure_login(self):
        """With secure-login, USER is refused before STLS and forwarded after it."""
        to_server, to_client, events = self.terminate(
            [("s", GREETING), ("c", b"USER bob\r\n"), ("c", b"STLS\r\n"), ("c", b"USER bob\r\n")], secure_login=True
        )
        self.assertEqual(to_server, b"USER bob\r\n")
        self.assertEqual(to_client, GREETING + b"-ERR [SYS/PERM] Login refused before TLS (secure-login)\r\n"
                         + b"+OK Begin TLS negotiation\r\n")

    def test_terminate_again(self):
        """A second STLS gets -ERR: TLS is already active."""
        to_server, to_client, events = self.terminate([("s", GREETING), ("c", b"STLS\r\n"), ("c", b"STLS\r\n")])
        self.assertEqual(to_client, GREETING + b"+OK Begin TLS negotiation\r\n-ERR TLS already active\r\n")
        self.assertEqual(tls_events(events), [StartTLS("client")])

    def test_stls_after_login(self):
        """STLS after a successful login is refused (RFC 2595: AUTHORIZATION state only)."""
        to_server, to_client, events = self.terminate(
            [("s", GREETING), ("c", b"USER bob\r\nPASS x\r\n"), ("s", b"+OK\r\n+OK in\r\n"), ("c", b"STLS\r\n")]
        )
        self.assertEqual(to_client, GREETING + b"+OK\r\n+OK in\r\n-ERR STLS not allowed after login\r\n")
        self.assertEqual(tls_events(events), [])

    def test_client_injection(self):
        """Commands pipelined after STLS are never executed: the session closes, nothing reaches the server."""
        for mode in ("terminate", "passthrough"):
            to_server, to_client, events = stls_run(
                [("s", GREETING), ("c", b"STLS\r\nUSER bob\r\nPASS x\r\n")], mode=mode, backend_tls="off"
            )
            self.assertEqual(to_server, b"")
            self.assertEqual(to_client, GREETING + b"-ERR Protocol error: data sent after STLS, closing connection\r\n")
            self.assertEqual(len(alerts(events, "STARTTLS_INJECTION")), 1)
            self.assertEqual(tls_events(events), [])
            self.assertIsInstance(events[-1], Close)

    def test_stls_pipelined_behind_command(self):
        """STLS sent before the previous response arrived closes the session (it must be alone)."""
        to_server, to_client, events = self.terminate([("s", GREETING), ("c", b"NOOP\r\nSTLS\r\n")])
        self.assertEqual(to_server, b"NOOP\r\n")
        self.assertEqual(tls_events(events), [])
        self.assertIsInstance(events[-1], Close)

    def gateway_leg(self, backend_tls, *server):
        """A terminate inspector whose server sends its greeting, then ``server``; return it and its events."""
        inspector = POP3Inspector(rule(tls="terminate", backend_tls=backend_tls))
        events = inspector.server_connected() + inspector.server_data(GREETING)
        for data in server:
            events += inspector.server_data(data)
        return inspector, events

    def test_backend_leg_secured(self):
        """terminate: the gateway sends STLS itself after the greeting and relays the greeting once that leg is TLS."""
        inspector, events = self.gateway_leg("opportunistic")
        self.assertEqual(events, [ToServer(b"STLS\r\n")])
        events = inspector.server_data(b"+OK Begin TLS\r\n")
        self.assertEqual(events, [StartTLS("server")])
        self.assertEqual(inspector.client_data(b"USER x\r\n")[0].tag, "PREGREET")
        inspector = self.gateway_leg("opportunistic", b"+OK Begin TLS\r\n")[0]
        self.assertEqual(inspector.server_tls_ready(), [ToClient(GREETING), Greeted()])
        self.assertEqual(inspector.client_data(b"USER bob\r\n"), [ToServer(b"USER bob\r\n")])

    def test_backend_without_stls(self):
        """opportunistic goes on in plaintext when the server refuses STLS; required closes the session."""
        inspector, events = self.gateway_leg("opportunistic", b"-ERR unknown command\r\n")
        self.assertEqual(events[1:], [ToClient(GREETING), Greeted()])
        inspector, events = self.gateway_leg("required", b"-ERR unknown command\r\n")
        self.assertEqual(alerts(events, "BACKEND_TLS_MISSING")[0].text, "mail server did not accept STLS")
        self.assertEqual(
            events[-2:],
            [ToClient(b"-ERR [SYS/TEMP] TLS required but not offered by the mail server, closing connection\r\n"),
             Close("backend TLS required")],
        )

    def test_backend_off(self):
        """backend-tls = off: no STLS to the server, the greeting is relayed at once."""
        inspector, events = self.gateway_leg("off")
        self.assertEqual(events, [ToClient(GREETING), Greeted()])

    def test_backend_injection(self):
        """Bytes the server sends after its +OK to the gateway's STLS are never relayed: the session closes."""
        inspector, events = self.gateway_leg("opportunistic", b"+OK Begin TLS\r\n+OK injected\r\n")
        self.assertEqual(len(alerts(events, "STARTTLS_INJECTION")), 1)
        self.assertEqual(tls_events(events), [])
        self.assertNotIn(b"injected", b"".join(e.data for e in events if type(e) is ToClient))
        self.assertEqual(events[-1], Close("server STLS injection"))

    def test_backend_lost_during_tls(self):
        """The server leaving while the gateway secures its leg gets the client a TLS failure, not a greeting."""
        inspector = self.gateway_leg("required", b"+OK Begin TLS\r\n")[0]
        self.assertEqual(
            inspector.server_lost(),
            [ToClient(b"-ERR [SYS/TEMP] TLS to the mail server failed, closing connection\r\n"),
             Close("backend TLS failed")],
        )

    def test_passthrough(self):
        """passthrough: CAPA keeps STLS, STLS is forwarded, and the server's +OK ends inspection both ways."""
        hello = b"\x16\x03\x01\x00\x05hello"  # whatever comes next is relayed blindly
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"CAPA\r\n"), ("s", CAPA), ("c", b"STLS\r\n"), ("s", b"+OK go\r\n"),
             ("c", hello + b"\r\nXTND\r\n"), ("s", b"\x17\x03\x03junk")],
            mode="passthrough",
        )
        self.assertEqual(to_server, b"CAPA\r\nSTLS\r\n" + hello + b"\r\nXTND\r\n")
        self.assertEqual(to_client, GREETING + CAPA + b"+OK go\r\n\x17\x03\x03junk")
        self.assertEqual(tls_events(events), [Passthrough()])
        self.assertEqual(len(alerts(events, "TLS_PASSTHROUGH")), 1)

    def test_implicit_tls(self):
        """On an implicit-TLS listener STLS is never offered, even under passthrough, and is refused."""
        for mode in ("terminate", "passthrough"):
            to_server, to_client, events = drive(POP3Inspector(rule(tls=mode, backend_tls="off")),
                                                 [("s", GREETING), ("c", b"CAPA\r\n"), ("s", CAPA), ("c", b"STLS\r\n")],
                                                 tls=True)
            self.assertEqual(to_server, b"CAPA\r\n")
            self.assertEqual(to_client, GREETING + CAPA.replace(b"STLS\r\n", b"") + b"-ERR TLS already active\r\n")

    def test_passthrough_refused(self):
        """passthrough: when the server refuses STLS, what the client sent meanwhile is inspected as commands."""
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"STLS\r\n"), ("c", b"NOOP\r\n"), ("s", b"-ERR no TLS\r\n+OK\r\n")],
            mode="passthrough",
        )
        self.assertEqual(to_server, b"STLS\r\nNOOP\r\n")
        self.assertEqual(to_client, GREETING + b"-ERR no TLS\r\n+OK\r\n")
        self.assertEqual(tls_events(events), [])

    def test_passthrough_client_injection(self):
        """passthrough: bytes the client sends before the server's +OK to STLS close the session, never relayed."""
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"STLS\r\n"), ("c", b"USER bob\r\n"), ("s", b"+OK go\r\n")],
            mode="passthrough",
        )
        self.assertEqual(to_server, b"STLS\r\n")
        self.assertEqual(to_client, GREETING + b"-ERR Protocol error: data sent after STLS, closing connection\r\n")
        self.assertEqual(tls_events(events), [])

    def test_passthrough_server_injection(self):
        """passthrough: bytes after the server's +OK to STLS are never relayed: the session closes."""
        to_server, to_client, events = stls_run(
            [("s", GREETING), ("c", b"STLS\r\n"), ("s", b"+OK go\r\n+OK injected\r\n")], mode="passthrough"
        )
        self.assertEqual(
            to_client, GREETING + b"-ERR [SYS/TEMP] Mail server sent data after STLS, closing connection\r\n")
        self.assertEqual(len(alerts(events, "STARTTLS_INJECTION")), 1)
        self.assertEqual(tls_events(events), [])


# -- end to end -------------------------------------------------------------------------

USER, PASSWORD = "bob", "secret"
MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\n.leading dot\r\nQUIT\r\nDELE 1\r\nlast line\r\n"
#: The message as the test server stores it (it sends each line with CRLF).
STORED = MESSAGE.replace(b"\r\n", b"\n")


class MemoryMailbox(pop3.Mailbox):
    """A POP3 mailbox of messages held in memory."""

    def __init__(self, messages):
        self.messages = list(messages)
        self.deleted = set()

    def listMessages(self, i=None):
        """Sizes, with 0 for deleted messages."""
        if i is None:
            return [0 if n in self.deleted else len(m) for n, m in enumerate(self.messages)]
        return 0 if i in self.deleted else len(self.messages[i])

    def getMessage(self, i):
        """The message as a file."""
        import io

        return io.BytesIO(self.messages[i])

    def getUidl(self, i):
        """A stable unique id."""
        return b"uid%d" % i

    def deleteMessage(self, i):
        """Mark for deletion."""
        self.deleted.add(i)


class RecordingPOP3(pop3.POP3):
    """Twisted's POP3 server, recording every byte it receives."""

    def dataReceived(self, data):
        """Record, then serve."""
        self.factory.received.append(data)
        super().dataReceived(data)

    def listCapabilities(self):
        """Also advertise STLS, as a TLS-capable server would."""
        return super().listCapabilities() + [b"STLS"]

    def connectionLost(self, reason):
        """Note the end of the connection."""
        super().connectionLost(reason)
        self.factory.open -= 1


class POP3Backend(protocol.ServerFactory):
    """Twisted's POP3 server on loopback, with one user and one message."""

    protocol = RecordingPOP3

    def __init__(self):
        self.received = []
        self.open = 0
        self.mailbox = MemoryMailbox([STORED])
        checker = checkers.InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser(USER.encode(), PASSWORD.encode())
        self.portal = portal.Portal(OneAvatarRealm(pop3.IMailbox, self.mailbox), [checker])

    def buildProtocol(self, addr):
        """A server protocol with the portal."""
        p = protocol.ServerFactory.buildProtocol(self, addr)
        p.portal = self.portal
        self.open += 1
        return p

    @property
    def data(self):
        """Everything the server received."""
        return b"".join(self.received)


class GatewayTests(TestCase):
    """poplib through the gateway to Twisted's POP3 server, on loopback."""

    timeout = 30

    def setUp(self):
        self.backend = POP3Backend()
        port = reactor.listenTCP(0, self.backend, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: wait_for(lambda: self.backend.open == 0))
        self.bport = port.getHost().port

    def gateway(self, **kw):
        """Start a gateway with a pop3 rule in front of the backend; return its port."""
        self.tracker, port = start_gateway(self, rule(**kw), self.bport)
        return port

    def client(self, port):
        """A poplib client of the gateway (10 s timeout), closed when the test ends."""
        c = poplib.POP3("127.0.0.1", port, timeout=10)
        self.addCleanup(c.close)
        return c

    @defer.inlineCallbacks
    def test_session(self):
        """Login, STAT, LIST, RETR, TOP, UIDL and QUIT work; the body arrives byte for byte."""
        port = self.gateway()

        def talk():
            c = self.client(port)
            c.user(USER)
            c.pass_(PASSWORD)
            stat = c.stat()
            listing = c.list()[1]
            retr = c.retr(1)[1]
            top = c.top(1, 0)[1]
            uidl = c.uidl()[1]
            c.quit()
            return stat, listing, retr, top, uidl

        stat, listing, retr, top, uidl = yield deferToThread(talk)
        self.assertEqual(stat, (1, len(STORED)))
        self.assertEqual(listing, [b"1 %d" % len(STORED)])
        self.assertEqual(b"\r\n".join(retr) + b"\r\n", MESSAGE)
        self.assertEqual(top[:2], [b"From: a@example.org", b"Subject: hi"])
        self.assertEqual(uidl, [b"1 uid0"])

    @defer.inlineCallbacks
    def test_apop(self):
        """APOP with the digest of the server's greeting reaches the server, and its answer comes back."""
        port = self.gateway()

        def talk():
            c = self.client(port)
            try:
                c.apop(USER, PASSWORD)
            except poplib.error_proto as e:
                # Twisted's APOPCredentials compare a str digest with bytes:
                # its server refuses every APOP on Python 3.
                answer = e.args[0]
            else:
                answer = b"+OK"
            c.quit()
            return answer, c.timestamp.match(c.welcome).group(1)

        answer, magic = yield deferToThread(talk)
        self.assertEqual(answer[:4], b"-ERR")
        digest = hashlib.md5(magic + PASSWORD.encode()).hexdigest().encode()
        yield wait_for(lambda: b"QUIT" in self.backend.data)
        self.assertIn(b"APOP bob " + digest + b"\r\n", self.backend.data)

    @defer.inlineCallbacks
    def test_illegal_command(self):
        """An illegal command gets the gateway's -ERR and never reaches the server."""
        port = self.gateway()

        def talk():
            c = self.client(port)
            c.user(USER)
            c.pass_(PASSWORD)
            try:
                c._shortcmd("XTND XMIT")
            except poplib.error_proto as e:
                error = e.args[0]
            c.noop()
            c.quit()
            return error

        error = yield deferToThread(talk)
        self.assertEqual(error, b"-ERR Command not allowed")
        yield wait_for(lambda: b"QUIT" in self.backend.data)
        self.assertNotIn(b"XTND", self.backend.data)
        self.assertIn(b"NOOP\r\n", self.backend.data)

    @defer.inlineCallbacks
    def test_stls_stripped(self):
        """CAPA through the gateway lacks STLS, and STLS is refused without reaching the server."""
        port = self.gateway()

        def talk():
            c = self.client(port)
            capa = c.capa()
            try:
                c._shortcmd("STLS")
            except poplib.error_proto as e:
                error = e.args[0]
            c.quit()
            return capa, error

        capa, error = yield deferToThread(talk)
        self.assertNotIn("STLS", capa)
        self.assertIn("USER", capa)
        self.assertEqual(error, b"-ERR TLS not available")
        yield wait_for(lambda: b"QUIT" in self.backend.data)
        self.assertNotIn(b"STLS", self.backend.data)

    @defer.inlineCallbacks
    def test_secure_login(self):
        """With secure-login, USER and APOP are refused by the gateway; the server never sees them."""
        port = self.gateway(secure_login=True)

        def talk():
            c = self.client(port)
            errors = []
            for login in (lambda: c.user(USER), lambda: c.apop(USER, PASSWORD)):
                try:
                    login()
                except poplib.error_proto as e:
                    errors.append(e.args[0])
            capa = c.capa()
            c.quit()
            return errors, capa

        errors, capa = yield deferToThread(talk)
        self.assertEqual(errors, [b"-ERR [SYS/PERM] Login refused before TLS (secure-login)"] * 2)
        self.assertNotIn("USER", capa)
        yield wait_for(lambda: b"QUIT" in self.backend.data)
        self.assertNotIn(b"USER", self.backend.data)
        self.assertNotIn(b"APOP", self.backend.data)

    @defer.inlineCallbacks
    def test_one_byte_per_packet(self):
        """A client writing one byte per packet, pipelining, still gets its responses in order."""
        port = self.gateway()

        def talk():
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            self.addCleanup(sock.close)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            f = sock.makefile("rb")
            f.readline()
            for byte in b"USER bob\r\nPASS secret\r\nXTND\r\nSTAT\r\nQUIT\r\n":
                sock.send(bytes([byte]))
            lines = [f.readline() for _ in range(5)]
            f.close()
            sock.close()
            return lines

        lines = yield deferToThread(talk)
        self.assertEqual([l[:3] for l in lines], [b"+OK", b"+OK", b"-ER", b"+OK", b"+OK"])
        self.assertEqual(lines[2], b"-ERR Command not allowed\r\n")
        self.assertEqual(lines[3], b"+OK 1 %d\r\n" % len(STORED))
