"""atheris fuzz target for mailguard's sans-IO core: `SMTPInspector` and `DataScanner`.

    pip install atheris
    python fuzz/fuzz_inspector.py -max_total_time=60 CORPUS_DIR   # libFuzzer options
    python fuzz/fuzz_inspector.py --make-seeds fuzz/seeds         # write the seed corpus
    python fuzz/fuzz_inspector.py --replay FILE...                # re-run inputs without atheris
    python fuzz/fuzz_inspector.py --smoke 2000                    # random inputs without atheris

One input is either a `DataScanner` stream or a whole dialogue: the client's
bytes, split into chunks, go to an `SMTPInspector`; what it forwards goes to
a model mail server (sans-IO, below) whose replies, or raw fuzzed bytes, go
back.  The properties, checked on every input:

- events or nothing: no call raises; every event is a known event type;
  nothing comes out after ``Close``; nothing reaches the backend after
  ``AbortServer`` or after the backend was lost;
- no smuggling: in the bytes sent to the backend, message data holds no bare
  CR, bare LF or NUL, so a lenient server (one that ends DATA on any
  ``<EOL> . <EOL>``) ends each message exactly where a strict one does; the
  DataScanner ends exactly at the client's first ``CRLF . CRLF`` (the DATA
  line's CRLF counting), whatever the segmentation, and forwards the same
  bytes for every segmentation;
- every command line forwarded ends with CRLF, holds no CR, LF or NUL, and
  is legal in the mode or all ``x``;
- the client never gets more 2xx replies than the server gave plus the
  gateway's own (``221 2.7.0``): a DATA end or BDAT LAST is never answered
  2xx by the gateway itself.

Only the standard library and mailguard's sans-IO modules are imported (no
Twisted), so the target runs with ``PYTHONPATH=.`` from the source tree.
"""

import os
import random
import re
import sys

try:
    import atheris
except ImportError:  # --replay and --smoke work without it
    atheris = None

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _imports():
    global MODES, Rule, SMTPInspector, DataScanner, events
    from mailguard import events
    from mailguard.commands import MODES
    from mailguard.policy import Rule
    from mailguard.smtp import SMTPInspector
    from mailguard.wire import DataScanner


if atheris is not None:
    with atheris.instrument_imports(include=["mailguard"]):
        _imports()
else:
    _imports()

#: Every end-of-data variant a vulnerable server has been known to accept.
VARIANTS = (b"\n.\n", b"\n.\r", b"\r.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n",
            b"\r\n\x00.\r\n", b"\r\n.\r\r\n", b"\r\r\n.\r\r\n")

#: Client fragments the fuzzer can pick by index (op 1), so that short inputs
#: reach deep states.
TOKENS = (
    b"EHLO c.example\r\n", b"HELO c.example\r\n", b"MAIL FROM:<a@b.example>\r\n",
    b"RCPT TO:<c@d.example>\r\n", b"DATA\r\n", b"\r\n.\r\n", b".\r\n", b"QUIT\r\n", b"RSET\r\n",
    b"NOOP\r\n", b"BDAT 5\r\n", b"BDAT 3 LAST\r\n", b"BDAT 0 LAST\r\n", b"AUTH PLAIN\r\n",
    b"AUTH PLAIN dGVzdAB0ZXN0AHRlc3Q=\r\n", b"dGVzdAB0ZXN0AHRlc3Q=\r\n", b"*\r\n", b"STARTTLS\r\n",
    b"MAIL FROM:<a@b.example> BODY=BINARYMIME\r\n", b"MAIL FROM:<a@b.example> SIZE=100\r\n",
    b"MAIL FROM:<a@b.example> SIZE=99999999\r\n", b"RCPT TO:<c@d.example> NOTIFY=NEVER\r\n",
    b"EXPN staff\r\n", b"GET / HTTP/1.1\r\n", b"Subject: hi\r\n", b"VRFY x\r\n", b"ETRN x\r\n",
    b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n",
    b"body line\r\n", b"..stuffed\r\n", b".x\r\n", b"\n", b"\r", b"\x00", b".", b"\r\n", b"\n.",
) + VARIANTS

