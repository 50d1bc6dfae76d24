"""``mailguard probe``: audit the mail server behind the gateway.

A command-line tool, not part of the gateway: it talks to the server with a
plain blocking socket (and `ssl` for STARTTLS), every read and write bounded
by a timeout, one short session per check, each ending with RSET or its
transaction and QUIT.  It finds out:

 - the banner and the EHLO keywords (SIZE, PIPELINING, CHUNKING, 8BITMIME,
   SMTPUTF8, AUTH before and after TLS), and whether a pipelined group is
   really answered, in order;
 - STARTTLS: protocol version, cipher, certificate subject, names and
   expiry, and whether the certificate verifies against the system store or
   ``--ca``;
 - STARTTLS command injection (CVE-2011-0411 class): a command sent in the
   same segment as STARTTLS is answered inside TLS;
 - SMTP smuggling, with ``--rcpt`` only: for each of the ten end-of-data
   variants (`VARIANTS`), one small message whose data holds the variant,
   then ``NOOP`` and the real end.  A server that answers more than once
   took the variant as the end of the data.

`probe` returns a `Report`; `render_table`, `render_json` and
`recommendation` present it.  The exit status (`Report.status`) is 0 when
nothing risky was found, 1 when something was, 3 when the server could not
be probed.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
from dataclasses import dataclass, field

from mailguard.policy import DEFAULT_EHLO_KEYWORDS

__all__ = [
    "VARIANTS",
    "ProbeError",
    "Report",
    "Target",
    "parse_backend",
    "probe",
    "recommendation",
    "render_json",
    "render_table",
    "variant_name",
]

#: The end-of-data variants the gateway defends against, in the order reported.
VARIANTS = (
    b"\r\n.\n",
    b"\n.\n",
    b"\n.\r",
    b"\r.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\r\r\n",
    b"\r\r\n.\r\r\n",
)

#: Seconds any one read, write or connection attempt may take.
DEFAULT_TIMEOUT = 10.0

#: Longest reply accepted from the server, in octets (all its lines).
MAX_REPLY = 65536

#: A verb no server knows: its reply (an error) tells the probe's replies apart.
UNKNOWN_VERB = b"XMAILGUARD-PROBE"

_CLIENT_KINDS = ("tcp", "unix", "ssl", "tls")


def variant_name(variant: bytes) -> str:
    """The escaped spelling of a variant, as reported: ``\\r\\n.\\n``, ``\\r\\n\\x00.\\r\\n``."""
    return "".join({13: "\\r", 10: "\\n", 0: "\\x00"}.get(b, chr(b)) for b in variant)


class ProbeError(Exception):
    """The server could not be probed at all (no connection, no greeting, a refusing greeting)."""


class _CheckError(Exception):
    """One check could not finish; its text says why (the other checks go on)."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where the server is: a TCP host and port or a UNIX socket, and whether TLS is implicit."""

    description: str
    family: int
    address: object
    host: str | None
    implicit_tls: bool = False
    timeout: float = DEFAULT_TIMEOUT


def parse_backend(description: str, timeout: float = DEFAULT_TIMEOUT) -> Target:
    """Read a Twisted client endpoint description as the policy's ``backend =`` does.

    The description is first checked by Twisted's own parser (so its
    mistakes read as they do in a policy); the probe then connects by
    itself to ``tcp:`` (IPv4 or IPv6 hosts), ``unix:``, and to ``ssl:`` and
    ``tls:`` (implicit TLS).  Raise `ValueError` with a one-line reason otherwise.
    """
    from twisted.internet.endpoints import clientFromString

    from mailguard.cli import _split_description

    try:
        clientFromString(None, description)
    except Exception as e:
        raise ValueError(
            f"{description}: not a valid client endpoint description ({str(e) or type(e).__name__})"
        ) from None
    kind, args, kwargs = _split_description(description)
    if kind not in _CLIENT_KINDS:
        raise ValueError(f"{description}: probe connects to tcp:, unix:, ssl: and tls: endpoints, not {kind}:")
    timeout = _timeout(description, kwargs, timeout)
    if kind == "unix":
        path = kwargs.get("path") or kwargs.get("address") or (args[0] if args else "")
        return Target(description, socket.AF_UNIX, path, None, False, timeout)
    host = kwargs.get("host") or (args[0] if args else "")
    port = kwargs.get("port") or (args[1] if len(args) > 1 else "")
    if not host or not port.isdigit():
        raise ValueError(f"{description}: needs a host and a port")
    return Target(description, socket.AF_UNSPEC, (host, int(port)), host, kind in ("ssl", "tls"), timeout)


