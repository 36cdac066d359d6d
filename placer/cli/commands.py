"""The CLI's subcommands, one module each.

A subcommand module ``placer/cli/<name>.py`` defines ``add_parser(subparsers)``
(which must call ``parser.set_defaults(run=run)``) and ``run(args) -> int``. Register it
by adding its name to :data:`COMMANDS`; modules import heavy dependencies inside ``run``
so ``placer --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib

COMMANDS: tuple[str, ...] = ("optimize", "graph", "apply", "show", "benchmark", "presets")


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add every subcommand in :data:`COMMANDS` to ``subparsers``."""
    for name in COMMANDS:
        importlib.import_module(f"placer.cli.{name}").add_parser(subparsers)
