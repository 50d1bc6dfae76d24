"""PROXY protocol headers (v1 text, v2 binary) the gateway sends to its backend.

With ``backend-proxy-protocol``, the backend (e.g. Postfix with
``smtpd_upstream_proxy_protocol = haproxy``) learns the real client's
address from the header that opens the connection.
"""

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _ip(host):
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip


def proxy_header(version, source, destination):
    """The PROXY header announcing a TCP connection from ``source`` to ``destination``.

    ``source`` and ``destination`` are ``(host, port)`` pairs of IP
    addresses.  Mixed or non-IP addresses give the ``UNKNOWN`` / ``LOCAL``
    form, which tells the backend to use the real connection's addresses.
    """
    try:
        src, dst = _ip(source[0]), _ip(destination[0])
    except (ValueError, TypeError):
        src = dst = None
    if src is not None and src.version != dst.version:
        src = dst = None
    if version == "v1":
        if src is None:
            return b"PROXY UNKNOWN\r\n"
        family = b"TCP4" if src.version == 4 else b"TCP6"
        return b"PROXY %s %s %s %d %d\r\n" % (
            family, str(src).encode(), str(dst).encode(), source[1], destination[1])
    if src is None:
        return V2_SIGNATURE + b"\x20\x00\x00\x00"  # LOCAL command, no addresses
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body
