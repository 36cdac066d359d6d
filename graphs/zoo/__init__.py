"""The model zoo: the benchmark models of the device-placement literature as model files.

Each ``graphs/zoo/<name>.py`` is a valid model file (``get_model(size)``,
``get_example_inputs(size)``, ``get_loss(output, *inputs)``) with two sizes: ``"small"``
(tiny widths, captures in about a second, for tests) and ``"paper"`` (the published
configuration, for benchmarks). Extra keyword arguments such as ``layers=8`` for NMT
override single fields of a preset.
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Any

from graphs.errors import ModelFileError

if TYPE_CHECKING:  # the loader lives in a sibling module; imported lazily at call time
    from graphs.model_file import ModelSpec

ZOO_MODELS: tuple[str, ...] = ("inception_v3", "resnet50", "nmt", "rnnlm", "gpt2", "moe")
ZOO_DIR = pathlib.Path(__file__).resolve().parent


def zoo_path(name: str) -> pathlib.Path:
    """Path of the model file of zoo model ``name`` (one of :data:`ZOO_MODELS`)."""
    if name not in ZOO_MODELS:
        raise ModelFileError(f"unknown zoo model {name!r}; expected one of {', '.join(ZOO_MODELS)}")
    return ZOO_DIR / f"{name}.py"


def load_zoo_model(name: str, size: str = "small", **model_args: Any) -> "ModelSpec":
    """Load zoo model ``name`` at ``size`` through the model-file loader; returns its ``ModelSpec``.

    ``model_args`` (e.g. ``layers=4``) are passed on to the model file's functions that accept them.
    """
    from graphs.model_file import load_model_file

    return load_model_file(zoo_path(name), model_args={"size": size, **model_args})
