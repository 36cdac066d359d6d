"""BatchNorm over every replica's samples: what ``torch.nn.SyncBatchNorm`` computes, on any device.

A data-parallel replica sees ``1/R`` of the batch. A BatchNorm in training mode would normalise
that share by its own mean and variance, which is not the full batch's step. PyTorch's
answer, ``SyncBatchNorm``, runs on GPUs only: its forward raises "SyncBatchNorm expected
input tensor to be on GPU" for a CPU tensor (``torch/nn/modules/batchnorm.py``), and the
kernels it calls (``batch_norm_stats``, ``batch_norm_backward_elemt``) have no CPU
implementation. :class:`ReplicaBatchNorm` computes the same step with all-gathers only, so it
runs between CPU processes over gloo too.

**Forward.** Each replica takes its ``n_r`` values per channel, their mean ``m_r`` and
variance ``v_r`` (``batch_norm_update_stats``, the kernel native BatchNorm uses), and one all-gather brings every replica's
``(n_r, m_r, v_r)``. From them, ``N = sum n_r``, ``m = sum n_r m_r / N`` and
``v = sum n_r (v_r + (m_r - m)^2) / N``. This is Chan et al.'s combination: no difference of
large sums, so float32 keeps the variance's digits. ``SyncBatchNorm`` gathers the same
statistics. The output is then normalised by ``(m, v)`` (``F.batch_norm`` with those
statistics, one fused pass). The running statistics are updated as
``_BatchNorm`` does: momentum or the cumulative average, and the unbiased ``v N / (N - 1)``.

**Backward.** The per-channel sums ``sum dy`` and ``sum dy * xhat`` are gathered in one
message and summed. The input's gradient is BatchNorm's over the whole batch:
``w / sqrt(v + eps) * (dy - sum dy / N - xhat * sum(dy * xhat) / N)``. The weight's and bias's
gradients stay local (``sum dy * xhat`` and ``sum dy`` of this replica). DDP averages them
over the replicas, as it does every other parameter's. Each replica's loss is the mean over
its share, so its ``dy`` is ``R`` times the full batch's, and that average is the full batch's
gradient.

So each BatchNorm costs two collectives per step, one in the forward and one in the
backward, as ``SyncBatchNorm``'s do, each blocking the replica's thread. The simulator
charges them as rule D5 of :mod:`envs.sim.data_parallel`.

The exchange is a callable, a :data:`Gather`: a tensor in, every replica's tensor stacked
in replica order out (the same result in every replica). :func:`process_group_gather` makes
one from a ``torch.distributed`` group for the runtime. :class:`LockstepGather` does the same
for replicas that run as threads of one process, which is how the numerical check of a batch
split runs them.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["Gather", "ReplicaBatchNorm", "LockstepGather", "process_group_gather",
           "replace_batch_norms", "training_batch_norms", "unsynced_batch_norms"]

#: Every replica's tensor, stacked in replica order ([R, *shape]; the same in every replica).
Gather = Callable[[torch.Tensor], torch.Tensor]


class _ReplicaBatchNormFunction(torch.autograd.Function):
    """The forward and backward of the module doc, for one call."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                gather: Gather) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        channels = x.shape[1]
        n_local = x.numel() // channels if channels else 0
        # ATen's BatchNorm statistics kernel: 4.7x faster than torch.var_mean over (0, 2, 3) on a
        # [16, 256, 16, 16] input here (1.1 against 5.4 ms, one thread), which made ResNet-50's
        # step 22% slower than with native BatchNorm.
        mean_r, var_r = torch.ops.aten.batch_norm_update_stats(x, None, None, 0.0)
        counts = torch.full((1,), float(n_local), dtype=mean_r.dtype, device=x.device)
        every = gather(torch.cat([counts, mean_r, var_r]))  # [R, 1 + 2C]
        if n_local * every.shape[0] <= 1:  # the replicas take equal shares: no device sync to know
            raise ValueError(f"expected more than 1 value per channel when training; got input size "
                             f"{list(x.shape)} on each of {every.shape[0]} replica(s)")
        sizes = every[:, :1]
        n = sizes.sum()
        means, variances = every[:, 1:1 + channels], every[:, 1 + channels:]
        mean = (sizes * means).sum(0) / n
        var = (sizes * (variances + (means - mean).square())).sum(0) / n
        y = F.batch_norm(x, mean, var, weight, bias, training=False, momentum=0.0, eps=eps)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps = eps
        ctx.gather = gather
        ctx.count = n
        ctx.mark_non_differentiable(mean, var, n)
        return y, mean, var, n

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, *_unused: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, var = ctx.saved_tensors
        w = weight if weight is not None else torch.ones_like(mean)
        # BatchNorm's backward with fixed statistics: dy * w * invstd and the local sums
        # sum(dy * xhat) (the weight's gradient) and sum(dy) (the bias's).
        dx_fixed, dw_local, db_local = torch.ops.aten.native_batch_norm_backward(
            dy.contiguous(), x, w, mean, var, None, None, False, ctx.eps, [True, True, True])
        total = ctx.gather(torch.cat([db_local, dw_local])).sum(0)
        channels = mean.shape[0]
        sum_dy, sum_dy_xhat = total[:channels], total[channels:]
        invstd = torch.rsqrt(var + ctx.eps)
        n = ctx.count
        # (x - mean) * b + a in one fused pass: a BatchNorm with unit scale and those affine terms.
        a = w * invstd * sum_dy / n
        b = w * invstd * invstd * sum_dy_xhat / n
        correction = F.batch_norm(x, mean, torch.ones_like(var), b, a, training=False, momentum=0.0, eps=0.0)
        dx = dx_fixed.sub_(correction)
        return (dx, dw_local if weight is not None and ctx.needs_input_grad[1] else None,
                db_local if ctx.needs_input_grad[2] else None, None, None)


