"""atheris fuzz target for the streaming MIME reader (`mailguard.mime.MimeReader`).

    pip install atheris
    python fuzz/fuzz_mime.py -max_total_time=60 CORPUS_DIR   # libFuzzer options
    python fuzz/fuzz_mime.py --make-seeds fuzz/seeds-mime     # write the seed corpus
    python fuzz/fuzz_mime.py --replay FILE...                 # re-run inputs without atheris
    python fuzz/fuzz_mime.py --smoke 2000                     # random inputs without atheris

One input is a message (any octets) and a segmentation of it.  The
properties, checked on every input:

- events or nothing: feeding and closing never raise; every event is one of
  the reader's event types, and `MessageEnd` comes last, once;
- the same events whatever the segmentation (whole, the input's own
  pieces, byte by byte for short inputs);
- bounded: no held line is longer than the reader's bounds, no decoded text
  line longer than ``max_line`` octets of its source, no more open
  multiparts than ``max_depth``;
- the sizes add up: header and body sizes sum to the message's length.

Only the standard library and mailguard's sans-IO modules are imported, so
the target runs with ``PYTHONPATH=.`` from the source tree.
"""

import os
import random
import sys

try:
    import atheris
except ImportError:  # --replay, --smoke and the seeds work without it
    atheris = None

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _imports():
    global mime
    from mailguard import mime


if atheris is not None:
    with atheris.instrument_imports(include=["mailguard"]):
        _imports()
else:
    _imports()

MAX_LINE = 64
MAX_HEADER = 256
MAX_DEPTH = 4

_EVENTS = (mime.Header, mime.PartStart, mime.TextLine, mime.MessageEnd)



def _run(pieces):
    reader = mime.MimeReader(MAX_HEADER, MAX_LINE, MAX_DEPTH)
    events = []
    for piece in pieces:
        events += reader.feed(piece)
        assert len(reader._line) <= MAX_LINE + 1, "line held beyond its bound"
        assert len(reader._stack) <= MAX_DEPTH, "too many open multiparts"
    events += reader.close()
    assert reader.close() == [], "close() twice gives more events"
    return events


def _lines_by_part(events):
    lines = {}
    for e in events:
        if isinstance(e, mime.TextLine):
            lines.setdefault(e.part, []).append(e.text)
        elif isinstance(e, mime.TextBlock):
            lines.setdefault(e.part, []).extend(e.text.split("\n"))
    return lines


def _run_blocks(pieces):
    reader = mime.MimeReader(MAX_HEADER, MAX_LINE, MAX_DEPTH, text_blocks=True)
    events = []
    for piece in pieces:
        events += reader.feed(piece)
    return events + reader.close()


def check(data, cuts=()):
    """Check every property on ``data`` cut at the offsets ``cuts``; return the events."""
    whole = _run([data])
    for event in whole:
        assert isinstance(event, _EVENTS), "unknown event %r" % (event,)
        if isinstance(event, mime.TextLine):
            assert len(event.text.encode("utf-8")) <= 3 * MAX_LINE, "text line beyond its bound"
    assert isinstance(whole[-1], mime.MessageEnd), "MessageEnd is not last"
    assert sum(isinstance(e, mime.MessageEnd) for e in whole) == 1, "MessageEnd twice"
    end = whole[-1]
    assert end.header_size + end.body_size == len(data), "sizes do not add up: %r" % (end,)
    offsets = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0] + offsets, offsets + [len(data)])]
    assert _run(pieces) == whole, "segmentation changed the events"
    if len(data) <= 512:
        assert _run([data[i : i + 1] for i in range(len(data))]) == whole, "byte by byte changed the events"
    # text_blocks mode: the same lines, the same other events, whatever the segmentation.
    lines = _lines_by_part(whole)
    others = [e for e in whole if not isinstance(e, mime.TextLine)]
    for cut in ([data], pieces):
        blocks = _run_blocks(cut)
        assert _lines_by_part(blocks) == lines, "text blocks hold other lines"
        assert [e for e in blocks if not isinstance(e, mime.TextBlock)] == others, "text blocks changed other events"
    return whole


def TestOneInput(data):
    """libFuzzer entry point: the first 8 octets choose the cuts, the rest is the message."""
    rng = random.Random(data[:8])
    message = data[8:]
    cuts = [rng.randrange(len(message) + 1) for _ in range(rng.randrange(8))]
    check(message, cuts)


def seeds():
    """A few small messages that reach every path of the reader (multiparts, encodings, file names)."""
    b = b"\r\n"
    return [
        b"Subject: hi" + b + b + b"body" + b,
        b"Subject: =?utf-8?q?caf=C3=A9?=" + b + b" folded" + b + b"To: a" + b + b"To: b" + b + b + b"x" * 100 + b,
        b"Content-Type: multipart/alternative; boundary=A" + b + b + b"pre" + b + b"--A" + b
        + b"Content-Type: text/plain; charset=iso-8859-1" + b + b"Content-Transfer-Encoding: quoted-printable" + b + b
        + b"caf=E9 soft=" + b + b"break" + b + b"--A" + b
        + b"Content-Type: multipart/mixed; boundary=B" + b + b + b"--B" + b
        + b"Content-Type: text/html" + b + b"Content-Transfer-Encoding: base64" + b + b + b"PGI+aGk8L2I+Cg==" + b
        + b"--B" + b + b"Content-Type: application/octet-stream; name=\"=?utf-8?b?w6kuZXhl?=\"" + b
        + b"Content-Disposition: attachment; filename*0*=utf-8''%C3%A9t%C3%A9;" + b + b" filename*1*=.exe" + b + b
        + b"AAAA" + b + b"--B--" + b + b"--A--" + b + b"epilogue" + b,
        b"Content-Type: multipart/mixed; boundary=X" + b + b + (b"--X" + b + b"Content-Type: multipart/mixed; boundary=X" + b + b) * 6,
        b"no header line" + b + b"body",
        b"Content-Type: text/plain" + b + b"Content-Transfer-Encoding: base64" + b + b + b"aGVsbG8=garbage" + b,
    ]


def main(argv):
    if argv[1:2] == ["--make-seeds"]:
        os.makedirs(argv[2], exist_ok=True)
        for i, seed in enumerate(seeds()):
            with open(os.path.join(argv[2], "seed-%d" % i), "wb") as f:
                f.write(b"\0" * 8 + seed)
        return 0
    if argv[1:2] == ["--replay"]:
        for name in argv[2:]:
            with open(name, "rb") as f:
                TestOneInput(f.read())
        print("replay: %d inputs ok" % len(argv[2:]))
        return 0
    if argv[1:2] == ["--smoke"]:
        rng = random.Random(0)
        alphabet = [b"--X", b"--X--", b"\r\n", b"\n", b"=", b"=?utf-8?b?w6k=?=", b"Content-Type: multipart/mixed; boundary=X\r\n",
                    b"Content-Transfer-Encoding: base64\r\n", b"Content-Transfer-Encoding: quoted-printable\r\n",
                    b"filename*0*=utf-8''%C3", b"x" * 70, b" ", b":"]
        for _ in range(int(argv[2])):
            parts = seeds()[rng.randrange(len(seeds()))] if rng.random() < 0.3 else b""
            parts += b"".join(rng.choice(alphabet) for _ in range(rng.randrange(40)))
            TestOneInput(rng.randbytes(8) + parts)
        print("smoke: %s inputs ok" % argv[2])
        return 0
    if atheris is None:
        print("atheris is not installed (pip install atheris); use --replay or --smoke", file=sys.stderr)
        return 2
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
