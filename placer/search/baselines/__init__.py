"""Heuristic and human-expert baselines, one algorithm family per module, by stable name.

>>> import networkx as nx
>>> from envs.hardware.loading import load_cluster
>>> from envs.sim.problem_compile import compile_problem
>>> from placer.search.baselines import run_baseline
>>> graph = nx.DiGraph(name="chain")  # four 1-GFLOP ops in a row, 1 MiB between them
>>> graph.add_nodes_from((f"n{i}", {"op": "call_function", "flops": 10**9, "out_bytes": 2**20}) for i in range(4))
>>> nx.add_path(graph, ["n0", "n1", "n2", "n3"], bytes=2**20)
>>> problem = compile_problem(graph, load_cluster("4xK40"))
>>> result = run_baseline("heft", problem)
>>> [problem.device_names[d] for d in result.placement], result.reason
(['gpu0', 'gpu0', 'gpu0', 'gpu0'], '')

See :mod:`placer.search.baselines.registry` for the names and :mod:`placer.search.baselines.common`
for the shared cost and memory model.
"""

from placer.search.baselines.common import BaselineError, BaselineInputs, BaselineResult, NoFit
from placer.search.baselines.registry import BASELINES, Baseline, baseline_names, get_baseline, run_baseline

__all__ = [
    "BASELINES",
    "Baseline",
    "BaselineError",
    "BaselineInputs",
    "BaselineResult",
    "NoFit",
    "baseline_names",
    "get_baseline",
    "run_baseline",
]
