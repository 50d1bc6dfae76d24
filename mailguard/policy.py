"""
The gateway's policy: an INI file parsed once, at start-up, into frozen value objects.

Nothing downstream of L{parse_policy} reads the INI text: the rest of mailguard
sees only L{Policy}, L{GlobalSettings}, L{Rule} and L{Listener}.  Every mistake
in the file raises L{PolicyError}, whose text is one line naming the file, the
section, the key and the problem, e.g.::

    etc/policy.ini: [inspect OUT-IN] max-data: bad value 'abc': expected a whole number >= 1

The keys of each section are described by one table (L{GLOBAL_KEYS},
L{INSPECT_KEYS}, L{LISTENER_KEYS}): a new key is a new row.  The policy
reference in the README is written from those tables.
"""

from __future__ import annotations

import configparser
import os
import re
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Callable, Collection, Mapping

__all__ = [
    "BUILTIN_PROTOCOLS",
    "DEFAULT_EHLO_KEYWORDS",
    "EMBEDDED",
    "REQUIRED",
    "GLOBAL_KEYS",
    "INSPECT_KEYS",
    "LISTENER_KEYS",
    "Derived",
    "GlobalSettings",
    "KeySpec",
    "Listener",
    "Policy",
    "PolicyError",
    "Rule",
    "load_policy",
    "parse_policy",
]

BUILTIN_PROTOCOLS: frozenset[str] = frozenset({"esmtp", "mailguard", "smtp", "tcp"})
"""The inspection protocols mailguard knows without plugins."""

_DEFAULT_EHLO_TEXT = (
    "SIZE PIPELINING 8BITMIME BINARYMIME CHUNKING DSN ENHANCEDSTATUSCODES "
    "ETRN AUTH SMTPUTF8 HELP"
)

DEFAULT_EHLO_KEYWORDS: frozenset[str] = frozenset(_DEFAULT_EHLO_TEXT.split())
"""The ESMTP keywords a rule lets through when its policy names none."""

EMBEDDED = "embedded"
"""The C{backend} value that delivers into mailguard's own maildir."""


# Everything str.splitlines() would split on, with the spaces around it.
_LINE_BREAK = re.compile(r"\s*[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]\s*")


class PolicyError(Exception):
    """
    The policy file cannot be used.

    C{str()} of this exception is always exactly one line, in the form
    C{PATH: [SECTION] KEY: PROBLEM}; the C{[SECTION]} and C{KEY} parts are
    left out when the problem is not tied to them.

    @ivar path: The policy file's name, as given to the parser.
    @ivar section: The section header as written (without brackets), or
        L{None}.
    @ivar key: The key, lower-cased, or L{None}.
    @ivar problem: What is wrong, in words.
    """

    def __init__(
        self, path: str, section: str | None, key: str | None, problem: str
    ) -> None:
        super().__init__(path, section, key, problem)
        self.path = path
        self.section = section
        self.key = key
        self.problem = problem

    def __str__(self) -> str:
        where = self.path
        if self.section is not None:
            where += f": [{self.section}]"
            if self.key is not None:
                where += f" {self.key}"
        elif self.key is not None:
            where += f": {self.key}"
        # Exception texts from Twisted and the OS may hold newlines; the
        # one-line promise matters more than their layout.
        return _LINE_BREAK.sub(" ", f"{where}: {self.problem}")


@dataclass(frozen=True, slots=True)
class GlobalSettings:
    """
    The C{[global]} section: gateway-wide limits, timers and defaults.

    Thresholds count connections (half-open, or opened in the last minute);
    times are in seconds except C{block_time}, which is in minutes.
    """

    max_incomplete_high: int = 500
    max_incomplete_low: int = 400
    one_minute_high: int = 500
    one_minute_low: int = 400
    max_incomplete_host: int = 50
    block_time: int = 0
    synwait_time: int = 30
    finwait_time: int = 5
    idle_time: int = 3600
    alert: bool = True
    audit_trail: bool = False
    status: str | None = None
    debug: frozenset[str] = frozenset()
    workers: int = 1
    spool_directory: str | None = None
    """Where messages wait for their filters' verdict (absolute), or None for var/spool in the working directory."""
    log_format: str = "text"
    log_rotate_size: int = 1_000_000
    control_socket: str | None = "var/run/mailguard.sock"


@dataclass(frozen=True, slots=True)
class Rule:
    """
    One C{[inspect NAME]} section: how a listener inspects its sessions.

    Byte limits count the line's CRLF.  The defaults are those a policy file
    gets when it leaves a key out, except that C{mask_banner} there depends on
    the protocol and C{alert}, C{audit_trail} and C{timeout} come from
    C{[global]}.
    """

    name: str
    protocol: str
    max_data: int = 20_000_000
    alert: bool = True
    audit_trail: bool = False
    timeout: int = 3600
    mask_banner: str = "off"
    ehlo_keywords: frozenset[str] = DEFAULT_EHLO_KEYWORDS
    max_recipients: int = 100
    max_command_line: int = 512
    max_reply_line: int = 512
    bare_newline: str = "normalize"
    pregreet: str = "reject"
    max_bad_commands: int = 10
    tls: str = "strip"
    tls_certificate: str | None = None
    tls_key: str | None = None
    backend_tls: str = "opportunistic"
    backend_ca: str | None = None
    backend_hostname: str | None = None
    filters: tuple = ()
    """The rule's message filters, in the order they run (L{mailguard.filters.FilterConfig})."""
    milters: tuple = ()
    """The rule's milters (C{[milter NAME]} sections as L{mailguard.filters.FilterConfig}), in order."""
    matches: tuple = ()
    """The rule's content rules: C{()}, or one L{mailguard.filters.FilterConfig} holding its
    C{[match NAME]} sections (C{options["matches"]}), run first in the filter chain."""
    quarantine: str | None = None
    """The Maildir quarantined messages go to (absolute path), or None for var/quarantine in the working directory."""
    auth_requires_tls: bool | None = None
    """AUTH only inside TLS; left out (L{None}) it becomes what the policy's
    default is: L{True} with C{tls = terminate}, else L{False}."""
    tls_ciphers: str = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL"
    command_timeout: int = 300
    min_data_rate: tuple[int, int] = (500, 30)
    """Octets per second, and the window in seconds it is averaged over;
    C{(0, 30)} turns the check off."""
    options: Mapping[str, object] = field(default_factory=lambda: _NO_OPTIONS, hash=False)
    """The keys the rule's protocol plugin defines (e.g. C{secure-login}),
    parsed by its factory: a read-only mapping by key, holding every key of
    the protocol (defaults included), or empty."""


    def __post_init__(self) -> None:
        if self.auth_requires_tls is None:
            object.__setattr__(self, "auth_requires_tls", self.tls == "terminate")


