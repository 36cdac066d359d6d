"""``placer apply MODEL PLACEMENT``: train a few steps with a saved placement and time them."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``apply`` subcommand."""
    parser = subparsers.add_parser(
        "apply", help="run N training steps of a model with a saved placement and print the step time",
        description="Load MODEL, check that PLACEMENT was made for it, apply it (virtual devices of a "
                    "simulated cluster run on their real device, e.g. the CPU) and run N full training "
                    "steps (forward, loss, backward, optimizer step), printing the median step time. A "
                    "pipelined placement over worker processes (cpu:0,cpu:1) runs as a pipeline: one process per "
                    "stage device, its micro-batches and schedule, through torch.distributed.pipelining; over "
                    "simulated devices its stages' assignment runs un-pipelined (the note says so). An un-pipelined "
                    "placement over worker processes runs over them too, one thread each, as optimize measured it.",
        epilog="example:\n  python -m placer apply graphs/zoo/nmt.py placer-out/placement.json --steps 10",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="model file (.py) or zoo:<name>")
    parser.add_argument("placement", help="placement.json written by `placer optimize`")
    parser.add_argument("--steps", type=int, default=10, help="training steps to run (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--cluster", help="cluster the placement's device names come from (default: the one "
                                          "recorded in the placement, else devices are real)")
    parser.add_argument("--size", help="model size preset, shortcut for --model-arg size=SIZE")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="argument of the model file's get_model/get_example_inputs (repeatable); "
                             "default: those optimize recorded in the placement")
    parser.add_argument("--leaf", action="append", default=[], metavar="MODULE",
                        help="keep this module as one op, as optimize did (module path or class name; "
                             "default: the modules optimize recorded in the placement)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from placer.api import load, train_steps
    from placer.options import OptionError, parse_leaf_modules, parse_model_args
    from placer.placement_file import (
        load_placement,
        naming_recorded_leaves,
        recorded_leaf_modules,
        recorded_model_args,
        unchecked_note,
    )

    if args.steps < 1 or args.warmup < 0:
        raise OptionError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    from graphs.capture import capture
    from graphs.pipeline import load_source

    saved = load_placement(args.placement)
    model_args, recorded = recorded_model_args(saved, parse_model_args(args.model_arg, size=args.size))
    unchecked = unchecked_note(saved)
    if unchecked is not None:
        print(f"note: {unchecked}")
    if recorded:
        print(f"model arguments (recorded by optimize): {model_args}")
    leaves, leaves_recorded = recorded_leaf_modules(saved, parse_leaf_modules(args.leaf))
    if leaves_recorded:
        print(f"leaf modules (recorded by optimize): {', '.join(leaves)}")
    spec = load_source(args.model, model_args)
    with naming_recorded_leaves(args.placement, leaves, leaves_recorded):
        captured = capture(spec.model, spec.example_inputs, leaf_modules=leaves, name=spec.name,
                           batch_dim=spec.batch_dim)
    placement = load(args.placement, model=captured, cluster=args.cluster)
    stats = train_steps(spec, captured, placement, steps=args.steps, warmup=args.warmup, cluster=args.cluster,
                        source=args.model, model_args=model_args)
    print(f"{spec.name}: {args.steps} training steps with {args.placement}")
    print(f"devices: {stats['devices']}")
    if stats["note"]:
        print(f"note: {stats['note']}")
    print(f"losses: first {stats['losses'][0]:.6g}, last {stats['losses'][-1]:.6g}")
    print(f"step time: median {stats['median'] * 1e3:.3f} ms, min {stats['min'] * 1e3:.3f} ms (measured)")
    return 0
