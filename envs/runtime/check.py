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

A pipelined placement also splits the batch: ``R`` data-parallel replicas each take ``1/R``
of it and cut their share into ``M`` micro-batches (equal slices of dim 0, as
``torch.distributed.pipelining`` and DDP do); each micro-batch's loss is divided by ``M``
and the replicas' gradients are averaged (:mod:`envs.runtime.pipeline.worker`). With
``microbatches``/``replicas`` the check also runs the unsplit captured model part by part
in this process and compares the loss, every gradient and every buffer with the full
batch's: an op that mixes samples (BatchNorm in training mode) computes something else on a
smaller batch, and a buffer the forward updates (a step counter, a running mean) is updated
once per micro-batch, so the next step differs even where this one's loss and gradients agree.

:func:`check_trainable` refuses, before any search, a model that cannot be trained (no
trainable parameter, a loss that does not depend on one, a loss that is not finite).

Example::

    report = check_placement(spec, captured, assignment, real_devices={"gpu0": "cpu"})
    assert report.ok, report.describe()
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from envs.runtime.apply import apply_placement, deep_copy, to_device
from graphs.capture import CapturedModel, set_training_modes, training_modes
from graphs.errors import CaptureError, ModelFileError, PlacerError
from graphs.gc_pause import paused_gc
from graphs.model_file import ModelSpec, batch_size_of, batch_slice, first_tensor, preserved_buffers
from graphs.profile.op_timing import tensors_in
from graphs.random_state import kept_random_state

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
        microbatches, replicas: ``M`` and ``R`` of the pipeline whose batch split was checked
            (1 and 1: no split checked).
        split_samples: samples per micro-batch of that split.
        split_loss_diff, split_grad_diff: scaled difference of the split batch's loss and
            (worst) gradient from the full batch's.
        split_buffer_diff: the same for the buffers after the step (those of the first replica,
            which DDP broadcasts: a buffer the forward updates is updated once per micro-batch).
        split_worst: the gradient or buffer (``grad:<name>``, ``buffer:<name>``) behind the worst
            of ``split_grad_diff`` and ``split_buffer_diff``.
        split_cause: why the split changes the result (or cannot be compared); empty when it does not.
        split_without_dropout: the model drops out, and the split was compared with dropout off
            (a batch and its parts draw different masks; the runtime draws its own on each rank).
        original_nonfinite: the original model's first non-finite loss (``"nan at step 2"``); empty when finite.
        no_gradient: trainable parameters the loss gives no gradient on either side (a head
            whose output the loss does not read): not a difference, but nothing was compared for them.
        without_dropout: the placement runs ops on a device the original model is not on, whose
            dropout draws its masks from that device's own generator (a GPU's), and the model
            drops out: both sides were compared with dropout off.
        eval_output_diff: max scaled |placed - original| of one forward in eval mode after the
            steps (:func:`_eval_output_difference`); 0.0 where the placed model refuses eval mode.
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
    microbatches: int = 1
    replicas: int = 1
    split_samples: int = 0
    split_loss_diff: float = 0.0
    split_grad_diff: float = 0.0
    split_buffer_diff: float = 0.0
    split_worst: str = ""
    split_cause: str = ""
    split_without_dropout: bool = False
    original_nonfinite: str = ""
    no_gradient: tuple[str, ...] = ()
    without_dropout: bool = False
    eval_output_diff: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the placement and the batch split (if any) both compute what the original does."""
        return self.placement_ok and self.split_ok

    @property
    def placement_ok(self) -> bool:
        """True when nothing is missing and every placed-versus-original difference is within the tolerance."""
        worst = max(self.output_diff, self.loss_diff, self.grad_diff, self.param_diff, self.buffer_diff,
                    self.eval_output_diff)
        return not self.missing_grads and not self.missing_state and worst <= self.tolerance

    @property
    def split_checked(self) -> bool:
        return self.microbatches * self.replicas > 1

    @property
    def split_ok(self) -> bool:
        """True when no split was checked, or the split batch gives the full batch's loss, gradients and buffers."""
        return not self.split_checked or (
            not self.split_cause
            and max(self.split_loss_diff, self.split_grad_diff, self.split_buffer_diff) <= self.tolerance)

    def describe_split(self) -> str:
        """The batch split's verdict in words (empty when none was checked)."""
        if not self.split_checked:
            return ""
        parts = (f"{self.microbatches} micro-batch{'es' if self.microbatches != 1 else ''}" if self.replicas == 1
                 else f"{self.replicas} replicas x {self.microbatches} micro-batch{'es' if self.microbatches != 1 else ''}")
        diffs = (f"loss {self.split_loss_diff:.2e}, gradients {self.split_grad_diff:.2e}, "
                 f"buffers {self.split_buffer_diff:.2e}"
                 + (f" (worst: {self.split_worst})" if self.split_worst and not self.split_ok else ""))
        if self.split_ok:
            return (f"{parts} of {self.split_samples} samples give the full batch's loss, gradients and buffers "
                    f"(max difference {diffs}"
                    + ("; compared with dropout off: the pipeline's ranks draw masks of their own, so a run with "
                       "dropout is the same in distribution, not number for number" if self.split_without_dropout
                       else "") + ")")
        if self.split_cause.startswith("cannot"):
            return self.split_cause
        return (f"micro-batches of {self.split_samples} samples change what the model computes "
                f"({self.split_cause}): {parts} differ from the full batch by {diffs} "
                f"(tolerance {self.tolerance:.0e})")

    def describe(self) -> str:
        """One line: the verdict, the steps compared and the largest difference of each kind."""
        # Applied whole it may compute the same and differ only once the batch is split: the
        # headline says which, or it reads "DIFFERENT" over differences of 0 (walkthrough).
        verdict = ("same results" if self.ok else "DIFFERENT results" if not self.placement_ok
                   else "same results applied whole, DIFFERENT results with the batch split")
        text = (
            f"{verdict} over {self.steps} training step{'s' if self.steps != 1 else ''}: max output "
            f"difference {self.output_diff:.2e}, loss {self.loss_diff:.2e}, gradients {self.grad_diff:.2e} "
            f"over {self.compared_grads} parameters, parameters after the optimizer step {self.param_diff:.2e}, "
            f"buffers {self.buffer_diff:.2e} over {self.compared_buffers}, output in eval mode after them "
            f"{self.eval_output_diff:.2e} (tolerance {self.tolerance:.0e})"
        )
        if not self.ok and self.first_bad_step is not None:
            worst = max(self.details.items(), key=lambda kv: kv[1], default=None)
            text += f"; first different at step {self.first_bad_step}"
            if worst is not None and worst[1] > self.tolerance:
                text += f" (worst: {worst[0]} {worst[1]:.2e})"
        if self.missing_grads:
            text += f"; gradients missing for {list(self.missing_grads)[:3]}"
        if self.no_gradient:
            n = len(self.no_gradient)
            text += (f"; {n} trainable parameter{'s' if n != 1 else ''} get no gradient from the loss on either side "
                     f"(e.g. {self.no_gradient[0]!r}: the loss does not depend on {'them' if n != 1 else 'it'})")
        if self.missing_state:
            text += f"; state on one side only: {list(self.missing_state)[:3]}"
        if self.without_dropout:
            text += ("; compared with dropout off: the placement's devices draw dropout masks from generators of "
                     "their own, so a run with dropout is the same in distribution, not number for number")
        if self.split_checked:
            text += f"; {self.describe_split()}"
        if self.original_nonfinite:
            text += f"; the original model's own loss is {self.original_nonfinite}"
        return text


