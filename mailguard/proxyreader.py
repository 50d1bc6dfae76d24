"""Reading the PROXY header (v1 text, v2 binary) a proxy in front of the gateway sends.

A listener written ``haproxy:...`` sits behind a proxy (HAProxy, a load
balancer) that opens every connection with a PROXY protocol header naming
the real client (https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt).
`ProxyHeaderReader` is its pure parser: bytes in, in any segmentation, and
out comes a `ProxyHeader` value plus the bytes that followed it, or
`InvalidProxyHeader` with a one-line reason.  No Twisted, no I/O: the shell
(`mailguard.tracker`) turns the value into Twisted addresses.

The headers the gateway *sends* to its backend are written by
`mailguard.proxyheader`.
"""

import ipaddress
import struct
from dataclasses import dataclass

#: The first octets of every v2 header.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The first octets of every v1 header.
V1_PREFIX = b"PROXY "
#: The longest v1 header, CRLF included (the specification's own bound).
#: A v2 header is bounded by its 16-bit length: 16 + 65535 octets.
V1_LIMIT = 107

# v2 address families and transports (the byte after the version/command).
_V2_FAMILIES = {
    0x00: (None, None, 0),  # UNSPEC: no addresses, use the connection's own
    0x11: ("TCP4", 4, 12),
    0x12: ("UDP4", 4, 12),
    0x21: ("TCP6", 6, 36),
    0x22: ("UDP6", 6, 36),
    0x31: ("UNIX", None, 216),
    0x32: ("UNIX_DGRAM", None, 216),
}
_V2_LOCAL = 0x20
_V2_PROXY = 0x21
_V1_FAMILIES = {b"TCP4": 4, b"TCP6": 6}