def _timeout(description: str, kwargs: dict, default: float) -> float:
    """The description's ``timeout=`` in seconds, or ``default``; `ValueError` if not a number."""
    if "timeout" not in kwargs:
        return default
    try:
        return float(kwargs["timeout"])
    except ValueError:
        raise ValueError(f"{description}: timeout is not a number") from None


# -- one SMTP connection ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """One whole reply: its code and the text of each line."""

    code: int
    texts: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.code} {' / '.join(self.texts)}".rstrip()


class _Connection:
    """A blocking SMTP client connection with a timeout on every step."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.buffer = b""
        try:
            if target.family == socket.AF_UNIX:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(target.timeout)
                sock.connect(target.address)
            else:
                sock = socket.create_connection(target.address, timeout=target.timeout)
            if sock.family != socket.AF_UNIX:
                # The probe's own segments must leave as written (STARTTLS injection).
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            raise ProbeError(f"cannot connect to {target.description}: {e.strerror or e}") from None
        self.sock = sock
        self.tls: dict | None = None
        if target.implicit_tls:
            try:
                self.start_tls(_unverified())
            except _CheckError as e:
                self.close()
                raise ProbeError(f"TLS with {target.description} failed: {e}") from None

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise _CheckError(f"sending failed: {e.strerror or e}") from None

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            raise _CheckError(f"no answer within {self.target.timeout:g} s") from None
        except OSError as e:
            raise _CheckError(f"connection error: {e.strerror or e}") from None
        if not chunk:
            raise _CheckError("the server closed the connection")
        self.buffer += chunk

    def reply(self) -> Reply:
        """Read one whole reply."""
        code = None
        texts = []
        size = 0
        while True:
            while b"\n" not in self.buffer:
                if len(self.buffer) > MAX_REPLY:
                    raise _CheckError("reply line too long")
                self._fill()
            line, _, self.buffer = self.buffer.partition(b"\n")
            size += len(line) + 1
            line = line.rstrip(b"\r")
            if size > MAX_REPLY or len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                raise _CheckError(f"not an SMTP reply: {line[:80]!r}")
            if code is not None and int(line[:3]) != code:
                raise _CheckError("a multi-line reply changes its code")
            code = int(line[:3])
            texts.append(line[4:].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return Reply(code, tuple(texts))

    def command(self, line: bytes) -> Reply:
        self.send(line + b"\r\n")
        return self.reply()

    def start_tls(self, context: ssl.SSLContext) -> None:
        """Handshake now; record version, cipher and the peer certificate."""
        host = self.target.host
        server_hostname = host if host and context.check_hostname else _sni(host)
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        except ssl.SSLCertVerificationError as e:
            raise _CheckError(e.verify_message or str(e)) from None
        except (ssl.SSLError, OSError) as e:
            raise _CheckError(f"TLS handshake failed: {e}") from None
        self.tls = {"version": self.sock.version(), "cipher": (self.sock.cipher() or ("",))[0]}
        self.tls.update(_certificate(self.sock.getpeercert(binary_form=True)))

    def quit(self) -> None:
        """End the session politely; a server that has gone already is fine."""
        try:
            self.command(b"QUIT")
        except _CheckError:
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _sni(host: str | None) -> str | None:
    if not host:
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def _unverified() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _verifying(ca: str | None, host: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    if not host:
        context.check_hostname = False
    return context


def _certificate(der: bytes | None) -> dict:
    """Subject, names and expiry of a DER certificate."""
    if not der:
        return {"subject": None, "names": [], "not_after": None}
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(n) for n in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    return {
        "subject": cert.subject.rfc4514_string(),
        "names": names,
        "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# -- the report -------------------------------------------------------------------


@dataclass(slots=True)
class Report:
    """Everything one probe found; `as_dict` is the JSON document."""

    backend: str
    banner: str = ""
    esmtp: bool = False
    ehlo_keywords: list[str] = field(default_factory=list)
    size: int | None = None
    pipelining: dict = field(default_factory=lambda: {"offered": False, "works": None, "detail": ""})
    auth_before_tls: list[str] = field(default_factory=list)
    auth_after_tls: list[str] | None = None
    starttls: dict = field(default_factory=lambda: {"offered": False})
    starttls_injection: dict = field(default_factory=lambda: {"tested": False, "executed": None, "detail": ""})
    smuggling: dict = field(default_factory=lambda: {"tested": False, "detail": "", "variants": []})
    error: str | None = None

    def offers(self, keyword: str) -> bool:
        """Whether the EHLO reply offered ``keyword`` (upper case)."""
        return any(k.split()[0].upper() == keyword for k in self.ehlo_keywords if k.split())

    @property
    def risks(self) -> list[str]:
        """What makes the server risky behind a gateway, in words."""
        risks = []
        accepted = [v["variant"] for v in self.smuggling["variants"] if v["result"] == "accepted"]
        if accepted:
            risks.append("takes %s as the end of message data (SMTP smuggling)" % ", ".join(accepted))
        if self.starttls_injection["executed"]:
            risks.append("executes commands injected after STARTTLS")
        if self.auth_before_tls:
            risks.append("offers AUTH before TLS (%s)" % " ".join(self.auth_before_tls))
        if self.starttls.get("verified") is False and self.starttls.get("ca"):
            risks.append("its certificate does not verify against %s" % self.starttls["ca"])
        return risks

    @property
    def status(self) -> int:
        """0: nothing risky, 1: something risky, 3: the server could not be probed."""
        if self.error is not None:
            return 3
        return 1 if self.risks else 0

    def as_dict(self) -> dict:
        """The report as the JSON document's object (its keys are documented in the README)."""
        return {
            "backend": self.backend,
            "error": self.error,
            "banner": self.banner,
            "esmtp": self.esmtp,
            "ehlo_keywords": self.ehlo_keywords,
            "size": self.size,
            "pipelining": self.pipelining,
            "chunking": self.offers("CHUNKING"),
            "8bitmime": self.offers("8BITMIME"),
            "smtputf8": self.offers("SMTPUTF8"),
            "auth_before_tls": self.auth_before_tls,
            "auth_after_tls": self.auth_after_tls,
            "starttls": self.starttls,
            "starttls_injection": self.starttls_injection,
            "smuggling": self.smuggling,
            "risks": self.risks,
            "recommendation": recommendation(self) if self.error is None else None,
            "status": self.status,
        }