def _scaled_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / (1 + max |b|): absolute for small values, relative for large ones.

    NaN in the same places on both sides, and the same infinities, are equal (torch.testing's
    ``equal_nan``): the placed model reproduces the original's NaN. NaN or an infinity on
    one side only is an infinite difference.
    """
    if a.dtype == torch.bool or b.dtype == torch.bool:
        a, b = a.to(torch.int8), b.to(torch.int8)
    a, b = a.detach().to("cpu"), b.detach().to("cpu")
    # Sparse gradients (nn.Embedding(sparse=True)) have no torch.equal; complex values would
    # lose their imaginary part in the cast below: compare dense, real and imaginary apart.
    a, b = (t.to_dense() if t.layout != torch.strided else t for t in (a, b))
    if a.is_complex() or b.is_complex():
        common = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.complex64)
        a, b = (torch.view_as_real(t.to(common).resolve_conj()) for t in (a, b))
    if a.shape != b.shape:
        return float("inf")
    # In the tensors' own floating dtype (float32 stays float32: a difference of two float32
    # values rounds by 2**-24 of itself, far below any tolerance), with no masked copies: a
    # float64 copy of each side and of every intermediate held 8 bytes x 8 per element, over
    # 2 GB at once for a 32,000 x 1,024 gradient (paper NMT's check peaked at 8.5 GB).
    dtype = torch.promote_types(a.dtype, b.dtype)
    dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float64
    a, b = a.to(dtype), b.to(dtype)
    if a.numel() == 0:
        return 0.0
    fast = _finite_scaled_diff(a, b)
    return fast if fast is not None else _masked_scaled_diff(a, b)


def _masked_scaled_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """:func:`_scaled_diff` of two same-shape, non-empty float tensors of one dtype, by the
    rule in full: NaN and infinities masked."""
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return float("inf")
    # a == b first: inf - inf is NaN. The scale ignores b's infinities, which would hide
    # any finite difference elsewhere.
    gap = (a - b).abs_().masked_fill_((a == b) | nan, 0.0)
    scale = 1.0 + float(b.abs().masked_fill_(~b.isfinite(), 0.0).max())
    return float(gap.max()) / scale


def _finite_scaled_diff(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """:func:`_scaled_diff` of two same-shape, non-empty float tensors in three passes, or None
    where ``a - b`` has a NaN or ``b`` an infinity and the masked rule must decide.

    The masked rule makes about a dozen passes over both tensors (NaN masks, masked copies,
    ``isfinite``): on paper NMT's 155 million parameters that was most of the check's time,
    spent on tensors that are almost always finite. Without a NaN in ``a - b`` neither side has
    one, and ``|a - b|`` is 0 wherever ``a == b``; with ``b`` finite nothing is masked from the
    scale. Then both maxima are exactly the masked rule's (a max rounds nothing), from one
    ``aminmax`` each: ``max|x| = max(|min x|, |max x|)``, ``abs`` keeping a -0.0 out of the report.
    """
    low, high = (float(x) for x in (a - b).aminmax())
    if math.isnan(low) or math.isnan(high):
        return None
    smallest, largest = (float(x) for x in b.aminmax())
    if not (math.isfinite(smallest) and math.isfinite(largest)):
        return None
    return max(abs(low), abs(high)) / (1.0 + max(abs(smallest), abs(largest)))


#: What every refusal of an untrainable model says was expected.
_TRAINABLE = "expected a model with trainable parameters whose loss depends on them"


def _no_trainable_parameters(model: torch.nn.Module, label: str) -> str | None:
    """Why ``model`` cannot be trained for lack of parameters (None when it has trainable ones)."""
    params = list(model.parameters())
    if any(p.requires_grad for p in params):
        return None
    what = (f"its {len(params)} parameter tensor{'s are' if len(params) != 1 else ' is'} frozen (requires_grad=False)"
            if params else "it has no parameters")
    return f"model {label!r} has nothing to train: {what}; {_TRAINABLE}"


def _untrainable_loss(loss: object, output: object, label: str) -> str | None:
    """Why ``loss`` cannot be trained on (None when it is a one-element tensor that requires grad)."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        return f"the loss of model {label!r} is {got}; expected a scalar tensor from trainable parameters"
    if loss.requires_grad:
        return None
    out = first_tensor(output)
    why = (f": its output has dtype {str(out.dtype).replace('torch.', '')}, which carries no gradient "
           "(argmax, a comparison, an integer cast)" if out is not None and not (
               out.is_floating_point() or out.is_complex()) else
           ": no trainable parameter reaches it (detached, computed under no_grad, or from frozen parameters)")
    return f"the loss of model {label!r} does not require grad{why}; {_TRAINABLE}"


