"""Loading a user's model file into a :class:`ModelSpec`.

A model file is a Python file that defines ``get_model()`` and ``get_example_inputs()``
(optionally ``get_loss(output, *inputs)`` and ``get_optimizer(params)``), or, as a
shortcut, module-level ``model`` and ``example_inputs``. Model arguments (the size knob,
``{"size": "paper"}``) are passed as keywords to whichever of the two functions accepts
them. ``get_example_inputs()`` gives a tuple of ``forward``'s positional inputs, or a dict by
parameter name (``model(**batch)``), which placer turns into that tuple
(:func:`keyword_inputs_as_positional`).

The inputs' batch is their dim 0 unless the file says otherwise with a module-level
``batch_dim`` (``batch_dim = 1`` for a sequence-first model: ``nn.LSTM`` and
``nn.Transformer`` without ``batch_first``). DDP replicas and pipeline micro-batches take
equal slices of every input tensor that holds the batch, along that dimension or the one other
of the batch's size (:func:`batch_axis`).

Every way a file can be wrong ends in one :class:`~graphs.errors.ModelFileError` whose
message says what was wrong, where (file and line), and what was expected.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import io
import logging
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from graphs.errors import ModelFileError
from graphs.lazy_modules import materialize
from graphs.loss_targets import accepting_targets, refuse_targets_without_loss
from graphs.user_frames import user_location

log = logging.getLogger(__name__)

EXPECTED_NAMES = (
    "get_model() and get_example_inputs() (optionally get_loss(output, *inputs) and "
    "get_optimizer(params)), or module-level `model` and `example_inputs`"
)


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor in a (possibly nested) output structure: tuple, list, dict, ModelOutput."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        items = list(value.values())
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        return None
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def batch_size_of(example_inputs: Any, dim: int = 0) -> int | None:
    """The batch size of a model's example inputs: dim ``dim`` (the model's batch dimension,
    :attr:`ModelSpec.batch_dim`) of the first tensor (or array) that has one, in a (possibly
    nested) tuple, list or dict; None when there is none.

    >>> batch_size_of(({"ids": [torch.zeros(8, 4)]}, torch.zeros(2))), batch_size_of((3,))
    (8, None)
    >>> batch_size_of((torch.zeros(12, 32),), dim=1)
    32
    """
    stack = [example_inputs]
    while stack:
        x = stack.pop(0)
        shape = getattr(x, "shape", None)
        if shape is not None and len(shape) > dim:
            return int(shape[dim])
        if isinstance(x, (list, tuple)):
            stack = list(x) + stack
        elif isinstance(x, dict):
            stack = list(x.values()) + stack
    return None


def batch_axis(x: Any, batch: int, dim: int = 0) -> int | None:
    """The dimension along which ``x`` holds the batch of ``batch`` samples: ``dim`` (the model's
    batch dimension) where it has that size, else the one other dimension of that size (a
    recurrent state passed in as ``(layers, batch, hidden)`` beside ``(batch, time)`` tokens, as
    truncated backpropagation through time does); None for a value that is not a tensor, or
    holds no dimension, or several others, of that size: given whole to every part.

    >>> batch_axis(torch.zeros(12, 32), 32, dim=1), batch_axis(torch.zeros(2, 32, 8), 32)
    (1, 1)
    >>> batch_axis(torch.zeros(12, 32), 7) is None, batch_axis(torch.zeros(3, 32, 32), 32) is None
    (True, True)
    """
    if not isinstance(x, torch.Tensor):
        return None
    if x.dim() > dim and x.shape[dim] == batch:
        return dim
    others = [d for d, size in enumerate(x.shape) if size == batch]
    return others[0] if len(others) == 1 else None


def carries_batch(x: Any, batch: int, dim: int = 0) -> bool:
    """Whether ``x`` is a tensor that holds the batch of ``batch`` samples (:func:`batch_axis`):
    the values that replicas and micro-batches cut (every other input is given whole to each).

    >>> carries_batch(torch.zeros(12, 32), 32, dim=1), carries_batch(torch.zeros(12, 32), 7)
    (True, False)
    """
    return batch_axis(x, batch, dim) is not None


def batch_slice(inputs: Any, batch: int, start: int, stop: int, dim: int = 0) -> Any:
    """Samples ``start:stop`` of every tensor that holds the batch, along the dimension that
    holds it (:func:`batch_axis`: ``dim``, or the one other of the batch's size), anywhere in ``inputs`` (nested tuples, lists, dicts: a pytree);
    every other value as it is. How replicas and micro-batches take their share (equal slices
    of the batch dimension, as DDP's sampler and ``torch.distributed.pipelining`` cut it).

    >>> batch_slice({"ids": torch.arange(8), "n": 3}, 8, 2, 4)
    {'ids': tensor([2, 3]), 'n': 3}
    >>> batch_slice(torch.arange(6).view(2, 3), 3, 1, 2, dim=1)
    tensor([[1],
            [4]])
    """
    def cut(x: Any) -> Any:
        axis = batch_axis(x, batch, dim)
        if axis is None:
            return x
        if x.layout != torch.strided:  # a sparse tensor has no strided view to narrow
            return _sparse_rows(x, axis, start, stop)
        return x.narrow(axis, start, stop - start)

    return tree_map(cut, inputs)


def _sparse_rows(x: torch.Tensor, axis: int, start: int, stop: int) -> torch.Tensor:
    """Samples ``start:stop`` of the sparse tensor ``x`` along ``axis``, in ``x``'s layout: a
    sparse tensor (a graph's adjacency, a bag of features) cannot be ``narrow``ed ("Could not
    run 'aten::as_strided' with arguments from the 'SparseCPU' backend"), a COO copy of it can.

    >>> x = torch.eye(4).to_sparse_csr()
    >>> _sparse_rows(x, 0, 1, 3).layout, _sparse_rows(x, 0, 1, 3).to_dense().tolist()
    (torch.sparse_csr, [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    """
    coo = x if x.layout == torch.sparse_coo else x.to_sparse_coo()
    rows = torch.narrow_copy(coo, axis, start, stop - start)
    return rows if x.layout == torch.sparse_coo else rows.to_sparse(layout=x.layout)


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
                    check_inputs: bool = True) -> ModelSpec:
    """Load ``path`` as a model file and return its :class:`ModelSpec`.

    ``model_args`` entries are passed as keywords to ``get_model`` / ``get_example_inputs``
    when the function accepts them; an entry neither accepts is refused. The example inputs
    are run through the model once (under ``torch.no_grad``; on fake tensors for models over
    :data:`REAL_CHECK_MAX_PARAMS` parameters) so inputs that do not fit are reported here,
    with the failing line, rather than deep inside capture. ``check_inputs=False`` skips that
    run (a worker process loading a file its parent checked); lazy modules then take their
    shapes when the model is captured (:mod:`graphs.lazy_modules`).
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


def check_batch_dim(value: object, example_inputs: tuple, what: str = "batch_dim") -> int:
    """``value`` as the inputs' batch dimension, checked against ``example_inputs``: an integer
    >= 0 that the first input tensor has. ``what`` names where it came from in the error.

    >>> check_batch_dim(1, (torch.zeros(12, 32),))
    1
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelFileError(f"{what} is {value!r}; expected the inputs' batch dimension as an integer >= 0 "
                             "(batch_dim = 1 for sequence-first inputs of shape (time, batch, ...))")
    first = next((t for _, t in _tensor_paths(example_inputs) if t.dim() > 0), None)
    if first is not None and first.dim() <= value:
        raise ModelFileError(f"{what} is {value}, but the first input tensor has shape {tuple(first.shape)} "
                             f"({first.dim()} dimension(s)); expected a dimension it has")
    return value


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
              for path, t in _tensor_paths(value, names[i] if i < len(names) else f"#{i}")]
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
        f"{_first_line(exc)}{user_location(exc)}; expected inputs that the model's forward() accepts "
        f"(got {describe_inputs(example_inputs)})")


def _tensor_paths(value: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested tuple/list/dict, with where it is below ``path`` (``batch['ids']``)."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _tensor_paths(v, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensor_paths(v, f"{path}[{k!r}]")


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


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer on exit (trial forward passes must leave no trace): its values, and its
    shape where the forward changed it (:func:`restore_buffers`)."""
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    try:
        yield
    finally:
        restore_buffers(model, saved)


def restore_buffers(model: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    """Put ``model``'s buffers back to ``saved`` (by name; others are left), shape included: a
    quantization observer sizes its per-channel ``min_val`` from ``(0,)`` to ``(channels,)`` on its
    first call, and a trial forward that left that made the parent's model another model than the
    one a worker process builds from the same file (and ``copy_`` of the saved value then failed:
    "The size of tensor a (16) must match the size of tensor b (0)").

    >>> norm = nn.BatchNorm1d(2)
    >>> saved = {n: b.clone() for n, b in norm.named_buffers()}
    >>> _ = norm(torch.randn(4, 2) + 3)
    >>> restore_buffers(norm, saved)
    >>> norm.running_mean.tolist(), int(norm.num_batches_tracked)
    ([0.0, 0.0], 0)
    """
    with torch.no_grad():
        for name, buf in list(model.named_buffers()):
            if name not in saved:
                continue
            value = saved[name]
            if buf.shape != value.shape:
                try:
                    buf.resize_(value.shape)
                except RuntimeError:  # not resizable (a view): a copy of the saved value takes its place
                    owner, _, leaf = name.rpartition(".")
                    model.get_submodule(owner)._buffers[leaf] = value.detach().clone().to(buf.device)
                    continue
            buf.copy_(value.to(buf.device) if value.device != buf.device else value)


def describe_inputs(inputs: tuple) -> str:
    """Short text for a tuple of inputs: tensor shapes and dtypes, other values by type."""
    parts = []
    for item in inputs:
        if isinstance(item, torch.Tensor):
            parts.append(f"tensor{list(item.shape)} {str(item.dtype).replace('torch.', '')}")
        else:
            parts.append(type(item).__name__)
    return "(" + ", ".join(parts) + ")"


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
            f"{_first_line(exc)}; expected every module it imports to be installed"
        ) from None
    except BaseException as exc:  # SystemExit/KeyboardInterrupt in a user file are also its failure
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ModelFileError(
            f"{file.name}{_line_in(exc, file)} raised {type(exc).__name__} while loading: "
            f"{_first_line(exc)}"
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
        raise ModelFileError(f"{what} in {label}: {_first_line(exc)}") from None
    except (Exception, SystemExit) as exc:  # sys.exit() in get_model ended placer with its message, exit 1
        raise ModelFileError(
            f"{what} in {label} raised {type(exc).__name__}: {_first_line(exc)}"
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


#: A forward parameter as placer binds inputs to it: (name, has a default, the default).
ForwardParam = tuple[str, bool, Any]


def forward_params(model: nn.Module, plain_defaults: bool = False) -> tuple[ForwardParam, ...]:
    """``model.forward``'s positional parameters as ``(name, has a default, the default)``. With
    ``plain_defaults`` a default is kept only where it is a plain constant (None, a bool, a number,
    a string: what a GraphModule can carry pickled); another counts as none.

    >>> forward_params(nn.GRU(2, 2))
    (('input', False, None), ('hx', True, None))
    """
    out = []
    for p in inspect.signature(model.forward).parameters.values():
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        keep = p.default is not p.empty and (
            not plain_defaults or p.default is None or isinstance(p.default, (bool, int, float, str)))
        out.append((p.name, keep, p.default if keep else None))
    return tuple(out)


class UnboundInput(ValueError):
    """An input :func:`bind_inputs` cannot place: keys forward() does not take by position
    (``unknown``), or a parameter without a default left out (``missing``)."""

    def __init__(self, unknown: Sequence[str] = (), missing: str = "") -> None:
        super().__init__(", ".join(unknown) or missing)
        self.unknown, self.missing = list(unknown), missing


def bind_inputs(params: Sequence[ForwardParam], args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    """``args`` and ``kwargs`` as the positional inputs of a forward with ``params``
    (:func:`forward_params`), up to the last one given, the parameters between at their defaults.

    >>> bind_inputs((("x", False, None), ("past", True, None), ("mask", True, None)), (0,), {"mask": 1})
    (0, None, 1)

    Raises:
        UnboundInput: a key no parameter after ``args`` has, or a parameter without a default left out.
    """
    names = [name for name, _, _ in params]
    unknown = [k for k in kwargs if k not in names[len(args):]]
    if unknown:
        raise UnboundInput(unknown=unknown)
    last = max([len(args) - 1, *(names.index(k) for k in kwargs)])
    values = list(args)
    for name, has_default, default in params[len(args):last + 1]:
        if name in kwargs:
            values.append(kwargs[name])
        elif has_default:
            values.append(default)
        else:
            raise UnboundInput(missing=name)
    return tuple(values)


def keyword_inputs_as_positional(model: nn.Module, inputs: Mapping[str, Any], what: str = "the inputs",
                                 targets: bool = False) -> tuple:
    """Keyword inputs (``model(**batch)``, a Hugging Face batch) as the positional tuple of
    ``model.forward``'s parameters up to the last one given, the others at their defaults: what
    placer captures, runs and splits. ``what`` names the inputs in an error.

    With ``targets`` (a loss was given), keys ``forward`` does not take are the loss's targets
    (``labels`` in a batch for a model whose ``forward`` takes ``input_ids``): they follow every
    positional parameter of ``forward`` (each at its value or default), in the dict's order
    (:mod:`graphs.loss_targets`). A ``forward(..., **kwargs)`` does not receive them: a captured
    graph takes its parameters by position, and Hugging Face's ``Trainer`` likewise drops the
    batch keys ``forward`` does not name (``remove_unused_columns``); a warning names them.

    >>> class Net(nn.Module):
    ...     def forward(self, input_ids, past=None, attention_mask=None):
    ...         return input_ids
    >>> keyword_inputs_as_positional(Net(), {"attention_mask": 1, "input_ids": 0})
    (0, None, 1)
    >>> keyword_inputs_as_positional(Net(), {"input_ids": 0, "labels": 7}, targets=True)
    (0, None, None, 7)
    """
    params = forward_params(model)
    if not inputs:
        raise ModelFileError(f"{what} is an empty dict; expected the model's inputs by parameter name")
    names = [name for name, _, _ in params]
    extra = [k for k in inputs if k not in names]
    takes_keywords = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())
    try:
        if targets and extra:
            if takes_keywords:
                log.warning("%s: %s not parameters of forward() of %s; they go to the loss as its targets, not into "
                            "forward's **kwargs (a captured graph takes the parameters forward() names)", what,
                            ", ".join(repr(k) for k in extra) + (" is" if len(extra) == 1 else " are"),
                            type(model).__name__)
            # every parameter bound, at its value or default: the targets come after them all
            known = {k: v for k, v in inputs.items() if k in names}
            values = bind_inputs(params, (), known) if known else ()
            values += tuple(_default_of(param) for param in params[len(values):])
            return (*values, *(inputs[k] for k in extra))
        return bind_inputs(params, (), inputs)
    except UnboundInput as exc:
        if exc.unknown:
            hint = "" if targets else (", or, if they are the loss's targets, a loss that uses them (get_loss(output, "
                                       "*inputs) in a model file, loss_fn in the API) receives them after forward's")
            raise ModelFileError(
                f"{what} name {', '.join(repr(k) for k in exc.unknown)}, which forward() of {type(model).__name__} "
                f"does not take by position (its parameters: {', '.join(name for name, _, _ in params)}); "
                f"expected keys that are parameters of forward(){hint}") from None
        raise ModelFileError(f"{what} leave out {exc.missing!r}, a parameter of forward() without a default; "
                             "expected every such parameter") from None


def _default_of(param: ForwardParam) -> Any:
    """The default of a forward parameter left out, or :class:`UnboundInput` where it has none."""
    name, has_default, default = param
    if not has_default:
        raise UnboundInput(missing=name)
    return default


def positional_inputs(model: nn.Module, inputs: Any, what: str = "the inputs", targets: bool = False) -> tuple:
    """The model's positional inputs: a tuple as is, a dict by ``forward``'s parameter names bound
    to them (:func:`keyword_inputs_as_positional`, with its ``targets``), anything else (one
    tensor) as a 1-tuple.

    >>> positional_inputs(nn.GRU(2, 2), {"input": 0}), positional_inputs(nn.GRU(2, 2), 0)
    ((0,), (0,))
    """
    if isinstance(inputs, Mapping):
        return keyword_inputs_as_positional(model, inputs, what, targets)
    return inputs if isinstance(inputs, tuple) else (inputs,)


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


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

