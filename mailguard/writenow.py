"""Writing to a plain TCP connection at once when nothing waits in its buffer.

Twisted's transports queue every write and send it on a later turn of the
reactor: the socket is registered for writability (an ``epoll_ctl``), the
loop wakes once more, sends, and unregisters it (another ``epoll_ctl``).
The gateway writes a few short replies and forwarded commands per message,
so on a 1 KB message that round trip through the loop was a large share of
its work.  asyncio's socket transports send at once when their buffer is
empty and queue only what the socket did not take; `write` and
`write_sequence` do the same for Twisted's plain TCP connections.  Anything
else (TLS, a buffer not yet drained, a closing connection, any other kind
of transport, a socket that takes only part of the data) goes to the
transport's own method, so ordering, flow control (``pauseProducing`` of
the other leg) and error handling stay Twisted's.

The attributes read here are Twisted's own (`twisted.internet.tcp.Connection`
and `twisted.internet.abstract.FileDescriptor`); `PRIVATE_ATTRIBUTES` names
them and a test fails when a Twisted release renames one.
"""

import os

from twisted.internet import tcp

#: What `_idle` reads of a `tcp.Connection` besides its public ``connected`` and ``disconnecting``.
PRIVATE_ATTRIBUTES = ("TLS", "socket", "dataBuffer", "offset", "_tempDataLen", "_writeDisconnected")

_Connection = tcp.Connection


def _idle(transport):
    """True when ``transport`` is a plain TCP connection, open for writing, with nothing queued."""
    return (
        isinstance(transport, _Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    )


def write(transport, data):
    """``transport.write(data)``, sent at once when the connection is idle."""
    if data and _idle(transport):
        _send(transport, data)
    else:
        transport.write(data)


def _send(transport, data):
    """Send ``data`` on the idle ``transport``; what the socket does not take goes to the transport's buffer."""
    try:
        sent = transport.socket.send(data)
    except OSError:  # EAGAIN, or an error the transport meets and reports on its own write
        sent = 0
    if sent < len(data):
        transport.write(data[sent:])


def send_file(transport, fd, count):
    """Send the first ``count`` octets of the file ``fd`` at once when the connection is idle; return how many went.

    ``os.sendfile``: the kernel copies them from the page cache to the
    socket, with no read into Python and no copy of our own.  What it did
    not take (a full socket buffer, or a connection not idle: then 0) is
    for the caller to write.
    """
    if count <= 0 or not _idle(transport):
        return 0
    sock, sent = transport.socket.fileno(), 0
    try:
        while sent < count:
            n = os.sendfile(sock, fd, sent, count - sent)
            if n == 0:
                break
            sent += n
    except OSError:  # EAGAIN, or an error the transport meets and reports on its next write
        pass
    return sent


def write_sequence(transport, pieces):
    """``transport.writeSequence(pieces)``, sent at once (as one piece) when the connection is idle."""
    if _idle(transport):
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if data:
            _send(transport, data)
    else:
        transport.writeSequence(pieces)
