"""The command allowlists of each SMTP inspection mode, and command syntax checks.

The `x` rewrite of an illegal command lives here, beside the allowlists that
decide what is illegal.  Checks of MAIL/RCPT paths and ESMTP parameters take
what the server advertised (an `Extensions` value) into account: a parameter
of an extension that was not advertised is illegal.
"""

import re
from dataclasses import dataclass, field

# RFC 821 section 4.5.1 minimum: what PIX MailGuard lets through.
MAILGUARD_VERBS = frozenset(b"HELO MAIL RCPT DATA RSET NOOP QUIT".split())
# IOS "ip inspect ... smtp".
SMTP_VERBS = frozenset(b"DATA HELO HELP MAIL NOOP QUIT RCPT RSET SAML SEND SOML VRFY".split())
# IOS "ip inspect ... esmtp", plus the extension verbs whose use depends on
# what the server advertised (checked per command).
ESMTP_VERBS = SMTP_VERBS | frozenset(b"AUTH EHLO ETRN BDAT STARTTLS".split())

#: RFC 2920: these may only be the last command of a pipelined group.  AUTH
#: and STARTTLS also wait for their reply (RFC 4954, RFC 3207).
GROUP_ENDING = frozenset(b"EHLO DATA VRFY EXPN TURN QUIT NOOP AUTH STARTTLS HELO".split())

#: Every verb of SMTP that a log line may name: RFC 5321 (and RFC 821's
#: SEND, SOML, SAML, TURN), LMTP's LHLO, and the verbs of the registered
#: extensions (STARTTLS, AUTH, BDAT, ETRN, ATRN, BURL, XCLIENT, XFORWARD,
#: VERB, ONEX).  Any other first word of a line may be a credential (a
#: client sending its SASL response after AUTH was refused): logs show only
#: its length.
KNOWN_VERBS = frozenset(
    b"HELO EHLO LHLO MAIL RCPT DATA BDAT RSET VRFY EXPN HELP NOOP QUIT SEND SOML SAML TURN "
    b"STARTTLS AUTH ETRN ATRN BURL XCLIENT XFORWARD VERB ONEX".split()
)

#: First words that betray a web or proxy client talking to the mail port.
NON_SMTP_VERBS = frozenset(b"GET POST CONNECT HEAD PUT OPTIONS".split())
_HEADER_LIKE = re.compile(rb"[A-Za-z][A-Za-z0-9-]*:\Z")


@dataclass(frozen=True, slots=True)
class Mode:
    """The rule set of one SMTP inspection protocol."""

    name: str
    verbs: frozenset
    esmtp: bool  # EHLO reply inspected, extensions usable
    params: bool  # MAIL/RCPT parameters may be used at all


MODES = {
    "smtp": Mode("smtp", SMTP_VERBS, esmtp=False, params=True),
    "esmtp": Mode("esmtp", ESMTP_VERBS, esmtp=True, params=True),
    "mailguard": Mode("mailguard", MAILGUARD_VERBS, esmtp=False, params=False),
}


def rewrite_illegal(line):
    """Overwrite every byte of an illegal command line with ``x``.

    The result has the same length plus CRLF, so the server answers it with
    an error and the client has to issue a valid command.
    """
    return b"x" * len(line) + b"\r\n"


def split_verb(line):
    """Return the upper-cased verb of a command line and the rest after one SP."""
    sp = line.find(b" ")
    if sp < 0:
        return line.upper(), b""
    return line[:sp].upper(), line[sp + 1 :]


def is_non_smtp(verb, rest):
    """True for an HTTP/proxy request line or a line that looks like a header."""
    return (verb in NON_SMTP_VERBS and rest != b"") or bool(_HEADER_LIKE.match(verb))


def loggable_verb(verb):
    """What a log line or a trace may say about a client's verb.

    A known SMTP verb (`KNOWN_VERBS`, or one of `NON_SMTP_VERBS`) is named;
    anything else is shown as ``(N octets)``, never its text.
    """
    if verb in KNOWN_VERBS or verb in NON_SMTP_VERBS:
        return verb.decode("ascii")
    return "(%d octets)" % len(verb)


def printable_verb(verb):
    """A verb made safe and short for a log line."""
    text = verb[:32].decode("ascii", "replace")
    return "".join(c if c.isprintable() and c != "\ufffd" else "?" for c in text)


@dataclass(slots=True)
class Extensions:
    """What the server advertised in its last EHLO reply, as relayed."""

    keywords: dict = field(default_factory=dict)  # KEYWORD (bytes) -> params list

    def has(self, keyword):
        """True when ``keyword`` was advertised to the client."""
        return keyword in self.keywords

    def params(self, keyword):
        """The parameters that came with ``keyword`` (upper-cased)."""
        return self.keywords.get(keyword, ())


