"""``PlacementTuner``: pick the placement with the training job's own first steps.

The simulator proposes a few candidate placements (the distinct fastest of the baselines
and a short agent search, by simulated step time). For the first ``trials`` real training
steps the tuner runs each candidate for a few steps, times every step (CUDA synchronised),
re-ranks the untried candidates with a simulator recalibrated on the times measured so
far (``envs.sim.calibration``), and then settles on the fastest measured one. No step is wasted:
every tuning step is a real step of the user's training.

Switching placements never changes what is computed. The tuner owns ONE placed
``fx.GraphModule`` (``tuner.model``); a switch re-applies the model's clean graph in
place, which moves each parameter, buffer and gradient with ``t.data = t.data.to(dev)``
(the objects stay the same, so an optimizer built on ``tuner.model.parameters()`` keeps
working) and the tuner moves that optimizer's state tensors (momentum, Adam moments)
along. The losses and parameters are those of the run without tuning, up to
floating-point reordering across devices.

Example::

    tuner = PlacementTuner(model, (x,), cluster="4xK40", trials=12, candidates=4)
    opt = torch.optim.Adam(tuner.model.parameters(), lr=1e-3)
    for x, y in data:
        loss = tuner.step(lambda m: loss_fn(m(x), y), opt)   # zero_grad, forward, backward, step
    print(tuner.report())

or, keeping one's own step code, ``with tuner.timed(opt): ...`` around each step.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from envs.hardware.cluster import Cluster
from envs.hardware.rank_devices import is_distributed_cluster
from envs.runtime.apply import ApplyError, apply_placement, check_applicable
from graphs.buffers import restore_buffers
from graphs.input_batch import check_batch_dim
from graphs.random_state import kept_random_state
from placer.integrations.loop import IntegrationError, cluster_for, in_process_placements, model_and_batch
from placer.measuring.significance import clearly_faster
from placer.optimizing.config import ClusterSource
from placer.placement_file import Placement
from placer.result import OptimizeResult
from placer.search.budget import DEFAULT_BUDGET, BudgetLike

log = logging.getLogger(__name__)


@dataclass
class TunerCandidate:
    """One placement the tuner may try.

    Attributes:
        name: where it came from (a baseline's name, ``"placer (hierarchical)"``, ``"given 2"``).
        assignment: op-level placement (fx node name → device name).
        row: the group-level row over the simulator problem (None for given placements).
        simulated: simulated step time in seconds (None when not simulated).
        times: measured wall seconds of each step run with it.
        failed: why it was dropped (e.g. ``"out of memory"``; "" while usable).
    """

    name: str
    assignment: dict[str, str]
    row: np.ndarray | None = None
    simulated: float | None = None
    times: list[float] = field(default_factory=list)
    failed: str = ""

    def timed(self, warmup: int) -> list[float]:
        """The step times after ``warmup`` steps (all of them when there are no more than
        that); none once the candidate failed."""
        if self.failed:
            return []
        return self.times[warmup:] if len(self.times) > warmup else list(self.times)

    def measured(self, warmup: int) -> float | None:
        """Median of :meth:`timed` (None when nothing was timed)."""
        kept = self.timed(warmup)
        return statistics.median(kept) if kept else None


@dataclass
class TunerReport:
    """What the tuner tried and chose (``str()`` gives a table)."""

    candidates: list[TunerCandidate]
    best: int | None
    switches: int
    steps: int
    settled: bool
    warmup: int
    calibrated: bool
    cluster: str
    simulated_cluster: bool
    rank_devices: bool = False

    def rows(self) -> list[dict[str, Any]]:
        """One dict per candidate: name, simulated ms, measured ms, steps, chosen."""
        return [{"candidate": c.name + (f" (failed: {c.failed})" if c.failed else ""),
                 "simulated_ms": None if c.simulated is None else c.simulated * 1e3,
                 "measured_ms": None if c.measured(self.warmup) is None else c.measured(self.warmup) * 1e3,
                 "steps": len(c.times), "chosen": i == self.best}
                for i, c in enumerate(self.candidates)]

    def __str__(self) -> str:
        kind = ("virtual devices mapped to real ones" if self.simulated_cluster
                else "worker-process devices, measured in this one process on the cores they share"
                if self.rank_devices else "real devices")
        lines = [f"placement tuner on {self.cluster} ({kind}): {self.steps} steps, {self.switches} switches, "
                 f"{'settled' if self.settled else 'still tuning'}",
                 f"{'candidate':<40} {'simulated ms':>12} {'measured ms':>12} {'steps':>6}"]
        for r in self.rows():
            sim = "-" if r["simulated_ms"] is None else f"{r['simulated_ms']:.3f}"
            mea = "-" if r["measured_ms"] is None else f"{r['measured_ms']:.3f}"
            lines.append(f"{r['candidate'][:40]:<40} {sim:>12} {mea:>12} {r['steps']:>6}"
                         + ("  <- chosen" if r["chosen"] else ""))
        return "\n".join(lines)


def _sync(devices: Iterable[str]) -> None:
    for d in devices:
        if torch.device(d).type == "cuda":
            torch.cuda.synchronize(d)


def move_optimizer_state(optimizer: torch.optim.Optimizer) -> int:
    """Move every state tensor of ``optimizer`` to its parameter's device; returns how many moved.

    A scalar CPU tensor (Adam's ``step`` when not capturable/fused) stays on the CPU,
    as ``Optimizer.load_state_dict`` keeps it.
    """
    moved = 0
    for p, state in optimizer.state.items():
        if not isinstance(p, torch.Tensor):
            continue
        for key, value in list(state.items()):
            if not isinstance(value, torch.Tensor) or value.device == p.device:
                continue
            if value.dim() == 0 and value.device.type == "cpu":
                continue
            state[key] = value.to(p.device)
            moved += 1
    return moved


def propose_candidates(model: torch.nn.Module, inputs: tuple, cluster: Cluster, k: int, budget: BudgetLike,
                       seed: int = 0, loss_fn: Callable | None = None, optimizer_fn: Callable | None = None,
                       leaf_modules: Sequence[str | type[torch.nn.Module]] = (), batch_dim: int = 0
                       ) -> tuple[list[TunerCandidate], OptimizeResult]:
    """The ``k`` distinct fitting placements with the lowest simulated step time.

    Runs :func:`placer.optimize` (baselines, then a short agent search) and ranks every
    method's placement with the batched simulator. Returns the candidates, fastest first,
    and the optimize result (its ``problem`` is what calibration refits).
    """
    from placer.optimizing.run import optimize

    result = optimize(model, inputs, cluster=cluster, budget=budget, seed=seed, loss_fn=loss_fn,
                      optimizer_fn=optimizer_fn, check=False, progress=False, verbose=0, leaf_modules=leaf_modules,
                      batch_dim=batch_dim)
    try:
        found = in_process_placements(result, k)
    except IntegrationError:
        raise IntegrationError("no method found a placement that fits in device memory; nothing to tune") from None
    chosen = [TunerCandidate(c.method, c.assignment, c.row, c.step_time) for c in found]
    return chosen, result


class PlacementTuner:
    """Tries candidate placements during the first training steps and keeps the fastest.

    Args:
        model: the ``nn.Module`` to train.
        example_batch: its inputs, ``model(*example_batch)``, or a dict by ``forward``'s parameter
            names (``model(**batch)``; the placed fx graph takes the same dict).
        cluster, devices, memory: where to place (as :func:`placer.place`).
        trials: how many real training steps the tuning may use (K).
        candidates: how many placements to propose (an int), or the placements themselves
            (``{node: device}`` dicts or :class:`Placement` objects; then nothing is searched).
        budget: search budget for proposing candidates (default
            :data:`~placer.search.budget.DEFAULT_BUDGET`, or less when the plateau rule ends it).
        steps_per_candidate: steps each candidate runs (default ``max(1, trials // candidates)``).
        rounds: the candidates take turns in this many rounds, each running its share of steps per
            turn (1: one block per candidate). Interleaving spreads slow drift of the machine (other
            load, clocks, warm-up of the process) over all candidates instead of the first ones.
        warmup: steps of each candidate not counted (the first after a switch pays one-off costs);
            used only when the candidate ran more than ``warmup`` steps.
        calibrate: after 3 measured candidates, refit the simulator to the measured times
            (``envs.sim.calibration``) and try the untried candidates in the refitted order.
        share_parameters: place the model's own parameter objects (an optimizer already built on
            ``model.parameters()`` keeps working; the model's tensors move devices) instead of copies.
        output_device: where outputs are gathered, fixed across candidates so the loss code does
            not see its device change (default the cluster's first device).
        margin: another candidate replaces the first (the simulator's pick) only when its measured
            time is lower by more than this fraction and its timed steps are faster beyond their
            noise (:func:`placer.measuring.significance.clearly_faster`): otherwise measured
            differences are as likely noise (a shared CPU varies 4-15% step to step), and the
            simulator's ranking decides.
        seed, loss_fn, optimizer_fn: passed to the search.
        leaf_modules: modules kept as one op, as :func:`placer.place` takes them.
        batch_dim: the inputs' batch dimension, as :func:`placer.place` takes it.

    Raises:
        IntegrationError: bad ``trials``/``candidates``; PlacerError subclasses from capture/search.
    """

    @kept_random_state()
    def __init__(self, model: torch.nn.Module, example_batch: Any, *, cluster: ClusterSource | None = None,
                 devices: str | Sequence[str] | None = None, memory: str | Mapping[str, Any] | None = None,
                 trials: int = 12, candidates: int | Sequence[Mapping[str, str] | Placement] = 4,
                 budget: BudgetLike = DEFAULT_BUDGET, steps_per_candidate: int | None = None, rounds: int = 2,
                 warmup: int = 1, calibrate: bool = True, share_parameters: bool = False,
                 output_device: str | None = None, margin: float = 0.05, seed: int = 0, loss_fn: Callable | None = None,
                 optimizer_fn: Callable | None = None,
                 leaf_modules: Sequence[str | type[torch.nn.Module]] = (), batch_dim: int = 0) -> None:
        from graphs.capture import capture

        if not isinstance(trials, int) or trials < 1:
            raise IntegrationError(f"trials must be a positive number of training steps, got {trials!r}")
        if not 0 <= margin < 1:
            raise IntegrationError(f"margin must be a fraction in [0, 1), got {margin!r}")
        if warmup < 0:
            raise IntegrationError(f"warmup must be >= 0 steps, got {warmup!r}")
        if not isinstance(model, torch.nn.Module):
            raise IntegrationError(f"expected a torch.nn.Module to tune, got {type(model).__name__}")
        taken, inputs = model_and_batch(example_batch, model, loss_fn)  # as place() takes them
        self.cluster = cluster_for(cluster, devices, memory)
        self.problem = None
        if isinstance(candidates, int):
            if candidates < 1:
                raise IntegrationError(f"candidates must be at least 1, got {candidates}")
            self.candidates, result = propose_candidates(model, inputs, self.cluster, candidates, budget,
                                                         seed=seed, loss_fn=loss_fn, optimizer_fn=optimizer_fn,
                                                         leaf_modules=leaf_modules, batch_dim=batch_dim)
            self.problem = result.problem
        else:
            self.candidates = self._given(candidates)
        self.captured = capture(taken, inputs, leaf_modules=leaf_modules, name=type(model).__name__,
                                batch_dim=check_batch_dim(batch_dim, inputs))
        self._check_nodes()
        self.warmup = warmup
        self.margin = margin
        self.calibrate = calibrate and self.problem is not None
        self.calibrated = False
        self.steps_per_candidate = steps_per_candidate or max(1, trials // len(self.candidates))
        if self.steps_per_candidate < 1:
            raise IntegrationError(f"steps_per_candidate must be >= 1, got {steps_per_candidate!r}")
        if not isinstance(rounds, int) or rounds < 1:
            raise IntegrationError(f"rounds must be a positive number of turns, got {rounds!r}")
        self.rounds = min(rounds, self.steps_per_candidate)
        self.visit_steps = -(-self.steps_per_candidate // self.rounds)  # steps per turn, rounded up
        self.trials = trials
        self.real_devices = self.cluster.real_device_map()
        self.output_device = output_device or self.cluster.device_names[0]
        self._used_real = sorted(set(self.real_devices.values()))
        # The clean (unplaced) graph, kept to re-apply each candidate in place.
        self._clean_graph = copy.deepcopy(self.captured.gm.graph)
        self.model: torch.fx.GraphModule = apply_placement(
            self.captured, self.candidates[0].assignment, output_device=self.output_device,
            inplace=share_parameters, real_devices=self.real_devices,
        )
        self.current = 0
        n = len(self.candidates)
        # Turns still to come, next first: round 1 after candidate 0, then every candidate again.
        self._queue = list(range(1, n)) + list(range(n)) * (self.rounds - 1)
        self._visit = 0  # steps of the current turn so far
        self.switches = 0
        self.steps = 0
        self.settled = len(self.candidates) == 1
        self.best: int | None = 0 if self.settled else None
        self.history: list[tuple[int, int, float]] = []  # (step, candidate, seconds)
        self._pending: int | None = None
        self._start: float | None = None

    # -- candidates -------------------------------------------------------------------------
    @staticmethod
    def _given(candidates: Sequence[Mapping[str, str] | Placement]) -> list[TunerCandidate]:
        out = []
        for i, c in enumerate(candidates):
            assignment = c.assignment if isinstance(c, Placement) else c
            if not isinstance(assignment, Mapping) or not assignment:
                raise IntegrationError(
                    f"candidate {i} is a {type(c).__name__}; expected a {{node: device}} dict or a Placement"
                )
            out.append(TunerCandidate(f"given {i}", dict(assignment)))
        if not out:
            raise IntegrationError("candidates is empty; give at least one placement or an int")
        return out

    def _check_nodes(self) -> None:
        names = set(self.captured.graph.nodes)
        known = set(self.cluster.device_names)
        for c in self.candidates:
            extra = sorted(set(c.assignment) - names)
            if extra:
                raise IntegrationError(f"candidate {c.name!r} places nodes the model does not have, e.g. {extra[:3]}")
            bad = sorted(set(c.assignment.values()) - known)
            if bad:
                raise IntegrationError(f"candidate {c.name!r} uses devices {bad}; cluster "
                                       f"{self.cluster.name!r} has {self.cluster.device_names}")
            try:
                # Now, not at the switch to it: that came mid-training with the model half moved.
                check_applicable(self.captured, c.assignment, real_devices=self.cluster.real_device_map())
            except ApplyError as exc:
                raise IntegrationError(f"candidate {c.name!r} cannot be applied: {exc}") from None

    # -- switching ----------------------------------------------------------------------------
    def _switch(self, index: int, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Re-apply the clean graph with candidate ``index``; parameters, grads and state move in place."""
        if index == self.current:
            return
        self.model.graph = copy.deepcopy(self._clean_graph)
        apply_placement(self.model, self.candidates[index].assignment, output_device=self.output_device,
                        inplace=True, real_devices=self.real_devices)
        for opt in optimizers:
            move_optimizer_state(opt)
        self.current = index
        self.switches += 1

    def _next(self) -> int | None:
        """The candidate to run next step (None: keep the current one)."""
        if self.settled:
            return None
        cur = self.candidates[self.current]
        if self._visit < self.visit_steps and len(cur.times) < self.steps_per_candidate and not cur.failed:
            return None
        self._rerank()
        while self._queue and self.steps < self.trials:
            nxt = self._queue.pop(0)
            c = self.candidates[nxt]
            if not c.failed and len(c.times) < self.steps_per_candidate:
                self._visit = 0
                return nxt
        self._settle()
        return self.best

    def _rerank(self) -> None:
        """Order the untried candidates' first turns by the simulator refitted to the times measured so far."""
        untried = [k for k, i in enumerate(self._queue)
                   if not self.candidates[i].times and i not in self._queue[:k]]
        if not self.calibrate or len(untried) < 2:
            return
        done = [c for c in self.candidates if c.measured(self.warmup) is not None and c.row is not None]
        if len(done) < 3:
            return
        from envs.sim.calibration import CalibrationError, calibrate_simulator

        try:
            cal = calibrate_simulator(self.problem, np.stack([c.row for c in done]),
                                      [c.measured(self.warmup) for c in done])
        except CalibrationError as exc:  # e.g. too few distinct times: keep the simulator's order
            log.info("placer tuner: no recalibration (%s)", exc)
            return
        first_turns = [self._queue[k] for k in untried]
        predicted = cal.predict(self.problem, np.stack([self.candidates[i].row for i in first_turns]))
        for k, j in zip(untried, np.argsort(predicted, kind="stable")):
            self._queue[k] = first_turns[j]
        self.calibrated = True

    def _settle(self) -> None:
        timed = [(c.measured(self.warmup), i) for i, c in enumerate(self.candidates)
                 if c.measured(self.warmup) is not None]
        _, best = min(timed) if timed else (None, self.current)
        first = self.candidates[0].timed(self.warmup)
        if first and best != 0 and not clearly_faster(self.candidates[best].timed(self.warmup), first, self.margin):
            best = 0  # not clearly faster than the simulator's pick: keep the pick
        self.best = best
        self.settled = True
        log.info("placer tuner settled on %s after %d steps", self.candidates[self.best].name, self.steps)

    # -- the step hooks ---------------------------------------------------------------------------
    def begin_step(self, optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] = ()) -> None:
        """Call before a training step: applies a pending switch (moving ``optimizers``' state), starts the clock."""
        opts = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        if self._pending is not None:
            self._switch(self._pending, opts)
            self._pending = None
        if not self.settled:
            _sync(self._used_real)
        self._start = time.perf_counter()

    def end_step(self) -> float:
        """Call after the optimizer step: records the step's wall time and picks the next placement."""
        if self._start is None:
            raise IntegrationError("end_step() without begin_step(): call begin_step before each training step")
        if not self.settled:
            _sync(self._used_real)
        elapsed = time.perf_counter() - self._start
        self._start = None
        if not self.settled:
            self._visit += 1
            self.candidates[self.current].times.append(elapsed)
            self.history.append((self.steps, self.current, elapsed))
        self.steps += 1
        self._pending = self._next()
        return elapsed

    @contextmanager
    def timed(self, optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] = ()) -> Iterator[torch.nn.Module]:
        """``with tuner.timed(opt) as model:`` around one whole training step (forward to optimizer step)."""
        self.begin_step(optimizers)
        yield self.model
        self.end_step()

    def step(self, closure: Callable[[torch.nn.Module], torch.Tensor], optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """One training step: ``zero_grad``, ``loss = closure(model)``, ``backward``, ``optimizer.step()``.

        While tuning, a candidate that runs out of device memory in the forward or backward
        pass is dropped and the same step is run again on the best candidate known to work
        (buffers such as BatchNorm statistics are restored first, and nothing has been
        applied by the optimizer yet), so the trajectory is unchanged. Returns the loss, detached.
        """
        with self.timed(optimizer) as model:
            snapshot = None if self.settled else {n: b.detach().clone() for n, b in model.named_buffers()}
            optimizer.zero_grad(set_to_none=True)
            try:
                loss = self._forward_backward(closure, model)
            except torch.OutOfMemoryError:
                if snapshot is None or not self._drop_current("out of memory", [optimizer]):
                    raise
                restore_buffers(self.model, snapshot)
                optimizer.zero_grad(set_to_none=True)
                loss = self._forward_backward(closure, self.model)
            optimizer.step()
        return loss.detach()

    @staticmethod
    def _forward_backward(closure: Callable[[torch.nn.Module], torch.Tensor], model: torch.nn.Module) -> torch.Tensor:
        loss = closure(model)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise IntegrationError("the closure must return the scalar loss tensor of the step")
        loss.backward()
        return loss

    def _drop_current(self, reason: str, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
        """Mark the current candidate failed and switch to a working one now; False when there is none."""
        measured = [(c.measured(self.warmup), i) for i, c in enumerate(self.candidates)
                    if i != self.current and c.measured(self.warmup) is not None]
        untried = [i for i in self._queue if i != self.current and not self.candidates[i].failed]
        if measured:
            fallback = min(measured)[1]
        elif untried:
            fallback = untried[0]
            self._queue.remove(fallback)
        else:
            return False
        log.warning("placer tuner: candidate %s failed (%s); continuing with %s",
                    self.candidates[self.current].name, reason, self.candidates[fallback].name)
        self.candidates[self.current].failed = reason
        self.candidates[self.current].times.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._switch(fallback, optimizers)
        _sync(self._used_real)
        self._start = time.perf_counter()  # the failed attempt is not the fallback's time
        return True

    def finish(self, optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] = ()) -> int:
        """Settle now (on the fastest measured candidate) and switch to it; returns its index."""
        opts = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        if not self.settled:
            self._settle()
        self._pending = None
        self._switch(self.best, opts)  # type: ignore[arg-type]
        return self.best  # type: ignore[return-value]

    @property
    def placement(self) -> dict[str, str]:
        """The op-level placement in use now."""
        return dict(self.candidates[self.current].assignment)

    def report(self) -> TunerReport:
        """The candidates with their simulated and measured step times, and the choice."""
        return TunerReport(self.candidates, self.best, self.switches, self.steps, self.settled, self.warmup,
                           self.calibrated, self.cluster.name, self.cluster.simulated,
                           is_distributed_cluster(self.cluster))