_NO_OPTIONS: Mapping[str, object] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Listener:
    """
    One C{[listener NAME]} section: where to accept, where to relay, which rule.

    C{listen} and C{backend} are Twisted endpoint descriptions as written in
    the policy (C{backend} may instead be L{EMBEDDED}); C{maildir} is an
    absolute path when C{backend} is L{EMBEDDED}, and L{None} otherwise.
    """

    name: str
    listen: str
    backend: str
    rule: Rule
    maildir: str | None = None
    backend_proxy_protocol: str = "off"
    xclient: bool = False


@dataclass(frozen=True, slots=True)
class Policy:
    """
    A whole, validated policy file.

    C{rules} and C{listeners} keep the order of the file.
    """

    path: str
    settings: GlobalSettings
    rules: tuple[Rule, ...]
    listeners: tuple[Listener, ...]
    milters: tuple = ()
    """Every C{[milter NAME]} section, used by a rule or not (L{mailguard.filters.FilterConfig})."""
    match_names: tuple[str, ...] = ()
    """Every C{[match NAME]} section's name, in the file's order."""

    def rule(self, name: str) -> Rule:
        """
        Return the rule called C{name}.

        @raise KeyError: if the policy has no such rule.
        """
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)


# --- Parsing one value ------------------------------------------------------


