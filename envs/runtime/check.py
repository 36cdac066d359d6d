"""Numerical check of an applied placement against the original model.

A placement must not change what the model computes, now or later. :func:`check_placement`
trains a copy of the original model and the placed GraphModule side by side for
``steps`` training steps (3 by default) with the same inputs and random state, the
state of each carried from one step to the next, and after every step compares

* the outputs and the loss,
* every parameter's gradient,
* every parameter after the optimizer step, and
* every buffer (BatchNorm running statistics, ``num_batches_tracked``, an EMA or a step
  counter that forward() updates in place).

One step with buffers restored would pass a placed model that loses an in-place buffer
update: its first output is right and it diverges from the second step on. Comparing the
buffers and later steps catches that. The copies are trained, never the user's model.

Example::

    report = check_placement(spec, captured, assignment, real_devices={"gpu0": "cpu"})
    assert report.ok, report.describe()
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from envs.runtime.apply import apply_placement, to_device
from graphs.capture import CapturedModel, set_training_modes
from graphs.gc_pause import paused_gc
from graphs.model_file import ModelSpec
from graphs.profile.op_timing import tensors_in

#: Training steps compared by default: the first shows a wrong computation, the second
#: state that was not carried (an in-place buffer update that was lost), the third that
#: the optimizer's own state (momentum, Adam's moments) is carried too.
DEFAULT_STEPS = 3


@dataclass(frozen=True)
class CheckReport:
    """Largest differences between the placed and the original model over ``steps`` training steps.

    Attributes:
        output_diff: max scaled |placed - original| over the output tensors, all steps.
        loss_diff: the same for the loss.
        grad_diff: the same over all parameter gradients.
        compared_grads: how many parameter gradients were compared (per step).
        missing_grads: parameters whose gradient exists on one side only.
        tolerance: the absolute + relative tolerance used.
        details: worst difference per compared tensor (``grad:``, ``param:``, ``buffer:`` names).
        steps: training steps compared, state carried from each to the next.
        param_diff: the same over the parameters after each optimizer step.
        buffer_diff: the same over every buffer after each step.
        compared_buffers: how many buffers were compared (per step).
        missing_state: parameters or buffers that exist on one side only.
        first_bad_step: the first step (1-based) at which a difference exceeded the tolerance.
    """

    output_diff: float
    loss_diff: float
    grad_diff: float
    compared_grads: int
    missing_grads: tuple[str, ...] = ()
    tolerance: float = 1e-5
    details: dict[str, float] = field(default_factory=dict)
    steps: int = 1
    param_diff: float = 0.0
    buffer_diff: float = 0.0
    compared_buffers: int = 0
    missing_state: tuple[str, ...] = ()
    first_bad_step: int | None = None

    @property
    def ok(self) -> bool:
        """True when nothing is missing and every difference is within the tolerance."""
        worst = max(self.output_diff, self.loss_diff, self.grad_diff, self.param_diff, self.buffer_diff)
        return not self.missing_grads and not self.missing_state and worst <= self.tolerance

    def describe(self) -> str:
        """One line: the verdict, the steps compared and the largest difference of each kind."""
        verdict = "same results" if self.ok else "DIFFERENT results"
        text = (
            f"{verdict} over {self.steps} training step{'s' if self.steps != 1 else ''}: max output "
            f"difference {self.output_diff:.2e}, loss {self.loss_diff:.2e}, gradients {self.grad_diff:.2e} "
            f"over {self.compared_grads} parameters, parameters after the optimizer step {self.param_diff:.2e}, "
            f"buffers {self.buffer_diff:.2e} over {self.compared_buffers} (tolerance {self.tolerance:.0e})"
        )
        if not self.ok and self.first_bad_step is not None:
            worst = max(self.details.items(), key=lambda kv: kv[1], default=None)
            text += f"; first different at step {self.first_bad_step}"
            if worst is not None and worst[1] > self.tolerance:
                text += f" (worst: {worst[0]} {worst[1]:.2e})"
        if self.missing_grads:
            text += f"; gradients missing for {list(self.missing_grads)[:3]}"
        if self.missing_state:
            text += f"; state on one side only: {list(self.missing_state)[:3]}"
        return text


def _scaled_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / (1 + max |b|): absolute for small values, relative for large ones."""
    if a.dtype == torch.bool or b.dtype == torch.bool:
        a, b = a.to(torch.int8), b.to(torch.int8)
    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    diff = float((a - b).abs().max() / (1.0 + b.abs().max()))
    return diff if diff == diff else float("inf")  # NaN on one side only counts as different


