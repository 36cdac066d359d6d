"""``placer optimize MODEL``: find, check and save a fast placement of a model."""

from __future__ import annotations

import argparse

from placer.search.agents.registry import DEFAULT_AGENT, agent_names, grouper_agents
from placer.search.budget import DEFAULT_BUDGET

EXAMPLES = """examples:
  python -m placer optimize graphs/zoo/nmt.py --budget 2m --out out/nmt
  python -m placer optimize model.py --cluster 4xV100-nvlink --budget 20k --seed 1
  python -m placer optimize model.py --devices cpu,cuda:0 --reward measured --memory cuda:0=20GiB
  python -m placer optimize zoo:rnnlm --devices cpu:0,cpu:1 --budget 1m   # two CPU worker processes, hybrid reward
  python -m placer optimize zoo:rnnlm --devices cpu:0,cpu:1 --reward measured --budget 40
  python -m placer optimize zoo:gpt2 --size small --baselines single,expert,m_etf --out out/gpt2 --resume
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``optimize`` subcommand."""
    parser = subparsers.add_parser(
        "optimize",
        help="search a fast placement of a model and write placement.json + report.md",
        description="Capture MODEL (a model file or zoo:<name>), profile and group it, run the "
                    "baselines, search with the agent, check the winner numerically against the "
                    "original model and write the results to --out.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="model file (.py) or zoo:<name>")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--devices", help="real devices, e.g. cpu,cuda:0,cuda:1 (default: all present when >= 2)")
    where.add_argument("--cluster", help="simulated cluster: preset name (see `placer presets`) or spec file "
                                         "(default on a machine with < 2 devices: 4xK40)")
    parser.add_argument("--budget", default=DEFAULT_BUDGET,
                        help=f"time (90s, 5m, 1h), placements (20000, 20k) or both (5m,20k); default {DEFAULT_BUDGET}. "
                             "Any budget ends earlier after 60,000 placements without improvement")
    parser.add_argument("--reward", choices=["simulated", "measured", "hybrid"],
                        help="what the search optimises. simulated: the simulator's step time (default on a "
                             "simulated cluster). measured: the measured step time of every placement the agent "
                             "proposes (real devices; slow, so few placements). hybrid (default on real devices): "
                             "the simulator, recalibrated in rounds from measurements of its best candidates. On "
                             "real devices the best candidates are measured at the end and the measured fastest "
                             "wins; measurements and calibration go to report.md and calibration.json")
    parser.add_argument("--agent", default=DEFAULT_AGENT, choices=agent_names(),
                        help=f"search agent (default: {DEFAULT_AGENT}, the learned move policy)")
    parser.add_argument("--groups", type=int,
                        help=f"{' and '.join(f'--agent {a}' for a in grouper_agents())} only: how many groups their "
                             "grouper forms (default from graph and devices; at least the number of devices). Not "
                             "the op groups the header line counts; refused with any other agent")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same result)")
    parser.add_argument("--memory", help="per-device memory caps DEVICE=SIZE, e.g. cuda:0=20GiB,cpu=64GB; sizes as in "
                        "accelerate's max_memory and cluster specs: GB/MB = powers of 1000, GiB/MiB = powers of "
                        "1024; '16G' is refused as ambiguous, and a cap must be at least 1 byte")
    parser.add_argument("--baselines", help="comma-separated baselines to compare against and start from "
                                            "(default: the fast heuristics; see placer.search.baselines)")
    parser.add_argument("--out", default="placer-out", help="output directory (default: placer-out)")
    parser.add_argument("--resume", action="store_true", help="start from the placement and policy in --out")
    policy = parser.add_mutually_exclusive_group()
    policy.add_argument("--pretrained", dest="pretrained", action="store_true", default=True,
                        help="start the move policy from the policy shipped with placer, trained by imitating local "
                             "search across many graphs and clusters (the default; benchmarks/results/agent.md)")
    policy.add_argument("--fresh", dest="pretrained", action="store_false",
                        help="start the move policy from fresh weights instead of the shipped policy")
    parser.add_argument("--size", help="model size preset, shortcut for --model-arg size=SIZE")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="keyword argument for get_model/get_example_inputs (repeatable)")
    parser.add_argument("--measure-timeout", type=_seconds, metavar="SECONDS",
                        help="longest one placement's measurement may run before it counts as hung and its "
                             "workers are killed (30, 90s, 5m; default 300s); the --budget also bounds every "
                             "measurement during the search")
    parser.add_argument("--leaf", action="append", default=[], metavar="MODULE",
                        help="keep this module as one op: a module path (encoder.rnn) or class name (Block); "
                             "comma-separated or repeated")
    parser.add_argument("--no-check", action="store_true", help="skip the numerical check of the winner")
    parser.add_argument("--cache-dir", help="where op profiles are cached")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the final summary")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each stage's timing")
    parser.set_defaults(run=run)
    return parser


