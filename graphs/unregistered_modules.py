"""Modules a model holds in a plain Python container, where PyTorch does not register them.

``self.hidden = [nn.Linear(64, 64) for _ in range(3)]`` (a list, not an ``nn.ModuleList``) is a
common slip: forward calls the layers, but ``model.parameters()`` leaves their weights out, so no
optimizer trains them, ``.to(device)`` does not move them and ``state_dict()`` does not save them.
PyTorch says nothing. placer captures the model as it computes: torch.export lifts such weights
into the graph as constants, so the placed model trains exactly what the original trains (nothing
of those layers), and the check agrees; :func:`unregistered_modules` finds them so that capture
can say so.
"""

from __future__ import annotations

from torch import nn

__all__ = ["unregistered_modules"]


def unregistered_modules(model: nn.Module) -> list[str]:
    """``"path[i]"`` (or ``"path['key']"``) of every module held in a list, tuple or dict
    attribute of ``model`` or a submodule, where PyTorch does not register it, and registered
    nowhere else in the model.

    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.hidden = [nn.Linear(2, 2), nn.ReLU()]
    ...         self.fine = nn.ModuleList([nn.Linear(2, 2)])
    ...         self.view = [self.fine[0]]  # registered already: not reported
    >>> unregistered_modules(Net())
    ['hidden[0]', 'hidden[1]']
    """
    registered = {id(m) for m in model.modules()}  # a list of the model's own layers is only a view
    found = []
    for path, module in model.named_modules():
        for attribute, value in vars(module).items():
            if attribute.startswith("_"):
                continue
            items = value.items() if isinstance(value, dict) else enumerate(value) \
                if isinstance(value, (list, tuple)) else ()
            where = f"{path}.{attribute}" if path else attribute
            found += [f"{where}[{key!r}]" for key, item in items
                      if isinstance(item, nn.Module) and id(item) not in registered]
    return found
