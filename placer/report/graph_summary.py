"""What ``placer graph`` reports about a prepared model: a dict (for --json) and its text form."""

from __future__ import annotations

from typing import Any

import networkx as nx

from envs.hardware.units import format_bytes


def _fmt_flops(n: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} FLOP"


def _fmt_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def total_time(graph: nx.DiGraph) -> dict[str, float]:
    """Sum of node ``time`` (forward + backward + optimizer update seconds) per profiled device kind."""
    kinds = list(graph.graph.get("profiled_kinds") or [])
    return {k: float(sum(d.get("time", {}).get(k, 0.0) for _, d in graph.nodes(data=True))) for k in kinds}


#: The phases of a node's profiled time, by the node attribute that holds each.
PHASES = {"forward": "fwd_time", "backward": "bwd_time", "optimizer": "opt_time"}


def time_by_phase(graph: nx.DiGraph) -> dict[str, dict[str, float]]:
    """Per profiled device kind, the summed node seconds of each phase (:data:`PHASES`)."""
    kinds = list(graph.graph.get("profiled_kinds") or [])
    return {k: {phase: float(sum((d.get(attr) or {}).get(k, 0.0) for _, d in graph.nodes(data=True)))
                for phase, attr in PHASES.items()} for k in kinds}


def top_ops(graph: nx.DiGraph, count: int) -> list[dict[str, Any]]:
    """The ``count`` most expensive ops: by time on the first profiled kind, else by FLOPs."""
    kinds = list(graph.graph.get("profiled_kinds") or [])
    if kinds:
        kind = kinds[0]
        key = lambda item: item[1].get("time", {}).get(kind, 0.0)  # noqa: E731
    else:
        key = lambda item: item[1].get("flops", 0)  # noqa: E731
    ranked = sorted(graph.nodes(data=True), key=key, reverse=True)[: max(count, 0)]
    return [
        {"name": name, "op": d["op"], "target": d["target"], "module": d["module"],
         "module_type": d.get("module_type", ""), "shape": d["shape"],
         "flops": d["flops"], "out_bytes": d["out_bytes"], "time": dict(d.get("time", {})),
         "opt_time": dict(d.get("opt_time") or {})}
        for name, d in ranked
    ]


def graph_summary(prepared: Any, top: int = 10) -> dict[str, Any]:
    """Machine-readable summary of a :class:`graphs.pipeline.Prepared` (the ``--json`` output)."""
    spec, cap = prepared.spec, prepared.captured
    graph = cap.graph
    params = sum(p.numel() for p in spec.model.parameters())
    times = total_time(graph)
    return {
        "name": spec.name,
        "source": spec.path,
        "capture": cap.method,
        "fx_error": cap.fx_error,
        "fingerprint": cap.fingerprint,
        "nodes": graph.number_of_nodes(),
        "edges": graph.number_of_edges(),
        "groups": prepared.grouping.graph.number_of_nodes(),
        "params": int(params),
        "param_bytes": int(sum(d["param_bytes"] for _, d in graph.nodes(data=True))),
        "flops": int(sum(d["flops"] for _, d in graph.nodes(data=True))),
        "time": times,
        "time_by_phase": time_by_phase(graph),
        "time_source": ("measured (per-node profile, forward + backward + optimizer update, summed)"
                        if times else "not profiled"),
        "stage_seconds": {k: round(v, 4) for k, v in prepared.seconds.items()},
        "top_ops": top_ops(graph, top),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The readable form of :func:`graph_summary`."""
    lines = [
        f"model        {summary['name']}" + (f"  ({summary['source']})" if summary.get("source") else ""),
        f"captured by  torch.{summary['capture']}" + (
            f"  (fx could not trace it: {summary['fx_error']})" if summary.get("fx_error") else ""),
        f"fingerprint  {summary['fingerprint']}",
        f"nodes        {summary['nodes']:,}   edges {summary['edges']:,}   groups {summary['groups']:,}",
        f"parameters   {summary['params']:,} ({format_bytes(summary['param_bytes'])} with buffers)",
        f"forward      {_fmt_flops(summary['flops'])}",
    ]
    if summary["time"]:
        lines.append("step time    sum of measured node times (forward + backward + optimizer update):")
        phases = summary.get("time_by_phase") or {}
        for kind, seconds in summary["time"].items():
            split = phases.get(kind)
            detail = ("  = " + " + ".join(f"{_fmt_seconds(v)} {p}" for p, v in split.items())) if split else ""
            lines.append(f"  {kind:<10} {_fmt_seconds(seconds)}{detail}")
    else:
        lines.append("step time    not profiled (--no-profile)")
    ops = summary["top_ops"]
    if ops:
        kinds = list(summary["time"])
        by = f"{kinds[0]} time" if kinds else "FLOPs"
        lines.append(f"most expensive ops (by {by}):")
        rows = [("node", "op", "module", "shape", "FLOPs") + tuple(kinds)]
        # call_module targets are paths ("layer1.0"): the class name says more there.
        for op in ops:
            what = op["module_type"] if op["op"] == "call_module" and op.get("module_type") else op["target"]
            what = what[:-len(".default")] if what.endswith(".default") else what
            rows.append((op["name"], what, op["module"] or "-", "x".join(map(str, op["shape"] or [])) or "-",
                         _fmt_flops(op["flops"])) + tuple(_fmt_seconds(op["time"].get(k, 0.0)) for k in kinds))
        widths = [min(max(len(str(r[i])) for r in rows), 40) for i in range(len(rows[0]))]
        for row in rows:
            lines.append("  " + "  ".join(str(c)[:40].ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)
