"""Using a saved placement in one's own code: ``placer.load`` and ``placer.apply``.

Example::

    import placer
    placement = placer.load("out/placement.json", model=model, example_inputs=(x,))
    placed = placer.apply(model, placement, example_inputs=(x,))
    optimizer = torch.optim.SGD(placed.parameters(), lr=0.1)
    loss = placed(x).sum(); loss.backward(); optimizer.step()
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch

from envs.runtime.apply import apply_placement, realize_placement, to_device
from graphs.capture import CapturedModel, capture
from graphs.errors import PlacerError
from graphs.model_file import ModelSpec
from placer.optimizing.config import ClusterSource
from placer.placement_file import Placement, load_placement


def real_devices_of(placement: Placement, cluster: ClusterSource | None = None) -> dict[str, str]:
    """Device name → torch device for a placement: from ``cluster``, else its recorded map, else identity."""
    if cluster is not None:
        from envs.hardware.loading import load_cluster

        return load_cluster(cluster).real_device_map()
    recorded = placement.metadata.get("real_devices")
    if isinstance(recorded, Mapping):
        return {str(k): str(v) for k, v in recorded.items()}
    return {d: d for d in placement.devices}


def _captured(model: torch.nn.Module | CapturedModel, example_inputs: Any = None) -> CapturedModel:
    if isinstance(model, CapturedModel):
        return model
    if not isinstance(model, torch.nn.Module):
        raise PlacerError(f"expected an nn.Module or a CapturedModel, got {type(model).__name__}")
    if example_inputs is None:
        raise PlacerError("example_inputs are needed to capture the model (the same ones the placement was made with)")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    return capture(model, inputs)


def load(path: str | os.PathLike, model: torch.nn.Module | CapturedModel | None = None, example_inputs: Any = None,
         cluster: ClusterSource | None = None) -> Placement:
    """Read a placement file; with ``model``, refuse one made for another model.

    Raises:
        PlacementFileError: malformed file, another model's placement, unknown devices.
    """
    captured = _captured(model, example_inputs) if model is not None else None
    placement = load_placement(path, graph=captured)
    if cluster is not None:
        devices = set(real_devices_of(placement, cluster))
        unknown = sorted(set(placement.assignment.values()) - devices)
        if unknown:
            raise PlacerError(f"placement uses device(s) {unknown} that cluster {cluster!r} does not define")
    return placement


def apply(model: torch.nn.Module | CapturedModel, placement: Placement | str | os.PathLike, example_inputs: Any = None,
          cluster: ClusterSource | None = None, output_device: str | None = None) -> torch.fx.GraphModule:
    """The model with ``placement`` applied: a trainable GraphModule spread over the devices."""
    captured = _captured(model, example_inputs)
    if not isinstance(placement, Placement):
        placement = load_placement(placement, graph=captured)
    elif placement.fingerprint != captured.fingerprint:
        raise PlacerError(
            f"placement was made for model {placement.fingerprint}, not for this one ({captured.fingerprint})"
        )
    return apply_placement(captured, placement.assignment, output_device=output_device,
                           real_devices=real_devices_of(placement, cluster))


def train_steps(spec: ModelSpec, captured: CapturedModel, placement: Placement, steps: int = 10,
                warmup: int = 2, cluster: ClusterSource | None = None) -> dict[str, Any]:
    """Run ``warmup + steps`` full training steps with ``placement``; returns losses and step times."""
    real = real_devices_of(placement, cluster)
    realized = realize_placement(placement.assignment, real)
    placed = apply_placement(captured, placement.assignment, real_devices=real)
    placed.train()
    optimizer = spec.optimizer_fn(placed.parameters())
    used = sorted(set(realized.assignment.values()))
    inputs = spec.example_inputs
    losses, times = [], []
    for i in range(warmup + steps):
        for d in used:
            if d.startswith("cuda"):
                torch.cuda.synchronize(d)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        output = placed(*inputs)
        loss = spec.loss_fn(output, *[to_device(x, "cpu") for x in inputs])
        loss = to_device(loss, "cpu")
        loss.backward()
        optimizer.step()
        for d in used:
            if d.startswith("cuda"):
                torch.cuda.synchronize(d)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
            losses.append(float(loss.detach()))
    return {
        "losses": losses, "times": times, "median": statistics.median(times), "min": min(times),
        "devices": ", ".join(f"{v}→{r}" for v, r in sorted(realized.virtual_to_real.items())
                             if v in set(placement.assignment.values())),
        "note": realized.note,
    }
