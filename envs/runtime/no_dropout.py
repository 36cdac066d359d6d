"""Dropout switched off for a comparison: :class:`_NoDropout`.

It is a torch function mode in which every dropout (the functions, the aten ops, attention's
``dropout_p``, a recurrent layer's ``dropout``) is the identity.

Two computations that must agree draw different dropout masks where their random draws
differ: a batch and its micro-batches (:mod:`envs.runtime.batch_split`), and a placement whose
devices draw from generators of their own (:func:`envs.runtime.check.check_placement`). Both
compare with dropout off; the mode records whether it switched off a dropout that would have
dropped something, so that the report can say the comparison was made without it.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

#: Dropout at every level a captured graph calls it: the functions (fx, nn.Dropout's forward)
#: and the aten ops (torch.export).
_DROPOUTS = frozenset({
    torch.nn.functional.dropout, torch.nn.functional.dropout1d, torch.nn.functional.dropout2d,
    torch.nn.functional.dropout3d, torch.nn.functional.alpha_dropout, torch.nn.functional.feature_alpha_dropout,
    torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout,
    torch.ops.aten.dropout.default, torch.ops.aten.alpha_dropout.default,
    torch.ops.aten.feature_dropout.default, torch.ops.aten.feature_alpha_dropout.default,
})


#: Functions that drop out inside (attention weights), and the position of their ``dropout_p``.
#: A mode does not see the calls its handler makes, so MultiheadAttention's dropout is
#: switched off at F.multi_head_attention_forward, not at the F.dropout/SDPA call inside it.
_DROPOUT_P_AT = {
    torch.nn.functional.scaled_dot_product_attention: 4,
    torch.ops.aten.scaled_dot_product_attention.default: 4,
    torch.nn.functional.multi_head_attention_forward: 10,
}


#: The recurrent layers' functions (``nn.LSTM``/``GRU``/``RNN`` call them with their
#: ``dropout`` between layers). Two overloads each: (input, hx, params, has_biases, layers,
#: dropout, train, ...) and, for packed sequences, (data, batch_sizes, hx, params, ...), one
#: place later.
_RNNS = frozenset({torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu})


def _rnn_dropout_at(func: object, args: tuple) -> int:
    """The position of ``dropout`` in this call of a recurrent function (the overload's)."""
    packed = (isinstance(args[1], torch.Tensor) if func is torch.lstm
              else len(args) > 2 and isinstance(args[2], torch.Tensor))
    return 6 if packed else 5


class _NoDropout(TorchFunctionMode):
    """Dropout as the identity, attention's included. A batch and its micro-batches draw
    different masks, so with dropout on they never agree, however sample-wise the model is;
    without it the comparison sees only what the split itself changes. (A clone, not the
    input: an in-place op after the dropout must not write into a tensor autograd saved.)"""

    def __init__(self) -> None:
        super().__init__()
        #: Whether a dropout that would have dropped something was switched off.
        self.switched = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        if func in _DROPOUTS:
            # (input, p, training, ...) for every one of them, torch's and aten's
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            training = args[2] if len(args) > 2 else kwargs.get("training", kwargs.get("train", True))
            self.switched |= bool(training) and float(p) > 0
            return args[0].clone()
        at = _rnn_dropout_at(func, args) if func in _RNNS and len(args) > 6 else _DROPOUT_P_AT.get(func)
        if at is not None:
            self.switched |= float(args[at] if len(args) > at else kwargs.get("dropout_p", 0.0)) > 0
            if len(args) > at:
                args = (*args[:at], 0.0, *args[at + 1:])
            else:
                kwargs["dropout_p"] = 0.0
        return func(*args, **kwargs)
