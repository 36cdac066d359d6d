"""LSTM cells for the zoo's recurrent models, called once per time step (unrolled).

The published placement work placed TensorFlow graphs in which every time step of every
LSTM layer was its own set of ops, so the parallelism across layers and time steps was
visible to the placer. The zoo reproduces that by looping over time in Python: under
torch.fx each step becomes its own node(s), and the *same* cell module is called at
every step — the shared-weights pattern that grouping must co-locate.

Two cell kinds, same call convention ``state = cell(x, state)`` with ``state = (h, c)``:

* ``"lstmcell"`` — :class:`torch.nn.LSTMCell`: one ``call_module`` node per step (a leaf
  for the default fx tracer). Compact graphs; used by the small presets.
* ``"gates"`` — :class:`LSTMGateCell`: the gate equations written out (two matmuls, the
  sigmoid/tanh gates, the state update), about fifteen nodes per step, as the published
  TensorFlow graphs had them. Used by the paper presets, so that the 8-layer NMT reaches
  tens of thousands of nodes.
"""

from __future__ import annotations

import torch
from torch import nn

CELL_KINDS: tuple[str, ...] = ("lstmcell", "gates")

State = tuple[torch.Tensor, torch.Tensor]


class LSTMGateCell(nn.Module):
    """An LSTM cell computed from its gate equations (Hochreiter & Schmidhuber, with forget gate).

    ``i, f, g, o = W_ih x + W_hh h + b``; ``c' = σ(f)·c + σ(i)·tanh(g)``; ``h' = σ(o)·tanh(c')``.
    The two projections are :class:`~torch.nn.Linear` submodules so that each step shows
    as ``call_module`` nodes on the same (shared) modules.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.ih = nn.Linear(input_size, 4 * hidden_size)
        # one bias is enough: nn.LSTMCell's second bias only duplicates the first
        self.hh = nn.Linear(hidden_size, 4 * hidden_size, bias=False)

    def forward(self, x: torch.Tensor, state: State | None = None) -> State:
        """One time step: ``x [batch, input_size]`` and ``(h, c)`` (zeros when ``None``) → ``(h', c')``."""
        if state is None:
            # the branch is on a Python value, decided once at trace time
            h = x.new_zeros(x.shape[0], self.hidden_size)
            c = x.new_zeros(x.shape[0], self.hidden_size)
        else:
            h, c = state
        gates = self.ih(x) + self.hh(h)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


def make_cell(kind: str, input_size: int, hidden_size: int) -> nn.Module:
    """Build an LSTM cell of ``kind`` (one of :data:`CELL_KINDS`)."""
    if kind == "lstmcell":
        return nn.LSTMCell(input_size, hidden_size)
    if kind == "gates":
        return LSTMGateCell(input_size, hidden_size)
    raise ValueError(f"unknown LSTM cell kind {kind!r}; expected one of {list(CELL_KINDS)}")


def step(cell: nn.Module, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
    """Run ``cell`` for one time step and return ``(h, state)``.

    With ``nn.LSTMCell`` under fx the returned state is a single proxy; it is passed on
    whole to the next step and only ``h`` is indexed out, which keeps the graph small.
    """
    state = cell(x, state)
    return state[0], state


def run_layer(cell: nn.Module, inputs: list[torch.Tensor], reverse: bool = False) -> list[torch.Tensor]:
    """Unroll ``cell`` over ``inputs`` (one ``[batch, features]`` tensor per step), zero initial state.

    Returns the hidden output of every step in input order (also when ``reverse`` runs the
    recurrence from the last step to the first, as the backward half of a bidirectional layer).
    """
    order = range(len(inputs) - 1, -1, -1) if reverse else range(len(inputs))
    outputs: list[torch.Tensor | None] = [None] * len(inputs)
    state: State | None = None
    for t in order:
        outputs[t], state = step(cell, inputs[t], state)
    return outputs  # type: ignore[return-value]