def _seconds(text: str) -> float:
    """``30``, ``90s``, ``5m`` or ``1h`` as seconds (positive)."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    raw = text.strip().lower()
    scale = units.get(raw[-1:], None)
    number = raw[:-1] if scale is not None else raw
    try:
        value = float(number) * (scale or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds like 30, 90s or 5m, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive time, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    """Run ``placer optimize``; returns the exit status."""
    import logging

    from placer.cli.logs import printed_logs
    from placer.memory_fit import memory_margins
    from placer.optimizing.config import DEFAULT_BASELINES
    from placer.optimizing.run import optimize
    from placer.options import OptionError, parse_leaf_modules, parse_model_args
    from placer.report.results import summary_lines, winner_peak_memory

    baselines = DEFAULT_BASELINES if args.baselines is None else tuple(
        b.strip() for b in args.baselines.split(",") if b.strip())
    if not baselines:
        # Nothing ran, then "no baseline placement fits in device memory" for a model that fits.
        raise OptionError(f"--baselines {args.baselines!r} names no baseline; expected comma-separated names "
                          "such as single,expert,m_etf (leave it out for the default set)")
    with printed_logs(logging.WARNING if args.quiet else logging.INFO):
        result = optimize(
            args.model, devices=args.devices, cluster=args.cluster, budget=args.budget, reward=args.reward,
            groups=args.groups, seed=args.seed, memory=args.memory, baselines=baselines, agent=args.agent,
            out_dir=args.out, resume=args.resume, model_args=parse_model_args(args.model_arg, size=args.size),
            check=not args.no_check, progress=not args.quiet, cache_dir=args.cache_dir, verbose=0 if args.quiet else 1,
            leaf_modules=parse_leaf_modules(args.leaf),
            measure_timeout=args.measure_timeout, pretrained=args.pretrained,
        )
    print()
    print("\n".join(summary_lines(result)))
    kind = "a simulated cluster" if result.cluster.simulated else "real devices"
    print(f"\nbest: {result.winner}, {result.step_time * 1e3:.3f} ms per step ({result.source}; cluster "
          f"{result.cluster.name}, {kind}; reward {result.reward})")
    peak, how = winner_peak_memory(result)
    used = [i for i, m in enumerate(peak) if m > 0]
    problem = result.problem
    print(f"memory ({how}, simulated peak per device): " + memory_margins(
        [problem.device_names[i] for i in used], [peak[i] for i in used], [problem.memory_capacity[i] for i in used]))
    if result.check is not None:
        print(f"check: {result.check.describe()}")
    if args.verbose:
        print("stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()))
    print(f"results in {args.out}/ (placement.json, report.md)")
    from placer.search.baselines.pipeline_rows import recommendation_line

    repeats = result.measurement.repeats if result.measurement is not None else None
    print(recommendation_line(result.table, result.winner, noise=repeats["median"] if repeats else None))
    return 0
