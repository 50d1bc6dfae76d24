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


def version() -> str:
    """
    mailguard's version: the installed distribution's, else the source tree's.
    """
    try:
        from importlib.metadata import PackageNotFoundError, version as installed
    except ImportError:  # pragma: no cover
        installed = None
    if installed is not None:
        try:
            return installed("mailguard")
        except PackageNotFoundError:
            pass
    from mailguard import __version__

    return __version__


MAX_DATA_SANE = 2**31
"""A C{max-data} above this is almost surely a typo."""

TIME_SANE = 86400
"""Seconds (a day): a timeout above this is almost surely a typo."""


def _endpoint_address(description: str, server: bool) -> tuple[str, str, str] | None:
    """
    C{("tcp", host, port)} or C{("unix", path, "")} of an endpoint description, for loop detection.
    """
    if description.lower().startswith("haproxy:"):
        description = description[len("haproxy:"):]
    kind, args, kwargs = _split_description(description)
    if kind in ("tcp", "tcp6"):
        if server:
            port = kwargs.get("port") or (args[0] if args else "")
            host = kwargs.get("interface", "")
        else:
            host = kwargs.get("host") or (args[0] if args else "")
            port = kwargs.get("port") or (args[1] if len(args) > 1 else "")
        return "tcp", host, port
    if kind == "unix":
        path = kwargs.get("address") or kwargs.get("path") or (args[0] if args else "")
        return "unix", path, ""
    return None


_ANYWHERE = {"", "0.0.0.0", "::", "*"}
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def _same_place(listen: tuple[str, str, str], backend: tuple[str, str, str]) -> bool:
    """
    Whether a client connecting to C{backend} would reach the listener C{listen}.
    """
    if listen[0] != backend[0]:
        return False
    if listen[0] == "unix":
        return listen[1] == backend[1]
    if listen[2] != backend[2]:
        return False
    interface, host = listen[1].strip("[]"), backend[1].strip("[]")
    loopback = host in _LOOPBACK or host.startswith("127.")
    if interface in _ANYWHERE:
        # Listening everywhere: this host is reachable at least on loopback.
        return loopback
    return interface == host or (interface in _LOOPBACK and loopback)


def policy_warnings(policy: Policy) -> list[str]:
    """
    What is allowed but almost surely not meant, one line each (C{mailguard check}).

    A rule no listener uses; STARTTLS in C{ehlo-keywords} where C{tls = strip}
    drops it anyway; C{tls = passthrough}, which ends all inspection after
    STARTTLS; a backend that is one of the gateway's own listeners (a loop);
    a C{[milter NAME]} section no rule names; absurd values (C{max-data} above 2^31, times above a day).
    """
    path = policy.path
    warnings = []
    used = {listener.rule.name for listener in policy.listeners}
    s = policy.settings
    for key in ("synwait-time", "finwait-time", "idle-time"):
        value = getattr(s, key.replace("-", "_"))
        if value > TIME_SANE:
            warnings.append(f"{path}: [global] {key}: {value} seconds is more than a day")
    if s.block_time * 60 > TIME_SANE:
        warnings.append(f"{path}: [global] block-time: {s.block_time} minutes is more than a day")
    for rule in policy.rules:
        where = f"{path}: [inspect {rule.name}]"
        if rule.name not in used:
            warnings.append(f"{where}: no listener uses this rule")
        if rule.tls == "strip" and "STARTTLS" in rule.ehlo_keywords:
            warnings.append(
                f"{where} ehlo-keywords: STARTTLS is listed but tls = strip removes it"
                " (use tls = terminate to offer TLS)"
            )
        if rule.tls == "passthrough":
            warnings.append(
                f"{where} tls: passthrough turns all inspection off after STARTTLS,"
                " SMTP smuggling defence included (tls = terminate keeps inspecting)"
            )
        if rule.tls == "terminate" and not rule.auth_requires_tls:
            warnings.append(
                f"{where} auth-requires-tls: no lets clients send AUTH credentials in clear before STARTTLS"
            )
        if rule.max_data > MAX_DATA_SANE:
            warnings.append(f"{where} max-data: {rule.max_data} is above 2^31 octets")
        if rule.timeout > TIME_SANE:
            warnings.append(f"{where} timeout: {rule.timeout} seconds is more than a day")
    from mailguard.status import exposure

    exposed = s.status and exposure(s.status)
    if exposed:
        warnings.append(
            f"{path}: [global] status: {s.status} is reachable beyond loopback ({exposed}) and shows client"
            " addresses: bind it to 127.0.0.1 or a unix: socket, or put it behind an authenticating reverse proxy"
        )
    named = {m.name for rule in policy.rules for m in rule.milters}
    for config in policy.milters:
        if config.name not in named:
            warnings.append(f"{path}: [milter {config.name}]: no rule names this milter (milters = ...)")
    listens = [(listener, _endpoint_address(listener.listen, True)) for listener in policy.listeners]
    for listener in policy.listeners:
        backend = _endpoint_address(listener.backend, False)
        if backend is None:
            continue
        for other, listen in listens:
            if listen is not None and _same_place(listen, backend):
                warnings.append(
                    f"{path}: [listener {listener.name}] backend: {listener.backend} is the gateway's own"
                    f" listener {other.name} ({other.listen}): mail would loop"
                )
                break
    return warnings


