"""torch.nn's transformer stacks traced through, one node per layer: :func:`stack_forward`.

torch.fx keeps every ``torch.nn`` module whole (``Tracer.is_leaf_module``), and it cannot trace
into ``nn.TransformerEncoder``, ``nn.TransformerDecoder`` or ``nn.Transformer`` anyway: their
forwards branch on tensor attributes (``F._canonical_mask`` reads ``mask.dtype``, the fast-path
checks read ``src.dim()``). Kept whole, a 4-layer encoder was one op of the placement graph
(a transformer LM captured as 8 ops): no placement could put its layers on different devices,
no pipeline could cut between them, and the simulator charged the whole stack one kernel
launch.

So :class:`graphs.fx_tracer.PlacerTracer` traces these three through with :func:`stack_forward`:
the path their own ``forward`` takes in training (``torch/nn/modules/transformer.py``), each
layer (``nn.TransformerEncoderLayer``/``DecoderLayer``, still one node) called as the stack
calls it, the stack's final norm after them. What the stack computes from its masks, the
canonical float masks and whether the mask is causal, it computes from the masks' values, so
it stays one ``call_function`` node (:func:`encoder_masks`, :func:`decoder_is_causal`) that
runs torch's own functions on the real tensors at run time. ``nn.Transformer``'s own checks
(batch and feature sizes of ``src`` and ``tgt``) ran when the model file's inputs were tried
(:func:`graphs.inputs_fit.check_inputs_fit`) and are not repeated in the graph.

One thing a traced stack would not do: in eval mode under ``torch.no_grad()``, given a
``src_key_padding_mask`` and no ``mask``, ``nn.TransformerEncoder`` (with its default
``enable_nested_tensor``) runs its layers on a nested tensor and gives 0 at the padded
positions, where the standard path gives other values (1.81 apart, measured on a 2-layer
encoder). An encoder called that way is kept whole (:func:`kept_whole`), so that the placed
model computes what the original does in both modes, and the capture says so; its layers then
stay on one device. (The layers themselves are always whole and take their own fast path.)
A stack named as a leaf module (``--leaf enc``) is one node too.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import transformer as torch_transformer

log = logging.getLogger(__name__)

#: The stacks :func:`kept_whole` has warned about.
_told: weakref.WeakSet[nn.Module] = weakref.WeakSet()

#: The torch.nn modules traced through by :func:`stack_forward` unless named as leaf modules.
STACK_TYPES: tuple[type[nn.Module], ...] = (nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)


def encoder_masks(src: torch.Tensor, mask: torch.Tensor | None, src_key_padding_mask: torch.Tensor | None,
                  is_causal: bool | None, batch_first: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
    """(mask, padding mask, is_causal) as ``nn.TransformerEncoder.forward`` hands them to its
    layers: both masks in ``src``'s float dtype (``F._canonical_mask``) and the causal hint
    detected from the mask's values where it was not given (``_detect_is_causal_mask``)."""
    src_key_padding_mask = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                             other_type=F._none_or_dtype(mask), other_name="mask",
                                             target_type=src.dtype)
    mask = F._canonical_mask(mask=mask, mask_name="mask", other_type=None, other_name="", target_type=src.dtype,
                             check_other=False)
    seq_len = torch_transformer._get_seq_len(src, batch_first)
    return mask, src_key_padding_mask, torch_transformer._detect_is_causal_mask(mask, is_causal, seq_len)


def decoder_is_causal(tgt: torch.Tensor, tgt_mask: torch.Tensor | None, tgt_is_causal: bool | None,
                      batch_first: bool) -> bool:
    """Whether ``nn.TransformerDecoder.forward`` tells its layers that ``tgt_mask`` is causal."""
    seq_len = torch_transformer._get_seq_len(tgt, batch_first)
    return torch_transformer._detect_is_causal_mask(tgt_mask, tgt_is_causal, seq_len)


# A call of either helper is one node of the trace (torch.fx.wrap, by name, in this module).
torch.fx.wrap("encoder_masks")
torch.fx.wrap("decoder_is_causal")


