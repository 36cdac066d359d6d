"""The model's optimizer over the parameters one process holds, or none where it has nothing to update.

A worker process of a split (a rank of ``--devices cpu:0,cpu:1``, a pipeline stage) builds the
model's optimizer over its own parameters. A user's factory may keep only some of them
(``[p for p in params if p.requires_grad]`` beside a frozen teacher): a rank that holds only the
frozen ones then gets an empty list, and ``torch.optim`` refuses it ("optimizer got an empty
parameter list"), so a placement that runs in one process failed on two (a distillation model
whose teacher's layers went to one rank: 2 of 12 measured placements invalid). Such a rank has
nothing to step, as the one-process run's optimizer has nothing to step for those parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["rank_optimizer"]


def rank_optimizer(factory: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
                   params: Sequence[torch.nn.Parameter]) -> torch.optim.Optimizer | None:
    """``factory(params)``, or None where ``params`` is empty or the factory keeps none of them.

    >>> frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    >>> trainable_only = lambda ps: torch.optim.SGD([p for p in ps if p.requires_grad], lr=0.1)
    >>> rank_optimizer(trainable_only, [frozen]) is None
    True
    >>> type(rank_optimizer(trainable_only, [frozen, torch.nn.Parameter(torch.zeros(2))])).__name__
    'SGD'
    """
    if not params:
        return None
    try:
        return factory(list(params))
    except ValueError as exc:
        if "empty parameter list" in str(exc):  # torch.optim.Optimizer's words for a factory that kept none
            return None
        raise
