"""Optimizer state: how many bytes of state an optimizer keeps per parameter byte.

Memory per device counts the optimizer's state beside parameters and gradients, so a
placement is costed with the model's own optimizer, as training would run it.

>>> OPTIMIZER_STATE_FACTOR["adam"]
2.0
>>> known_state_kind("lamb")   # unknown: assume Adam-sized state
'adam'
"""

from __future__ import annotations

#: Optimizer state bytes per parameter byte, by optimizer name
#: (:func:`graphs.profile.optimizer_timing.optimizer_kind`). The variants are the state
#: torch.optim keeps per parameter: Adam's ``amsgrad`` adds ``max_exp_avg_sq`` to
#: ``exp_avg`` and ``exp_avg_sq``; RMSprop keeps ``square_avg``, ``centered`` adds ``grad_avg``
#: and ``momentum`` a ``momentum_buffer``. Measured on the CPU allocator (state bytes after a
#: first step over one 4 MiB parameter): 3.00 for Adam and AdamW with amsgrad, 2.00 for a
#: centered or a momentum RMSprop, 3.00 for both.
OPTIMIZER_STATE_FACTOR: dict[str, float] = {
    "sgd": 0.0,
    "sgd_momentum": 1.0,
    "momentum": 1.0,
    "rmsprop": 1.0,
    "rmsprop_momentum": 2.0,
    "rmsprop_centered": 2.0,
    "rmsprop_centered_momentum": 3.0,
    "adagrad": 1.0,
    "adam": 2.0,
    "adamw": 2.0,
    "adam_amsgrad": 3.0,
    "adamw_amsgrad": 3.0,
}

#: The optimizer step's temporaries on a device, in parameters of its largest: torch.optim's
#: single-tensor implementation (the default on a CPU) updates one parameter at a time, and
#: each update allocates temporaries of the parameter's size (Adam's
#: ``denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt)``: the square root and the
#: quotient; weight decay's ``grad.add(param)``; SGD's nesterov ``grad.add(buf)``), the last
#: of which stays referenced while the next parameter's are made. Measured on the CPU
#: allocator (the peak of a second ``step()`` above parameters, gradients and state, over
#: three parameters of equal size, the worst order; with and without weight decay, the
#: larger kept): SGD 1 (weight decay), SGD with momentum 2 (nesterov and weight decay),
#: RMSprop and Adagrad 3, AdamW 3, Adam 4 (weight decay; 3 without), Adam with amsgrad 4.
#: The unknown optimizers costed as Adam measured at most 4 (NAdam, Adadelta 4, RAdam 3,
#: Adamax 2). Without it a 32 MiB model of eight Linear(1024, 1024) trained with Adam peaked
#: 8 MiB (6%) above the simulated peak. A step runs after the backward freed the kept
#: activations; the simulators count it as a working set on top of them (conservative).
#: On a GPU the foreach implementation runs instead: :data:`OPTIMIZER_FOREACH_WORK`.
OPTIMIZER_STEP_WORK: dict[str, float] = {
    "sgd": 1.0,
    "sgd_momentum": 2.0,
    "momentum": 2.0,
    "rmsprop": 3.0,
    "rmsprop_momentum": 3.0,
    "rmsprop_centered": 3.0,
    "rmsprop_centered_momentum": 3.0,
    "adagrad": 3.0,
    "adam": 4.0,
    "adamw": 3.0,
    "adam_amsgrad": 4.0,
    "adamw_amsgrad": 4.0,
}


#: The foreach implementation's temporaries, in the device's parameters (their sum): torch.optim
#: runs it by default when every parameter is on a GPU (``_default_to_fused_or_foreach``), and
#: it updates all of a device's parameters with one list op at a time, so a temporary spans
#: them all (Adam's ``_foreach_sqrt(exp_avg_sqs)``, weight decay's ``_foreach_add(grads,
#: params)``). Measured with ``foreach=True`` on the CPU allocator (the peak of a second
#: ``step()`` over four equal parameters, with and without weight decay, the larger kept):
#: SGD 1 (weight decay or momentum with nesterov; 0 without), Adam, AdamW and amsgrad 1,
#: RMSprop and Adagrad 2. Of the optimizers costed as Adam, NAdam measured 2 and Adadelta 3
#: (not covered). A 32 MiB model of eight Linear(1024, 1024) with ``Adam(foreach=True)``
#: peaked 32 MiB above parameters, gradients and moments.
OPTIMIZER_FOREACH_WORK: dict[str, float] = {
    "sgd": 1.0,
    "sgd_momentum": 1.0,
    "momentum": 1.0,
    "rmsprop": 2.0,
    "rmsprop_momentum": 2.0,
    "rmsprop_centered": 2.0,
    "rmsprop_centered_momentum": 2.0,
    "adagrad": 2.0,
    "adam": 1.0,
    "adamw": 1.0,
    "adam_amsgrad": 1.0,
    "adamw_amsgrad": 1.0,
}


def optimizer_state_kind(optimizer_fn) -> str:
    """The key of :data:`OPTIMIZER_STATE_FACTOR` for the optimizer ``optimizer_fn(params)`` builds.

    Memory per device counts optimizer state (Adam: 2 x parameters), so placements are
    costed with the model's own optimizer, as training would. An ``optimizer_fn`` that
    fails here is costed as plain SGD; the failure shows up when the model is trained.
    Unknown optimizers are assumed to keep Adam-sized state.
    """
    from graphs.profile.optimizer_timing import optimizer_kind  # imports torch: only when asked

    try:
        name = optimizer_kind(optimizer_fn)
    except Exception:  # noqa: BLE001 - see docstring
        return "sgd"
    return known_state_kind(name)


def known_state_kind(name: str) -> str:
    """``name`` when its state size is known, else ``"adam"`` (the conservative assumption)."""
    return name if name in OPTIMIZER_STATE_FACTOR else "adam"
