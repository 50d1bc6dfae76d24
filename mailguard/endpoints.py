"""Endpoint descriptions: the one reader of what ``listen``, ``backend`` and ``status`` say.

The policy names every listener, backend and status endpoint with a Twisted
endpoint description (``tcp:25:interface=127.0.0.1``, ``haproxy:tcp:25``,
``ssl:465:privateKey=key.pem``, ``unix:/run/mg.sock``...).  This module
splits them the way Twisted's own parser does (``:`` separates, ``=``
names, a backslash escapes; tested against ``twisted.internet.endpoints``),
answers what the gateway needs to know about them (the port a listener
binds, the host a backend names, whether a PROXY header comes first), and
turns what Twisted's parsers would say about a bad one into one sentence a
user can act on.  It imports nothing from the reactor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The accept backlog of every listener whose description does not set ``backlog``.
#: Twisted's default of 50 overflows under a burst of connections (the kernel
#: then drops SYNs and clients wait out retransmission backoff); HAProxy and
#: nginx use hundreds to thousands.  The kernel caps it at net.core.somaxconn.
BACKLOG = 1024

PROXY_PREFIX = "haproxy:"

#: The parameters of the endpoint kinds Twisted itself provides, positional ones first
#: (Twisted's parser signatures; `tests.test_endpoints` checks them against Twisted).
SERVER_PARAMETERS = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "backlog", "interface"),
    "ssl": ("port", "privateKey", "certKey", "sslmethod", "interface", "backlog", "extraCertChain",
            "dhParameters"),
    "unix": ("address", "mode", "backlog", "lockfile"),
    "systemd": ("domain", "index", "name"),
}
CLIENT_PARAMETERS = {
    "tcp": ("host", "port", "timeout", "bindAddress"),
    "ssl": ("host", "port", "timeout", "bindAddress", "certKey", "privateKey", "caCertsDir", "hostname"),
    "unix": ("path", "timeout", "checkPID", "lockfile"),
}
#: How many values each kind takes without a name (servers: all, in the order above).
_CLIENT_POSITIONAL = {"tcp": 2, "ssl": 2, "unix": 1}
#: Kinds whose listeners are TCP sockets with a port.
_TCP_SERVERS = ("tcp", "tcp6", "ssl")
_IPV6_HINT = re.compile(r"(?:^|[:=])[0-9A-Fa-f]{0,4}::|=[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{0,4}(?::|$)")


class EndpointError(ValueError):
    """A description Twisted cannot use; ``str()`` says why in the user's terms, on one line."""


@dataclass(frozen=True, slots=True)
class Description:
    """One endpoint description, split: ``kind`` (lower-case), positional ``args``, named ``kwargs``.

    ``proxied`` says a ``haproxy:`` prefix came first (the PROXY header is
    read by the gateway itself); ``kind`` is then the wrapped endpoint's.
    """

    kind: str
    args: tuple[str, ...]
    kwargs: tuple[tuple[str, str], ...]
    proxied: bool = False

    def get(self, name: str, position: int | None = None, default: str | None = None) -> str | None:
        """The parameter ``name``, given by name or as positional value number ``position``."""
        for key, value in self.kwargs:
            if key == name:
                return value
        if position is not None and position < len(self.args):
            return self.args[position]
        return default

    def unparse(self) -> str:
        """The description text again (without ``haproxy:``), escaped as Twisted reads it."""
        words = [self.kind] + [escape(a) for a in self.args]
        words += ["%s=%s" % (escape(k), escape(v)) for k, v in self.kwargs]
        return ":".join(words)


def escape(text: str) -> str:
    """``text`` with the characters Twisted's descriptions treat specially escaped."""
    return re.sub(r"([\\:=])", r"\\\1", text)


def split(description: str) -> tuple[str, list[str], dict[str, str]]:
    """``(first word, positional values, named values)``, exactly as Twisted's parser splits.

    ``:`` separates, the first ``=`` of a word names it, a backslash makes
    the next character literal.
    """
    parts: list[tuple[str, ...]] = []
    current: list[str] = []
    word: tuple[str, ...] = ()
    named = False
    chars = iter(description)
    for ch in chars:
        if ch == "\\":
            current.append(next(chars, ""))
        elif ch == ":":
            parts.append(word + ("".join(current),))
            current, word, named = [], (), False
        elif ch == "=" and not named:
            word, current, named = ("".join(current),), [], True
        else:
            current.append(ch)
    parts.append(word + ("".join(current),))
    args = [p[0] for p in parts if len(p) == 1]
    kwargs = {p[0]: p[1] for p in parts if len(p) == 2}
    return args[0] if args else "", args[1:], kwargs


def parse(description: str) -> Description:
    """Split ``description``, noting and removing a leading ``haproxy:``."""
    proxied = description.lower().startswith(PROXY_PREFIX)
    if proxied:
        description = description[len(PROXY_PREFIX):]
    kind, args, kwargs = split(description)
    return Description(kind.lower(), tuple(args), tuple(kwargs.items()), proxied)


