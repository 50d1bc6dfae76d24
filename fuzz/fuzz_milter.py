"""atheris fuzz target for the MTA side of the milter protocol (`mailguard.milter`).

    pip install atheris
    python fuzz/fuzz_milter.py -max_total_time=60 CORPUS_DIR   # libFuzzer options
    python fuzz/fuzz_milter.py --make-seeds fuzz/seeds-milter   # write the seed corpus
    python fuzz/fuzz_milter.py --replay FILE...                 # re-run inputs without atheris
    python fuzz/fuzz_milter.py --smoke 2000                     # random inputs without atheris

One input is what a milter sends: its first byte picks the step the
gateway waits on (negotiation, MAIL, RCPT, a header, a body piece, the end
of the message) and its second how the bytes are cut; the rest is fed to a
`MilterSession` negotiated with every protocol flag the gateway offers
answered by the input.  The properties, checked on every input:

- values or `MilterProtocolError`, nothing else: no other exception, every
  value a known type;
- whatever the segmentation, the same values come out (or the same error);
- after a final answer the session is ready for its next step, and the
  verdict built from it (`Modifications.verdict`) is a valid
  `mailguard.filters.Verdict` (its replies well-formed SMTP);
- nothing is buffered beyond `MAX_PACKET`.

Only the standard library and mailguard's sans-IO modules are imported.
"""

import os
import random
import struct
import sys

try:
    import atheris
except ImportError:  # --replay and --smoke work without it
    atheris = None

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _imports():
    global milter, filters
    from mailguard import filters, milter


if atheris is not None:
    with atheris.instrument_imports(include=["mailguard"]):
        _imports()
else:
    _imports()

STEPS = ("negotiate", "mail", "rcpt", "header", "body", "end")


def _session(step):
    session = milter.MilterSession()
    session.negotiate()
    if step == "negotiate":
        return session
    session.receive(milter.encode(b"O", struct.pack("!III", 6, milter.ACTIONS, milter.SMFIP_HDR_LEADSPC)))
    if step == "mail":
        session.mail(b"a@example.org")
    elif step == "rcpt":
        session.rcpt(b"b@example.org")
    elif step == "header":
        session.header(b"Subject", b" x")
    elif step == "body":
        session.body(b"x\r\n")
    else:
        session.end_of_message()
    return session


KNOWN = (milter.Negotiated, milter.MilterReply, milter.Progress, milter.Quarantine, milter.ReplaceBodyPiece,
         *filters.MODIFICATIONS)


def _run(step, data, cut):
    """Feed ``data`` in pieces of ``cut`` octets; return (values, error text or None)."""
    session = _session(step)
    out = []
    try:
        for i in range(0, len(data), cut):
            out.extend(session.receive(data[i:i + cut]))
            assert session._reader.pending <= milter.MAX_PACKET + 4
    except milter.MilterProtocolError as e:
        text = str(e)
        assert "\n" not in text
        return out, session, text
    return out, session, None


def check(data):
    """Check one input against the properties (AssertionError on a violation)."""
    if len(data) < 2:
        return
    step = STEPS[data[0] % len(STEPS)]
    cut = 1 + data[1] % 17
    body = data[2:]
    whole, session, error = _run(step, body, len(body) or 1)
    pieces, _, error_pieces = _run(step, body, cut)
    assert error == error_pieces, (error, error_pieces)
    if error is None:
        assert whole == pieces, (whole, pieces)
    for value in whole:
        assert isinstance(value, KNOWN), value
    finals = [v for v in whole if isinstance(v, (milter.MilterReply, milter.Negotiated))]
    if error is None and finals:
        assert session.state == milter.READY
        reply = finals[-1]
        if isinstance(reply, milter.MilterReply):
            collected = milter.Modifications(True)
            for value in whole[:-1]:
                if not isinstance(value, milter.Progress):
                    collected.add(value)
            verdict = collected.verdict(reply)
            assert isinstance(verdict, filters.Verdict)
            if verdict.reply is not None:
                filters.check_reply(verdict.reply)


def seeds():
    """Inputs reaching every answer and modification."""
    e = milter.encode
    return [
        bytes([0, 3]) + e(b"O", struct.pack("!III", 6, 0x1FF, 0x1000) + struct.pack("!I", 0) + b"j {client_addr}\0"),
        bytes([1, 1]) + e(b"p") + e(b"y", b"554 5.7.1 Gtube pattern\0"),
        bytes([2, 5]) + e(b"r"),
        bytes([3, 2]) + e(b"a"),
        bytes([4, 7]) + e(b"s"),
        bytes([5, 4]) + e(b"h", b"X-Spam\0yes\0") + e(b"i", b"\0\0\0\0DKIM-Signature\0v=1\0")
        + e(b"m", b"\0\0\0\x01Subject\0\0") + e(b"+", b"<a@b>\0") + e(b"2", b"c@d\0NOTIFY=NEVER\0")
        + e(b"-", b"<e@f>\0") + e(b"b", b"body\n") + e(b"q", b"why\0") + e(b"c"),
        bytes([5, 0]) + e(b"y", b"451-4.7.1 a\r\n451 4.7.1 b\0"),
    ]


def smoke(count, seed=None):
    """Run ``count`` random inputs (mutated seeds and noise) without atheris; return how many ran."""
    rng = random.Random(seed)
    corpus = seeds()
    for _ in range(count):
        data = bytearray(rng.choice(corpus))
        for _ in range(rng.randrange(4)):
            op = rng.randrange(4)
            pos = rng.randrange(len(data) + 1)
            if op == 0 and data:
                data[pos % len(data)] = rng.randrange(256)
            elif op == 1:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
            elif op == 2 and data:
                del data[pos:pos + rng.randrange(1, 8)]
            else:
                data += rng.choice(corpus)[2:]
        check(bytes(data))
    return count


def main(argv):
    if argv[1:2] == ["--make-seeds"]:
        os.makedirs(argv[2], exist_ok=True)
        for i, data in enumerate(seeds()):
            with open(os.path.join(argv[2], "seed-%02d" % i), "wb") as f:
                f.write(data)
        return 0
    if argv[1:2] == ["--replay"]:
        for path in argv[2:]:
            with open(path, "rb") as f:
                check(f.read())
        return 0
    if argv[1:2] == ["--smoke"]:
        print("%d inputs checked" % smoke(int(argv[2]) if len(argv) > 2 else 1000))
        return 0
    if atheris is None:
        print("atheris is not installed: use --replay or --smoke", file=sys.stderr)
        return 2
    atheris.Setup(argv, check)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
