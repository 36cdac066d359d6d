"""accelerate-style module-level splits: ``balanced`` and ``sequential``.

This is what ``device_map="auto"`` does (``accelerate.infer_auto_device_map``), rebuilt
over the placement graph so it can be simulated like every other method:

1. walk the model's top-level modules in order; put a module on the current device when
   it fits in what is left of that device's budget; otherwise split it into its direct
   parameters and child modules and retry with those; a module that cannot be split goes
   to the next device;
2. on the first device, keep room for the largest remaining layer (accelerate's
   ``max_layer_size`` reserve on the main device);
3. devices in order: the accelerators, then the host CPU (accelerate's CPU offload).

``sequential`` gives each device its whole capacity; ``balanced`` first caps every device
but the last at ``total / G + 1.25 * mean layer size`` (``accelerate.get_balanced_memory``),
which spreads the training footprint evenly (the sizes below), not the parameters alone: the
``accelerate`` baseline (:mod:`placer.search.baselines.accelerate_auto`) is accelerate's own result.

Sizes: :func:`infer_device_map` takes any per-node size; given ``param_bytes``
(accelerate's measure) it reproduces ``infer_auto_device_map`` (the tests cross-check
this against accelerate). The baselines size a node by its whole training footprint (parameters, gradients, optimizer state, kept
activations), so the result respects device memory. Received activation copies at cut
edges are not known while splitting; when they overfill a device the budgets shrink by
5% and the split is redone (up to 8 times). Ops outside every module (inputs, glue) sit
with their heaviest neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from envs.hardware.units import format_bytes
from envs.sim.problem import PlacementProblem
from placer.search.baselines.common import (
    BaselineInputs,
    NoFit,
    accelerators,
    device_memory,
    fill_unassigned,
    node_memory,
    overflow_reason,
)
from placer.search.baselines.modules import ModuleItem, is_layer, module_tree, node_paths, split_items


def _max_layer(items: list[ModuleItem], sizes: np.ndarray) -> float:
    """Largest layer (module without children, or single node) among ``items``, recursively."""
    best, todo = 0.0, list(items)
    while todo:
        it = todo.pop()
        if is_layer(it):
            best = max(best, it.size)
        else:
            todo.extend(split_items(it, sizes))
    return best


def infer_device_map(
    paths: list[str], sizes: np.ndarray, budgets: Sequence[float], reserve_on: Sequence[int] = (0,)
) -> np.ndarray:
    """accelerate's ``infer_auto_device_map`` over nodes: budget slot index per node (-1: no module).

    ``budgets[j]`` is the memory of the j-th device in placement order; ``reserve_on`` are
    the slots that keep room for the largest remaining layer (accelerate's main devices).
    Raises :class:`NoFit` when the modules do not fit in the budgets.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    root = module_tree(paths, sizes)
    slot_of = np.full(len(paths), -1, dtype=np.int64)
    todo = split_items(root, sizes)
    # Nodes outside every module and with no weight are glue: placed later by their neighbours.
    todo = [it for it in todo if it.path or it.size > 0]
    used = np.zeros(len(budgets))
    j = 0
    while todo:
        item = todo.pop(0)
        reserve = _max_layer(todo, sizes) if j in reserve_on else 0.0
        limit = budgets[j] - reserve
        if used[j] + item.size <= limit:
            used[j] += item.size
            slot_of[item.all_nodes] = j
            continue
        if not is_layer(item):
            todo = split_items(item, sizes) + todo
            continue
        if item.size == 0:  # an empty single node: nothing to weigh, keep it here
            slot_of[item.all_nodes] = j
            continue
        j += 1
        if j == len(budgets):
            raise NoFit(
                f"module {item.path or '<top level>'!r} ({format_bytes(item.size)}) does not fit on any remaining device"
            )
        todo.insert(0, item)
    return slot_of


def balanced_budgets(total: float, capacities: Sequence[float], n_gpus: int, mean_layer: float) -> list[float]:
    """accelerate ``get_balanced_memory``: cap all GPUs but the last at total/G + 1.25 * mean layer."""
    per_gpu = total // max(n_gpus, 1) + int(1.25 * mean_layer)
    out = list(capacities)
    for i in range(max(n_gpus - 1, 0)):
        out[i] = min(per_gpu, capacities[i])
    return out


def mean_layer_size(paths: list[str], sizes: np.ndarray) -> float:
    """Mean size of the layers (modules without child modules) of the model."""
    root = module_tree(paths, sizes)
    layers, todo = [], [root]
    while todo:
        it = todo.pop()
        if it.children:
            todo.extend(it.children)
        elif it.path and it.size > 0:  # accelerate only sees modules that hold tensors
            layers.append(it.size)
    # integer bytes, truncated as accelerate does
    return float(int(sum(layers) / len(layers))) if layers else 0.0


def _split(problem: PlacementProblem, inputs: BaselineInputs, who: str, balanced: bool) -> np.ndarray:
    paths = node_paths(problem, inputs, who)
    sizes = node_memory(problem)
    gpus = accelerators(problem)
    order = gpus + [d for d in range(problem.num_devices) if d not in gpus]
    n_gpus = len(gpus)
    caps = [float(problem.memory_capacity[d]) for d in order]
    main = [0] + [j for j, d in enumerate(order) if problem.device_kinds[d] == "cpu" and j > 0]
    scale, last_reason = 1.0, ""
    for _ in range(8):
        budgets = [c * scale for c in caps]
        if balanced:
            budgets = balanced_budgets(sizes.sum(), budgets, n_gpus, mean_layer_size(paths, sizes))
        slots = infer_device_map(paths, sizes, budgets, reserve_on=main)
        row = np.where(slots >= 0, np.asarray(order)[np.maximum(slots, 0)], -1)
        row = fill_unassigned(problem, row, default=order[0])
        if np.all(device_memory(problem, row) <= problem.memory_capacity):
            return row
        last_reason = overflow_reason(problem, row)
        scale *= 0.95
    raise NoFit(f"{who}: activation copies at module borders keep overfilling memory ({last_reason})")


def balanced(problem: PlacementProblem, inputs: BaselineInputs) -> np.ndarray:
    """accelerate ``device_map="auto"`` with balanced memory (see the module docstring)."""
    return _split(problem, inputs, "balanced", balanced=True)


def sequential(problem: PlacementProblem, inputs: BaselineInputs) -> np.ndarray:
    """accelerate ``device_map="sequential"`` (see the module docstring)."""
    return _split(problem, inputs, "sequential", balanced=False)
