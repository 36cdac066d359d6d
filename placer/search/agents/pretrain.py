"""Train the move policy across many graphs and clusters: the policy the package ships.

One move policy (:mod:`placer.search.agents.move_policy`) scores moves from features that are ratios,
so one set of weights serves any graph and cluster. Two ways to train it are here:

* **Imitation of local search** (:func:`pretrain_imitation`, the shipped policy): on every
  training task, local search is walked from the policy's own start and from the heuristic
  seeds; at each placement it visits, the single moves are simulated and the scorer is fitted
  (cross-entropy) to put its probability on the moves that shortened the step, each in
  proportion to its gain (:func:`move_examples`, :func:`fit_move_scorer`). The signal is per
  state and per move, and does not depend on how far a search got on one graph, which is why
  it transfers: on the held-out graphs the fitted policy reaches the best heuristic's level
  alone in fewer placements than fresh weights on most tasks (``benchmarks/results/agent.md``).
  The scope scorer, which decides when a move takes its whole module, is fitted the same way
  from the same walks (:mod:`~placer.search.agents.scope_imitation`).
* **Chained REINFORCE** (:func:`pretrain`): the search itself run task after task, each
  task's search starting from the weights the previous one saved (``resume``), so every
  search's REINFORCE updates carry over; tasks alternate between a search from the heuristic
  seeds with local search and one from the policy's own start alone. Its weights did not
  transfer to held-out graphs (alone from its start it reached the best heuristic in 0 of 30
  runs), nor did imitation weights fine-tuned this way.

The training set (:func:`training_tasks`): the zoo at two sizes (``small`` and ``paper``; the
2-layer paper NMT) and generated graphs (:mod:`graphs.synthetic`: layered, recurrent-unrolled,
MoE-like) at several sizes and scales, on ``4xK40``, ``4xV100-nvlink`` and clusters of 2 to 8
devices cut from the presets. Held out of training on purpose, so the benchmark
(``benchmarks/bench_pretrained.py``) can show the policy on graphs it never saw
(:func:`held_out_tasks`): the whole ``branching`` family, the zoo's ``inception_v3``, larger
sizes of the trained families, and the ``8xH100`` cluster.

>>> [t.name for t in training_tasks()][:2]
['zoo:rnnlm/paper@4xK40', 'zoo:rnnlm/paper@4xV100-nvlink']
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np

from envs.hardware.cluster import Cluster, make_cluster
from envs.hardware.loading import load_cluster
from envs.sim.problem import PlacementProblem
from envs.sim.problem_compile import compile_problem
from graphs import synthetic
from graphs.grouping import group_graph
from placer.search.agents.scope_imitation import ScopeExamples, fit_scope_scorer, scope_examples

if TYPE_CHECKING:
    from placer.search.agents.move_policy import MovePolicy

log = logging.getLogger(__name__)

#: Heuristics that seed the training searches: quick on every graph size trained on (the
#: module-split and fx baselines need a captured model; the ablation uses every baseline).
SEED_HEURISTICS: tuple[str, ...] = ("single", "round_robin", "pipeline_dp", "m_topo", "m_etf", "heft", "mincut")


@dataclass(frozen=True)
class Task:
    """One (graph, cluster) the policy trains or is evaluated on.

    Attributes:
        name: ``source@cluster`` (``zoo:gpt2/paper@4xK40``, ``recurrent-4x16 s1.0@cpu+gpu``).
        build: () -> (problem, group graph): compiled on demand, so listing tasks is cheap.
    """

    name: str
    build: Callable[[], tuple[PlacementProblem, nx.DiGraph]] = field(compare=False, repr=False)


def sub_cluster(preset: str, devices: int) -> Cluster:
    """The first ``devices`` devices of a preset (its CPU and GPUs in order) and their links."""
    full = load_cluster(preset)
    if not 1 <= devices <= len(full.devices):
        raise ValueError(f"{preset} has {len(full.devices)} devices, asked for {devices}")
    keep = full.devices[:devices]
    names = {d.name for d in keep}
    links = [link for link in full.links if link.src in names and link.dst in names]
    return make_cluster(keep, links, name=f"{preset}[:{devices}]", default_link=full.default_link)


def _cluster(spec: str) -> Cluster:
    """A preset name, or ``preset[:k]`` for its first k devices."""
    if spec.endswith("]") and "[:" in spec:
        preset, k = spec[:-1].split("[:")
        return sub_cluster(preset, int(k))
    return load_cluster(spec)


def _generated(family: str, args: dict, scale: float, seed: int, cluster: str) -> Task:
    label = "x".join(str(v) for v in args.values())

    def build() -> tuple[PlacementProblem, nx.DiGraph]:
        graph = synthetic.FAMILIES[family](**args, seed=seed, scale=scale)
        grouping = group_graph(graph)
        return compile_problem(graph, _cluster(cluster), grouping=grouping), grouping.graph

    return Task(f"{family}-{label} s{scale:g} #{seed}@{cluster}", build)


def _zoo(model: str, size: str, cluster: str, layers: int | None = None) -> Task:
    def build() -> tuple[PlacementProblem, nx.DiGraph]:
        from graphs.pipeline import prepare
        from placer.benchmark import optimizer_name

        args: dict = {"size": size, **({"layers": layers} if layers else {})}
        prep = prepare(f"zoo:{model}", model_args=args, profile=False)
        problem = compile_problem(prep.captured.graph, _cluster(cluster), optimizer=optimizer_name(prep.spec),
                                  grouping=prep.grouping)
        return problem, prep.grouping.graph

    size_label = f"{size}:{layers}" if layers else size
    return Task(f"zoo:{model}/{size_label}@{cluster}", build)


#: Clusters of the training set: the two of the literature, and 2 to 8 devices.
TRAIN_CLUSTERS: tuple[str, ...] = ("4xK40", "4xV100-nvlink", "cpu+gpu", "8xK40[:3]", "8xA100-nvlink[:6]",
                                   "8xA100-nvlink")


def training_tasks() -> list[Task]:
    """The training set (module doc); the held-out graphs and cluster are not in it."""
    tasks: list[Task] = []
    # (The small rnnlm is left out: 6 groups, so a few thousand placements are most of its space.)
    for model, size, layers in [("rnnlm", "paper", None), ("gpt2", "small", None),
                                ("gpt2", "paper", None), ("moe", "small", None), ("moe", "paper", None),
                                ("nmt", "small", None), ("nmt", "paper", 2), ("resnet50", "paper", None)]:
        for cluster in ("4xK40", "4xV100-nvlink"):
            tasks.append(_zoo(model, size, cluster, layers))
    generated = [
        ("layered", {"layers": 8, "width": 3}), ("layered", {"layers": 16, "width": 5}),
        ("recurrent", {"layers": 2, "steps": 8}), ("recurrent", {"layers": 4, "steps": 16}),
        ("moe", {"layers": 2, "experts": 4}), ("moe", {"layers": 4, "experts": 8}),
    ]
    for i, (family, args) in enumerate(generated):
        for j, cluster in enumerate(TRAIN_CLUSTERS):
            scale = (0.1, 1.0, 10.0)[(i + j) % 3]  # transfer-bound to memory-bound
            tasks.append(_generated(family, args, scale, seed=i * 10 + j, cluster=cluster))
    return tasks


def held_out_tasks() -> list[Task]:
    """Graphs and a cluster the shipped policy never trained on (module doc)."""
    tasks = [_zoo("inception_v3", "paper", c) for c in ("4xK40", "4xV100-nvlink")]
    generated = [
        ("branching", {"blocks": 8, "branches": 4}, 1.0), ("branching", {"blocks": 12, "branches": 6}, 10.0),
        ("layered", {"layers": 40, "width": 8}, 1.0), ("recurrent", {"layers": 6, "steps": 32}, 1.0),
        ("moe", {"layers": 8, "experts": 16}, 1.0),
    ]
    for i, (family, args, scale) in enumerate(generated):
        for cluster in ("4xK40", "8xH100"):
            tasks.append(_generated(family, args, scale, seed=1000 + i, cluster=cluster))
    return tasks


def heuristic_seeds(problem: PlacementProblem, graph: nx.DiGraph, names: Iterable[str] = SEED_HEURISTICS,
                    seed: int = 0) -> tuple[np.ndarray | None, str, float]:
    """The fitting placements of the heuristics ``names`` [K, N], and the best one's name and step time.

    A heuristic that finds no fitting placement, or fails on the graph, is skipped."""
    from envs.sim.simulator import simulate_batch
    from placer.search.baselines import run_baseline

    rows, best = [], ("", float("inf"))
    for name in names:
        try:
            res = run_baseline(name, problem, graph, seed)
        except Exception as exc:  # noqa: BLE001 - one heuristic failing on a graph must not stop the rest
            log.info("heuristic %s failed on %s: %s", name, problem.name, exc)
            continue
        if res.placement is None:
            continue
        row = np.asarray(res.placement, dtype=np.int64)
        ev = simulate_batch(problem, row[None])
        if bool(ev.fits[0]):
            rows.append(row)
            if float(ev.step_time[0]) < best[1]:
                best = (name, float(ev.step_time[0]))
    return (np.stack(rows) if rows else None), best[0], best[1]


def _cpu_s() -> float:
    """CPU seconds (user + system) this process has used so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass
class TrainingLog:
    """What a training run did: one line per task, and the CPU seconds it took."""

    lines: list[str] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0
    placements: int = 0


def pretrain(tasks: list[Task], out: Path, placements: int = 3000, seed: int = 0, epochs: int = 1,
             start: Path | None = None) -> TrainingLog:
    """Train one move policy over ``tasks`` (``epochs`` passes) and save it at ``out``.

    Each task is one :func:`placer.search.search.search` with ``placements`` evaluated placements,
    resuming the weights the previous task saved (the first starts from ``start``, or fresh
    weights). Tasks alternate (and swap every epoch) between a search from the heuristic seeds
    with local search and one from the policy's own start alone.
    """
    from placer.search.search import search

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if start is not None:
        out.write_bytes(Path(start).read_bytes())
    elif out.exists():
        out.unlink()  # a stale file would be resumed by the first task
    report = TrainingLog()
    cpu0, t0 = _cpu_s(), time.perf_counter()
    k = 0
    built: dict[str, tuple[PlacementProblem, tuple[np.ndarray | None, str, float]]] = {}
    rng = np.random.default_rng(seed)
    for epoch in range(int(epochs)):
        # A fresh order every epoch: the weights shipped are not those of whichever family came last.
        for i in rng.permutation(len(tasks)).tolist():
            task = tasks[i]
            if task.name not in built:  # compiled and seeded once, searched every epoch
                tb = time.perf_counter()
                problem, graph = task.build()
                built[task.name] = (problem, heuristic_seeds(problem, graph))
                log.info("built %s and its heuristic seeds in %.1f s", task.name, time.perf_counter() - tb)
            problem, (seeds, best_name, best_t) = built[task.name]
            seeded = (i + epoch) % 2 == 0  # each task both ways over two epochs
            tk = time.perf_counter()
            # A few thousand placements can be most of a tiny graph's space: the search then spends
            # its time drawing proposals it already evaluated, and learns nothing new.
            space = problem.num_nodes * math.log(max(problem.num_devices, 1))
            task_budget = int(placements) if space > math.log(8 * int(placements)) else \
                max(256, int(math.exp(space) / 8))
            result = search(problem, agent="moves", budget=task_budget, seed=seed + k, patience=None,
                            initial_placements=seeds if seeded else None, local_search=seeded, save_path=out, resume=True,
                            pretrained=False)
            line = (f"epoch {epoch} task {k:3d} {task.name} ({problem.num_nodes} groups, {problem.num_devices} dev): "
                    f"{'seeded' if seeded else 'alone'} best {result.best_step_time * 1e3:.2f} ms"
                    + (f" vs heuristic {best_name} {best_t * 1e3:.2f} ms" if seeded and best_name else "")
                    + f", policy share {result.policy_share() if result.policy_share() is not None else '-'}"
                    f", {result.evaluated} placements in {time.perf_counter() - tk:.1f} s")
            log.info("%s", line)
            report.lines.append(line)
            report.placements += result.evaluated
            k += 1
    report.cpu_s, report.wall_s = _cpu_s() - cpu0, time.perf_counter() - t0
    return report


