"""Hooks on the model's own module, which a trace cannot keep: refused before capture.

fx traces ``root.forward``, not ``root(...)``, so forward (pre-)hooks registered on the model
itself would be left out of the graph (:func:`refuse_root_hooks`, :class:`RootHooksNotTraced`);
backward hooks on it neither torch.fx nor torch.export keeps
(:func:`refuse_root_backward_hooks`). Hooks on submodules run and are captured.
"""

from __future__ import annotations

from torch import nn

from graphs.errors import CaptureError
from graphs.forward_checks import refuse_other_constants


class RootHooksNotTraced(CaptureError):
    """The model's own module has forward hooks, which torch.fx does not run (torch.export does)."""


def refuse_root_backward_hooks(model: nn.Module, name: str) -> None:
    """Raise :class:`CaptureError` when the model's own module has backward hooks: fx traces
    its forward() (no module call for autograd to hook), torch.export leaves them out, and
    the model itself cannot be one node to place."""
    if model._backward_hooks or model._backward_pre_hooks:
        raise CaptureError(f"cannot capture model {name!r}: it has backward hooks on its own module "
                           "(register_full_backward_hook), which neither torch.fx nor torch.export keeps; expected "
                           "them on a submodule (placer keeps such a submodule whole, so autograd runs its hooks)")


def refuse_root_hooks(root: nn.Module) -> None:
    """Raise :class:`RootHooksNotTraced` when ``root`` has forward (pre-)hooks of its own.

    fx traces ``root.forward``, not ``root(...)``: hooks registered on the model itself were
    left out of the graph (walkthrough: a forward hook returning ``output - 1`` made every output
    1.0 off), while hooks on submodules run. torch.export traces the call, hooks included.
    placer's own input check (:func:`pin_constant_inputs`, a placed graph captured again) is not the user's.
    """
    hooks = [h for h in [*root._forward_pre_hooks.values(), *root._forward_hooks.values()]
             if h is not refuse_other_constants]
    if hooks:
        names = ", ".join(sorted({getattr(h, "__qualname__", type(h).__name__) for h in hooks}))
        raise RootHooksNotTraced(f"the model has {len(hooks)} forward hook(s) of its own ({names}); torch.fx "
                                 "traces forward() without them")