def _encoder(stack: nn.TransformerEncoder, src: Any, mask: Any = None, src_key_padding_mask: Any = None,
             is_causal: bool | None = None) -> Any:
    batch_first = stack.layers[0].self_attn.batch_first
    if mask is None and src_key_padding_mask is None:
        is_causal = is_causal is True  # what _detect_is_causal_mask gives without a mask
    else:
        masks = encoder_masks(src, mask, src_key_padding_mask, is_causal, batch_first)
        mask, src_key_padding_mask, is_causal = masks[0], masks[1], masks[2]
    output = src
    for layer in stack.layers:
        output = layer(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
    return stack.norm(output) if stack.norm is not None else output


def _decoder(stack: nn.TransformerDecoder, tgt: Any, memory: Any, tgt_mask: Any = None, memory_mask: Any = None,
             tgt_key_padding_mask: Any = None, memory_key_padding_mask: Any = None,
             tgt_is_causal: bool | None = None, memory_is_causal: bool = False) -> Any:
    batch_first = stack.layers[0].self_attn.batch_first
    if tgt_mask is None:
        tgt_is_causal = tgt_is_causal is True
    else:
        tgt_is_causal = decoder_is_causal(tgt, tgt_mask, tgt_is_causal, batch_first)
    output = tgt
    for layer in stack.layers:
        output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                       tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                       tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)
    return stack.norm(output) if stack.norm is not None else output


def _transformer(model: nn.Transformer, src: Any, tgt: Any, src_mask: Any = None, tgt_mask: Any = None,
                 memory_mask: Any = None, src_key_padding_mask: Any = None, tgt_key_padding_mask: Any = None,
                 memory_key_padding_mask: Any = None, src_is_causal: bool | None = None,
                 tgt_is_causal: bool | None = None, memory_is_causal: bool = False) -> Any:
    memory = model.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
    return model.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                         tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                         tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


def is_stack(module: nn.Module) -> bool:
    """Whether ``module`` is one of :data:`STACK_TYPES` running torch's own forward (a subclass
    with a forward of its own is the user's code, traced as any module is).

    >>> is_stack(nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2), 2, enable_nested_tensor=False))
    True
    """
    return any(isinstance(module, base) and type(module).forward is base.forward for base in STACK_TYPES)


def kept_whole(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], path: str) -> bool:
    """Whether the stack ``module``, called with ``args``/``kwargs``, stays one node: an
    ``nn.TransformerEncoder`` given a padding mask and no mask, whose eval fast path (nested
    tensors) no layer-by-layer trace reproduces (module doc). Logged where it is."""
    if not isinstance(module, nn.TransformerEncoder) or not getattr(module, "use_nested_tensor", False):
        return False
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    except TypeError:
        return False  # the call fails as the original's would
    if bound.get("src_key_padding_mask") is None or bound.get("mask") is not None:
        return False
    if module not in _told:  # a capture traces more than once (training and eval mode)
        _told.add(module)
        log.warning("nn.TransformerEncoder %r is given a src_key_padding_mask and no mask: kept as one op, since "
                    "after .eval() under torch.no_grad() it runs its layers on a nested tensor (0 at padded "
                    "positions), which a trace of its layers would not; enable_nested_tensor=False lets placer "
                    "place its layers apart", path)
    return True


def stack_forward(module: nn.Module) -> Any:
    """The forward to trace ``module`` with, layer by layer, where it is one of
    :data:`STACK_TYPES` (a callable taking the module's own arguments); None otherwise.

    >>> stack_forward(nn.Linear(2, 2)) is None
    True
    """
    if isinstance(module, nn.TransformerEncoder):
        return lambda *args, **kwargs: _encoder(module, *args, **kwargs)
    if isinstance(module, nn.TransformerDecoder):
        return lambda *args, **kwargs: _decoder(module, *args, **kwargs)
    if isinstance(module, nn.Transformer):
        return lambda *args, **kwargs: _transformer(module, *args, **kwargs)
    return None
