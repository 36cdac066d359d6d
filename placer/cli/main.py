"""``python -m placer <subcommand>``: the command-line entry point.

Subcommands live in :mod:`placer.cli` (one module each, registered in
``placer.cli.commands.COMMANDS``). Every user-facing error is a
:class:`~graphs.errors.PlacerError`: it is printed as ``error: <message>`` on stderr and
the exit status is 2 — no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from graphs.errors import PlacerError
from placer.cli.commands import register_commands


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="placer",
        description="Learn where each part of a PyTorch model should run.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    register_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 success, 2 bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its usage message already
        return int(exc.code or 0)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.run(args) or 0)
    except PlacerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