def _run_step(module: torch.nn.Module, spec: ModelSpec, inputs: tuple, seed: int,
              optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    optimizer.zero_grad(set_to_none=True)
    output = module(*inputs)
    loss = spec.loss_fn(output, *[to_device(x, "cpu") for x in inputs])
    loss = to_device(loss, "cpu") if isinstance(loss, torch.Tensor) else loss
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}
    optimizer.step()
    return [t.detach() for t in tensors_in(output)], loss.detach(), grads


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by qualified name (persistent or not)."""
    out = {f"param:{n}": p for n, p in module.named_parameters()}
    out.update({f"buffer:{n}": b for n, b in module.named_buffers()})
    return out


def check_placement(
    spec: ModelSpec,
    captured: CapturedModel,
    assignment: Mapping[str, str],
    real_devices: Mapping[str, str] | None = None,
    tolerance: float = 1e-5,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
) -> CheckReport:
    """Train the placed model and the original side by side for ``steps`` steps and compare them.

    Args:
        spec: the loaded model (its module, example inputs, loss and optimizer).
        captured: the CapturedModel whose ``gm`` the assignment refers to.
        assignment: op node name → device name.
        real_devices: device name → torch device for virtual devices (default: names are real).
        tolerance: largest accepted ``max|placed - original| / (1 + max|original|)``.
        seed: seed set before each step (dropout and other random ops draw the same numbers).
        steps: training steps (forward, backward, optimizer step), state carried over.

    Neither ``spec.model`` nor the global random state is changed: both sides are copies,
    and the seeding happens inside a forked random state.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    with paused_gc(), torch.random.fork_rng(devices=_cuda_indices(real_devices, assignment)):
        original = copy.deepcopy(spec.model)
        placed = apply_placement(captured, assignment, real_devices=real_devices, output_device=None)
        # Both in the modes the graph was traced in (training, unless the user froze a
        # module): a traced graph keeps the mode it was captured in, whatever .train() says.
        modes = getattr(captured, "training_modes", None) or {"": True}
        for module in (original, placed):
            module.train(modes[""])
            set_training_modes(module, modes)
        ref_opt = spec.optimizer_fn(original.parameters())
        opt = spec.optimizer_fn(placed.parameters())

        worst: dict[str, float] = {}
        first_bad: int | None = None
        missing_grads: set[str] = set()
        output_diff = loss_diff = 0.0
        compared_grads = compared_buffers = 0
        ref_state, state = _state(original), _state(placed)
        missing_state = tuple(sorted(set(ref_state) ^ set(state)))
        for step in range(1, steps + 1):
            ref_out, ref_loss, ref_grads = _run_step(original, spec, spec.example_inputs, seed + step - 1, ref_opt)
            out, loss, grads = _run_step(placed, spec, spec.example_inputs, seed + step - 1, opt)
            step_out = max((_scaled_diff(a, b) for a, b in zip(out, ref_out)), default=0.0)
            if len(out) != len(ref_out):
                step_out = float("inf")
            output_diff = max(output_diff, step_out)
            loss_diff = max(loss_diff, _scaled_diff(loss.reshape(()), ref_loss.reshape(())))
            missing_grads |= set(ref_grads) ^ set(grads)
            diffs = {f"grad:{n}": _scaled_diff(grads[n], ref_grads[n]) for n in ref_grads if n in grads}
            compared_grads = len(diffs)
            shared = [n for n in ref_state if n in state]
            diffs.update({n: _scaled_diff(state[n], ref_state[n]) for n in shared})
            compared_buffers = sum(1 for n in shared if n.startswith("buffer:"))
            for name, d in diffs.items():
                worst[name] = max(worst.get(name, 0.0), d)
            bad = max([step_out, loss_diff, *diffs.values()], default=0.0) > tolerance
            if first_bad is None and (bad or missing_grads):
                first_bad = step

    def worst_of(prefix: str) -> float:
        return max((d for n, d in worst.items() if n.startswith(prefix)), default=0.0)

    return CheckReport(
        output_diff=output_diff,
        loss_diff=loss_diff,
        grad_diff=worst_of("grad:"),
        compared_grads=compared_grads,
        missing_grads=tuple(sorted(missing_grads)),
        tolerance=tolerance,
        details=worst,
        steps=steps,
        param_diff=worst_of("param:"),
        buffer_diff=worst_of("buffer:"),
        compared_buffers=compared_buffers,
        missing_state=missing_state,
        first_bad_step=first_bad if first_bad is not None else (1 if missing_state else None),
    )


def _cuda_indices(real_devices: Mapping[str, str] | None, assignment: Mapping[str, str]) -> list[int]:
    """CUDA devices whose random state the check may touch (forked and restored)."""
    if not torch.cuda.is_available():
        return []
    indices = set()
    for real in (real_devices.values() if real_devices is not None else set(assignment.values())):
        try:
            dev = torch.device(real)
        except (RuntimeError, TypeError):
            continue  # apply_placement refuses it with a clear message
        if dev.type == "cuda":
            indices.add(dev.index or 0)
    return sorted(indices)


__all__ = ["DEFAULT_STEPS", "CheckReport", "check_placement", "paused_gc"]