class _KeyProblem(Exception):
    """
    A value (or a combination of values) is wrong; the caller adds where.

    @ivar key: The key to blame when it is not the one being parsed.
    """

    def __init__(self, problem: str, key: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.key = key


def _bad(raw: str, expected: str) -> _KeyProblem:
    """
    Build the usual problem for a value that does not parse.
    """
    return _KeyProblem(f"bad value {raw!r}: {expected}")


@dataclass(frozen=True, slots=True)
class _Context:
    """
    What value parsers may need beyond the raw text.
    """

    protocols: frozenset[str]
    base_dir: str
    settings: GlobalSettings | None = None
    rules: Mapping[str, Rule] = field(default_factory=dict)
    sections: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    filter_plugins: Mapping[str, object] | None = None


_Parse = Callable[[str, _Context], object]


def _whole(minimum: int) -> _Parse:
    """
    Make a parser for a decimal whole number no smaller than C{minimum}.
    """
    expected = f"expected a whole number >= {minimum}"

    def parse(raw: str, context: _Context) -> int:
        # int() alone would also take "+5", " 5" and "1_000".
        if re.fullmatch(r"[0-9]+", raw) is None or int(raw) < minimum:
            raise _bad(raw, expected)
        return int(raw)

    return parse


_BOOLEANS = {
    "on": True, "yes": True, "true": True, "1": True,
    "off": False, "no": False, "false": False, "0": False,
}


def _boolean(raw: str, context: _Context) -> bool:
    """
    Parse on/off, yes/no, true/false or 1/0, in any case.
    """
    try:
        return _BOOLEANS[raw.lower()]
    except KeyError:
        raise _bad(raw, "expected on or off (or yes/no, true/false, 1/0)") from None


def _choice(*names: str) -> _Parse:
    """
    Make a parser for one word out of C{names}, in any case.
    """
    expected = "expected one of " + ", ".join(names)

    def parse(raw: str, context: _Context) -> str:
        if raw.lower() not in names:
            raise _bad(raw, expected)
        return raw.lower()

    return parse


def _protocol(raw: str, context: _Context) -> str:
    """
    Parse the one inspection protocol of a rule.

    Several names may be written (separated by commas or spaces) only to be
    refused: SMTP and ESMTP together get the dedicated message, because that
    is the mistake the PIX-style configuration invites.
    """
    words = [word for word in re.split(r"[\s,]+", raw) if word]
    lowered = {word.lower() for word in words}
    if {"smtp", "esmtp"} <= lowered:
        raise _KeyProblem(
            "SMTP and ESMTP inspection cannot be configured simultaneously"
        )
    known = ", ".join(sorted(context.protocols))
    for word in words:
        if word.lower() not in context.protocols:
            raise _KeyProblem(f"unknown protocol {word!r} (known: {known})")
    if len(lowered) != 1:
        raise _bad(raw, f"expected exactly one of {known}")
    return lowered.pop()


_KEYWORD = re.compile(r"[A-Z0-9][A-Z0-9-]*")


def _keywords(raw: str, context: _Context) -> frozenset[str]:
    """
    Parse a list of ESMTP keywords (RFC 5321 C{ehlo-keyword}), upper-cased.

    An empty list is allowed: the rule then advertises no extensions.
    """
    keywords = frozenset(word.upper() for word in re.split(r"[\s,]+", raw) if word)
    for keyword in sorted(keywords):
        if _KEYWORD.fullmatch(keyword) is None:
            raise _bad(
                raw,
                f"expected ESMTP keywords of letters, digits and '-' "
                f"({keyword!r} is not one)",
            )
    return keywords


def _endpoint_problem(kind: str, raw: str, make: Callable[[], object]) -> None:
    """
    Raise the one-line problem if constructing an endpoint from C{raw} fails.
    """
    try:
        make()
    except Exception as e:
        # Endpoint plugins raise whatever they like; the user needs its text.
        reason = str(e) or type(e).__name__
        raise _bad(raw, f"not a valid {kind} endpoint description ({reason})")


def _server_endpoint(raw: str, context: _Context) -> str:
    """
    Check a Twisted server endpoint description and keep it as written.

    The endpoint is built with no reactor, which Twisted's own parsers
    accept; it is thrown away, because the service builds the real one.
    """
    # Imported here so that reading a policy's module stays cheap for
    # twistd's plugin scan.
    from mailguard.endpoints import check_server

    _endpoint_problem("server", raw, lambda: check_server(raw))
    return raw


def _backend(raw: str, context: _Context) -> str:
    """
    Parse C{embedded}, or check a Twisted client endpoint description.
    """
    if raw.lower() == EMBEDDED:
        return EMBEDDED
    from mailguard.endpoints import EndpointError, check_client

    def check() -> None:
        problem = check_client(raw)
        if problem is not None:
            raise EndpointError(problem)

    _endpoint_problem("client", raw, check)
    return raw


def _rule_reference(raw: str, context: _Context) -> Rule:
    """
    Resolve the name of an C{[inspect NAME]} section to its rule.
    """
    try:
        return context.rules[raw]
    except KeyError:
        raise _KeyProblem(f"no [inspect {raw}] section") from None


def _file(raw: str, context: _Context) -> str:
    """
    Resolve a file path against the base directory and check it is readable.
    """
    from mailguard.tls import readable

    if not raw:
        raise _bad(raw, "expected a file path")
    path = os.path.normpath(os.path.join(context.base_dir, raw))
    if not readable(path):
        raise _bad(raw, f"cannot read {path}")
    return path


def _text(raw: str, context: _Context) -> str:
    """
    A non-empty word.
    """
    if not raw or any(c.isspace() for c in raw):
        raise _bad(raw, "expected one word")
    return raw


def _none(description: str) -> "Derived":
    """
    A default of L{None}, described for the policy reference.
    """
    return Derived(description, lambda values, context: None)


_STARTTLS_PROTOCOLS = frozenset({"esmtp", "pop3", "imap"})
"""The protocols whose inspectors handle C{tls} (STARTTLS, STLS)."""


def _check_tls(values: Mapping[str, object]) -> None:
    """
    Check the TLS keys of a rule together: mode, protocol and files.
    """
    from mailguard.tls import TLSConfigError, check_server_files

    tls = values["tls"]
    if tls != "strip" and values["protocol"] not in _STARTTLS_PROTOCOLS:
        protocol = values["protocol"]
        if protocol in ("smtp", "mailguard"):
            problem = f"needs protocol = esmtp (STARTTLS is an illegal command with protocol = {protocol})"
        else:
            problem = f"needs protocol = esmtp, pop3 or imap (protocol = {protocol} has no STARTTLS)"
        raise _KeyProblem(f"tls = {tls} {problem}", key="tls")
    cert, key = values["tls_certificate"], values["tls_key"]
    if tls == "terminate" and cert is None:
        raise _KeyProblem("tls = terminate needs tls-certificate and tls-key", key="tls")
    if (cert is None) != (key is None):
        missing = "tls-key" if key is None else "tls-certificate"
        raise _KeyProblem(f"{missing} is missing", key=missing)
    if cert is not None:
        try:
            check_server_files(cert, key)
        except TLSConfigError as e:
            raise _KeyProblem(str(e), key="tls-certificate") from None


def _ciphers(raw: str, context: _Context) -> str:
    """
    An OpenSSL cipher list for TLS 1.2, which OpenSSL must accept and match.
    """
    from OpenSSL import SSL
    from twisted.internet import ssl

    try:
        SSL.Context(SSL.TLS_METHOD).set_cipher_list(raw.encode("ascii"))
        # What the gateway will build: Twisted keeps only the ciphers it can use.
        ssl.CertificateOptions(acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(raw))
    except (SSL.Error, UnicodeError, ValueError):
        raise _bad(raw, "expected an OpenSSL cipher list that names at least one usable cipher") from None
    return raw


def _data_rate(raw: str, context: _Context) -> tuple[int, int]:
    """
    C{OCTETS} or C{OCTETS/SECONDS}: a minimum rate and its averaging window (default 30 s).
    """
    m = re.fullmatch(r"([0-9]+)(?:/([0-9]+))?", raw)
    if m is None or (m.group(2) is not None and int(m.group(2)) < 1):
        raise _bad(raw, "expected octets per second, optionally /SECONDS (e.g. 500/30)")
    return int(m.group(1)), int(m.group(2) or 30)


def _directory(raw: str, context: _Context) -> str:
    """
    Make a directory path absolute against the policy's base directory.
    """
    if not raw:
        raise _bad(raw, "expected a directory path")
    return os.path.normpath(os.path.join(context.base_dir, raw))


def _references(kind: str, raw: str, context: _Context) -> tuple:
    """
    Resolve a comma-separated list of C{[KIND NAME]} section names, in order.
    """
    names = [name.strip() for name in raw.split(",") if name.strip()]
    found = context.sections.get(kind, {})
    seen = set()
    values = []
    for name in names:
        if name in seen:
            raise _KeyProblem(f"{name!r} is listed twice")
        seen.add(name)
        try:
            values.append(found[name])
        except KeyError:
            raise _KeyProblem(f"no [{kind} {name}] section") from None
    return tuple(values)


def _check_filters(values: Mapping[str, object]) -> None:
    """
    Message filters need an SMTP inspection protocol.
    """
    if values.get("matches") and values["protocol"] not in ("smtp", "esmtp", "mailguard"):
        raise _KeyProblem(
            f"content rules need protocol = smtp, esmtp or mailguard (not {values['protocol']})",
            key="match",
        )
    if values["filters"] and values["protocol"] not in ("smtp", "esmtp", "mailguard"):
        raise _KeyProblem(
            f"message filters need protocol = smtp, esmtp or mailguard (not {values['protocol']})",
            key="filters",
        )


def _check_milters(values: Mapping[str, object]) -> None:
    """
    Milters need an SMTP inspection protocol.
    """
    if values["milters"] and values["protocol"] not in ("smtp", "esmtp", "mailguard"):
        raise _KeyProblem(
            f"milters need protocol = smtp, esmtp or mailguard (not {values['protocol']})",
            key="milters",
        )


# --- The key tables ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Derived:
    """
    A default computed from other values rather than written out.

    @ivar description: How the README states the default.
    @ivar compute: Called with the section's values so far (by field name)
        and the parsing context; returns the value.
    """

    description: str
    compute: Callable[[Mapping[str, object], _Context], object]


REQUIRED = object()
"""The default of a key that a section must give."""


@dataclass(frozen=True, slots=True)
class KeySpec:
    """
    One row of a section's key table.

    @ivar parse: Turns the value's text into the field's value, or raises
        the problem.
    @ivar default: The INI text used when the key is absent (parsed by
        C{parse}, so defaults obey the same rules as written values), a
        L{Derived}, or L{REQUIRED}.
    @ivar description: One sentence for the policy reference.
    @ivar field: The value object's field, when it is not the key with
        C{-} turned into C{_}.
    """

    parse: _Parse
    default: object
    description: str
    field: str | None = None

    def field_for(self, key: str) -> str:
        """
        Return the name of the value object's field set by C{key}.
        """
        return self.field or key.replace("-", "_")


def _inherit(key: str) -> Derived:
    """
    A default taken from the C{[global]} key of the same meaning.
    """
    name = key.replace("-", "_")
    return Derived(
        f"[global] {key}",
        lambda values, context: getattr(context.settings, name),
    )


def _table(**rows: KeySpec) -> Mapping[str, KeySpec]:
    """
    Freeze a key table written with Python names into INI key names.
    """
    return MappingProxyType({name.replace("_", "-"): spec for name, spec in rows.items()})


_DEBUG_FACILITIES = frozenset({"smtp"})


def _whole_range(low: int, high: int) -> "_Parse":
    """
    A whole number from C{low} to C{high}.
    """
    check = _whole(low)

    def parse(raw: str, context: _Context) -> int:
        value = check(raw, context)
        if value > high:
            raise _bad(raw, f"expected a whole number from {low} to {high}")
        return value

    return parse


def _debug_facilities(raw: str, context: _Context) -> frozenset[str]:
    """
    Parse a list of debug facilities (today only C{smtp}); empty means none.
    """
    words = frozenset(word.lower() for word in re.split(r"[\s,]+", raw) if word)
    unknown = sorted(words - _DEBUG_FACILITIES)
    if unknown:
        known = ", ".join(sorted(_DEBUG_FACILITIES))
        raise _bad(raw, f"expected debug facilities out of {known} ({unknown[0]!r} is not one)")
    return words


def _control_socket(raw: str, context: _Context) -> str | None:
    """
    The control socket's path, made absolute like a maildir; C{off} for none.
    """
    if raw.lower() == "off":
        return None
    if not raw:
        raise _bad(raw, "expected a socket path, or off")
    # Kept relative: it is where the gateway runs (and short, as socket names must be).
    return os.path.normpath(raw)


GLOBAL_KEYS: Mapping[str, KeySpec] = _table(
    max_incomplete_high=KeySpec(
        _whole(1), "500",
        "Half-open sessions at which the gateway starts dropping the oldest.",
    ),
    max_incomplete_low=KeySpec(
        _whole(1), "400",
        "Half-open sessions below which it stops dropping (at most max-incomplete-high).",
    ),
    one_minute_high=KeySpec(
        _whole(1), "500",
        "New half-open sessions per minute at which the gateway starts dropping.",
    ),
    one_minute_low=KeySpec(
        _whole(1), "400",
        "New half-open sessions per minute below which it stops (at most one-minute-high).",
    ),
    max_incomplete_host=KeySpec(
        _whole(1), "50",
        "Half-open sessions allowed from one client host.",
    ),
    block_time=KeySpec(
        _whole(0), "0",
        "Minutes to refuse a host that exceeded max-incomplete-host (0: only drop the excess).",
    ),
    synwait_time=KeySpec(
        _whole(1), "30",
        "Seconds a session may take to become established.",
    ),
    finwait_time=KeySpec(
        _whole(1), "5",
        "Seconds to wait for the other side to close once one side has.",
    ),
    idle_time=KeySpec(
        _whole(1), "3600",
        "Seconds an idle session is kept; the default timeout of every rule.",
    ),
    alert=KeySpec(
        _boolean, "on",
        "Log an alert for each violation; the default of every rule.",
    ),
    audit_trail=KeySpec(
        _boolean, "off",
        "Log a record of each session; the default of every rule.",
    ),
    status=KeySpec(
        _server_endpoint, Derived("off", lambda values, context: None),
        "Where the status endpoint (/metrics, /sessions) listens: a Twisted server "
        "endpoint description, e.g. tcp:8025:interface=127.0.0.1; off when absent.",
    ),
    workers=KeySpec(
        _whole_range(1, 64), "1",
        "Worker processes sharing the listening ports (SO_REUSEPORT); thresholds are split between them.",
    ),
    debug=KeySpec(
        _debug_facilities, "",
        "Debug traces to log: smtp (each command and reply: verb, length, state, code).",
    ),
    spool_directory=KeySpec(
        _directory, _none("var/spool"),
        "Private directory (mode 0700) where messages wait for their filters' verdict; "
        "relative to the gateway's working directory.",
    ),
    log_format=KeySpec(
        _choice("text", "json", "ios"), "text",
        "How log lines look: text (twistd's), json (one object per line) or ios "
        "(%FW-<severity>-<TAG>:, no timestamp); an explicit twistd --logger wins.",
    ),
    log_rotate_size=KeySpec(
        _whole(0), "1000000",
        "Bytes at which the log file (--logfile) is rotated, as twistd does; "
        "0: never (leave it to logrotate and SIGUSR1).",
    ),
    control_socket=KeySpec(
        _control_socket, "var/run/mailguard.sock",
        "The control socket (unix, mode 0600) of mailguard clear and mailguard debug, "
        "relative to the gateway's working directory; off: none.",
    ),
)
"""The keys of C{[global]}, in the order of the policy reference."""


INSPECT_KEYS: Mapping[str, KeySpec] = _table(
    protocol=KeySpec(
        _protocol, REQUIRED,
        "The inspection to apply: smtp, esmtp, mailguard, tcp, pop3, imap "
        "or an installed plugin's protocol (one only).",
    ),
    max_data=KeySpec(
        _whole(1), "20000000",
        "Largest message accepted, in bytes.",
    ),
    alert=KeySpec(
        _boolean, _inherit("alert"),
        "Log an alert for each violation.",
    ),
    audit_trail=KeySpec(
        _boolean, _inherit("audit-trail"),
        "Log a record of each session.",
    ),
    timeout=KeySpec(
        _whole(1), _inherit("idle-time"),
        "Seconds an idle session is kept.",
    ),
    mask_banner=KeySpec(
        _choice("off", "on", "pix"),
        Derived(
            "pix with protocol = mailguard, else off",
            lambda values, context: "pix" if values["protocol"] == "mailguard" else "off",
        ),
        "Hide the server's identity in its banner: off, on, or pix (PIX-style asterisks).",
    ),
    ehlo_keywords=KeySpec(
        _keywords, _DEFAULT_EHLO_TEXT,
        "ESMTP extensions passed through in the EHLO reply; others are removed.",
    ),
    max_recipients=KeySpec(
        _whole(1), "100",
        "Recipients accepted per message.",
    ),
    max_command_line=KeySpec(
        _whole(64), "512",
        "Longest client command line, in bytes with the CRLF.",
    ),
    max_reply_line=KeySpec(
        _whole(64), "512",
        "Longest server reply line, in bytes with the CRLF.",
    ),
    bare_newline=KeySpec(
        _choice("normalize", "reject"), "normalize",
        "What to do with a bare CR or LF: turn it into CRLF, or reject the message.",
    ),
    pregreet=KeySpec(
        _choice("reject", "ignore"), "reject",
        "What to do with a client that talks before the banner.",
    ),
    max_bad_commands=KeySpec(
        _whole(1), "10",
        "Refused commands after which the session is closed.",
    ),
    tls=KeySpec(
        _choice("strip", "terminate", "passthrough"), "strip",
        "STARTTLS handling (esmtp, pop3, imap): strip it, terminate TLS on both legs "
        "and keep inspecting, or pass it through uninspected.",
    ),
    tls_certificate=KeySpec(
        _file, _none("none"),
        "PEM certificate (chain allowed) the gateway shows clients; needed by tls = terminate.",
    ),
    tls_key=KeySpec(
        _file, _none("none"),
        "PEM private key of tls-certificate.",
    ),
    backend_tls=KeySpec(
        _choice("required", "opportunistic", "off"), "opportunistic",
        "With tls = terminate, how the gateway secures its own leg to the backend.",
    ),
    backend_ca=KeySpec(
        _file, _none("the system trust store"),
        "PEM CA certificates the backend's certificate is verified against.",
    ),
    backend_hostname=KeySpec(
        _text, _none("the backend endpoint's host"),
        "Name the backend's certificate must carry (backend-tls = required).",
    ),
    match=KeySpec(
        lambda raw, context: _rule_matches(raw, context), "",
        "Content rules ([match NAME] sections, separated by commas), tried in this order; "
        "the first firing match whose action is not log decides.",
        field="matches",
    ),
    filters=KeySpec(
        lambda raw, context: _references("filter", raw, context), "",
        "Message filters ([filter NAME] sections, separated by commas), run in this order "
        "on the envelope and on each whole message before the server sees it.",
    ),
    milters=KeySpec(
        lambda raw, context: _references("milter", raw, context), "",
        "Milters ([milter NAME] sections, separated by commas), called in this order after the "
        "content rules and before the filters.",
    ),
    quarantine=KeySpec(
        _directory, _none("var/quarantine"),
        "Maildir where messages a filter quarantines are kept; relative to the gateway's working directory.",
    ),
    auth_requires_tls=KeySpec(
        _boolean,
        Derived("yes with tls = terminate, else no",
                lambda values, context: values["tls"] == "terminate"),
        "Offer and accept AUTH only once the client's leg is TLS (530 5.7.0 before).",
    ),
    tls_ciphers=KeySpec(
        _ciphers, "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL",
        "TLS 1.2 cipher list (OpenSSL syntax) of tls = terminate and of ssl: listeners.",
    ),
    command_timeout=KeySpec(
        _whole(1), "300",
        "Seconds within which a command line must be complete once its first byte came.",
    ),
    min_data_rate=KeySpec(
        _data_rate, "500/30",
        "Least octets per second of message data (DATA, BDAT), averaged over "
        "the /SECONDS window (default 30); 0 turns it off.",
    ),
)
"""The keys of C{[inspect NAME]}, in the order of the policy reference."""


def _default_maildir(values: Mapping[str, object], context: _Context) -> str | None:
    """
    Default the maildir only for listeners that deliver into one.
    """
    if values["backend"] != EMBEDDED:
        return None
    return _directory("var/maildir", context)


LISTENER_KEYS: Mapping[str, KeySpec] = _table(
    listen=KeySpec(
        _server_endpoint, REQUIRED,
        "Where clients connect: a Twisted server endpoint description, "
        "e.g. tcp:25:interface=192.0.2.1.",
    ),
    backend=KeySpec(
        _backend, REQUIRED,
        "Where mail is relayed: a Twisted client endpoint description, "
        "e.g. tcp:host=10.0.0.2:port=25, or embedded.",
    ),
    inspect=KeySpec(
        _rule_reference, REQUIRED,
        "The NAME of the [inspect NAME] section applied to this listener.",
        field="rule",
    ),
    maildir=KeySpec(
        _directory, Derived("var/maildir with backend = embedded", _default_maildir),
        "Directory messages are delivered to, only with backend = embedded; "
        "relative to the gateway's working directory.",
    ),
    backend_proxy_protocol=KeySpec(
        _choice("off", "v1", "v2"), "off",
        "Open each backend connection with a PROXY protocol header naming the real client.",
    ),
    xclient=KeySpec(
        _boolean, "off",
        "Send XCLIENT with the real client's address when the backend offers it (SMTP modes).",
    ),
)
"""The keys of C{[listener NAME]}, in the order of the policy reference."""


def _seconds(raw: str, context: _Context) -> float:
    """
    A positive number of seconds (fractions allowed).
    """
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", raw) is None or float(raw) <= 0:
        raise _bad(raw, "expected a number of seconds > 0")
    return float(raw)


FILTER_KEYS: Mapping[str, KeySpec] = _table(
    plugin=KeySpec(
        _text, REQUIRED,
        "The installed filter plugin this section configures.",
    ),
    timeout=KeySpec(
        _seconds, "30",
        "Seconds the filter may take to answer one step; keep it below the server's own DATA timeout.",
    ),
    default_action=KeySpec(
        _choice("tempfail", "accept", "reject"), "tempfail",
        "The answer used when the filter is down, too slow or broken.",
    ),
)
"""The core keys of C{[filter NAME]}; the plugin adds its own."""


def _filter_section(path: str, header: str, name: str, items: Mapping[str, str], context: _Context) -> object:
    """
    Parse one C{[filter NAME]} section into a L{mailguard.filters.FilterConfig}.
    """
    from mailguard.filters import FilterConfig

    plugins = context.filter_plugins
    if plugins is None:
        from mailguard.filters import registry

        plugins = registry()
    table = dict(FILTER_KEYS)
    factory = None
    if "plugin" in items:
        factory = plugins.get(items["plugin"].strip().lower())
        if factory is None:
            known = ", ".join(sorted(plugins)) or "none installed"
            raise PolicyError(path, header, "plugin", f"unknown filter plugin {items['plugin']!r} (known: {known})")
        for key, default in dict(getattr(factory, "options", None) or {}).items():
            key = key.lower()
            if key not in table:
                table[key] = KeySpec(_option(factory, key), REQUIRED if default is None else default, "",
                                     field=_OPTION + key)
    values = _parse_section(path, header, items, table, context)
    options = {f[len(_OPTION):]: values.pop(f) for f in list(values) if f.startswith(_OPTION)}
    return FilterConfig(name=name, plugin=values["plugin"].lower(), timeout=values["timeout"],
                        default_action=values["default_action"], options=MappingProxyType(options),
                        factory=factory)


def _client_endpoint(raw: str, context: _Context) -> str:
    """
    Check a Twisted client endpoint description and keep it as written.
    """
    from twisted.internet.endpoints import clientFromString

    _endpoint_problem("client", raw, lambda: clientFromString(None, raw))
    return raw


MILTER_KEYS: Mapping[str, KeySpec] = _table(
    endpoint=KeySpec(
        _client_endpoint, REQUIRED,
        "Where the milter listens: a Twisted client endpoint description, "
        "e.g. tcp:host=127.0.0.1:port=11332 or unix:path=/run/milter.sock.",
    ),
    default_action=KeySpec(
        _choice("tempfail", "accept", "reject"), "tempfail",
        "The answer used when the milter is down, too slow or breaks the protocol.",
    ),
    connect_timeout=KeySpec(
        _seconds, "30",
        "Seconds to wait for the connection to the milter (Postfix's milter_connect_timeout).",
    ),
    command_timeout=KeySpec(
        _seconds, "30",
        "Seconds the milter may take to answer the negotiation, connect, HELO, MAIL, RCPT or DATA.",
    ),
    content_timeout=KeySpec(
        _seconds, "300",
        "Seconds the milter may take to answer a header, a body piece or the end of the message; "
        "keep it below the server's own DATA timeout.",
    ),
)
"""The keys of C{[milter NAME]}, in the order of the policy reference."""


def _milter_section(path: str, header: str, name: str, items: Mapping[str, str], context: _Context) -> object:
    """
    Parse one C{[milter NAME]} section into a L{mailguard.filters.FilterConfig} of the milter client.
    """
    from mailguard.filters import FilterConfig
    from mailguard.milterclient import PLUGIN, default_factory

    values = _parse_section(path, header, items, MILTER_KEYS, context)
    # The gateway's own wait is a backstop behind the client's timeouts, which answer first.
    backstop = values["connect_timeout"] + 5 * values["command_timeout"] + 2 * values["content_timeout"]
    options = {key: values[key] for key in ("endpoint", "connect_timeout", "command_timeout", "content_timeout")}
    return FilterConfig(name=name, plugin=PLUGIN, timeout=backstop, default_action=values["default_action"],
                        options=MappingProxyType(options), factory=default_factory())
def _match_section(path: str, header: str, name: str, items: Mapping[str, str], context: _Context) -> object:
    """
    Parse one C{[match NAME]} section into a L{mailguard.matching.Match}.
    """
    from mailguard.matching import parse_match_section

    return parse_match_section(path, header, name, items, context)


def _rule_matches(raw: str, context: _Context) -> tuple:
    """
    The rule key C{match}: its content-rules filter (see L{mailguard.matching.rule_matches}).
    """
    from mailguard.matching import rule_matches

    return rule_matches(raw, context)


SECTION_KINDS: Mapping[str, Callable[..., object]] = MappingProxyType({
    "filter": _filter_section,
    "milter": _milter_section,
    "match": _match_section,
})
"""Sections a rule refers to by name (C{[KIND NAME]}), each with its parser.

They are parsed before the rules, which refer to them (C{filters = A, B}).
"""


# --- Parsing the file -------------------------------------------------------

# A name no header can produce: a [DEFAULT] section then counts as unknown
# instead of silently adding its keys to every section.
_NO_DEFAULT_SECTION = "\n"

def _section_kinds() -> str:
    """
    The section headers a policy may have, for error messages.
    """
    named = [f"[{kind} NAME]" for kind in ("inspect", "listener", *SECTION_KINDS)]
    return "expected [global], " + ", ".join(named[:-1]) + " or " + named[-1]


def _read_ini(text: str, path: str) -> configparser.ConfigParser:
    """
    Read the INI syntax, turning configparser's errors into L{PolicyError}.
    """
    parser = configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=(";", "#"),
        comment_prefixes=(";", "#"),
        strict=True,
        empty_lines_in_values=False,
        default_section=_NO_DEFAULT_SECTION,
    )
    lines = text.splitlines()

    def line(number: int) -> str:
        # configparser's own rendering of the line differs between Python
        # versions; the text is at hand.
        if 1 <= number <= len(lines):
            return repr(lines[number - 1].strip())
        return "''"

    try:
        parser.read_string(text, source=path)
    except configparser.DuplicateSectionError as e:
        raise PolicyError(
            path, e.section, None, f"duplicate section (again at line {e.lineno})"
        ) from None
    except configparser.DuplicateOptionError as e:
        raise PolicyError(
            path, e.section, e.option, f"duplicate key (again at line {e.lineno})"
        ) from None
    except configparser.MissingSectionHeaderError as e:
        raise PolicyError(
            path, None, None,
            f"line {e.lineno}: {line(e.lineno)} is outside any section "
            f"({_section_kinds()})",
        ) from None
    except configparser.ParsingError as e:
        number = e.errors[0][0]
        raise PolicyError(
            path, None, None,
            f"line {number}: cannot parse {line(number)} (expected KEY = VALUE or [SECTION])",
        ) from None
    except configparser.Error as e:
        raise PolicyError(path, None, None, str(e)) from None
    return parser


