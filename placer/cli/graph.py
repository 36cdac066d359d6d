"""``placer graph MODEL``: capture, profile and group a model and show what will be placed."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``graph`` subcommand."""
    parser = subparsers.add_parser(
        "graph",
        help="show the computation graph of a model file (nodes, groups, costs)",
        description="Capture MODEL (a model file or zoo:<name>), profile every op on the real "
                    "devices present, group it, and summarise the graph the placer will see.",
    )
    parser.add_argument("model", help="model file (.py) or zoo:<name>")
    parser.add_argument("--size", help="model size preset, shortcut for --model-arg size=SIZE")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="keyword argument for get_model/get_example_inputs (repeatable)")
    parser.add_argument("--json", action="store_true", help="print a machine-readable summary")
    parser.add_argument("--save", metavar="FILE", help="write the op graph (.json node-link or .graphml)")
    parser.add_argument("--no-profile", action="store_true", help="skip timing ops (no time per device)")
    parser.add_argument("--devices", help="devices to profile on, e.g. cpu,cuda:0 (default: all present)")
    parser.add_argument("--cache-dir", help="where profiles are cached (default: the profiler's)")
    parser.add_argument("--leaf", action="append", default=[], metavar="MODULE",
                        help="keep this module as one node: a module path (encoder.rnn) or class name (Block); "
                             "comma-separated or repeated, as for optimize")
    parser.add_argument("--top", type=int, default=10, help="how many of the most expensive ops to list")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``placer graph``; returns the exit status."""
    from graphs.graph_io import graph_format, save_graph
    from graphs.pipeline import prepare
    from placer.options import OptionError, parse_device_list, parse_leaf_modules, parse_model_args
    from placer.out_dir import check_cache_dir, check_out_dir
    from placer.report.graph_summary import format_summary, graph_summary

    if args.top < 0:
        raise OptionError(f"--top must be 0 or more, got {args.top}")
    if args.save:
        args.save = str(Path(args.save).expanduser())  # '~' is home, as for --out and --cache-dir
        graph_format(args.save)  # refuse a bad file name or folder before the long work
        check_out_dir(Path(args.save).parent)
    check_cache_dir(args.cache_dir)
    model_args = parse_model_args(args.model_arg, size=args.size)
    devices = parse_device_list(args.devices) if args.devices else None
    # With --json, stdout carries only the JSON document: anything the model file prints
    # while it is loaded and run goes to stderr.
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with quiet:
        prepared = prepare(args.model, model_args=model_args, profile=not args.no_profile,
                           devices=devices, cache_dir=args.cache_dir, leaf_modules=parse_leaf_modules(args.leaf))
    summary = graph_summary(prepared, top=args.top)
    if args.save:
        path = save_graph(prepared.captured.graph, args.save)
        summary["saved"] = str(path)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
        if args.save:
            print(f"saved the op graph to {summary['saved']}")
    sys.stdout.flush()
    return 0
