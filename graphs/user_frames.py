"""Finding the user's line in an exception raised from deep inside torch.

When a model cannot be loaded, run or traced, the useful part of the traceback is the
deepest frame in the *model's* code (the user's file, a zoo file, or a library model
such as transformers) — not the dozens of torch.fx / torch.export frames below it.
"""

from __future__ import annotations

import inspect
import os
import sysconfig
import traceback
from pathlib import Path

import torch
from torch import nn

import graphs

_TORCH_DIR = os.path.dirname(torch.__file__)
_GRAPHS_DIR = os.path.dirname(graphs.__file__)
_ZOO_DIR = os.path.join(_GRAPHS_DIR, "zoo")
# placer's other layers, beside graphs wherever it is installed (found by path: graphs imports
# neither); a user's loss is called from envs, and that frame is not the user's
_OWN_DIRS = tuple(os.path.join(os.path.dirname(_GRAPHS_DIR), layer) for layer in ("envs", "placer"))
_STDLIB_DIR = sysconfig.get_paths()["stdlib"]
_SITE_DIRS = tuple({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})


def is_user_file(filename: str) -> bool:
    """True for model code: not torch, not placer's own packages (graphs' zoo excepted), not stdlib."""
    if filename.startswith("<frozen") or filename.startswith("<string>"):
        return False
    path = os.path.abspath(filename)
    if path.startswith(_TORCH_DIR + os.sep):
        return False
    if path.startswith(_GRAPHS_DIR + os.sep) and not path.startswith(_ZOO_DIR + os.sep):
        return False
    if path.startswith(tuple(d + os.sep for d in _OWN_DIRS)):
        return False
    if path.startswith(_STDLIB_DIR + os.sep) and not path.startswith(_SITE_DIRS):
        return False
    return True


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, then its causes/contexts (no cycles)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The deepest traceback frame in model code, searching the exception then its causes."""
    for link in _chain(exc):
        frames = [f for f in traceback.extract_tb(link.__traceback__) if is_user_file(f.filename)]
        if frames:
            return frames[-1]
    return None


def describe_frame(frame: traceback.FrameSummary) -> str:
    """``file.py:12 in forward: code text`` (code omitted when the source is unavailable)."""
    code = f": {frame.line.strip()}" if frame.line else ""
    return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}{code}"


def user_location(exc: BaseException) -> str:
    """`` (at file.py:N in fn: code)`` for the deepest traceback frame in model code, or ``""``."""
    frame = user_frame(exc)
    return f" (at {describe_frame(frame)})" if frame is not None else ""


def user_frame_calling(exc: BaseException, callee_file: str) -> traceback.FrameSummary | None:
    """The model-code frame that called into ``callee_file`` (a path ending, such as
    ``"torch/nn/utils/rnn.py"``) on the way to ``exc``, searching the exception then its causes."""
    for link in _chain(exc):
        last_user: traceback.FrameSummary | None = None
        for frame in traceback.extract_tb(link.__traceback__):
            if Path(frame.filename).as_posix().endswith(callee_file) and last_user is not None:
                return last_user
            if is_user_file(frame.filename):
                last_user = frame
    return None


def modules_running(model: nn.Module, frame: traceback.FrameSummary) -> list[str]:
    """Paths of ``model``'s modules (``""``: the model itself) whose class's ``forward`` holds the
    line of ``frame``, so that a capture error can name what to keep whole; empty when none does
    (a helper function's line)."""
    paths = []
    for path, module in model.named_modules():
        # every forward along the class's bases: a subclass may call its base's (the view of
        # graphs.loss_targets calls the model's own)
        forwards = [cls.__dict__["forward"] for cls in type(module).__mro__ if "forward" in cls.__dict__]
        if any(_holds_line(forward, frame) for forward in forwards):
            paths.append(path)
    return paths


def _holds_line(function: object, frame: traceback.FrameSummary) -> bool:
    code = getattr(function, "__code__", None)
    if code is None or frame.name != code.co_name or Path(code.co_filename) != Path(frame.filename):
        return False
    try:
        lines, start = inspect.getsourcelines(function)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return False
    return frame.lineno is not None and start <= frame.lineno < start + len(lines)
