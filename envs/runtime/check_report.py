"""The verdict of a numerical check: :class:`CheckReport`.

The report holds the largest differences between a placed model and the original over a few
training steps, and the words that describe them (:meth:`~CheckReport.describe`).

Both checks fill it: :func:`envs.runtime.check.check_placement` the placement's fields and
:func:`envs.runtime.batch_split.check_batch_split` the batch split's (``split_*``). It is a
module of its own because the results, the reports and the optimizer read a report (its
verdict and its words) without running either check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["CheckReport", "held_tolerance"]


def held_tolerance(tolerance: float, precision: str) -> float:
    """What a batch split's differences are held to: ``tolerance``, or the epsilon of the dtype
    named by ``precision`` (``CheckReport.split_precision``) where that is larger.

    >>> held_tolerance(1e-5, ""), held_tolerance(1e-5, "bfloat16")
    (1e-05, 0.0078125)
    """
    low = getattr(torch, precision, None) if precision else None
    return max(tolerance, torch.finfo(low).eps) if isinstance(low, torch.dtype) else tolerance


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
            which DDP broadcasts: a buffer the forward updates is updated once per micro-batch),
            and for each parameter the forward writes in place (``nn.Embedding``'s ``max_norm``;
            DDP never synchronises parameters, so the first replica's must be the full batch's).
        split_worst: the gradient, buffer or written parameter (``grad:<name>``, ``buffer:<name>``,
            ``param:<name>``) behind the worst of ``split_grad_diff`` and ``split_buffer_diff``.
        split_cause: why the split changes the result (or cannot be compared); empty when it does not.
        split_without_dropout: the model drops out, and the split was compared with dropout off
            (a batch and its parts draw different masks; the runtime draws its own on each rank).
        compared_dtype: ``"float64"`` when the models differed in their own dtype and agreed
            once both were trained in float64 (the difference was the rounding of sums taken in
            another order), else ``""``: compared in the model's own dtype.
        own_dtype_diff: with ``compared_dtype``, the largest difference in the model's own dtype.
        split_replayed_draws: random draws of the model (a stochastic-depth mask, noise; not dropout's)
            that the split's parts took from the full batch's, cut to their samples
            (:mod:`envs.runtime.random_replay`); 0 where it draws none, or where a draw could not
            be replayed (then the split cannot be compared).
        split_synced_norms: BatchNorms in training mode whose statistics the replicas synchronise
            (one micro-batch each: :mod:`envs.runtime.replica_batch_norm`, as the runtime runs them).
        split_precision: the lowest floating precision the model computes in where it is below
            float32 (``"bfloat16"`` under autocast), else ``""``; the split is then held to that
            dtype's epsilon (:attr:`split_tolerance`), the rounding of its parts' partial sums.
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
    split_synced_norms: int = 0
    split_replayed_draws: int = 0
    split_precision: str = ""
    compared_dtype: str = ""
    own_dtype_diff: float = 0.0
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
    def split_tolerance(self) -> float:
        """What the split's differences are held to (:func:`held_tolerance`)."""
        return held_tolerance(self.tolerance, self.split_precision)

    @property
    def split_ok(self) -> bool:
        """True when no split was checked, or the split batch gives the full batch's loss, gradients and buffers."""
        return not self.split_checked or (
            not self.split_cause
            and max(self.split_loss_diff, self.split_grad_diff, self.split_buffer_diff) <= self.split_tolerance)

    def describe_split(self) -> str:
        """The batch split's verdict in words (empty when none was checked)."""
        if not self.split_checked:
            return ""
        parts = (f"{self.microbatches} micro-batch{'es' if self.microbatches != 1 else ''}" if self.replicas == 1
                 else f"{self.replicas} replicas x {self.microbatches} micro-batch{'es' if self.microbatches != 1 else ''}")
        diffs = (f"loss {self.split_loss_diff:.2e}, gradients {self.split_grad_diff:.2e}, "
                 f"buffers {self.split_buffer_diff:.2e}"
                 + (f" (worst: {self.split_worst})" if self.split_worst and not self.split_ok else ""))
        precision = (f"; tolerance {self.split_tolerance:.0e}, {self.split_precision}'s rounding: the model "
                     f"computes in {self.split_precision}" if self.split_precision else "")
        if self.split_ok:
            synced = (f" with their {self.split_synced_norms} BatchNorm(s) synchronised over the replicas"
                      if self.split_synced_norms else "")
            return (f"{parts} of {self.split_samples} samples{synced} give the full batch's loss, gradients and "
                    f"buffers (max difference {diffs}{precision}"
                    + ("; compared with dropout off: the pipeline's ranks draw masks of their own, so a run with "
                       "dropout is the same in distribution, not number for number" if self.split_without_dropout
                       else "")
                    + (f"; the parts took the full batch's {self.split_replayed_draws} random draw(s), cut to their "
                       "samples: the ranks draw their own, so a run is the same in distribution, not number for "
                       "number" if self.split_replayed_draws else "") + ")")
        if self.split_cause.startswith("cannot"):
            return self.split_cause
        # one micro-batch each: the parts are DDP's (or a hybrid's) replicas, not micro-batches
        parts_of = "micro-batches" if self.microbatches > 1 else "replicas' shares"
        return (f"{parts_of} of {self.split_samples} samples change what the model computes "
                f"({self.split_cause}): {parts} differ from the full batch by {diffs} "
                f"(tolerance {self.split_tolerance:.0e}{' for ' + self.split_precision if self.split_precision else ''})")

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
            f"{self.eval_output_diff:.2e} (tolerance {self.tolerance:.0e}"
            + (f"; compared in {self.compared_dtype}: in the model's own dtype they differed by "
               f"{self.own_dtype_diff:.2e}, the rounding of sums taken in another order" if self.compared_dtype
               else "") + ")"
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