def _loss_of(spec: ModelSpec, output: object, inputs: tuple) -> object:
    loss = spec.loss_fn(output, *[to_device(x, "cpu") for x in inputs])
    return to_device(loss, "cpu") if isinstance(loss, torch.Tensor) else loss


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
        original = deep_copy(spec.model)  # its parameters' hooks too, as the placed model's
        # Transfers copy, as between real devices, even where virtual devices share the CPU:
        # a copy that misses an in-place update shows here as it would on the cluster.
        placed = apply_placement(captured, assignment, real_devices=real_devices, output_device=None,
                                 copy_transfers=True)
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
        for step in range(1, steps + 1):
            with no_dropout or contextlib.nullcontext():
                ref_out, ref_loss, ref_grads = _forward_backward(original, spec, spec.example_inputs,
                                                                 seed + step - 1, ref_opt)
                out, loss, grads = _forward_backward(placed, spec, spec.example_inputs, seed + step - 1, opt)
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
        eval_diff = _eval_output_difference(original, placed, spec.example_inputs, seed + steps)
        split_fields: dict[str, object] = {}
        if split is not None:
            split_fields = {f.name: getattr(split, f.name) for f in dataclasses.fields(split)
                            if f.name.startswith("split_")}
        elif microbatches * replicas > 1:
            split_fields = _check_split(spec, captured, microbatches, replicas, tolerance, seed)

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
        microbatches=microbatches,
        replicas=replicas,
        original_nonfinite=nonfinite,
        no_gradient=tuple(n for n in trainable if n not in graded),
        without_dropout=no_dropout is not None and no_dropout.switched,
        eval_output_diff=eval_diff,
        **split_fields,  # type: ignore[arg-type]
    )