def proxied(description: str) -> bool:
    """True when a PROXY protocol header comes first (``haproxy:`` prefix)."""
    return description.lower().startswith(PROXY_PREFIX)


def bind_description(description: str, backlog: int = BACKLOG) -> str:
    """What to hand to Twisted to listen on ``description``.

    The ``haproxy:`` prefix goes (the gateway reads the PROXY header
    itself, so admission sees the real client), and a listener that does
    not set its accept backlog gets `BACKLOG`.
    """
    text = description[len(PROXY_PREFIX):] if proxied(description) else description
    parsed = parse(text)
    if parsed.kind in SERVER_PARAMETERS and "backlog" in SERVER_PARAMETERS[parsed.kind] \
            and parsed.get("backlog") is None:
        text += ":backlog=%d" % backlog
    return text


@dataclass(frozen=True, slots=True)
class TCPAddress:
    """Where a TCP listener binds: ``family`` (``tcp`` or ``tcp6``), ``port``, ``interface``, ``backlog``."""

    family: str
    port: int
    interface: str
    backlog: int

    def overlaps(self, other: "TCPAddress") -> bool:
        """True when both cannot be bound at once (same port, same or a wildcard interface)."""
        if self.port != other.port or self.port == 0:
            return False
        wild = ("", "0.0.0.0", "::")
        return self.interface == other.interface or self.interface in wild or other.interface in wild

    def __str__(self) -> str:
        host = self.interface or ("::" if self.family == "tcp6" else "0.0.0.0")
        return "[%s]:%d" % (host, self.port) if ":" in host else "%s:%d" % (host, self.port)


def tcp_address(description: str) -> TCPAddress | None:
    """The address a ``tcp:``, ``tcp6:`` or ``ssl:`` listener binds (``haproxy:`` allowed), else None."""
    d = parse(description)
    if d.kind not in _TCP_SERVERS:
        return None
    port = d.get("port", 0)
    if port is None or not port.isdigit():
        return None
    family = "tcp6" if d.kind == "tcp6" else "tcp"
    interface = d.get("interface", None, "::" if family == "tcp6" else "")
    backlog = d.get("backlog")
    return TCPAddress(family, int(port), interface, int(backlog) if backlog and backlog.isdigit() else BACKLOG)


def tcp_client(description: str) -> tuple[str, int, float, tuple[str, int] | None] | None:
    """``(host, port, timeout, bindAddress)`` of a plain ``tcp:`` client description, else None.

    The values ``connectTCP`` takes, read the way Twisted reads them, so a
    backend can be connected without an endpoint object.
    """
    d = parse(description)
    if d.kind != "tcp" or d.proxied or check_client(description) is not None:
        return None
    host = d.get("host")
    port = d.get("port")
    args = list(d.args)
    if host is None and args:
        host = args.pop(0)
    if port is None and args:
        port = args.pop(0)
    if host is None or port is None:
        return None
    timeout = d.get("timeout")
    bind = d.get("bindAddress")
    return host, int(port), int(timeout) if timeout else 30, (bind, 0) if bind else None


def client_endpoint(reactor, description: str):
    """The client endpoint for ``description``: a `PlainTCPClient` for a plain ``tcp:`` one.

    Anything else is what Twisted's ``clientFromString`` makes of it.
    """
    values = tcp_client(description)
    if values is None:
        from twisted.internet.endpoints import clientFromString

        return clientFromString(reactor, description)
    host, port, timeout, bind = values
    return PlainTCPClient(reactor, host, port, timeout, bind)


class PlainTCPClient:
    """A ``tcp:`` backend whose values the relay can hand to ``connectTCP`` itself.

    ``connect`` behaves as Twisted's ``TCP4ClientEndpoint``; ``reactor``,
    ``host``, ``port``, ``timeout`` and ``bindAddress`` are public.
    """

    def __init__(self, reactor, host, port, timeout=30, bindAddress=None):
        self.reactor = reactor
        self.host = host
        self.port = port
        self.timeout = timeout
        self.bindAddress = bindAddress

    def connect(self, factory):
        """Connect ``factory`` as ``TCP4ClientEndpoint`` does (a Deferred of the protocol)."""
        from twisted.internet.endpoints import TCP4ClientEndpoint

        return TCP4ClientEndpoint(self.reactor, self.host, self.port, self.timeout, self.bindAddress).connect(factory)


def client_host(description: str) -> str | None:
    """The host a ``tcp:``/``ssl:`` (or host-naming plugin) client description names, or None."""
    d = parse(description)
    host = d.get("host")
    if host is not None:
        return host
    if d.kind in ("unix",) or len(d.args) < 2:
        return None
    return d.args[0]


_CLIENT_REQUIRED = {"tcp": ("host", "port"), "ssl": ("host", "port"), "unix": ("path",)}
"""The values a built-in client kind cannot do without."""

_NUMBER_BASES = {"port": 10, "backlog": 10, "timeout": 10, "mode": 8, "index": 10}
"""The parameters that hold a number, with the base it is written in."""


