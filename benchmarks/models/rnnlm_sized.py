"""zoo:rnnlm at any size: the zoo's RNN language model with every dimension a model argument.

The zoo presets are ``small`` (hidden 32: each op costs microseconds, less than one
message between two worker processes) and ``paper`` (hidden 2048 and a 100k vocabulary:
seconds per step on one core). The distributed benchmark needs the sizes in between, where
one LSTM step costs milliseconds, so this model file builds the same
:class:`graphs.zoo.rnnlm.RNNLM` (same cells, unrolling, loss and optimizer) from explicit
sizes::

    python -m placer graph benchmarks/models/rnnlm_sized.py --model-arg hidden=512
"""

from __future__ import annotations

import torch
from torch import nn

from graphs.zoo import rnnlm
from graphs.zoo.presets import MODEL_SEED, next_token_batch, seeded

get_loss = rnnlm.get_loss
get_optimizer = rnnlm.get_optimizer


def get_model(vocab: int = 2000, embed: int = 512, hidden: int = 512, layers: int = 2, seq_len: int = 10,
              batch_size: int = 32, cell: str = "lstmcell") -> nn.Module:
    """The zoo RNNLM with these sizes, seeded like the zoo's."""
    # rnnlm.config applies the zoo's own argument checks to every size.
    cfg = rnnlm.config("small", vocab=vocab, embed=embed, hidden=hidden, layers=layers, seq_len=seq_len,
                       batch_size=batch_size, cell=cell)
    with seeded(MODEL_SEED):
        return rnnlm.RNNLM(cfg)


def get_example_inputs(vocab: int = 2000, seq_len: int = 10, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, targets)`` ``[batch, seq_len]`` int64, seeded like the zoo's."""
    cfg = rnnlm.config("small", vocab=vocab, seq_len=seq_len, batch_size=batch_size)
    return next_token_batch(cfg.vocab, cfg.batch_size, cfg.seq_len)
