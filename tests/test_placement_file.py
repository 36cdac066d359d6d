"""Placement files: round trip, every refusal with its message, device_map export."""

from __future__ import annotations

import json

import networkx as nx
import pytest
import torch.fx as fx
import torch.nn as nn

from graphs.errors import PlacerError
from placer.placement_file import (
    SCHEMA_VERSION,
    Placement,
    PlacementFileError,
    load_placement,
    save_device_map,
    save_placement,
    to_device_map,
)


def _graph() -> nx.DiGraph:
    g = nx.DiGraph(fingerprint="fp-abc", name="toy")
    for n, m in [("x", ""), ("emb", "emb"), ("l0", "layers.0"), ("l1", "layers.1"), ("head", "head"), ("output", "")]:
        g.add_node(n, module=m)
    nx.add_path(g, ["x", "emb", "l0", "l1", "head", "output"])
    return g


def _placement(**over) -> Placement:
    assignment = {"x": "gpu0", "emb": "gpu0", "l0": "gpu0", "l1": "gpu1", "head": "gpu1", "output": "gpu1"}
    kw = dict(assignment=assignment, fingerprint="fp-abc", devices=["gpu0", "gpu1"],
              metadata={"model": "toy", "cluster": "2xK40", "step_time": 0.0123, "source": "simulated"})
    kw.update(over)
    return Placement(**kw)


def test_round_trip(tmp_path):
    p = _placement()
    path = save_placement(p, tmp_path / "sub" / "p.json")
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == SCHEMA_VERSION and doc["fingerprint"] == "fp-abc"
    loaded = load_placement(path, graph=_graph(), devices=["gpu0", "gpu1", "gpu2"])
    assert loaded == p
    assert load_placement(path, fingerprint="fp-abc").metadata["source"] == "simulated"


def _write(tmp_path, doc) -> str:
    path = tmp_path / "p.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


@pytest.mark.parametrize(
    "mutate, kwargs, message",
    [
        (lambda d: "{not json", {}, "not valid JSON"),
        (lambda d: [1, 2], {}, "expected a JSON object"),
        (lambda d: {k: v for k, v in d.items() if k != "schema_version"}, {}, "no schema_version"),
        (lambda d: {**d, "schema_version": 99}, {}, "schema_version 99"),
        (lambda d: {k: v for k, v in d.items() if k != "assignment"}, {}, r"lacks the field\(s\) \['assignment'\]"),
        (lambda d: {**d, "devices": "gpu0"}, {}, "devices must be a list"),
        (lambda d: {**d, "assignment": {**d["assignment"], "x": "gpu7"}}, {}, "not in its device list"),
        (lambda d: d, {"fingerprint": "fp-other"}, "fp-abc.*fp-other"),
        (lambda d: d, {"devices": ["gpu0"]}, r"unknown device\(s\) \['gpu1'\]"),
        (lambda d: {**d, "assignment": {k: v for k, v in d["assignment"].items() if k != "l1"}},
         {"graph": "g"}, r"misses 1 node.*'l1'"),
        (lambda d: {**d, "assignment": {**d["assignment"], "ghost": "gpu0"}}, {"graph": "g"}, "does not have.*ghost"),
    ],
)
def test_refusals_say_what_was_wrong(tmp_path, mutate, kwargs, message):
    doc = mutate(_placement().to_dict())
    path = _write(tmp_path, doc)
    if kwargs.get("graph") == "g":
        kwargs = {**kwargs, "graph": _graph()}
    with pytest.raises(PlacementFileError, match=message):
        load_placement(path, **kwargs)


def test_a_pipeline_written_as_null_by_hand_means_an_un_pipelined_placement(tmp_path):
    path = _write(tmp_path, {**_placement().to_dict(), "pipeline": None})
    assert load_placement(path, graph=_graph()) == _placement()


def test_fingerprint_from_graph_is_checked(tmp_path):
    path = save_placement(_placement(), tmp_path / "p.json")
    g = _graph()
    g.graph["fingerprint"] = "fp-resnet"
    with pytest.raises(PlacementFileError, match="another model.*fp-abc.*fp-resnet"):
        load_placement(path, graph=g)


def test_numpy_metadata_is_written_as_plain_json(tmp_path):
    import numpy as np

    p = _placement(metadata={"step_time": np.float32(0.5), "groups": np.int64(7), "busy": np.array([1.0, 2.0])})
    loaded = load_placement(save_placement(p, tmp_path / "p.json"))
    assert loaded.metadata == {"step_time": 0.5, "groups": 7, "busy": [1.0, 2.0]}


def test_missing_file_and_bad_metadata(tmp_path):
    with pytest.raises(PlacementFileError, match="cannot read"):
        load_placement(tmp_path / "nope.json")
    with pytest.raises(PlacementFileError, match="JSON"):
        save_placement(_placement(metadata={"x": object()}), tmp_path / "p.json")
    assert issubclass(PlacementFileError, PlacerError)


def test_device_map_export(tmp_path):
    g = _graph()
    p = _placement()
    assert to_device_map(p, g) == {"emb": "gpu0", "layers.0": "gpu0", "layers.1": "gpu1", "head": "gpu1"}
    real = {"gpu0": "cuda:0", "gpu1": "cuda:1"}
    path = save_device_map(p, g, tmp_path / "device_map.json", real_devices=real)
    assert json.loads(path.read_text()) == {
        "emb": "cuda:0", "layers.0": "cuda:0", "layers.1": "cuda:1", "head": "cuda:1"}


def test_device_map_refused_when_not_module_aligned(tmp_path):
    g = _graph()
    g.add_node("l1b", module="layers.1")
    g.add_edge("l1", "l1b")
    p = _placement(assignment={**_placement().assignment, "l1b": "gpu0"})
    assert to_device_map(p, g) is None
    with pytest.raises(PlacementFileError, match="splits some module's own ops across devices"):
        save_device_map(p, g, tmp_path / "device_map.json", real_devices={"gpu0": "cuda:0", "gpu1": "cuda:1"})


def test_device_map_from_a_graph_module():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.b(self.a(x))

    gm = fx.symbolic_trace(Two())
    assert to_device_map({"x": "cpu", "a": "cpu", "b": "cuda:0", "output": "cuda:0"}, gm) == {
        "a": "cpu", "b": "cuda:0"}


def test_a_real_devices_map_edited_short_names_the_map_not_the_cluster():
    from placer.api import real_devices_of

    short = _placement(metadata={"real_devices": {"gpu0": "cpu"}})
    with pytest.raises(PlacementFileError, match=r"'real_devices' maps no real device for \['gpu1'\]"):
        real_devices_of(short)
    assert real_devices_of(_placement(metadata={"real_devices": {"gpu0": "cpu", "gpu1": "cpu"}})) == {
        "gpu0": "cpu", "gpu1": "cpu"}


def test_a_placement_without_a_real_devices_map_runs_on_the_cluster_it_names():
    """placer apply --help: the default cluster is the one recorded in the placement. Without a
    recorded map, a 4xK40 placement's 'gpu0' was taken for a torch device and refused."""
    from placer.api import real_devices_of

    named = _placement(metadata={"cluster": "4xK40", "simulated_cluster": True})
    assert real_devices_of(named) == {"cpu": "cpu", "gpu0": "cpu", "gpu1": "cpu", "gpu2": "cpu", "gpu3": "cpu"}
    assert real_devices_of(_placement(metadata={"cluster": "ranks(cpu:0,cpu:1)"})) == {"gpu0": "gpu0", "gpu1": "gpu1"}
