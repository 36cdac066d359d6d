"""Placement files: a placement saved as JSON, and refused when it does not fit.

A placement file holds the node → device assignment, the fingerprint of the model it
was made for, the device list and free-form metadata (model name, cluster, step time,
whether that time was simulated or measured)::

    {
      "schema_version": 1,
      "fingerprint": "…",
      "devices": ["gpu0", "gpu1"],
      "assignment": {"conv1": "gpu0", "fc": "gpu1"},
      "metadata": {"model": "resnet50", "cluster": "4xK40", "step_time": 0.12, "source": "simulated"},
      "pipeline": {"stages": [["conv1"], ["fc"]], "devices": ["gpu0", "gpu1"],
                   "microbatches": 4, "schedule": "1f1b"}
    }

``pipeline`` (schema version 2, optional; absent or null: un-pipelined) makes the placement pipelined
(:class:`envs.sim.pipeline_layout.Pipeline`): its stages are the assignment's nodes cut in stage
order, each stage on the device the assignment gives its nodes. Version 1 files (no
pipeline) still load.

Loading checks the file against the model (fingerprint, node names) and the devices at
hand, and raises :class:`PlacementFileError` naming what did not match.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from envs.runtime.apply import placement_device_map
from envs.runtime.device_map import accelerate_device_map
from envs.sim.pipeline_layout import Pipeline, PipelineError
from graphs.atomic_write import write_text_atomic
from graphs.documents import read_document
from graphs.errors import CaptureError, PlacerError

__all__ = [
    "SCHEMA_VERSION",
    "READABLE_VERSIONS",
    "Placement",
    "PlacementFileError",
    "save_placement",
    "load_placement",
    "to_device_map",
    "save_device_map",
]

#: Version of the placement-file layout; bump when fields change meaning (2: ``pipeline``).
SCHEMA_VERSION = 2
#: The versions this placer reads (1: before pipelines).
READABLE_VERSIONS = (1, 2)


class PlacementFileError(PlacerError):
    """A placement file that is malformed or does not fit the model or the devices."""


@dataclass
class Placement:
    """A placement of one model on a set of devices.

    Attributes:
        assignment: node name → device name.
        fingerprint: fingerprint of the model the placement was made for.
        devices: the device names the placement may use (order is kept).
        metadata: free-form, JSON-serialisable details (``model``, ``cluster``,
            ``step_time``, ``source`` = "simulated" | "measured", …).
        schema_version: the file layout version.
        pipeline: the stages, micro-batches and schedule of a pipelined placement, or None.
    """

    assignment: dict[str, str]
    fingerprint: str
    devices: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    pipeline: Pipeline | None = None

    def __post_init__(self) -> None:
        unknown = sorted({d for d in self.assignment.values()} - set(self.devices))
        if unknown:
            raise PlacementFileError(
                f"placement assigns nodes to {unknown}, which are not in its device list {self.devices}"
            )
        if self.pipeline is not None:
            staged = self.pipeline.assignment()
            if set(staged) != set(self.assignment):
                odd = sorted(set(staged) ^ set(self.assignment))
                raise PlacementFileError(f"the pipeline's stages hold other nodes than the assignment, e.g. {odd[:3]}; "
                                         "expected the assignment's nodes cut into stages")
            wrong = sorted(n for n, d in staged.items() if self.assignment[n] != d)
            if wrong:
                n = wrong[0]
                raise PlacementFileError(f"node {n!r} is on {self.assignment[n]!r} in the assignment but its pipeline "
                                         f"stage is on {staged[n]!r}; expected the same device")

    def to_dict(self) -> dict[str, Any]:
        """The JSON document for this placement."""
        return {
            "schema_version": self.schema_version,
            "fingerprint": self.fingerprint,
            "devices": list(self.devices),
            "assignment": dict(sorted(self.assignment.items())),
            "metadata": dict(self.metadata),
            **({"pipeline": self.pipeline.to_dict()} if self.pipeline is not None else {}),
        }


def _json_default(value: Any) -> Any:
    # Metadata often carries numpy scalars/arrays (step times, counts) and paths.
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_placement(placement: Placement, path: str | os.PathLike) -> Path:
    """Write ``placement`` as JSON to ``path`` (atomically: a partial file never replaces a good one).

    Raises:
        PlacementFileError: metadata that JSON cannot represent.
    """
    path = Path(path)
    try:
        text = json.dumps(placement.to_dict(), indent=2, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise PlacementFileError(f"placement metadata cannot be written as JSON: {exc}") from exc
    write_text_atomic(path, text + "\n")
    return path


def _graph_nodes_and_fingerprint(graph: Any) -> tuple[set[str] | None, str | None]:
    if graph is None:
        return None, None
    g = graph.graph if hasattr(graph, "gm") else graph  # a CapturedModel or a networkx graph
    if not isinstance(g, nx.Graph):
        raise PlacementFileError(
            f"expected a placement graph (networkx) or a CapturedModel; got {type(graph).__name__}"
        )
    fp = getattr(graph, "fingerprint", None) or g.graph.get("fingerprint")
    return {str(n) for n in g.nodes}, fp


def recorded_model_args(placement: Placement, given: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The model arguments to rebuild ``placement``'s model with: ``given`` when there are any,
    else those ``optimize`` recorded in the file (``metadata["model_args"]``); and whether they
    came from the file.

    >>> p = Placement({}, "fp", [], {"model_args": {"layers": 4}})
    >>> recorded_model_args(p, {}), recorded_model_args(p, {"layers": 2})
    (({'layers': 4}, True), ({'layers': 2}, False))
    """
    recorded = _recorded(placement, "model_args", given, dict)
    return dict(recorded if recorded is not None else given), recorded is not None


