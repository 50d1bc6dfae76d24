"""A load generator that sends mail the way a real MTA does.

    python bench/smtpload.py PORT --sessions 20 --messages 2000 --size 1024 \\
        [--per-session 10] [--timeout 60] [--starttls --ca CA] [--bdat] [--procs 1]

Each session: greeting, EHLO, (STARTTLS and EHLO again), then up to
``--per-session`` messages, each as one pipelined ``MAIL``/``RCPT``/``DATA``
group (when the server advertises PIPELINING) followed by the message and
its ``CRLF.CRLF`` in one write; ``QUIT`` is pipelined after the last
message's end of data, as Postfix does.  Then it reconnects, until
``--messages`` have been accepted (250 after the end of data) or
``--timeout`` seconds have passed.  Prints one JSON line: messages, octets,
elapsed seconds, errors (with the first few reasons), sessions.

With ``--bdat`` each message goes as one ``BDAT n LAST`` chunk instead of
``DATA`` (RFC 3030: the same octets, no dot stuffing, no ``CRLF.CRLF``),
pipelined after ``MAIL`` and ``RCPT`` when PIPELINING is offered; a server
that does not advertise CHUNKING is an error, not a silent fall-back to
DATA.

The message is built once: headers, then 76-octet lines up to ``--size``
octets in all (CRLFs included), so every row of the benchmark moves the
same bytes.  ``--procs N`` splits the sessions and messages over N
processes, so the generator is not the bottleneck on a fast path.
"""

import argparse
import asyncio
import json
import os
import ssl
import subprocess
import sys
import time


def build_message(size):
    """A valid, dot-safe message of exactly ``size`` octets, plus ``.CRLF``."""
    head = (
        b"From: <bench@example.org>\r\n"
        b"To: <sink@example.org>\r\n"
        b"Subject: mailguard benchmark\r\n"
        b"Message-ID: <bench@example.org>\r\n"
        b"\r\n"
    )
    line = b"x" * 74 + b"\r\n"
    body_len = max(size - len(head), 2)
    count, rem = divmod(body_len, len(line))
    if rem == 1:
        # No room for a line of its own: make the last full line one longer.
        body = line * (count - 1) + b"x" * 75 + b"\r\n"
    else:
        body = line * count + (b"y" * (rem - 2) + b"\r\n" if rem else b"")
    return head + body + b".\r\n"


class Failure(Exception):
    """The server answered something other than what a successful send needs."""


async def read_reply(reader):
    """One (possibly multi-line) reply: ``(code, lines)``."""
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise Failure("connection closed")
        lines.append(line)
        if line[3:4] != b"-":
            try:
                return int(line[:3]), lines
            except ValueError:
                raise Failure("bad reply %r" % line[:40]) from None


async def expect(reader, code, what):
    got, lines = await read_reply(reader)
    if got != code:
        raise Failure("%s: %r" % (what, lines[-1][:60]))
    return lines


