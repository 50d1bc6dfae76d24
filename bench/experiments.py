"""Run the mailguard gateway with proposed changes applied as monkeypatches (bench only).

    python bench/experiments.py PATCH[,PATCH...] -- <twistd arguments>

Used by ``bench/bench.py --experiment PATCH`` to measure, in the same run
and against the same baselines, what a proposed change to mailguard would
buy before anyone edits mailguard.  Nothing here is imported by mailguard;
each patch mirrors a change described in bench/RESULTS.md.

Patches:

  merged   DataScanner's fast path with one ``find(b"\\r\\n.")`` deciding
           whether a chunk can hold a dot line or the terminator
           (``bench/scanproto.py`` MergedScanner).
  cscan    DataScanner.feed first asks a one-pass compiled scanner (SSE2,
           ``bench/scanproto.py`` C_SOURCE, built with ``cc`` at start-up)
           whether the chunk is clean (CRLF pairs only, no NUL, no line
           starting with "."); a clean chunk is forwarded as it is, anything
           else takes the existing path.
  isascii  commands.parse_path checks for 8-bit octets with ``bytes.isascii()``
           instead of a per-octet generator.
  coalesce relay.ClientLeg._run writes consecutive ToServer (ToClient) data
           with one ``writeSequence`` call per leg instead of one ``write``
           per event.
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def patch_merged():
    from scanproto import MergedScanner

    from mailguard import wire

    wire.DataScanner.feed = MergedScanner.feed
    wire.DataScanner._fast = MergedScanner._fast


def patch_cscan():
    import shutil

    from scanproto import build_c, cscan_feed

    from mailguard import wire

    tmp = tempfile.mkdtemp(prefix="mailguard-cscan-")
    scan = build_c(tmp)
    shutil.rmtree(tmp, ignore_errors=True)  # the library stays mapped
    if scan is None:
        raise SystemExit("experiments: cscan needs a C compiler (cc)")
    wire.DataScanner.feed = cscan_feed(scan, wire.DataScanner.feed)


def patch_isascii():
    import inspect

    from mailguard import commands

    source = commands.parse_path
    code = source.__code__
    # Same function, with the per-octet test replaced: rebuild it from source.
    text = inspect.getsource(source)
    new = text.replace("any(b >= _UTF8_MIN for b in path)", "not path.isascii()")
    if new == text:
        raise SystemExit("experiments: parse_path changed; isascii patch no longer applies")
    namespace = dict(commands.__dict__)
    exec(compile(new, code.co_filename, "exec"), namespace)
    commands.parse_path = namespace["parse_path"]
    # Callers that imported the name keep working through the module global.
    for name, value in list(vars(commands).items()):
        if getattr(value, "__code__", None) is not None and "parse_path" in value.__code__.co_names:
            value.__globals__["parse_path"] = commands.parse_path


def patch_coalesce():
    from mailguard import relay

    ToServer, ToClient = relay.ToServer, relay.ToClient
    run_one = relay.ClientLeg._run

    def _run(self, events):
        # Consecutive data for one leg goes out in one writeSequence call;
        # any other event first flushes what came before it, keeping order.
        to_server, to_client = [], []
        for event in events:
            cls = event.__class__
            if cls is ToServer:
                to_server.append(event.data)
            elif cls is ToClient:
                to_client.append(event.data)
            else:
                self._flush_coalesced(to_server, to_client)
                to_server, to_client = [], []
                run_one(self, [event])
        self._flush_coalesced(to_server, to_client)

    def _flush_coalesced(self, to_server, to_client):
        if to_server and self.server is not None and not self._server_gone:
            self.server.transport.writeSequence(to_server)
        if to_client:
            self.transport.writeSequence(to_client)

    relay.ClientLeg._run = _run
    relay.ClientLeg._flush_coalesced = _flush_coalesced


PATCHES = {"merged": patch_merged, "cscan": patch_cscan, "isascii": patch_isascii, "coalesce": patch_coalesce}


def main():
    names = sys.argv[1].split(",")
    rest = sys.argv[2:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    for name in names:
        PATCHES[name]()
    from twisted.scripts.twistd import run

    sys.argv = ["twistd"] + rest
    run()


if __name__ == "__main__":
    main()