class InvalidProxyHeader(ValueError):
    """The bytes are not a valid PROXY header; ``str()`` says why, on one line.

    The fault is the peer's (or its proxy's): the connection is dropped.
    """


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What a PROXY header said.

    ``family`` is ``"TCP4"``, ``"TCP6"``, ``"UDP4"``, ``"UDP6"``,
    ``"UNIX"``, ``"UNIX_DGRAM"``, or None when the header names no
    addresses (v1 ``UNKNOWN``, v2 ``LOCAL`` or ``UNSPEC``): the connection's
    own addresses then stand.  ``source`` and ``destination`` are
    ``(host, port)`` pairs for the IP families, the host in canonical text
    (`canonical_host`: ``2001:db8::1``, and an IPv4-mapped address as
    ``::ffff:192.0.2.1``, the way a ``tcp6:`` listener reports it, never
    ``0:0:0:0:0:ffff:c000:201``); socket paths (bytes, trailing NULs
    removed) for the UNIX families; None without addresses.  ``length`` is
    the size of the header in octets.
    """

    version: int
    family: str
    source: object
    destination: object
    length: int


class ProxyHeaderReader:
    """Parse one PROXY header, v1 or v2, from bytes arriving in any segmentation.

    Call `feed` with each piece; it returns ``(None, b"")`` while the header
    is incomplete, then ``(header, rest)`` once, where ``rest`` is what
    followed the header in the bytes fed so far.  It raises
    `InvalidProxyHeader` as soon as the bytes cannot become a header (the
    first octet that differs from both signatures is enough), and never
    holds more than the longest header allowed.
    """

    __slots__ = ("_buf", "_done")

    def __init__(self):
        # A bytearray: a header fed one octet at a time costs linear time.
        self._buf = bytearray()
        self._done = False

    def feed(self, data):
        """Add ``data``; return ``(ProxyHeader, rest)`` once complete, else ``(None, b"")``."""
        if self._done:
            raise RuntimeError("the PROXY header was already read")
        buf = self._buf
        buf += data
        if buf[:1] == b"P":
            result = _v1(buf)
        elif buf[:1] == b"\r":
            result = _v2(buf)
        elif not buf:
            return None, b""
        else:
            raise InvalidProxyHeader("not a PROXY header")
        if result is None:
            return None, b""
        header, rest = result
        self._done = True
        self._buf = None
        return header, bytes(rest)


def _v1(buf):
    """``(header, rest)`` of a complete v1 header in ``buf``, or None while incomplete."""
    if buf[: len(V1_PREFIX)] != V1_PREFIX[: len(buf)]:
        raise InvalidProxyHeader("not a PROXY header")
    end = buf.find(b"\n", 0, V1_LIMIT)
    if end < 0:
        if len(buf) >= V1_LIMIT:
            raise InvalidProxyHeader("v1 header longer than %d octets" % V1_LIMIT)
        return None
    if end == 0 or buf[end - 1 : end] != b"\r":
        raise InvalidProxyHeader("v1 header not ended by CRLF")
    return _v1_line(bytes(buf[len(V1_PREFIX) : end - 1])), buf[end + 1 :]


def _v1_line(line):
    """The header for the v1 fields after ``PROXY `` (CRLF removed)."""
    length = len(V1_PREFIX) + len(line) + 2
    if b"\r" in line:
        raise InvalidProxyHeader("bare CR in v1 header")
    fields = line.split(b" ")
    if fields[0] == b"UNKNOWN":
        # The rest of an UNKNOWN line is to be ignored (the specification).
        return ProxyHeader(1, None, None, None, length)
    version = _V1_FAMILIES.get(fields[0])
    if version is None:
        raise InvalidProxyHeader("v1 protocol %r is not TCP4, TCP6 or UNKNOWN" % _text(fields[0]))
    if len(fields) != 5:
        raise InvalidProxyHeader("v1 %s header needs 4 fields after the protocol, got %d"
                                 % (fields[0].decode(), len(fields) - 1))
    source = _v1_host(fields[1], version), _v1_port(fields[3])
    destination = _v1_host(fields[2], version), _v1_port(fields[4])
    return ProxyHeader(1, fields[0].decode(), source, destination, length)


def canonical_host(ip):
    """The text of an `ipaddress` address: compressed, IPv4-mapped IPv6 as ``::ffff:a.b.c.d``."""
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        return "::ffff:%s" % mapped
    return str(ip)


def _v1_host(field, version):
    """The canonical text of an IPv4 (``version`` 4) or IPv6 address field."""
    cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    try:
        if b"%" in field:
            raise ValueError("scoped")
        return canonical_host(cls(field.decode("ascii")))
    except (UnicodeDecodeError, ValueError):
        raise InvalidProxyHeader("v1 address %r is not an IPv%d address" % (_text(field), version)) from None


def _v1_port(field):
    """A port field: 1 to 5 decimal digits, at most 65535."""
    if not (0 < len(field) <= 5 and field.isdigit()) or int(field) > 0xFFFF:
        raise InvalidProxyHeader("v1 port %r is not a number from 0 to 65535" % _text(field))
    return int(field)


def _v2(buf):
    """``(header, rest)`` of a complete v2 header in ``buf``, or None while incomplete."""
    if buf[:12] != V2_SIGNATURE[: len(buf)]:
        raise InvalidProxyHeader("not a PROXY header")
    if len(buf) >= 13 and buf[12] not in (_V2_LOCAL, _V2_PROXY):
        raise InvalidProxyHeader("v2 version/command octet 0x%02x is not 0x20 (LOCAL) or 0x21 (PROXY)" % buf[12])
    if len(buf) >= 14 and buf[13] not in _V2_FAMILIES:
        raise InvalidProxyHeader("v2 address family octet 0x%02x is unknown" % buf[13])
    if len(buf) < 16:
        return None
    size = 16 + struct.unpack("!H", buf[14:16])[0]
    if len(buf) < size:
        return None
    return _v2_header(bytes(buf[:size])), buf[size:]


def _v2_header(header):
    """The value of a whole v2 header."""
    family, version, needed = _V2_FAMILIES[header[13]]
    if header[12] == _V2_LOCAL or family is None:
        # LOCAL: the proxy's own connection (a health check); UNSPEC: no addresses.
        return ProxyHeader(2, None, None, None, len(header))
    block = header[16:]
    if len(block) < needed:
        raise InvalidProxyHeader("v2 %s header has %d address octets, needs %d" % (family, len(block), needed))
    if version is None:
        source, destination = block[:108].rstrip(b"\x00"), block[108:216].rstrip(b"\x00")
    else:
        size = 4 if version == 4 else 16
        src, dst, sport, dport = struct.unpack("!%ds%dsHH" % (size, size), block[:needed])
        source = canonical_host(ipaddress.ip_address(src)), sport
        destination = canonical_host(ipaddress.ip_address(dst)), dport
    return ProxyHeader(2, family, source, destination, len(header))


def _text(field):
    """A short printable rendering of a header field, for error messages."""
    return field[:40].decode("ascii", "replace")
