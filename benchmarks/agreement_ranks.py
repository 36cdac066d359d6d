"""Rank simulator (envs.sim.ranks) vs measured multi-process steps, per small zoo model.

For each model: capture, profile on the CPU and group it; draw placements over the rank
devices (both single-rank placements, the baselines' placements, contiguous layer splits
of the group order, random group placements); measure each one's real training step with
``DistributedMeasurer`` (one worker process per device, warm-up then the median of the
timed steps; ``--passes 2`` measures every placement twice in fresh jobs); simulate the
same placements with :mod:`envs.sim.ranks`; calibrate :class:`RankCosts` on half of the
placements (host constants from each rank's CPU time, latency and wake-up from the steps,
one set for all models; and, for comparison, every constant per model) and report
Spearman and MAPE on the held-out half and on all, for each statistic of the measured steps
(``--statistics``: the mean, which rule R3's expected step predicts, scored also as a simulated
median with the late wake-ups drawn; the median; the fastest). Everything measured is written to ``--out``
(JSON) so ``--analyse`` can redo the simulation and the fits without measuring again::

    python benchmarks/agreement_ranks.py --models rnnlm nmt gpt2 moe resnet50 inception_v3 \\
        --devices cpu:0,cpu:1 --placements 24 --passes 2 --out benchmarks/results/agreement_ranks.json
    python benchmarks/agreement_ranks.py --analyse benchmarks/results/agreement_ranks.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

TARGET_SPEARMAN = 0.9
TARGET_MAPE = 0.15
#: "Raw": the constants before any calibration (the design note's guesses: a GraphModule or
#: backward call ~20 us, ~10 us per message end, the profile's op times as they are) with the
#: run's ping-pong links.
RAW = dict(op_scale=1.0, stage_fwd_s=20e-6, stage_bwd_s=20e-6, send_s=10e-6, recv_s=10e-6, handoff_s=3e-6,
           loss_s=50e-6, step_s=100e-6, wake_s=0.0, late_p=0.0)
BASELINES = ("m_etf", "m_sct", "heft", "mincut", "pipeline_dp", "balanced", "sequential", "round_robin",
             "critical_path", "expert", "m_topo")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _leaves(captured: Any) -> dict[str, int]:
    """Tensors per node value: the runtime sends one message per tensor leaf (none for a constant)."""
    from envs.sim.rank_compile import value_leaves

    return value_leaves(captured.gm)


def _placements(prep: Any, cluster: Any, count: int, seed: int) -> list[tuple[str, dict[str, str]]]:
    """(label, op-level placement) rows: single ranks, baselines, layer splits, random group rows."""
    devs = cluster.device_names
    groups = list(prep.grouping.graph.nodes)
    rows: list[tuple[str, dict[str, str]]] = []
    seen: set[tuple] = set()

    def add(label: str, group_row: dict[str, str]) -> None:
        op = prep.grouping.expand(group_row)
        key = tuple(sorted(op.items()))
        if key not in seen:
            seen.add(key)
            rows.append((label, op))

    for d in devs:
        add(f"single:{d}", {g: d for g in groups})
    try:
        from envs.sim.problem_compile import compile_problem
        from placer.search.baselines import run_baseline

        problem = compile_problem(prep.grouping.graph, cluster)
        for name in BASELINES:
            try:
                res = run_baseline(name, problem, prep.grouping.graph, seed=seed, captured=prep.captured,
                                   op_to_group=prep.grouping.op_to_group)
            except Exception as exc:  # noqa: BLE001 - a baseline broken by in-flight work is reported, not fatal
                print(f"  baseline {name}: failed ({type(exc).__name__}: {exc})", flush=True)
                continue
            if res.placement is not None:
                add(f"baseline:{name}", problem.array_to_placement(res.placement))
    except Exception as exc:  # noqa: BLE001
        print(f"  baselines unavailable ({type(exc).__name__}: {exc})", flush=True)
    # Contiguous splits of the group order: the first part on one rank, the rest on the other.
    for frac in (0.25, 0.5, 0.75):
        k = max(1, min(len(groups) - 1, round(frac * len(groups))))
        for a, b in ((devs[0], devs[1]), (devs[1], devs[0])):
            add(f"split:{frac}:{a}", {g: (a if i < k else b) for i, g in enumerate(groups)})
    rng = np.random.default_rng(seed)
    tries = 0
    while len(rows) < count and tries < 20 * count:
        tries += 1
        p_one = rng.uniform(0.2, 0.8)  # from lopsided to even splits
        add("random", {g: devs[int(rng.random() < p_one)] for g in groups})
    return rows


def measure_model(name: str, size: str, devices: str, links: dict, count: int, seed: int, warmup: int,
                  repeats: int, passes: int, timeout_s: float) -> dict[str, Any]:
    """Prepare, draw placements and measure them ``passes`` times; the record holds everything."""
    from envs.runtime.distributed.measure import DistributedMeasurer
    from envs.runtime.distributed.rank_cluster import rank_cluster
    from graphs.pipeline import prepare

    start = time.perf_counter()
    prep = prepare(f"zoo:{name}", {"size": size}, profile=True, devices=["cpu"])
    cluster = rank_cluster(devices, links=links)
    rows = _placements(prep, cluster, count, seed)
    record: dict[str, Any] = {"model": name, "size": size, "ops": prep.captured.graph.number_of_nodes(),
                              "groups": prep.grouping.graph.number_of_nodes(),
                              "labels": [lbl for lbl, _ in rows], "placements": [p for _, p in rows],
                              "passes": []}
    for k in range(passes):
        load_before = _load()
        m = DistributedMeasurer(f"zoo:{name}", {"size": size}, devices, warmup=warmup, repeats=repeats,
                                min_timed_s=0.0,
                                timeout_s=timeout_s, spec=prep.spec, fingerprint=prep.captured.fingerprint,
                                captured=prep.captured)
        t0 = time.perf_counter()
        pls = [p for _, p in rows]
        res = m.measure(pls)
        # By result: placements that are one program share a run, and its details.
        details = [m.details.get(r.placement_hash, {}) for r in res]
        record["passes"].append({
            "load_before": load_before, "load_after": _load(), "seconds": round(time.perf_counter() - t0, 1),
            "started_utc": time.strftime("%H:%M:%S", time.gmtime()),
            "median_s": [r.step_time if r.valid else None for r in res],
            "times_s": [list(r.times) for r in res],
            "reasons": [r.reason for r in res],
            "details": details,
        })
        print(f"  {name} pass {k + 1}: {len(rows)} placements in {record['passes'][-1]['seconds']} s, "
              f"load {load_before} -> {record['passes'][-1]['load_after']}", flush=True)
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def _measured(record: dict[str, Any], statistic: str = "median") -> np.ndarray:
    """Per placement: over the passes, the median of each pass's median step (``"median"``,
    the measurer's protocol), the mean of every timed step of all passes (``"mean"``: what the
    expected-step rule R3 predicts) or the fastest timed step of all passes (``"fastest"``:
    what the placement costs when it gets the cores); inf when a pass failed."""
    if statistic == "mean":
        out = []
        for i in range(len(record["passes"][0]["median_s"])):
            if any(p["median_s"][i] is None or not p["times_s"][i] for p in record["passes"]):
                out.append(float("inf"))
            else:
                out.append(float(np.mean(np.concatenate([p["times_s"][i] for p in record["passes"]]))))
        return np.array(out)
    cols = []
    for p in record["passes"]:
        if statistic == "median":
            cols.append([float("inf") if v is None else float(v) for v in p["median_s"]])
        else:
            cols.append([min(t) if t and v is not None else float("inf") for v, t in zip(p["median_s"], p["times_s"])])
    if statistic == "median":
        return np.array([statistics.median(c) for c in zip(*cols)])
    return np.array([min(c) for c in zip(*cols)])


def _pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The placements every run measured, with all the runs' passes (the baselines' placements
    can differ between runs: they are computed on the cluster with that run's ping-pong links)."""
    first = runs[0]
    if len(runs) == 1:
        return first
    out = {**first, "models": [], "pooled": [r["command"] + f" (started {r['started_utc']} UTC, load "
                                             f"{r['load_at_start']})" for r in runs]}
    for rec in first["models"]:
        key = "placements" if "placements" in rec else "rows"
        others = [next(m for m in run["models"] if m["model"] == rec["model"]) for run in runs[1:]]
        canon = [json.dumps(p, sort_keys=True) for p in rec[key]]
        keep = [i for i, c in enumerate(canon)
                if all(c in {json.dumps(p, sort_keys=True) for p in o[key]} for o in others)]
        passes = [{k: ([v[i] for i in keep] if isinstance(v, list) and len(v) == len(canon) else v)
                   for k, v in p.items()} for p in rec["passes"]]
        for o in others:
            where = {json.dumps(p, sort_keys=True): j for j, p in enumerate(o[key])}
            idx = [where[canon[i]] for i in keep]
            passes += [{k: ([v[j] for j in idx] if isinstance(v, list) and len(v) == len(o[key]) else v)
                        for k, v in p.items()} for p in o["passes"]]
        out["models"].append({**rec, key: [rec[key][i] for i in keep], "labels": [rec["labels"][i] for i in keep],
                              "passes": passes})
    return out


