"""How far apart two tensors are: :func:`_scaled_diff`, the measure of every numerical check.

Every comparison the checks make (outputs, losses, gradients, parameters, buffers, the batch
split) uses it.

``max |a - b| / (1 + max |b|)``: absolute for small values, relative for large ones; NaN in
the same places and the same infinities are equal. It is a module of its own because the
placement check (:mod:`envs.runtime.check`) and the batch-split check
(:mod:`envs.runtime.batch_split`) both compare with it, and because its fast path
(:func:`_finite_scaled_diff`) must give the full rule's (:func:`_masked_scaled_diff`) result
bit for bit, which the tests check on the two directly.
"""

from __future__ import annotations

import math

import torch


def _scaled_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / (1 + max |b|): absolute for small values, relative for large ones.

    NaN in the same places on both sides, and the same infinities, are equal (torch.testing's
    ``equal_nan``): the placed model reproduces the original's NaN. NaN or an infinity on
    one side only is an infinite difference.
    """
    if a.is_meta or b.is_meta:
        # No data to compare (a template module on meta, whose parameters torch.func's
        # functional_call replaces): the same when both are meta tensors of one shape.
        return 0.0 if a.is_meta and b.is_meta and a.shape == b.shape else float("inf")
    if a.dtype == torch.bool or b.dtype == torch.bool:
        a, b = a.to(torch.int8), b.to(torch.int8)
    a, b = a.detach().to("cpu"), b.detach().to("cpu")
    # Sparse gradients (nn.Embedding(sparse=True)) have no torch.equal; complex values would
    # lose their imaginary part in the cast below: compare dense, real and imaginary apart.
    a, b = (t.to_dense() if t.layout != torch.strided else t for t in (a, b))
    if a.is_complex() or b.is_complex():
        common = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.complex64)
        a, b = (torch.view_as_real(t.to(common).resolve_conj()) for t in (a, b))
    if a.shape != b.shape:
        return float("inf")
    # In the tensors' own floating dtype (float32 stays float32: a difference of two float32
    # values rounds by 2**-24 of itself, far below any tolerance), with no masked copies: a
    # float64 copy of each side and of every intermediate held 8 bytes x 8 per element, over
    # 2 GB at once for a 32,000 x 1,024 gradient (paper NMT's check peaked at 8.5 GB).
    dtype = torch.promote_types(a.dtype, b.dtype)
    dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float64
    a, b = a.to(dtype), b.to(dtype)
    if a.numel() == 0:
        return 0.0
    fast = _finite_scaled_diff(a, b)
    return fast if fast is not None else _masked_scaled_diff(a, b)


def _masked_scaled_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """:func:`_scaled_diff` of two same-shape, non-empty float tensors of one dtype, by the
    rule in full: NaN and infinities masked."""
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return float("inf")
    # a == b first: inf - inf is NaN. The scale ignores b's infinities, which would hide
    # any finite difference elsewhere.
    gap = (a - b).abs_().masked_fill_((a == b) | nan, 0.0)
    scale = 1.0 + float(b.abs().masked_fill_(~b.isfinite(), 0.0).max())
    return float(gap.max()) / scale


def _finite_scaled_diff(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """:func:`_scaled_diff` of two same-shape, non-empty float tensors in three passes, or None
    where ``a - b`` has a NaN or ``b`` an infinity and the masked rule must decide.

    The masked rule makes about a dozen passes over both tensors (NaN masks, masked copies,
    ``isfinite``): on paper NMT's 155 million parameters that was most of the check's time,
    spent on tensors that are almost always finite. Without a NaN in ``a - b`` neither side has
    one, and ``|a - b|`` is 0 wherever ``a == b``; with ``b`` finite nothing is masked from the
    scale. Then both maxima are exactly the masked rule's (a max rounds nothing), from one
    ``aminmax`` each: ``max|x| = max(|min x|, |max x|)``, ``abs`` keeping a -0.0 out of the report.
    """
    low, high = (float(x) for x in (a - b).aminmax())
    if math.isnan(low) or math.isnan(high):
        return None
    smallest, largest = (float(x) for x in b.aminmax())
    if not (math.isfinite(smallest) and math.isfinite(largest)):
        return None
    return max(abs(low), abs(high)) / (1.0 + max(abs(smallest), abs(largest)))
