"""Layers that hold another layer's tensor: traced through, so that the tie does not fuse the model.

A language model that ties its output head to its input embedding (``head.weight =
tok.weight``, nanoGPT and most GPT-style code) holds one tensor in two ``torch.nn`` layers. fx
keeps both as ``call_module`` leaves, and since autograd accumulates one gradient per tensor,
grouping must put both on one device (:mod:`graphs.grouping`); everything between them then
closes a cycle and fuses into the same group (a 6-block GPT: 182 ops in 2 groups, no pipeline
possible). Traced through, the second holder becomes a ``get_attr`` of the tensor (under the
name of its first holder, as ``named_parameters`` dedups it) and the functional call that
reads it (``F.linear``); grouping keeps that ``get_attr`` with the owning layer and sends the
weight to its reader over a cut edge, the rule already used for ``h @ tok.weight.t()``
(the same model: 65 groups).

Only layers whose ``forward`` is one functional call fx records as such are traced through;
an ``Embedding`` with ``max_norm`` renormalises its weight under ``torch.no_grad``, which fx
does not record, so it stays whole (and its tie fuses, as before).

>>> from torch import nn
>>> tok, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
>>> head.weight = tok.weight
>>> m = nn.ModuleDict({"tok": tok, "head": head})
>>> tied_holders(m) == {id(head)}
True
"""

from __future__ import annotations

from torch import nn

__all__ = ["tied_holders"]

# torch.nn layers whose forward is a single functional call on their own tensors.
_TRACEABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.Embedding)


def _traceable(module: nn.Module) -> bool:
    if isinstance(module, nn.Embedding):
        return module.max_norm is None
    return isinstance(module, _TRACEABLE)


def tied_holders(root: nn.Module) -> frozenset[int]:
    """Ids of the layers of ``root`` to trace through: each holds a tensor (parameter or buffer) that
    a module before it in ``named_modules()`` order already holds, and its forward is traceable.

    The first holder stays one node; it is the module whose name ``named_parameters`` keeps for
    the tensor, so the ``get_attr`` fx records for the others names it.
    """
    owner: dict[int, nn.Module] = {}
    through: set[int] = set()
    for module in root.modules():
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if any(id(t) in owner and owner[id(t)] is not module for t in tensors) and _traceable(module):
            through.add(id(module))
        for t in tensors:
            owner.setdefault(id(t), module)
    return frozenset(through)
