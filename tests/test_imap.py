"""IMAP inspection: the framer and the sans-IO core, and imaplib through the gateway to Twisted's IMAP server."""

import imaplib
import io
import os
import socket
from types import MappingProxyType

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred import checkers, portal
from twisted.internet import defer, protocol, reactor
from twisted.internet.threads import deferToThread
from twisted.mail import imap4
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailguard.events import AbortServer, Alert, Close, Greeted, Passthrough, StartTLS, ToClient, ToServer
from mailguard.imap import COMMANDS, IMAPInspector
from mailguard.interfaces import IInspector
from mailguard.policy import Rule
from tests.clients import wait_for
from tests.harness import OneAvatarRealm, drive, start_gateway

GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ STARTTLS AUTH=PLAIN IDLE] ready\r\n"
PLAIN_GREETING = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n"


#: (tls, backend-tls) pairs the property test runs under.
TLS_MODES = [("strip", "off"), ("terminate", "off"), ("terminate", "opportunistic"),
             ("terminate", "required"), ("passthrough", "off")]


def rule(secure_login=False, **kw):
    """An imap rule as the policy would build it."""
    return Rule(name="R", protocol="imap", options=MappingProxyType({"secure-login": secure_login}), **kw)


def run(script, bytewise=False, tls=False, **kw):
    """Feed a dialogue to a fresh inspector; return (to_server, to_client, events)."""
    return drive(IMAPInspector(rule(**kw)), script, bytewise, tls)


def alerts(events, tag="IMAP_INVALID_COMMAND"):
    """The alerts with ``tag`` among ``events``."""
    return [e for e in events if type(e) is Alert and e.tag == tag]


