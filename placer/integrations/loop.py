"""``placer.place``: a placed model for a plain PyTorch training loop, searched once and cached.

Example::

    import placer
    placed = placer.place(model, (x,), cluster="4xK40", budget="30s")   # default budget: 2 minutes
    optimizer = torch.optim.SGD(placed.parameters(), lr=0.1)   # built on the placed model
    for x, y in data:
        optimizer.zero_grad()
        loss_fn(placed(x), y).backward()
        optimizer.step()

The first call searches (``placer.optimize``: baselines, then the agent, through the
simulator) and writes the winner to the placement cache; a later call for the same model
(same fingerprint: structure, parameter shapes, input shapes) on the same devices loads it
and searches nothing. The cache directory is ``cache_dir``, else ``$PLACER_CACHE_DIR/placements``,
else ``~/.cache/placer/placements``. ``placed.placer_place_info`` says which happened.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from envs.hardware.cluster import Cluster
from envs.hardware.rank_devices import is_distributed_cluster
from envs.runtime.apply import apply_placement
from graphs.capture import CapturedModel, capture
from graphs.errors import PlacerError
from graphs.fingerprint import computation_key
from graphs.forward_inputs import positional_inputs
from graphs.input_batch import check_batch_dim
from graphs.inputs_fit import check_inputs_fit
from graphs.model_file import model_and_inputs
from graphs.random_state import kept_random_state
from placer.optimizing.config import ClusterSource
from placer.optimizing.devices import resolve_cluster
from placer.options import OptionError
from placer.out_dir import check_placement_cache_dir
from placer.placement_file import Placement, PlacementFileError, load_placement, save_placement
from placer.search.budget import DEFAULT_BUDGET, BudgetLike

if TYPE_CHECKING:
    from placer.result import OptimizeResult

log = logging.getLogger(__name__)


class IntegrationError(PlacerError, ValueError):
    """Bad arguments to one of the training-loop integrations."""


@dataclass(frozen=True)
class PlaceInfo:
    """How :func:`place` got its placement (attached to the placed model as ``placer_place_info``).

    Attributes:
        cache_hit: True when the placement was loaded from the cache (no search ran).
        cache_path: the cache file read or written (None when caching is off).
        fingerprint: the model's fingerprint.
        cluster: the cluster's name; ``simulated`` whether it is a simulated cluster spec (on real
            devices the step time may still be simulated: ``source`` says).
        step_time: the placement's step time in seconds when known (simulated or measured, see ``source``).
        source: ``"simulated"`` or ``"measured"``.
        method: the method that found it (e.g. ``"placer (hierarchical)"``, ``"m_etf"``).
        placement: the op-level placement.
    """

    cache_hit: bool
    cache_path: Path | None
    fingerprint: str
    cluster: str
    simulated: bool
    step_time: float | None
    source: str
    method: str
    placement: Placement


def default_cache_dir() -> Path:
    """``$PLACER_CACHE_DIR/placements`` when set, else ``~/.cache/placer/placements``."""
    root = os.environ.get("PLACER_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "placer"
    return base / "placements"


def as_inputs(example_batch: Any, model: torch.nn.Module) -> tuple:
    """The model's positional inputs (:func:`graphs.forward_inputs.positional_inputs`: a dict is a
    Hugging Face batch, ``model(**batch)``); an IntegrationError where there is none."""
    return positional_inputs(model, _given(example_batch), "the example batch")


def model_and_batch(example_batch: Any, model: torch.nn.Module, loss_fn: Callable | None) -> tuple[torch.nn.Module, tuple]:
    """The model as placer captures it and its positional inputs, where with a ``loss_fn`` the batch
    may end with the loss's targets, as :func:`placer.optimize` takes them (the placed model takes
    them too, each defaulting to None, and ignores them; :func:`graphs.model_file.model_and_inputs`);
    an IntegrationError where there is no batch."""
    return model_and_inputs(model, _given(example_batch), loss_fn is not None, "the example batch")


def _given(example_batch: Any) -> Any:
    if example_batch is None:
        raise IntegrationError("an example batch is needed (the model's inputs, as model(*example_batch))")
    return example_batch


def cluster_for(cluster: ClusterSource | None = None, devices: str | Sequence[str] | None = None,
                memory: str | Mapping[str, Any] | None = None) -> Cluster:
    """The devices to place on (see :func:`placer.optimizing.devices.resolve_cluster`)."""
    if isinstance(cluster, Cluster) and devices is None and memory is None:
        return cluster
    return resolve_cluster(devices=devices, cluster=cluster, memory=memory)


def cache_key(fingerprint: str, cluster: Cluster, computation: str = "") -> str:
    """File stem for a model on a device list: fingerprint + hash of (device name, real device)
    pairs and of ``computation`` (:func:`graphs.fingerprint.computation_key`).

    The real devices are part of the key: a ``4xK40`` placement mapped onto the CPU here
    and onto four GPUs elsewhere applies to different hardware. So is what the ops compute:
    the same model with its backbone frozen (or unfrozen) holds other memory, and a placement
    searched for the frozen one may not fit the other.
    """
    devices = [[name, real] for name, real in cluster.real_device_map().items()]
    digest = hashlib.sha256(json.dumps({"devices": devices, "computation": computation},
                                       sort_keys=True).encode()).hexdigest()[:12]
    return f"{fingerprint}-{digest}"


def _capture(model: torch.nn.Module, inputs: tuple, leaf_modules: Sequence[Any] = (), batch_dim: int = 0) -> CapturedModel:
    # Inputs the model cannot take are named as such, before a tracer reports them as its own failure.
    check_inputs_fit(model, inputs, type(model).__name__)
    return capture(model, inputs, leaf_modules=leaf_modules, name=type(model).__name__,
                   batch_dim=check_batch_dim(batch_dim, inputs))


def _read_cache(path: Path, captured: CapturedModel, cluster: Cluster) -> Placement | None:
    if not path.exists():
        return None
    try:
        return load_placement(path, graph=captured, devices=cluster.device_names)
    except PlacementFileError as exc:
        # Our own cache file: a stale or damaged one is searched again and overwritten, not fatal.
        log.warning("ignoring cached placement %s (%s); searching again", path, exc)
        return None


def _check_in_process(result: OptimizeResult, assignment: Mapping[str, str], cluster: Cluster) -> None:
    """Train ``assignment`` beside the original model as optimize checks its winner.

    Raises:
        PlacerError: it computes something else.
    """
    from envs.runtime.check import check_placement

    prepared = result.prepared
    report = check_placement(prepared.spec, prepared.captured, assignment, real_devices=cluster.real_device_map())
    if not report.placement_ok:
        raise PlacerError(f"the applied placement does not compute the same thing: {report.describe()}")


@dataclass(frozen=True)
class InProcessPlacement:
    """A placement that runs in this process (no pipeline): its method, op assignment, group
    row and simulated step time (the batched simulator's, as ``show`` gives it)."""

    method: str
    assignment: dict[str, str]
    row: np.ndarray
    step_time: float


def in_process_placements(result: OptimizeResult, k: int) -> list[InProcessPlacement]:
    """The ``k`` distinct fitting placements of ``result``'s methods with the lowest simulated
    step time when applied in one process, fastest first.

    A pipelined placement (micro-batches, replicas) needs one process per stage
    (``torch.distributed.pipelining``); :func:`place` and the tuner return a module for this
    process, where its stages would run one after the other on the whole batch. So every
    method's placement, a pipeline's stage devices included, is ranked here by its
    un-pipelined step (:func:`envs.sim.simulator.simulate_batch`), not by the pipeline's.
    Placements that differ only by interchangeable devices (the whole model on gpu0 or on gpu2
    of four identical GPUs: :mod:`envs.sim.device_symmetry`) are one placement here: trying
    both on real steps would spend a step on a twin.
    """
    from envs.sim.device_symmetry import canonical_row, device_classes
    from envs.sim.simulator import simulate_batch

    problem, grouping = result.problem, result.prepared.grouping
    found = [c for c in result.candidates if c.row is not None]
    if not found:
        raise IntegrationError("no method found a placement that fits in device memory")
    rows = np.stack([np.asarray(c.row, dtype=np.int64) for c in found])
    sim = simulate_batch(problem, rows)
    order = np.argsort(np.where(sim.fits, sim.step_time, np.inf), kind="stable")
    kinds = dict(zip(result.table["method"], result.table["kind"]))
    pipelined = {m for m, kind in kinds.items() if kind != "placement"}
    chosen: list[InProcessPlacement] = []
    seen: set[bytes] = set()
    classes = device_classes(problem)
    for i in order:
        if not sim.fits[i] or len(chosen) >= k:
            continue
        key = canonical_row(rows[i], classes).tobytes()
        if key in seen:  # several methods often find the same placement (or a twin): keep it once
            continue
        seen.add(key)
        assignment = grouping.expand(problem.array_to_placement(rows[i]))
        method = found[int(i)].method
        if method in pipelined:  # say that what runs here is not the pipeline the method found
            method += ", un-pipelined"
        chosen.append(InProcessPlacement(method, assignment, rows[i].copy(), float(sim.step_time[i])))
    if not chosen:
        raise IntegrationError("no method found a placement that fits in device memory")
    return chosen


@kept_random_state()
def find_placement(
    model: torch.nn.Module,
    example_batch: Any,
    *,
    cluster: ClusterSource | None = None,
    devices: str | Sequence[str] | None = None,
    budget: BudgetLike = DEFAULT_BUDGET,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    memory: str | Mapping[str, Any] | None = None,
    loss_fn: Callable | None = None,
    optimizer_fn: Callable | None = None,
    seed: int = 0,
    check: bool = True,
    verbose: int = 0,
    leaf_modules: Sequence[str | type[torch.nn.Module]] = (),
    batch_dim: int = 0,
) -> tuple[CapturedModel, Cluster, PlaceInfo]:
    """The placement :func:`place` applies (cached or searched), with the capture and cluster used."""
    if not isinstance(model, torch.nn.Module):
        raise IntegrationError(f"expected a torch.nn.Module to place, got {type(model).__name__}")
    taken, inputs = model_and_batch(example_batch, model, loss_fn)
    the_cluster = cluster_for(cluster, devices, memory)
    captured = _capture(taken, inputs, leaf_modules, batch_dim)
    path = None
    if use_cache:
        folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        path = folder / f"{cache_key(captured.fingerprint, the_cluster, computation_key(captured.gm))}.json"
        cached = _read_cache(path, captured, the_cluster)
        if cached is not None:
            meta = cached.metadata
            info = PlaceInfo(True, path, captured.fingerprint, the_cluster.name, the_cluster.simulated,
                             meta.get("step_time"), str(meta.get("source", "")), str(meta.get("method", "")),
                             cached)
            return captured, the_cluster, info
        check_placement_cache_dir(folder)

    from placer.optimizing.run import optimize

    result = optimize(model, inputs, cluster=the_cluster, budget=budget, loss_fn=loss_fn,
                      optimizer_fn=optimizer_fn, seed=seed, check=check, progress=False, verbose=verbose,
                      leaf_modules=leaf_modules, batch_dim=batch_dim)
    if result.search is not None and result.search.stop_reason == "interrupted":
        # The search stops early on Ctrl-C so that optimize can write what it found; inside a
        # training script that swallowed the interrupt: the script trained on, the half-searched
        # placement cached as if finished. The interrupt is the user's: it goes on up.
        log.warning("placement search interrupted: nothing cached")
        raise KeyboardInterrupt
    placement, step_time, method = result.placement, result.step_time, result.winner
    if placement.pipeline is not None:
        # Applied in this process, a pipeline's stages would run one after the other on the
        # whole batch: the best placement this process can run instead (in_process_placements).
        best = in_process_placements(result, 1)[0]
        log.info("the fastest placement (%s, %.3f ms) is %s, which needs one process per device; "
                 "placing the fastest one-process placement instead: %s, %.3f ms", result.winner,
                 result.step_time * 1e3, placement.pipeline.describe(), best.method, best.step_time * 1e3)
        placement = Placement(best.assignment, placement.fingerprint, list(placement.devices),
                              {**placement.metadata, "step_time": best.step_time, "source": "simulated",
                               "method": best.method})
        step_time, method = best.step_time, best.method
        if check and best.assignment != result.placement.assignment:
            # optimize checked the pipeline's assignment, not this one, which is what gets applied
            # (and cached): a placement that computed something else was handed over unchecked.
            _check_in_process(result, best.assignment, the_cluster)
    if placement.fingerprint != captured.fingerprint:
        raise PlacerError(  # would mean capture is not deterministic: say so rather than mis-apply
            f"the search captured the model as {placement.fingerprint}, this call as {captured.fingerprint}"
        )
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_placement(placement, path)
        except OSError as exc:
            raise OptionError(f"cannot write the placement cache {str(path)!r}: {exc.strerror or exc}; "
                              "pass cache_dir= a writable folder or use_cache=False") from exc
    info = PlaceInfo(False, path, captured.fingerprint, the_cluster.name, the_cluster.simulated,
                     step_time, str(placement.metadata.get("source", result.source)), method, placement)
    return captured, the_cluster, info


def place(
    model: torch.nn.Module,
    example_batch: Any,
    *,
    cluster: ClusterSource | None = None,
    devices: str | Sequence[str] | None = None,
    budget: BudgetLike = DEFAULT_BUDGET,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    memory: str | Mapping[str, Any] | None = None,
    loss_fn: Callable | None = None,
    optimizer_fn: Callable | None = None,
    output_device: str | None = None,
    seed: int = 0,
    check: bool = True,
    verbose: int = 0,
    leaf_modules: Sequence[str | type[torch.nn.Module]] = (),
    batch_dim: int = 0,
) -> torch.fx.GraphModule:
    """Return ``model`` placed over the devices, searching once per model and device list.

    Args:
        model: the ``nn.Module`` to place (left untouched; the result holds moved copies
            of its parameters under the same qualified names).
        example_batch: the model's inputs, ``model(*example_batch)`` (a tensor means ``(tensor,)``).
        cluster: a preset name (``"4xK40"``), spec file or ``Cluster`` (simulated; virtual
            devices run on their mapped real device); or ``devices``: real devices,
            ``"cpu,cuda:0"``. Default as :func:`placer.optimize`.
        budget: the search budget when nothing is cached (``"30s"``, ``"20k"``; default
            :data:`~placer.search.budget.DEFAULT_BUDGET`, two minutes).
        cache_dir: the placement cache (default :func:`default_cache_dir`); ``use_cache=False``
            always searches and writes nothing.
        memory: per-device memory caps (``"cuda:0=20GiB"``).
        loss_fn, optimizer_fn: the training loss and optimizer the search costs (defaults:
            ``graphs.model_file.default_loss``: the ``"loss"`` a dict output carries, else the
            mean of the first output tensor; and SGD at 0.01). ``loss_fn(output, *batch)``: with
            one, the batch may end with values ``forward`` does not take (``(x, labels)``, or a
            dict's ``"labels"``), the loss's targets, as :func:`placer.optimize` takes them; the
            placed model takes them too, each defaulting to None, and ignores them.
        output_device: where outputs are gathered (default: the output node's device).
        check: compare the searched placement's outputs and gradients with the model's.
        verbose: log (``logging``, logger ``placer.integrations.loop``) at INFO rather than
            DEBUG whether the placement was loaded or searched.
        leaf_modules: modules kept as one op (module paths, class names or classes), as
            ``placer optimize --leaf``: a module whose forward torch.fx cannot trace, such as
            one calling a custom autograd Function.
        batch_dim: the batch dimension of the inputs (1 for sequence-first ones, ``(time, batch,
            ...)``), along which the comparison's DDP and pipeline rows split the batch.

    Returns:
        An ``fx.GraphModule`` in training mode, the mode a training step is placed in, even for
        a model handed over in eval mode (which stays as it was); call ``.eval()`` on it for
        inference: it then computes what the model computes in eval mode
        (:mod:`graphs.eval_mode`: training flags such as BatchNorm's and dropout's take their
        eval-mode values, and a forward whose ``if self.training:`` takes another branch runs
        the model's eval-mode graph over the placed parameters). A forward that draws a new
        constant at every trace (``random.random()``), or sets a Python attribute in eval mode,
        refuses eval mode with an error that says so; evaluate such a model with the original after
        ``model.load_state_dict(placed.state_dict())``. A model torch.export captures runs
        ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` in their standard path,
        where the original takes PyTorch's fast path under ``torch.no_grad()`` (a warning at
        capture says how they differ). Build the optimizer on its parameters.
        It carries
        ``placer_place_info`` (:class:`PlaceInfo`) besides the attributes of
        :func:`envs.runtime.apply.apply_placement`.

    Raises:
        PlacerError subclasses: a model that cannot be captured, unknown devices or
        cluster, an unwritable cache, no placement that fits.
    """
    captured, the_cluster, info = find_placement(
        model, example_batch, cluster=cluster, devices=devices, budget=budget, cache_dir=cache_dir,
        use_cache=use_cache, memory=memory, loss_fn=loss_fn, optimizer_fn=optimizer_fn, seed=seed,
        check=check, verbose=verbose, leaf_modules=leaf_modules, batch_dim=batch_dim,
    )
    placed = apply_placement(captured, info.placement.assignment, output_device=output_device,
                             real_devices=the_cluster.real_device_map())
    setattr(placed, "placer_place_info", info)  # noqa: B010 - a new attribute of the GraphModule
    if is_distributed_cluster(the_cluster):
        # The step was simulated for worker processes; the module runs in this one, where their
        # ops take turns on the same cores: say so, and what runs it as placed.
        log.warning("%s: %s are worker processes, and the module place() returns runs in this one process, their "
                    "ops one after the other: the %s step (%.3g ms) is the workers'. To train over the processes, "
                    "run `placer optimize MODEL_FILE --devices %s` and `placer apply` (docs/distributed.md)",
                    type(model).__name__, ",".join(the_cluster.device_names), info.source,
                    (info.step_time or float("nan")) * 1e3, ",".join(the_cluster.device_names))
    how = "loaded from cache" if info.cache_hit else f"searched ({info.method})"
    log.log(logging.INFO if verbose else logging.DEBUG, "%s placed on %s: %s%s", type(model).__name__,
            the_cluster.name, how, f", {info.source} step {info.step_time * 1e3:.3g} ms" if info.step_time else "")
    return placed