def _parse_section(
    path: str,
    header: str,
    items: Mapping[str, str],
    table: Mapping[str, KeySpec],
    context: _Context,
) -> dict[str, object]:
    """
    Parse one section's keys through its table into values by field name.

    Unknown keys are reported in the file's order, then values are parsed in
    the table's order (derived defaults last, since they read the others), so
    the same file always reports the same first error.
    """

    def fail(key: str, problem: _KeyProblem) -> PolicyError:
        return PolicyError(path, header, problem.key or key, problem.problem)

    for key in items:
        if key not in table:
            raise PolicyError(path, header, key, "unknown key")
    values: dict[str, object] = {}
    derived = []
    for key, spec in table.items():
        name = spec.field_for(key)
        if key in items:
            raw = items[key]
        elif spec.default is REQUIRED:
            raise PolicyError(path, header, key, "missing required key")
        elif isinstance(spec.default, Derived):
            derived.append((key, name, spec.default))
            continue
        else:
            raw = spec.default
        try:
            values[name] = spec.parse(raw, context)
        except _KeyProblem as problem:
            raise fail(key, problem) from None
    for key, name, default in derived:
        try:
            values[name] = default.compute(values, context)
        except _KeyProblem as problem:
            raise fail(key, problem) from None
    return values


def _check_thresholds(values: Mapping[str, object]) -> None:
    """
    Refuse a low-water mark above its high-water mark.
    """
    for prefix in ("max-incomplete", "one-minute"):
        low = values[f"{prefix.replace('-', '_')}_low"]
        high = values[f"{prefix.replace('-', '_')}_high"]
        if low > high:  # type: ignore[operator]
            raise _KeyProblem(
                f"{low} is greater than {prefix}-high ({high})",
                key=f"{prefix}-low",
            )


