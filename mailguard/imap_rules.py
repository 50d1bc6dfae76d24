"""The IMAP rules (sans-IO): the command allowlist, command checks, literals and capability filtering.

Each rule is in one place and returns a decision; `mailguard.imap`
carries it out.  The rules IMAP shares with POP3 (STARTTLS, secure-login,
SASL responses) are in `mailguard.mailbox_rules`.  Nothing here imports
Twisted.
"""

from mailguard.mailbox_rules import gateway_offers_tls, login_refused, relays_server_tls

#: The allowlist: RFC 9051 section 6, plus CHECK and LSUB of IMAP4rev1 (RFC 3501).
COMMANDS = frozenset(
    b"CAPABILITY NOOP LOGOUT STARTTLS AUTHENTICATE LOGIN ENABLE SELECT EXAMINE NAMESPACE "
    b"CREATE DELETE RENAME SUBSCRIBE UNSUBSCRIBE LIST STATUS APPEND IDLE CLOSE UNSELECT "
    b"EXPUNGE SEARCH FETCH STORE COPY MOVE UID CHECK LSUB".split()
)
#: What may follow UID (RFC 9051 section 6.4.9).
UID_COMMANDS = frozenset(b"COPY MOVE FETCH SEARCH STORE EXPUNGE".split())
#: The commands that log in (refused before TLS under secure-login).
LOGIN = frozenset((b"LOGIN", b"AUTHENTICATE"))
#: Largest non-synchronizing literal under LITERAL- and IMAP4rev2 (RFC 7888).
LITERAL_MINUS_LIMIT = 4096


def command_name(verb, sub):
    """The name a command is known by (``UID FETCH``...), and whether the allowlist has it."""
    if verb == b"UID":
        sub = sub.upper() if sub else b""
        return b"UID " + sub, sub in UID_COMMANDS
    return verb, verb in COMMANDS


def nonsync_refused(literal, limit):
    """True for a non-synchronizing literal larger than the server takes (``limit``)."""
    return literal is not None and not literal[1] and literal[0] > limit


def command_refusal(verb, sub, end, text, literal, secure_login, security, literal_limit):
    """Why a parsed command line is refused, as ``(reply name, reason)``; None when it may go on.

    ``verb``, ``sub`` and ``end`` come from `mailguard.imap_framing.parse_command`
    on ``text`` (the fragment without its line end); ``literal`` is the
    literal the fragment announces.  A valid STARTTLS also returns None: the
    TLS rules (`mailguard.mailbox_rules.starttls_step`) decide what follows.
    """
    if not command_name(verb, sub)[1]:
        return "not_allowed", "not allowed"
    bare = end == len(text)
    # After any verb but UID, the second word was an argument: only the verb is checked.
    rest_ok = bare or text[end : end + 1] == b" " or (verb != b"UID" and sub is not None)
    if not rest_ok or b"\0" in text or b"\r" in text:
        return "bad_command", "invalid characters"
    if verb == b"STARTTLS":
        if sub is not None or not bare or literal is not None:
            return "bad_command", "STARTTLS takes no argument"
        return None
    if verb in LOGIN and login_refused(secure_login, security):
        return "secure_login", "login before TLS (secure-login)"
    if nonsync_refused(literal, literal_limit):
        return "literal_plus", "non-synchronizing literal the server did not advertise"
    return None


def literal_limit(upper_words):
    """The largest non-synchronizing literal a server with these capabilities takes (RFC 7888)."""
    if b"LITERAL+" in upper_words:
        return 1 << 64
    if b"LITERAL-" in upper_words or b"IMAP4REV2" in upper_words:
        return LITERAL_MINUS_LIMIT
    return 0


def _keep(upper, tls, refused, security):
    if upper == b"STARTTLS":
        return relays_server_tls(tls, security)
    return not (refused and (upper.startswith(b"AUTH=") or upper == b"LOGINDISABLED"))


def filter_capabilities(words, tls, secure_login, security):
    """``(words the client may see, the server's literal limit)`` for one capability list.

    STARTTLS is the gateway's business except under ``passthrough``, and the
    gateway adds its own under ``terminate``; while ``secure-login`` refuses
    logins, AUTH= mechanisms go and LOGINDISABLED is advertised.
    """
    upper = [w.upper() for w in words]
    refused = login_refused(secure_login, security)
    kept = [word for word, up in zip(words, upper) if _keep(up, tls, refused, security)]
    if gateway_offers_tls(tls, security):
        kept.append(b"STARTTLS")  # the gateway's own, whatever the server offers
    if refused:
        kept.append(b"LOGINDISABLED")
    return kept, literal_limit(upper)


def offers_starttls(code_words):
    """False only when a greeting's ``[CAPABILITY ...]`` code (bytes, or None) lacks STARTTLS."""
    return code_words is None or b"STARTTLS" in code_words.upper().split()
