"""The inspector alone (sans-IO): CPU per message of the esmtp state machine, no sockets.

    python bench/coreproto.py [--size 1024] [--messages 10] [--profile]

Replays one pipelined ESMTP session (greeting, EHLO, then ``--messages``
messages as MAIL/RCPT/DATA groups, then QUIT) through
``SMTPInspector.client_data`` / ``server_data``, exactly as the relay shell
would feed it (one call per segment a real peer would send), and reports
microseconds per message and per session setup.  ``--profile`` adds a
cProfile breakdown.  This is the part of the 1 KB cost that is mailguard's
own Python, separated from the reactor and the kernel.
"""

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from smtpload import build_message  # noqa: E402

GREETING = b"220 sink.example ESMTP\r\n"
EHLO_REPLY = (
    b"250-sink.example\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n250-8BITMIME\r\n"
    b"250-STARTTLS\r\n250 ENHANCEDSTATUSCODES\r\n"
)


def session(rule, mode_name, size, messages):
    """Run one session; return the number of events produced."""
    from mailguard.inspectors import inspector_factory

    insp = inspector_factory(mode_name).buildInspector(rule)
    n = len(insp.server_connected())
    n += len(insp.server_data(GREETING))
    n += len(insp.client_data(b"EHLO bench.example.org\r\n"))
    n += len(insp.server_data(EHLO_REPLY))
    body = build_message(size)
    group = b"MAIL FROM:<bench@example.org> SIZE=%d\r\nRCPT TO:<sink@example.org>\r\nDATA\r\n" % size
    for i in range(messages):
        n += len(insp.client_data(group))
        n += len(insp.server_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"))
        last = i == messages - 1
        for start in range(0, len(body), 65536):
            chunk = body[start : start + 65536]
            if last and start + 65536 >= len(body):
                chunk += b"QUIT\r\n"
            n += len(insp.client_data(chunk))
        n += len(insp.server_data(b"250 2.0.0 Ok: queued\r\n" + (b"221 2.0.0 Bye\r\n" if last else b"")))
    return n


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--messages", type=int, default=10)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--protocol", default="esmtp")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)

    from mailguard.policy import Rule

    rule = Rule(name="BENCH", protocol=args.protocol)
    events = session(rule, args.protocol, args.size, args.messages)
    t = time.perf_counter()
    for _ in range(args.sessions):
        session(rule, args.protocol, args.size, args.messages)
    per_session = (time.perf_counter() - t) / args.sessions
    t = time.perf_counter()
    for _ in range(args.sessions):
        session(rule, args.protocol, args.size, 0)
    setup = (time.perf_counter() - t) / args.sessions
    print("%s, %d-octet messages, %d per session: %.1f us per session, of which setup+EHLO+QUIT %.1f us; "
          "%.1f us per message; %d events per session" % (
              args.protocol, args.size, args.messages, per_session * 1e6, setup * 1e6,
              (per_session - setup) / max(args.messages, 1) * 1e6, events))
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.sessions // 4):
            session(rule, args.protocol, args.size, args.messages)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
