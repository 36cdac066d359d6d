"""Whether a model's example inputs fit it: one trial forward, before anything is captured, so
that inputs that do not fit are reported with the failing line rather than deep inside capture.
"""

from __future__ import annotations

import contextlib
import inspect
import io

import torch
from torch import nn

from graphs.buffers import preserved_buffers
from graphs.errors import ModelFileError, first_line
from graphs.forward_inputs import describe_inputs
from graphs.input_batch import tensor_paths
from graphs.lazy_modules import materialize
from graphs.user_frames import user_location

# Above this many parameters a trial forward on real tensors is costly (a paper-size
# model runs for minutes on a small CPU): such models are checked on fake tensors only,
# which catches shape and dtype mismatches but not bad index values.
REAL_CHECK_MAX_PARAMS = 20_000_000


def check_inputs_fit(model: nn.Module, example_inputs: tuple, label: str = "the model") -> None:
    """Run one forward pass under ``torch.no_grad`` (again with gradients if that fails: a forward
    may register gradient hooks); raise ModelFileError when it fails.

    Small models run on the real inputs (buffers restored afterwards, so a BatchNorm in
    training mode keeps its statistics); large ones on fake tensors (no memory, no compute).
    """
    try:
        materialize(model, example_inputs)  # lazy modules: their parameters are counted below
    except Exception as exc:  # any failure of user code is the user's input not fitting
        raise _not_fitting(exc, example_inputs, label) from None
    large = sum(p.numel() for p in model.parameters()) > REAL_CHECK_MAX_PARAMS
    if large and _fits_on_fake_tensors(model, example_inputs):
        return
    try:
        names = [n for n in inspect.signature(model.forward).parameters][:len(example_inputs)]
    except (TypeError, ValueError):
        names = []
    inputs = [(path, t) for i, value in enumerate(example_inputs)
              for path, t in tensor_paths(value, names[i] if i < len(names) else f"#{i}")]
    saved = [(t, t.detach().clone(), t._version) for _, t in inputs]
    try:
        try:
            with torch.no_grad(), preserved_buffers(model):
                model(*example_inputs)
        except Exception:
            # Some forwards need autograd (h.register_hook raises on a tensor without grad):
            # the verdict is the training-mode run's, which placer places.
            with torch.enable_grad(), preserved_buffers(model):
                model(*example_inputs)
    except Exception as exc:  # any failure of user code is the user's input not fitting
        raise _not_fitting(exc, example_inputs, label) from None
    changed = [path for (path, _), (t, _, version) in zip(inputs, saved) if t._version != version]
    if changed:
        with torch.no_grad():
            for t, before, _ in saved:
                t.copy_(before)
        raise ModelFileError(
            f"forward() of {label} modifies its input {', '.join(changed)} in place; expected a forward that "
            "leaves its inputs as they are (placer runs the example inputs many times, and each run would "
            "see what the last one wrote: write x = x * 2, not x.mul_(2))")


def _not_fitting(exc: Exception, example_inputs: tuple, label: str) -> ModelFileError:
    return ModelFileError(
        f"the example inputs do not fit the model in {label}: {type(exc).__name__}: "
        f"{first_line(exc)}{user_location(exc)}; expected inputs that the model's forward() accepts "
        f"(got {describe_inputs(example_inputs)})")


def _fits_on_fake_tensors(model: nn.Module, example_inputs: tuple) -> bool:
    """True when a forward on fake copies of the model and inputs succeeds.

    False means "not shown to fit" (a real mismatch, or an op without a fake kernel, or a
    model that cannot be deep-copied); the caller then runs the real check for the verdict.
    """
    try:
        from torch._dynamo.utils import deepcopy_to_fake_tensor
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.utils._pytree import tree_map

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake_model = deepcopy_to_fake_tensor(model, mode)
        fake_inputs = tree_map(lambda v: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v,
                               example_inputs)
        with mode, torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            fake_model(*fake_inputs)
        return True
    except Exception:
        return False
