"""Optimizer state: how many bytes of state an optimizer keeps per parameter byte.

Memory per device counts the optimizer's state beside parameters and gradients, so a
placement is costed with the model's own optimizer, as training would run it.

>>> OPTIMIZER_STATE_FACTOR["adam"]
2.0
>>> known_state_kind("lamb")   # unknown: assume Adam-sized state
'adam'
"""

from __future__ import annotations

#: Optimizer state bytes per parameter byte, by optimizer name.
OPTIMIZER_STATE_FACTOR: dict[str, float] = {
    "sgd": 0.0,
    "sgd_momentum": 1.0,
    "momentum": 1.0,
    "rmsprop": 1.0,
    "adagrad": 1.0,
    "adam": 2.0,
    "adamw": 2.0,
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
