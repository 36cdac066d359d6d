"""``placer benchmark``: run baselines (and agents) over zoo models and clusters, one table."""

from __future__ import annotations

import argparse
import sys

from placer.search.budget import DEFAULT_BUDGET

DEFAULT_CLUSTERS = "4xK40,4xV100-nvlink,4xK40-tight"

EXAMPLES = """examples:
  python -m placer benchmark                                   # whole zoo, every baseline, 4-GPU presets
  python -m placer benchmark --models nmt,rnnlm --methods single,expert,m_etf,m_sct,heft
  python -m placer benchmark --clusters 4xK40 --memory-fraction 0.3 --out out/tight
  python -m placer benchmark --models gpt2 --methods baselines,agent:hierarchical --budget 2m

clusters: a preset or spec file; '<preset>-tight' caps every device at 0.4x the model's
training memory so no single device holds it; 'real' uses this machine's devices.
methods: baseline names (see placer.search.baselines), single:<device>, single:*, agent:<name>,
or 'baselines' for all of them.
"""


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``benchmark`` subcommand."""
    parser = subparsers.add_parser(
        "benchmark",
        help="compare placement methods over zoo models and clusters (table + plots)",
        description="Run the chosen methods on each zoo model and cluster through the same simulator "
                    "(and, with --measure on real devices, the same measurement); write results.csv, "
                    "results.md, a bar chart per model and search curves to --out.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", default=None,
                        help="comma-separated zoo models or model files (default: the whole zoo)")
    parser.add_argument("--clusters", default=DEFAULT_CLUSTERS, help=f"comma-separated clusters (default: {DEFAULT_CLUSTERS})")
    parser.add_argument("--methods", default="baselines", help="comma-separated methods (default: every baseline)")
    parser.add_argument("--size", default=None, help="zoo size preset: small (default) or paper")
    parser.add_argument("--budget", default=None,
                        help="search budget for random and agents: placements (1000, 20k) or time (90s, 2m); "
                             f"default: {DEFAULT_BUDGET} for agents, 1,000 placements for random")
    parser.add_argument("--memory-fraction", type=float, default=None,
                        help="cap every device at this fraction of the model's training memory (forces placement)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--measure", action="store_true", help="also measure each placement on the real devices")
    parser.add_argument("--out", default="benchmark-out", help="output directory (default: benchmark-out)")
    parser.add_argument("--cache-dir", help="where op profiles are cached")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the table")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``placer benchmark``; returns the exit status."""
    from graphs.zoo import ZOO_MODELS
    from placer.benchmark import (
        BenchmarkError,
        get_method,
        markdown,
        model_source,
        prepare_cases,
        run_benchmark,
    )
    from placer.options import check_seed
    from placer.out_dir import check_cache_dir

    models = _csv(args.models) if args.models is not None else list(ZOO_MODELS)
    if not models:  # '' ran the whole zoo
        raise BenchmarkError("--models is empty; name zoo models or model files (e.g. rnnlm,gpt2), or leave it out "
                             "for the whole zoo")
    clusters = _csv(args.clusters)
    methods = _csv(args.methods)

    # Refuse bad requests before minutes of capture and profiling.
    for name in methods:
        if name not in ("baselines", "all", "single:*"):
            get_method(name)
    if not methods:
        raise BenchmarkError("--methods is empty; name baselines (e.g. m_etf) or 'baselines' for all")
    if args.memory_fraction is not None and not args.memory_fraction > 0:
        raise BenchmarkError(f"--memory-fraction must be a positive number (e.g. 0.4), got {args.memory_fraction}")
    if args.budget is not None:
        from placer.search.budget import parse_budget

        parse_budget(args.budget)
    check_seed(args.seed)
    check_cache_dir(args.cache_dir)
    if args.size is not None and not any(model_source(m).startswith("zoo:") for m in models):
        raise BenchmarkError(f"--size {args.size} sizes zoo models, and --models names none (model files build "
                             "their model with get_model's defaults here); expected a zoo model among --models, "
                             "or no --size")
    size = args.size or "small"

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    # prepare_cases refuses an unknown zoo model, a missing model file or size before preparing any.
    cases = prepare_cases(models, clusters, size, args.memory_fraction, cache_dir=args.cache_dir, progress=say)
    table = run_benchmark(models, clusters, methods, size=size, budget=args.budget, out_dir=args.out,
                          seed=args.seed, measure=args.measure, cases=cases, progress=say)
    print(markdown(table))
    found = int(table["fits"].sum())
    print(f"\n{len(table)} runs, {found} with a fitting placement; times "
          f"{'measured' if args.measure else 'simulated'}; results in {args.out}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``benchmarks/bench_baselines.py``) with the CLI's error handling."""
    from graphs.errors import PlacerError
    from placer.cli.main import OneLineErrorParser

    parser = OneLineErrorParser(prog="placer benchmark")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["benchmark", *(argv if argv is not None else sys.argv[1:])])
    try:
        return run(args)
    except PlacerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