#: The model server's EHLO reply: every extension the inspector knows, and some it removes.
EHLO_REPLY = (
    b"250-model.example\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n250-CHUNKING\r\n"
    b"250-BINARYMIME\r\n250-DSN\r\n250-AUTH PLAIN LOGIN\r\n250-SMTPUTF8\r\n250-ETRN\r\n"
    b"250-STARTTLS\r\n250-XEXCH50\r\n250 ENHANCEDSTATUSCODES\r\n"
)

_STRICT_END = b"\r\n.\r\n"
#: A dot line between any two line ends: how a lenient server ends DATA.
_LENIENT_END = re.compile(rb"(?:\r\n|\r|\n)\.(?:\r\n|\r|\n)")
_FINAL_2XX = re.compile(rb"^2[0-9][0-9](?: |\r\n)", re.M)


class Smuggled(AssertionError):
    """The backend could see an end of data the client did not send as CRLF.CRLF."""


class ModelServer:
    """A sans-IO mail server fed the inspector's ToServer bytes; it checks them as it parses.

    ``refuse`` (set by the fuzzer) makes it answer the next command 5xx.
    It never trusts the gateway: message data is checked for any lenient
    end of data before the strict one.
    """

    def __init__(self, mode):
        self.mode = mode
        self.buf = b""
        self.state = "command"
        self.out = [b"220 model.example ESMTP\r\n"]
        self.refuse = False
        self.sasl = False
        self.chunk_left = 0
        self.chunk_refused = False
        self.positive = 0  # final 2xx lines produced
        self.opaque = False  # after STARTTLS passthrough: encrypted bytes, not checked

    def feed(self, data):
        if self.opaque:
            return
        self.buf += data
        while self.buf and not self.opaque:
            if self.state == "data":
                if not self._data():
                    return
            elif self.state == "chunk":
                take = min(self.chunk_left, len(self.buf))
                self.chunk_left -= take
                self.buf = self.buf[take:]
                if self.chunk_left:
                    return
                self._end_chunk()
            else:
                end = self.buf.find(b"\n")
                if end < 0:
                    return
                line, self.buf = self.buf[: end + 1], self.buf[end + 1 :]
                self._command(line)

    def _data(self):
        data = self.buf
        # No bare CR, bare LF or NUL may reach a server inside message data:
        # with them, some server somewhere ends the message early.
        body = data.replace(b"\r\n", b"")
        if b"\r" in body or b"\n" in body or b"\0" in data:
            raise Smuggled("bare CR/LF or NUL in message data sent to the backend: %r" % data[-200:])
        virtual = b"\r\n" + data
        strict = virtual.find(_STRICT_END)
        lenient = _LENIENT_END.search(virtual)
        if lenient is not None and (strict < 0 or lenient.start() < strict):
            raise Smuggled("lenient end of data before the strict one: %r" % data[-200:])
        if strict < 0:
            return False
        self.buf = virtual[strict + len(_STRICT_END) :]
        self.state = "command"
        self._reply(b"554 5.6.0 no\r\n" if self._refused() else b"250 2.0.0 queued\r\n")
        return True

    def _command(self, line):
        if not line.endswith(b"\r\n") or b"\r" in line[:-2] or b"\0" in line:
            raise AssertionError("command line not clean: %r" % line)
        text = line[:-2]
        if self.sasl:
            self.sasl = False
            self._reply(b"235 2.7.0 ok\r\n")
            return
        verb, _, rest = text.partition(b" ")
        verb = verb.upper()
        if text == b"x" * len(text):
            self._reply(b"500 5.5.2 unrecognized\r\n")
            return
        if verb not in self.mode.verbs:
            raise AssertionError("illegal command forwarded: %r" % text)
        if verb == b"BDAT":
            # RFC 3030: the octets follow whatever the answer will be.
            words = rest.split()
            self.chunk_left = int(words[0]) if words and words[0].isdigit() else 0
            self.chunk_refused = self._refused()
            self.state = "chunk"
            if not self.chunk_left:
                self._end_chunk()
        elif self._refused():
            self._reply(b"550 5.0.0 refused\r\n")
        elif verb == b"EHLO":
            self._reply(EHLO_REPLY)
        elif verb == b"DATA":
            self.state = "data"
            self._reply(b"354 go on\r\n")
        elif verb == b"AUTH":
            self.sasl = True
            self._reply(b"334 \r\n")
        elif verb == b"STARTTLS":
            self.opaque = True
            self._reply(b"220 2.0.0 go\r\n")
        elif verb == b"QUIT":
            self._reply(b"221 2.0.0 bye\r\n")
        else:
            self._reply(b"250 2.0.0 ok\r\n")

    def _end_chunk(self):
        self.state = "command"
        self._reply(b"552 5.0.0 chunk refused\r\n" if self.chunk_refused else b"250 2.0.0 chunk ok\r\n")

    def _refused(self):
        refused, self.refuse = self.refuse, False
        return refused

    def _reply(self, data):
        self.out.append(data)

    def take(self):
        out, self.out = b"".join(self.out), []
        self.positive += len(_FINAL_2XX.findall(out))
        return out


