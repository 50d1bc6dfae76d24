"""What the DATA fast path costs per chunk, now and with the proposed changes.

    python bench/scanproto.py [--chunk 65536] [--no-c]

Feeds the same messages (1 KB, 100 KB, 1 MB; plain text lines, base64-like
lines, and prose in which 1% of the lines start with a dot) through:

  current   mailguard.wire.DataScanner as it is in the tree;
  merged    the same class with the fast path reorganised (see
            `MergedScanner`): one ``find(b"\\r\\n.")`` decides whether a chunk
            can hold a dot line or the terminator at all, so the common chunk
            pays for the three CR/LF counts and that one search, not five
            passes;
  c-scan    DataScanner.feed behind a compiled one-pass scan (`C_SOURCE`,
            built with the system C compiler into a temporary directory and
            loaded with ctypes; skipped when there is no compiler): ONE pass
            over the chunk, 16 octets at a time, checks CR/LF pairing and NUL,
            counts the lines starting with "." and finds CRLF.CRLF; a clean
            chunk is forwarded (or cut at the terminator) with no Python pass
            over it, anything else takes the existing path (`cscan_feed`).

Every variant's output is checked against the current scanner's on each
message.  Prints microseconds per 64 KB chunk and the implied scan rate.
No network, no gateway: this isolates the per-octet cost of inspection.
"""

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mailguard.wire import DataScanner  # noqa: E402


class MergedScanner(DataScanner):
    """DataScanner with a cheaper common case in the fast path (same output).

    Differences from ``DataScanner._fast``:
    - one ``s.find(b"\\r\\n.")``: when it finds nothing (the common chunk) there
      is neither a terminator nor a line to unstuff, so ``find(b"\\r\\n.\\r\\n")``
      and ``count(b"\\r\\n.")`` are skipped;
    - when it does find one, the terminator search and the dot count start
      from there, not from the start of the chunk.
    ``feed`` orders the CR/LF counts so an anomaly stops at the first
    mismatch.
    """

    def feed(self, data):
        pend = self._pend
        if not self._start_conv and (not pend or (pend[-1] != 13 and b"\0" not in pend)) and b"\0" not in data:
            n = data.count(b"\n")
            if data.count(b"\r") == n and data.count(b"\r\n") == n:
                return self._fast(pend + data if pend else data)
        return self._slow(pend + data)

    def _fast(self, s):
        out = []
        at_start = not self._line_emitted
        if at_start and s.startswith(b".\r\n"):
            return self._finish(out, s[3:])
        lead = 1 if at_start and s[:1] == b"." else 0
        first = s.find(b"\r\n.")
        idx = -1 if first < 0 else s.find(b"\r\n.\r\n", first)
        if idx >= 0:
            body = s[: idx + 2]
            self._emit(out, body, s.count(b"\r\n.", first, idx + 2) + lead)
            self._line_emitted = False
            return self._finish(out, s[idx + 5 :])
        last = s.rfind(b"\r\n")
        if last < 0:
            if at_start and (s == b"" or (lead and len(s) < self.HOLD_LIMIT)):
                self._pend = s
                return out, None
            self._emit(out, s, lead)
            self._line_emitted = True
            self._pend = b""
            return out, None
        tail = s[last + 2 :]
        if tail == b"" or (tail[:1] == b"." and len(tail) < self.HOLD_LIMIT):
            seg, self._pend, self._line_emitted = s[: last + 2], tail, False
        else:
            seg, self._pend, self._line_emitted = s, b"", True
        dots = 0 if first < 0 or first >= len(seg) else s.count(b"\r\n.", first, len(seg))
        self._emit(out, seg, dots + lead)
        return out, None


C_SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <emmintrin.h>