def _problem(side: str, description: str) -> str | None:
    """The sentence saying what is wrong with a built-in kind's ``description`` on ``side``, or None.

    The checks run in order (unknown parameter, too many values, missing
    value, bad number) and the first problem found is the one reported.
    """
    d = parse(description) if side == "server" else Description(*_client_split(description))
    known = (SERVER_PARAMETERS if side == "server" else CLIENT_PARAMETERS).get(d.kind)
    if not d.kind:
        return "no endpoint type (expected e.g. tcp:25)"
    if known is None:
        return None  # a plugin's kind: its own parser speaks
    return _unknown_parameter(d, known) or _too_many_values(side, description, d, known) \
        or _values_problem(side, d, _values(side, d, known))


def _unknown_parameter(d: Description, known: tuple[str, ...]) -> str | None:
    """Name the first keyword parameter the kind does not have, or None."""
    unknown = [k for k, _ in d.kwargs if k not in known]
    if unknown:
        return "unknown parameter %r for %s: (known: %s)" % (unknown[0], d.kind, ", ".join(known))
    return None


def _positional(side: str, d: Description, known: tuple[str, ...]) -> tuple[int, list[str]]:
    """How many values the kind takes by position, and the names the given ones fill."""
    positional = len(known) if side == "server" else _CLIENT_POSITIONAL[d.kind]
    named = {k for k, _ in d.kwargs}
    given = [name for name in known[:positional] if name not in named][:len(d.args)]
    return positional, given


def _too_many_values(side: str, description: str, d: Description, known: tuple[str, ...]) -> str | None:
    """Say so when more positional values are given than the kind has room for."""
    positional, given = _positional(side, d, known)
    if len(d.args) <= len(given) and len(d.args) <= positional:
        return None
    if _IPV6_HINT.search(description):
        return r"colons in an IPv6 address must be escaped as \: (e.g. \:\:1)"
    return "too many values for %s: (%s)" % (d.kind, ", ".join(repr(a) for a in d.args))


def _values(side: str, d: Description, known: tuple[str, ...]) -> dict[str, str]:
    """Every value of the description by parameter name, positional ones included."""
    _, given = _positional(side, d, known)
    return dict(zip(given, d.args), **dict(d.kwargs))


def _values_problem(side: str, d: Description, values: dict[str, str]) -> str | None:
    """Say which required value is missing, or which number is bad, or None."""
    required = _CLIENT_REQUIRED if side == "client" else {}
    missing = [name for name in required.get(d.kind, ()) if not values.get(name)]
    if missing:
        return "%s: needs %s" % (d.kind, " and ".join(missing))
    for name, value in values.items():
        problem = _number_problem(side, name, value)
        if problem is not None:
            return problem
    return None


def _number_problem(side: str, name: str, value: str) -> str | None:
    """Say what is wrong with the value of a numeric parameter (a port in range, say), or None."""
    base = _NUMBER_BASES.get(name)
    if base is None:
        return None
    try:
        number = int(value, base)
    except ValueError:
        return "%s %r is not a number" % (name, value)
    if name == "port" and not 0 <= number <= 65535:
        return "port %d out of range (0-65535)" % number
    if name == "port" and side == "client" and number == 0:
        return "port 0 cannot be connected to"
    return None


def _client_split(description: str) -> tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]]:
    kind, args, kwargs = split(description)
    return kind.lower(), tuple(args), tuple(kwargs.items())


def check_server(description: str) -> None:
    """Raise `EndpointError` with a sentence when ``description`` cannot be listened on.

    The built-in kinds are checked here (unknown parameters, unescaped IPv6
    colons, ports out of range); then Twisted's parser has its say, with
    its internals (``_parseServer() got ...``) turned into words.
    """
    problem = _problem("server", description)
    if problem is None and parse(description).kind != "systemd":
        # (systemd: sockets exist only under systemd; binding reports their absence.)
        from twisted.internet.endpoints import serverFromString

        problem = _twisted_says(lambda: serverFromString(None, bind_description(description)))
    if problem is not None:
        raise EndpointError(problem)


def check_client(description: str) -> str | None:
    """The sentence saying why ``description`` cannot be connected to, or None."""
    problem = _problem("client", description)
    if problem is None:
        from twisted.internet.endpoints import clientFromString

        problem = _twisted_says(lambda: clientFromString(None, description))
    return problem


def _twisted_says(make) -> str | None:
    try:
        make()
    except Exception as e:
        # Endpoint plugins raise whatever they like; keep their words, not
        # the names of their private functions.
        text = str(e) or type(e).__name__
        text = re.sub(r"^[\w.]*_\w+\(\) ", "", text)
        return text
    return None


def overlapping(descriptions):
    """The first two of ``(label, description)`` pairs that would bind the same TCP address, or None.

    Returns ``((label, address), (label, address))``.
    """
    seen = []
    for label, description in descriptions:
        address = tcp_address(description) if description else None
        if address is None:
            continue
        for other_label, other in seen:
            if address.overlaps(other):
                return (other_label, other), (label, address)
        seen.append((label, address))
    return None