class CoreTests(SynchronousTestCase):
    """The sans-IO IMAP inspector, fed whole and byte by byte."""

    def both(self, script, **kw):
        """Run ``script`` whole and byte by byte; assert the same bytes come out; return the whole run."""
        whole = run(script, **kw)
        bytewise = run(script, bytewise=True, **kw)
        self.assertEqual(whole[:2], bytewise[:2])
        self.assertEqual(alerts(whole[2]), alerts(bytewise[2]))
        return whole

    def test_interface(self):
        """The inspector provides IInspector."""
        self.assertTrue(verifyObject(IInspector, IMAPInspector(rule())))

    def test_greeting(self):
        """The greeting opens the session, with STARTTLS removed from its capabilities."""
        to_server, to_client, events = self.both([("s", GREETING)])
        self.assertEqual(to_client, b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN IDLE] ready\r\n")
        self.assertIn(Greeted(), events)

    def test_allowlist(self):
        """The allowlist is RFC 9051's commands plus IMAP4rev1's CHECK and LSUB."""
        self.assertIn(b"APPEND", COMMANDS)
        self.assertIn(b"LSUB", COMMANDS)
        self.assertNotIn(b"XLIST", COMMANDS)
        self.assertNotIn(b"GETQUOTA", COMMANDS)

    def test_session(self):
        """A session's commands and responses, server literals included, pass unchanged."""
        client = b"a1 LOGIN bob secret\r\na2 SELECT INBOX\r\na3 UID FETCH 1:* (FLAGS BODY[])\r\na4 LOGOUT\r\n"
        server = (
            b"a1 OK LOGIN done\r\n* 1 EXISTS\r\na2 OK [READ-WRITE] SELECT done\r\n"
            b"* 1 FETCH (UID 7 FLAGS () BODY[] {22}\r\na5 OK not a response\r\n)\r\na3 OK FETCH done\r\n"
            b"* BYE bye\r\na4 OK LOGOUT done\r\n"
        )
        to_server, to_client, events = self.both([("s", PLAIN_GREETING), ("c", client), ("s", server)])
        self.assertEqual(to_server, client)
        self.assertEqual(to_client, PLAIN_GREETING + server)
        self.assertEqual(alerts(events, "IMAP_INVALID_RESPONSE"), [])

    def test_illegal_command(self):
        """A command outside the allowlist gets "tag BAD" from the gateway and is not forwarded."""
        to_server, to_client, events = self.both(
            [("s", PLAIN_GREETING), ("c", b"a1 XLIST \"\" *\r\na2 UID XFOO 1\r\na3 NOOP\r\n"), ("s", b"a3 OK\r\n")]
        )
        self.assertEqual(to_server, b"a3 NOOP\r\n")
        self.assertEqual(
            to_client,
            PLAIN_GREETING + b"a1 BAD Command not allowed\r\na2 BAD Command not allowed\r\na3 OK\r\n",
        )
        self.assertEqual([a.fields["verb"] for a in alerts(events)], ["XLIST", "UID XFOO"])

    def test_pipelined_order(self):
        """The gateway's own BAD waits until the server completed the commands before it."""
        to_server, to_client, events = self.both(
            [("s", PLAIN_GREETING), ("c", b"a1 NOOP\r\na2 XFOO\r\na3 NOOP\r\n"), ("s", b"a1 OK one\r\na3 OK three\r\n")]
        )
        self.assertEqual(
            to_client, PLAIN_GREETING + b"a1 OK one\r\na2 BAD Command not allowed\r\na3 OK three\r\n"
        )

    def test_out_of_order_completion(self):
        """A server completing a later command first is relayed; the gateway's reply still waits for the earlier one."""
        to_server, to_client, events = self.both(
            [("s", PLAIN_GREETING), ("c", b"a1 NOOP\r\na2 XFOO\r\na3 NOOP\r\n"), ("s", b"a3 OK three\r\na1 OK one\r\n")]
        )
        self.assertEqual(
            to_client, PLAIN_GREETING + b"a3 OK three\r\na1 OK one\r\na2 BAD Command not allowed\r\n"
        )

    def test_malformed(self):
        """Lines without a valid tag or command get an untagged or tagged BAD."""
        to_server, to_client, events = self.both(
            [("s", PLAIN_GREETING), ("c", b"\r\n+x NOOP\r\nnotag\r\na1 NOOP\0\r\n")]
        )
        self.assertEqual(to_server, b"")
        self.assertEqual(
            to_client,
            PLAIN_GREETING
            + b"* BAD Invalid or missing tag\r\n" * 2
            + b"notag BAD Invalid command\r\na1 BAD Invalid command\r\n",
        )

    def test_sync_literal(self):
        """A synchronizing literal is held back until the server's "+", then passed as data."""
        literal = b"a9 LOGOUT\r\nz DELETE INBOX\r\n"
        to_server, to_client, events = self.both(
            [
                ("s", PLAIN_GREETING),
                ("c", b"a1 APPEND INBOX {%d}\r\n" % len(literal)),
                ("s", b"+ Ready\r\n"),
                ("c", literal + b"\r\na2 NOOP\r\n"),
                ("s", b"a1 OK APPEND done\r\na2 OK\r\n"),
            ]
        )
        self.assertEqual(to_server, b"a1 APPEND INBOX {%d}\r\n" % len(literal) + literal + b"\r\na2 NOOP\r\n")
        self.assertEqual(alerts(events), [])

    def test_sync_literal_early(self):
        """Literal octets sent before the server's "+" are held, then passed as data."""
        literal = b"x1 XFOO\r\n"
        to_server, to_client, events = self.both(
            [
                ("s", PLAIN_GREETING),
                ("c", b"a1 APPEND INBOX {%d}\r\n" % len(literal) + literal + b"\r\n"),
                ("s", b"+ go\r\n"),
            ]
        )
        self.assertEqual(to_server, b"a1 APPEND INBOX {9}\r\n" + literal + b"\r\n")
        self.assertEqual(alerts(events), [])

    def test_sync_literal_refused(self):
        """When the server refuses a command instead of "+", the next client line is a command again."""
        to_server, to_client, events = self.both(
            [
                ("s", PLAIN_GREETING),
                ("c", b"a1 APPEND NOSUCH {5}\r\n"),
                ("s", b"a1 NO [TRYCREATE] no mailbox\r\n"),
                ("c", b"a2 XFOO\r\n"),
            ]
        )
        self.assertEqual(to_server, b"a1 APPEND NOSUCH {5}\r\n")
        self.assertEqual(to_client, PLAIN_GREETING + b"a1 NO [TRYCREATE] no mailbox\r\na2 BAD Command not allowed\r\n")

    def test_literal_plus(self):
        """With LITERAL+, {n+} octets follow at once and pass as data, however they are split."""
        literal = b"b1 LOGOUT\r\n"
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"a1 LOGIN {3+}\r\nbob {%d+}\r\n" % len(literal) + literal + b"\r\na2 NOOP\r\n")]
        )
        self.assertEqual(to_server, b"a1 LOGIN {3+}\r\nbob {11+}\r\n" + literal + b"\r\na2 NOOP\r\n")
        self.assertEqual(alerts(events), [])

    def test_literal_plus_unsupported(self):
        """Without LITERAL+ a {n+} command is refused and its octets are dropped, not run as commands."""
        to_server, to_client, events = self.both(
            [("s", PLAIN_GREETING), ("c", b"a1 APPEND INBOX {12+}\r\nz DELETE x\r\n\r\na2 NOOP\r\n")]
        )
        self.assertEqual(to_server, b"a2 NOOP\r\n")
        refusal = b"a1 BAD Non-synchronizing literal not supported by the server\r\n"
        self.assertEqual(to_client, PLAIN_GREETING + refusal)

    def test_literal_minus(self):
        """LITERAL- (and IMAP4rev2) allow {n+} only up to 4096 octets."""
        greeting = b"* OK [CAPABILITY IMAP4rev2] hi\r\n"
        fits = b"a1 APPEND INBOX {4096+}\r\n" + b"x" * 4096 + b"\r\n"
        to_server, to_client, events = run([("s", greeting), ("c", fits)])
        self.assertEqual(to_server, fits)
        too_big = b"a1 APPEND INBOX {4097+}\r\n" + b"x" * 4097 + b"\r\n"
        to_server, to_client, events = run([("s", greeting), ("c", too_big)])
        self.assertEqual(to_server, b"")

    def test_illegal_with_literal(self):
        """An illegal command's non-synchronizing literal is consumed as data, then commands resume."""
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"a1 XFOO {10+}\r\na2 NOOP\r\n \r\na3 NOOP\r\n")]
        )
        self.assertEqual(to_server, b"a3 NOOP\r\n")
        self.assertEqual(len(alerts(events)), 1)

    def test_illegal_with_sync_literal(self):
        """An illegal command with {n} is refused at once; the client never sends the octets."""
        to_server, to_client, events = self.both([("s", GREETING), ("c", b"a1 XFOO {10}\r\na2 NOOP\r\n")])
        self.assertEqual(to_server, b"a2 NOOP\r\n")
        self.assertEqual(to_client, GREETING.replace(b" STARTTLS", b"") + b"a1 BAD Command not allowed\r\n")

    def test_starttls(self):
        """STARTTLS is answered NO by the gateway and never forwarded."""
        to_server, to_client, events = self.both([("s", GREETING), ("c", b"a1 STARTTLS\r\n")])
        self.assertEqual(to_server, b"")
        self.assertTrue(to_client.endswith(b"a1 NO TLS not available\r\n"))

    def test_capability(self):
        """CAPABILITY responses and codes lose STARTTLS; secure-login swaps AUTH= for LOGINDISABLED."""
        script = [
            ("s", GREETING),
            ("c", b"a1 CAPABILITY\r\n"),
            ("s", b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN LOGIN-REFERRALS\r\na1 OK done\r\n"),
        ]
        to_server, to_client, events = self.both(script)
        self.assertIn(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN LOGIN-REFERRALS\r\n", to_client)
        to_server, to_client, events = self.both(script, secure_login=True)
        self.assertIn(b"* CAPABILITY IMAP4rev1 LOGIN-REFERRALS LOGINDISABLED\r\n", to_client)
        self.assertTrue(to_client.startswith(b"* OK [CAPABILITY IMAP4rev1 LITERAL+ IDLE LOGINDISABLED] ready\r\n"))

    def test_secure_login(self):
        """secure-login refuses LOGIN and AUTHENTICATE before TLS with NO [PRIVACYREQUIRED]."""
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"a1 LOGIN bob secret\r\na2 AUTHENTICATE PLAIN\r\na3 LOGIN {3+}\r\nbob x\r\n")],
            secure_login=True,
        )
        self.assertEqual(to_server, b"")
        refusal = b" NO [PRIVACYREQUIRED] Login refused before TLS (secure-login)\r\n"
        self.assertTrue(to_client.endswith(b"a1" + refusal + b"a2" + refusal + b"a3" + refusal))
        self.assertEqual(len(alerts(events)), 3)

    def test_secure_login_tls(self):
        """On a TLS client leg secure-login lets LOGIN through."""
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"a1 LOGIN bob secret\r\n")], secure_login=True, tls=True
        )
        self.assertEqual(to_server, b"a1 LOGIN bob secret\r\n")

    def test_authenticate(self):
        """AUTHENTICATE's responses to "+" are SASL data, however they look."""
        to_server, to_client, events = self.both(
            [
                ("s", GREETING),
                ("c", b"a1 AUTHENTICATE PLAIN\r\n"),
                ("s", b"+ \r\n"),
                ("c", b"XFOO\r\n"),
                ("s", b"a1 OK [CAPABILITY IMAP4rev1 STARTTLS] authenticated\r\n"),
                ("c", b"XFOO\r\n"),
            ]
        )
        self.assertEqual(to_server, b"a1 AUTHENTICATE PLAIN\r\nXFOO\r\n")
        self.assertTrue(
            to_client.endswith(b"+ \r\na1 OK [CAPABILITY IMAP4rev1] authenticated\r\nXFOO BAD Invalid command\r\n")
        )

    def test_authenticate_invalid(self):
        """An invalid SASL response is replaced by "*", which cancels the exchange."""
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"a1 AUTHENTICATE PLAIN\r\n"), ("s", b"+ \r\n"), ("c", b"a2 LOGOUT\r\n")]
        )
        self.assertEqual(to_server, b"a1 AUTHENTICATE PLAIN\r\n*\r\n")

    def test_idle(self):
        """IDLE: the server's updates flow, DONE ends it, and commands resume."""
        to_server, to_client, events = self.both(
            [
                ("s", GREETING),
                ("c", b"a1 IDLE\r\n"),
                ("s", b"+ idling\r\n* 2 EXISTS\r\n"),
                ("c", b"DONE\r\na2 NOOP\r\n"),
                ("s", b"a1 OK IDLE done\r\na2 OK\r\n"),
            ]
        )
        self.assertEqual(to_server, b"a1 IDLE\r\nDONE\r\na2 NOOP\r\n")
        self.assertEqual(alerts(events), [])

    def test_idle_not_done(self):
        """A command instead of DONE ends the IDLE for the client and is inspected as a command."""
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"a1 IDLE\r\n"), ("s", b"+ idling\r\n"), ("c", b"a2 XFOO\r\n")]
        )
        self.assertEqual(to_server, b"a1 IDLE\r\nDONE\r\n")
        self.assertEqual(len(alerts(events)), 2)

    def test_line_too_long(self):
        """A command line over 8 KB gets "tag BAD" and is never forwarded."""
        to_server, to_client, events = run([("s", GREETING), ("c", b"a1 SEARCH " + b"x" * 9000 + b"\r\na2 NOOP\r\n")])
        self.assertEqual(to_server, b"a2 NOOP\r\n")
        self.assertIn(b"a1 BAD Line too long\r\n", to_client)

    def test_long_line_with_literal(self):
        """An over-long refused line ending in {n+} still has its octets consumed as data."""
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"a1 SEARCH " + b"x" * 9000 + b" {9+}\r\na2 XFOO\r\n\r\na3 NOOP\r\n")]
        )
        self.assertEqual(to_server, b"a3 NOOP\r\n")
        self.assertEqual(len(alerts(events)), 1)

    def test_long_server_response(self):
        """A long untagged response (a big SEARCH) is streamed through, not refused."""
        search = b"* SEARCH" + b" 12345" * 3000 + b"\r\n"
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"a1 SEARCH ALL\r\n"), ("s", search + b"a1 OK\r\n")]
        )
        self.assertTrue(to_client.endswith(search + b"a1 OK\r\n"))

    def test_too_many_errors(self):
        """The refused command that reaches max-bad-commands closes the session with BYE."""
        to_server, to_client, events = run([("s", GREETING), ("c", b"a XFOO\r\n" * 2)], max_bad_commands=2)
        self.assertTrue(to_client.endswith(b"a BAD Command not allowed\r\n* BYE Too many errors, closing connection\r\n"))
        self.assertIsInstance(events[-1], Close)

    def test_pregreet(self):
        """A client talking before the greeting is refused (pregreet = reject)."""
        to_server, to_client, events = run([("c", b"a1 NOOP\r\n")])
        self.assertEqual(to_client, b"* BYE Protocol error: data sent before greeting\r\n")
        self.assertIsInstance(events[-1], Close)

    def test_invalid_responses(self):
        """An unknown tag, an unexpected "+" or garbage from the server closes the session."""
        for server in (b"zz OK\r\n", b"+ go\r\n", b"250 hello\r\n"):
            to_server, to_client, events = run([("s", GREETING), ("c", b"a1 NOOP\r\n"), ("s", server)])
            self.assertEqual(len(alerts(events, "IMAP_INVALID_RESPONSE")), 1, server)
            self.assertIsInstance(events[-1], Close)

    def test_client_lost_mid_literal(self):
        """A client gone in the middle of an APPEND literal aborts the backend leg."""
        inspector = IMAPInspector(rule())
        inspector.server_data(GREETING)
        inspector.client_data(b"a1 APPEND INBOX {100+}\r\nhalf")
        self.assertTrue(inspector.in_message())
        self.assertEqual(inspector.client_lost(), [AbortServer("client lost mid-command")])

    def test_server_lost(self):
        """A backend gone without BYE gets the client an untagged BYE."""
        inspector = IMAPInspector(rule())
        inspector.server_data(GREETING)
        self.assertEqual(inspector.server_lost()[0], ToClient(b"* BYE Connection to the mail server lost\r\n"))
        inspector = IMAPInspector(rule())
        inspector.server_data(GREETING)
        inspector.client_data(b"a1 LOGOUT\r\n")
        inspector.server_data(b"* BYE bye\r\na1 OK\r\n")
        self.assertEqual(inspector.server_lost(), [Close("server closed")])

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from("cs"),
                st.lists(
                    st.sampled_from(
                        [b"a1 ", b"NOOP", b"APPEND x ", b"LOGIN ", b"IDLE", b"DONE", b"AUTHENTICATE PLAIN",
                         b"{3}", b"{3+}", b"~{0}", b"\r\n", b"\n", b"\0", b"+ go", b"* 1 FETCH ", b"a1 OK",
                         b"* CAPABILITY LITERAL+", b"* BYE", b"x" * 40, b"STARTTLS", b"mg0 OK", b"a1 NO"]
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
        inspector = IMAPInspector(rule(secure, max_bad_commands=5, tls=tls[0], backend_tls=tls[1]))
        inspector.server_connected()
        inspector.server_data(GREETING)
        for side, data in script:
            events = (inspector.client_data if side == "c" else inspector.server_data)(data)
            self.assertIsInstance(events, list)
            inspector.in_message()
        inspector.server_lost()
        inspector.client_lost()


INJECTION_BYE = b"* BYE Protocol error: data sent after STARTTLS, closing connection\r\n"


def stls_run(script, bytewise=False, mode="strip", **kw):
    """Feed a dialogue to a fresh inspector under ``tls = mode``; return (to_server, to_client, events)."""
    return drive(IMAPInspector(rule(tls=mode, **kw)), script, bytewise)


def tls_events(events):
    """The StartTLS and Passthrough events among ``events``."""
    return [e for e in events if type(e) in (StartTLS, Passthrough)]


def client_bytes(events):
    """What ``events`` send to the client."""
    return b"".join(e.data for e in events if type(e) is ToClient)


class STARTTLSTests(SynchronousTestCase):
    """STARTTLS under tls = terminate and passthrough, and the injection defence both ways (RFC 2595, RFC 9051)."""

    def both(self, script, **kw):
        """Run ``script`` whole and byte by byte; assert the same bytes and events come out; return the whole run."""
        whole = stls_run(script, **kw)
        bytewise = stls_run(script, bytewise=True, **kw)
        self.assertEqual(whole[:2], bytewise[:2])
        self.assertEqual(tls_events(whole[2]), tls_events(bytewise[2]))
        return whole

    def terminate(self, script, **kw):
        """``both`` under tls = terminate, with the gateway's own backend STARTTLS off."""
        return self.both(script, mode="terminate", backend_tls="off", **kw)

    def test_terminate_capabilities(self):
        """terminate: STARTTLS is the gateway's own in every capability list until the client leg is TLS."""
        to_server, to_client, events = self.terminate(
            [("s", PLAIN_GREETING), ("c", b"a1 STARTTLS\r\n"), ("c", b"a2 CAPABILITY\r\n"),
             ("s", b"* CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN\r\na2 OK done\r\n")]
        )
        self.assertEqual(
            to_client,
            b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN STARTTLS] ready\r\na1 OK Begin TLS negotiation now\r\n"
            b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\na2 OK done\r\n",
        )
        self.assertEqual(to_server, b"a2 CAPABILITY\r\n")

    def test_terminate_starttls(self):
        """terminate: the gateway answers STARTTLS itself and starts TLS on the client leg; the server never sees it."""
        to_server, to_client, events = self.terminate([("s", GREETING), ("c", b"a1 STARTTLS\r\n")])
        self.assertEqual(to_server, b"")
        self.assertTrue(to_client.endswith(b"] ready\r\na1 OK Begin TLS negotiation now\r\n"))
        self.assertEqual(tls_events(events), [StartTLS("client")])
        ok = ToClient(b"a1 OK Begin TLS negotiation now\r\n")
        self.assertLess(events.index(ok), events.index(StartTLS("client")))

    def test_terminate_forgets_capabilities(self):
        """After STARTTLS the LITERAL+ learned before is forgotten until the capabilities are read again."""
        append = b"a2 APPEND INBOX {3+}\r\nabc\r\n"
        to_server, to_client, events = self.terminate(
            [("s", GREETING), ("c", b"a1 STARTTLS\r\n"), ("c", append), ("c", b"a3 CAPABILITY\r\n"),
             ("s", b"* CAPABILITY IMAP4rev1 LITERAL+\r\na3 OK\r\n"), ("c", append)]
        )
        self.assertIn(b"a2 BAD Non-synchronizing literal not supported by the server\r\n", to_client)
        self.assertEqual(to_server, b"a3 CAPABILITY\r\n" + append)

    def test_terminate_secure_login(self):
        """With secure-login, LOGIN is refused before STARTTLS and forwarded after it."""
        to_server, to_client, events = self.terminate(
            [("s", GREETING), ("c", b"a1 LOGIN bob x\r\n"), ("c", b"a2 STARTTLS\r\n"), ("c", b"a3 LOGIN bob x\r\n")],
            secure_login=True,
        )
        self.assertEqual(to_server, b"a3 LOGIN bob x\r\n")
        self.assertIn(b"LOGINDISABLED", to_client)
        self.assertIn(b"a1 NO [PRIVACYREQUIRED]", to_client)

    def test_terminate_again(self):
        """A second STARTTLS gets BAD: TLS is already active."""
        to_server, to_client, events = self.terminate(
            [("s", GREETING), ("c", b"a1 STARTTLS\r\n"), ("c", b"a2 STARTTLS\r\n")])
        self.assertTrue(to_client.endswith(b"a1 OK Begin TLS negotiation now\r\na2 BAD TLS already active\r\n"))
        self.assertEqual(tls_events(events), [StartTLS("client")])

    def test_starttls_after_login(self):
        """STARTTLS after a successful LOGIN, or after a PREAUTH greeting, is refused."""
        to_server, to_client, events = self.terminate(
            [("s", GREETING), ("c", b"a1 LOGIN bob x\r\n"), ("s", b"a1 OK in\r\n"), ("c", b"a2 STARTTLS\r\n")])
        self.assertTrue(to_client.endswith(b"a1 OK in\r\na2 BAD STARTTLS not allowed after login\r\n"))
        to_server, to_client, events = self.terminate([("s", b"* PREAUTH hi\r\n"), ("c", b"a1 STARTTLS\r\n")])
        self.assertEqual(to_client, b"* PREAUTH hi\r\na1 BAD STARTTLS not allowed after login\r\n")
        self.assertEqual(tls_events(events), [])

    def test_starttls_argument(self):
        """STARTTLS with an argument is an invalid command."""
        to_server, to_client, events = self.terminate([("s", GREETING), ("c", b"a1 STARTTLS now\r\n")])
        self.assertTrue(to_client.endswith(b"a1 BAD Invalid command\r\n"))
        self.assertEqual(tls_events(events), [])

    def test_client_injection(self):
        """Commands pipelined after STARTTLS are never executed: the session closes, nothing reaches the server."""
        for mode in ("terminate", "passthrough"):
            to_server, to_client, events = stls_run(
                [("s", GREETING), ("c", b"a1 STARTTLS\r\na2 LOGIN bob x\r\n")], mode=mode, backend_tls="off")
            self.assertEqual(to_server, b"")
            self.assertTrue(to_client.endswith(INJECTION_BYE))
            self.assertEqual(len(alerts(events, "STARTTLS_INJECTION")), 1)
            self.assertEqual(tls_events(events), [])
            self.assertIsInstance(events[-1], Close)

    def test_starttls_pipelined_behind_command(self):
        """STARTTLS sent while another command is in progress closes the session."""
        to_server, to_client, events = self.terminate([("s", GREETING), ("c", b"a1 NOOP\r\na2 STARTTLS\r\n")])
        self.assertEqual(to_server, b"a1 NOOP\r\n")
        self.assertEqual(tls_events(events), [])
        self.assertIsInstance(events[-1], Close)

    def gateway_leg(self, backend_tls, greeting, *server):
        """A terminate inspector whose server sends ``greeting``, then ``server``; return it and its events."""
        inspector = IMAPInspector(rule(tls="terminate", backend_tls=backend_tls))
        events = inspector.server_connected() + inspector.server_data(greeting)
        for data in server:
            events += inspector.server_data(data)
        return inspector, events

    def test_backend_leg_secured(self):
        """terminate: the gateway sends STARTTLS itself, then relays the greeting without its stale capabilities."""
        inspector, events = self.gateway_leg("opportunistic", GREETING)
        self.assertEqual(events, [ToServer(b"mg0 STARTTLS\r\n")])
        events = inspector.server_data(b"* CAPABILITY IMAP4rev1 STARTTLS\r\nmg0 OK Begin TLS now\r\n")
        self.assertEqual(events, [StartTLS("server")])
        self.assertEqual(inspector.server_tls_ready(), [ToClient(b"* OK ready\r\n"), Greeted()])
        # LITERAL+ of the plaintext greeting is not trusted.
        events = inspector.client_data(b"a1 APPEND INBOX {3+}\r\nabc\r\n")
        self.assertEqual(client_bytes(events), b"a1 BAD Non-synchronizing literal not supported by the server\r\n")

    def test_backend_without_starttls(self):
        """A greeting without STARTTLS, or a refused STARTTLS: plaintext when opportunistic, closed when required."""
        plain = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN STARTTLS] ready\r\n"
        refused = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN IDLE STARTTLS] ready\r\n"
        missing = b"* BYE [UNAVAILABLE] TLS required but not offered by the mail server, closing connection\r\n"
        for server, relayed in [((PLAIN_GREETING,), plain), ((GREETING, b"mg0 BAD unknown command\r\n"), refused)]:
            inspector, events = self.gateway_leg("opportunistic", *server)
            self.assertEqual(events[-2:], [ToClient(relayed), Greeted()])
            inspector, events = self.gateway_leg("required", *server)
            self.assertEqual(len(alerts(events, "BACKEND_TLS_MISSING")), 1)
            self.assertEqual(events[-2:], [ToClient(missing), Close("backend TLS required")])

    def test_backend_preauth(self):
        """A PREAUTH greeting allows no STARTTLS: required closes, opportunistic relays it."""
        inspector, events = self.gateway_leg("required", b"* PREAUTH hi\r\n")
        self.assertEqual(events[-1], Close("backend TLS required"))
        inspector, events = self.gateway_leg("opportunistic", b"* PREAUTH hi\r\n")
        self.assertEqual(events, [ToClient(b"* PREAUTH hi\r\n"), Greeted()])

    def test_backend_injection(self):
        """Bytes the server sends after its OK to the gateway's STARTTLS are never relayed: the session closes."""
        inspector, events = self.gateway_leg("opportunistic", GREETING, b"mg0 OK go\r\n* OK injected\r\n")
        self.assertEqual(len(alerts(events, "STARTTLS_INJECTION")), 1)
        self.assertEqual(tls_events(events), [])
        self.assertNotIn(b"injected", client_bytes(events))
        self.assertEqual(events[-1], Close("server STARTTLS injection"))

    def test_backend_lost_during_tls(self):
        """The server leaving while the gateway secures its leg gets the client a TLS failure, not a greeting."""
        inspector = self.gateway_leg("required", GREETING, b"mg0 OK go\r\n")[0]
        self.assertEqual(inspector.server_lost(), [
            ToClient(b"* BYE [UNAVAILABLE] TLS to the mail server failed, closing connection\r\n"),
            Close("backend TLS failed")])

    def test_passthrough(self):
        """passthrough: capabilities keep STARTTLS, STARTTLS is forwarded, the server's OK ends inspection."""
        hello = b"\x16\x03\x01\x00\x05hello"
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"a1 STARTTLS\r\n"), ("s", b"a1 OK go\r\n"),
             ("c", hello + b"\r\nxx XFOO\r\n"), ("s", b"\x17\x03\x03junk")],
            mode="passthrough",
        )
        self.assertEqual(to_server, b"a1 STARTTLS\r\n" + hello + b"\r\nxx XFOO\r\n")
        self.assertEqual(to_client, GREETING + b"a1 OK go\r\n\x17\x03\x03junk")
        self.assertEqual(tls_events(events), [Passthrough()])
        self.assertEqual(len(alerts(events, "TLS_PASSTHROUGH")), 1)

    def test_implicit_tls(self):
        """On an implicit-TLS listener STARTTLS is never offered, even under passthrough, and is refused."""
        for mode in ("terminate", "passthrough"):
            to_server, to_client, events = drive(IMAPInspector(rule(tls=mode, backend_tls="off")),
                                                 [("s", GREETING), ("c", b"a1 STARTTLS\r\n")], tls=True)
            self.assertEqual(to_server, b"")
            self.assertEqual(to_client, b"* OK [CAPABILITY IMAP4rev1 LITERAL+ AUTH=PLAIN IDLE] ready\r\n"
                                        b"a1 BAD TLS already active\r\n")

    def test_passthrough_refused(self):
        """passthrough: when the server refuses STARTTLS, what the client sent meanwhile is inspected as commands."""
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"a1 STARTTLS\r\n"), ("c", b"a2 NOOP\r\n"), ("s", b"a1 NO not now\r\na2 OK\r\n")],
            mode="passthrough",
        )
        self.assertEqual(to_server, b"a1 STARTTLS\r\na2 NOOP\r\n")
        self.assertEqual(to_client, GREETING + b"a1 NO not now\r\na2 OK\r\n")
        self.assertEqual(tls_events(events), [])

    def test_passthrough_client_injection(self):
        """passthrough: bytes the client sends before the server's OK to STARTTLS close the session, never relayed."""
        to_server, to_client, events = self.both(
            [("s", GREETING), ("c", b"a1 STARTTLS\r\n"), ("c", b"a2 LOGIN bob x\r\n"), ("s", b"a1 OK go\r\n")],
            mode="passthrough",
        )
        self.assertEqual(to_server, b"a1 STARTTLS\r\n")
        self.assertEqual(to_client, GREETING + INJECTION_BYE)
        self.assertEqual(tls_events(events), [])

    def test_passthrough_server_injection(self):
        """passthrough: bytes after the server's OK to STARTTLS are never relayed: the session closes."""
        to_server, to_client, events = stls_run(
            [("s", GREETING), ("c", b"a1 STARTTLS\r\n"), ("s", b"a1 OK go\r\n* OK injected\r\n")], mode="passthrough")
        self.assertEqual(
            to_client, GREETING + b"* BYE [UNAVAILABLE] Mail server sent data after STARTTLS, closing connection\r\n")
        self.assertEqual(len(alerts(events, "STARTTLS_INJECTION")), 1)
        self.assertEqual(tls_events(events), [])