def check(args: argparse.Namespace) -> int:
    """
    Validate a policy file exactly as the gateway would load it at start-up.

    Prints C{FILE: OK (N listeners, M rules)} to stdout and returns 0, or
    prints the policy's one-line error to stderr and returns 1.  Warnings
    (L{policy_warnings}) are printed to stderr first; they do not change the
    exit code unless C{--strict} is given, which makes them errors (exit 1).
    """
    from mailguard.service import check_addresses

    try:
        policy = load_policy(args.config, protocols=_protocols())
        # What binding would refuse, known without binding.
        check_addresses(policy)
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 1
    warnings = policy_warnings(policy)
    strict = getattr(args, "strict", False)
    for line in warnings:
        print(f"{'error' if strict else 'warning'}: {line}", file=sys.stderr)
    if warnings and strict:
        return 1
    print(
        f"{args.config}: OK ({_plural(len(policy.listeners), 'listener')}, "
        f"{_plural(len(policy.rules), 'rule')})"
    )
    from mailguard.matching import unused_matches

    for name in unused_matches(policy):
        print(f"{args.config}: [match {name}]: warning: no rule uses this match", file=sys.stderr)
    return 0


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


def _ini(value: object) -> str:
    """
    A parsed policy value written back as INI text.
    """
    if value is None:
        return "none"
    if isinstance(value, bool):
        return _on_off(value)
    if isinstance(value, (frozenset, set)):
        return " ".join(sorted(str(v) for v in value))
    return str(value)


