"""End-to-end TLS: STARTTLS terminated on both legs, strip, passthrough, implicit TLS, injection."""

import os
import smtplib
import ssl
from email.message import EmailMessage

import trustme
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from mailguard import tls
from mailguard.policy import Rule
from tests.backends import AUTH_PASSWORD, AUTH_USER, AiosmtpdBackend
from tests.clients import LockstepClient, wait_for
from tests.harness import start_gateway
from tests.test_gateway import GatewayTestCase

CA = trustme.CA()
GATEWAY_CERT = CA.issue_cert("localhost", "127.0.0.1")
BACKEND_CERT = CA.issue_cert("backend.example", "127.0.0.1")
WRONG_CERT = CA.issue_cert("other.example")


def client_context():
    """An ssl context for smtplib that trusts the test CA."""
    ctx = ssl.create_default_context()
    CA.configure_trust(ctx)
    return ctx


def server_context(cert):
    """An ssl server context for aiosmtpd presenting ``cert``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return ctx


def message():
    msg = EmailMessage()
    msg["From"] = "a@example.org"
    msg["To"] = "b@example.org"
    msg["Subject"] = "over TLS"
    msg.set_content("secret body\n")
    return msg


class TLSTestCase(GatewayTestCase):
    """A gateway whose rule may terminate TLS with the test certificates."""

    def setUp(self):
        super().setUp()
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        self.ca_file = os.path.join(d, "ca.pem")
        CA.cert_pem.write_to_path(self.ca_file)
        self.cert_file = os.path.join(d, "cert.pem")
        self.key_file = os.path.join(d, "key.pem")
        GATEWAY_CERT.cert_chain_pems[0].write_to_path(self.cert_file)
        GATEWAY_CERT.private_key_pem.write_to_path(self.key_file)

    def tls_gateway(self, backend_port, **rule):
        rule.setdefault("tls", "terminate")
        if rule["tls"] == "terminate":
            rule.setdefault("tls_certificate", self.cert_file)
            rule.setdefault("tls_key", self.key_file)
        rule.setdefault("backend_ca", self.ca_file)
        return self.gateway(backend_port, **rule)

    def aiosmtpd(self, cert=BACKEND_CERT, **kw):
        backend = AiosmtpdBackend(tls_context=server_context(cert), **kw)
        port = backend.start()
        self.addCleanup(backend.stop)
        return backend, port


class TerminateTests(TLSTestCase):
    """tls = terminate: TLS on both legs, inspection inside."""

    @defer.inlineCallbacks
    def test_starttls_login_send(self):
        """starttls + login + send_message through the gateway to an aiosmtpd that requires STARTTLS."""
        backend, bport = self.aiosmtpd(auth=True, require_starttls=True)
        port = self.tls_gateway(bport, backend_tls="required", backend_hostname="backend.example")
        msg = message()

        def send():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo()
                self.assertTrue(client.has_extn("starttls"))
                client.starttls(context=client_context())
                client.ehlo()
                self.assertFalse(client.has_extn("starttls"))
                client.login(AUTH_USER, AUTH_PASSWORD)
                client.send_message(msg)

        yield deferToThread(send)
        (envelope,) = yield backend.whenMessages(1)
        self.assertTrue(envelope.authenticated)
        self.assertEqual(envelope.original_content, msg.as_bytes().replace(b"\n", b"\r\n"))

    @defer.inlineCallbacks
    def test_illegal_inside_tls_rewritten(self):
        """An illegal command sent inside TLS is still overwritten with x."""
        backend, bport = self.recording()
        port = self.tls_gateway(bport, backend_tls="opportunistic")

        def talk():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.starttls(context=client_context())
                client.ehlo()
                return client.docmd("EXPN", "staff")

        code, _ = yield deferToThread(talk)
        self.assertEqual(code, 500)
        yield wait_for(lambda: backend.connections and backend.connections[0].closed)
        self.assertIn(b"\r\nxxxxxxxxxx\r\n", bytes(backend.connections[0].received))

    @defer.inlineCallbacks
    def test_wrong_backend_hostname(self):
        """backend-tls = required with a wrong-name backend certificate: the client gets 421, nothing delivered."""
        backend, bport = self.aiosmtpd(cert=WRONG_CERT)
        port = self.tls_gateway(bport, backend_tls="required", backend_hostname="backend.example")

        def talk():
            client = LockstepClient(port)
            rest = client.rest()
            client.close()
            return client.greeting + rest

        got = yield deferToThread(talk)
        self.assertTrue(got.startswith(b"421 4.7.0"), got)
        self.assertEqual(backend.envelopes, [])

    @defer.inlineCallbacks
    def test_required_but_not_offered(self):
        """backend-tls = required and a backend without STARTTLS: 421 4.7.0, never a silent downgrade."""
        backend, bport = self.recording()
        port = self.tls_gateway(bport, backend_tls="required", backend_hostname="backend.example")

        def talk():
            client = LockstepClient(port)
            client.close()
            return client.greeting

        got = yield deferToThread(talk)
        self.assertTrue(got.startswith(b"421 4.7.0"), got)

    @defer.inlineCallbacks
    def test_client_injection(self):
        """Bytes pipelined after STARTTLS are never executed: 554 and close."""
        backend, bport = self.recording()
        port = self.tls_gateway(bport, backend_tls="off")

        def talk():
            client = LockstepClient(port)
            client.command(b"EHLO c")
            client.send(b"STARTTLS\r\nRSET\r\n")
            rest = client.rest()
            client.close()
            return rest

        rest = yield deferToThread(talk)
        self.assertTrue(rest.startswith(b"554 5.5.0"), rest)
        yield wait_for(lambda: backend.connections and backend.connections[0].closed)
        self.assertNotIn(b"RSET", bytes(backend.connections[0].received))
        self.assertTrue(self.alerts("STARTTLS_INJECTION"))

    @defer.inlineCallbacks
    def test_server_injection(self):
        """Bytes after the backend's 220 to the gateway's STARTTLS are an injection: 421, never relayed."""
        backend, bport = self.recording(
            extensions=("PIPELINING", "STARTTLS"),
            replyOverride={"STARTTLS": b"220 go ahead\r\n250 injected\r\n"},
        )
        port = self.tls_gateway(bport, backend_tls="opportunistic")

        def talk():
            client = LockstepClient(port)
            rest = client.rest()
            client.close()
            return client.greeting + rest

        got = yield deferToThread(talk)
        self.assertTrue(got.startswith(b"421 4.7.0"), got)
        self.assertNotIn(b"injected", got)


class StripAndPassthroughTests(TLSTestCase):
    """tls = strip and tls = passthrough."""

    @defer.inlineCallbacks
    def test_strip(self):
        """strip: no STARTTLS in the EHLO reply and 454 to the command, which never reaches the server."""
        backend, bport = self.recording(extensions=("PIPELINING", "STARTTLS", "8BITMIME"))
        port = self.gateway(bport)

        def talk():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo()
                return client.has_extn("starttls"), client.docmd("STARTTLS")

        offered, (code, text) = yield deferToThread(talk)
        self.assertFalse(offered)
        self.assertEqual((code, text), (454, b"4.7.0 TLS not available"))
        yield wait_for(lambda: backend.connections and backend.connections[0].closed)
        self.assertNotIn(b"STARTTLS", bytes(backend.connections[0].received))

    @defer.inlineCallbacks
    def test_passthrough(self):
        """passthrough: the client's TLS reaches the backend itself; the message arrives; TLS_PASSTHROUGH is logged."""
        backend, bport = self.aiosmtpd()
        port = self.tls_gateway(bport, tls="passthrough")
        msg = message()

        def send():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.starttls(context=client_context())
                client.send_message(msg)

        yield deferToThread(send)
        (envelope,) = yield backend.whenMessages(1)
        self.assertEqual(envelope.original_content, msg.as_bytes().replace(b"\n", b"\r\n"))
        self.assertTrue(self.alerts("TLS_PASSTHROUGH"))