# -- end to end -------------------------------------------------------------------------

USER, PASSWORD = "bob", "secret"


@implementer(imap4.IMessage, imap4.IMessageFile)
class MemoryMessage:
    """One stored message."""

    def __init__(self, raw, uid):
        self.raw = raw
        self.uid = uid

    def open(self):
        """The whole message."""
        return io.BytesIO(self.raw)

    def getHeaders(self, negate, *names):
        """No header parsing is needed by these tests."""
        return {}

    def getBodyFile(self):
        """The whole message."""
        return io.BytesIO(self.raw)

    def getSize(self):
        """Its size in octets."""
        return len(self.raw)

    def isMultipart(self):
        """Never."""
        return False

    def getSubPart(self, part):
        """There are none."""
        raise TypeError(part)

    def getUID(self):
        """Its UID."""
        return self.uid

    def getFlags(self):
        """No flags."""
        return []

    def getInternalDate(self):
        """A fixed date."""
        return "Mon, 1 Jan 2024 00:00:00 +0000"


@implementer(imap4.IMailbox)
class MemoryMailbox:
    """An IMAP mailbox held in memory."""

    def __init__(self):
        self.messages = []
        self.listeners = []

    def getFlags(self):
        """The flags it knows."""
        return ["\\Seen", "\\Deleted"]

    def getHierarchicalDelimiter(self):
        """The delimiter."""
        return "/"

    def getUIDValidity(self):
        """A fixed validity."""
        return 42

    def getUIDNext(self):
        """The next UID."""
        return len(self.messages) + 1

    def getUID(self, message):
        """The UID of a sequence number."""
        return self.messages[message - 1].uid

    def getMessageCount(self):
        """How many messages."""
        return len(self.messages)

    def getRecentCount(self):
        """None recent."""
        return 0

    def getUnseenCount(self):
        """None unseen."""
        return 0

    def isWriteable(self):
        """Always."""
        return True

    def destroy(self):
        """Nothing to do."""

    def requestStatus(self, names):
        """Counts."""
        return {"MESSAGES": len(self.messages)}

    def addListener(self, listener):
        """Remember a listener."""
        self.listeners.append(listener)

    def removeListener(self, listener):
        """Forget a listener."""
        self.listeners.remove(listener)

    def addMessage(self, message, flags=(), date=None):
        """Store an APPENDed message."""
        self.messages.append(MemoryMessage(message.read(), len(self.messages) + 1))
        return defer.succeed(None)

    def expunge(self):
        """Nothing is ever deleted."""
        return []

    def fetch(self, messages, uid):
        """(sequence number, message) pairs of a message set."""
        messages.last = len(self.messages)
        return [(n, self.messages[n - 1]) for n in messages if 1 <= n <= len(self.messages)]

    def store(self, messages, flags, mode, uid):
        """Flags are not kept."""
        return {}