_OPTION = "option "
"""Prefix of the value names under which a protocol's own keys are parsed."""


def _option(factory: object, key: str) -> _Parse:
    """
    Make a parser handing a protocol's own key to its factory's C{validateOption}.
    """

    def parse(raw: str, context: _Context) -> object:
        try:
            return factory.validateOption(key, raw)  # type: ignore[attr-defined]
        except ValueError as e:
            raise _bad(raw, str(e) or "not accepted by the protocol") from None

    return parse


def _rule_keys(
    path: str,
    header: str,
    items: Mapping[str, str],
    context: _Context,
    protocols: Collection[str],
) -> Mapping[str, KeySpec]:
    """
    The key table of one rule: L{INSPECT_KEYS}, plus the keys its protocol adds.

    When C{protocols} maps names to inspector factories, the keys in the
    selected factory's C{options} (with their defaults) become rows parsed
    by its C{validateOption}.  Which keys exist depends on the protocol, so
    a bad or missing protocol is reported before any key is called unknown.
    """
    if not isinstance(protocols, Mapping):
        return INSPECT_KEYS
    extra = any(key not in INSPECT_KEYS for key in items)
    if "protocol" not in items:
        if extra:
            raise PolicyError(path, header, "protocol", "missing required key")
        return INSPECT_KEYS
    try:
        protocol = _protocol(items["protocol"], context)
    except _KeyProblem as problem:
        if extra:
            raise PolicyError(path, header, problem.key or "protocol", problem.problem) from None
        return INSPECT_KEYS
    factory = {name.lower(): value for name, value in protocols.items()}[protocol]
    own = dict(getattr(factory, "options", None) or {})
    if not own:
        return INSPECT_KEYS
    table = dict(INSPECT_KEYS)
    for key, default in own.items():
        key = key.lower()
        if key not in table:
            table[key] = KeySpec(_option(factory, key), default, "", field=_OPTION + key)
    return table


