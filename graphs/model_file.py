"""Loading a user's model file into a :class:`ModelSpec`.

A model file is a Python file that defines ``get_model()`` and ``get_example_inputs()``
(optionally ``get_loss(output, *inputs)`` and ``get_optimizer(params)``), or, as a
shortcut, module-level ``model`` and ``example_inputs``. Model arguments (the size knob,
``{"size": "paper"}``) are passed as keywords to whichever of the two functions accepts
them. ``get_example_inputs()`` gives a tuple of ``forward``'s positional inputs, or a dict by
parameter name (``model(**batch)``), which placer turns into that tuple
(:func:`graphs.forward_inputs.keyword_inputs_as_positional`).

The inputs' batch is their dim 0 unless the file says otherwise with a module-level
``batch_dim`` (``batch_dim = 1`` for a sequence-first model: ``nn.LSTM`` and
``nn.Transformer`` without ``batch_first``; :mod:`graphs.input_batch`). The example inputs are
run through the model once when the file is loaded (:mod:`graphs.inputs_fit`).

Every way a file can be wrong ends in one :class:`~graphs.errors.ModelFileError` whose
message says what was wrong, where (file and line), and what was expected.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from graphs.errors import ModelFileError, first_line
from graphs.forward_inputs import describe_inputs, keyword_inputs_as_positional, positional_inputs
from graphs.input_batch import check_batch_dim, first_tensor
from graphs.inputs_fit import check_inputs_fit
from graphs.loss_targets import accepting_targets, refuse_targets_without_loss
from graphs.user_frames import user_location

EXPECTED_NAMES = (
    "get_model() and get_example_inputs() (optionally get_loss(output, *inputs) and "
    "get_optimizer(params)), or module-level `model` and `example_inputs`"
)


def default_loss(output: Any, *inputs: Any) -> torch.Tensor:
    """The loss the model returns, else the mean of the first tensor of its output (a scalar
    that touches every output element).

    A dict output with a ``"loss"`` tensor is a model that computes its own loss from labels
    among its inputs, which is what training steps on: the Hugging Face convention (its
    ``Trainer`` takes ``outputs["loss"]``), for plain dicts and ``ModelOutput`` alike.

    >>> logits = torch.tensor([[1.0, 3.0]])
    >>> float(default_loss({"logits": logits, "loss": torch.tensor(0.5)})), float(default_loss(logits))
    (0.5, 2.0)
    """
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"].float().mean()
    tensor = first_tensor(output)
    if tensor is None:
        raise ModelFileError(
            f"the default loss needs a tensor in the model's output, got {type(output).__name__}; "
            "define get_loss(output, *inputs) in the model file"
        )
    return tensor.float().mean()


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """Plain SGD with learning rate 0.01 (the design's default optimizer)."""
    return torch.optim.SGD(params, lr=0.01)


@dataclass
class ModelSpec:
    """Everything placer needs about a model: the module, one batch of inputs, loss and optimizer."""

    model: nn.Module
    example_inputs: tuple
    loss_fn: Callable[..., torch.Tensor] = default_loss
    optimizer_fn: Callable[[Any], torch.optim.Optimizer] = default_optimizer
    name: str = "model"
    path: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    #: The inputs' batch dimension (the model file's ``batch_dim``; module doc).
    batch_dim: int = 0


def load_model_file(path: str | Path, model_args: Mapping[str, Any] | None = None,
                    check_inputs: bool = True, build_device: str | None = None) -> ModelSpec:
    """Load ``path`` as a model file and return its :class:`ModelSpec`.

    ``model_args`` entries are passed as keywords to ``get_model`` / ``get_example_inputs``
    when the function accepts them; an entry neither accepts is refused. The example inputs
    are run through the model once (under ``torch.no_grad``; on fake tensors for models over
    :data:`graphs.inputs_fit.REAL_CHECK_MAX_PARAMS` parameters) so inputs that do not fit are reported here,
    with the failing line, rather than deep inside capture. ``check_inputs=False`` skips that
    run (a worker process loading a file its parent checked); lazy modules then take their
    shapes when the model is captured (:mod:`graphs.lazy_modules`). ``build_device``: the default
    device while ``get_model()`` and ``get_example_inputs()`` run (``"meta"``: a worker builds a
    skeleton with no storage); the file itself is imported as usual, so the tensors it makes at
    module level (a loss's class weights, ``QUANTILES = torch.tensor(...)``) are real ones.
    """
    file = Path(path)
    module = _import_file(file)
    args = dict(model_args or {})
    name = file.stem
    label = file.name

    if hasattr(module, "get_model") or hasattr(module, "get_example_inputs"):
        get_model = _required_function(module, "get_model", label)
        get_inputs = _required_function(module, "get_example_inputs", label)
        _check_model_args(args, [get_model, get_inputs], label)
        with torch.device(build_device) if build_device is not None else contextlib.nullcontext():
            model = _call_user(get_model, _accepted(get_model, args), "get_model()", label)
            inputs = _call_user(get_inputs, _accepted(get_inputs, args), "get_example_inputs()", label)
        model_src, inputs_src = "get_model()", "get_example_inputs()"
    elif hasattr(module, "model") and hasattr(module, "example_inputs"):
        if args:
            raise ModelFileError(
                f"{label} uses module-level `model` and `example_inputs`, which take no model "
                f"arguments, but got {', '.join(sorted(args))}; define get_model(**kwargs) and "
                "get_example_inputs(**kwargs) to accept them"
            )
        model, inputs = module.model, module.example_inputs
        model_src, inputs_src = "`model`", "`example_inputs`"
    elif hasattr(module, "model") or hasattr(module, "example_inputs"):
        have, missing = ("model", "example_inputs") if hasattr(module, "model") else ("example_inputs", "model")
        raise ModelFileError(f"{label} defines `{have}` but not `{missing}`; expected {EXPECTED_NAMES}")
    else:
        raise ModelFileError(f"{label} does not define a model; expected {EXPECTED_NAMES}")

    if not isinstance(model, nn.Module):
        raise ModelFileError(
            f"{model_src} in {label} gave a {type(model).__module__}.{type(model).__qualname__}, "
            "expected a torch.nn.Module"
        )
    user_loss = _optional_function(module, "get_loss", label)
    if isinstance(inputs, Mapping):
        inputs = keyword_inputs_as_positional(model, inputs, f"{inputs_src} in {label}", user_loss is not None)
    example_inputs = _as_input_tuple(inputs, inputs_src, label)
    model = with_loss_targets(model, example_inputs, user_loss is not None, f"{inputs_src} in {label}")
    loss_fn = user_loss or default_loss
    optimizer_fn = _optional_function(module, "get_optimizer", label) or default_optimizer
    batch_dim = check_batch_dim(getattr(module, "batch_dim", 0), example_inputs, f"`batch_dim` in {label}")
    if check_inputs:
        check_inputs_fit(model, example_inputs, label)
    return ModelSpec(model=model, example_inputs=example_inputs, loss_fn=loss_fn,
                     optimizer_fn=optimizer_fn, name=name, path=str(file), model_args=args, batch_dim=batch_dim)


def model_and_inputs(model: nn.Module, batch: Any, has_loss: bool, what: str) -> tuple[nn.Module, tuple]:
    """``model`` as placer captures and runs it (:func:`with_loss_targets`) and ``batch`` as its
    positional inputs (:func:`graphs.forward_inputs.positional_inputs`; with ``has_loss``, what
    ``forward`` does not take are the loss's targets): how an in-memory model and its batch are
    taken, by ``placer.optimize``, ``placer.place`` and ``PlacementTuner`` alike. ``what`` names
    the batch in errors.
    """
    inputs = positional_inputs(model, batch, what, has_loss)
    return with_loss_targets(model, inputs, has_loss, what), inputs


def with_loss_targets(model: nn.Module, example_inputs: tuple, has_loss: bool, inputs_src: str) -> nn.Module:
    """``model`` as placer captures and runs it with ``example_inputs``: itself, or, where the
    inputs end with values its ``forward`` does not take and a loss was given
    (``has_loss``), the view of :func:`graphs.loss_targets.accepting_targets` that takes them
    as the loss's targets. Without a loss such inputs are refused, saying how to make them
    targets. ``inputs_src`` names the inputs in that error.
    """
    if not has_loss:
        refuse_targets_without_loss(model, len(example_inputs), inputs_src)
        return model
    return accepting_targets(model, len(example_inputs))


def _import_file(file: Path) -> ModuleType:
    if not file.exists():
        raise ModelFileError(f"model file {str(file)!r} does not exist; expected a path to a .py file")
    if file.is_dir():
        raise ModelFileError(f"model file {str(file)!r} is a directory; expected a path to a .py file")
    if file.suffix != ".py":
        raise ModelFileError(f"model file {str(file)!r} is not a Python file; expected a .py file "
                             f"defining {EXPECTED_NAMES}")
    try:
        source = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"cannot read model file {str(file)!r}: {exc}") from None
    try:
        compile(source, str(file), "exec")
    except SyntaxError as exc:
        code = (exc.text or "").strip()
        shown = f": {code}" if code else ""
        raise ModelFileError(
            f"syntax error in {file.name} line {exc.lineno}: {exc.msg}{shown}"
        ) from None

    # A unique, stable module name per path: two model files named model.py never clash,
    # and dataclasses/pickling inside the file find their module in sys.modules.
    digest = hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]
    mod_name = f"placer_model_{file.stem.replace('-', '_')}_{digest}"
    try:
        return import_file_as(mod_name, file)
    except ModelFileError:
        raise
    except ImportError as exc:
        if "relative import" in str(exc):  # "attempted relative import with no known parent package"
            raise ModelFileError(
                f"{file.name}{_line_in(exc, file)} imports relatively (from .module import ...), but a model file "
                "is loaded by its path, as `python model.py` runs it, outside its package; expected an absolute "
                f"import: of a module beside it by its name (its folder {str(file.resolve().parent)!r} is on the "
                "path), or of the package installed or on PYTHONPATH") from None
        raise ModelFileError(
            f"{file.name}{_line_in(exc, file)} failed to import: {type(exc).__name__}: "
            f"{first_line(exc)}; expected every module it imports to be installed"
        ) from None
    except BaseException as exc:  # SystemExit/KeyboardInterrupt in a user file are also its failure
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ModelFileError(
            f"{file.name}{_line_in(exc, file)} raised {type(exc).__name__} while loading: "
            f"{first_line(exc)}"
        ) from None