class MemoryAccount(imap4.MemoryAccount):
    """An account whose mailboxes are `MemoryMailbox`."""

    def _emptyMailbox(self, name, id):
        return MemoryMailbox()


class RecordingIMAP(imap4.IMAP4Server):
    """Twisted's IMAP server, recording every byte it receives and offering STARTTLS."""

    def dataReceived(self, data):
        """Record, then serve."""
        self.factory.received.append(data)
        super().dataReceived(data)

    def capabilities(self):
        """Advertise STARTTLS too, as a TLS-capable server would."""
        caps = super().capabilities()
        caps[b"STARTTLS"] = None
        return caps

    def connectionLost(self, reason):
        """Note the end of the connection."""
        super().connectionLost(reason)
        self.factory.open -= 1


class IMAPBackend(protocol.ServerFactory):
    """Twisted's IMAP server on loopback, with one user and an INBOX."""

    def __init__(self):
        self.received = []
        self.open = 0
        self.account = MemoryAccount("bob")
        self.account.addMailbox("INBOX")
        checker = checkers.InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser(USER.encode(), PASSWORD.encode())
        self.portal = portal.Portal(OneAvatarRealm(imap4.IAccount, self.account), [checker])

    def buildProtocol(self, addr):
        """A server protocol with the portal and PLAIN."""
        p = RecordingIMAP(chal={b"PLAIN": imap4.PLAINCredentials})
        p.factory = self
        p.portal = self.portal
        self.open += 1
        return p

    @property
    def data(self):
        """Everything the server received."""
        return b"".join(self.received)

    @property
    def inbox(self):
        """The INBOX mailbox, or None once deleted."""
        return self.account.mailboxes.get("INBOX")