# ---------------------------------------------------------------------------------- imitation
@dataclass
class MoveExamples:
    """Supervised examples for the move scorer: one entry per visited placement (state).

    Attributes:
        features: per state, [K, F] features (:func:`~placer.search.agents.move_features.move_features`)
            of the K single moves that were simulated there.
        targets: per state, [K] weights summing to 1: each improving move's share of the state's
            total relative gain (moves that did not improve, or did not fit, weigh 0).
        placements: placements simulated to make them.
    """

    features: list[np.ndarray] = field(default_factory=list)
    targets: list[np.ndarray] = field(default_factory=list)
    placements: int = 0


def _descent_states(problem: PlacementProblem, start: np.ndarray, steps: int, candidates: int,
                    rng: np.random.Generator, out: MoveExamples, scope_out: ScopeExamples | None = None,
                    scope_rng: np.random.Generator | None = None) -> None:
    """Walk a local search from ``start`` and record what it sees (see :func:`move_examples`)."""
    from envs.sim.simulator import simulate_batch
    from placer.search.agents.move_features import feature_statics, move_features

    st = feature_statics(problem)
    n, d = problem.num_nodes, problem.num_devices
    row = np.asarray(start, dtype=np.int64).copy()
    ev = simulate_batch(problem, row[None])
    out.placements += 1
    t0, fit0, peak0 = float(ev.step_time[0]), bool(ev.fits[0]), np.asarray(ev.peak_memory[0])
    escapes = 0
    for _ in range(int(steps)):
        # Every single move (group g to device e != row[g]), or a uniform sample of them on a large graph.
        moves = np.flatnonzero((np.arange(n * d) % d) != np.repeat(row, d))
        if len(moves) > candidates:
            moves = np.sort(rng.choice(moves, size=candidates, replace=False))
        rows = np.repeat(row[None], len(moves), axis=0)
        rows[np.arange(len(moves)), moves // d] = moves % d
        ev = simulate_batch(problem, rows)
        out.placements += len(rows)
        t, ok = np.asarray(ev.step_time, dtype=np.float64), np.asarray(ev.fits, dtype=bool)
        # From a placement that does not fit, any fitting move is the improvement local search takes.
        gain = np.where(ok, (t0 - t) / max(t0, 1e-30), -1.0) if fit0 else np.where(ok, 1.0, -1.0)
        better = gain > 0
        if better.any():
            feats = move_features(problem, row, peak0, st)
            w = np.where(better, gain, 0.0)
            out.features.append(feats[moves])
            out.targets.append((w / w.sum()).astype(np.float32))
            order = np.flatnonzero(better)[np.argsort(-gain[better])]
            if scope_out is not None and scope_rng is not None and fit0:
                scope_examples(problem, st, row, t0, feats, moves[order], scope_rng, scope_out)
            # The next state: the improving moves merged (best first, one per group), as the search
            # merges a batch's improvements; the best single move when the merge is not better.
            merged = row.copy()
            for j in order[: max(1, len(order) // 4)]:
                merged[moves[j] // d] = moves[j] % d
            evm = simulate_batch(problem, merged[None])
            out.placements += 1
            j = int(order[0])
            if bool(evm.fits[0]) and float(evm.step_time[0]) < t[j]:
                row, t0, fit0, peak0 = merged, float(evm.step_time[0]), True, np.asarray(evm.peak_memory[0])
            else:
                row, t0, fit0, peak0 = rows[j].copy(), float(t[j]), bool(ok[j]), np.asarray(ev.peak_memory[j])
            escapes = 0
            continue
        if not ok.any() or escapes >= 2:
            return
        # A local optimum (of the sampled moves): step to the least bad fitting move, as the search's walk does.
        j = int(np.argmin(np.where(ok, t, np.inf)))
        row, t0, fit0, peak0 = rows[j].copy(), float(t[j]), True, np.asarray(ev.peak_memory[j])
        escapes += 1


def move_examples(problem: PlacementProblem, seeds: np.ndarray | None, rng: np.random.Generator,
                  steps: int = 8, candidates: int = 192, out: MoveExamples | None = None,
                  scope_out: ScopeExamples | None = None,
                  scope_rng: np.random.Generator | None = None) -> MoveExamples:
    """What local search learns on ``problem``, as examples for the move scorer.

    Local search is walked from the policy's own start (:func:`~placer.search.agents.move_start.start_row`),
    from the best heuristic seed (the first row of ``seeds``, which :func:`heuristic_seeds` does not
    sort, so the fastest is picked here) and from one other seed, ``steps`` states each. At each
    state the single moves (all, or ``candidates`` drawn uniformly) are simulated; the state's
    target is the share of the gain each improving move brings. The next state is the improving
    moves merged (the best quarter, one per group) or the best single move, whichever is faster; at
    a local optimum the walk takes the least bad move, at most twice in a row.

    With ``scope_out``, each state of a fitting placement also gets its whole-module options
    simulated (:func:`~placer.search.agents.scope_imitation.scope_examples`, drawing from
    ``scope_rng``, so the walk itself is the same with or without them).
    """
    from envs.sim.simulator import simulate_batch
    from placer.search.agents.move_start import start_row

    out = out if out is not None else MoveExamples()
    starts = [start_row(problem)]
    if seeds is not None and len(seeds):
        ev = simulate_batch(problem, seeds)
        out.placements += len(seeds)
        order = np.argsort(np.where(ev.fits, ev.step_time, np.inf), kind="stable")
        starts.append(seeds[order[0]])
        if len(seeds) > 1:
            starts.append(seeds[order[1 + int(rng.integers(len(seeds) - 1))]])
    for s in starts:
        _descent_states(problem, s, steps, candidates, rng, out, scope_out, scope_rng)
    return out


def fit_move_scorer(examples: MoveExamples, epochs: int = 30, lr: float = 3e-3, seed: int = 0,
                    start: Path | None = None) -> MovePolicy:
    """A move policy whose scorer ranks each state's moves as local search found them: the
    cross-entropy between the state's gain shares and the scorer's softmax over that state's moves.

    The move-count logits and coupling weights keep their fresh values (the examples are single
    moves); the search's REINFORCE goes on updating every weight from there.
    """
    import torch

    from placer.search.agents.move_policy import MovePolicy

    torch.manual_seed(seed)
    policy = MovePolicy.load(start, seed=seed) if start is not None else MovePolicy(seed=seed)
    net = policy.net
    optim = torch.optim.Adam(net.score.parameters(), lr=lr)
    feats = [torch.from_numpy(f) for f in examples.features]
    targets = [torch.from_numpy(t) for t in examples.targets]
    rng = np.random.default_rng(seed)
    per_batch = 16
    for epoch in range(int(epochs)):
        order = rng.permutation(len(feats))
        total = 0.0
        for b in range(0, len(order), per_batch):
            loss = torch.zeros(())
            for i in order[b:b + per_batch].tolist():
                loss = loss - (targets[i] * torch.log_softmax(net(feats[i]), dim=0)).sum()
            loss = loss / max(1, len(order[b:b + per_batch]))
            optim.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.score.parameters(), 1.0)
            optim.step()
            total += float(loss.detach()) * len(order[b:b + per_batch])
        log.info("imitation epoch %d: cross-entropy %.4f over %d states", epoch, total / max(1, len(feats)), len(feats))
    return policy


def pretrain_imitation(tasks: list[Task], out: Path, seed: int = 0, steps: int = 8, candidates: int = 192,
                       epochs: int = 30) -> TrainingLog:
    """Train the shipped move policy by imitating local search over ``tasks`` and save it at ``out``.

    Per task: :func:`move_examples` from the policy's start and the heuristic seeds, with the
    scope options of each state on graphs that have module paths; then one supervised fit of the
    move scorer over every task's states (:func:`fit_move_scorer`) and one of the scope scorer
    (:func:`~placer.search.agents.scope_imitation.fit_scope_scorer`). Same ``seed`` -> same file.
    """
    import torch

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = TrainingLog()
    cpu0, t0 = _cpu_s(), time.perf_counter()
    examples = MoveExamples()
    scope_ex = ScopeExamples()
    for k, task in enumerate(tasks):
        tb = time.perf_counter()
        problem, graph = task.build()
        seeds, best_name, best_t = heuristic_seeds(problem, graph)
        before, placed = len(examples.features), examples.placements
        scope_before, scope_placed = len(scope_ex.states), scope_ex.placements
        move_examples(problem, seeds, np.random.default_rng([seed, k]), steps=steps, candidates=candidates,
                      out=examples, scope_out=scope_ex, scope_rng=np.random.default_rng([seed, k, 1]))
        line = (f"task {k:3d} {task.name} ({problem.num_nodes} groups, {problem.num_devices} dev): "
                f"{len(examples.features) - before} states, {examples.placements - placed} placements, "
                f"{len(scope_ex.states) - scope_before} scope states ({scope_ex.placements - scope_placed} placements), "
                f"{time.perf_counter() - tb:.1f} s")
        log.info("%s", line)
        report.lines.append(line)
    policy = fit_move_scorer(examples, epochs=epochs, seed=seed)
    fit_scope_scorer(policy, scope_ex, seed=seed)
    torch.save(policy.state_dict(), out)
    report.placements = examples.placements + scope_ex.placements
    report.cpu_s, report.wall_s = _cpu_s() - cpu0, time.perf_counter() - t0
    return report
