"""``placer show PLACEMENT``: summarise a saved placement (and draw it, given its model)."""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from envs.hardware.cluster import Cluster
    from envs.sim.problem import PlacementProblem
    from envs.sim.simulator import StepResult
    from graphs.pipeline import Prepared
    from placer.placement_file import Placement


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``show`` subcommand."""
    parser = subparsers.add_parser(
        "show", help="summarise a saved placement; with --model, draw it and simulate its step",
        description="Print what a placement file holds (model fingerprint, devices, ops per device, the "
                    "recorded step time). With --model, also check it against the model, simulate its "
                    "step on its cluster and write pictures (placed graph, schedule, memory) to --out.",
        epilog="examples:\n  python -m placer show placer-out/placement.json\n"
               "  python -m placer show placer-out/placement.json --model graphs/zoo/nmt.py --out pics/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("placement", help="placement.json")
    parser.add_argument("--model", help="the model file (or zoo:<name>) the placement was made for")
    parser.add_argument("--cluster", help="cluster preset/spec to simulate on (default: the recorded one)")
    parser.add_argument("--size", help="model size preset, shortcut for --model-arg size=SIZE")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="argument of the model file's get_model/get_example_inputs (repeatable); "
                             "default: those optimize recorded in the placement")
    parser.add_argument("--leaf", action="append", default=[], metavar="MODULE",
                        help="keep this module as one op, as optimize did (module path or class name; "
                             "default: the modules optimize recorded in the placement)")
    parser.add_argument("--out", default=".", help="where pictures go (default: current directory)")
    parser.add_argument("--cache-dir", help="where op profiles are cached (default: the folder optimize was "
                                            "given, recorded in the placement, so the step is simulated from "
                                            "the same profiles)")
    parser.set_defaults(run=run)
    return parser


def simulate_placement(prepared: Prepared, assignment: Mapping[str, str], cluster: str | Cluster
                       ) -> tuple[PlacementProblem, StepResult]:
    """The problem and simulated step of an op placement (a placement file's assignment).

    The op graph compiled with the model's groups and its own optimizer: the problem
    optimize, the report and the benchmarks simulate, so a placement has one step time.
    """
    from envs.sim.optimizer_state import optimizer_state_kind
    from envs.sim.problem_compile import compile_problem
    from envs.sim.rank_compile import value_leaves
    from envs.sim.simulator import simulate_ops

    problem = compile_problem(prepared.captured.graph, cluster,
                              optimizer=optimizer_state_kind(prepared.spec.optimizer_fn), grouping=prepared.grouping,
                              leaves=value_leaves(prepared.captured.gm))
    return problem, simulate_ops(problem, assignment)[0]


def recorded_rank_cluster(placement: Placement) -> Cluster:
    """The rank cluster (``--devices cpu:0,cpu:1``) a placement was optimized on, from its recorded
    links: measured by the workers at the time, they are what its step time was simulated with.

    Raises:
        OptionError: the ``links`` metadata is not a list of ``[device, device, latency s, bandwidth B/s]``.
    """
    from envs.runtime.distributed.rank_cluster import rank_cluster
    from placer.options import OptionError

    recorded = placement.metadata.get("links")
    try:
        if not isinstance(recorded, list):
            raise TypeError(recorded)
        links = {(str(a), str(b)): (float(lat), float(bw)) for a, b, lat, bw in recorded}
    except (TypeError, ValueError):
        shown = repr(recorded)
        raise OptionError(f"the placement's 'links' metadata is {shown[:60]}; expected a list of "
                          "[device, device, latency seconds, bandwidth bytes/s]") from None
    return rank_cluster(placement.devices, links=links)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from placer.options import OptionError
    from placer.placement_file import (
        load_placement,
        naming_recorded_leaves,
        recorded_leaf_modules,
        recorded_model_args,
        unchecked_note,
    )

    if not args.model:
        # Without the model there is nothing to simulate or draw: `show p.json --cluster
        # 4xV100-nvlink` printed the recorded summary and exited 0, the option ignored.
        given = [flag for flag, value in (("--cluster", args.cluster), ("--size", args.size),
                                          ("--model-arg", args.model_arg), ("--out", args.out != "."),
                                          ("--cache-dir", args.cache_dir)) if value]
        if given:
            raise OptionError(f"{', '.join(given)} only apply with --model (show simulates and draws a placement "
                              "only with its model); expected --model MODEL, a model file or zoo:<name>")
    placement = load_placement(args.placement)
    counts = Counter(placement.assignment.values())
    meta = placement.metadata
    print(f"placement {args.placement}")
    print(f"  model: {meta.get('model', 'not recorded')} (fingerprint {placement.fingerprint}), "
          f"schema v{placement.schema_version}")
    print(f"  devices: {', '.join(placement.devices)}" + (f" on cluster {meta['cluster']}" if "cluster" in meta else ""))
    if meta.get("step_time") is not None:  # null is a valid "no time" (placement_file's metadata check)
        source, method = meta.get("source", "source not recorded"), meta.get("method", "not recorded")
        print(f"  step time: {float(meta['step_time']) * 1e3:.3f} ms ({source}), method {method}")
    elif "step_time" in meta:
        print("  step time: not recorded")
    unchecked = unchecked_note(placement)
    if unchecked is not None:  # as apply says it: best_placement.json reads like a finished result otherwise
        print(f"  note: {unchecked}")
    print("  ops per device: " + ", ".join(f"{d}={counts.get(d, 0)}" for d in placement.devices))
    if placement.pipeline is not None:
        pipe = placement.pipeline
        replicas = "; ".join(", ".join(devs) for devs in pipe.replica_devices)
        print(f"  {pipe.describe()} on {replicas}" + (" (ops per device above: replica 0's)" if pipe.replicas else ""))
    if not args.model:
        if meta.get("model_args"):  # with --model they are printed where they are used, below
            print(f"  model arguments (recorded by optimize): {meta['model_args']}")
        if meta.get("leaf_modules"):
            print(f"  leaf modules (recorded by optimize): {', '.join(meta['leaf_modules'])}")
        return 0

    from envs.hardware.loading import load_cluster
    from graphs.pipeline import prepare
    from placer.memory_fit import memory_margins
    from placer.optimizing.devices import profiles_microbatches
    from placer.options import OptionError, parse_leaf_modules, parse_model_args
    from placer.out_dir import check_cache_dir, check_out_dir
    from placer.report.plots import plot_memory, plot_placed_graph

    pictures_dir = check_out_dir(args.out)  # before the model is captured and profiled, not after
    cluster_name = args.cluster or meta.get("cluster_spec") or meta.get("cluster")
    if not cluster_name:
        raise OptionError("the placement records no cluster; give one with --cluster")
    cluster = recorded_rank_cluster(placement) if not args.cluster and "links" in meta else load_cluster(cluster_name)
    # As optimize prepares it: over CPU processes the ops' fixed parts are measured on a
    # micro-batch too (cached), so a pipelined placement shows the step optimize reported.
    model_args, recorded = recorded_model_args(placement, parse_model_args(args.model_arg, size=args.size))
    if recorded:
        print(f"  model arguments (recorded by optimize): {model_args}")
    leaves, leaves_recorded = recorded_leaf_modules(placement, parse_leaf_modules(args.leaf))
    if leaves_recorded:
        print(f"  leaf modules (recorded by optimize): {', '.join(leaves)}")
    # The profiles optimize costed the placement with: its cache folder unless told otherwise.
    cache_dir = args.cache_dir or meta.get("cache_dir")
    check_cache_dir(cache_dir)
    with naming_recorded_leaves(args.placement, leaves, leaves_recorded):
        prepared = prepare(args.model, model_args=model_args, microbatch_profile=profiles_microbatches(cluster),
                           cache_dir=cache_dir, leaf_modules=leaves)
    placement = load_placement(args.placement, graph=prepared.captured, devices=cluster.device_names)
    if placement.pipeline is not None:
        from graphs.input_batch import batch_size_of

        # apply refuses such a file, so show must not report a step time it could never run
        batch = batch_size_of(prepared.spec.example_inputs, prepared.spec.batch_dim)
        if batch is None:
            raise OptionError("the placement is pipelined but the model's inputs have no batch dimension; "
                              f"expected inputs whose dim {prepared.spec.batch_dim} the micro-batches split")
        placement.pipeline.check_batch(batch)
    problem, step = simulate_placement(prepared, placement.assignment, cluster)
    out = pictures_dir or Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if placement.pipeline is not None:
        from envs.sim.hybrid import simulate_pipelined
        from envs.sim.pipeline_layout import group_pipeline

        pipe = placement.pipeline
        piped = simulate_pipelined(problem, group_pipeline(problem, pipe))
        print(f"  simulated on {cluster_name}, {pipe.describe()}: {piped.step_time * 1e3:.3f} ms per step, "
              f"{'fits' if piped.fits else 'DOES NOT FIT'}; peak memory "
              + memory_margins(list(piped.peak_memory), list(piped.peak_memory.values()),
                               [problem.memory_capacity[problem.device_names.index(d)] for d in piped.peak_memory]))
    if step.refusal is not None:  # over ranks: the runtime would refuse this cut, so it has no step time
        print(f"  simulated on {cluster_name}: REFUSED by the multi-process runtime: {step.refusal}")
    else:
        print(f"  simulated on {cluster_name}{', un-pipelined' if placement.pipeline is not None else ''}: "
              f"{step.step_time * 1e3:.3f} ms per step, "
              f"{'fits' if step.fits else 'DOES NOT FIT'}; peak memory "
              + memory_margins(problem.device_names, step.peak_memory, problem.memory_capacity))
    pictures = [
        plot_placed_graph(prepared.captured.graph, placement.assignment, placement.devices, out / "placed_graph.png"),
        plot_memory(list(problem.device_names), step.peak_memory, problem.memory_capacity, out / "memory.png"),
    ]
    try:
        from placer.report.gantt import plot_gantt

        pictures.append(plot_gantt(problem, placement.assignment, out / "schedule.png"))
    except ImportError:
        pass
    print("  pictures: " + ", ".join(str(p) for p in pictures))
    return 0