class Session:
    """One inspector, its model server, and the invariants over their exchange."""

    KNOWN = None

    def __init__(self, config):
        protocol = ("smtp", "esmtp", "mailguard", "esmtp")[config & 3]
        tls = "passthrough" if config & 0x20 and protocol == "esmtp" else "strip"
        rule = Rule(
            name="FUZZ", protocol=protocol,
            bare_newline="reject" if config & 4 else "normalize",
            pregreet="ignore" if config & 8 else "reject",
            max_data=64 if config & 0x10 else 100000,
            tls=tls,
            max_bad_commands=3 if config & 0x40 else 10,
            max_recipients=2,
            mask_banner="pix" if config & 0x80 else "off",
        )
        self.mode = MODES[protocol]
        self.inspector = SMTPInspector(rule, self.mode)
        # Trace events (debug = smtp) must change nothing else: half the runs emit them.
        self.inspector.trace = bool(config & 0x40)
        self.server = ModelServer(self.mode)
        self.closed = False
        self.aborted = False
        self.server_gone = False
        self.passthrough = False
        self.desync = False  # the fuzzer sent raw server bytes: reply accounting is off
        self.to_client = []
        self.gateway_positive = 0
        self.apply(self.inspector.server_connected())

    def apply(self, evs):
        if self.KNOWN is None:
            Session.KNOWN = (events.ToServer, events.ToClient, events.Alert, events.Close, events.AbortServer,
                             events.Greeted, events.Passthrough, events.StartTLS, events.Trace,
                             events.MessageSent, events.MessageDone)
        if not isinstance(evs, list):
            raise AssertionError("not a list of events: %r" % (evs,))
        if self.closed and evs:
            raise AssertionError("events after Close: %r" % evs)
        for ev in evs:
            if type(ev) not in self.KNOWN:
                raise AssertionError("unknown event %r" % (ev,))
            if self.closed:
                raise AssertionError("event after Close: %r" % (ev,))
            if isinstance(ev, events.MessageSent) and not 0 <= ev.size <= self.inspector.rule.max_data:
                raise AssertionError("message of %d octets sent past max-data" % ev.size)
            if isinstance(ev, events.ToServer):
                if not isinstance(ev.data, bytes):
                    raise AssertionError("ToServer without bytes")
                if self.aborted or self.server_gone:
                    raise AssertionError("bytes for a backend that is gone: %r" % ev.data[:80])
                self.server.feed(ev.data)
            elif isinstance(ev, events.ToClient):
                if not isinstance(ev.data, bytes):
                    raise AssertionError("ToClient without bytes")
                self.to_client.append(ev.data)
                if ev.data.startswith(b"221 2.7.0"):
                    self.gateway_positive += 1
            elif isinstance(ev, events.Close):
                self.closed = True
            elif isinstance(ev, events.AbortServer):
                self.aborted = True
            elif isinstance(ev, events.Passthrough):
                self.passthrough = True
            elif isinstance(ev, events.StartTLS):
                raise AssertionError("StartTLS without tls = terminate")

    def client(self, data):
        if not self.closed:
            self.apply(self.inspector.client_data(data))

    def server_step(self, cut):
        if self.closed or self.server_gone or self.aborted:
            return
        data = self.server.take()
        if not data:
            return
        cut = cut % (len(data) + 1)
        for piece in (data[:cut], data[cut:]):
            if piece and not self.closed:
                self.apply(self.inspector.server_data(piece))

    def server_raw(self, data):
        if not (self.closed or self.server_gone or self.aborted):
            self.desync = True
            self.apply(self.inspector.server_data(data))

    def server_lost(self):
        if not (self.closed or self.server_gone or self.aborted):
            self.server_gone = True
            self.apply(self.inspector.server_lost())

    def client_lost(self):
        if not self.closed:
            self.apply(self.inspector.client_lost())
            self.closed = True

    def finish(self):
        # Let the dialogue settle: the server answers whatever is pending.
        for _ in range(8):
            self.server_step(0)
        if self.desync or self.passthrough:
            return
        sent = b"".join(self.to_client)
        positive = len(_FINAL_2XX.findall(sent))
        if positive > self.server.positive + self.gateway_positive:
            raise AssertionError(
                "client got %d 2xx replies, server gave %d and the gateway %d: %r"
                % (positive, self.server.positive, self.gateway_positive, sent[-300:])
            )


