"""Whether splitting the batch changes what the model computes: :func:`check_batch_split`.

A pipelined placement splits the batch: ``R`` data-parallel replicas each take ``1/R``
of it and cut their share into ``M`` micro-batches (equal slices of the batch dimension,
``ModelSpec.batch_dim``, as ``torch.distributed.pipelining`` and DDP do); each micro-batch's loss is divided by ``M``
and the replicas' gradients are averaged (:mod:`envs.runtime.pipeline.worker`). With
``microbatches``/``replicas`` the check also runs the unsplit captured model part by part
in this process and compares the loss, every gradient and every buffer with the full
batch's: an op that mixes samples (BatchNorm in training mode) computes something else on a
smaller batch, and a buffer the forward updates (a step counter, a running mean) is updated
once per micro-batch, so the next step differs even where this one's loss and gradients agree.
Replicas of one micro-batch each (DDP) are the exception for BatchNorm: the runtime
synchronises their statistics (:mod:`envs.runtime.replica_batch_norm`), and so does the check,
running the replicas as threads in lockstep.

It is a module of its own because the split is checked apart from any placement: the
optimizer checks it once for a pipeline (:func:`check_batch_split`) and hands the report to
:func:`envs.runtime.check.check_placement` (``split=``), which otherwise checks it itself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_map

from envs.runtime.check_report import CheckReport, held_tolerance
from envs.runtime.module_copy import deep_copy
from envs.runtime.no_dropout import _NoDropout
from envs.runtime.random_replay import RandomReplay
from envs.runtime.replica_batch_norm import LockstepGather, replace_batch_norms, training_batch_norms
from envs.runtime.sample_mixing import find_sample_mixing
from envs.runtime.tensor_diff import _scaled_diff
from envs.runtime.trainable import _loss_of
from graphs.buffers import restore_buffers
from graphs.capture import CapturedModel
from graphs.default_dtype import default_dtype
from graphs.errors import one_line_reason
from graphs.input_batch import batch_size_of, batch_slice
from graphs.model_file import ModelSpec
from graphs.module_modes import set_training_modes
from graphs.random_state import kept_random_state

__all__ = ["check_batch_split", "renorming_embeddings"]


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in floating ``dtype``, or in its complex counterpart where ``t`` is complex (a cast of
    a complex tensor to a real dtype keeps its real part only: a Fourier layer's weights lost
    half of themselves in the float64 comparison). Other tensors as they are."""
    if t.is_floating_point():
        return t.to(dtype)
    if t.is_complex():
        return t.to(torch.promote_types(dtype, torch.complex32))
    return t


def as_dtype(value: Any, dtype: torch.dtype | None) -> Any:
    """``value`` (a pytree of inputs) with its floating tensors in ``dtype``, its complex ones in the
    complex dtype of that precision (None: unchanged).

    >>> as_dtype((torch.zeros(1), torch.zeros(1, dtype=torch.cfloat), 3), torch.float64)[:2]
    (tensor([0.], dtype=torch.float64), tensor([0.+0.j], dtype=torch.complex128))
    """
    if dtype is None:
        return value
    return tree_map(lambda v: _cast(v, dtype) if isinstance(v, torch.Tensor) else v, value)