def check_trainable(spec: ModelSpec) -> None:
    """Refuse a model that cannot be trained, before any search: one forward of the user's
    model on its example inputs, in the mode it is captured in (training), with its buffers
    and the random state restored afterwards.

    Raises:
        ModelFileError: no parameter requires grad; the loss is not a scalar tensor, does not
            require grad, or is not finite (the model itself, before any placement).
    """
    model, label = spec.model, spec.name
    reason = _no_trainable_parameters(model, label)
    if reason is not None:
        raise ModelFileError(reason)
    modes = training_modes(model)
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    try:
        with torch.random.fork_rng(devices=cuda), preserved_buffers(model), torch.enable_grad():
            if not model.training:  # as graphs.capture.capture: a training step is placed
                model.train()
            output = model(*spec.example_inputs)
            loss = _loss_of(spec, output, spec.example_inputs)
    except PlacerError:
        raise
    except Exception as exc:  # user code: its own words, in one line
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelFileError(
            f"one training forward of model {label!r} and its loss fails on the example inputs: "
            f"{type(exc).__name__}: {first}; expected a forward() and loss_fn(output, *inputs) that run "
            "with gradients on") from None
    finally:
        set_training_modes(model, modes)
    reason = _untrainable_loss(loss, output, label)
    if reason is not None:
        raise ModelFileError(reason)
    assert isinstance(loss, torch.Tensor)
    value = float(loss.detach().reshape(-1)[0])
    if not math.isfinite(value):
        empty = batch_size_of(spec.example_inputs) == 0  # a mean over no samples is nan
        raise ModelFileError(
            f"the original model's loss is {value} on the example inputs (model {label!r} itself, before any "
            "placement)" + ("; they hold 0 samples (dim 0 is empty): expected a batch of at least one"
                            if empty else "; expected finite values"))


#: Dropout at every level a captured graph calls it: the functions (fx, nn.Dropout's forward)
#: and the aten ops (torch.export).
_DROPOUTS = frozenset({
    torch.nn.functional.dropout, torch.nn.functional.dropout1d, torch.nn.functional.dropout2d,
    torch.nn.functional.dropout3d, torch.nn.functional.alpha_dropout, torch.nn.functional.feature_alpha_dropout,
    torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout,
    torch.ops.aten.dropout.default, torch.ops.aten.alpha_dropout.default,
    torch.ops.aten.feature_dropout.default, torch.ops.aten.feature_alpha_dropout.default,
})