def _auth_mechanisms(keywords: list[str]) -> list[str]:
    mechanisms: list[str] = []
    for keyword in keywords:
        words = keyword.replace("=", " ").split()
        if words and words[0].upper() == "AUTH":
            mechanisms += [w.upper() for w in words[1:] if w.upper() not in mechanisms]
    return mechanisms


def _hello(conn: _Connection, helo: bytes) -> tuple[bool, list[str]]:
    """EHLO, or HELO when EHLO is refused: (esmtp, keywords)."""
    reply = conn.command(b"EHLO " + helo)
    if reply.code == 250:
        return True, [text for text in reply.texts[1:] if text.strip()]
    reply = conn.command(b"HELO " + helo)
    if reply.code != 250:
        raise _CheckError(f"HELO refused: {reply}")
    return False, []


def _session(target: Target, helo: bytes) -> tuple[_Connection, Reply, bool, list[str]]:
    conn = _Connection(target)
    try:
        banner = conn.reply()
        if banner.code != 220:
            raise _CheckError(f"greeting {banner}")
        esmtp, keywords = _hello(conn, helo)
    except _CheckError:
        conn.close()
        raise
    return conn, banner, esmtp, keywords


# -- the checks -----------------------------------------------------------------


def _check_pipelining(conn: _Connection, report: Report) -> None:
    """Send RSET, an unknown verb and NOOP one by one, then as one group: same replies, in order?"""
    group = (b"RSET", UNKNOWN_VERB, b"NOOP")
    alone = [conn.command(line).code for line in group]
    conn.send(b"".join(line + b"\r\n" for line in group))
    together = []
    try:
        for _ in group:
            together.append(conn.reply().code)
    except _CheckError as e:
        report.pipelining.update(works=False, detail=f"{len(together)} of {len(group)} pipelined replies: {e}")
        raise
    works = together == alone
    detail = "a pipelined group was answered in order" if works else (
        f"pipelined replies {together} differ from the replies one by one {alone}"
    )
    report.pipelining.update(works=works, detail=detail)