def module_as_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` with its floating parameters and buffers in ``dtype`` and its complex ones in the
    complex dtype of that precision (``Module.to(torch.float64)`` casts complex ones to real);
    in place, as ``Module.to``."""
    return module._apply(lambda t: _cast(t, dtype))


def _split_step(captured: CapturedModel, spec: ModelSpec, modes: dict[str, bool], chunks: list[list[tuple]],
                seed: int, dtype: torch.dtype | None = None, no_dropout: _NoDropout | None = None,
                replay: RandomReplay | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Loss, gradients and buffers of one training step with each replica (a list of
    micro-batches) on its own copy of the captured model, as the pipeline runtime computes
    them: each micro-batch's loss / M accumulated, the replicas' losses and gradients
    averaged; the buffers are the first replica's after its micro-batches (a stage runs its
    module once per micro-batch, so a buffer the forward updates is updated M times; DDP
    broadcasts the first replica's buffers). ``dtype``: the floating dtype the copies, their
    inputs and new tensors are computed in. ``replay``: the caller's :class:`RandomReplay`, told
    which part runs before each (the full batch's random draws, cut to it)."""
    # One copy for every replica: the replicas' averaged gradients are the sum over all R x M
    # parts of grad(loss / M) / R, accumulated in one .grad. Each replica starts from the same
    # buffers (as DDP's copies do), so they are put back before each; R copies of a paper-size
    # model in float64 held gigabytes each.
    gm = _model_copy(captured, modes, dtype)
    if len(chunks) > 1 and all(len(parts) == 1 for parts in chunks) and training_batch_norms(gm):
        return _synced_replicas_step(captured, spec, modes, gm, chunks, seed, dtype, no_dropout, replay)
    start = {n: b.detach().clone() for n, b in gm.named_buffers()}
    losses: list[torch.Tensor] = []
    buffers: dict[str, torch.Tensor] = {}
    count = sum(len(parts) for parts in chunks)
    for r, parts in enumerate(chunks):
        restore_buffers(gm, start)
        with torch.no_grad():
            if r:  # each replica starts from the same parameters, as DDP's copies do
                for n, p in _written_parameters(gm, captured).items():
                    p.copy_(_start_parameter(captured, n, p))
        total = torch.zeros((), dtype=torch.float64)
        for m, inputs in enumerate(parts):
            inputs = as_dtype(inputs, dtype)
            if replay is not None and count > 1:
                replay.replay(r * len(parts) + m, count)
            torch.manual_seed(seed)
            output = gm(*inputs)
            loss = _loss_of(spec, output, inputs)
            assert isinstance(loss, torch.Tensor)  # the placement check ran the same loss first
            (loss / (len(parts) * len(chunks))).backward()
            total += loss.detach().to(torch.float64).reshape(()) / len(parts)
        losses.append(total)
        if not r:
            buffers = _state_after(gm, captured)
    return (torch.stack(losses).mean(), {n: p.grad for n, p in gm.named_parameters() if p.grad is not None},
            buffers)


def renorming_embeddings(gm: torch.fx.GraphModule) -> list[str]:
    """The embeddings of ``gm`` that renormalise their weight in place as they look rows up
    (``max_norm``: ``torch.embedding_renorm_``, under no_grad, in the forward), as
    ``"nn.Embedding 'name'"`` or ``"op 'node'"``. A replica writes only the rows its samples look
    up, which the example batch cannot show: its forward at capture has already renormalised them.

    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Embedding(9, 2, max_norm=1.0)))
    >>> renorming_embeddings(gm)
    ["nn.Embedding '0'"]
    """
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, torch.nn.Embedding) and module.max_norm is not None:
                found.append(f"nn.Embedding {node.target!r}")
        elif node.op == "call_function" and (
                node.target is torch.ops.aten.embedding_renorm_.default
                or (node.target is torch.nn.functional.embedding
                    and (node.kwargs.get("max_norm") if len(node.args) < 4 else node.args[3]) is not None)):
            found.append(f"op {node.name!r}")
    return found


def _written_parameters(gm: torch.nn.Module, captured: CapturedModel) -> dict[str, torch.nn.Parameter]:
    """The parameters of ``gm``, a copy of the captured model, that the forward has written (their
    values are no longer the captured model's). Compared by value: a write through ``.data``
    (``self.scale.data.mul_(0.5)``) leaves the parameter's version counter as it was."""
    with torch.no_grad():
        return {n: p for n, p in gm.named_parameters()
                if not torch.equal(p, _start_parameter(captured, n, p))}


def _start_parameter(captured: CapturedModel, name: str, like: torch.Tensor) -> torch.Tensor:
    """Parameter ``name`` as the captured model holds it, in ``like``'s dtype."""
    return captured.gm.get_parameter(name).detach().to(like.dtype)


def _state_after(gm: torch.nn.Module, captured: CapturedModel) -> dict[str, torch.Tensor]:
    """What the forward changed besides the gradients: every buffer, and each parameter written
    in place (``param:<name>``; DDP never synchronises parameters, so a replica keeps its own writes)."""
    state = {n: b.detach().clone() for n, b in gm.named_buffers()}
    state.update({f"param:{n}": p.detach().clone() for n, p in _written_parameters(gm, captured).items()})
    return state


def _model_copy(captured: CapturedModel, modes: dict[str, bool], dtype: torch.dtype | None) -> torch.fx.GraphModule:
    """A copy of the captured model in ``dtype`` (None: its own) with the modules' training modes."""
    gm = deep_copy(captured.gm)
    if dtype is not None:
        module_as_dtype(gm, dtype)
    gm.train(modes[""])
    set_training_modes(gm, modes)
    return gm


def _synced_replicas_step(captured: CapturedModel, spec: ModelSpec, modes: dict[str, bool], first: torch.nn.Module,
                          chunks: list[list[tuple]], seed: int, dtype: torch.dtype | None,
                          no_dropout: _NoDropout | None, replay: RandomReplay | None = None
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`_split_step` for ``R`` replicas of one micro-batch each whose BatchNorms are
    synchronised, as the runtime runs them (:class:`envs.runtime.replica_batch_norm.ReplicaBatchNorm`):
    each replica a copy of the model (``first`` is replica 0's) in a thread of its own, the
    BatchNorm statistics gathered over the threads in lockstep. Gradients are summed over the
    replicas, each replica's loss divided by ``R``; the buffers are replica 0's. ``no_dropout`` and
    ``replay``, the caller's modes, are entered in each thread too (a torch function mode is per thread)."""
    replicas = len(chunks)
    lock = LockstepGather(replicas)
    copies = [first] + [_model_copy(captured, modes, dtype) for _ in range(replicas - 1)]
    for r, gm in enumerate(copies):
        replace_batch_norms(gm, lock.gather(r))
    torch.manual_seed(seed)  # one draw for all: the threads share the generator

    def run(r: int) -> torch.Tensor:
        mode = no_dropout if no_dropout is not None else contextlib.nullcontext()
        replaying = replay if replay is not None else contextlib.nullcontext()
        try:
            (inputs,) = chunks[r]
            inputs = as_dtype(inputs, dtype)
            with mode, replaying:
                if replay is not None:
                    replay.replay(r, replicas)
                loss = _loss_of(spec, copies[r](*inputs), inputs)
                assert isinstance(loss, torch.Tensor)  # the placement check ran the same loss first
                (loss / replicas).backward()
            return loss.detach().to(torch.float64).reshape(())
        except BaseException:
            lock.abort()  # the other replicas would wait at the next BatchNorm for ever
            raise

    with concurrent.futures.ThreadPoolExecutor(replicas) as pool:
        losses = list(pool.map(run, range(replicas)))
    grads: dict[str, torch.Tensor] = {}
    for gm in copies:  # in replica order, as the sequential path accumulates them
        for n, p in gm.named_parameters():
            if p.grad is not None:
                grads[n] = grads[n] + p.grad if n in grads else p.grad.clone()
    return (torch.stack(losses).mean(), grads, _state_after(first, captured))


def _check_split(spec: ModelSpec, captured: CapturedModel, microbatches: int, replicas: int, tolerance: float,
                 seed: int) -> dict[str, object]:
    """The ``split_*`` fields of :class:`CheckReport`: the batch split into ``replicas`` x
    ``microbatches`` equal parts compared with the full batch (one step, dropout off)."""
    parts = microbatches * replicas
    batch = batch_size_of(spec.example_inputs, spec.batch_dim) or 0
    if batch == 0 or batch % parts:
        return {"split_samples": batch // parts, "split_cause": (
            f"cannot split the batch of {batch} into {replicas} replica(s) x {microbatches} micro-batches of "
            "equal size; expected a batch size divisible by their product")}
    size = batch // parts
    if captured.gm.__dict__.get("placer_input_shapes"):  # graphs.forward_checks.pin_shapes_unless_generic
        return {"split_samples": size, "split_cause": (
            f"the graph torch.export captured holds the example's batch of {batch} in its ops (at capture a batch "
            f"of another size computed something else), so parts of {size} samples cannot run it; expected a model "
            "torch.fx can capture, or one whose forward() takes its sizes from its input")}
    modes = getattr(captured, "training_modes", None) or {"": True}
    chunks = [[batch_slice(spec.example_inputs, batch, (r * microbatches + k) * size,
                             (r * microbatches + k + 1) * size, spec.batch_dim) for k in range(microbatches)]
              for r in range(replicas)]
    # In float64, so that what is compared is the split, not float32's summation order: a
    # gradient summed over 4 parts of a batch instead of at once differs by rounding alone
    # (a convolution's bias, a sum over 262,144 float32 terms: 1e-4 of its size, measured
    # here on a 3-layer CNN), while a split that changes the math (BatchNorm's statistics)
    # differs by far more. A model that cannot run in float64 is compared in its own dtype.
    no_dropout = _NoDropout()
    replay = RandomReplay()

    def whole_and_split(dtype: torch.dtype | None) -> tuple[tuple[torch.Tensor, dict[str, torch.Tensor],
                                                                  dict[str, torch.Tensor]], ...]:
        with no_dropout, replay, default_dtype(dtype):
            replay.record()
            whole = _split_step(captured, spec, modes, [[spec.example_inputs]], seed, dtype)
            try:
                return whole, _split_step(captured, spec, modes, chunks, seed, dtype, no_dropout, replay)
            except Exception as exc:  # noqa: BLE001 - the parts cannot run what the whole batch runs
                raise _PartsFailed(exc) from exc

    dtype: torch.dtype | None = torch.float64
    try:
        (full_loss, full_grads, full_buffers), (loss, grads, buffers) = whole_and_split(dtype)
    except Exception:  # noqa: BLE001 - user code with a fixed dtype (x.float() @ w.double(), say)
        dtype = None
        try:
            (full_loss, full_grads, full_buffers), (loss, grads, buffers) = whole_and_split(dtype)
        except _PartsFailed as failed:
            return {"split_samples": size, "split_cause": _parts_failed_cause(failed.error, spec.batch_dim, batch, size)}
    diffs = {f"grad:{n}": (_scaled_diff(grads[n], g) if n in grads else float("inf")) for n, g in full_grads.items()}
    diffs.update({f"grad:{n}": float("inf") for n in grads if n not in full_grads})
    full_written = [n for n in full_buffers if n.startswith("param:")]  # the parameters one pass wrote
    for n in {n for n in (*buffers, *full_buffers) if n.startswith("param:")}:  # written on one side only
        other = buffers.get(n, full_buffers.get(n))
        assert other is not None
        start_value = _start_parameter(captured, n.removeprefix("param:"), other)
        buffers.setdefault(n, start_value)
        full_buffers.setdefault(n, start_value)
    buffer_diffs = {n: _scaled_diff(buffers[n], b) for n, b in full_buffers.items()}
    worst_grad = max(diffs.values(), default=0.0)
    worst_buffer = max(buffer_diffs.items(), key=lambda kv: kv[1], default=("", 0.0))
    worst = max([*diffs.items(), *((n if n.startswith("param:") else f"buffer:{n}", d) for n, d in buffer_diffs.items())],
                key=lambda kv: kv[1], default=("", 0.0))
    loss_diff = _scaled_diff(loss, full_loss)
    out: dict[str, object] = {
        "split_samples": size, "split_loss_diff": loss_diff, "split_grad_diff": worst_grad,
        "split_buffer_diff": worst_buffer[1], "split_worst": worst[0], "split_without_dropout": no_dropout.switched,
        "split_synced_norms": len(training_batch_norms(captured.gm, modes)) if microbatches == 1 else 0,
        "split_replayed_draws": len(replay.recorded) if replay.recorded and not replay.missed else 0}
    precision = lowest_precision(captured.graph)
    if precision is not None:  # its parts' partial sums round at its epsilon, the whole batch's otherwise
        out["split_precision"] = name = str(precision).replace("torch.", "")
        tolerance = held_tolerance(tolerance, name)
    split = (microbatches, replicas, size)
    renorming = renorming_embeddings(captured.gm) if replicas > 1 else []
    if renorming:
        out["split_cause"] = (
            f"{renorming[0]} renormalises the embedding rows its batch looks up, in place (max_norm): each of the "
            f"{replicas} replicas writes the rows of its own {size} samples and DDP never synchronises parameters, "
            "so the replicas' embedding tables drift apart from the first step on; expected an embedding without "
            "max_norm (or its renormalisation done by the optimizer step)")
    elif max(loss_diff, worst_grad) > tolerance:
        start = dict(captured.gm.named_buffers())
        updated = [n for n, b in full_buffers.items() if n in start and _scaled_diff(b, start[n]) > 0]
        updated += full_written
        out["split_cause"] = _split_cause(captured, spec, modes, full_loss, full_grads, loss, split, tolerance,
                                          seed, dtype, updated, replayed=bool(out["split_replayed_draws"]))
    elif worst_buffer[1] > tolerance:
        out["split_cause"] = _buffer_cause(worst_buffer[0], *split)
    return out


class _PartsFailed(Exception):
    """The full batch ran and its parts raised ``error``."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _parts_failed_cause(error: BaseException, batch_dim: int, batch: int, size: int) -> str:
    """Why parts of the batch cannot run the model that the full batch runs."""
    return (f"cannot run the model on parts of {size} samples ({one_line_reason(error)}): a split cuts the inputs that "
            f"hold the batch of {batch} (along dim {batch_dim}, or the one other dimension of that size) and passes the "
            "others whole, and this model's inputs do not "
            "share that batch dimension (a graph's node features beside its edge list, say), so it cannot be split "
            "into micro-batches or DDP replicas; expected inputs whose samples are independent along one dimension "
            "(batch_dim in the model file names it)")


def lowest_precision(graph: Any) -> torch.dtype | None:
    """The floating dtype below float32 that ``graph``'s ops compute in (the lowest, by
    epsilon; a node's ``dtype`` attribute), or None: bfloat16 under ``torch.autocast``.

    Compared in float64 the split check sees no float32 rounding, but an op in bfloat16 stays in
    bfloat16, and its parts' results round otherwise than the whole batch's: measured here
    (2026-12-07), a 2-layer MLP under bfloat16 autocast differs by 7e-5 to 9e-5 between the whole
    batch and 2 or 4 parts, where 1e-5 is the tolerance; a split that changes the math differs by
    far more than bfloat16's epsilon (8e-3): BatchNorm's statistics, a loss summed over samples.
    """
    found: torch.dtype | None = None
    for _, text in graph.nodes(data="dtype"):
        dtype = getattr(torch, str(text).replace("torch.", ""), None) if text else None
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point and \
                torch.finfo(dtype).eps > torch.finfo(torch.float32).eps and \
                (found is None or torch.finfo(dtype).eps > torch.finfo(found).eps):
            found = dtype
    return found


def _buffer_cause(name: str, microbatches: int, replicas: int, size: int) -> str:
    """Why a buffer the forward updates, or a parameter it writes in place (``param:<name>``),
    makes the split differ."""
    if name.startswith("param:"):
        name = name.removeprefix("param:")
        if replicas > 1:
            return (f"the forward writes parameter {name!r} in place (nn.Embedding's max_norm renormalises the rows "
                    f"it looks up, say): each of the {replicas} replicas writes it from its own {size} samples and "
                    "DDP never synchronises parameters, so the replicas' copies of it drift apart; expected a "
                    "forward that leaves its parameters to the optimizer")
        return (f"the forward writes parameter {name!r} in place: a stage runs once per micro-batch, so "
                f"{microbatches} micro-batches of {size} samples leave it other than one pass over the full batch does")
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
                 full_grads: dict[str, torch.Tensor], split_loss: torch.Tensor, split: tuple[int, int, int],
                 tolerance: float, seed: int, dtype: torch.dtype | None, updated: Sequence[str],
                 replayed: bool = False) -> str:
    """Why the split batch computes something else, as far as it can be told. ``split``:
    ``(microbatches, replicas, samples per part)``; ``updated``: the buffers the forward changes
    (and the parameters it writes, ``param:<name>``);
    ``replayed``: the parts ran on the full batch's random draws (:mod:`envs.runtime.random_replay`),
    so that the draws themselves are not what differs."""
    parts = split[0] * split[1]
    with _NoDropout(), default_dtype(dtype):
        other_loss, other_grads, _ = _split_step(captured, spec, modes, [[spec.example_inputs]], seed + 1, dtype)
    # The gradients too: a random mask scaled by a small weight (stochastic depth behind a layer
    # scale of 1e-6) moves the loss by 1e-10 and that weight's gradient by 1e-3.
    reseeded = max([_scaled_diff(other_loss, full_loss)]
                   + [_scaled_diff(other_grads[n], g) for n, g in full_grads.items() if n in other_grads])
    if reseeded > tolerance and not replayed:
        return ("cannot compare micro-batches with the full batch: the model draws random numbers besides "
                "dropout's (torch.randn_like, a stochastic-depth mask from torch.rand, say), which differ between a batch and its parts; rerun with "
                "--no-check to accept the pipeline unchecked, or make the model deterministic")
    norms = training_batch_norms(captured.gm, modes)
    if norms and split[0] > 1:  # one micro-batch per replica: the runtime synchronises them
        shown = ", ".join(repr(n) for n in norms[:3]) + (f" and {len(norms) - 3} more" if len(norms) > 3 else "")
        return f"BatchNorm in training mode ({shown}) normalises each micro-batch by its own statistics"
    if _scaled_diff(split_loss * parts, full_loss) <= tolerance:
        return f"the loss sums over samples, so each of the {parts} parts carries 1/{parts} of it; expected a mean"
    if updated:  # read back within the step (a warm-up counter): the later micro-batches see it advanced
        return _buffer_cause(updated[0], *split)
    # torch's own sequence models take (time, batch, ...) by default: cut along time, a
    # recurrence restarts in every part and a loss over time steps loses its pairs.
    sequence_first = ("; if dim 0 is not the batch (sequence-first inputs of shape (time, batch, ...)), set "
                      "batch_dim = 1 in the model file") if spec.batch_dim == 0 else ""
    batch = batch_size_of(spec.example_inputs, spec.batch_dim) or 0
    mixing = find_sample_mixing(_model_copy(captured, modes, dtype), as_dtype(spec.example_inputs, dtype), batch,
                                parts, spec.batch_dim, tolerance, seed)
    if mixing is not None:
        return mixing.describe(spec.batch_dim) + sequence_first
    return (f"an op mixes samples across the batch (dim {spec.batch_dim}: a normalisation over it, a sum or mean "
            f"over it){sequence_first}")