def _recorded(placement: Placement, key: str, given: Any, kind: type) -> Any:
    """``metadata[key]`` when nothing was ``given`` and the file holds a non-empty ``kind`` there
    (what to rebuild the model with), else None: the caller's own arguments win."""
    recorded = placement.metadata.get(key)
    return recorded if not given and isinstance(recorded, kind) and recorded else None


def recorded_leaf_modules(placement: Placement, given: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
    """The leaf modules to capture ``placement``'s model with: ``given`` when there are any,
    else the module paths ``optimize`` kept whole (``metadata["leaf_modules"]``, from ``--leaf``);
    and whether they came from the file.

    >>> p = Placement({}, "fp", [], {"leaf_modules": ["encoder.rnn"]})
    >>> recorded_leaf_modules(p, ()), recorded_leaf_modules(p, ("Block",))
    ((('encoder.rnn',), True), (('Block',), False))
    """
    recorded = _recorded(placement, "leaf_modules", given, list)
    return tuple(recorded if recorded is not None else given), recorded is not None


@contextlib.contextmanager
def naming_recorded_leaves(path: str | os.PathLike, leaves: tuple[str, ...], recorded: bool) -> Iterator[None]:
    """Within the block (a capture with ``leaves``), a leaf module the model does not have says,
    when ``recorded`` (they came from the file at ``path``, :func:`recorded_leaf_modules`),
    where it came from and what to do.

    Raises:
        CaptureError: the capture's, with that added.
    """
    try:
        yield
    except CaptureError as exc:
        if recorded and str(exc).startswith("leaf module"):
            raise CaptureError(f"{exc}; {path} was made with the leaf modules {', '.join(leaves)} (optimize --leaf, "
                               "recorded in the file): a placement of another model, or give this model's "
                               "modules with --leaf") from None
        raise


def unchecked_note(placement: Placement) -> str | None:
    """What ``placer apply`` and ``placer show`` print for a placement never checked numerically
    against its model (``metadata["checked"]`` false: a best_placement.json, or ``--no-check``);
    None for a checked one or a file that does not say.

    >>> unchecked_note(Placement({}, "fp", [], {"checked": True})) is None
    True
    """
    if placement.metadata.get("checked") is not False:
        return None
    return ("this placement was not checked numerically against the model (a best_placement.json kept while "
            "a run went on, or a run with --no-check); optimize writes placement.json after checking it")


def load_placement(
    path: str | os.PathLike,
    graph: Any = None,
    fingerprint: str | None = None,
    devices: Iterable[str] | None = None,
) -> Placement:
    """Read a placement file and check it against the model and devices at hand.

    Args:
        path: the JSON file.
        graph: the placement graph (or a CapturedModel): its fingerprint must match and
            the assignment must cover exactly its nodes.
        fingerprint: the model fingerprint to match (when no graph is given).
        devices: device names available now; every assigned device must be one of them.

    Raises:
        PlacementFileError: unreadable or malformed JSON, a missing or unsupported
            schema version, missing fields, a fingerprint of another model, an unknown
            device, or missing/extra nodes.
    """
    path = Path(path)
    return check_loaded_placement(read_placement(path), path, graph, fingerprint, devices)


def read_placement(path: str | os.PathLike) -> Placement:
    """Read a placement file, unchecked against any model or devices (:func:`load_placement`
    with none given): a caller that checks the same file against them later
    (:func:`check_loaded_placement`) reads it once.

    Raises:
        PlacementFileError: unreadable or malformed JSON, a missing or unsupported schema
            version, missing fields.
    """
    path = Path(path)
    doc = read_document(path, PlacementFileError, "placement file", fmt="json")
    return _from_dict(doc, str(path))


def check_loaded_placement(
    placement: Placement,
    path: str | os.PathLike,
    graph: Any = None,
    fingerprint: str | None = None,
    devices: Iterable[str] | None = None,
) -> Placement:
    """``placement``, read from ``path`` (:func:`read_placement`), checked against the model and
    devices at hand as :func:`load_placement` checks it; the arguments are its.

    Raises:
        PlacementFileError: a fingerprint of another model, an unknown device, or
            missing/extra nodes.
    """
    nodes, graph_fp = _graph_nodes_and_fingerprint(graph)
    expected_fp = fingerprint or graph_fp
    if expected_fp is not None and placement.fingerprint != expected_fp:
        made_with = placement.metadata.get("model_args")
        leaves = placement.metadata.get("leaf_modules")
        hint = (f"; it was made with the model arguments {made_with}" if isinstance(made_with, dict) and made_with
                else "")
        if isinstance(leaves, list) and leaves:
            hint += f"; it was made with the leaf modules {', '.join(map(str, leaves))} (--leaf)"
        raise PlacementFileError(
            f"{path} was made for another model: its fingerprint is {placement.fingerprint!r}, "
            f"the model's is {expected_fp!r}{hint}"
        )
    if devices is not None:
        devices = [str(d) for d in devices]
        unknown = sorted(set(placement.assignment.values()) - set(devices))
        if unknown:
            raise PlacementFileError(
                f"{path} places nodes on unknown device(s) {unknown}; available devices are {devices}"
            )
    if nodes is not None:
        missing = sorted(nodes - set(placement.assignment))
        extra = sorted(set(placement.assignment) - nodes)
        if missing:
            raise PlacementFileError(
                f"{path} misses {len(missing)} node(s) of the model, e.g. {missing[:5]}"
            )
        if extra:
            raise PlacementFileError(
                f"{path} places {len(extra)} node(s) the model does not have, e.g. {extra[:5]}"
            )
    return placement


def _from_dict(doc: Any, where: str) -> Placement:
    if not isinstance(doc, dict):
        raise PlacementFileError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    if "schema_version" not in doc:
        raise PlacementFileError(f"{where} has no schema_version; expected schema_version {SCHEMA_VERSION}")
    version = doc["schema_version"]
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise PlacementFileError(
            f"{where} has schema_version {version!r}; this placer reads schema_version "
            f"{' or '.join(map(str, READABLE_VERSIONS))}"
        )
    missing = [k for k in ("fingerprint", "devices", "assignment") if k not in doc]
    if missing:
        raise PlacementFileError(f"{where} lacks the field(s) {missing}")
    fp, devs, assign = doc["fingerprint"], doc["devices"], doc["assignment"]
    if not isinstance(fp, str):
        raise PlacementFileError(f"{where}: fingerprint must be a string, got {fp!r}")
    if not isinstance(devs, list) or not all(isinstance(d, str) for d in devs):
        raise PlacementFileError(f"{where}: devices must be a list of device names, got {devs!r}")
    twice = sorted({d for d in devs if devs.count(d) > 1})
    if twice:  # show counted such a device's ops once per listing
        raise PlacementFileError(f"{where}: device {twice[0]!r} is listed twice in devices; expected each once")
    if not isinstance(assign, dict) or not all(isinstance(v, str) for v in assign.values()):
        raise PlacementFileError(f"{where}: assignment must map node names to device names")
    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict):
        raise PlacementFileError(f"{where}: metadata must be an object, got {type(metadata).__name__}")
    _check_metadata(metadata, where)
    pipeline = None
    # null is JSON's "none": a user un-pipelining a placement by hand wrote "pipeline": null
    # and got "pipeline must be an object, got NoneType".
    if doc.get("pipeline") is not None:
        if version < 2:
            raise PlacementFileError(f"{where} has a pipeline but schema_version {version}; pipelines need version 2")
        try:
            pipeline = Pipeline.from_dict(doc["pipeline"])
        except PipelineError as exc:
            raise PlacementFileError(f"{where}: {exc}") from exc
    try:
        return Placement(assignment=dict(assign), fingerprint=fp, devices=list(devs), metadata=metadata,
                         schema_version=int(version), pipeline=pipeline)
    except PlacementFileError as exc:
        raise PlacementFileError(f"{where}: {exc}") from exc


