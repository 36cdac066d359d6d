"""``python -m placer <subcommand>``: the command-line entry point.

Subcommands live in :mod:`placer.cli` (one module each, registered in
``placer.cli.commands.COMMANDS``). Every user-facing error is a
:class:`~graphs.errors.PlacerError`: it is printed as ``error: <message>`` on stderr and
the exit status is 2 — no traceback.

Interruptions: SIGTERM (what SLURM, ``docker stop`` and systemd send) is handled like
Ctrl-C — both raise :class:`KeyboardInterrupt` where the program is, so the search stops
and keeps its best, measurement workers are killed and their job files removed, and the
results so far are written. Job files a SIGKILLed run left behind are removed when the
next command starts (:func:`envs.runtime.supervisor.sweep_stale_job_dirs`). A run that was interrupted exits ``128 + signal`` (130 for
SIGINT, 143 for SIGTERM) even when it wrote its results, so a script can tell it from a
finished one. One whose stdout reader left early (``| head``) exits 141 quietly, as Unix tools do.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import NoReturn

from envs.runtime.supervisor import sweep_stale_job_dirs
from graphs.errors import PlacerError
from placer.cli.commands import register_commands


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``placer <command>: error: ...``, exit 2.

    argparse prints its usage block (a dozen lines for ``optimize``) above the line that says
    what was wrong; every other bad input of the CLI is one line, and ``--help`` still shows
    the usage. Subcommand parsers inherit the class (``add_subparsers`` uses the parent's).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = OneLineErrorParser(
        prog="placer",
        description="Learn where each part of a PyTorch model should run.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    register_commands(subparsers)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but an unknown option is reported by its subcommand's parser
    (``placer optimize: error: unrecognized arguments: --bogus``), which is the one that lacks it;
    argparse reports it from the top-level parser (``placer: error: ...``)."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        commands = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
        command = commands.get(getattr(args, "command", None) or "", parser)
        command.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


class _Interruptions:
    """The signals received during a command; each one interrupts like Ctrl-C."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    @property
    def status(self) -> int | None:
        """``128 + signal`` of the first interruption, None when there was none."""
        return 128 + self.received[0] if self.received else None


@contextmanager
def _interruptible() -> Iterator[_Interruptions]:
    """SIGINT and SIGTERM raise KeyboardInterrupt and are remembered (main thread only)."""
    seen = _Interruptions()
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return
    previous = {sig: signal.signal(sig, seen.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield seen
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _reader_gone() -> int:
    """Stop quietly when stdout's reader has closed the pipe (``placer show x.json | head -1``).

    Python's recipe (the ``signal`` docs' note on SIGPIPE): stdout now goes to devnull, so
    the flush at exit cannot raise a second BrokenPipeError.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    # 141 = 128 + SIGPIPE: what a shell reports for a Unix tool SIGPIPE ended, and this CLI's
    # 128 + signal convention for interruptions, so `set -o pipefail` scripts see the usual status.
    return 141


def _interrupted_before_results(args: argparse.Namespace, started: float = 0.0) -> str:
    """The line for a run stopped before it wrote its results (a second Ctrl-C, say): where
    the best placement found so far is, if the command keeps one. Files older than
    ``started`` (the command's start, ``time.time()``) are an earlier run's: a Ctrl-C while
    the model was profiled said "interrupted after the results were written" of them."""
    out = getattr(args, "out", None)
    if not out:
        return "interrupted"
    best, written = Path(out).expanduser() / "best_placement.json", Path(out).expanduser() / "placement.json"
    if not best.is_file() or best.stat().st_mtime < started:
        if getattr(args, "command", None) == "optimize" and written.is_file():
            return f"interrupted before this run found a placement; the earlier results in {out} are as they were"
        if getattr(args, "command", None) == "optimize":  # while the model was captured or profiled, say
            return f"interrupted before this run found a placement; nothing was written to {out}"
        return "interrupted"
    if written.is_file() and written.stat().st_mtime >= best.stat().st_mtime:
        return f"interrupted after the results were written: {written} and its report are complete"
    earlier = Path(out).expanduser() / "previous" / "placement.json"
    return (f"interrupted before the results were written; the best placement found so far is in {best} "
            "(not checked: `placer apply` says so; rerun with --resume to continue from it)"
            + (f"; the earlier run's checked result is in {earlier.parent}/" if earlier.is_file() else ""))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 success, 2 bad input, 130/143 interrupted, 141 stdout closed)."""
    parser = build_parser()
    try:
        args = parse_arguments(parser, argv)
    except SystemExit as exc:  # argparse has printed its error line (or --help) already
        return int(exc.code or 0)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    # Job files (model weights) a SIGKILLed run could not remove go now, not at some later job.
    sweep_stale_job_dirs()
    # torch's own pytree deprecation, raised inside torch when an exported graph is copied or
    # unpickled: nothing the user wrote or can change, printed in the middle of the table.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)`? is deprecated", category=FutureWarning)
    started = time.time()
    with _interruptible() as seen:
        try:
            code = int(args.run(args) or 0)
            sys.stdout.flush()  # a reader gone early shows here, where it can be caught, not at exit
        except BrokenPipeError:
            return _reader_gone()
        except PlacerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            placement_json = getattr(exc, "placement_json", None)  # results unwritable, no fallback either
            if placement_json is not None:
                print(placement_json, file=sys.stderr)
            code = 2
        except KeyboardInterrupt:
            print(_interrupted_before_results(args, started), file=sys.stderr)
            return seen.status or 130
    if seen.status is not None:
        name = signal.Signals(seen.status - 128).name
        print(f"interrupted by {name}: stopped early, results so far kept (exit status {seen.status})",
              file=sys.stderr)
        return seen.status
    return code
