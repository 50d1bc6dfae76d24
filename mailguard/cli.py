"""
The C{mailguard} command: operator tools that run beside the gateway.

Each subcommand is a function taking the parsed arguments and returning the
exit code; L{build_parser} wires them up, so a new subcommand (such as
C{show inspect all} or C{show sessions}) is one more C{add_parser} call and
one more function.  Nothing here imports the reactor at module level.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from mailguard.policy import Policy, PolicyError, Rule, load_policy

__all__ = ["DEFAULT_POLICY", "build_parser", "main"]

DEFAULT_POLICY = "etc/policy.ini"
"""The policy file used when C{-c} is not given, relative to the current directory."""


def _protocols() -> Any:
    """
    The inspector plugins installed, as the gateway itself loads them.
    """
    from mailguard.inspectors import registry

    return registry()


def _plural(count: int, noun: str) -> str:
    """
    Return C{"1 rule"} or C{"2 rules"}.
    """
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def check(args: argparse.Namespace) -> int:
    """
    Validate a policy file exactly as the gateway would load it at start-up.

    Prints C{FILE: OK (N listeners, M rules)} to stdout and returns 0 (after
    any L{policy_warnings} on stderr, as C{FILE: warning: ...}), or prints
    the policy's one-line error to stderr and returns 1.
    """
    try:
        policy = load_policy(args.config, protocols=_protocols())
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 1
    for warning in policy_warnings(policy):
        print(f"{args.config}: warning: {warning}", file=sys.stderr)
    print(
        f"{args.config}: OK ({_plural(len(policy.listeners), 'listener')}, "
        f"{_plural(len(policy.rules), 'rule')})"
    )
    from mailguard.matching import unused_matches

    for name in unused_matches(policy):
        print(f"{args.config}: [match {name}]: warning: no rule uses this match", file=sys.stderr)
    return 0


def policy_warnings(policy: Policy) -> list[str]:
    """
    Settings that are valid but weaken the gateway, one line each (C{[SECTION] KEY: why}).
    """
    warnings = []
    for rule in policy.rules:
        if rule.tls == "terminate" and not rule.auth_requires_tls:
            warnings.append(
                f"[inspect {rule.name}] auth-requires-tls: no lets clients send "
                "AUTH credentials in clear before STARTTLS"
            )
    return warnings


def _on_off(value: bool) -> str:
    return "on" if value else "off"


def _rule_line(rule: Rule) -> str:
    """
    One rule the way IOS prints an C{ip inspect name} entry.
    """
    settings = f"alert is {_on_off(rule.alert)} audit-trail is {_on_off(rule.audit_trail)} timeout {rule.timeout}"
    if rule.protocol == "tcp":
        return f"tcp {settings}"
    return f"{rule.protocol} max-data {rule.max_data} {settings}"


def inspect_all_lines(policy: Policy) -> list[str]:
    """
    The configuration in the shape of IOS C{show ip inspect all}.
    """
    s = policy.settings
    lines = [
        f"Session audit trail is {'enabled' if s.audit_trail else 'disabled'}",
        f"Session alert is {'enabled' if s.alert else 'disabled'}",
        f"one-minute (sampling period) thresholds are [{s.one_minute_low}:{s.one_minute_high}] connections",
        f"max-incomplete sessions thresholds are [{s.max_incomplete_low}:{s.max_incomplete_high}]",
        f"max-incomplete tcp connections per host is {s.max_incomplete_host}. Block-time {s.block_time} minute.",
        f"tcp synwait-time is {s.synwait_time} sec -- tcp finwait-time is {s.finwait_time} sec",
        f"tcp idle-time is {s.idle_time} sec",
        f"Status endpoint is {s.status}" if s.status else "Status endpoint is off",
        f"Debugging is on for {', '.join(sorted(s.debug))}" if s.debug else "Debugging is off",
        "Inspection Rule Configuration",
    ]
    for rule in policy.rules:
        lines.append(f" Inspection name {rule.name}")
        lines.append(f"    {_rule_line(rule)}")
    lines.append("Listener Configuration")
    for listener in policy.listeners:
        lines.append(f" Listener {listener.name}")
        lines.append(f"  Listening on {listener.listen}, backend {listener.backend}")
        lines.append(f"  Inspection rule is {listener.rule.name}")
        lines.append(f"    {_rule_line(listener.rule)}")
    return lines


def show_inspect(args: argparse.Namespace) -> int:
    """
    Print the policy as IOS prints C{show ip inspect all}; 1 if it does not load.
    """
    try:
        policy = load_policy(args.config, protocols=_protocols())
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 1
    print("\n".join(inspect_all_lines(policy)))
    return 0


STATUS_TIMEOUT = 5.0
"""Seconds C{show sessions} waits for the status endpoint."""


def _split_description(description: str) -> tuple[str, list[str], dict[str, str]]:
    """
    Split a Twisted endpoint description into its type, arguments and keywords.

    Follows Twisted's syntax: C{:} separates, C{=} names, a backslash escapes.
    """
    parts: list[tuple[str, str | None]] = []
    text: list[str] = []
    key: str | None = None
    escaped = False
    for ch in description:
        if escaped:
            text.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append((key, "".join(text)) if key is not None else ("".join(text), None))
            text, key = [], None
        elif ch == "=" and key is None:
            key, text = "".join(text), []
        else:
            text.append(ch)
    parts.append((key, "".join(text)) if key is not None else ("".join(text), None))
    kind = parts[0][0] or ""
    args = [name for name, value in parts[1:] if value is None]
    kwargs = {name: value for name, value in parts[1:] if value is not None}
    return kind.lower(), args, kwargs


def status_target(description: str) -> tuple[str, str]:
    """
    Where a client reaches the status endpoint C{description}.

    @return: C{("url", "http://host:port")} for C{tcp:} and C{tcp6:}, or
        C{("unix", path)} for C{unix:}.
    @raise ValueError: for any other endpoint type.
    """
    kind, args, kwargs = _split_description(description)
    if kind in ("tcp", "tcp6"):
        port = kwargs.get("port") or (args[0] if args else "")
        if not port.isdigit():
            raise ValueError(f"no port in {description!r}")
        default = "::1" if kind == "tcp6" else "127.0.0.1"
        host = kwargs.get("interface") or default
        if host in ("0.0.0.0", "::"):
            # Listening everywhere: loopback is one of the addresses.
            host = default
        if ":" in host:
            host = f"[{host}]"
        return "url", f"http://{host}:{port}"
    if kind == "unix":
        path = kwargs.get("address") or (args[0] if args else "")
        if not path:
            raise ValueError(f"no path in {description!r}")
        return "unix", path
    raise ValueError(f"{kind}: endpoints are not supported by show sessions (use tcp:, tcp6: or unix:)")


def fetch_status(description: str, path: str, timeout: float = STATUS_TIMEOUT) -> bytes:
    """
    GET C{path} from the status endpoint C{description}; return the body.

    @raise OSError: when nothing answers, or the answer is not 200.
    @raise ValueError: when the endpoint type is not supported.
    """
    kind, where = status_target(description)
    if kind == "url":
        import urllib.request

        with urllib.request.urlopen(where + path, timeout=timeout) as response:
            return response.read()
    import http.client
    import socket

    class UNIXConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(where)

    connection = UNIXConnection("localhost", timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise OSError(f"HTTP {response.status} {response.reason}")
        return body
    finally:
        connection.close()


def _hms(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def session_lines(table: dict[str, Any], detail: bool = False) -> list[str]:
    """
    The live table (the JSON of C{/sessions}) the way IOS prints C{show ip inspect sessions}.
    """
    lines = []
    for row in table.get("sessions", []):
        lines.append(
            (f"Worker {row['worker']} " if "worker" in row else "")
            + f"Session {row['id']} ({row['initiator']})=>({row['responder'] or '-'}) {row['protocol']}"
            f" {row['state_name']} bytes [{row['client_bytes']}:{row['server_bytes']}] age {_hms(row['age'])}"
        )
        if detail:
            lines.append(f"  Created {_hms(row['age'])}, Last heard {_hms(row['idle'])}")
            lines.append(f"  Bytes sent (initiator:responder) [{row['client_bytes']}:{row['server_bytes']}]")
            lines.append(
                f"  Listener {row['listener']}, rule {row['rule']}, commands {row['commands']},"
                f" phase {row['phase'] or '-'}"
            )
    if not lines:
        lines.append("No sessions")
    if detail:
        blocked = ", ".join(table.get("blocked_hosts", [])) or "none"
        lines.append(
            f"Half-open {table.get('incomplete', 0)}, 1-min rate {table.get('one_minute_rate', 0)},"
            f" aggressive {'yes' if table.get('aggressive') else 'no'}, blocked hosts: {blocked}"
        )
    return lines


def policy_map_lines(policy: Policy, hits: dict[tuple[str, str], float] | None) -> list[str]:
    """
    The content rules of every rule, in the shape of IOS C{show policy-map type inspect}.

    C{hits} maps C{(match, action)} to the times it fired (from the running
    gateway's metrics), or is L{None} when they could not be read.
    """
    from mailguard.matching import matches_of

    lines = []
    for rule in policy.rules:
        matches = matches_of(rule)
        if not matches:
            continue
        lines.append(f" Policy-map: {rule.name} ({rule.protocol})")
        for m in matches:
            lines.append(f"  Match: {m.name}{' (negated)' if m.negate else ''}")
            for c in m.criteria:
                lines.append(f"   {c.key} {c.text}")
            count = "-" if hits is None else str(int(hits.get((m.name, m.action), 0)))
            lines.append(f"   Action: {m.action_text}, hits {count}")
    if not lines:
        lines.append("No content rules")
    return lines


def show_policy_map(args: argparse.Namespace) -> int:
    """
    Print every rule's matches with their hits, read from the running gateway's C{/metrics}.

    Without a C{status} key, or when nothing answers, the hits are shown as
    C{-} and one line on stderr says why; the exit status is 1 only when the
    policy does not load.
    """
    try:
        policy = load_policy(args.config, protocols=_protocols())
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 1
    hits: dict[tuple[str, str], float] | None = None
    status = policy.settings.status
    if not status:
        print(f"{args.config}: [global] status is not set, so no hits can be read", file=sys.stderr)
    else:
        endpoints = [status]
        if policy.settings.workers > 1:
            from mailguard.workers import split_tcp, worker_status

            if split_tcp(status) is not None:
                endpoints = [worker_status(status, i) for i in range(policy.settings.workers)]
        try:
            from prometheus_client.parser import text_string_to_metric_families

            hits = {}
            for where in endpoints:
                text = fetch_status(where, "/metrics").decode("utf-8")
                for family in text_string_to_metric_families(text):
                    for sample in family.samples:
                        if sample.name == "mailguard_matches_total":
                            key = (sample.labels["match"], sample.labels["action"])
                            hits[key] = hits.get(key, 0) + sample.value
        except (OSError, ValueError) as e:
            hits = None
            reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
            print(f"{args.config}: no hits: no answer from the status endpoint {status}: {reason}", file=sys.stderr)
    print("\n".join(policy_map_lines(policy, hits)))
    return 0


def show_sessions(args: argparse.Namespace) -> int:
    """
    Print the running gateway's session table, read from its status endpoint.

    Returns 1, with one line on stderr, when the policy does not load, has no
    C{status} key, or nothing answers there.
    """
    try:
        policy = load_policy(args.config, protocols=_protocols())
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 1
    status = policy.settings.status
    if not status:
        print(
            f"{args.config}: [global] status is not set, so the gateway serves no session table"
            " (e.g. status = tcp:8025:interface=127.0.0.1)",
            file=sys.stderr,
        )
        return 1
    endpoints = [status]
    if policy.settings.workers > 1:
        # Each worker serves its own table, on the status port plus its index.
        from mailguard.workers import split_tcp, worker_status

        if split_tcp(status) is not None:
            endpoints = [worker_status(status, i) for i in range(policy.settings.workers)]
    tables = []
    for where in endpoints:
        try:
            tables.append(json.loads(fetch_status(where, "/sessions")))
        except ValueError as e:
            print(f"{args.config}: [global] status {where}: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            reason = getattr(e, "reason", None) or e.strerror or e
            print(f"{args.config}: no answer from the status endpoint {where}: {reason}", file=sys.stderr)
            return 1
    table = tables[0]
    if len(tables) > 1:
        table = {
            "sessions": [dict(row, worker=i) for i, t in enumerate(tables) for row in t.get("sessions", [])],
            "incomplete": sum(t.get("incomplete", 0) for t in tables),
            "one_minute_rate": sum(t.get("one_minute_rate", 0) for t in tables),
            "aggressive": any(t.get("aggressive") for t in tables),
            "blocked_hosts": sorted({h for t in tables for h in t.get("blocked_hosts", [])}),
        }
    print("\n".join(session_lines(table, args.detail)))
    return 0


def replay_command(args: argparse.Namespace) -> int:
    """
    Replay a recorded SMTP dialogue through a listener's rule, offline.

    Returns 0 when every client line would reach the server unchanged and no
    alert fires, 1 when something would be refused, rewritten or alerted, 3
    for a transcript that cannot be read, and 2 (one line on stderr) when the
    policy does not load or names no such listener.
    """
    from mailguard import replay
    from mailguard.inspectors import inspector_factory

    try:
        policy = load_policy(args.config, protocols=_protocols())
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 2
    listeners = {listener.name: listener for listener in policy.listeners}
    if args.listener is None:
        listener = policy.listeners[0]
    elif args.listener in listeners:
        listener = listeners[args.listener]
    else:
        print(
            f"{args.config}: no [listener {args.listener}] (listeners: {', '.join(listeners)})",
            file=sys.stderr,
        )
        return 2
    try:
        with open(args.transcript, "rb") as f:
            raw = f.read()
    except OSError as e:
        print(f"{args.transcript}: {e.strerror or e}", file=sys.stderr)
        return 3
    try:
        lines = replay.parse_transcript(raw, args.transcript)
    except replay.TranscriptError as e:
        print(e, file=sys.stderr)
        return 3
    rule = listener.rule
    heading = [f"listener {listener.name}: rule {rule.name} (protocol {rule.protocol})"]
    filters = replay.skipped_filters(rule)
    heading.append(
        "message filters: " + (", ".join(f"{name} skipped (not called offline)" for name in filters) or "none")
    )
    inspector = inspector_factory(rule.protocol).buildInspector(rule)
    if listener.xclient and hasattr(inspector, "xclient"):
        inspector.xclient = True
    if listener.listen.lower().startswith("ssl:"):
        inspector.client_tls_ready()
    result = replay.replay(lines, inspector, heading)
    print("\n".join(result.lines))
    return result.status


def probe_command(args: argparse.Namespace) -> int:
    """
    Audit the mail server at C{args.backend} and print the report.

    Returns 0 when nothing risky was found, 1 when something was, 3 when the
    server could not be probed, and 2 (one line on stderr) for a BACKEND
    the probe cannot use.
    """
    from mailguard import probe

    try:
        target = probe.parse_backend(args.backend, timeout=args.timeout)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    report = probe.probe(target, rcpt=args.rcpt, sender=args.sender, ca=args.ca, helo=args.helo)
    print(probe.render_json(report) if args.json else probe.render_table(report))
    return report.status


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c", "--config",
        metavar="FILE",
        default=DEFAULT_POLICY,
        help=f"the policy file (default: {DEFAULT_POLICY})",
    )


def build_parser() -> argparse.ArgumentParser:
    """
    Build the argument parser with one subparser per subcommand.

    Each subparser sets C{func}, the function that runs it.
    """
    parser = argparse.ArgumentParser(
        prog="mailguard",
        description="Tools for mailguard, the inspecting SMTP/ESMTP gateway.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check_parser = commands.add_parser(
        "check",
        help="validate a policy file",
        description="Parse a policy file as the gateway would; report the first mistake.",
    )
    check_parser.add_argument(
        "-c", "--config",
        metavar="FILE",
        default=DEFAULT_POLICY,
        help=f"the policy file (default: {DEFAULT_POLICY})",
    )
    check_parser.set_defaults(func=check)

    show_parser = commands.add_parser(
        "show",
        help="show the configuration or the live session table",
        description="Show the inspection configuration, or the running gateway's sessions.",
    )
    shows = show_parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    inspect_parser = shows.add_parser(
        "inspect",
        help="the configuration, as IOS `show ip inspect all`",
        description="Print the policy's session settings, rules and listeners.",
    )
    inspect_parser.add_argument("scope", choices=["all"], help="what to show (all)")
    _add_config(inspect_parser)
    inspect_parser.set_defaults(func=show_inspect)
    sessions_parser = shows.add_parser(
        "sessions",
        help="the live session table of the running gateway",
        description="Fetch the session table from the gateway's [global] status endpoint.",
    )
    sessions_parser.add_argument("--detail", action="store_true", help="times, bytes, listener, rule, commands")
    _add_config(sessions_parser)
    sessions_parser.set_defaults(func=show_sessions)
    policy_map_parser = shows.add_parser(
        "policy-map",
        help="the content rules with their hits, as IOS `show policy-map type inspect`",
        description="Show every rule's [match NAME] sections, with the hits of the running gateway.",
    )
    _add_config(policy_map_parser)
    policy_map_parser.set_defaults(func=show_policy_map)

    probe_parser = commands.add_parser(
        "probe",
        help="audit the mail server behind the gateway",
        description="Check a mail server's extensions, PIPELINING, STARTTLS, STARTTLS injection and "
        "(with --rcpt) SMTP smuggling; exit 0: nothing risky, 1: risky, 3: could not probe.",
    )
    probe_parser.add_argument("backend", metavar="BACKEND", help="a Twisted client endpoint, as in backend =")
    probe_parser.add_argument("--rcpt", metavar="ADDRESS", help="run the smuggling checks, one message each to ADDRESS")
    probe_parser.add_argument("--from", dest="sender", metavar="ADDRESS", help="envelope sender of those messages")
    probe_parser.add_argument("--ca", metavar="FILE", help="PEM CA certificates to verify the server with")
    probe_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    probe_parser.add_argument("--helo", metavar="NAME", default="mailguard-probe.invalid", help="the EHLO name")
    probe_parser.add_argument("--timeout", metavar="SECONDS", type=float, default=10.0,
                              help="limit of each connection, read and write (default: 10)")
    probe_parser.set_defaults(func=probe_command)

    replay_parser = commands.add_parser(
        "replay",
        help="show what a policy would do to a recorded SMTP dialogue",
        description="Run a swaks or C:/S: transcript through a listener's rule, offline; "
        "exit 0: unchanged, 1: refused, rewritten or alerted, 3: unreadable transcript.",
    )
    replay_parser.add_argument("transcript", metavar="TRANSCRIPT", help="swaks output, or C: and S: lines")
    replay_parser.add_argument("--listener", metavar="NAME", help="the listener whose rule applies (default: the first)")
    _add_config(replay_parser)
    replay_parser.set_defaults(func=replay_command)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the C{mailguard} command line and return its exit code.

    @param argv: The arguments after the program name; C{sys.argv[1:]} when
        L{None}.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        # argparse exits on --help and on usage errors; callers of main()
        # (tests, the console script) want the code instead.
        if e.code is None:
            return 0
        return e.code if isinstance(e.code, int) else 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
