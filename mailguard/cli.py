"""
The C{mailguard} command: operator tools that run beside the gateway.

Each subcommand is a function taking the parsed arguments and returning the
exit code; L{build_parser} wires them up, so a new subcommand (such as
C{show inspect all} or C{show sessions}) is one more C{add_parser} call and
one more function.  Nothing here imports the reactor at module level.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mailguard.policy import PolicyError, load_policy

__all__ = ["DEFAULT_POLICY", "build_parser", "main"]

DEFAULT_POLICY = "etc/policy.ini"
"""The policy file used when C{-c} is not given, relative to the current directory."""


def _plural(count: int, noun: str) -> str:
    """
    Return C{"1 rule"} or C{"2 rules"}.
    """
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def check(args: argparse.Namespace) -> int:
    """
    Validate a policy file exactly as the gateway would load it at start-up.

    Prints C{FILE: OK (N listeners, M rules)} to stdout and returns 0, or
    prints the policy's one-line error to stderr and returns 1.
    """
    try:
        policy = load_policy(args.config)
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 1
    print(
        f"{args.config}: OK ({_plural(len(policy.listeners), 'listener')}, "
        f"{_plural(len(policy.rules), 'rule')})"
    )
    return 0


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
