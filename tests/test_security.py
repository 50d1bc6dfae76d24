"""Security and robustness, tested from outside with real clients: AUTH only inside TLS, no side
door to the embedded backend, trickling clients, credentials never logged, modern TLS, one rule
for over-long lines, NUL in message data."""

import os
import smtplib
import socket
import ssl

import trustme
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread

from mailguard.policy import parse_policy
from mailguard.service import build_service
from tests.clients import LockstepClient, read_reply, wait_for
from tests.test_gateway import GatewayTestCase

# RSA, so that static-RSA suites could be negotiated at all if the gateway offered them.
CA = trustme.CA(key_type=trustme.KeyType.RSA)
CERT = CA.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)

#: The TLS 1.2 suites the default tls-ciphers accepts with an RSA certificate.
MODERN_RSA_SUITES = {
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
}


def free_port():
    """A loopback port number nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tls12_suites():
    """Every TLS 1.2 cipher suite this machine's OpenSSL can offer as a client."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    return sorted({c["name"] for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3"})


def client_context(suite=None):
    """A TLS 1.2-only client context trusting the test CA, offering only ``suite`` when given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    CA.configure_trust(ctx)
    if suite is not None:
        ctx.set_ciphers(suite + ":@SECLEVEL=0")
    return ctx


def starttls_socket(port):
    """A plain socket on the gateway, after EHLO and STARTTLS (ready for the handshake)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = sock.makefile("rb")
    read_reply(f)
    sock.sendall(b"EHLO client.example\r\n")
    read_reply(f)
    sock.sendall(b"STARTTLS\r\n")
    answer = read_reply(f)
    assert answer.startswith(b"220"), answer
    f.close()
    return sock


def handshake(port, starttls, suite=None, session=None, context=None):
    """One TLS 1.2 handshake with the gateway: ``(cipher, resumed, session)``, or None if refused."""
    sock = starttls_socket(port) if starttls else socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        context = context or client_context(suite)
        tls = context.wrap_socket(sock, server_hostname="localhost", session=session)
    except (ssl.SSLError, ConnectionError):
        sock.close()
        return None
    try:
        if not starttls:
            read_reply(tls.makefile("rb"))  # the greeting, inside TLS
        return tls.cipher()[0], tls.session_reused, tls.session
    finally:
        tls.close()


class SecurityTestCase(GatewayTestCase):
    """A gateway (through its service, as twistd builds it, or the test harness) with the test certificate."""

    def setUp(self):
        super().setUp()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.cert_file = os.path.join(self.dir, "cert.pem")
        self.key_file = os.path.join(self.dir, "key.pem")
        CERT.cert_chain_pems[0].write_to_path(self.cert_file)
        CERT.private_key_pem.write_to_path(self.key_file)

    def service(self, text):
        """Start the whole gateway for the policy ``text``; it is stopped when the test ends."""
        policy = parse_policy(text, path="test.ini", base_dir=self.dir)
        top = build_service(policy, reactor)
        top.startService()
        self.addCleanup(top.stopService)
        self.tracker = top.tracker
        return top


class TLSCipherTests(SecurityTestCase):
    """tls-ciphers: only forward-secret AEAD suites in TLS 1.2, on STARTTLS and ssl: listeners; sessions resume."""

    def starttls_gateway(self, **rule):
        """A tls = terminate gateway in front of a recording backend; its port."""
        backend, bport = self.recording()
        return self.gateway(bport, tls="terminate", tls_certificate=self.cert_file, tls_key=self.key_file,
                            backend_tls="off", **rule)

    def ssl_gateway(self, ciphers=None):
        """An ssl: listener built from a policy, relaying to a recording backend; its port."""
        backend, bport = self.recording()
        port = free_port()
        self.service(
            "[inspect TLS]\nprotocol = esmtp\n%s"
            "[listener implicit]\nlisten = ssl:%d:interface=127.0.0.1:privateKey=%s:certKey=%s\n"
            "backend = tcp:host=127.0.0.1:port=%d\ninspect = TLS\n"
            % ("tls-ciphers = %s\n" % ciphers if ciphers else "", port, self.key_file, self.cert_file, bport)
        )
        return port

    @defer.inlineCallbacks
    def check_suites(self, port, starttls):
        """Each TLS 1.2 suite alone: the modern ones are accepted, every other one refused."""
        suites = tls12_suites()
        # The ones testssl.sh flagged must be among those tried.
        for flagged in ("AES128-SHA", "AES256-GCM-SHA384", "ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES256-SHA384"):
            self.assertIn(flagged, suites)
        accepted = set()
        for suite in suites:
            result = yield deferToThread(handshake, port, starttls, suite)
            if result is not None:
                self.assertEqual(result[0], suite)
                accepted.add(suite)
        self.assertEqual(accepted, MODERN_RSA_SUITES)

    @defer.inlineCallbacks
    def check_resumption(self, port, starttls):
        """A second connection presenting the first one's session resumes it."""
        context = client_context()
        cipher, reused, session = yield deferToThread(handshake, port, starttls, context=context)
        self.assertFalse(reused)
        cipher, reused, session = yield deferToThread(handshake, port, starttls, None, session, context)
        self.assertTrue(reused)

    def test_starttls_suites(self):
        """tls = terminate: a real TLS 1.2 handshake per suite accepts exactly ECDHE with AES-GCM or ChaCha20."""
        return self.check_suites(self.starttls_gateway(), True)

    def test_ssl_listener_suites(self):
        """An ssl: listener: a real TLS 1.2 handshake per suite accepts exactly ECDHE with AES-GCM or ChaCha20."""
        return self.check_suites(self.ssl_gateway(), False)

    def test_starttls_resumption(self):
        """tls = terminate: a client that comes back resumes its TLS 1.2 session."""
        return self.check_resumption(self.starttls_gateway(), True)

    def test_ssl_listener_resumption(self):
        """An ssl: listener: a client that comes back resumes its TLS 1.2 session."""
        return self.check_resumption(self.ssl_gateway(), False)

    @defer.inlineCallbacks
    def test_tls_ciphers_key(self):
        """tls-ciphers replaces the list: with one suite named, only that suite is accepted."""
        port = self.ssl_gateway(ciphers="ECDHE-RSA-AES256-GCM-SHA384")
        self.assertIsNotNone((yield deferToThread(handshake, port, False, "ECDHE-RSA-AES256-GCM-SHA384")))
        self.assertIsNone((yield deferToThread(handshake, port, False, "ECDHE-RSA-AES128-GCM-SHA256")))