class ImplicitTLSTests(TLSTestCase):
    """An implicit-TLS listener (port 465 style) with inspection as usual."""

    @defer.inlineCallbacks
    def test_smtp_ssl(self):
        """smtplib.SMTP_SSL through an ssl: listener delivers, and STARTTLS is not offered."""
        backend, bport = self.recording()
        rule = Rule(name="TLS", protocol="esmtp", max_data=100000)
        context = tls.server_context(self.cert_file, self.key_file)
        self.tracker, number = start_gateway(self, rule, bport, listen="ssl:0", tls_context=context)

        def send():
            with smtplib.SMTP_SSL("127.0.0.1", number, timeout=10, context=client_context()) as client:
                client.ehlo()
                offered = client.has_extn("starttls")
                client.sendmail("a@example.org", ["b@example.org"], b"Subject: 465\r\n\r\nimplicit\r\n")
                return offered

        offered = yield deferToThread(send)
        self.assertFalse(offered)
        self.assertEqual(backend.messages[0].data, b"Subject: 465\n\nimplicit\n")


class TLSPolicyTests(TLSTestCase):
    """The TLS keys of a policy are checked at start-up, with one-line errors."""

    def parse(self, rule_lines):
        from mailguard.policy import parse_policy

        text = "[inspect R]\n%s\n[listener l]\nlisten = tcp:2525\nbackend = tcp:host=mx:port=25\ninspect = R\n"
        return parse_policy(text % rule_lines, path="p.ini")

    def error(self, rule_lines):
        from mailguard.policy import PolicyError

        with self.assertRaises(PolicyError) as cm:
            self.parse(rule_lines)
        self.assertEqual(len(str(cm.exception).splitlines()), 1)
        return str(cm.exception)

    def test_terminate_ok(self):
        """A matching certificate and key give a terminate rule with absolute paths."""
        policy = self.parse("protocol = esmtp\ntls = terminate\ntls-certificate = %s\ntls-key = %s"
                            % (self.cert_file, self.key_file))
        self.assertEqual((policy.rules[0].tls, policy.rules[0].tls_key), ("terminate", self.key_file))

    def test_not_esmtp(self):
        """tls other than strip needs protocol = esmtp."""
        self.assertEqual(self.error("protocol = smtp\ntls = passthrough"),
                         "p.ini: [inspect R] tls: tls = passthrough needs protocol = esmtp "
                         "(STARTTLS is an illegal command with protocol = smtp)")

    def test_terminate_without_certificate(self):
        """terminate without a certificate is refused."""
        self.assertIn("[inspect R] tls: tls = terminate needs tls-certificate and tls-key",
                      self.error("protocol = esmtp\ntls = terminate"))

    def test_missing_file(self):
        """An unreadable certificate file is named in the error."""
        self.assertIn("[inspect R] tls-certificate: bad value 'nope.pem': cannot read",
                      self.error("protocol = esmtp\ntls-certificate = nope.pem\ntls-key = %s" % self.key_file))

    def test_mismatched_key(self):
        """A key that does not belong to the certificate is refused."""
        other = os.path.join(os.path.dirname(self.key_file), "other.pem")
        WRONG_CERT.private_key_pem.write_to_path(other)
        self.assertIn("does not match certificate",
                      self.error("protocol = esmtp\ntls = terminate\ntls-certificate = %s\ntls-key = %s"
                                 % (self.cert_file, other)))