def _check_starttls(target: Target, helo: bytes, ca: str | None, report: Report) -> None:
    """Handshake (unverified) for the details, AUTH after TLS, then a verifying handshake."""
    info = report.starttls
    conn, _, _, _ = _session(target, helo)
    try:
        reply = conn.command(b"STARTTLS")
        if reply.code != 220:
            raise _CheckError(f"STARTTLS answered {reply}")
        conn.start_tls(_unverified())
        info.update(conn.tls)
        _, keywords = _hello(conn, helo)
        report.auth_after_tls = _auth_mechanisms(keywords)
    finally:
        conn.quit()
    info["ca"] = ca
    conn, _, _, _ = _session(target, helo)
    try:
        reply = conn.command(b"STARTTLS")
        if reply.code != 220:
            raise _CheckError(f"STARTTLS answered {reply}")
        try:
            conn.start_tls(_verifying(ca, target.host))
            info.update(verified=True, verify_error=None)
        except _CheckError as e:
            info.update(verified=False, verify_error=str(e))
            conn.close()
            return
        _hello(conn, helo)
    finally:
        conn.quit()


def _check_injection(target: Target, helo: bytes, report: Report) -> None:
    """Pipeline an unknown verb behind STARTTLS in one segment; after the handshake send NOOP.

    A server that executes the injected line answers it (with an error)
    inside TLS before it answers the NOOP.
    """
    result = report.starttls_injection
    conn, _, _, _ = _session(target, helo)
    try:
        conn.send(b"STARTTLS\r\n" + UNKNOWN_VERB + b"\r\n")
        reply = conn.reply()
        result["tested"] = True
        if reply.code != 220:
            result.update(executed=False, detail=f"the pipelined STARTTLS was refused: {reply}")
            return
        if conn.buffer:
            result.update(executed=False, detail="the injected command was answered in plaintext, before TLS")
            return
        conn.start_tls(_unverified())
        first = conn.command(b"NOOP")
        if first.code >= 400:
            conn.reply()  # the NOOP's own reply
            result.update(executed=True, detail=f"the injected {UNKNOWN_VERB.decode()} was answered inside TLS: {first}")
        else:
            result.update(executed=False, detail="the injected command was discarded")
    finally:
        conn.quit()


def _smuggling_message(variant: bytes, sender: bytes, rcpt: bytes) -> bytes:
    name = variant_name(variant).encode()
    return (
        b"From: <" + sender + b">\r\nTo: <" + rcpt + b">\r\n"
        b"Subject: mailguard probe " + name + b"\r\n\r\n"
        b"This message was sent by mailguard probe, to test whether this mail server takes\r\n"
        b"the end-of-data variant " + name + b" for the end of the message (SMTP smuggling).\r\n"
        b"It can be deleted. The variant follows this sentence."
        + variant + b"NOOP\r\n.\r\n"
    )


