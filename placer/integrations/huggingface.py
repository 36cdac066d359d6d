"""Hugging Face Trainer: place a model and set ``hf_device_map`` before the Trainer is built.

Example::

    model = AutoModelForCausalLM.from_pretrained(...)
    model = place_for_trainer(model, (input_ids,), devices="cpu,cuda:0", budget="1m")
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[StepTimeCallback()])
    trainer.train()

The Trainer reads ``model.hf_device_map``: with more than one accelerator in it, it runs
the model as is (model-parallel) instead of moving it to one device. The placement must be
module-aligned (every module with parameters on one device): it is written as a
``device_map`` (module path → real device), each mapped module is moved to its device and
gets a forward pre-hook that moves its inputs there, so the model stays the user's
``PreTrainedModel`` (same ``forward`` with keyword arguments, ``save_pretrained``, ...).
The dispatched model is checked against the original on the example batch before it is
returned. The Trainer counts only accelerators in ``hf_device_map``: for a placement over
the CPU and ONE GPU, pass ``TrainingArguments(place_model_on_device=False)`` (a warning says
so), or it moves the whole model onto the GPU. ``StepTimeCallback`` times each training step (CUDA synchronised) and adds the
median to the Trainer's logs. transformers is needed only for ``StepTimeCallback``.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from envs.runtime.device_map import placement_device_map
from envs.runtime.transfers import to_device
from graphs.random_state import kept_random_state
from placer.integrations.loop import IntegrationError, as_inputs, find_placement
from placer.optimizing.config import ClusterSource
from placer.search.budget import DEFAULT_BUDGET, BudgetLike

log = logging.getLogger(__name__)


def dispatch(model: torch.nn.Module, device_map: Mapping[str, str]) -> list[Any]:
    """Move each mapped module to its device and move its inputs there on every call.

    Returns the hook handles (``handle.remove()`` undoes the input moves, not the parameter moves).
    """
    handles = []
    for path, device in device_map.items():
        module = model.get_submodule(path)
        module.to(device)

        def move_inputs(mod: torch.nn.Module, args: tuple, kwargs: dict, _dev: str = device) -> tuple:
            return to_device(args, _dev), to_device(kwargs, _dev)

        handles.append(module.register_forward_pre_hook(move_inputs, with_kwargs=True))
    return handles


def _outputs_match(a: Any, b: Any) -> bool:
    flat_a = [t for t in torch.utils._pytree.tree_leaves(a) if isinstance(t, torch.Tensor)]
    flat_b = [t for t in torch.utils._pytree.tree_leaves(b) if isinstance(t, torch.Tensor)]
    return len(flat_a) == len(flat_b) and all(
        torch.allclose(x.detach().cpu().float(), y.detach().cpu().float(), rtol=1e-4, atol=1e-5)
        for x, y in zip(flat_a, flat_b)
    )


@kept_random_state()
def place_for_trainer(model: torch.nn.Module, example_batch: Any, *, cluster: ClusterSource | None = None,
                      devices: str | Sequence[str] | None = None, memory: str | Mapping[str, Any] | None = None,
                      budget: BudgetLike = DEFAULT_BUDGET, cache_dir: str | os.PathLike | None = None,
                      seed: int = 0, check: bool = True) -> torch.nn.Module:
    """Place ``model`` (in place) for a Hugging Face ``Trainer`` and set ``model.hf_device_map``.

    Args:
        model: the model (e.g. a ``PreTrainedModel``); it is modified and returned.
        example_batch: the inputs to capture it with: positional, ``model(*example_batch)``, or a
            batch as the Trainer gives it, a dict by ``forward``'s parameter names.
        cluster, devices, memory, budget, cache_dir, seed: as :func:`placer.place`
            (searched once, then cached per model and device list).
        check: compare the dispatched model's outputs on the example batch with the original's.

    Raises:
        IntegrationError: the placement is not module-aligned (no device_map), or the
            dispatched model does not compute what the original does.
    """
    inputs = as_inputs(example_batch, model)
    captured, cluster_, info = find_placement(model, inputs, cluster=cluster, devices=devices, memory=memory,
                                              budget=budget, cache_dir=cache_dir, seed=seed)
    real = cluster_.real_device_map()
    device_map = placement_device_map(captured.graph, {n: real[d] for n, d in info.placement.assignment.items()})
    if device_map is None:
        raise IntegrationError(
            "the placement found splits a module's parameters across devices, so it has no device_map "
            "for the Trainer; use placer.place(model, batch) (a GraphModule) in a custom loop instead"
        )
    was_training = model.training
    model.eval()
    with torch.no_grad():
        expected = model(*inputs) if check else None
    dispatch(model, device_map)
    if check:
        with torch.no_grad():
            got = model(*inputs)
        if not _outputs_match(expected, got):
            raise IntegrationError(
                f"the model dispatched with device_map {device_map} does not reproduce its outputs "
                "(parameter-free glue between modules on different devices); use placer.place instead"
            )
    model.train(was_training)
    # New attributes of the user's module (setattr: nn.Module's typing reserves attributes for tensors).
    setattr(model, "hf_device_map", dict(device_map))  # noqa: B010
    setattr(model, "placer_place_info", info)  # noqa: B010
    accelerators = {d for d in device_map.values() if d not in ("cpu", "disk")}
    if "cpu" in device_map.values() and len(accelerators) == 1:
        # The Trainer counts only accelerators: with one it would move the whole model onto it.
        log.warning("the placement computes on the CPU and %s; build the Trainer with "
                    "TrainingArguments(place_model_on_device=False) or it moves the model onto %s",
                    next(iter(accelerators)), next(iter(accelerators)))
    return model


def _make_callback_class() -> type:
    from transformers import TrainerCallback

    class StepTimeCallback(TrainerCallback):
        """Times each training step (CUDA synchronised); adds ``step_time_ms`` (median so far) to the logs
        and to ``trainer.state.log_history``.

        ``callback.times`` holds every step's wall seconds.
        """

        def __init__(self) -> None:
            self.times: list[float] = []
            self._start: float | None = None

        @staticmethod
        def _sync() -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._sync()
            self._start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self._start is not None:
                self._sync()
                self.times.append(time.perf_counter() - self._start)
                self._start = None

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if not self.times:
                return
            value = round(statistics.median(self.times) * 1e3, 3)
            if logs is not None:
                logs["step_time_ms"] = value  # seen by the reporting callbacks after this one
            if state.log_history:
                # The Trainer appended a copy of ``logs`` before calling callbacks: record it there too.
                state.log_history[-1]["step_time_ms"] = value

    return StepTimeCallback


def __getattr__(name: str) -> Any:
    # transformers is imported only when the callback is asked for.
    if name == "StepTimeCallback":
        cls = _make_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