def run_dialogue(data):
    """Decode ``data`` into a dialogue and run it (see the module docstring)."""
    if not data:
        return
    session = Session(data[0])
    i = 1
    n = len(data)
    while i < n:
        op = data[i] & 7
        arg = data[i + 1] if i + 1 < n else 0
        i += 2
        if op == 0:  # raw client bytes
            session.client(data[i : i + arg])
            i += arg
        elif op == 1:  # a client token
            session.client(TOKENS[arg % len(TOKENS)])
        elif op == 2:  # the server answers what it has, cut in two
            session.server_step(arg)
        elif op == 3:  # raw server bytes
            session.server_raw(data[i : i + arg])
            i += arg
        elif op == 4:
            if arg & 1:
                session.server_lost()
            else:
                session.client_lost()
        elif op == 5:  # the server refuses its next command
            session.server.refuse = True
        elif op == 6:  # a long repeated run of one client byte (over-long lines)
            session.client(data[i : i + 1] * (arg * 8))
            i += 1
        else:  # a token followed by raw bytes in the same chunk
            session.client(TOKENS[arg % len(TOKENS)] + data[i : i + 4])
            i += 4
    session.finish()


def run_scanner(data):
    """Feed a DATA stream whole and in fuzzed pieces; check the end and the forwarded bytes."""
    if len(data) < 3:
        return
    max_size = 32 if data[0] & 1 else 10**9
    rng = random.Random(data[1] << 8 | data[2])
    stream = data[3:]
    whole = _scan(max_size, [stream])
    cuts, pos = [], 0
    while pos < len(stream):
        step = rng.randint(1, 9)
        cuts.append(stream[pos : pos + step])
        pos += step
    pieces = _scan(max_size, cuts)
    out, rest, overflow, size = whole
    # Past max-data the message is dropped (AbortServer), so only where it
    # ends matters; otherwise the forwarded bytes must not depend on cuts.
    if (pieces[1:3] if overflow else pieces) != (whole[1:3] if overflow else whole):
        raise AssertionError("segmentation changed the result: %r / %r" % (stream, cuts))
    strict = (b"\r\n" + stream).find(_STRICT_END)
    if strict < 0:
        if rest is not None:
            raise Smuggled("ended without CRLF.CRLF: %r" % stream)
    elif rest != stream[strict + 3 :]:
        raise Smuggled("ended elsewhere than the client's CRLF.CRLF: %r" % stream)
    body = out.replace(b"\r\n", b"")
    if b"\r" in body or b"\n" in body or b"\0" in out:
        raise Smuggled("bare CR/LF or NUL forwarded: %r" % stream)
    if rest is not None and not overflow:
        if (b"\r\n" + out).find(_STRICT_END) != len(out) - 3:
            raise Smuggled("forwarded end of data not at the end: %r" % stream)
        if size != _unstuffed_size(out):
            raise AssertionError("size %d, forwarded %r" % (size, out))
    elif _STRICT_END in b"\r\n" + out:
        raise Smuggled("forwarded an end of data the client did not send: %r" % stream)


