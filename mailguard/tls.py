"""TLS contexts for both legs of a session, built once per listener at start-up.

The client leg is a TLS server with the rule's ``tls-certificate`` (chain
allowed) and ``tls-key``; the backend leg is a TLS client that verifies the
backend with service_identity (``backend-tls = required``) or only encrypts
(``opportunistic``).  TLS 1.2 is the minimum.  The client leg's TLS 1.2
ciphers are the rule's ``tls-ciphers`` (default: forward secrecy and AEAD
only), and it resumes sessions (session IDs and tickets).  ``ssl:``
listeners get the same context, built here (`implicit_tls_endpoint`):
Twisted's ``ssl:`` description has no cipher option.  Problems with the files are reported as `TLSConfigError` with a
one-line message, which the policy parser turns into its one-line error.
"""

import os
import re

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*", re.S)
_PEM_KEY = re.compile(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.+?-----END \1PRIVATE KEY-----", re.S)

#: The default TLS 1.2 cipher list (OpenSSL syntax): forward secrecy and AEAD only.
DEFAULT_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL"


class TLSConfigError(Exception):
    """A certificate, key or CA file cannot be used; ``str()`` says why, on one line."""


def _read(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError("cannot read %s %s: %s" % (what, path, e.strerror or e)) from None


def load_certificates(path, what="certificate file"):
    """All certificates of a PEM file, as cryptography objects (at least one)."""
    from cryptography import x509

    data = _read(path, what)
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        raise TLSConfigError("no PEM certificate in %s %s" % (what, path))
    try:
        return [x509.load_pem_x509_certificate(block) for block in blocks]
    except ValueError as e:
        raise TLSConfigError("bad certificate in %s: %s" % (path, e)) from None


def load_key(path):
    """The private key of a PEM file (unencrypted), as a cryptography object."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _read(path, "key file")
    # A key may share its file with the certificate (ssl: privateKey=).
    block = _PEM_KEY.search(data)
    if block is not None:
        data = block.group()
    try:
        return load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise TLSConfigError("bad private key in %s: %s" % (path, str(e).splitlines()[0] if str(e) else "unreadable")) from None


def check_server_files(cert_path, key_path):
    """Load the certificate chain and key and check that they belong together."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    chain = load_certificates(cert_path)
    key = load_key(key_path)

    def spki(public):
        return public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)

    if spki(chain[0].public_key()) != spki(key.public_key()):
        raise TLSConfigError("key %s does not match certificate %s" % (key_path, cert_path))
    return chain, key


def server_context(cert_path, key_path, ciphers=DEFAULT_CIPHERS):
    """A TLS server context factory for the client leg (STARTTLS terminate)."""
    chain, key = check_server_files(cert_path, key_path)
    return _server_options(chain, key, ciphers)


def _server_options(chain, key, ciphers, dh_parameters=None):
    """The client leg's TLS server options: TLS 1.2+, ``ciphers``, session resumption.

    One options object (so one OpenSSL context, session cache and ticket
    key) serves every session of a listener: a client that comes back
    resumes its session instead of a full handshake.
    """
    from twisted.internet import ssl

    return ssl.CertificateOptions(
        privateKey=key,
        certificate=chain[0],
        extraCertChain=chain[1:] or None,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(ciphers),
        dhParameters=dh_parameters,
        enableSessions=True,
        enableSessionTickets=True,
    )


def implicit_tls_options(description, ciphers=DEFAULT_CIPHERS):
    """The TLS settings of an ``ssl:`` listen description: ``(port, options, backlog, interface)``, or None.

    The certificate and key files the description names are read now (a
    reload reads them again).  Only the TLS settings are the gateway's:
    TLS 1.2 at least, ``ciphers``, session resumption.
    """
    from twisted.internet import endpoints, ssl
    from twisted.python.filepath import FilePath

    args, kw = endpoints._parse(description)
    if not args or args[0].lower() != "ssl":
        return None
    port = int(args[1] if len(args) > 1 else kw["port"])
    key_path = kw.get("privateKey", "server.pem")
    chain = load_certificates(kw.get("certKey", key_path))
    if kw.get("extraCertChain"):
        chain += load_certificates(kw["extraCertChain"], "extraCertChain file")
    dh = kw.get("dhParameters")
    options = _server_options(
        chain, load_key(key_path), ciphers,
        dh_parameters=ssl.DiffieHellmanParameters.fromFile(FilePath(dh)) if dh else None,
    )
    return port, options, int(kw.get("backlog", 50)), kw.get("interface", "")


def implicit_tls_endpoint(reactor, description, ciphers=DEFAULT_CIPHERS):
    """The server endpoint of an ``ssl:`` listen description, with the gateway's own context (`implicit_tls_options`).

    Returns None for any other description.  The description keeps its
    meaning (port, ``interface``, ``backlog``, ``privateKey``, ``certKey``,
    ``extraCertChain``, ``dhParameters``).
    """
    from twisted.internet import endpoints

    settings = implicit_tls_options(description, ciphers)
    if settings is None:
        return None
    port, options, backlog, interface = settings
    return endpoints.SSL4ServerEndpoint(reactor, port, options, backlog=backlog, interface=interface)


def client_creator(hostname, ca_path=None, verify=True):
    """A TLS client connection creator for the backend leg.

    With ``verify`` the backend must present a certificate for ``hostname``
    signed by a CA in ``ca_path`` (default: the system's trust store);
    without it the leg is only encrypted (opportunistic TLS, as MTAs do).
    """
    from twisted.internet import ssl

    if not verify:
        return ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    if ca_path:
        roots = [ssl.Certificate.loadPEM(block) for block in _PEM_CERT.findall(_read(ca_path, "CA file"))]
        trust = ssl.trustRootFromCertificates(roots)
    else:
        trust = ssl.platformTrust()
    return ssl.optionsForClientTLS(hostname, trustRoot=trust)


def readable(path):
    """True when ``path`` is a readable file."""
    return os.path.isfile(path) and os.access(path, os.R_OK)