#: Functions that drop out inside (attention weights), and the position of their ``dropout_p``.
#: A mode does not see the calls its handler makes, so MultiheadAttention's dropout is
#: switched off at F.multi_head_attention_forward, not at the F.dropout/SDPA call inside it.
_DROPOUT_P_AT = {
    torch.nn.functional.scaled_dot_product_attention: 4,
    torch.ops.aten.scaled_dot_product_attention.default: 4,
    torch.nn.functional.multi_head_attention_forward: 10,
}


#: The recurrent layers' functions (``nn.LSTM``/``GRU``/``RNN`` call them with their
#: ``dropout`` between layers). Two overloads each: (input, hx, params, has_biases, layers,
#: dropout, train, ...) and, for packed sequences, (data, batch_sizes, hx, params, ...), one
#: place later.
_RNNS = frozenset({torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu})


def _rnn_dropout_at(func: object, args: tuple) -> int:
    """The position of ``dropout`` in this call of a recurrent function (the overload's)."""
    packed = (isinstance(args[1], torch.Tensor) if func is torch.lstm
              else len(args) > 2 and isinstance(args[2], torch.Tensor))
    return 6 if packed else 5


class _NoDropout(TorchFunctionMode):
    """Dropout as the identity, attention's included. A batch and its micro-batches draw
    different masks, so with dropout on they never agree, however sample-wise the model is;
    without it the comparison sees only what the split itself changes. (A clone, not the
    input: an in-place op after the dropout must not write into a tensor autograd saved.)"""

    def __init__(self) -> None:
        super().__init__()
        #: Whether a dropout that would have dropped something was switched off.
        self.switched = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        if func in _DROPOUTS:
            # (input, p, training, ...) for every one of them, torch's and aten's
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            training = args[2] if len(args) > 2 else kwargs.get("training", kwargs.get("train", True))
            self.switched |= bool(training) and float(p) > 0
            return args[0].clone()
        at = _rnn_dropout_at(func, args) if func in _RNNS and len(args) > 6 else _DROPOUT_P_AT.get(func)
        if at is not None:
            self.switched |= float(args[at] if len(args) > at else kwargs.get("dropout_p", 0.0)) > 0
            if len(args) > at:
                args = (*args[:at], 0.0, *args[at + 1:])
            else:
                kwargs["dropout_p"] = 0.0
        return func(*args, **kwargs)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.get_default_dtype()`` is ``dtype`` inside (None: unchanged): tensors a model
    creates in forward (``torch.zeros(n)``) follow the dtype the check runs in."""
    before = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _split_step(captured: CapturedModel, spec: ModelSpec, modes: dict[str, bool], chunks: list[list[tuple]],
                seed: int, dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Loss, gradients and buffers of one training step with each replica (a list of
    micro-batches) on its own copy of the captured model, as the pipeline runtime computes
    them: each micro-batch's loss / M accumulated, the replicas' losses and gradients
    averaged; the buffers are the first replica's after its micro-batches (a stage runs its
    module once per micro-batch, so a buffer the forward updates is updated M times; DDP
    broadcasts the first replica's buffers). ``dtype``: the floating dtype the copies, their
    inputs and new tensors are computed in."""
    # One copy for every replica: the replicas' averaged gradients are the sum over all R x M
    # parts of grad(loss / M) / R, accumulated in one .grad. Each replica starts from the same
    # buffers (as DDP's copies do), so they are put back before each; R copies of a paper-size
    # model in float64 held gigabytes each.
    gm = deep_copy(captured.gm)
    if dtype is not None:
        gm.to(dtype)
    gm.train(modes[""])
    set_training_modes(gm, modes)
    start = {n: b.detach().clone() for n, b in gm.named_buffers()}
    losses: list[torch.Tensor] = []
    buffers: dict[str, torch.Tensor] = {}
    for parts in chunks:
        with torch.no_grad():
            for n, b in gm.named_buffers():
                b.copy_(start[n])
        total = torch.zeros((), dtype=torch.float64)
        for inputs in parts:
            if dtype is not None:
                inputs = tree_map(lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                                  else v, inputs)
            torch.manual_seed(seed)
            output = gm(*inputs)
            loss = _loss_of(spec, output, inputs)
            assert isinstance(loss, torch.Tensor)  # the placement check ran the same loss first
            (loss / (len(parts) * len(chunks))).backward()
            total += loss.detach().to(torch.float64).reshape(()) / len(parts)
        losses.append(total)
        if not buffers:
            buffers = {n: b.detach().clone() for n, b in gm.named_buffers()}
    return (torch.stack(losses).mean(), {n: p.grad for n, p in gm.named_parameters() if p.grad is not None},
            buffers)