class ReplicaBatchNorm(torch.nn.Module):
    """A BatchNorm whose training-mode statistics are the whole batch's over every replica.

    It takes the parameters and buffers of ``source`` (the same tensors, under the same
    names), so optimizers, DDP and state dicts see the module they saw. In eval mode with
    running statistics it is ``source``'s computation, with nothing to gather.

    >>> bn = torch.nn.BatchNorm1d(3)
    >>> alone = ReplicaBatchNorm(bn, gather=lambda t: t[None])  # one replica: its own statistics
    >>> x = torch.randn(8, 3)
    >>> torch.allclose(alone(x), torch.nn.BatchNorm1d(3)(x), atol=1e-6)
    True
    """

    def __init__(self, source: _BatchNorm, gather: Gather) -> None:
        super().__init__()
        self.num_features = source.num_features
        self.eps = source.eps
        self.momentum = source.momentum
        self.affine = source.affine
        self.track_running_stats = source.track_running_stats
        self.weight = source.weight
        self.bias = source.bias
        self.register_buffer("running_mean", source.running_mean)
        self.register_buffer("running_var", source.running_var)
        self.register_buffer("num_batches_tracked", source.num_batches_tracked)
        self.gather = gather
        self.train(source.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (batch, channels, ...); got {x.dim()}")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not batch_stats:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, factor,
                                self.eps)
        y, mean, var, n = _ReplicaBatchNormFunction.apply(x, self.weight, self.bias, self.eps, self.gather)
        if self.training and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.running_mean.mul_(1.0 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                unbiased = var * (n / (n - 1))
                self.running_var.mul_(1.0 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return y


def training_batch_norms(module: torch.nn.Module, modes: Mapping[str, bool] | None = None) -> list[str]:
    """Qualified names of the BatchNorm submodules of ``module`` in training mode that
    normalise by batch statistics (the ones a data-parallel split changes). ``modes``
    (module name -> training, ``""`` the default; :func:`graphs.module_modes.training_modes`)
    decides instead of the modules' own flags: the modes a graph was traced in."""
    def training(name: str, m: torch.nn.Module) -> bool:
        return m.training if modes is None else bool(modes.get(name, modes[""]))

    return [name for name, m in module.named_modules() if isinstance(m, _BatchNorm) and training(name, m)]


def replace_batch_norms(module: torch.nn.Module, gather: Gather, names: Sequence[str] | None = None) -> list[str]:
    """Swap each BatchNorm of ``module`` in training mode (or those named) for a
    :class:`ReplicaBatchNorm` over ``gather``, in place; returns the names swapped. A
    ``GraphModule`` calls its submodules by name, so its graph is unchanged."""
    chosen = list(training_batch_norms(module) if names is None else names)
    for name in chosen:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        source = getattr(owner, leaf)
        if not isinstance(source, _BatchNorm):
            raise TypeError(f"{name!r} is a {type(source).__name__}; expected a BatchNorm module")
        setattr(owner, leaf, ReplicaBatchNorm(source, gather))
    return chosen


def unsynced_batch_norms(module: torch.nn.Module) -> list[str]:
    """Make each ``nn.SyncBatchNorm`` of ``module`` a plain BatchNorm of the samples this
    process has, in place; returns the names changed.

    ``SyncBatchNorm`` syncs over the default process group whenever one is initialised. In the
    ranks of a model placement and in the stages of a pipeline without replicas, the other
    ranks hold other layers: there it raised "SyncBatchNorm expected input tensor to be on GPU"
    on CPU ranks (every placement and pipeline of such a model failed when measured), and on
    GPUs it would all-gather with ranks that never call it. What runs there is what the placed
    model computes in one process, where ``SyncBatchNorm`` falls back to ``F.batch_norm``:
    ``_BatchNorm.forward``, set as the instance's forward. The module stays a ``SyncBatchNorm``
    (its parameters, buffers, hooks and mode untouched), so fx still calls it as one leaf and the
    captured graph, and its fingerprint, are the parent's.

    >>> net = torch.nn.Sequential(torch.nn.SyncBatchNorm(3))
    >>> unsynced_batch_norms(net), type(net[0]).__name__
    (['0'], 'SyncBatchNorm')
    """
    names = [name for name, m in module.named_modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    for name in names:
        norm = module.get_submodule(name)
        norm.forward = types.MethodType(_BatchNorm.forward, norm)  # type: ignore[method-assign]
    return names


def process_group_gather(group: Any = None) -> Gather:
    """A :data:`Gather` over a ``torch.distributed`` process group (None: the default one)."""
    import torch.distributed as dist

    def gather(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().contiguous()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t, group=group)
        return torch.stack(parts)

    return gather


class LockstepGather:
    """The replicas' exchange when each replica is a thread of this process: every thread calls
    its gather with its tensor, waits for the others, and gets them all stacked in replica
    order (the same tensor, bit for bit, in every thread). A thread that fails breaks the
    barrier, so the others raise instead of waiting for ever.

    >>> import concurrent.futures
    >>> lock = LockstepGather(2)
    >>> with concurrent.futures.ThreadPoolExecutor(2) as pool:
    ...     every = list(pool.map(lambda r: lock.gather(r)(torch.tensor([float(r + 1)])), range(2)))
    >>> every[0].tolist(), every[1].tolist()
    ([[1.0], [2.0]], [[1.0], [2.0]])
    """

    def __init__(self, replicas: int, timeout_s: float = 600.0) -> None:
        self._slots: list[torch.Tensor | None] = [None] * replicas
        self._barrier = threading.Barrier(replicas, timeout=timeout_s)

    def gather(self, replica: int) -> Gather:
        """Replica ``replica``'s :data:`Gather`."""
        def gather(t: torch.Tensor) -> torch.Tensor:
            self._slots[replica] = t.detach()
            self._barrier.wait()
            every = torch.stack(self._slots)  # type: ignore[arg-type]
            self._barrier.wait()  # every thread has read the slots before any writes its next
            return every

        return gather

    def abort(self) -> None:
        """Release every waiting thread with ``threading.BrokenBarrierError``."""
        self._barrier.abort()
