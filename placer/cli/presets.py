"""``placer presets``: the cluster presets that ship with placer."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``presets`` subcommand."""
    parser = subparsers.add_parser(
        "presets", help="list the simulated cluster presets",
        description="List the cluster presets usable with --cluster (devices, memory, links).",
        epilog="example:\n  python -m placer presets\n  python -m placer optimize model.py --cluster 8xA100-nvlink",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from envs.hardware.loading import list_presets, load_cluster

    for name in list_presets():
        print(load_cluster(name).describe())
        print()
    return 0
