"""One call from a model source to a costed, grouped placement graph: load → capture → profile → group."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphs.capture import CapturedModel, capture
from graphs.errors import ModelFileError
from graphs.grouping import Grouping, group_graph
from graphs.model_file import ModelSpec, load_model_file
from graphs.profile.batch_scaling import profile_fixed_parts
from graphs.profile.profiler import profile_graph

ZOO_PREFIX = "zoo:"


@dataclass
class Prepared:
    """The result of :func:`prepare`: the loaded model, its capture and its grouping."""

    spec: ModelSpec
    captured: CapturedModel
    grouping: Grouping
    seconds: dict[str, float] = field(default_factory=dict)


def load_source(source: str | os.PathLike[str] | ModelSpec, model_args: Mapping[str, Any] | None = None) -> ModelSpec:
    """A ModelSpec from a model-file path, ``"zoo:<name>"``, or a ModelSpec (returned as is)."""
    if isinstance(source, ModelSpec):
        if model_args:
            raise ModelFileError(
                f"model arguments ({', '.join(sorted(model_args))}) cannot be applied to a ModelSpec "
                "that is already built; pass a model file path or 'zoo:<name>' instead"
            )
        return source
    if isinstance(source, (str, Path)):
        text = str(source)
        if not text.strip():  # Path("") is ".": "model file '.' is a directory"
            raise ModelFileError("the model is empty; expected a model file path (.py) or 'zoo:<name>'")
        if text.startswith(ZOO_PREFIX):
            from graphs.zoo import zoo_path

            spec = load_model_file(zoo_path(text[len(ZOO_PREFIX):]), model_args)
            return spec
        return load_model_file(text, model_args)
    raise ModelFileError(
        f"cannot prepare a {type(source).__name__}; expected a model file path, 'zoo:<name>' "
        "or a ModelSpec"
    )


def prepare(source: str | os.PathLike[str] | ModelSpec, model_args: Mapping[str, Any] | None = None,
            profile: bool = True, devices: Sequence[str] | None = None,
            cache_dir: str | os.PathLike[str] | None = None, leaf_modules: Iterable[Any] = (),
            microbatch_profile: bool = False) -> Prepared:
    """Load, capture, (optionally) profile and group a model.

    ``profile=False`` leaves the time dicts empty (grouping then merges by structure only).
    ``devices``/``cache_dir`` go to :func:`graphs.profile.profiler.profile_graph`.
    ``microbatch_profile=True`` (with ``profile``) also profiles the model on a micro-batch
    and stores each op's fixed part (:func:`graphs.profile.batch_scaling.profile_fixed_parts`:
    what pipelines and DDP over CPU processes are simulated with). ``Prepared.seconds``
    records the wall time of each stage (load, capture, profile, microbatch_profile, group).
    """
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    spec = load_source(source, model_args)
    seconds["load"] = time.perf_counter() - start

    start = time.perf_counter()
    captured = capture(spec.model, spec.example_inputs, leaf_modules=leaf_modules, name=spec.name,
                       loss_fn=spec.loss_fn, batch_dim=spec.batch_dim)
    seconds["capture"] = time.perf_counter() - start

    if profile:
        start = time.perf_counter()
        profile_graph(captured, spec.example_inputs, devices=devices,
                      cache_dir=None if cache_dir is None else str(cache_dir),
                      optimizer_fn=spec.optimizer_fn)  # node costs include the model's own optimizer step
        seconds["profile"] = time.perf_counter() - start
        if microbatch_profile:
            start = time.perf_counter()
            profile_fixed_parts(captured, spec.example_inputs, devices=devices,
                                cache_dir=None if cache_dir is None else str(cache_dir), batch_dim=spec.batch_dim)
            seconds["microbatch_profile"] = time.perf_counter() - start

    start = time.perf_counter()
    # The GraphModule lets grouping see in-place arguments and modules the graph does not record.
    grouping = group_graph(captured.graph, gm=captured.gm)
    seconds["group"] = time.perf_counter() - start
    return Prepared(spec=spec, captured=captured, grouping=grouping, seconds=seconds)
