"""Whether the example inputs agree on their batch, so that cutting it makes smaller batches.

DDP's replicas, a pipeline's micro-batches and the micro-batch profile cut the batch: the
samples along the batch dimension of every input that holds it
(:func:`graphs.input_batch.batch_axis`), read off the first input
(:func:`graphs.input_batch.batch_size_of`); any other input goes whole to every part. Two common
inputs break that reading, and the cut then makes parts that are not smaller batches:

* torchtext's text classifier takes every token of the batch in one flat tensor and an
  ``offsets`` tensor saying where each sample starts (``nn.EmbeddingBag(text, offsets)``): the
  first input's "batch" is its 615 tokens, not its 32 samples;
* a detection-style model takes a list of images, one tensor per sample: the first input's
  "batch" is the 3 channels of the first image.

The loss's targets tell them apart: a target (an input only the loss reads, such as the labels)
holds one entry per sample: integer labels always, and a floating target where another input
confirms that count (the offsets, the list's length). A PyG-style graph batch (every graph's nodes
stacked, one label per graph) is a third such input. :func:`batch_disagreement` says why, when a target does not hold the
batch read off the first input; the comparison table then rules out DDP and micro-batches with
that reason instead of one drawn from the wrong batch ("the batch of 615 does not split into 4
equal replicas", "each of the 4 replicas would get 0 sample(s) of the batch of 3").
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from graphs.input_batch import batch_size_of, carries_batch


def batch_disagreement(example_inputs: tuple, batch_dim: int = 0, targets: int = 0) -> str | None:
    """Why the inputs' batch cannot be cut (module doc), or None where it can: a tensor among the
    last ``targets`` inputs (the loss's targets) that does not hold the batch read off the first
    input, where the target is integer labels (one per sample) or another input confirms its count
    of samples (another tensor of that size along ``batch_dim``, or a list of that many tensors,
    one per sample). A floating target no other input confirms (a class-weight vector passed as an
    input) is taken for a constant.

    >>> text, offsets, labels = torch.arange(8), torch.tensor([0, 3]), torch.tensor([1, 0])
    >>> batch_disagreement((text, offsets, labels), targets=1)[:59]
    'the batch is read as 8 along dim 0 of the first input, but '
    >>> batch_disagreement((torch.zeros(4, 3), torch.zeros(4)), targets=1) is None
    True
    >>> batch_disagreement((torch.zeros(4, 3), torch.zeros(4), torch.ones(10)), targets=2) is None
    True
    """
    batch = batch_size_of(example_inputs, batch_dim)
    if batch is None or targets <= 0:
        return None
    first_target = len(example_inputs) - targets
    for position, value in enumerate(example_inputs[first_target:], start=first_target + 1):
        for leaf in tree_leaves(value):
            if not _holds_samples(leaf, batch_dim) or carries_batch(leaf, batch, batch_dim):
                continue
            samples = int(leaf.shape[batch_dim])
            others = [v for i, v in enumerate(example_inputs) if i != position - 1]
            confirmed = samples in _sample_counts(others, batch_dim)
            if not confirmed and not _labels(leaf):
                continue
            why = "as another input does" if confirmed else "integer labels, one per sample"
            return (f"the batch is read as {batch} along dim {batch_dim} of the first input, but input "
                    f"{position}, a loss target, holds {samples} "
                    f"({_shape(leaf)}, {why}): the inputs disagree on the batch (a flat tensor of every "
                    "sample's tokens with offsets, a list of one tensor per sample, a graph batch's stacked "
                    "nodes), so "
                    f"cutting it would not make smaller batches; expected every per-sample input to hold the "
                    f"batch along dim {batch_dim} (batch_dim in the model file)")
    return None


def _sample_counts(inputs: list[Any], batch_dim: int) -> set[int]:
    """The counts of samples ``inputs`` attest: sizes along ``batch_dim`` of their tensors, and the
    lengths of their lists and tuples made only of tensors (one per sample)."""
    counts: set[int] = set()
    for value in inputs:
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            counts.add(len(value))
        counts.update(int(t.shape[batch_dim]) for t in tree_leaves(value) if _holds_samples(t, batch_dim))
    return counts


def _labels(x: torch.Tensor) -> bool:
    """Integer class labels (not a mask): one per sample, wherever the model's inputs stack them."""
    return not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


def _holds_samples(x: Any, batch_dim: int) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() > batch_dim


def _shape(x: torch.Tensor) -> str:
    return f"tensor{list(x.shape)} {str(x.dtype).replace('torch.', '')}"