def _check_variant(target: Target, helo: bytes, sender: bytes, rcpt: bytes, variant: bytes) -> tuple[str, str]:
    """One message holding ``variant``: ("accepted" | "not accepted" | "refused", detail)."""
    conn, _, _, _ = _session(target, helo)
    try:
        for line in (b"MAIL FROM:<" + sender + b">", b"RCPT TO:<" + rcpt + b">"):
            reply = conn.command(line)
            if reply.code != 250:
                conn.command(b"RSET")
                raise _CheckError(f"{line.split(b':')[0].decode()} answered {reply}")
        reply = conn.command(b"DATA")
        if reply.code != 354:
            conn.command(b"RSET")
            raise _CheckError(f"DATA answered {reply}")
        conn.send(_smuggling_message(variant, sender, rcpt))
        first = conn.reply()
        replies = [first]
        try:
            conn.send(b"QUIT\r\n")
            for _ in range(5):
                reply = conn.reply()
                replies.append(reply)
                if reply.code in (221, 421):
                    break
        except _CheckError:
            pass  # closed after the data, or after QUIT: what came is enough
    finally:
        conn.close()
    # Replies besides the first (to an end of data) and QUIT's answer the NOOP and the final ".".
    extra = [r for r in replies[1:] if r.code not in (221, 421)]
    if extra:
        return "accepted", f"answered {first.code} before the real end, then {' '.join(str(r.code) for r in extra)}"
    if first.code >= 400:
        return "refused", f"refused the message: {first}"
    return "not accepted", f"one message, {first.code} at the real end"


def _check_smuggling(target: Target, helo: bytes, sender: bytes, rcpt: bytes, report: Report) -> None:
    results = report.smuggling
    results["tested"] = True
    for variant in VARIANTS:
        try:
            result, detail = _check_variant(target, helo, sender, rcpt, variant)
        except (_CheckError, ProbeError) as e:
            result, detail = "error", str(e)
        results["variants"].append({"variant": variant_name(variant), "result": result, "detail": detail})
        if result == "error" and not any(v["result"] != "error" for v in results["variants"]):
            # The envelope itself is refused: the other variants would be too.
            results["detail"] = f"stopped: {detail}"
            break


def probe(
    target: Target,
    rcpt: str | None = None,
    sender: str | None = None,
    ca: str | None = None,
    helo: str = "mailguard-probe.invalid",
) -> Report:
    """Run every check against ``target``; never raises for what the server does."""
    report = Report(target.description)
    name = helo.encode("ascii")
    try:
        conn, banner, esmtp, keywords = _session(target, name)
    except (ProbeError, _CheckError) as e:
        report.error = str(e) if isinstance(e, ProbeError) else f"{target.description}: {e}"
        return report
    _record_greeting(target, conn, banner, esmtp, keywords, report)
    try:
        if report.offers("PIPELINING"):
            report.pipelining["offered"] = True
            _check_pipelining(conn, report)
    except _CheckError as e:
        report.pipelining["detail"] = report.pipelining["detail"] or str(e)
    finally:
        conn.quit()
    if report.offers("STARTTLS") and not target.implicit_tls:
        _check_offered_tls(target, name, ca, report)
    elif target.implicit_tls:
        _check_implicit_tls(target, ca, report)
    else:
        report.starttls_injection["detail"] = "STARTTLS is not offered"
    if rcpt is None:
        report.smuggling["detail"] = "skipped: --rcpt not given (each variant delivers one small message)"
    else:
        from_address = (sender if sender is not None else "postmaster@" + helo).encode("utf-8")
        _check_smuggling(target, name, from_address, rcpt.encode("utf-8"), report)
    return report


def _record_greeting(target: Target, conn: _Connection, banner, esmtp: bool, keywords: list[str],
                     report: Report) -> None:
    """Note the banner, the EHLO keywords (SIZE among them) and the AUTH mechanisms offered."""
    report.banner = " / ".join(f"{banner.code} {t}".rstrip() for t in banner.texts)
    report.esmtp = esmtp
    report.ehlo_keywords = keywords
    for keyword in keywords:
        words = keyword.split()
        if words and words[0].upper() == "SIZE":
            report.size = int(words[1]) if len(words) > 1 and words[1].isdigit() else 0
    if target.implicit_tls:
        report.starttls.update(offered=False, implicit=True, **(conn.tls or {}))
        report.auth_after_tls = _auth_mechanisms(keywords)
    else:
        report.auth_before_tls = _auth_mechanisms(keywords)