def _split_header(header: str) -> tuple[str, str]:
    """
    Split a section header into its kind (lower-cased) and its name.
    """
    words = header.strip().split(None, 1)
    if not words:
        return "", ""
    if len(words) == 1:
        return words[0].lower(), ""
    return words[0].lower(), words[1]


def _group_headers(
    parser: configparser.ConfigParser, path: str
) -> tuple[str | None, dict[str, str], dict[str, str], dict[str, dict[str, str]]]:
    """
    Sort the section headers by kind: the global one, and per kind a map from name to header.

    @raise PolicyError: on an unknown kind, a missing name or a duplicate.
    """
    global_header = None
    inspect_headers: dict[str, str] = {}
    listener_headers: dict[str, str] = {}
    section_headers: dict[str, dict[str, str]] = {kind: {} for kind in SECTION_KINDS}
    by_kind = {"inspect": inspect_headers, "listener": listener_headers, **section_headers}
    for header in parser.sections():
        kind, name = _split_header(header)
        if kind == "global" and not name:
            if global_header is not None:
                raise PolicyError(
                    path, header, None, f"duplicate section (same as [{global_header}])"
                )
            global_header = header
            continue
        by_name = by_kind.get(kind)
        if by_name is None:
            raise PolicyError(path, header, None, f"unknown section ({_section_kinds()})")
        if not name:
            raise PolicyError(path, header, None, f"missing name (expected [{kind} NAME])")
        if name in by_name:
            # configparser only catches headers spelt identically.
            raise PolicyError(
                path, header, None, f"duplicate section (same as [{by_name[name]}])"
            )
        by_name[name] = header
    return global_header, inspect_headers, listener_headers, section_headers