def _check_split(spec: ModelSpec, captured: CapturedModel, microbatches: int, replicas: int, tolerance: float,
                 seed: int) -> dict[str, object]:
    """The ``split_*`` fields of :class:`CheckReport`: the batch split into ``replicas`` x
    ``microbatches`` equal parts compared with the full batch (one step, dropout off)."""
    parts = microbatches * replicas
    batch = batch_size_of(spec.example_inputs) or 0
    if batch == 0 or batch % parts:
        return {"split_samples": batch // parts, "split_cause": (
            f"cannot split the batch of {batch} into {replicas} replica(s) x {microbatches} micro-batches of "
            "equal size; expected a batch size divisible by their product")}
    size = batch // parts
    if captured.gm.__dict__.get("placer_input_shapes"):  # graphs.capture.pin_shapes_unless_generic
        return {"split_samples": size, "split_cause": (
            f"the graph torch.export captured holds the example's batch of {batch} in its ops (at capture a batch "
            f"of another size computed something else), so parts of {size} samples cannot run it; expected a model "
            "torch.fx can capture, or one whose forward() takes its sizes from its input")}
    modes = getattr(captured, "training_modes", None) or {"": True}
    chunks = [[batch_slice(spec.example_inputs, batch, (r * microbatches + k) * size,
                             (r * microbatches + k + 1) * size) for k in range(microbatches)]
              for r in range(replicas)]
    # In float64, so that what is compared is the split, not float32's summation order: a
    # gradient summed over 4 parts of a batch instead of at once differs by rounding alone
    # (a convolution's bias, a sum over 262,144 float32 terms: 1e-4 of its size, measured
    # here on a 3-layer CNN), while a split that changes the math (BatchNorm's statistics)
    # differs by far more. A model that cannot run in float64 is compared in its own dtype.
    no_dropout = _NoDropout()

    def whole_and_split(dtype: torch.dtype | None) -> tuple[tuple[torch.Tensor, dict[str, torch.Tensor],
                                                                  dict[str, torch.Tensor]], ...]:
        with no_dropout, _default_dtype(dtype):
            return (_split_step(captured, spec, modes, [[spec.example_inputs]], seed, dtype),
                    _split_step(captured, spec, modes, chunks, seed, dtype))

    dtype: torch.dtype | None = torch.float64
    try:
        (full_loss, full_grads, full_buffers), (loss, grads, buffers) = whole_and_split(dtype)
    except Exception:  # noqa: BLE001 - user code with a fixed dtype (x.float() @ w.double(), say)
        dtype = None
        (full_loss, full_grads, full_buffers), (loss, grads, buffers) = whole_and_split(dtype)
    diffs = {f"grad:{n}": (_scaled_diff(grads[n], g) if n in grads else float("inf")) for n, g in full_grads.items()}
    diffs.update({f"grad:{n}": float("inf") for n in grads if n not in full_grads})
    buffer_diffs = {n: _scaled_diff(buffers[n], b) for n, b in full_buffers.items()}
    worst_grad = max(diffs.values(), default=0.0)
    worst_buffer = max(buffer_diffs.items(), key=lambda kv: kv[1], default=("", 0.0))
    worst = max([*diffs.items(), *((f"buffer:{n}", d) for n, d in buffer_diffs.items())], key=lambda kv: kv[1],
                default=("", 0.0))
    loss_diff = _scaled_diff(loss, full_loss)
    out: dict[str, object] = {
        "split_samples": size, "split_loss_diff": loss_diff, "split_grad_diff": worst_grad,
        "split_buffer_diff": worst_buffer[1], "split_worst": worst[0], "split_without_dropout": no_dropout.switched}
    split = (microbatches, replicas, size)
    if max(loss_diff, worst_grad) > tolerance:
        start = dict(captured.gm.named_buffers())
        updated = [n for n, b in full_buffers.items() if n in start and _scaled_diff(b, start[n]) > 0]
        out["split_cause"] = _split_cause(captured, spec, modes, full_loss, loss, split, tolerance, seed, dtype,
                                          updated)
    elif worst_buffer[1] > tolerance:
        out["split_cause"] = _buffer_cause(worst_buffer[0], *split)
    return out


