"""Saving and loading placement graphs: node-link JSON (``.json``) or GraphML (``.graphml``).

JSON keeps every attribute as is. GraphML holds only scalars, so on save the per-kind
time dicts are flattened (``time`` → ``time_cpu``, ``time_cuda``; likewise ``fwd_time``
and ``bwd_time``, and the micro-batch profile's ``fwd_fixed`` and ``bwd_fixed``,
:mod:`graphs.profile.batch_scaling`) and any other list, dict or None value is stored as
JSON text; the names of the JSON-encoded attributes travel in the file so loading
restores them exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import networkx as nx

from graphs.atomic_write import atomic_path, write_text_atomic
from graphs.errors import GraphError

TIME_DICTS = ("fwd_time", "bwd_time", "time")
#: Per-kind dicts a node has only when the graph was profiled on a micro-batch too.
FIXED_DICTS = ("fwd_fixed", "bwd_fixed")
_KIND_DICTS = TIME_DICTS + FIXED_DICTS
_JSON_ATTRS_KEY = "placer_json_attrs"
_TIME_KINDS_KEY = "placer_time_kinds"
FORMATS = (".json", ".graphml")


def graph_format(path: str | Path) -> str:
    """The format of a graph file from its name: ".json" or ".graphml" (GraphError otherwise)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise GraphError(f"cannot tell the graph format of {str(path)!r}: expected a .json "
                         "(node-link) or .graphml file name")
    return suffix


def save_graph(graph: nx.DiGraph, path: str | Path) -> Path:
    """Write ``graph`` to ``path`` (format from the extension); returns the path."""
    file = Path(path)
    fmt = graph_format(file)
    if file.parent and not file.parent.exists():
        file.parent.mkdir(parents=True, exist_ok=True)
    if fmt == ".json":
        data = nx.node_link_data(graph, edges="edges")
        write_text_atomic(file, json.dumps(data, indent=1, default=_json_default))
    else:
        with atomic_path(file) as tmp:
            nx.write_graphml(flatten_for_graphml(graph), tmp)
    return file


def load_graph(path: str | os.PathLike[str]) -> nx.DiGraph:
    """Read a graph written by :func:`save_graph` (or any node-link JSON / GraphML file)."""
    file = Path(path)
    fmt = graph_format(file)
    if not file.is_file():
        raise GraphError(f"graph file {str(file)!r} does not exist")
    try:
        if fmt == ".json":
            data = json.loads(file.read_text())
            key = "edges" if "edges" in data else "links"
            graph = nx.node_link_graph(data, directed=True, edges=key)
        else:
            graph = unflatten_from_graphml(nx.read_graphml(file))
    except GraphError:
        raise
    except Exception as exc:  # malformed JSON/XML or a file of another shape
        raise GraphError(f"cannot read graph file {str(file)!r}: {type(exc).__name__}: "
                         f"{(str(exc).splitlines() or [''])[0]}; expected a file written by "
                         "placer graph --save") from None
    return nx.DiGraph(graph)


def _json_default(value: Any) -> Any:
    # numpy scalars and similar leak in from profilers: store their Python value.
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _needs_json(value: Any) -> bool:
    return value is None or isinstance(value, (list, tuple, dict, set))


def _json_names(items: list[dict]) -> set[str]:
    """Attribute names with any non-scalar value: every value under such a name is stored as JSON."""
    return {k for attrs in items for k, v in attrs.items()
            if _needs_json(v) and not (k in _KIND_DICTS and isinstance(v, dict))}


def _encode(attrs: dict, json_names: set[str], kinds: set[str]) -> dict:
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if key in _KIND_DICTS and isinstance(value, dict):
            for kind, seconds in value.items():
                out[f"{key}_{kind}"] = float(seconds)
                kinds.add(str(kind))
        elif key in json_names:
            out[key] = json.dumps(value, default=_json_default)
        elif hasattr(value, "item") and not isinstance(value, (str, bytes)):
            out[key] = value.item()
        else:
            out[key] = value
    return out


def flatten_for_graphml(graph: nx.DiGraph) -> nx.DiGraph:
    """A copy of ``graph`` with only scalar attributes (see the module doc)."""
    json_names = _json_names([d for _, d in graph.nodes(data=True)]
                             + [d for _, _, d in graph.edges(data=True)] + [dict(graph.graph)])
    kinds: set[str] = set()
    flat = nx.DiGraph()
    for node, attrs in graph.nodes(data=True):
        flat.add_node(node, **_encode(attrs, json_names, kinds))
    for u, v, attrs in graph.edges(data=True):
        flat.add_edge(u, v, **_encode(attrs, json_names, kinds))
    flat.graph.update(_encode(dict(graph.graph), json_names, kinds))
    flat.graph[_JSON_ATTRS_KEY] = json.dumps(sorted(json_names))
    flat.graph[_TIME_KINDS_KEY] = json.dumps(sorted(kinds))
    return flat


def _kind_entry(key: str) -> tuple[str, str] | None:
    """``("fwd_time", "cpu")`` for the flattened ``fwd_time_cpu``; None for any other key."""
    for name in _KIND_DICTS:
        if key.startswith(f"{name}_"):
            return name, key[len(name) + 1:]
    return None


def _decode(attrs: dict, json_names: set[str], has_time: bool) -> dict:
    out: dict[str, Any] = {name: {} for name in TIME_DICTS} if has_time else {}
    for key, value in attrs.items():
        entry = _kind_entry(key) if has_time else None
        if entry is not None:
            out.setdefault(entry[0], {})[entry[1]] = value
        elif key in json_names and isinstance(value, str):
            out[key] = json.loads(value)
        else:
            out[key] = value
    return out


def unflatten_from_graphml(flat: nx.DiGraph) -> nx.DiGraph:
    """Undo :func:`flatten_for_graphml`: time dicts and JSON-encoded attributes come back."""
    json_names = set(json.loads(flat.graph.get(_JSON_ATTRS_KEY, "[]")))
    placer_file = _TIME_KINDS_KEY in flat.graph
    graph = nx.DiGraph()
    for node, attrs in flat.nodes(data=True):
        graph.add_node(node, **_decode(attrs, json_names, placer_file))
    for u, v, attrs in flat.edges(data=True):
        graph.add_edge(u, v, **_decode(attrs, json_names, False))
    # read_graphml adds node_default/edge_default bookkeeping; they are not the graph's attributes.
    skip = (_JSON_ATTRS_KEY, _TIME_KINDS_KEY, "node_default", "edge_default")
    meta = {k: v for k, v in flat.graph.items() if k not in skip}
    graph.graph.update(_decode(meta, json_names, False))
    return graph
