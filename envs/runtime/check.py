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

Every transfer of the placed model copies, also between virtual devices that share the CPU
(where a transfer would return the tensor itself): a copy made before an in-place update
of its tensor misses the update on a real cluster, and so it does here.

One step with buffers restored would pass a placed model that loses an in-place buffer
update: its first output is right and it diverges from the second step on. Comparing the
buffers and later steps catches that. After the steps one forward of both in eval mode is
compared too: the placed model's eval forward is another code path (:mod:`graphs.eval_mode`).
The copies are trained, never the user's model.

With ``microbatches``/``replicas`` (a pipeline's ``M`` and ``R``) the check also compares the
split batch with the full one (:mod:`envs.runtime.batch_split`): a split that changes the
loss, a gradient or a buffer fails the check as a wrong placement does.

A model that cannot be trained at all is refused before any search
(:func:`envs.runtime.trainable.check_trainable`, also importable from here).

Example::

    report = check_placement(spec, captured, assignment, real_devices={"gpu0": "cpu"})
    assert report.ok, report.describe()
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping

import torch

from envs.runtime.apply import apply_placement
from envs.runtime.batch_split import _check_split, as_dtype, check_batch_split, module_as_dtype
from envs.runtime.check_report import CheckReport
from envs.runtime.module_copy import deep_copy
from envs.runtime.no_dropout import _NoDropout
from envs.runtime.tensor_diff import _scaled_diff
from envs.runtime.trainable import _loss_of, _no_trainable_parameters, _untrainable_loss, check_trainable
from graphs.capture import CapturedModel
from graphs.default_dtype import default_dtype
from graphs.errors import CaptureError, ModelFileError
from graphs.gc_pause import paused_gc
from graphs.model_file import ModelSpec
from graphs.module_modes import set_training_modes, training_modes
from graphs.tensor_tree import tensors_in

#: Training steps compared by default: the first shows a wrong computation, the second
#: state that was not carried (an in-place buffer update that was lost), the third that
#: the optimizer's own state (momentum, Adam's moments) is carried too.
DEFAULT_STEPS = 3


def _forward_backward(module: torch.nn.Module, spec: ModelSpec, inputs: tuple, seed: int,
                      optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """Outputs, loss and gradients of one training step before its optimizer step. The
    gradients are the parameters' own ``.grad`` (not copies): the caller compares them before
    stepping, so two copies of every gradient are never held."""
    torch.manual_seed(seed)
    optimizer.zero_grad(set_to_none=True)
    output = module(*inputs)
    loss = _loss_of(spec, output, inputs)
    reason = _untrainable_loss(loss, output, spec.name)
    if reason is not None:
        raise ModelFileError(reason)
    assert isinstance(loss, torch.Tensor)
    loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    return [t.detach() for t in tensors_in(output)], loss.detach(), grads


def _eval_output_difference(original: torch.nn.Module, placed: torch.nn.Module, inputs: tuple, seed: int) -> float:
    """Max scaled difference of one forward of both in eval mode, their modes restored after.

    The placed model's eval forward is another code path than its training step (eval-mode
    constants, or the eval graph run where its data is: :mod:`graphs.eval_mode`). Gradients
    stay on: under ``torch.no_grad()`` the original may take PyTorch's fast paths, which a
    torch.export graph never records (a warning at capture says so). A placed model that
    refuses eval mode says so itself when evaluated, and an original that cannot evaluate the
    example batch has nothing to compare: 0.0."""
    modes = training_modes(original), training_modes(placed)
    try:
        original.eval(), placed.eval()
        torch.manual_seed(seed)
        try:
            expected = [t for t in tensors_in(original(*inputs)) if isinstance(t, torch.Tensor)]
        except Exception:  # noqa: BLE001 - a model that cannot evaluate this batch: nothing to compare
            return 0.0
        torch.manual_seed(seed)
        try:
            got = [t for t in tensors_in(placed(*inputs)) if isinstance(t, torch.Tensor)]
        except CaptureError:
            return 0.0
        if len(got) != len(expected):
            return float("inf")
        return max((_scaled_diff(a, b) for a, b in zip(got, expected)), default=0.0)
    finally:
        set_training_modes(original, modes[0])
        set_training_modes(placed, modes[1])


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
    microbatches: int = 1,
    replicas: int = 1,
    split: CheckReport | None = None,
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
        microbatches, replicas: a pipeline's ``M`` and ``R``; when ``R * M > 1`` the batch
            split is checked too (module doc): the report's ``split_*`` fields.
        split: that split already checked (:func:`check_batch_split`, same ``microbatches``,
            ``replicas`` and ``tolerance``): its fields are taken instead of checking it again.

    Raises:
        ModelFileError: the model has no trainable parameter, or its loss does not require grad.

    Neither ``spec.model`` nor the global random state is changed: both sides are copies,
    and the seeding happens inside a forked random state.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if split is not None and (split.microbatches, split.replicas, split.tolerance) != (microbatches, replicas, tolerance):
        raise ValueError(f"the split checked before is {split.replicas} x {split.microbatches} at tolerance "
                         f"{split.tolerance}; expected {replicas} x {microbatches} at {tolerance}")
    reason = _no_trainable_parameters(spec.model, spec.name)
    if reason is not None:
        raise ModelFileError(reason)
    with paused_gc(), torch.random.fork_rng(devices=_cuda_indices(real_devices, assignment)):
        seen = _compare_steps(spec, captured, assignment, real_devices, seed, steps, tolerance, None)
        own_diff = 0.0
        if seen.first_bad is not None and not seen.missing_grads and not seen.missing_state:
            # Different in the model's dtype: compared again in float64, as the batch split is
            # (envs.runtime.batch_split). A tensor read by ops on several devices gets its
            # gradient terms added in another order when some arrive through a copy; float32's
            # rounding of that order, grown by three Adam steps and BatchNorm at a small batch,
            # exceeded the tolerance on Inception-v3 (a walkthrough: 4e-2 in float32, 1e-8 in
            # float64, for a placement whose transfers were all right). Only then: float64
            # copies take twice the memory, which a check that passes should not need.
            try:
                again = _compare_steps(spec, captured, assignment, real_devices, seed, steps, tolerance,
                                       torch.float64)
            except Exception:  # noqa: BLE001 - a model that cannot run in float64 keeps its own verdict
                again = None
            if again is not None and again.first_bad is None:
                own_diff = max(seen.worst.values(), default=0.0)
                seen = again
        split_fields: dict[str, object] = {}
        if split is not None:
            split_fields = {f.name: getattr(split, f.name) for f in dataclasses.fields(split)
                            if f.name.startswith("split_")}
        elif microbatches * replicas > 1:
            split_fields = _check_split(spec, captured, microbatches, replicas, tolerance, seed)

    def worst_of(prefix: str) -> float:
        return max((d for n, d in seen.worst.items() if n.startswith(prefix)), default=0.0)

    return CheckReport(
        output_diff=seen.output_diff,
        loss_diff=seen.loss_diff,
        grad_diff=worst_of("grad:"),
        compared_grads=seen.compared_grads,
        missing_grads=tuple(sorted(seen.missing_grads)),
        tolerance=tolerance,
        details=seen.worst,
        steps=steps,
        param_diff=worst_of("param:"),
        buffer_diff=worst_of("buffer:"),
        compared_buffers=seen.compared_buffers,
        missing_state=seen.missing_state,
        first_bad_step=seen.first_bad if seen.first_bad is not None else (1 if seen.missing_state else None),
        microbatches=microbatches,
        replicas=replicas,
        original_nonfinite=seen.nonfinite,
        no_gradient=seen.no_gradient,
        without_dropout=seen.without_dropout,
        eval_output_diff=seen.eval_diff,
        compared_dtype=seen.dtype,
        own_dtype_diff=own_diff,
        **split_fields,  # type: ignore[arg-type]
    )



@dataclasses.dataclass
class _StepComparison:
    """What :func:`_compare_steps` saw: the fields of :class:`CheckReport` of the same names."""

    output_diff: float
    loss_diff: float
    worst: dict[str, float]
    first_bad: int | None
    missing_grads: set[str]
    no_gradient: tuple[str, ...]
    compared_grads: int
    compared_buffers: int
    missing_state: tuple[str, ...]
    nonfinite: str
    without_dropout: bool
    eval_diff: float
    dtype: str


def _compare_steps(spec: ModelSpec, captured: CapturedModel, assignment: Mapping[str, str],
                   real_devices: Mapping[str, str] | None, seed: int, steps: int, tolerance: float,
                   dtype: torch.dtype | None) -> _StepComparison:
    """Train copies of the original and the placed model side by side in ``dtype`` (None: the
    model's own) for ``steps`` steps and compare them after each (module doc)."""
    original = deep_copy(spec.model)  # its parameters' hooks too, as the placed model's
    # Transfers copy, as between real devices, even where virtual devices share the CPU:
    # a copy that misses an in-place update shows here as it would on the cluster.
    placed = apply_placement(captured, assignment, real_devices=real_devices, output_device=None,
                             copy_transfers=True)
    if dtype is not None:
        module_as_dtype(original, dtype)
        module_as_dtype(placed, dtype)
    inputs = as_dtype(spec.example_inputs, dtype)
    assert isinstance(inputs, tuple)
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
    trainable = [n for n, p in original.named_parameters() if p.requires_grad]
    graded: set[str] = set()
    output_diff = loss_diff = 0.0
    compared_grads = compared_buffers = 0
    nonfinite = ""
    ref_state, state = _state(original), _state(placed)
    missing_state = tuple(sorted(set(ref_state) ^ set(state)))
    # Dropout on another device than the original's draws from that device's generator: the
    # same in distribution, other masks (every dropout model failed the check on a GPU).
    no_dropout = _NoDropout() if _draws_elsewhere(spec.model, assignment, real_devices) else None
    with default_dtype(dtype):
        for step in range(1, steps + 1):
            with no_dropout or contextlib.nullcontext():
                ref_out, ref_loss, ref_grads = _forward_backward(original, spec, inputs, seed + step - 1, ref_opt)
                out, loss, grads = _forward_backward(placed, spec, inputs, seed + step - 1, opt)
            step_out = max((_scaled_diff(a, b) for a, b in zip(out, ref_out)), default=0.0)
            if len(out) != len(ref_out):
                step_out = float("inf")
            output_diff = max(output_diff, step_out)
            loss_diff = max(loss_diff, _scaled_diff(loss.reshape(()), ref_loss.reshape(())))
            missing_grads |= set(ref_grads) ^ set(grads)
            graded |= set(ref_grads) | set(grads)
            diffs = {f"grad:{n}": _scaled_diff(grads[n], ref_grads[n]) for n in ref_grads if n in grads}
            compared_grads = len(diffs)
            del ref_grads, grads
            ref_opt.step()
            opt.step()
            # Read again after every step: a forward that reassigns a buffer (self.calls =
            # self.calls + 1) leaves the original holding a new tensor, where the placed
            # graph (torch.export's) writes into the one it has.
            ref_state, state = _state(original), _state(placed)
            shared = [n for n in ref_state if n in state]
            diffs.update({n: _scaled_diff(state[n], ref_state[n]) for n in shared})
            compared_buffers = sum(1 for n in shared if n.startswith("buffer:"))
            for name, d in diffs.items():
                worst[name] = max(worst.get(name, 0.0), d)
            bad = max([step_out, loss_diff, *diffs.values()], default=0.0) > tolerance
            if first_bad is None and (bad or missing_grads):
                first_bad = step
            if not nonfinite and not bool(torch.isfinite(ref_loss).all()):
                nonfinite = f"{float(ref_loss.reshape(-1)[0])} at step {step}"
        eval_diff = _eval_output_difference(original, placed, inputs, seed + steps)
    return _StepComparison(output_diff, loss_diff, worst, first_bad, missing_grads,
                           tuple(n for n in trainable if n not in graded), compared_grads, compared_buffers,
                           missing_state, nonfinite, no_dropout is not None and no_dropout.switched, eval_diff,
                           "" if dtype is None else str(dtype).removeprefix("torch."))

def _generator_of(device: str | torch.device) -> str:
    """The random generator ops on ``device`` draw from: one for the CPU, one per accelerator."""
    dev = torch.device(device)
    return "cpu" if dev.type == "cpu" else f"{dev.type}:{dev.index or 0}"


def _draws_elsewhere(model: torch.nn.Module, assignment: Mapping[str, str],
                     real_devices: Mapping[str, str] | None) -> bool:
    """Whether the placement runs ops on a device whose generator is not the original model's."""
    first = next(iter(model.parameters()), None)
    home = _generator_of(first.device if first is not None else "cpu")
    for name in set(assignment.values()):
        real = real_devices.get(name, name) if real_devices is not None else name
        try:
            if _generator_of(real) != home:
                return True
        except (RuntimeError, TypeError):
            continue  # apply_placement refuses it with a clear message
    return False


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


__all__ = ["DEFAULT_STEPS", "CheckReport", "check_batch_split", "check_placement", "check_trainable", "paused_gc"]
