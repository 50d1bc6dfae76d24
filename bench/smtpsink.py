"""A fast SMTP sink: accepts every message and throws it away.

    python bench/smtpsink.py PORT [--cert CERT --key KEY] [--stats FILE]

Used when Postfix's ``smtp-sink`` is not installed, for the TLS row (it
offers STARTTLS when given a certificate) and by ``bench/idle.py`` (it holds
thousands of idle sessions).  It speaks just enough ESMTP for a relay under
test: PIPELINING (replies to a pipelined group go out in one write), SIZE,
8BITMIME, CHUNKING (``BDAT n [LAST]``: the ``n`` octets are counted and
skipped, never parsed), ENHANCEDSTATUSCODES, and STARTTLS with a
certificate.  The end of DATA message data is found with ``bytes.find`` over
each received chunk (plus the last four octets of the one before), so a 1 MB
message costs a few C-speed scans, not per-line Python.  Listens on
127.0.0.1 only.
"""

import argparse
import asyncio
import json
import os
import signal
import ssl
import sys

EHLO = (
    b"250-bench-sink\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 104857600\r\n"
    b"250-8BITMIME\r\n"
    b"250-CHUNKING\r\n"
    b"%s"
    b"250 ENHANCEDSTATUSCODES\r\n"
)
REPLIES = {
    b"HELO": b"250 bench-sink\r\n",
    b"MAIL": b"250 2.1.0 Ok\r\n",
    b"RCPT": b"250 2.1.5 Ok\r\n",
    b"DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
    b"RSET": b"250 2.0.0 Ok\r\n",
    b"NOOP": b"250 2.0.0 Ok\r\n",
    b"QUIT": b"221 2.0.0 Bye\r\n",
    b"VRFY": b"252 2.0.0 Send some mail\r\n",
}
END = b"\r\n.\r\n"
MAX_LINE = 4096


class Stats:
    """What the sink has seen, written as JSON on exit."""

    sessions = 0
    active = 0
    messages = 0
    octets = 0


class SinkProtocol(asyncio.Protocol):
    """One SMTP session: commands, then message data, in any segmentation."""

    def __init__(self, tls_context):
        self.tls_context = tls_context
        self.tls = False
        self.buf = b""
        self.in_data = False
        self.tail = b""
        self.bdat_left = 0  # octets of the current BDAT chunk still to come
        self.bdat_size = 0
        self.bdat_last = False
        self.transport = None
        self._early = None  # data that arrived under TLS before start_tls() returned

    def connection_made(self, transport):
        """Greet at once."""
        self.transport = transport
        Stats.sessions += 1
        Stats.active += 1
        transport.write(b"220 bench-sink ESMTP\r\n")

    def connection_lost(self, exc):
        """Count the session as gone."""
        Stats.active -= 1

    def data_received(self, data):
        """Answer every complete command; skip message data up to CRLF.CRLF."""
        if self._early is not None:
            # The handshake is done but start_tls() has not handed over the
            # TLS transport yet: answering now would go out in plain text.
            self._early.append(data)
            return
        out = []
        while data:
            if self.bdat_left:
                data = self._chunk(data, out)
            elif self.in_data:
                data = self._data(data, out)
            else:
                data = self._commands(data, out)
                if data is None:
                    break
        if out:
            self.transport.write(b"".join(out))

    def _data(self, data, out):
        # The terminator may straddle chunks: look across the seam first,
        # then in the chunk itself, without copying the chunk.
        tail = self.tail
        at = (tail + data[:4]).find(END)
        if at >= 0:
            end = at + 5 - len(tail)
        else:
            end = data.find(END)
            if end >= 0:
                end += 5
        if end < 0:
            Stats.octets += len(data)
            self.tail = (tail + data)[-4:] if len(data) < 4 else data[-4:]
            return b""
        self.in_data = False
        Stats.messages += 1
        Stats.octets += end
        out.append(b"250 2.0.0 Ok: queued\r\n")
        return data[end:]

    def _chunk(self, data, out):
        # BDAT octets are opaque: count them, reply once the chunk is in.
        take = min(self.bdat_left, len(data))
        self.bdat_left -= take
        Stats.octets += take
        if not self.bdat_left:
            self._chunk_done(out)
        return data[take:]

    def _chunk_done(self, out):
        if self.bdat_last:
            Stats.messages += 1
            out.append(b"250 2.0.0 Ok: queued\r\n")
        else:
            out.append(b"250 2.0.0 Ok: %d octets\r\n" % self.bdat_size)

    def _commands(self, data, out):
        buf = self.buf + data if self.buf else data
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                self.buf = buf[start:]
                if len(self.buf) > MAX_LINE:
                    out.append(b"500 5.5.0 Line too long\r\n")
                    self.buf = b""
                return b""
            line = buf[start:end].rstrip(b"\r")
            start = end + 1
            verb = line.split(b" ", 1)[0].upper()
            if verb == b"EHLO":
                starttls = b"250-STARTTLS\r\n" if self.tls_context and not self.tls else b""
                out.append(EHLO % starttls)
            elif verb == b"DATA":
                out.append(REPLIES[verb])
                self.in_data = True
                # The DATA line's own CRLF may be the first half of CRLF.CRLF.
                self.tail = b"\r\n"
                self.buf = b""
                return buf[start:]
            elif verb == b"BDAT":
                args = line.split()
                if len(args) not in (2, 3) or not args[1].isdigit() or (
                        len(args) == 3 and args[2].upper() != b"LAST"):
                    out.append(b"501 5.5.4 Syntax: BDAT size [LAST]\r\n")
                    continue
                self.bdat_size = self.bdat_left = int(args[1])
                self.bdat_last = len(args) == 3
                if not self.bdat_left:
                    self._chunk_done(out)
                    continue
                self.buf = b""
                return buf[start:]
            elif verb == b"STARTTLS" and self.tls_context and not self.tls:
                out.append(b"220 2.0.0 Ready to start TLS\r\n")
                self.transport.write(b"".join(out))
                del out[:]
                self.buf = b""
                self._start_tls()
                return None
            elif verb == b"QUIT":
                out.append(REPLIES[verb])
                self.transport.write(b"".join(out))
                del out[:]
                self.transport.close()
                return None
            else:
                out.append(REPLIES.get(verb, b"502 5.5.2 Error: command not recognized\r\n"))

    def _start_tls(self):
        loop = asyncio.get_running_loop()
        # The peer's ClientHello may arrive before start_tls() runs: it must
        # not be read as commands.
        self.transport.pause_reading()

        async def upgrade():
            self._early = []
            try:
                self.transport = await loop.start_tls(
                    self.transport, self, self.tls_context, server_side=True
                )
                self.tls = True
                early, self._early = self._early, None
                for data in early:
                    self.data_received(data)
            except (OSError, ssl.SSLError, ConnectionError) as e:
                sys.stderr.write("smtpsink: TLS handshake failed: %r\n" % (e,))
                self.transport.abort()

        # The loop holds tasks weakly: an unreferenced one can vanish mid-handshake.
        self._tls_task = loop.create_task(upgrade())


def main(argv=None):
    """Serve until SIGTERM; then write the stats (if asked) and exit."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--stats", help="write a JSON summary here on exit")
    args = parser.parse_args(argv)

    context = None
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)

    async def serve():
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set_result, None)
        server = await loop.create_server(
            lambda: SinkProtocol(context), "127.0.0.1", args.port, backlog=4096, reuse_address=True
        )
        async with server:
            await stop

    asyncio.run(serve())
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump({k: getattr(Stats, k) for k in ("sessions", "active", "messages", "octets")}, f)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