def _scan(max_size, chunks):
    scanner = DataScanner(max_size)
    out, rest = [], None
    for chunk in chunks:
        if rest is not None:
            rest += chunk
            continue
        segs, rest = scanner.feed(chunk)
        out.extend(segs)
    return b"".join(out), rest, scanner.overflow, scanner.size


def _unstuffed_size(forwarded):
    body = forwarded[:-3]
    return len(body) - sum(1 for line in body.split(b"\r\n") if line.startswith(b"."))


def TestOneInput(data):
    """libFuzzer entry point: the low bit of the first byte picks the target."""
    if not data:
        return
    if data[0] & 1:
        run_scanner(data[1:])
    else:
        run_dialogue(data[1:])


# -- seeds and runs without atheris ---------------------------------------------


def _tok(token):
    return bytes([1, TOKENS.index(token)])


def _raw(data):
    out = b""
    for i in range(0, len(data), 255):
        piece = data[i : i + 255]
        out += bytes([0, len(piece)]) + piece
    return out


STEP = bytes([2, 0])


def seeds():
    """A few whole dialogues and DATA streams, in the input format."""
    found = {}
    opening = STEP + _tok(b"EHLO c.example\r\n") + STEP
    envelope = _tok(b"MAIL FROM:<a@b.example>\r\n") + STEP + _tok(b"RCPT TO:<c@d.example>\r\n") + STEP
    data = _tok(b"DATA\r\n") + STEP
    for config in (0x01, 0x05, 0x00, 0x02, 0x11):
        found["clean-%02x" % config] = bytes([0, config]) + opening + envelope + data + _raw(
            b"Subject: x\r\n\r\nbody\r\n..dot\r\n.\r\n") + STEP + _tok(b"QUIT\r\n") + STEP
    for n, variant in enumerate(VARIANTS):
        for config in (0x01, 0x05):
            found["smuggle-%d-%02x" % (n, config)] = bytes([0, config]) + opening + envelope + data + _raw(
                b"body" + variant + b"MAIL FROM:<e@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nspoof\r\n.\r\n") + STEP
        found["scan-%d" % n] = bytes([1, 0, 0, n]) + b"hello" + variant + b"MAIL FROM:<e@x>\r\n.\r\nQUIT\r\n"
    found["bdat"] = bytes([0, 0x01]) + opening + envelope + _tok(b"BDAT 5\r\n") + _raw(b"12345") + STEP + _tok(
        b"BDAT 3 LAST\r\n") + _raw(b"abc") + STEP
    found["auth"] = bytes([0, 0x01]) + opening + _tok(b"AUTH PLAIN\r\n") + STEP + _tok(
        b"dGVzdAB0ZXN0AHRlc3Q=\r\n") + STEP
    found["pregreet"] = bytes([0, 0x09]) + _tok(b"EHLO c.example\r\n") + STEP + STEP
    found["passthrough"] = bytes([0, 0x21]) + opening + _tok(b"STARTTLS\r\n") + STEP + _raw(b"\x16\x03\x01junk")
    return found


def _main(argv):
    if argv[1:2] == ["--make-seeds"]:
        os.makedirs(argv[2], exist_ok=True)
        for name, data in seeds().items():
            with open(os.path.join(argv[2], name), "wb") as f:
                f.write(data)
        return 0
    if argv[1:2] == ["--replay"]:
        for path in argv[2:]:
            with open(path, "rb") as f:
                TestOneInput(f.read())
            print("ok", path)
        return 0
    if argv[1:2] == ["--smoke"]:
        rng = random.Random(int(argv[3]) if len(argv) > 3 else 0)
        pool = list(seeds().values())
        for _ in range(int(argv[2])):
            data = bytearray(rng.choice(pool))
            for _ in range(rng.randint(0, 8)):
                pos = rng.randrange(len(data) + 1)
                data[pos:pos] = bytes([rng.randrange(256)]) * rng.randint(1, 3)
                if data and rng.random() < 0.5:
                    del data[rng.randrange(len(data))]
            TestOneInput(bytes(data))
        print("smoke: %s inputs ok" % argv[2])
        return 0
    if atheris is None:
        print("atheris is not installed (pip install atheris); use --replay or --smoke", file=sys.stderr)
        return 2
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