class CommandError(Exception):
    """A command is syntactically or semantically illegal; ``str()`` says why."""


_XTEXT = re.compile(rb"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
_KEYWORD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_VALUE = re.compile(rb"[\x21-\x3c\x3e-\x7e]+\Z")
_PATH = re.compile(rb'<(?:[^<>"\s\\]|"(?:[^"\\\r\n]|\\.)*"|\\.)*>')
_DOMAIN = re.compile(rb"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\Z")
_BASE64 = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")

MAX_PATH = 256


# The shape nearly every MAIL and RCPT has: a plain path, then single-spaced
# parameters.  One match validates it whole; anything else (a quoted local
# part, an escape, odd spacing, an error) takes the general path below.
_SIMPLE_PATH = {
    prefix: re.compile(
        rb"(?i:%s) ?(<[^<>\"\s\\]*>)((?: [A-Za-z0-9][A-Za-z0-9-]*(?:=[\x21-\x3c\x3e-\x7e]+)?)*)\Z" % prefix)
    for prefix in (b"FROM:", b"TO:")
}


def parse_path(rest, prefix, utf8_ok):
    """Split ``FROM:<path> params`` into the path and its parameter words.

    ``prefix`` is ``b"FROM:"`` or ``b"TO:"`` (case-insensitive); one space is
    tolerated after the colon, as most servers do.
    """
    m = _SIMPLE_PATH[prefix].match(rest)
    if m is None:
        return _parse_path(rest, prefix, utf8_ok)
    path, words = m.groups()
    if len(path) > MAX_PATH or not (utf8_ok or path.isascii()):
        return _parse_path(rest, prefix, utf8_ok)  # which says why not
    return path, _params(words.split())


def _parse_path(rest, prefix, utf8_ok):
    """`parse_path` of any line: each part checked in turn, the first problem named."""
    if rest[: len(prefix)].upper() != prefix:
        raise CommandError("expected %s" % prefix.decode())
    rest = rest[len(prefix) :]
    if rest[:1] == b" ":
        rest = rest[1:]
    m = _PATH.match(rest)
    if m is None:
        raise CommandError("bad path syntax")
    path = m.group()
    if len(path) > MAX_PATH:
        raise CommandError("path longer than %d octets" % MAX_PATH)
    if not utf8_ok and not path.isascii():
        raise CommandError("non-ASCII path without SMTPUTF8")
    tail = rest[m.end() :]
    if tail and tail[:1] != b" ":
        raise CommandError("junk after path")
    words = tail.split()
    for word in words:
        key, eq, value = word.partition(b"=")
        if not _KEYWORD.match(key):
            raise CommandError("bad parameter keyword")
        if eq and not _VALUE.match(value):
            raise CommandError("bad parameter value")
    return path, _params(words)


def _params(words):
    """ESMTP parameters (each already valid) by upper-case keyword; a keyword given twice is refused."""
    params = {}
    for word in words:
        key, eq, value = word.partition(b"=")
        key = key.upper()
        if key in params:
            raise CommandError("duplicate parameter %s" % key.decode())
        params[key] = value if eq else None
    return params


def _need(ext, keyword, param):
    if not ext.has(keyword):
        raise CommandError("%s= without %s advertised" % (param, keyword.decode()))


def _xtext(value, limit, name):
    if value is None or not _XTEXT.match(value) or len(value) > limit:
        raise CommandError("bad %s value" % name)


def _mail_size(value, ext):
    _need(ext, b"SIZE", "SIZE")
    if value is None or not value.isdigit() or len(value) > 20:
        raise CommandError("bad SIZE value")
    return int(value)


def _mail_body(value, ext):
    body = (value or b"").upper()
    if body == b"BINARYMIME":
        _need(ext, b"BINARYMIME", "BODY")
    elif body in (b"7BIT", b"8BITMIME"):
        _need(ext, b"8BITMIME", "BODY")
    else:
        raise CommandError("bad BODY value")
    return body


def _mail_ret(value, ext):
    _need(ext, b"DSN", "RET")
    if (value or b"").upper() not in (b"FULL", b"HDRS"):
        raise CommandError("bad RET value")


def _mail_envid(value, ext):
    _need(ext, b"DSN", "ENVID")
    _xtext(value, 100, "ENVID")


def _mail_auth(value, ext):
    _need(ext, b"AUTH", "AUTH")
    if value != b"<>":
        _xtext(value, 500, "AUTH")


def _mail_smtputf8(value, ext):
    _need(ext, b"SMTPUTF8", "SMTPUTF8")
    if value is not None:
        raise CommandError("SMTPUTF8 takes no value")


#: The MAIL parameters: each one's check, given its value and what was
#: advertised; it raises `CommandError`, or returns what MAIL needs to know.
MAIL_PARAMETERS = {
    b"SIZE": _mail_size,  # RFC 1870
    b"BODY": _mail_body,  # RFC 6152, RFC 3030
    b"RET": _mail_ret,  # RFC 3461
    b"ENVID": _mail_envid,  # RFC 3461
    b"AUTH": _mail_auth,  # RFC 4954
    b"SMTPUTF8": _mail_smtputf8,  # RFC 6531
}


def check_mail(rest, ext, mode):
    """Validate MAIL FROM; return the declared SIZE (or None) and BODY type."""
    return check_mail_from(rest, ext, mode)[1:]


def check_mail_from(rest, ext, mode):
    """`check_mail`, with the reverse-path first: ``(path, size, body)`` from one parse."""
    path, params = parse_path(rest, b"FROM:", ext.has(b"SMTPUTF8"))
    if params and not mode.params:
        raise CommandError("parameters not allowed")
    size = None
    body = b"7BIT"
    for key, value in params.items():
        check = MAIL_PARAMETERS.get(key)
        if check is None:
            raise CommandError("unknown MAIL parameter %s" % key.decode("ascii", "replace"))
        result = check(value, ext)
        if key == b"SIZE":
            size = result
        elif key == b"BODY":
            body = result
    return path, size, body


_NOTIFY = frozenset((b"SUCCESS", b"FAILURE", b"DELAY"))


def check_rcpt(rest, ext, mode):
    """Validate RCPT TO and its parameters."""
    path, params = parse_path(rest, b"TO:", ext.has(b"SMTPUTF8"))
    if params and not mode.params:
        raise CommandError("parameters not allowed")
    for key, value in params.items():
        if key == b"NOTIFY":
            _need(ext, b"DSN", "NOTIFY")
            words = (value or b"").upper().split(b",")
            if words != [b"NEVER"] and (
                not set(words) <= _NOTIFY or len(set(words)) != len(words)
            ):
                raise CommandError("bad NOTIFY value")
        elif key == b"ORCPT":
            _need(ext, b"DSN", "ORCPT")
            kind, semi, addr = (value or b"").partition(b";")
            if not semi or not _KEYWORD.match(kind):
                raise CommandError("bad ORCPT value")
            _xtext(addr, 500, "ORCPT")
        else:
            raise CommandError("unknown RCPT parameter %s" % key.decode("ascii", "replace"))


def check_etrn(rest, ext):
    """Validate ETRN (RFC 1985): a domain, ``@domain`` or ``#queue``."""
    if not ext.has(b"ETRN"):
        raise CommandError("ETRN not advertised")
    node = rest[1:] if rest[:1] in (b"@", b"#") else rest
    if rest[:1] == b"#":
        if not node or not _VALUE.match(node):
            raise CommandError("bad ETRN queue")
    elif not _DOMAIN.match(node):
        raise CommandError("bad ETRN node")


def check_auth(rest, ext):
    """Validate AUTH mechanism [initial-response] against the advertisement."""
    mech, _, initial = rest.partition(b" ")
    if not ext.has(b"AUTH"):
        raise CommandError("AUTH not advertised")
    if mech.upper() not in ext.params(b"AUTH"):
        raise CommandError("mechanism not advertised")
    if initial and initial != b"=" and not _BASE64.match(initial):
        raise CommandError("bad initial response")


def check_sasl_response(line):
    """True when a line is a valid SASL response: base64, or ``*`` to cancel."""
    return line == b"*" or bool(_BASE64.match(line))


def parse_bdat(rest):
    """Parse ``n [LAST]``; return ``(n, last)`` or raise `CommandError`."""
    words = rest.split(b" ")
    if not words[0].isdigit() or len(words[0]) > 20:
        raise CommandError("bad BDAT size")
    if len(words) == 1:
        return int(words[0]), False
    if len(words) == 2 and words[1].upper() == b"LAST":
        return int(words[0]), True
    raise CommandError("bad BDAT arguments")


def command_limit(verb, ext, base):
    """The longest line ``verb`` may use, CRLF included (RFC 1869 growth)."""
    if verb == b"MAIL":
        return base + (500 if ext.has(b"AUTH") else 0) + (100 if ext.has(b"DSN") else 0)
    if verb == b"RCPT":
        return base + (500 if ext.has(b"DSN") else 0)
    return base