class Load:
    """Shared budget and counters of one generator process."""

    def __init__(self, args):
        self.args = args
        self.budget = args.messages
        self.done = 0
        self.octets = 0
        self.errors = 0
        self.reasons = []
        self.sessions = 0
        self.message = build_message(args.size)
        self.mail = b"MAIL FROM:<bench@example.org> SIZE=%d\r\n" % args.size
        self.rcpt = b"RCPT TO:<sink@example.org>\r\n"
        if args.bdat:
            # The message without its ".CRLF"; build_message never starts a line with a dot.
            chunk = self.message[:-3]
            self.message = b"BDAT %d LAST\r\n" % len(chunk) + chunk
        self.tls = None
        if args.starttls:
            self.tls = ssl.create_default_context(cafile=args.ca)
            self.tls.check_hostname = False if args.ca is None else True
            if args.ca is None:
                self.tls.verify_mode = ssl.CERT_NONE

    def take(self):
        if self.budget <= 0:
            return False
        self.budget -= 1
        return True

    async def session(self):
        """One session; its first message was taken from the budget by the caller."""
        args = self.args
        reader, writer = await asyncio.open_connection("127.0.0.1", args.port, limit=1 << 20)
        self.sessions += 1
        try:
            await expect(reader, 220, "greeting")
            writer.write(b"EHLO bench.example.org\r\n")
            lines = await expect(reader, 250, "EHLO")
            keywords = {l[4:].split()[0].upper() for l in lines[1:] if len(l) > 6}
            if self.tls is not None:
                if b"STARTTLS" not in keywords:
                    raise Failure("no STARTTLS offered")
                writer.write(b"STARTTLS\r\n")
                await expect(reader, 220, "STARTTLS")
                await writer.start_tls(self.tls, server_hostname="localhost")
                writer.write(b"EHLO bench.example.org\r\n")
                lines = await expect(reader, 250, "EHLO after STARTTLS")
                keywords = {l[4:].split()[0].upper() for l in lines[1:] if len(l) > 6}
            pipelining = b"PIPELINING" in keywords
            if args.bdat and b"CHUNKING" not in keywords:
                raise Failure("no CHUNKING offered")
            mail = self.mail if b"SIZE" in keywords else self.mail.split(b" SIZE=")[0] + b"\r\n"
            sent = 0
            quit_sent = False
            while sent == 0 or (sent < args.per_session and self.take()):
                if args.bdat:
                    sent += 1
                    last = sent >= args.per_session or self.budget <= 0
                    # BDAT has no intermediate reply: the chunk goes with
                    # the envelope when pipelining, after RCPT's 250 otherwise.
                    if pipelining:
                        writer.writelines((mail, self.rcpt, self.message, b"QUIT\r\n" if last else b""))
                        quit_sent = last
                        await expect(reader, 250, "MAIL")
                        await expect(reader, 250, "RCPT")
                    else:
                        for cmd in (mail, self.rcpt):
                            writer.write(cmd)
                            await expect(reader, 250, cmd[:4].decode())
                        writer.write(self.message)
                    await expect(reader, 250, "BDAT LAST")
                    self.done += 1
                    self.octets += args.size
                    continue
                if pipelining:
                    writer.write(mail + self.rcpt + b"DATA\r\n")
                    await expect(reader, 250, "MAIL")
                    await expect(reader, 250, "RCPT")
                    await expect(reader, 354, "DATA")
                else:
                    for cmd, code in ((mail, 250), (self.rcpt, 250), (b"DATA\r\n", 354)):
                        writer.write(cmd)
                        await expect(reader, code, cmd[:4].decode())
                sent += 1
                last = sent >= args.per_session or self.budget <= 0
                if last and pipelining:
                    writer.writelines((self.message, b"QUIT\r\n"))
                    quit_sent = True
                else:
                    writer.write(self.message)
                await expect(reader, 250, "end of data")
                self.done += 1
                self.octets += args.size
            if not quit_sent:
                writer.write(b"QUIT\r\n")
            try:
                await asyncio.wait_for(read_reply(reader), 5)
            except (Failure, asyncio.TimeoutError, ConnectionError):
                pass
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 2)
            except (OSError, asyncio.TimeoutError, ssl.SSLError):
                pass

    async def worker(self):
        # Take a message before connecting, so no session opens for nothing.
        while self.take():
            try:
                await self.session()
            except (Failure, OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                self.errors += 1
                if len(self.reasons) < 5:
                    self.reasons.append("%s: %s" % (e.__class__.__name__, e))
                if self.errors > max(10, self.args.messages // 10):
                    return
                await asyncio.sleep(0.01)

    async def run(self):
        workers = [asyncio.ensure_future(self.worker()) for _ in range(self.args.sessions)]
        try:
            await asyncio.wait_for(asyncio.gather(*workers), self.args.timeout)
            return False
        except asyncio.TimeoutError:
            return True


def run_one(args):
    load = Load(args)
    start = time.monotonic()
    timed_out = asyncio.run(load.run())
    return {
        "messages": load.done,
        "octets": load.octets,
        "elapsed": time.monotonic() - start,
        "errors": load.errors,
        "reasons": load.reasons,
        "sessions": load.sessions,
        "timed_out": timed_out,
    }


def main(argv=None):
    """Run the load (in ``--procs`` processes) and print the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--per-session", type=int, default=10)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--starttls", action="store_true")
    parser.add_argument("--ca", help="CA file to verify the server (default: no verification)")
    parser.add_argument("--bdat", action="store_true", help="send each message as one BDAT n LAST (needs CHUNKING)")
    parser.add_argument("--procs", type=int, default=1)
    args = parser.parse_args(argv)

    procs = max(1, min(args.procs, args.sessions))
    if procs == 1:
        print(json.dumps(run_one(args)))
        return
    children = []
    start = time.monotonic()
    for i in range(procs):
        sessions = args.sessions // procs + (i < args.sessions % procs)
        messages = args.messages // procs + (i < args.messages % procs)
        argv_i = [sys.executable, os.path.abspath(__file__), str(args.port), "--sessions", str(sessions),
                  "--messages", str(messages), "--per-session", str(args.per_session),
                  "--size", str(args.size), "--timeout", str(args.timeout)]
        if args.starttls:
            argv_i.append("--starttls")
        if args.ca:
            argv_i += ["--ca", args.ca]
        if args.bdat:
            argv_i.append("--bdat")
        children.append(subprocess.Popen(argv_i, stdout=subprocess.PIPE))
    total = {"messages": 0, "octets": 0, "errors": 0, "reasons": [], "sessions": 0, "timed_out": False}
    try:
        for child in children:
            out, _ = child.communicate(timeout=args.timeout + 30)
            r = json.loads(out or b"{}") if out else {"errors": 1, "reasons": ["child failed"]}
            for k in ("messages", "octets", "errors", "sessions"):
                total[k] += r.get(k, 0)
            total["reasons"] += r.get("reasons", [])
            total["timed_out"] |= r.get("timed_out", False)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    total["elapsed"] = time.monotonic() - start
    print(json.dumps(total))


if __name__ == "__main__":
    main()
