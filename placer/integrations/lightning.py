"""PyTorch Lightning: ``PlacerCallback`` places a LightningModule's network when fitting starts.

Lightning is optional (``pip install lightning``); this module imports it on first use.

Lightning's strategy moves the whole LightningModule to one device and builds the
optimizers during setup, before ``on_fit_start``. The callback then captures the network
held in ``pl_module.<attr>`` (default ``"model"``), applies the placement to the captured
graph *in place* - the graph shares the network's parameter objects, which move device
with ``param.data = ...`` - and puts the placed GraphModule back in ``pl_module.<attr>``.
The parameter objects, their qualified names (``model.0.weight``) and so the optimizers
Lightning built all stay valid; optimizer state (e.g. restored from a checkpoint) is
moved along. With ``tune=True`` a :class:`~placer.integrations.tuner.PlacementTuner`
tries candidates during the first ``trials`` training batches (timed from
``on_train_batch_start`` to ``on_train_batch_end``, i.e. forward, backward and optimizer step).

Example::

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(...)
        def training_step(self, batch, i):
            x, y = batch
            return F.cross_entropy(self.model(x), y)
        ...

    trainer = L.Trainer(max_steps=100, callbacks=[PlacerCallback((x,), cluster="4xK40")])
    trainer.fit(Net(), loader)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from envs.hardware.cluster import Cluster
from envs.runtime.apply import apply_placement
from placer.integrations.loop import IntegrationError, as_inputs, cluster_for, find_placement
from placer.integrations.tuner import PlacementTuner, move_optimizer_state
from placer.optimizing.config import ClusterSource
from placer.search.budget import DEFAULT_BUDGET, BudgetLike, parse_budget

try:  # Lightning 2.x ships as ``lightning``; the older ``pytorch_lightning`` has the same Callback.
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - depends on the installed extra
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError(
            "placer.integrations.lightning needs PyTorch Lightning: pip install lightning"
        ) from exc


def _output_device(cluster: Cluster, module_device: torch.device) -> str:
    """The cluster device whose real device is where Lightning put the module (so the loss sees no change)."""
    wanted = str(module_device)
    for name, real in cluster.real_device_map().items():
        if str(torch.device(real)) == wanted or (wanted == "cuda" and real.startswith("cuda")):
            return name
    return cluster.device_names[0]


class PlacerCallback(Callback):
    """Place ``pl_module.<attr>`` over several devices at fit start; optionally tune online.

    Args:
        example_batch: the network's inputs, ``net(*example_batch)``, or a dict by ``forward``'s
            parameter names (``net(**batch)``).
        attr: the LightningModule attribute holding the network to place.
        cluster, devices, memory, budget, cache_dir: as :func:`placer.place` (the placement
            is cached per model and device list).
        tune: run a :class:`PlacementTuner` over the first ``trials`` batches instead of
            applying one searched placement.
        trials, candidates: the tuner's (see :class:`PlacementTuner`).
        output_device: where the network's outputs are gathered (default: the device
            Lightning placed the module on, so ``training_step``'s loss code is unchanged).
        leaf_modules: modules kept as one op, as :func:`placer.place` takes them.
        batch_dim: the inputs' batch dimension, as :func:`placer.place` takes it.

    After fitting starts, ``callback.placed`` is the placed GraphModule, ``callback.info`` the
    :class:`~placer.integrations.loop.PlaceInfo` (without tuning) and ``callback.tuner`` the tuner.
    """

    def __init__(self, example_batch: Any, *, attr: str = "model", cluster: ClusterSource | None = None,
                 devices: str | Sequence[str] | None = None, memory: str | Mapping[str, Any] | None = None,
                 budget: BudgetLike = DEFAULT_BUDGET, cache_dir: str | os.PathLike | None = None,
                 tune: bool = False, trials: int = 12, candidates: Any = 4,
                 output_device: str | None = None, seed: int = 0,
                 leaf_modules: Sequence[str | type[torch.nn.Module]] = (), batch_dim: int = 0) -> None:
        super().__init__()
        # A bad cluster, device list, memory cap or budget is refused here, where the callback is
        # written, not when fit() starts (after the data loaders and the model were set up).
        cluster_for(cluster, devices, memory)
        parse_budget(budget)
        self.example_batch = example_batch
        self.batch_dim = batch_dim
        self.attr = attr
        self.cluster, self.devices, self.memory = cluster, devices, memory
        self.budget, self.cache_dir, self.seed = budget, cache_dir, seed
        self.tune, self.trials, self.candidates = tune, trials, candidates
        self.output_device = output_device
        self.leaf_modules = tuple(leaf_modules)
        self.placed: torch.fx.GraphModule | None = None
        self.info = None
        self.tuner: PlacementTuner | None = None

    def _network(self, pl_module: Any) -> torch.nn.Module:
        net = getattr(pl_module, self.attr, None)
        if not isinstance(net, torch.nn.Module):
            raise IntegrationError(
                f"PlacerCallback(attr={self.attr!r}): the LightningModule has no submodule {self.attr!r}; "
                "keep the network to place in an attribute (e.g. self.model = nn.Sequential(...)) and name it"
            )
        return net

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Place the network now: after the strategy moved the module and built the optimizers."""
        net = self._network(pl_module)
        inputs = tuple(x.to(pl_module.device) if isinstance(x, torch.Tensor) else x
                       for x in as_inputs(self.example_batch, net))
        if self.tune:
            from placer.integrations.loop import cluster_for

            cluster = cluster_for(self.cluster, self.devices, self.memory)
            self.tuner = PlacementTuner(
                net, inputs, cluster=cluster, trials=self.trials, candidates=self.candidates,
                budget=self.budget, share_parameters=True, seed=self.seed,
                output_device=self.output_device or _output_device(cluster, pl_module.device),
                leaf_modules=self.leaf_modules, batch_dim=self.batch_dim,
            )
            self.placed = self.tuner.model
        else:
            captured, cluster, self.info = find_placement(
                net, inputs, cluster=self.cluster, devices=self.devices, memory=self.memory,
                budget=self.budget, cache_dir=self.cache_dir, seed=self.seed, leaf_modules=self.leaf_modules,
                batch_dim=self.batch_dim,
            )
            # In place on the capture, whose parameters ARE the network's: the optimizers stay valid.
            self.placed = apply_placement(
                captured, self.info.placement.assignment, inplace=True,
                output_device=self.output_device or _output_device(cluster, pl_module.device),
                real_devices=cluster.real_device_map(),
            )
        for opt in trainer.optimizers:
            move_optimizer_state(opt)
        setattr(pl_module, self.attr, self.placed)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Start timing the step (and apply the tuner's pending switch)."""
        if self.tuner is not None:
            self.tuner.begin_step(trainer.optimizers)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Record the step time (the optimizer has stepped by now)."""
        if self.tuner is not None:
            self.tuner.end_step()