def import_file_as(name: str, file: str | Path) -> ModuleType:
    """Run ``file`` as the module ``name``, registered in ``sys.modules`` (what it defines pickles
    by that name) with its folder importable (:func:`siblings_importable`); on any failure the
    name is unregistered and the error raised as it came. The model-file loader and the worker
    processes that load the files a job names (:mod:`envs.runtime.file_modules`) both go through it.

    Raises:
        ModelFileError: no loader for ``file``.
    """
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"cannot import model file {str(file)!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    siblings_importable(file)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def siblings_importable(file: str | Path) -> None:
    """Let a model file import the modules beside it (``from mylayers import Block``), as
    ``python path/to/model.py`` does: its folder joins ``sys.path``, at the end, so that a file
    there named like an installed package (or like placer's own ``graphs``) does not shadow it.
    The folder stays: what the file defines is pickled by reference to those modules too (a worker
    process that loads the file imports them the same way).

    >>> import sys, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     siblings_importable(Path(folder) / "model.py"); print(folder in sys.path)
    ...     sys.path.remove(folder)
    True
    """
    folder = str(Path(file).resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)


def _required_function(module: ModuleType, name: str, label: str) -> Callable:
    fn = getattr(module, name, None)
    if fn is None:
        other = "get_example_inputs()" if name == "get_model" else "get_model()"
        raise ModelFileError(f"{label} defines {other} but not {name}(); expected {EXPECTED_NAMES}")
    if not callable(fn):
        raise ModelFileError(f"{name} in {label} is a {type(fn).__name__}, expected a function {name}()")
    return fn


