"""Blocking test clients for end-to-end tests; run them in a thread (deferToThread)."""

import socket

from twisted.internet import reactor, task


def read_reply(f):
    """Read one complete (possibly multi-line) SMTP reply from a binary file object."""
    out = b""
    while True:
        line = f.readline(4096)
        out += line
        if not line.endswith(b"\n") or len(line) < 4 or line[3:4] != b"-":
            return out


class LockstepClient:
    """A raw SMTP client that sends one line at a time and waits for each reply."""

    def __init__(self, port, timeout=10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.greeting = read_reply(self.file)

    def send(self, data):
        """Send raw bytes without waiting."""
        self.sock.sendall(data)

    def command(self, line):
        """Send a line (CRLF added) and return the reply bytes."""
        self.sock.sendall(line + b"\r\n")
        return read_reply(self.file)

    def reply(self):
        """Read the next reply."""
        return read_reply(self.file)

    def rest(self):
        """Everything the gateway sends until it closes."""
        out = b""
        while True:
            chunk = self.file.read1(65536)
            if not chunk:
                return out
            out += chunk

    def close(self):
        """Close the connection."""
        self.file.close()
        self.sock.close()


def lockstep(port, lines):
    """Greeting, then each line's reply, as a list of bytes; QUIT is not added."""
    client = LockstepClient(port)
    try:
        return [client.greeting] + [client.command(line) for line in lines]
    finally:
        client.close()


def wait_for(predicate, timeout=10.0, interval=0.01):
    """A Deferred that fires when ``predicate()`` is true; fails after ``timeout`` seconds."""
    calls = [0]

    def check():
        if predicate():
            return True
        calls[0] += 1
        if calls[0] * interval > timeout:
            raise AssertionError("condition not reached in %.1f s" % timeout)
        return task.deferLater(reactor, interval, check)

    return task.deferLater(reactor, 0, check)


#: Ports the tests pick for servers that must be named before they listen: below
#: the kernel's ephemeral range (32768-60999 on Linux), so no outgoing connection
#: can take one between the choice and the bind.
_PORT_RANGE = (20000, 32700)


def free_port(count=1):
    """A loopback TCP port, outside the ephemeral range, such that it and the next ``count - 1`` are free now."""
    import random
    import socket

    rng = random.SystemRandom()
    for _ in range(1000):
        first = rng.randrange(_PORT_RANGE[0], _PORT_RANGE[1] - count)
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free loopback port found")


def bdat_session(port, messages, sender=b"a@x.org", recipients=(b"b@x.org",), mail_parameters=b"", helo=b"c"):
    """A raw BDAT client: each message as two chunks, the second LAST, after MAIL and RCPT (pipelined).

    One session: greeting, EHLO, the messages, QUIT.  Returns every reply
    code, in order.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with s, s.makefile("rb") as f:
        codes = [read_reply(f)[:3]]
        s.sendall(b"EHLO %s\r\n" % helo)
        codes.append(read_reply(f)[:3])
        params = b" " + mail_parameters if mail_parameters else b""
        for msg in messages:
            half = len(msg) // 2
            envelope = b"MAIL FROM:<%s>%s\r\n" % (sender, params) + b"".join(b"RCPT TO:<%s>\r\n" % r for r in recipients)
            s.sendall(envelope + b"BDAT %d\r\n%sBDAT %d LAST\r\n%s" % (half, msg[:half], len(msg) - half, msg[half:]))
            codes += [read_reply(f)[:3] for _ in range(3 + len(recipients))]
        s.sendall(b"QUIT\r\n")
        codes.append(read_reply(f)[:3])
    return codes