def _is_time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


#: The metadata placer writes and reads back (``show``, ``apply``, ``--resume``): key →
#: (check, what is expected). Other keys are the user's and pass through unchecked.
_METADATA_TYPES: dict[str, tuple[Any, str]] = {
    "model": (lambda v: isinstance(v, str), "a model name (string)"),
    "cluster": (lambda v: isinstance(v, str), "a cluster name or spec path (string)"),
    "cluster_spec": (lambda v: isinstance(v, str), "the cluster's spec file path (string)"),
    "simulated_cluster": (lambda v: isinstance(v, bool), "true or false"),
    "step_time": (lambda v: v is None or _is_time(v), "seconds per step (a non-negative number)"),
    "source": (lambda v: isinstance(v, str), "'simulated' or 'measured'"),
    "method": (lambda v: isinstance(v, str), "a method name (string)"),
    "reward": (lambda v: isinstance(v, str), "a reward mode (string)"),
    "phase": (lambda v: isinstance(v, str), "a search phase (string)"),
    "real_devices": (lambda v: isinstance(v, dict) and all(isinstance(x, str) and x for x in v.values()),
                     "a mapping of device names to torch device strings"),
    # Read back by apply and --resume to rebuild the model: another type was passed over as if
    # none had been recorded, and the model came back built with its defaults.
    "model_args": (lambda v: isinstance(v, dict), "a mapping of argument names to values (a JSON object)"),
    "leaf_modules": (lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v),
                     "a list of module paths (strings)"),
}


