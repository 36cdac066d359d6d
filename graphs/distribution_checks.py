"""torch.distributions' argument checks, off while a model is traced.

A policy that samples in forward (``Categorical(logits=self.body(obs)).sample()``, the usual
REINFORCE or PPO actor) could not be captured: the distribution checks its arguments' values
(``validate_args``, on by default), Python control flow on tensor values that torch.fx cannot
trace and torch.export cannot guard ("Could not guard on data-dependent expression"). The checks
compute nothing the step uses (they raise on a NaN or out-of-support parameter), so the trace runs
without them, as ``Categorical(..., validate_args=False)`` would, and the setting is put back
afterwards. The placed model therefore does not raise on an invalid parameter the original model
would have refused; a distribution built with ``validate_args=True`` explicitly is still checked,
and fails to trace as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch.distributions import Distribution

__all__ = ["distribution_checks_off"]


@contextlib.contextmanager
def distribution_checks_off() -> Iterator[None]:
    """Inside: distributions built without ``validate_args`` do not check their arguments.

    >>> import torch
    >>> from torch.distributions import Categorical
    >>> with distribution_checks_off():
    ...     Categorical(logits=torch.zeros(3))._validate_args
    False
    >>> Categorical(logits=torch.zeros(3))._validate_args == Distribution._validate_args
    True
    """
    before = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        Distribution.set_default_validate_args(before)