def _buffer_cause(name: str, microbatches: int, replicas: int, size: int) -> str:
    """Why a buffer the forward updates makes the split differ."""
    if microbatches > 1:
        return (f"the forward updates buffer {name!r}: a stage runs once per micro-batch, so {microbatches} "
                f"micro-batches of {size} samples leave it other than one pass over the full batch does (a counter "
                f"advances {microbatches} times, a running statistic sees the parts)")
    return (f"the forward updates buffer {name!r} from its inputs: each of the {replicas} replicas sees {size} "
            "samples and DDP keeps the first replica's buffers, not the full batch's")


def check_batch_split(spec: ModelSpec, captured: CapturedModel, microbatches: int, replicas: int = 1,
                      tolerance: float = 1e-5, seed: int = 0) -> CheckReport:
    """Whether splitting the batch into ``replicas`` x ``microbatches`` equal parts (a
    pipeline's, a hybrid's) gives the full batch's loss, gradients and buffers: a report whose
    ``split_*`` fields say so (:attr:`CheckReport.split_ok`, :meth:`CheckReport.describe_split`),
    the placement fields left empty. The unsplit captured model runs in this process, one
    step, dropout off; ``spec.model`` and the random state are left as they were. Pass the
    report to :func:`check_placement` (``split=``) to check that split once only."""
    fields: dict[str, object] = {}
    if microbatches * replicas > 1:
        with kept_random_state():
            fields = _check_split(spec, captured, microbatches, replicas, tolerance, seed)
    return CheckReport(0.0, 0.0, 0.0, 0, tolerance=tolerance, microbatches=microbatches, replicas=replicas,
                       **fields)  # type: ignore[arg-type]


def _split_cause(captured: CapturedModel, spec: ModelSpec, modes: dict[str, bool], full_loss: torch.Tensor,
                 split_loss: torch.Tensor, split: tuple[int, int, int], tolerance: float, seed: int,
                 dtype: torch.dtype | None, updated: Sequence[str]) -> str:
    """Why the split batch computes something else, as far as it can be told. ``split``:
    ``(microbatches, replicas, samples per part)``; ``updated``: the buffers the forward changes."""
    parts = split[0] * split[1]
    with _NoDropout(), _default_dtype(dtype):
        other_loss, _, _ = _split_step(captured, spec, modes, [[spec.example_inputs]], seed + 1, dtype)
    if _scaled_diff(other_loss, full_loss) > tolerance:
        return ("cannot compare micro-batches with the full batch: the model draws random numbers besides "
                "dropout's (torch.randn_like, say), which differ between a batch and its parts; rerun with "
                "--no-check to accept the pipeline unchecked, or make the model deterministic")
    gm = captured.gm
    norms = [name for name, m in gm.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and modes.get(name, modes[""])]
    if norms:
        shown = ", ".join(repr(n) for n in norms[:3]) + (f" and {len(norms) - 3} more" if len(norms) > 3 else "")
        return f"BatchNorm in training mode ({shown}) normalises each micro-batch by its own statistics"
    if _scaled_diff(split_loss * parts, full_loss) <= tolerance:
        return f"the loss sums over samples, so each of the {parts} parts carries 1/{parts} of it; expected a mean"
    if updated:  # read back within the step (a warm-up counter): the later micro-batches see it advanced
        return _buffer_cause(updated[0], *split)
    return "an op mixes samples across the batch (a normalisation over it, a sum or mean over dim 0)"


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
