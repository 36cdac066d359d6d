"""Whether a model can be trained at all, and its loss as every check computes it.

A placement is searched for a training step, so :func:`check_trainable` refuses, before any
search, a model that cannot be trained (no trainable parameter, a loss that does not depend on
one, a loss that is not finite, a backward that fails). The numerical checks refuse the same
models in the same words (:func:`_no_trainable_parameters`, :func:`_untrainable_loss`) and
compute the loss the same way (:func:`_loss_of`: on the CPU, wherever the output is), so these
live apart from both checks. The backward runs through ``torch.autograd.grad``: no ``.grad`` is
touched, but a hook on a tensor of the model (a parameter's ``register_hook``) sees it once.
"""

from __future__ import annotations

import linecache
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from envs.runtime.transfers import to_device
from graphs.buffers import preserved_buffers
from graphs.errors import ModelFileError, PlacerError
from graphs.input_batch import batch_size_of, first_tensor
from graphs.model_file import ModelSpec
from graphs.module_modes import set_training_modes, training_modes
from graphs.user_frames import is_user_file, user_location

__all__ = ["check_trainable"]


#: What every refusal of an untrainable model says was expected.
_TRAINABLE = "expected a model with trainable parameters whose loss depends on them"


def _no_trainable_parameters(model: torch.nn.Module, label: str) -> str | None:
    """Why ``model`` cannot be trained for lack of parameters (None when it has trainable ones)."""
    params = list(model.parameters())
    if any(p.requires_grad for p in params):
        return None
    what = (f"its {len(params)} parameter tensor{'s are' if len(params) != 1 else ' is'} frozen (requires_grad=False)"
            if params else "it has no parameters")
    return f"model {label!r} has nothing to train: {what}; {_TRAINABLE}"


def _untrainable_loss(loss: object, output: object, label: str) -> str | None:
    """Why ``loss`` cannot be trained on (None when it is a one-element tensor that requires grad)."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        return f"the loss of model {label!r} is {got}; expected a scalar tensor from trainable parameters"
    if loss.requires_grad:
        return None
    out = first_tensor(output)
    why = (f": its output has dtype {str(out.dtype).replace('torch.', '')}, which carries no gradient "
           "(argmax, a comparison, an integer cast)" if out is not None and not (
               out.is_floating_point() or out.is_complex()) else
           ": no trainable parameter reaches it (detached, computed under no_grad, or from frozen parameters)")
    return f"the loss of model {label!r} does not require grad{why}; {_TRAINABLE}"


def _loss_of(spec: ModelSpec, output: object, inputs: tuple) -> object:
    loss = spec.loss_fn(output, *[to_device(x, "cpu") for x in inputs])
    return to_device(loss, "cpu") if isinstance(loss, torch.Tensor) else loss


def check_trainable(spec: ModelSpec) -> None:
    """Refuse a model that cannot be trained, before any search: one forward and backward of
    the user's model on its example inputs, in the mode it is captured in (training), with its
    buffers and the random state restored afterwards and no ``.grad`` touched.

    Raises:
        ModelFileError: no parameter requires grad; the loss is not a scalar tensor, does not
            require grad, or is not finite; the backward fails (the model itself, before any
            placement).
    """
    model, label = spec.model, spec.name
    reason = _no_trainable_parameters(model, label)
    if reason is not None:
        raise ModelFileError(reason)
    modes = training_modes(model)
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    try:
        with torch.random.fork_rng(devices=cuda), preserved_buffers(model), torch.enable_grad():
            if not model.training:  # as graphs.capture.capture: a training step is placed
                model.train()
            output = model(*spec.example_inputs)
            loss = _loss_of(spec, output, spec.example_inputs)
            unusable = _untrainable_loss(loss, output, label)
            backward_error = None if unusable is not None else _backward_error(
                model, loss, lambda: _loss_of(spec, model(*spec.example_inputs), spec.example_inputs))
    except PlacerError:
        raise
    except Exception as exc:  # user code: its own words, in one line
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelFileError(
            f"one training forward of model {label!r} and its loss fails on the example inputs: "
            f"{type(exc).__name__}: {first}{user_location(exc)}; expected a forward() and a loss (get_loss(output, *inputs) in "
            "a model file, loss_fn in the API) that run with gradients on") from None
    finally:
        set_training_modes(model, modes)
    if unusable is not None:
        raise ModelFileError(unusable)
    assert isinstance(loss, torch.Tensor)
    value = float(loss.detach().reshape(-1)[0])
    if not math.isfinite(value):
        empty = batch_size_of(spec.example_inputs, spec.batch_dim) == 0  # a mean over no samples is nan
        raise ModelFileError(
            f"the original model's loss is {value} on the example inputs (model {label!r} itself, before any "
            "placement)" + (f"; they hold 0 samples (dim {spec.batch_dim} is empty): expected a batch of at least one"
                            if empty else "; expected finite values"))
    if backward_error is not None:
        raise ModelFileError(
            f"the backward of model {label!r} fails on the example inputs (the model itself, before any placement): "
            f"{backward_error}; expected a forward() and a loss whose backward runs in plain PyTorch"
            + ("" if "; the failing backward is that of" in backward_error else
               " (torch.autograd.set_detect_anomaly(True) names the forward op at fault)"))


def _backward_error(model: torch.nn.Module, loss: torch.Tensor,
                    rerun: Callable[[], object]) -> str | None:
    """Why the backward of ``loss`` fails, in one line with the forward line at fault where autograd's
    anomaly mode names one (None when it runs). ``torch.autograd.grad`` leaves every ``.grad`` as
    it was: nothing is trained. An in-place op that overwrote a tensor autograd saved fails only
    here, not in the forward. ``rerun()`` gives the loss again, for the run under anomaly mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        torch.autograd.grad(loss, params, allow_unused=True)
    except Exception as exc:  # user code: its own words, in one line
        # autograd's own hint ("enable anomaly detection ...") is what the location below does
        first = (str(exc).strip().splitlines() or [""])[0].split(" Hint: ")[0][:240].rstrip(". ")
        return f"{type(exc).__name__}: {first}{_anomaly_location(rerun, params)}"
    return None


def _anomaly_location(rerun: Callable[[], object], params: list[torch.Tensor]) -> str:
    """``; the failing backward is that of file.py:N in fn: code``: the forward line of the autograd
    node whose backward failed, read off the warning anomaly mode gives (its forward traceback), or
    ``""``."""
    with warnings.catch_warnings(record=True) as caught, torch.autograd.detect_anomaly(check_nan=False):
        warnings.simplefilter("always")
        try:
            loss = rerun()
            assert isinstance(loss, torch.Tensor)
            torch.autograd.grad(loss, params, allow_unused=True)
        except Exception:  # noqa: BLE001 - the failure is known; only the warning is read
            pass
    for warning in caught:
        text = str(warning.message)
        if "Traceback of forward call" not in text:
            continue
        frames = [(file, int(line), fn) for file, line, fn in _FRAME_LINE.findall(text) if is_user_file(file)]
        if frames:
            file, line, fn = frames[-1]
            code = (linecache.getline(file, line) or "").strip()
            return f"; the failing backward is that of {Path(file).name}:{line} in {fn}{': ' + code if code else ''}"
    return ""


#: A frame of a formatted Python stack, as anomaly mode's warning carries the forward's.
_FRAME_LINE = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