def _optional_function(module: ModuleType, name: str, label: str) -> Callable | None:
    fn = getattr(module, name, None)
    if fn is not None and not callable(fn):
        raise ModelFileError(f"{name} in {label} is a {type(fn).__name__}, expected a function")
    return fn


def _accepts(fn: Callable) -> tuple[set[str], bool]:
    """Keyword names ``fn`` accepts, and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set(), False
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _accepted(fn: Callable, args: dict[str, Any]) -> dict[str, Any]:
    names, var_kw = _accepts(fn)
    return {k: v for k, v in args.items() if var_kw or k in names}


def _check_model_args(args: dict[str, Any], fns: list[Callable], label: str) -> None:
    known: set[str] = set()
    for fn in fns:
        names, var_kw = _accepts(fn)
        if var_kw:
            return
        known |= names
    unknown = sorted(set(args) - known)
    if unknown:
        accepted = ", ".join(sorted(known)) or "none"
        raise ModelFileError(
            f"model argument(s) {', '.join(unknown)} not accepted by get_model() or "
            f"get_example_inputs() in {label}; they accept: {accepted}"
        )


def _call_user(fn: Callable, kwargs: dict[str, Any], what: str, label: str) -> Any:
    _check_required_args(fn, kwargs, what, label)
    try:
        return fn(**kwargs)
    except ModelFileError as exc:  # placer's own words (a zoo model's argument check): no code location
        raise ModelFileError(f"{what} in {label}: {first_line(exc)}") from None
    except (Exception, SystemExit) as exc:  # sys.exit() in get_model ended placer with its message, exit 1
        raise ModelFileError(
            f"{what} in {label} raised {type(exc).__name__}: {first_line(exc)}"
            f"{user_location(exc)}"
        ) from None


def _check_required_args(fn: Callable, kwargs: Mapping[str, Any], what: str, label: str) -> None:
    """Name the arguments of ``fn`` that have no default and were not given, and how to give
    them: Python's own TypeError ("missing 1 required positional argument") said neither."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: let the call say what it says
        return
    missing = [p.name for p in params if p.default is p.empty and p.name not in kwargs
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if missing:
        given = " ".join(f"--model-arg {m}=VALUE" for m in missing)
        in_python = ", ".join(f"{m!r}: ..." for m in missing)
        raise ModelFileError(f"{what} in {label} needs the argument(s) {', '.join(missing)}, which have no default; "
                             f"expected a value for each: {given} (model_args={{{in_python}}} from Python)")


def _as_input_tuple(inputs: Any, what: str, label: str) -> tuple:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if not isinstance(inputs, tuple):
        raise ModelFileError(
            f"{what} in {label} gave a {type(inputs).__name__}; expected a tuple of the model's "
            "positional inputs, a dict of them by parameter name, or a single tensor"
        )
    if not inputs:
        raise ModelFileError(f"{what} in {label} gave an empty tuple; expected at least one input tensor")
    if first_tensor(inputs) is None:
        raise ModelFileError(
            f"{what} in {label} holds no tensor ({describe_inputs(inputs)}); expected at least one "
            "input tensor"
        )
    return inputs


def _line_in(exc: BaseException, file: Path) -> str:
    """`` line N`` of the deepest traceback frame inside ``file`` (empty when none)."""
    target = str(file.resolve())
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        try:
            if str(Path(frame.filename).resolve()) == target:
                line = frame.lineno
        except OSError:
            continue
    return f" line {line}" if line else ""

