"""Whether the example inputs agree on their batch, so that cutting it makes smaller batches.

DDP's replicas, a pipeline's micro-batches and the micro-batch profile cut the batch: the
samples along the batch dimension of every input that holds it
(:func:`graphs.model_file.batch_axis`), read off the first input
(:func:`graphs.model_file.batch_size_of`); any other input goes whole to every part. Two common
inputs break that reading, and the cut then makes parts that are not smaller batches:

* torchtext's text classifier takes every token of the batch in one flat tensor and an
  ``offsets`` tensor saying where each sample starts (``nn.EmbeddingBag(text, offsets)``): the
  first input's "batch" is its 615 tokens, not its 32 samples;
* a detection-style model takes a list of images, one tensor per sample: the first input's
  "batch" is the 3 channels of the first image.

The loss's targets tell them apart: a target (an input only the loss reads, such as the labels)
holds one entry per sample. :func:`batch_disagreement` says why, when a target does not hold the
batch read off the first input; the comparison table then rules out DDP and micro-batches with
that reason instead of one drawn from the wrong batch ("the batch of 615 does not split into 4
equal replicas", "each of the 4 replicas would get 0 sample(s) of the batch of 3").
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from graphs.model_file import batch_size_of, carries_batch


def batch_disagreement(example_inputs: tuple, batch_dim: int = 0, targets: int = 0) -> str | None:
    """Why the inputs' batch cannot be cut (module doc), or None where it can: a tensor among the
    last ``targets`` inputs (the loss's targets) that does not hold the batch read off the first
    input.

    >>> text, offsets, labels = torch.arange(8), torch.tensor([0, 3]), torch.tensor([1, 0])
    >>> batch_disagreement((text, offsets, labels), targets=1)[:59]
    'the batch is read as 8 along dim 0 of the first input, but '
    >>> batch_disagreement((torch.zeros(4, 3), torch.zeros(4)), targets=1) is None
    True
    """
    batch = batch_size_of(example_inputs, batch_dim)
    if batch is None or targets <= 0:
        return None
    first_target = len(example_inputs) - targets
    for position, value in enumerate(example_inputs[first_target:], start=first_target + 1):
        for leaf in tree_leaves(value):
            if _holds_samples(leaf, batch_dim) and not carries_batch(leaf, batch, batch_dim):
                return (f"the batch is read as {batch} along dim {batch_dim} of the first input, but input "
                        f"{position}, a loss target, holds {leaf.shape[batch_dim]} "
                        f"({_shape(leaf)}): the inputs disagree on the batch (a flat tensor of every "
                        "sample's tokens with offsets, a list of one tensor per sample), so cutting it would "
                        f"not make smaller batches; expected every per-sample input to hold the batch along "
                        f"dim {batch_dim} (batch_dim in the model file)")
    return None


def _holds_samples(x: Any, batch_dim: int) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() > batch_dim


def _shape(x: torch.Tensor) -> str:
    return f"tensor{list(x.shape)} {str(x.dtype).replace('torch.', '')}"
