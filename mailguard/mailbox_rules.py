"""The rules POP3 and IMAP share: STLS/STARTTLS, secure-login, SASL responses, the backend leg.

Each rule is here once and takes the facts it decides on (the rule's
``tls`` key, a `mailguard.mailbox_state.Security`); the inspectors only
carry out the answer.  Nothing here imports Twisted.
"""

import re

_SASL_RESPONSE = re.compile(rb"(?:[A-Za-z0-9+/]*={0,2}|\*)\Z")


def sasl_response_ok(line):
    """True for a SASL response line (without its line end): base64, or ``*`` to cancel."""
    return b"\0" not in line and _SASL_RESPONSE.match(line) is not None


def tls_refusal(tls, security):
    """Why the gateway answers a client's STLS/STARTTLS itself, as a reply name; None to go on.

    ``strip``: the server never sees it, so nothing after it can be taken
    for TLS-protected input.  TLS is started once, and only before login
    (RFC 2595; RFC 9051's not-authenticated state).
    """
    if tls == "strip":
        return "tls_not_available"
    if security.client_tls:
        return "tls_active"
    if security.authenticated:
        return "tls_after_login"
    return None


#: What a client's STLS/STARTTLS leads to, besides a refusal (`starttls_step`).
TLS_INJECTION, TLS_SYNC, TLS_FORWARD, TLS_START = "injection", "sync", "forward", "start"


def starttls_step(tls, security, input_pending, commands_pending):
    """What a client's STLS/STARTTLS leads to, the checks in this order.

    A reply name when the gateway refuses it (`tls_refusal`); `TLS_INJECTION`
    when the client sent bytes after it (they would be taken as if they had
    come inside TLS, RFC 2595 3.1): close; `TLS_SYNC` when earlier commands
    still wait for the server: close; `TLS_FORWARD`: forward it, the
    client's next bytes waiting for the server's answer; `TLS_START`: the
    gateway answers and starts TLS with the client itself.
    """
    refusal = tls_refusal(tls, security)
    if refusal is not None:
        return refusal
    if input_pending:
        return TLS_INJECTION
    if commands_pending:
        return TLS_SYNC
    return TLS_FORWARD if tls == "passthrough" else TLS_START


def login_refused(secure_login, security):
    """``secure-login = on`` refuses a login until the client's leg is TLS."""
    return secure_login and not security.client_tls


def gateway_offers_tls(tls, security):
    """The gateway advertises STLS/STARTTLS itself (``terminate``, client leg still plaintext)."""
    return tls == "terminate" and not security.client_tls


def relays_server_tls(tls, security):
    """The server's own STLS/STARTTLS capability reaches the client (``passthrough`` only)."""
    return tls == "passthrough" and not security.client_tls


def secures_backend(tls, backend_tls, security):
    """The gateway secures its own leg to the server before greeting the client."""
    return tls == "terminate" and backend_tls != "off" and not security.server_tls