def _check_offered_tls(target: Target, helo: bytes, ca: str | None, report: Report) -> None:
    """The server offers STARTTLS: check the handshake, then the injection, each on its own."""
    report.starttls["offered"] = True
    try:
        _check_starttls(target, helo, ca, report)
    except (_CheckError, ProbeError) as e:
        report.starttls["error"] = str(e)
    try:
        _check_injection(target, helo, report)
    except (_CheckError, ProbeError) as e:
        report.starttls_injection["detail"] = str(e)


def _check_implicit_tls(target: Target, ca: str | None, report: Report) -> None:
    """Implicit TLS: connect once more to see whether the certificate verifies."""
    report.starttls["ca"] = ca
    try:
        conn = _Connection(Target(target.description, target.family, target.address, target.host, False,
                                  target.timeout))
        try:
            conn.start_tls(_verifying(ca, target.host))
            report.starttls.update(verified=True, verify_error=None)
        except _CheckError as e:
            report.starttls.update(verified=False, verify_error=str(e))
        conn.quit()
    except ProbeError as e:
        report.starttls["error"] = str(e)
    report.starttls_injection["detail"] = "implicit TLS: no STARTTLS"


# -- presenting it -------------------------------------------------------------------


def _setting(text: str, comment: str = "") -> str:
    return f"{text:<32} ; {comment}" if comment else text


def recommendation(report: Report) -> str:
    """The ``[inspect]`` section the findings call for, with a comment per choice."""
    lines = ["[inspect PROBED]"]
    lines.append(_setting("protocol = esmtp") if report.esmtp
                 else _setting("protocol = smtp", "the server does not speak ESMTP"))
    if report.size:
        lines.append(_setting(f"max-data = {report.size}", "the server's SIZE"))
    lines.append(_bare_newline_setting(report))
    if report.esmtp:
        lines.append(_ehlo_setting(report))
    if report.starttls.get("offered"):
        lines += _tls_settings(report)
    return "\n".join(lines)


def _bare_newline_setting(report: Report) -> str:
    """``bare-newline``: reject when a variant was accepted or nothing was tested, else normalize."""
    accepted = [v["variant"] for v in report.smuggling["variants"] if v["result"] == "accepted"]
    if accepted:
        return _setting("bare-newline = reject", "the server takes %s as the end of data" % ", ".join(accepted))
    if report.smuggling["tested"]:
        return _setting("bare-newline = normalize", "no end-of-data variant was accepted")
    return _setting("bare-newline = reject", "smuggling not tested (no --rcpt): the safe choice")


def _ehlo_setting(report: Report) -> str:
    """``ehlo-keywords``: the default keywords the server offers, less broken PIPELINING and clear-text AUTH."""
    dropped = set()
    notes = []
    if report.pipelining["works"] is False:
        dropped.add("PIPELINING")
        notes.append("PIPELINING does not work")
    if report.auth_before_tls:
        dropped.add("AUTH")
        notes.append("no AUTH in clear text")
    keep = []
    for keyword in report.ehlo_keywords:
        words = keyword.split()
        kw = words[0].upper() if words else ""
        if kw in DEFAULT_EHLO_KEYWORDS and kw not in keep and kw not in dropped:
            keep.append(kw)
    return _setting("ehlo-keywords = " + (" ".join(keep) or "SIZE"), ", ".join(notes))


def _tls_settings(report: Report) -> list[str]:
    """``tls`` and ``backend-tls`` for a server offering STARTTLS."""
    if report.starttls_injection["executed"]:
        return [_setting("tls = strip", "never passthrough: it executes commands injected after STARTTLS")]
    lines = [_setting("tls = terminate", "encrypted to the server, still inspected")]
    if not report.starttls.get("verified"):
        return lines + [_setting("backend-tls = opportunistic", "its certificate does not verify")]
    lines.append(_setting("backend-tls = required", "its certificate verifies"))
    if report.starttls.get("ca"):
        lines.append(f"backend-ca = {report.starttls['ca']}")
    return lines


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def render_table(report: Report) -> str:
    """The report as a readable table, risks and the recommended snippet last."""
    if report.error is not None:
        return f"{report.backend}: could not be probed: {report.error}"
    rows = [row for section in _TABLE_SECTIONS for row in section(report)]
    width = max(len(k) for k, _ in rows)
    out = [f"{k.ljust(width)}  {v}" for k, v in rows]
    risks = report.risks
    out.append("")
    out.append("risks: none" if not risks else "risks:")
    out += [f"  - {r}" for r in risks]
    out.append("")
    out.append("recommended policy:")
    out.append(recommendation(report))
    return "\n".join(out)