def rule_keys(rule: Rule) -> list[tuple[str, str]]:
    """
    Every effective key of a rule, defaults resolved, in the policy reference's order
    (then its protocol's own keys), like C{postconf}.
    """
    from mailguard.policy import INSPECT_KEYS

    keys = [(key, _ini(getattr(rule, spec.field_for(key)))) for key, spec in INSPECT_KEYS.items()]
    keys += [(key, _ini(value)) for key, value in sorted(rule.options.items())]
    return keys


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
        f"Log format is {s.log_format}, log file rotated at "
        + (f"{s.log_rotate_size} bytes" if s.log_rotate_size else "no size (logrotate or SIGUSR1)"),
        f"Control socket is {s.control_socket}" if s.control_socket else "Control socket is off",
        "Inspection Rule Configuration",
    ]
    for rule in policy.rules:
        lines.append(f" Inspection name {rule.name}")
        lines.append(f"    {_rule_line(rule)}")
        lines.extend(f"    {key} = {value}" for key, value in rule_keys(rule))
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

    Follows Twisted's syntax (see L{mailguard.endpoints.split}).
    """
    from mailguard.endpoints import split

    kind, args, kwargs = split(description)
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


def status_endpoints(policy: Policy) -> list[str]:
    """
    The status endpoint of the gateway, or of each worker (the status port plus its index).
    """
    status = policy.settings.status
    endpoints = [status]
    if policy.settings.workers > 1:
        from mailguard.workers import split_tcp, worker_status

        if split_tcp(status) is not None:
            endpoints = [worker_status(status, i) for i in range(policy.settings.workers)]
    return endpoints


def _fetch_json(args: argparse.Namespace, endpoints: list[str], path: str) -> list[Any] | None:
    """
    C{path} of every endpoint, parsed as JSON; None (and one line on stderr) when one does not answer.
    """
    tables = []
    for where in endpoints:
        try:
            tables.append(json.loads(fetch_status(where, path)))
        except ValueError as e:
            print(f"{args.config}: [global] status {where}: {e}", file=sys.stderr)
            return None
        except OSError as e:
            reason = getattr(e, "reason", None) or e.strerror or e
            print(f"{args.config}: no answer from the status endpoint {where}: {reason}", file=sys.stderr)
            return None
    return tables


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
        endpoints = status_endpoints(policy)
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
    # Each worker serves its own table, on the status port plus its index.
    tables = _fetch_json(args, status_endpoints(policy), "/sessions")
    if tables is None:
        return 1
    table = tables[0]
    if len(tables) > 1:
        table = {
            # Each id names its worker already (<worker>-<n>).
            "sessions": [row for t in tables for row in t.get("sessions", [])],
            "incomplete": sum(t.get("incomplete", 0) for t in tables),
            "one_minute_rate": sum(t.get("one_minute_rate", 0) for t in tables),
            "aggressive": any(t.get("aggressive") for t in tables),
            "blocked_hosts": sorted({h for t in tables for h in t.get("blocked_hosts", [])}),
        }
    print("\n".join(session_lines(table, args.detail)))
    return 0


def _control_paths(args: argparse.Namespace) -> tuple[Policy | None, list[str]]:
    """
    The policy and the control socket path of the gateway, or of each worker.
    """
    try:
        policy = load_policy(args.config, protocols=_protocols())
    except PolicyError as e:
        print(e, file=sys.stderr)
        return None, []
    path = policy.settings.control_socket
    if path is None:
        print(f"{args.config}: [global] control-socket is off, so the gateway takes no commands", file=sys.stderr)
        return None, []
    from mailguard.control import control_path

    if policy.settings.workers > 1:
        return policy, [control_path(path, i) for i in range(policy.settings.workers)]
    return policy, [path]


def _send_all(args: argparse.Namespace, paths: list[str], command: str) -> int:
    """
    Send C{command} to each socket; print the answers; 0 when every one is OK.
    """
    from mailguard.control import send

    status = 0
    for path in paths:
        try:
            answer = send(path, command)
        except OSError as e:
            print(f"{args.config}: no answer from the control socket {path}: {e.strerror or e}", file=sys.stderr)
            return 1
        if answer.startswith("OK"):
            print(answer[3:] if len(paths) == 1 else f"{path}: {answer[3:]}")
        else:
            print(answer[4:] if answer.startswith("ERR ") else answer, file=sys.stderr)
            status = 1
    return status


def clear_session(args: argparse.Namespace) -> int:
    """
    Close one session of the running gateway (IOS C{clear ip inspect session}).

    With workers the id is C{<worker>-<n>}; the worker's own socket is asked.
    """
    policy, paths = _control_paths(args)
    if policy is None:
        return 1
    if len(paths) > 1:
        worker, dash, _n = args.id.partition("-")
        if not (dash and worker.isdigit() and int(worker) < len(paths)):
            print(f"{args.id}: with workers a session id is <worker>-<n> (see mailguard show sessions)",
                  file=sys.stderr)
            return 1
        paths = [paths[int(worker)]]
    return _send_all(args, paths, f"clear session {args.id}")


def debug_smtp(args: argparse.Namespace) -> int:
    """
    Switch the SMTP trace on or off in the running gateway (IOS C{debug} / C{undebug}).
    """
    policy, paths = _control_paths(args)
    if policy is None:
        return 1
    return _send_all(args, paths, f"debug smtp {args.state}")


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


DEFAULT_PIDFILE = "twistd.pid"
"""The pidfile C{reload} reads when C{--pidfile} is not given (twistd's own default)."""


def reload(args: argparse.Namespace) -> int:
    """
    Check the policy file, then tell the running gateway to reload it (SIGHUP), as C{nginx -s reload} does.

    Returns 0 once the signal is sent; 1, with one line on stderr, when the
    policy does not pass the check (nothing is sent) or no live process
    owns the pidfile.  The gateway checks the file again itself and logs
    C{POLICY_RELOADED} or C{POLICY_RELOAD_FAILED}.
    """
    import os
    import signal

    if check(args) != 0:
        return 1
    try:
        with open(args.pidfile) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "no process id in it"
        if isinstance(e, ProcessLookupError):
            reason = "no such process (a stale pidfile?)"
        print(f"{args.pidfile}: no running gateway: {reason}", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGHUP)
    print(f"{args.pidfile}: reload signalled to process {pid}")
    return 0


def milter_lines(policy: Policy, live: dict[str, Any] | None) -> list[str]:
    """
    Each C{[milter NAME]} section, the rules naming it, and (when C{live}, the JSON of C{/milters}) its figures.
    """
    figures = {row["name"]: row for row in (live or {}).get("milters", [])}
    lines = []
    for config in policy.milters:
        o = config.options
        lines.append(
            f"Milter {config.name} ({o['endpoint']}), default-action {config.default_action}, timeouts connect"
            f" {o['connect_timeout']:g} command {o['command_timeout']:g} content {o['content_timeout']:g} s"
        )
        users = [rule.name for rule in policy.rules if any(m.name == config.name for m in rule.milters)]
        lines.append(f"  Used by rules: {', '.join(users) or 'none'}")
        if live is None:
            continue
        row = figures.get(config.name)
        if row is None:
            lines.append("  State idle, no session yet")
            continue
        lines.append(
            f"  State {row['state']}, sessions {row['sessions']}, connections {row['connections']}"
            f" ({row['open']} open), answers {row['answers']} in {row['answer_seconds']:.3f} s"
        )
        verdicts = ", ".join(f"{k} {v}" for k, v in row["verdicts"].items()) or "none"
        lines.append(f"  Verdicts: {verdicts}")
        if row.get("last_failure"):
            lines.append(f"  Last failure: {row['last_failure']}")
    if not lines:
        lines.append("No milters")
    return lines


def _merge_milters(tables: list[dict[str, Any]]) -> dict[str, Any]:
    """
    One C{/milters} table out of each worker's: counts added, C{up} if any worker is up.
    """
    merged: dict[str, dict[str, Any]] = {}
    for table in tables:
        for row in table.get("milters", []):
            into = merged.get(row["name"])
            if into is None:
                merged[row["name"]] = dict(row, verdicts=dict(row["verdicts"]))
                continue
            for key in ("sessions", "connections", "open", "answers", "answer_seconds"):
                into[key] += row[key]
            for verdict, count in row["verdicts"].items():
                into["verdicts"][verdict] = into["verdicts"].get(verdict, 0) + count
            states = {into["state"], row["state"]}
            into["state"] = "up" if "up" in states else "down" if "down" in states else "idle"
            into["last_failure"] = into["last_failure"] or row["last_failure"]
    for row in merged.values():
        row["verdicts"] = dict(sorted(row["verdicts"].items()))
    return {"milters": [merged[name] for name in sorted(merged)]}


def show_milters(args: argparse.Namespace) -> int:
    """
    Print the policy's milters and, from the running gateway's status endpoint, their state and verdicts.

    Without a C{status} key only the configuration is printed (exit 0); when
    nothing answers there, one line on stderr and exit 1.
    """
    try:
        policy = load_policy(args.config, protocols=_protocols())
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 1
    live = None
    status = policy.settings.status
    if status:
        # Each worker counts its own figures, on the status port plus its index.
        tables = _fetch_json(args, status_endpoints(policy), "/milters")
        if tables is None:
            return 1
        live = _merge_milters(tables)
    print("\n".join(milter_lines(policy, live)))
    if live is None and policy.milters:
        print("(no live figures: [global] status is not set)")
    return 0


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
    parser.add_argument("--version", action="version", version=f"mailguard {version()}")
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
    check_parser.add_argument("--strict", action="store_true", help="treat warnings as errors (exit 1)")
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
    inspect_parser.add_argument("scope", nargs="?", default="all", choices=["all"], help="what to show (all)")
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
    milters_parser = shows.add_parser(
        "milters",
        help="the milters: configuration, state, connections, verdicts",
        description="Print the [milter NAME] sections and, from the status endpoint, what each milter did.",
    )
    _add_config(milters_parser)
    milters_parser.set_defaults(func=show_milters)

    clear_parser = commands.add_parser(
        "clear",
        help="close a session of the running gateway",
        description="Close one session through the gateway's control socket (IOS clear ip inspect session).",
    )
    clears = clear_parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    session_parser = clears.add_parser("session", help="close the session ID (see show sessions)")
    session_parser.add_argument("id", metavar="ID", help="the session id: n, or <worker>-<n> with workers")
    _add_config(session_parser)
    session_parser.set_defaults(func=clear_session)

    debug_parser = commands.add_parser(
        "debug",
        help="switch a debug trace in the running gateway",
        description="Switch a debug trace on or off through the gateway's control socket (IOS debug / undebug).",
    )
    facilities = debug_parser.add_subparsers(dest="facility", metavar="FACILITY", required=True)
    smtp_parser = facilities.add_parser("smtp", help="trace each command and reply (verb, length, state, code)")
    smtp_parser.add_argument("state", choices=["on", "off"])
    _add_config(smtp_parser)
    smtp_parser.set_defaults(func=debug_smtp)
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
    reload_parser = commands.add_parser(
        "reload",
        help="check the policy, then make the running gateway reload it (SIGHUP)",
        description="Check the policy file; if it passes, send SIGHUP to the process named by the pidfile.",
    )
    _add_config(reload_parser)
    reload_parser.add_argument(
        "--pidfile", metavar="PIDFILE", default=DEFAULT_PIDFILE,
        help=f"the gateway's pidfile, as given to twistd (default: {DEFAULT_PIDFILE})",
    )
    reload_parser.set_defaults(func=reload)

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