/* One pass over buf[0:n] of message data that starts at a line boundary or
   mid-line (never right after a CR).  Checks that every CR is followed by LF
   and every LF preceded by CR, and that there is no NUL; counts the lines
   that start with "." (each "\n." pair: the stuffing dots); stops at the
   first CRLF.CRLF.  Returns -1 when the data is clean up to the end (or up
   to the terminator, whose offset goes to *term, else -1), or the offset of
   the 16-octet block where it is not: the caller then takes the careful
   path.  A CR as the last octet counts as not clean (its LF is not here). */
long scan(const unsigned char *buf, size_t n, long *dots, long *term)
{
    const __m128i cr = _mm_set1_epi8('\r'), lf = _mm_set1_epi8('\n');
    const __m128i nul = _mm_setzero_si128(), dot = _mm_set1_epi8('.');
    unsigned carry_cr = 0, carry_lf = 0;
    long d = 0;
    size_t i = 0;
    *term = -1;
    for (; i + 16 <= n; i += 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(buf + i));
        unsigned m_cr = _mm_movemask_epi8(_mm_cmpeq_epi8(v, cr));
        unsigned m_lf = _mm_movemask_epi8(_mm_cmpeq_epi8(v, lf));
        unsigned m_nul = _mm_movemask_epi8(_mm_cmpeq_epi8(v, nul));
        unsigned m_dot = _mm_movemask_epi8(_mm_cmpeq_epi8(v, dot));
        unsigned want_lf = ((m_cr << 1) | carry_cr) & 0xFFFF;
        unsigned lines = m_dot & (((m_lf << 1) | carry_lf) & 0xFFFF);
        if ((m_lf != want_lf) | m_nul)
            return (long)i;
        while (lines) {
            /* A line starting with ".": the terminator if "\r\n" follows. */
            size_t at = i + __builtin_ctz(lines);
            lines &= lines - 1;
            if (at + 2 < n && buf[at + 1] == '\r' && buf[at + 2] == '\n') {
                *term = (long)at - 2;
                *dots = d;
                return -1;
            }
            if (at + 2 >= n)
                return (long)i;   /* cannot tell yet: careful path */
            d++;
        }
        carry_cr = m_cr >> 15;
        carry_lf = m_lf >> 15;
    }
    for (; i < n; i++) {
        unsigned char c = buf[i];
        if (c == 0 || (c == '\n') != (carry_cr != 0))
            return (long)i;
        if (c == '.' && carry_lf) {
            if (i + 2 < n && buf[i + 1] == '\r' && buf[i + 2] == '\n') {
                *term = (long)i - 2;
                *dots = d;
                return -1;
            }
            if (i + 2 >= n)
                return (long)i;
            d++;
        }
        carry_cr = c == '\r';
        carry_lf = c == '\n';
    }
    *dots = d;
    return carry_cr ? (long)(n - 1) : -1;
}
"""


def cscan_feed(scan, careful):
    """A DataScanner.feed that lets the one-pass ``scan`` do the common chunk.

    When the compiled pass finds the chunk clean (CRLF pairs only, no NUL),
    it has also counted the lines starting with "." (the stuffing dots) and
    found the terminator, so the chunk is forwarded as it is, or cut at the
    terminator, with no Python-level pass over it.  Anything else (a bare CR
    or LF, a NUL, a partial line held over from the previous chunk, a chunk
    whose last line starts with ".") takes ``careful``, the existing feed, so
    the output is identical to ``careful``'s.
    """
    dots, term = ctypes.c_long(0), ctypes.c_long(-1)
    pdots, pterm = ctypes.byref(dots), ctypes.byref(term)

    def feed(self, data):
        if self._pend or self._start_conv or self.overflow or (not self._line_emitted and data[:1] == b"."):
            return careful(self, data)
        if scan(data, len(data), pdots, pterm) >= 0:
            return careful(self, data)
        out = []
        t = term.value
        if t >= 0:
            self._emit(out, data[: t + 2], dots.value)
            self._line_emitted = False
            return self._finish(out, data[t + 5 :])
        last = data.rfind(b"\r\n")
        if last >= 0 and data[last + 2 : last + 3] == b".":
            return careful(self, data)  # the last line may yet be the terminator
        self._emit(out, data, dots.value)
        self._line_emitted = not data.endswith(b"\r\n")
        return out, None

    return feed


def build_c(tmp):
    """Compile `C_SOURCE` and return the ctypes function, or None."""
    src = os.path.join(tmp, "scan.c")
    lib = os.path.join(tmp, "scan.so")
    with open(src, "w") as f:
        f.write(C_SOURCE)
    try:
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", lib, src], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    fn = ctypes.CDLL(lib).scan
    fn.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_long
    return fn


def messages(size):
    """Three bodies of ``size`` octets each, CRLF lines, terminated."""
    import base64
    import random

    rnd = random.Random(8)
    plain = (b"x" * 74 + b"\r\n") * (size // 76 + 1)
    b64 = base64.encodebytes(rnd.randbytes(size)).replace(b"\n", b"\r\n")
    words = [b"mail", b"gateway", b"inspect.", b"relay", b"Twisted", b"data.", b"the", b"a", b"...", b"end."]
    prose, line = [], []
    total = 0
    while total < size:
        line.append(rnd.choice(words) if line else b"The")
        if sum(map(len, line)) > 64:
            prose.append(b" ".join(line) + b"\r\n")
            total += len(prose[-1])
            line = []
            if rnd.random() < 0.01:
                # One line in a hundred starts with a dot (stuffed on the wire).
                prose.append(b"..leading dot line\r\n")
                total += len(prose[-1])
    prose = b"".join(prose)
    return {
        "text lines": plain[:size - 2] + b"\r\n" if not plain[:size].endswith(b"\r\n") else plain[:size],
        "base64": b64[:size].rsplit(b"\r\n", 1)[0] + b"\r\n",
        "prose, 1% dot lines": prose[:size].rsplit(b"\r\n", 1)[0] + b"\r\n",
    }


def run_scanner(cls, chunks, max_size=10 ** 9):
    scanner = cls(max_size)
    out = []
    for c in chunks:
        segs, rest = scanner.feed(c)
        out.extend(segs)
        if rest is not None:
            break
    return b"".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=65536, help="octets per received chunk (Twisted reads 64 KiB)")
    parser.add_argument("--no-c", action="store_true")
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="mailguard-scan-")
    scan = None if args.no_c else build_c(tmp)
    classes = [DataScanner, MergedScanner]
    if scan is not None:
        classes.append(type("CScanScanner", (DataScanner,), {"feed": cscan_feed(scan, DataScanner.feed)}))
    print("chunk: %d octets; microseconds per chunk (and MB/s) of scanning alone" % args.chunk)
    print("%-8s %-20s %14s %14s %14s" % ("size", "content", "current", "merged", "c-scan (1 pass)"))
    for size_name, size in (("1KB", 1024), ("100KB", 100 * 1024), ("1MB", 1024 * 1024)):
        for kind, body in messages(size).items():
            stream = body + b".\r\n"
            chunks = [stream[i : i + args.chunk] for i in range(0, len(stream), args.chunk)]
            want = run_scanner(DataScanner, chunks)
            row = []
            for cls in classes:
                assert run_scanner(cls, chunks) == want, (cls.__name__, size_name, kind)
                reps = max(3, int(2e7 // len(stream)))
                t = time.perf_counter()
                for _ in range(reps):
                    run_scanner(cls, chunks)
                row.append((time.perf_counter() - t) / reps)
            per_chunk = [dt / len(chunks) * 1e6 for dt in row]
            cells = ["%6.1f (%5.0f)" % (pc, len(stream) / dt / 1e6) for pc, dt in zip(per_chunk, row)]
            print("%-8s %-20s %14s %14s %14s" % (size_name, kind, *cells, *([""] * (3 - len(cells)))))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