def _check_metadata(metadata: Mapping[str, Any], where: str) -> None:
    for key, (ok, expected) in _METADATA_TYPES.items():
        if key in metadata and not ok(metadata[key]):
            value = repr(metadata[key])
            raise PlacementFileError(
                f"{where}: metadata {key!r} is {value if len(value) <= 60 else value[:57] + '...'}; expected {expected}"
            )


def to_device_map(
    placement: Placement | Mapping[str, str], graph: Any, real_devices: Mapping[str, str] | None = None
) -> dict[str, str] | None:
    """The accelerate-style device_map of a module-aligned placement, else None.

    Args:
        placement: a :class:`Placement` or node → device mapping.
        graph: the placement graph (node attribute ``module``), a CapturedModel or a GraphModule.
        real_devices: optional device name → torch device string, so the map names real devices.
    """
    assignment = placement.assignment if isinstance(placement, Placement) else dict(placement)
    if real_devices is not None:
        assignment = {n: real_devices.get(d, d) for n, d in assignment.items()}
    # A CapturedModel carries the placement graph; a GraphModule or nx graph is used as is.
    g = graph.graph if hasattr(graph, "gm") else graph
    return placement_device_map(g, assignment)


def save_device_map(
    placement: Placement | Mapping[str, str],
    graph: Any,
    path: str | os.PathLike,
    real_devices: Mapping[str, str] | None = None,
    model: Any = None,
) -> Path:
    """Write ``device_map.json`` for ``accelerate.dispatch_model`` (see :func:`accelerate_device_map`).

    Args:
        real_devices: device name → torch device; the map must name real devices.
        model: the user's model, so every parameter and buffer is covered.

    Raises:
        PlacementFileError: accelerate cannot express the placement (a module's ops split
            across devices, simulated device names, CPU next to a GPU); the message says which.
    """
    assignment = placement.assignment if isinstance(placement, Placement) else dict(placement)
    if real_devices is not None:
        assignment = {n: real_devices.get(d, d) for n, d in assignment.items()}
    g = graph.graph if hasattr(graph, "gm") else graph
    device_map, reason = accelerate_device_map(g, assignment, model=model)
    if device_map is None:
        raise PlacementFileError(f"no device_map for this placement: {reason}; use the placement file instead")
    path = Path(path)
    write_text_atomic(path, json.dumps(device_map, indent=2) + "\n")
    return path
