"""Numerical check of an applied placement against the original model.

A placement must not change what the model computes. :func:`check_placement` runs one
training-step forward and backward on the original model and on the placed GraphModule
with the same inputs and random state, and compares the outputs, the loss and every
parameter gradient.

Example::

    report = check_placement(spec, captured, assignment, real_devices={"gpu0": "cpu"})
    assert report.ok, report.describe()
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from envs.runtime.apply import apply_placement, to_device
from graphs.model_file import ModelSpec, preserved_buffers
from graphs.profile.op_timing import tensors_in


@dataclass(frozen=True)
class CheckReport:
    """Largest differences between the placed and the original model.

    Attributes:
        output_diff: max |placed - original| over the output tensors.
        loss_diff: |placed loss - original loss|.
        grad_diff: max |placed - original| over all parameter gradients.
        compared_grads: how many parameter gradients were compared.
        missing_grads: parameters whose gradient exists on one side only.
        tolerance: the absolute + relative tolerance used.
    """

    output_diff: float
    loss_diff: float
    grad_diff: float
    compared_grads: int
    missing_grads: tuple[str, ...] = ()
    tolerance: float = 1e-5
    details: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (
            not self.missing_grads
            and max(self.output_diff, self.loss_diff, self.grad_diff) <= self.tolerance
        )

    def describe(self) -> str:
        verdict = "same results" if self.ok else "DIFFERENT results"
        text = (
            f"{verdict}: max output difference {self.output_diff:.2e}, loss {self.loss_diff:.2e}, "
            f"gradients {self.grad_diff:.2e} over {self.compared_grads} parameters (tolerance {self.tolerance:.0e})"
        )
        if self.missing_grads:
            text += f"; gradients missing for {list(self.missing_grads)[:3]}"
        return text


def _scaled_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / (1 + max |b|): absolute for small values, relative for large ones."""
    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / (1.0 + b.abs().max()))


def _run_step(module: torch.nn.Module, spec: ModelSpec, inputs: tuple, seed: int):
    torch.manual_seed(seed)
    module.zero_grad(set_to_none=True)
    output = module(*inputs)
    loss = spec.loss_fn(output, *[to_device(x, "cpu") for x in inputs])
    loss = to_device(loss, "cpu") if isinstance(loss, torch.Tensor) else loss
    loss.backward()
    grads = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
    return tensors_in(output), loss.detach(), grads


def check_placement(
    spec: ModelSpec,
    captured: Any,
    assignment: Mapping[str, str],
    real_devices: Mapping[str, str] | None = None,
    tolerance: float = 1e-5,
    seed: int = 0,
) -> CheckReport:
    """Compare one forward/backward of the placed model with the original.

    Args:
        spec: the loaded model (its module, example inputs and loss).
        captured: the CapturedModel whose ``gm`` the assignment refers to.
        assignment: op node name → device name.
        real_devices: device name → torch device for virtual devices (default: names are real).
        tolerance: largest accepted ``max|placed - original| / (1 + max|original|)``.
        seed: seed set before each run (dropout and other random ops draw the same numbers).
    """
    original = copy.deepcopy(spec.model)
    original.train()
    with preserved_buffers(original):
        ref_out, ref_loss, ref_grads = _run_step(original, spec, spec.example_inputs, seed)
    placed = apply_placement(captured, assignment, real_devices=real_devices, output_device=None)
    placed.train()
    with preserved_buffers(placed):
        out, loss, grads = _run_step(placed, spec, spec.example_inputs, seed)

    output_diff = max((_scaled_diff(a, b) for a, b in zip(out, ref_out)), default=0.0)
    if len(out) != len(ref_out):
        output_diff = float("inf")
    loss_diff = _scaled_diff(loss.reshape(()), ref_loss.reshape(()))
    missing = tuple(sorted(set(ref_grads) ^ set(grads)))
    per_grad = {n: _scaled_diff(grads[n], ref_grads[n]) for n in ref_grads if n in grads}
    return CheckReport(
        output_diff=output_diff,
        loss_diff=loss_diff,
        grad_diff=max(per_grad.values(), default=0.0),
        compared_grads=len(per_grad),
        missing_grads=missing,
        tolerance=tolerance,
        details=per_grad,
    )


__all__ = ["CheckReport", "check_placement"]
