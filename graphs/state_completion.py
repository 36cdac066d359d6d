"""A captured GraphModule given every parameter and buffer of its model, in the model's order.

fx copies only the attributes the graph reads, in the order forward() uses them:
:func:`complete_state` adds the others (shared, not copied) and registers all of them in the
model's order, so that the placed model's ``state_dict()`` loads back into the original with
``strict=True`` and an optimizer's state saved from one resumes the other.
"""

from __future__ import annotations

import contextlib

import torch.fx as fx
from torch import nn

from graphs.module_attributes import ensure_module


def complete_state(gm: fx.GraphModule, model: nn.Module) -> None:
    """Give ``gm`` every parameter and buffer of ``model`` that forward() does not use.

    fx copies only the attributes the graph reads, so an unused buffer would be missing
    from the placed model's ``state_dict()`` and loading it back into the original with
    ``strict=True`` would fail. The tensors are shared, not copied, as fx shares the rest.
    Buffers the model keeps out of its ``state_dict`` (``persistent=False``) stay out.
    """
    have = set(gm.state_dict(keep_vars=True))
    for path, mod in model.named_modules():
        prefix = f"{path}." if path else ""
        for key, value in list(mod._parameters.items()) + list(mod._buffers.items()):
            if value is None or prefix + key in have:
                continue
            owner = ensure_module(gm, path)
            if key in mod._parameters:
                owner.register_parameter(key, value)
            else:
                owner.register_buffer(key, value, persistent=key not in mod._non_persistent_buffers_set)
        # torch.export registers every buffer as persistent: one the model keeps out of its
        # state_dict would then be an unexpected key when loading back with strict=True.
        for key in mod._non_persistent_buffers_set:
            with contextlib.suppress(AttributeError):
                owner = gm.get_submodule(path) if path else gm
                if key in owner._buffers:
                    owner._non_persistent_buffers_set.add(key)
    _match_registration_order(gm, model)


def _match_registration_order(gm: fx.GraphModule, model: nn.Module) -> None:
    """Register ``gm``'s submodules, parameters and buffers in ``model``'s order.

    fx copies them in the order forward() uses them, so a model that defines its head first
    listed its parameters in another order once placed: an optimizer's ``state_dict`` (which
    is by position) saved from the placed model then resumed the original with Adam's moments
    on the wrong weights, and a weight tied between two modules was named after the other
    one (``emb.weight`` for ``head.weight``), which the numerical check took for a missing
    gradient (walkthrough)."""
    for path, mod in model.named_modules(remove_duplicate=False):
        try:
            placed = gm.get_submodule(path) if path else gm
        except AttributeError:
            continue
        if placed is mod:  # a leaf the graph holds itself (a TorchScript module's slots cannot be reordered)
            continue
        for attr in ("_modules", "_parameters", "_buffers"):
            own, theirs = getattr(placed, attr), getattr(mod, attr)
            order = [k for k in theirs if k in own] + [k for k in own if k not in theirs]
            if list(own) != order:
                reordered = {k: own[k] for k in order}
                own.clear()
                own.update(reordered)