def compact(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` with each op-level placement stored as one string of rank digits over the
    model's ops (``op_order``, sorted op names): the same placements, a fraction of the size.

    Ops, not groups: op names come from the capture alone, while the grouping merges tiny ops
    by their profiled times and so differs between machines and profile caches (records that
    kept group rows could not be analysed again once the profile was made afresh)."""
    devs = results["devices"].split(",")
    out = {**results, "models": []}
    for rec in results["models"]:
        if "placements" not in rec:
            out["models"].append(rec)
            continue
        ops = sorted(rec["placements"][0])
        rows = []
        for p in rec["placements"]:
            if sorted(p) != ops:
                raise ValueError(f"{rec['model']}: the placements do not place the same ops")
            rows.append("".join(str(devs.index(p[op])) for op in ops))
        slim = {k: v for k, v in rec.items() if k != "placements"}
        out["models"].append({**slim, "op_order": ops, "rows": rows})
    return out


def record_seed(results: dict[str, Any]) -> int:
    """The seed a record's placements were drawn with: its ``seed`` field, or for records
    written before it had one, the ``--seed`` of its command (0 when the command gave none).

    >>> record_seed({"command": "python benchmarks/agreement_ranks.py --seed 1 --out r.json"})
    1
    """
    if "seed" in results:
        return int(results["seed"])
    words = shlex.split(results.get("command", ""))
    return int(words[words.index("--seed") + 1]) if "--seed" in words else 0


def _expand_rows(prep: Any, rec: dict[str, Any], devs: list[str]) -> list[dict[str, str]]:
    """The op placements of a compact record (op rows; or group rows, as records before
    2026-12-06 kept them, which need today's grouping to be the recorded one)."""
    if "op_order" in rec:
        differ = set(rec["op_order"]) ^ set(prep.grouping.op_to_group)
        if differ:
            raise ValueError(f"{rec['model']}: today's capture has other ops than the record "
                             f"({len(differ)} differ, e.g. {sorted(differ)[:3]}); re-measure")
        return [{op: devs[int(c)] for op, c in zip(rec["op_order"], row)} for row in rec["rows"]]
    if list(prep.grouping.graph.nodes) != rec["group_order"]:
        raise ValueError(f"{rec['model']}: this record keeps group rows and today's grouping differs from the "
                         "recorded one (it follows the profiled times); re-measure")
    return [prep.grouping.expand({g: devs[int(c)] for g, c in zip(rec["group_order"], row)}) for row in rec["rows"]]


def _cpu(record: dict[str, Any]) -> list[list[float]]:
    """Per placement, per rank: CPU seconds per step, averaged over the passes."""
    out = []
    for i in range(len(record["placements"])):
        per = [p["details"][i].get("cpu_s") for p in record["passes"] if p["details"] and p["details"][i]]
        per = [c for c in per if c]
        out.append([float(np.mean(col)) for col in zip(*per)] if per else [float("nan")] * 2)
    return out


def _halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The fit half and the held-out half of ``n`` placements for ``seed``."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])


def _pass_halves(rec: dict[str, Any], statistic: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The statistic over the first half of the passes and over the second (None with one pass)."""
    if len(rec["passes"]) < 2:
        return None
    k = len(rec["passes"]) // 2
    one, two = ({**rec, "passes": ps} for ps in (rec["passes"][:k], rec["passes"][k:]))
    return _measured(one, statistic), _measured(two, statistic)


def _slow_steps(rec: dict[str, Any], waits: list[int], jump_s: float = 2.5e-3) -> dict[str, float]:
    """How often a placement's timed steps land in a slow mode (more than ``jump_s`` above its
    10th-percentile step), and whether that goes with the simulated count of sleeping waits."""
    from scipy.stats import spearmanr

    share, jumps = [], []
    for i in range(len(rec["placements"])):
        times = np.concatenate([np.asarray(p["times_s"][i], dtype=float) for p in rec["passes"] if p["times_s"][i]])
        if times.size == 0:
            share.append(float("nan"))
            continue
        floor = np.percentile(times, 10)
        slow = times > floor + jump_s
        share.append(float(np.mean(slow)))
        if slow.sum() >= 3 and (~slow).sum() >= 3:
            jumps.append(float(np.median(times[slow]) - np.median(times[~slow])))
    arr = np.array(share)
    ok = np.isfinite(arr)
    rho = float(spearmanr(arr[ok], np.asarray(waits)[ok])[0]) if ok.sum() > 2 and np.std(arr[ok]) > 0 else float("nan")
    return {"median_share": float(np.nanmedian(arr)), "max_share": float(np.nanmax(arr)),
            "median_jump_s": float(np.median(jumps)) if jumps else float("nan"), "spearman_with_sleeping_waits": rho}


def _wait_excess(rec: dict[str, Any], sleeps: list[list[float]],
                 thresholds: tuple[float, ...] = (0.0, 100e-6, 300e-6, 1e-3)) -> dict[str, float]:
    """How a placement's mean step exceeds its 10th-percentile step (the slow tail's weight)
    against its simulated sleeping waits: per threshold, the Spearman correlation with the
    count of waits that sleep longer than it; at threshold 0 also the least-squares seconds
    per sleeping wait and the intercept (the excess with no sleeping wait)."""
    from scipy.stats import spearmanr

    excess = []
    for i in range(len(rec["placements"])):
        times = np.concatenate([np.asarray(p["times_s"][i], dtype=float) for p in rec["passes"] if p["times_s"][i]])
        excess.append(float(times.mean() - np.percentile(times, 10)) if times.size else float("nan"))
    ex = np.array(excess)
    ok = np.isfinite(ex)
    out: dict[str, float] = {}
    for th in thresholds:
        n = np.array([sum(1 for w in x if w > th) for x in sleeps], dtype=float)
        out[f"excess_spearman_sleeps_over_{th * 1e6:.0f}us"] = (
            float(spearmanr(ex[ok], n[ok])[0]) if ok.sum() > 2 and np.std(n[ok]) > 0 else float("nan"))
        if th == 0.0 and ok.sum() > 2:
            slope, icpt = np.polyfit(n[ok], ex[ok], 1)
            out["excess_s_per_sleeping_wait"], out["excess_s_without_sleeping_waits"] = float(slope), float(icpt)
    return out


def analyse(results: dict[str, Any], seed: int, statistic: str = "median", splits: int = 0,
            late_p: float | None = None) -> dict[str, Any]:
    """Simulate every recorded placement, calibrate on half of them, score the rest.

    Calibration ("calibrated"), one set of constants for every model, from the fit halves
    only: the per-stage, per-message and per-step host constants from each rank's CPU
    seconds per step (:func:`envs.sim.rank_calibration.fit_host_costs`: waiting for peers or for a
    core is not in it), then the op-time scale, the link latency and the wake-up from the
    measured steps (log least squares, the other constants held). The scale is refitted
    because CPU time also counts gloo's I/O thread, which runs beside the main thread. For comparison, "per-model": every constant fitted on the
    model's own fit half. With ``splits``, the calibrated fit is also redone on ``splits``
    other random halves (seeds ``seed + 1 ...``) and scored on each held-out half, beside
    the measurement's own pass halves on the same held-out placements: one half of 12
    placements is a small sample, and its Spearman moves by +-0.1 from split to split.
    """
    from envs.hardware.cluster import Device, Link, make_cluster
    from envs.sim.calibration import agreement
    from envs.sim.rank_calibration import fit_host_costs, fit_rank_costs, fit_rank_costs_many
    from envs.sim.rank_costs import RankCosts
    from envs.sim.rank_simulator import RankSimulator
    from graphs.pipeline import prepare

    devs = results["devices"].split(",")
    links = [Link(a, b, lat, bw) for (a, b), (lat, bw) in
             ((tuple(k.split("->")), v) for k, v in results["links"].items())]
    cluster = make_cluster([Device(d, "cpu", 8 * 2**30, 1e11, 1e10, real_device="cpu") for d in devs], links,
                           name="ranks", simulated=False)
    cases = []
    for rec in results["models"]:
        prep = prepare(f"zoo:{rec['model']}", {"size": rec["size"]}, profile=True, devices=["cpu"])
        if "placements" not in rec:  # a compact record: group rows
            rec = {**rec, "placements": _expand_rows(prep, rec, devs)}
        leaves = _leaves(prep.captured)
        meas = _measured(rec, statistic)
        fit, held = _halves(len(meas), seed)
        cases.append((rec, prep.captured.graph, leaves, meas, fit, held))
    # The host constants come from CPU time; the steps fit the op scale, the latency and the
    # wake-up: for the mean and the median the late wake-ups' probability (R3, the tick
    # ``late_s`` and the plain ``wake_s`` held), for the fastest step the plain wake-up alone
    # (a fastest step is one without late wake-ups).
    held_fixed = ("stage_fwd_s", "stage_bwd_s", "send_s", "recv_s", "handoff_s", "loss_s", "step_s", "late_s", "cold_s")
    held_fixed += ("late_p",) if statistic == "fastest" or late_p is not None else ("wake_s",)
    late_start = 0.0 if statistic == "fastest" or late_p is None else late_p
    draws = 31  # random late wake-ups per placement for the simulated median (statistic "mean")

    def calibrate(halves: list[np.ndarray]) -> tuple[RankCosts, RankCosts]:
        host = fit_host_costs([(g, [rec["placements"][i] for i in fit], [_cpu(rec)[i] for i in fit], leaves)
                               for (rec, g, leaves, _, _, _), fit in zip(cases, halves)], cluster,
                              start=RankCosts(late_p=late_start))
        return host, fit_rank_costs_many([(g, [rec["placements"][i] for i in fit], meas[fit], leaves)
                                          for (rec, g, leaves, meas, _, _), fit in zip(cases, halves)],
                                         cluster, start=host, fixed=held_fixed)

    host, calibrated = calibrate([fit for *_, fit, _ in cases])
    out: dict[str, Any] = {"per_model": {}, "host_costs_from_cpu": host.to_dict(), "global_costs": calibrated.to_dict()}
    for rec, g, leaves, meas, fit, held in cases:
        pls = rec["placements"]
        raw = RankSimulator(g, cluster, RankCosts(**RAW), leaves=leaves).step_times(pls)
        glob = RankSimulator(g, cluster, calibrated, leaves=leaves).step_times(pls)
        own = fit_rank_costs(g, [pls[i] for i in fit], meas[fit], cluster, leaves=leaves)
        cal = RankSimulator(g, cluster, own, leaves=leaves).step_times(pls)
        entry = {
            "raw_all": agreement(raw, meas),
            "fit_per_model": own.to_dict(),
            "per_model_held_out": agreement(cal[held], meas[held]),
            "per_model_all": agreement(cal, meas),
            "global_held_out": agreement(glob[held], meas[held]),
            "global_all": agreement(glob, meas),
            "simulated_raw_s": raw.tolist(), "simulated_fit_s": cal.tolist(), "simulated_global_s": glob.tolist(),
            "measured_s": meas.tolist(), "held_out": [int(i) for i in held],
        }
        if statistic == "mean":
            # The same constants, late wake-ups drawn at random: the simulated median step
            # against the measured one (the protocol), on the held-out half.
            samples = RankSimulator(g, cluster, calibrated, leaves=leaves).step_time_samples(
                [pls[i] for i in held], draws, seed=seed)
            med = _measured(rec, "median")
            entry["sampled_median_held_out"] = agreement(np.median(samples, axis=1), med[held])
            entry["expected_vs_median_held_out"] = agreement(glob[held], med[held])
        halves = _pass_halves(rec, statistic)
        if halves is not None:
            # The measurement's own repeatability: the first half of the passes against the second.
            entry["pass1_vs_pass2"] = agreement(*halves)
            entry["pass1_vs_pass2_held_out"] = agreement(halves[0][held], halves[1][held])
        sleeps = [[e.end - e.start for e in sched.events if e.kind == "wait"]
                  for sched in (RankSimulator(g, cluster, calibrated, leaves=leaves).simulate(p) for p in pls)]
        entry["slow_steps"] = {**_slow_steps(rec, [len(x) for x in sleeps]), **_wait_excess(rec, sleeps)}
        out["per_model"][rec["model"]] = entry
    for k in range(1, splits + 1):
        parts = [_halves(len(meas), seed + k) for _, _, _, meas, _, _ in cases]
        _, costs = calibrate([fit for fit, _ in parts])
        for (rec, g, leaves, meas, _, _), (_, held) in zip(cases, parts):
            sim = RankSimulator(g, cluster, costs, leaves=leaves).step_times([rec["placements"][i] for i in held])
            score = agreement(sim, meas[held])
            entry = out["per_model"][rec["model"]].setdefault("splits", {"spearman": [], "mape": [], "ceiling": []})
            entry["spearman"].append(score["spearman"])
            entry["mape"].append(score["mape"])
            if statistic == "mean":
                sim_s = RankSimulator(g, cluster, costs, leaves=leaves).step_time_samples(
                    [rec["placements"][i] for i in held], draws, seed=seed + k)
                med = _measured(rec, "median")[held]
                for name, pred in (("sampled_median", np.median(sim_s, axis=1)), ("expected_vs_median", sim)):
                    got = agreement(pred, med)
                    entry.setdefault(f"{name}_spearman", []).append(got["spearman"])
                    entry.setdefault(f"{name}_mape", []).append(got["mape"])
            halves = _pass_halves(rec, statistic)
            if halves is not None:
                entry["ceiling"].append(agreement(halves[0][held], halves[1][held])["spearman"])
    return out


def render(results: dict[str, Any], analysis: dict[str, Any]) -> str:
    """The markdown summary table of one statistic's analysis."""
    lines = ["| model | ops | placements | raw Spearman | raw MAPE | per-model fit: held-out Spearman | held-out MAPE | "
             "calibrated: held-out Spearman | held-out MAPE | calibrated, all: Spearman | MAPE | "
             "pass 1 vs 2: Spearman | MAPE |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rec in results["models"]:
        e = analysis["per_model"][rec["model"]]
        pp = e.get("pass1_vs_pass2", {})
        lines.append(
            f"| {rec['model']} | {rec['ops']} | {len(rec.get('placements') or rec['rows'])} | {e['raw_all']['spearman']:.2f} | "
            f"{e['raw_all']['mape']:.1%} | {e['per_model_held_out']['spearman']:.2f} | "
            f"{e['per_model_held_out']['mape']:.1%} | {e['global_held_out']['spearman']:.2f} | "
            f"{e['global_held_out']['mape']:.1%} | {e['global_all']['spearman']:.2f} | {e['global_all']['mape']:.1%} | "
            f"{pp.get('spearman', float('nan')):.2f} | {pp.get('mape', float('nan')):.1%} |")
    return "\n".join(lines)


def render_splits(results: dict[str, Any], analysis: dict[str, Any]) -> str:
    """Markdown: the calibrated fit's held-out agreement over many random halves, and the
    steps' slow mode (empty when the analysis ran without ``splits``)."""
    rows = [(rec["model"], analysis["per_model"][rec["model"]]) for rec in results["models"]]
    if not all("splits" in e for _, e in rows):
        return ""
    lines = ["| model | halves | held-out Spearman: mean (min-max) | held-out MAPE: mean (max) | "
             "pass halves on the same held-out placements: Spearman mean | slow steps: median share | "
             "slow-step jump | Spearman(slow share, sleeping waits) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model, e in rows:
        sp, mp, ce = (np.array(e["splits"][k], dtype=float) for k in ("spearman", "mape", "ceiling"))
        slow = e["slow_steps"]
        lines.append(f"| {model} | {sp.size} | {sp.mean():.2f} ({sp.min():.2f}-{sp.max():.2f}) | {mp.mean():.1%} "
                     f"({mp.max():.1%}) | {ce.mean() if ce.size else float('nan'):.2f} | {slow['median_share']:.2f} | "
                     f"{slow['median_jump_s'] * 1e3:.1f} ms | {slow['spearman_with_sleeping_waits']:.2f} |")
    if all("excess_s_per_sleeping_wait" in e["slow_steps"] for _, e in rows):
        keys = [k for k in rows[0][1]["slow_steps"] if k.startswith("excess_spearman_sleeps_over_")]
        lines += ["", "The slow tail's weight (mean step minus 10th-percentile step) against the simulated sleeping "
                  "waits, counting only waits that sleep longer than a threshold:", "",
                  "| model | " + " | ".join(f"Spearman, sleeps > {k.rsplit('_', 1)[1]}" for k in keys)
                  + " | per sleeping wait | with none |", "|---|" + "---:|" * (len(keys) + 2)]
        for model, e in rows:
            sl = e["slow_steps"]
            lines.append(f"| {model} | " + " | ".join(f"{sl[k]:.2f}" for k in keys)
                         + f" | {sl['excess_s_per_sleeping_wait'] * 1e6:.0f} us | "
                         f"{sl['excess_s_without_sleeping_waits'] * 1e3:.2f} ms |")
    if all("sampled_median_spearman" in e["splits"] for _, e in rows):
        lines += ["", "The same fits scored against the measured MEDIAN step (held-out halves, mean over the splits):", "",
                  "| model | simulated median (late wake-ups drawn): Spearman mean (min-max) | MAPE mean (max) | "
                  "expected step vs measured median: Spearman mean (min-max) | MAPE mean (max) |",
                  "|---|---:|---:|---:|---:|"]
        for model, e in rows:
            cells = []
            for name in ("sampled_median", "expected_vs_median"):
                sp, mp = (np.array(e["splits"][f"{name}_{k}"], dtype=float) for k in ("spearman", "mape"))
                cells += [f"{sp.mean():.2f} ({sp.min():.2f}-{sp.max():.2f})", f"{mp.mean():.1%} ({mp.max():.1%})"]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_run(results: dict[str, Any]) -> str:
    """Markdown for a whole run: command, load, links, both statistics, the fitted constants."""
    out = [f"Command: `{results['command']}`", ""]
    if results.get("pooled"):
        out += ["Passes pooled from the runs:", ""] + [f"- `{c}`" for c in results["pooled"]] + [""]
    out += [f"Started {results['started_utc']} UTC; load average at the start {results['load_at_start']} "
            f"(1/5/15 min, 2 cores); ping-pong link {results['links']} (latency s, bandwidth B/s).", "",
            "Load per model and pass (1-min average before -> after):", ""]
    for rec in results["models"]:
        out.append(f"- {rec['model']}: " + "; ".join(f"{p['load_before'][0]} -> {p['load_after'][0]} ({p['seconds']} s)"
                                                    for p in rec["passes"]))
    for statistic, analysis in results.get("analysis", {}).items():
        constants = ", ".join(f"{k} = {v:.3g}" for k, v in analysis["global_costs"].items() if v is not None)
        out += ["", f"Measured = {statistic} step:", "", render(results, analysis), "",
                f"Calibrated constants (host from CPU time; op scale, latency, wake-up from steps): {constants}"]
        more = render_splits(results, analysis)
        if more:
            out += ["", f"Measured = {statistic} step, calibrated fit redone on other random halves:", "", more]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["rnnlm", "nmt", "gpt2", "moe", "resnet50", "inception_v3"])
    parser.add_argument("--size", default="small")
    parser.add_argument("--devices", default="cpu:0,cpu:1")
    parser.add_argument("--placements", type=int, default=24)
    parser.add_argument("--passes", type=int, default=2, help="measure every placement this many times (fresh jobs)")
    parser.add_argument("--seed", type=int,
                        help="the placements' seed (default 0); the fit halves are drawn with seed + 1. With "
                             "--analyse the default is the record's own seed, so its tables come out as recorded")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", help="JSON file for the measurements and the analysis")
    parser.add_argument("--analyse", nargs="+",
                        help="redo the analysis of JSON file(s) written by earlier runs; the passes of runs "
                             "that measured the same placements are pooled")
    parser.add_argument("--markdown", help="also write the summary (command, load, tables, constants) here")
    parser.add_argument("--compact", help="also write the results with each placement as a row of rank digits over the ops here")
    parser.add_argument("--statistics", nargs="+", choices=("mean", "median", "fastest"),
                        default=["mean", "median", "fastest"],
                        help="which statistic of each placement's measured steps to fit and score (each in turn)")
    parser.add_argument("--late-p", type=float,
                        help="hold the late wake-up probability (RankCosts.late_p) at this value instead of "
                             "fitting it (mean and median; the plain wake-up is then fitted)")
    parser.add_argument("--splits", type=int, default=0,
                        help="also redo the calibrated fit on this many other random halves and report the spread")
    args = parser.parse_args(argv)
    if not args.out and not args.analyse:
        parser.error("give --out (measure) or --analyse FILE")

    if args.analyse:
        path = Path(args.out) if args.out else None  # never overwrite the analysed records
        results = _pool([json.loads(Path(a).read_text()) for a in args.analyse])
        seed = record_seed(results) if args.seed is None else args.seed
    else:
        import torch

        from envs.runtime.distributed.launcher import measure_links

        seed = 0 if args.seed is None else args.seed
        load0 = _load()
        links = measure_links(args.devices)
        results = {
            "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
            "what": "step times MEASURED through the multi-process runtime (DistributedMeasurer) vs SIMULATED "
                    "by envs.sim.ranks, before and after fitting RankCosts",
            "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "load_at_start": load0,
            "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
            "devices": args.devices, "links": {f"{a}->{b}": list(v) for (a, b), v in links.items()},
            "warmup": args.warmup, "repeats": args.repeats, "seed": seed, "models": [],
        }
        print(f"links: {results['links']} (load {load0})", flush=True)
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            results["models"].append(measure_model(name, args.size, args.devices, links, args.placements, seed,
                                                   args.warmup, args.repeats, args.passes, args.timeout))
            assert path is not None
            path.write_text(json.dumps(results, indent=1) + "\n")  # partial results survive a crash
    results["analysis"] = {}
    for statistic in args.statistics:
        try:
            analysis = analyse(results, seed + 1, statistic, splits=args.splits, late_p=args.late_p)
        except ValueError as exc:  # a record today's capture or grouping cannot read: say so, no traceback
            print(f"error: {exc}", file=sys.stderr)
            return 2
        results["analysis"][statistic] = analysis
        if path is not None:
            path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"measured = {statistic} step")
        print(render(results, analysis))
        if args.splits:
            print(render_splits(results, analysis))
        print("global constants:", {k: None if v is None else f"{v:.3g}" for k, v in analysis["global_costs"].items()})
    if args.markdown:
        Path(args.markdown).write_text(render_run(results) + "\n")
    if args.compact:
        slim = {k: v for k, v in compact(results).items() if k != "analysis"}  # the tables are in --markdown
        Path(args.compact).write_text(json.dumps(slim, separators=(",", ":")) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