def _parse_global(
    parser: configparser.ConfigParser, path: str, header: str | None, context: _Context
) -> GlobalSettings:
    """
    Parse the C{[global]} section (all defaults when there is none) into L{GlobalSettings}.
    """
    items = {} if header is None else dict(parser[header])
    values = _parse_section(path, header or "global", items, GLOBAL_KEYS, context)
    try:
        _check_thresholds(values)
    except _KeyProblem as problem:
        raise PolicyError(path, header or "global", problem.key, problem.problem) from None
    return GlobalSettings(**values)  # type: ignore[arg-type]


def _parse_rule(
    path: str,
    header: str,
    name: str,
    items: Mapping[str, str],
    context: _Context,
    protocols: Collection[str],
) -> Rule:
    """
    Parse one C{[inspect NAME]} section into a L{Rule}, its protocol's own keys in C{options}.
    """
    table = _rule_keys(path, header, items, context, protocols)
    values = _parse_section(path, header, items, table, context)
    options = {f[len(_OPTION):]: values.pop(f) for f in list(values) if f.startswith(_OPTION)}
    values["options"] = MappingProxyType(options)
    try:
        _check_tls(values)
        _check_filters(values)
        _check_milters(values)
    except _KeyProblem as problem:
        raise PolicyError(path, header, problem.key, problem.problem) from None
    return Rule(name=name, **values)  # type: ignore[arg-type]


