"""Benchmark every baseline over the zoo on the 4-GPU presets (same as ``python -m placer benchmark``).

Usage::

    python benchmarks/bench_baselines.py --out benchmarks/results/baselines-run
    python benchmarks/bench_baselines.py --models nmt,rnnlm --clusters 4xK40-tight

All arguments are those of ``placer benchmark`` (``--help``). Step times are simulated on
the cluster specs unless ``--measure`` is given on real devices.
"""

from __future__ import annotations

import sys

from placer.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