def _server_rows(report: Report) -> list[tuple[str, str]]:
    """The banner and what EHLO offers: keywords, SIZE, PIPELINING, extensions, AUTH."""
    pipelining = report.pipelining
    if not pipelining["offered"]:
        pipelined = "not offered"
    else:
        pipelined = ("works: " if pipelining["works"] else "broken: ") + pipelining["detail"]
    return [
        ("backend", report.backend),
        ("banner", report.banner),
        ("ESMTP", _yes(report.esmtp)),
        ("EHLO keywords", ", ".join(report.ehlo_keywords) or "-"),
        ("SIZE", str(report.size) if report.size is not None else "not offered"),
        ("PIPELINING", pipelined),
        ("CHUNKING", _yes(report.offers("CHUNKING"))),
        ("8BITMIME", _yes(report.offers("8BITMIME"))),
        ("SMTPUTF8", _yes(report.offers("SMTPUTF8"))),
        ("AUTH before TLS", " ".join(report.auth_before_tls) or "none"),
        ("AUTH after TLS", "-" if report.auth_after_tls is None else (" ".join(report.auth_after_tls) or "none")),
    ]


def _tls_rows(report: Report) -> list[tuple[str, str]]:
    """STARTTLS or implicit TLS: the session's version and cipher, the certificate, any error."""
    tls = report.starttls
    if not (tls.get("offered") or tls.get("implicit")):
        return [("STARTTLS", "not offered")]
    rows = []
    if "version" in tls:
        rows.append(("STARTTLS" if tls.get("offered") else "implicit TLS", f"{tls['version']}, {tls['cipher']}"))
        rows += _certificate_rows(tls)
    if tls.get("error"):
        rows.append(("TLS error", tls["error"]))
    return rows


def _certificate_rows(tls: dict) -> list[tuple[str, str]]:
    """The server's certificate: subject, names, expiry and whether it verifies."""
    rows = [
        ("certificate", tls.get("subject") or "-"),
        ("  names", ", ".join(tls.get("names") or []) or "-"),
        ("  expires", tls.get("not_after") or "-"),
    ]
    against = tls.get("ca") or "the system store"
    if "verified" in tls:
        rows.append(("  verifies", f"yes, against {against}" if tls["verified"]
                     else f"no, against {against}: {tls['verify_error']}"))
    return rows


def _injection_rows(report: Report) -> list[tuple[str, str]]:
    """Whether a command pipelined behind STARTTLS was executed inside TLS."""
    injection = report.starttls_injection
    if not injection["tested"]:
        return [("STARTTLS injection", f"not tested: {injection['detail']}")]
    verdict = "EXECUTED" if injection["executed"] else "not executed"
    return [("STARTTLS injection", f"{verdict}: {injection['detail']}")]


def _smuggling_rows(report: Report) -> list[tuple[str, str]]:
    """The smuggling check: why it did not run or stopped, and each variant's result."""
    smuggling = report.smuggling
    if not smuggling["tested"]:
        return [("smuggling", smuggling["detail"])]
    rows = [("smuggling", smuggling["detail"])] if smuggling["detail"] else []
    for v in smuggling["variants"]:
        result = v["result"].upper() if v["result"] == "accepted" else v["result"]
        rows.append((f"smuggling {v['variant']}", f"{result}: {v['detail']}"))
    return rows


_TABLE_SECTIONS = (_server_rows, _tls_rows, _injection_rows, _smuggling_rows)
"""The parts of the table, in the order they are shown."""


def render_json(report: Report) -> str:
    """The report as one JSON document (keys documented in the README)."""
    return json.dumps(report.as_dict(), indent=2)
