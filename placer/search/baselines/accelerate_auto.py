"""``accelerate``: the placement users get today from ``device_map="auto"``, computed by accelerate itself.

The ``balanced`` and ``sequential`` baselines rebuild accelerate's algorithm over the
placement graph and size modules by their training footprint, so they respect device
memory during training. This one calls accelerate's own functions on the user's model —
``get_balanced_memory`` then ``infer_auto_device_map``, what ``from_pretrained(...,
device_map="auto")`` and ``dispatch_model`` users run — so the comparison with today's
practice is exact, including accelerate's measure (parameter and buffer bytes only: a
map that fits for inference may overfill memory for training, which the comparison
then reports).

Devices as accelerate sees them: the cluster's accelerators are GPU indices 0, 1, … in
cluster order with their capacities; a CPU device is accelerate's ``"cpu"``; a module
accelerate sends to ``"disk"`` means the model does not fit. Modules the user keeps
whole (``--leaf`` class names) are accelerate's ``no_split_module_classes``. Ops outside
every module sit with their heaviest neighbour, as for the other module-level baselines.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Mapping

import numpy as np

from envs.sim.problem import PlacementProblem
from placer.search.baselines.common import BaselineInputs, NoFit, accelerators, fill_unassigned
from placer.search.baselines.modules import node_paths

__all__ = ["accelerate_auto", "device_of_path"]


def device_of_path(path: str, device_map: Mapping[str, int]) -> int:
    """Device of a module path under a device_map: its longest key prefix; else its first sub-key's; else -1."""
    best, best_len = -1, -1
    for key, device in device_map.items():
        if (key == "" or path == key or path.startswith(key + ".")) and len(key) > best_len:
            best, best_len = device, len(key)
    if best_len >= 0 or not path:
        return best
    below = [device for key, device in device_map.items() if key.startswith(path + ".")]
    return below[0] if below else -1  # a group spanning modules accelerate split: its first part


def accelerate_auto(problem: PlacementProblem, inputs: BaselineInputs) -> np.ndarray:
    """accelerate's ``infer_auto_device_map`` with ``get_balanced_memory`` (see the module doc)."""
    try:
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory
    except ImportError:
        raise NoFit("accelerate is not installed (pip install 'placer[hf]' or pip install accelerate)") from None
    model = getattr(inputs.captured, "model", None)
    if model is None:
        raise NoFit("accelerate: needs the captured model (pass captured=...)")
    paths = node_paths(problem, inputs, "accelerate")
    gpus = [d for d in accelerators(problem) if problem.device_kinds[d] != "cpu"]
    cpus = [d for d in range(problem.num_devices) if problem.device_kinds[d] == "cpu"]
    max_memory: dict[int | str, int] = {i: int(problem.memory_capacity[d]) for i, d in enumerate(gpus)}
    if cpus:
        max_memory["cpu"] = int(problem.memory_capacity[cpus[0]])
    slot_device = {i: d for i, d in enumerate(gpus)}
    if cpus:
        slot_device["cpu"] = cpus[0]  # type: ignore[index]
    no_split = _no_split_classes(inputs)
    # accelerate warns that the GPU indices are not present on this machine: they are the
    # cluster's, by design; its output on a machine with those GPUs is the same.
    with _quiet():
        balanced = get_balanced_memory(model, max_memory=dict(max_memory), no_split_module_classes=no_split)
        device_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split)
    on_disk = sorted(k for k, v in device_map.items() if v == "disk")
    if on_disk:
        raise NoFit(f"accelerate: the model's parameters do not fit the devices; it offloads {on_disk[:3]} to disk")
    unknown = sorted({str(v) for v in device_map.values() if v not in slot_device})
    if unknown:
        raise NoFit(f"accelerate: placed modules on {unknown}, which the cluster does not have")
    as_devices = {k: slot_device[v] for k, v in device_map.items()}
    row = np.array([device_of_path(p, as_devices) for p in paths], dtype=np.int64)
    default = gpus[0] if gpus else (cpus[0] if cpus else 0)
    return fill_unassigned(problem, row, default=default)


def _no_split_classes(inputs: BaselineInputs) -> list[str] | None:
    leaves = getattr(inputs.captured, "leaf_modules", ()) or ()
    model = inputs.captured.model
    classes = {type(m).__name__ for m in model.modules()}
    names = []
    for leaf in leaves:
        if isinstance(leaf, type):
            names.append(leaf.__name__)
        elif isinstance(leaf, str) and leaf in classes:
            names.append(leaf)
        elif isinstance(leaf, str):  # a module path: its class stays whole
            with contextlib.suppress(AttributeError):
                names.append(type(model.get_submodule(leaf)).__name__)
    return sorted(set(names)) or None


@contextlib.contextmanager
def _quiet():
    logger = logging.getLogger("accelerate")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(previous)