def _parse_listener(
    path: str, header: str, name: str, items: Mapping[str, str], context: _Context
) -> Listener:
    """
    Parse one C{[listener NAME]} section into a L{Listener}.
    """
    values = _parse_section(path, header, items, LISTENER_KEYS, context)
    if "maildir" in items and values["backend"] != EMBEDDED:
        raise PolicyError(
            path, header, "maildir", f"only allowed with backend = {EMBEDDED}"
        )
    return Listener(name=name, **values)  # type: ignore[arg-type]


def parse_policy(
    text: str,
    path: str = "<policy>",
    base_dir: str | None = None,
    protocols: Collection[str] = BUILTIN_PROTOCOLS,
    filter_plugins: Mapping[str, object] | None = None,
) -> Policy:
    """
    Parse the text of a policy file into a L{Policy}.

    @param text: The INI text.
    @param path: The file's name, used only in error messages.
    @param base_dir: The directory relative paths are resolved against;
        the current directory (where the gateway runs) when L{None}.
    @param protocols: The names of the inspection protocols that exist
        (any collection of names, or a mapping keyed by them).  When the
        mapping's values are inspector factories, each rule also accepts
        the keys its protocol's factory defines (see L{_rule_keys}), in
        C{Rule.options}.
    @param filter_plugins: The installed message-filter factories by name
        (L{mailguard.filters.registry} when L{None}, loaded only if the
        policy has a C{[filter NAME]} section).
    @raise PolicyError: on the first mistake found.
    """
    parser = _read_ini(text, path)
    context = _Context(
        protocols=frozenset(name.lower() for name in protocols),
        base_dir=os.path.abspath(os.getcwd() if base_dir is None else base_dir),
        filter_plugins=filter_plugins,
    )

    global_header, inspect_headers, listener_headers, section_headers = _group_headers(
        parser, path
    )
    settings = _parse_global(parser, path, global_header, context)
    context = replace(context, settings=settings)

    sections: dict[str, dict[str, object]] = {}
    for kind, headers in section_headers.items():
        sections[kind] = {
            name: SECTION_KINDS[kind](path, header, name, dict(parser[header]), context)
            for name, header in headers.items()
        }
    context = replace(context, sections=MappingProxyType(sections))

    rules = {
        name: _parse_rule(path, header, name, dict(parser[header]), context, protocols)
        for name, header in inspect_headers.items()
    }
    context = replace(context, rules=MappingProxyType(rules))

    listeners = [
        _parse_listener(path, header, name, dict(parser[header]), context)
        for name, header in listener_headers.items()
    ]
    if not listeners:
        raise PolicyError(path, None, None, "no [listener NAME] section: nothing to run")

    return Policy(
        path=path,
        settings=settings,
        rules=tuple(rules.values()),
        listeners=tuple(listeners),
        milters=tuple(sections.get("milter", {}).values()),
        match_names=tuple(section_headers["match"]),
    )


def load_policy(
    path: str,
    base_dir: str | None = None,
    protocols: Collection[str] = BUILTIN_PROTOCOLS,
    filter_plugins: Mapping[str, object] | None = None,
) -> Policy:
    """
    Read the policy file at C{path} (UTF-8) and parse it with L{parse_policy}.

    @raise PolicyError: if the file cannot be read, or on its first mistake.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise PolicyError(
            path, None, None, f"cannot read policy file: {e.strerror or e}"
        ) from None
    except UnicodeDecodeError as e:
        raise PolicyError(
            path, None, None,
            f"cannot read policy file: not UTF-8 (byte {e.object[e.start]:#04x} "
            f"at offset {e.start})",
        ) from None
    return parse_policy(text, path=path, base_dir=base_dir, protocols=protocols, filter_plugins=filter_plugins)
