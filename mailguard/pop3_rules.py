"""The POP3 rules (sans-IO): the command allowlist, argument checks, bodies and CAPA filtering.

Each rule is in one place and returns a decision; `mailguard.pop3`
carries it out.  The rules POP3 shares with IMAP (STLS, secure-login, SASL
responses) are in `mailguard.mailbox_rules`.  Nothing here imports Twisted.
"""

import re

from mailguard.mailbox_rules import gateway_offers_tls, login_refused, relays_server_tls

#: The allowlist: each command with the arguments it may carry (after the
#: verb, matched in full; RFC 1939 section 3, RFC 2449, RFC 2595, RFC 5034).
COMMANDS = {
    b"USER": rb" \S+",
    b"PASS": rb" [^\r\n]+",  # a password may hold spaces (RFC 1939 section 7)
    b"APOP": rb" \S+ [0-9A-Fa-f]{32}",
    b"STAT": rb"",
    b"LIST": rb"(?: [0-9]{1,10})?",
    b"RETR": rb" [0-9]{1,10}",
    b"DELE": rb" [0-9]{1,10}",
    b"NOOP": rb"",
    b"RSET": rb"",
    b"QUIT": rb"",
    b"TOP": rb" [0-9]{1,10} [0-9]{1,10}",
    b"UIDL": rb"(?: [0-9]{1,10})?",
    b"CAPA": rb"",
    b"STLS": rb"",
    b"AUTH": rb"(?: [A-Za-z0-9_-]{1,20}(?: (?:[A-Za-z0-9+/]+={0,2}|=))?)?",
}
_ARGS = {verb: re.compile(args + rb" *\Z") for verb, args in COMMANDS.items()}

#: Commands whose +OK opens a multi-line body: always, or only without an argument.
_MULTI_ALWAYS = frozenset((b"RETR", b"TOP", b"CAPA"))
_MULTI_BARE = frozenset((b"LIST", b"UIDL", b"AUTH"))
#: The commands that log in (refused before TLS under secure-login).
LOGIN = frozenset((b"USER", b"PASS", b"APOP", b"AUTH"))
#: The commands whose +OK (as a single line) means the client is logged in.
_LOGGED_IN_BY = frozenset((b"PASS", b"APOP", b"AUTH"))
#: CAPA keywords hidden while secure-login refuses logins.
_LOGIN_CAPABILITIES = frozenset((b"USER", b"SASL"))

#: Most lines in a CAPA response.
MAX_CAPA_LINES = 1000


def split_command(line):
    """The upper-cased verb of a command line, and whether it has no argument."""
    sp = line.find(b" ")
    if sp < 0:
        return line.upper(), True
    return line[:sp].upper(), not line[sp:].strip()


def command_refusal(line, verb):
    """Why a command line is refused, as ``(reply name, reason)``; None when it is allowed.

    A NUL or a bare CR makes any line illegal; so do a verb outside
    `COMMANDS` and arguments its RFC does not allow.
    """
    if b"\0" in line or b"\r" in line:
        return "not_allowed", "NUL or bare CR in command"
    args = _ARGS.get(verb)
    if args is None:
        return "not_allowed", "not allowed"
    if args.match(line, len(verb)) is None:
        return "bad_arguments", "invalid arguments"
    return None


def login_refusal(verb, secure_login, security):
    """``secure-login``: a login command before the client's leg is TLS is refused."""
    if verb in LOGIN and login_refused(secure_login, security):
        return "secure_login", "login before TLS (secure-login)"
    return None


def opens_body(verb, bare):
    """True when the server's ``+OK`` to ``verb`` opens a multi-line body (RFC 1939, 2449, 5034)."""
    return verb in _MULTI_ALWAYS or (verb in _MULTI_BARE and bare)


def awaits_sasl(verb, bare):
    """AUTH with a mechanism: the client's next lines may be SASL responses, so the server answers first."""
    return verb == b"AUTH" and not bare


def logs_in(verb, multiline):
    """True when a single-line ``+OK`` to ``verb`` means the client is now logged in."""
    return verb in _LOGGED_IN_BY and not multiline


def keep_capability(line, tls, secure_login, security):
    """True when one line of a CAPA body may reach the client.

    STLS is the gateway's business except under ``passthrough``; USER and
    SASL are hidden while ``secure-login`` refuses them.
    """
    words = line.split()
    keyword = words[0].upper() if words else b""
    if keyword == b"STLS":
        return relays_server_tls(tls, security)
    return not (keyword in _LOGIN_CAPABILITIES and login_refused(secure_login, security))


def capability_additions(tls, security):
    """The CAPA lines the gateway adds before the terminating dot (its own STLS under ``terminate``)."""
    return [b"STLS\r\n"] if gateway_offers_tls(tls, security) else []