class GatewayTests(TestCase):
    """imaplib through the gateway to Twisted's IMAP server, on loopback."""

    timeout = 30

    def setUp(self):
        self.backend = IMAPBackend()
        port = reactor.listenTCP(0, self.backend, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: wait_for(lambda: self.backend.open == 0))
        self.bport = port.getHost().port

    def gateway(self, **kw):
        """Start a gateway with an imap rule in front of the backend; return its port."""
        self.tracker, port = start_gateway(self, rule(**kw), self.bport)
        return port

    def client(self, port):
        """An imaplib client of the gateway (10 s timeout), shut down when the test ends."""
        c = imaplib.IMAP4("127.0.0.1", port, timeout=10)

        def close():
            try:
                c.shutdown()
            except OSError:
                pass  # already shut down by logout()

        self.addCleanup(close)
        return c

    def socket(self, port):
        """A raw client socket to the gateway (10 s timeout), closed when the test ends."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(sock.close)
        return sock

    @defer.inlineCallbacks
    def test_append_and_fetch(self):
        """An APPEND literal holding command lines is stored as data; FETCH returns it as a server literal."""
        port = self.gateway()
        message = b"Subject: x\r\n\r\nz1 DELETE INBOX\r\nz2 LOGOUT\r\n* BYE fake\r\n"

        def talk():
            c = self.client(port)
            c.login(USER, PASSWORD)
            # Twisted needs a flag list (it iterates None otherwise).
            c.append("INBOX", "()", None, message)
            c.select("INBOX")
            typ, data = c.fetch("1", "(BODY[])")
            c.logout()
            return typ, data

        typ, data = yield deferToThread(talk)
        self.assertEqual(typ, "OK")
        self.assertEqual(data[0][1], message)
        self.assertIsNotNone(self.backend.inbox)
        self.assertEqual(self.backend.inbox.messages[0].raw, message)
        self.assertIn(b"{%d}\r\n" % len(message) + message, self.backend.data)

    @defer.inlineCallbacks
    def test_illegal_command(self):
        """An illegal command gets the gateway's tagged BAD and never reaches the server."""
        port = self.gateway()

        def talk():
            c = self.client(port)
            c.login(USER, PASSWORD)
            try:
                c.xatom("XDELETEALL", "INBOX")
            except imaplib.IMAP4.error as e:
                error = str(e)
            c.noop()
            c.logout()
            return error

        error = yield deferToThread(talk)
        self.assertIn("Command not allowed", error)
        yield wait_for(lambda: b"LOGOUT" in self.backend.data)
        self.assertNotIn(b"XDELETEALL", self.backend.data)
        self.assertIn(b"NOOP", self.backend.data)

    @defer.inlineCallbacks
    def test_starttls_stripped(self):
        """The client never sees STARTTLS, and a STARTTLS it sends anyway is answered NO by the gateway."""
        port = self.gateway()

        def talk():
            c = self.client(port)
            capabilities = c.capabilities
            typ, data = c.xatom("STARTTLS")
            c.logout()
            return capabilities, typ, data

        capabilities, typ, data = yield deferToThread(talk)
        self.assertNotIn("STARTTLS", capabilities)
        self.assertIn("IMAP4REV1", capabilities)
        self.assertEqual((typ, data), ("NO", [b"TLS not available"]))
        yield wait_for(lambda: b"LOGOUT" in self.backend.data)
        self.assertNotIn(b"STARTTLS", self.backend.data)

    @defer.inlineCallbacks
    def test_secure_login(self):
        """With secure-login, LOGIN and AUTHENTICATE are refused by the gateway; the server never sees them."""
        port = self.gateway(secure_login=True)

        def talk():
            c = self.client(port)
            capabilities = c.capabilities
            errors = []
            for login in (lambda: c.login(USER, PASSWORD), lambda: c.authenticate("PLAIN", lambda _: b"\0bob\0secret")):
                try:
                    login()
                except imaplib.IMAP4.error as e:
                    errors.append(str(e))
            c.logout()
            return capabilities, errors

        capabilities, errors = yield deferToThread(talk)
        self.assertIn("LOGINDISABLED", capabilities)
        self.assertNotIn("AUTH=PLAIN", capabilities)
        self.assertEqual(len(errors), 2)
        self.assertTrue(all("PRIVACYREQUIRED" in e for e in errors), errors)
        yield wait_for(lambda: b"LOGOUT" in self.backend.data)
        self.assertNotIn(b"LOGIN ", self.backend.data)
        self.assertNotIn(b"AUTHENTICATE", self.backend.data)

    @defer.inlineCallbacks
    def test_secure_login_implicit_tls(self):
        """On an implicit-TLS (ssl:) listener secure-login lets imaplib log in, and LOGINDISABLED is not shown."""
        import ssl

        import trustme

        from mailguard import tls

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        cert_file, key_file = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        cert.cert_chain_pems[0].write_to_path(cert_file)
        cert.private_key_pem.write_to_path(key_file)
        self.tracker, number = start_gateway(self, rule(secure_login=True), self.bport, listen="ssl:0",
                                             tls_context=tls.server_context(cert_file, key_file))
        context = ssl.create_default_context()
        ca.configure_trust(context)

        def talk():
            c = imaplib.IMAP4_SSL("127.0.0.1", number, ssl_context=context, timeout=10)
            try:
                capabilities = c.capabilities
                c.login(USER, PASSWORD)
                select = c.select("INBOX")[0]
                c.logout()
            finally:
                try:
                    c.shutdown()
                except OSError:
                    pass
            return capabilities, select

        capabilities, select = yield deferToThread(talk)
        self.assertNotIn("LOGINDISABLED", capabilities)
        self.assertEqual(select, "OK")
        self.assertIn(b" LOGIN bob ", self.backend.data)

    @defer.inlineCallbacks
    def test_authenticate(self):
        """AUTHENTICATE PLAIN works through the gateway: the SASL response passes as data."""
        port = self.gateway()

        def talk():
            c = self.client(port)
            typ, _ = c.authenticate("PLAIN", lambda _: b"\0bob\0secret")
            select = c.select("INBOX")[0]
            c.logout()
            return typ, select

        self.assertEqual((yield deferToThread(talk)), ("OK", "OK"))

    @defer.inlineCallbacks
    def test_literal_byte_by_byte(self):
        """A literal typed one byte per packet, holding command lines, is stored and never executed."""
        port = self.gateway()
        message = b"a9 DELETE INBOX\r\na10 LOGOUT\r\n"

        def talk():
            sock = self.socket(port)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            f = sock.makefile("rb")
            out = [f.readline()]

            def send(data):
                for byte in data:
                    sock.send(bytes([byte]))

            send(b"a1 LOGIN bob secret\r\n")
            out.append(f.readline())
            send(b"a2 APPEND INBOX () {%d}\r\n" % len(message))
            out.append(f.readline())  # the server's "+"
            send(message + b"\r\n")
            out.append(f.readline())  # * 1 EXISTS
            out.append(f.readline())  # a2 OK
            send(b"a3 XFOO {3+}\r\nabc\r\na4 LOGOUT\r\n")
            out.append(f.readline())
            out.append(f.readline())
            out.append(f.readline())
            f.close()
            sock.close()
            return out

        out = yield deferToThread(talk)
        self.assertTrue(out[1].startswith(b"a1 OK"))
        self.assertTrue(out[2].startswith(b"+"))
        self.assertTrue(out[4].startswith(b"a2 OK"))
        self.assertEqual(out[5], b"a3 BAD Command not allowed\r\n")
        self.assertTrue(out[6].startswith(b"* BYE"))
        self.assertTrue(out[7].startswith(b"a4 OK"))
        self.assertEqual(self.backend.inbox.messages[0].raw, message)
        self.assertNotIn(b"XFOO", self.backend.data)

    @defer.inlineCallbacks
    def test_literal_plus_refused(self):
        """Twisted's server has no LITERAL+: a {n+} APPEND is refused and its octets never reach it."""
        port = self.gateway()

        def talk():
            sock = self.socket(port)
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(b"a1 LOGIN bob secret\r\na2 APPEND INBOX {16+}\r\nz1 DELETE INBOX\r\na3 LOGOUT\r\n")
            lines = [f.readline() for _ in range(4)]
            f.close()
            sock.close()
            return lines

        lines = yield deferToThread(talk)
        self.assertTrue(lines[0].startswith(b"a1 OK"))
        self.assertEqual(lines[1], b"a2 BAD Non-synchronizing literal not supported by the server\r\n")
        self.assertIsNotNone(self.backend.inbox)
        self.assertNotIn(b"DELETE", self.backend.data)

    @defer.inlineCallbacks
    def test_idle(self):
        """IDLE and DONE pass through the gateway to the server."""
        port = self.gateway()

        def talk():
            c = self.client(port)
            c.login(USER, PASSWORD)
            c.select("INBOX")
            c.send(b"a100 IDLE\r\n")
            cont = c.readline()
            c.send(b"DONE\r\n")
            done = c.readline()
            c.logout()
            return cont, done

        cont, done = yield deferToThread(talk)
        self.assertEqual(cont, b"+\r\n")
        self.assertTrue(done.startswith(b"a100 OK"))
        self.assertIn(b"a100 IDLE\r\nDONE\r\n", self.backend.data)
