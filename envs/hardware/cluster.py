"""Devices, links and clusters: where a placement can put an op and what moving data costs.

A :class:`Cluster` is a list of :class:`Device` plus the :class:`Link` between every pair.
It comes from one of three places:

* a preset shipped in ``envs/hardware/presets/`` (``load_cluster("4xK40")``, see
  :func:`envs.hardware.loading.list_presets`),
* a spec file, YAML or JSON (``load_cluster("my_cluster.yaml")``)::

      name: two-gpus
      devices:
        - {name: cpu,  kind: cpu,  memory: 64GiB, peak_flops: 0.5T,  mem_bandwidth: 60GB/s}
        - {name: gpu0, kind: K40,  memory: 12GiB, peak_flops: 4.29T, mem_bandwidth: 288GB/s}
      links:
        - {between: [cpu, gpu0], latency: 10us, bandwidth: 12GB/s}
      default_link: {latency: 10us, bandwidth: 10GB/s}   # optional: any pair not listed

* the real machine (:func:`envs.hardware.loading.discover_cluster`): ``cpu`` and each ``cuda:i``, links measured
  by :mod:`envs.hardware.links`; such a cluster has ``simulated=False``.

Presets (figures and sources in each YAML file): ``4xK40`` and ``8xK40`` (PCIe gen3) hold a
``cpu`` device beside the GPUs ``gpu0..``, as in the setups of ColocRL and the hierarchical
planner, whose placements used the host CPU for some ops; ``4xV100-nvlink``,
``8xA100-nvlink`` and ``8xH100`` are GPU-only (NVLink machines keep every op on a GPU);
``cpu+gpu`` is one CPU and one A100 over PCIe gen4.

``memory`` is a size in the one byte grammar of :func:`envs.hardware.units.parse_bytes`
(accelerate's: ``16GB`` = 16 x 10**9 bytes, ``16GiB`` = 16 x 2**30; ``16G`` is refused as
ambiguous and a size must be at least one byte), the same grammar as ``--memory`` caps.
``peak_flops`` and ``mem_bandwidth`` take SI prefixes (``4.29T``, ``288GB/s``).

A placement may use a device's ``memory`` less its ``reserved`` bytes (optional, same
grammar; :attr:`Device.usable_bytes`): what the runtime holds before the first tensor. On a
GPU that is the CUDA context each process creates on it (the kernels' code, the cuBLAS and
cuDNN handles and workspaces) and whatever other processes hold there: PyTorch's
``memory_allocated`` never counts it, nvidia-smi does, and a placement that fills
``total_memory`` to the byte runs out of memory on the real GPU. On the real machine it is
measured (:mod:`envs.hardware.links`: ``total - free`` of ``torch.cuda.mem_get_info`` once the
context exists); in a spec without ``reserved`` a GPU reserves :data:`GPU_CONTEXT_BYTES`, a CPU
nothing.

A link listed once applies in both directions unless the reverse direction is listed too.
Without ``default_link`` every pair of devices must have a link: a missing one is a spec
error, so the simulator never meets a pair it cannot cost. Every problem in a spec raises
:class:`ClusterSpecError` naming the entry (``devices[2]``, ``links[0]``) and what was
expected.

Device kinds: ``cpu`` (real or virtual CPU), ``cuda`` (a real GPU, costed from profiles),
and the virtual GPU kinds ``K40``, ``V100``, ``A100``, ``H100``, ``H200`` (costed by the roofline
model of :mod:`envs.sim.cost_model`). A virtual device may name ``real_device`` (e.g.
``"cpu"``): the torch device it stands for when a placement is applied or measured on a
machine that lacks it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from envs.hardware.units import UnitError, parse_bandwidth, parse_bytes, parse_flops, parse_seconds
from graphs.documents import read_document
from graphs.errors import PlacerError

#: Kinds a device may have. "cuda" is a real GPU; the others are virtual GPU kinds.
DEVICE_KINDS: tuple[str, ...] = ("cpu", "cuda", "K40", "V100", "A100", "H100", "H200")
#: Kinds that stand for a GPU (virtual or real).
GPU_KINDS: frozenset[str] = frozenset({"cuda", "K40", "V100", "A100", "H100", "H200"})
#: What a GPU holds before the first tensor when its spec does not say (module doc): the CUDA
#: context of the process. Not measured here (no GPU): the PyTorch forums report 300-800 MiB
#: depending on the GPU, driver and CUDA version (723 MiB after ``torch.randn(1).cuda()`` in
#: https://discuss.pytorch.org/t/what-is-the-reason-for-pytorchs-gpu-memory-floor/73021).
#: A real machine's GPUs are measured instead, and ``benchmarks/gpu_check.py`` measures it
#: on the GPU it runs on.
GPU_CONTEXT_BYTES: int = 512 * 2**20

#: Figures a spec file may give a device (a typo such as ``peak_flops: 1e-300`` would make
#: every simulated op take 1e288 s). From a microcontroller to beyond today's largest
#: accelerators (an H200: ~1e15 FLOP/s dense bf16, 4.8e12 B/s HBM).
FLOPS_RANGE = (1e6, 1e18)
BANDWIDTH_RANGE = (1e6, 1e15)


class ClusterSpecError(PlacerError, ValueError):
    """A cluster spec (file, preset or arguments) that is malformed: the message names the entry."""


@dataclass(frozen=True)
class Device:
    """One device a node can be placed on.

    Attributes:
        name: unique name within its cluster (``"cpu"``, ``"cuda:0"``, ``"gpu3"``).
        kind: one of :data:`DEVICE_KINDS`; selects profiled times or the roofline defaults.
        memory_bytes: capacity in bytes (a GPU's ``total_memory``).
        peak_flops: peak FLOP/s (fp32) used by the roofline estimate.
        mem_bandwidth: memory bandwidth in bytes/s used by the roofline estimate.
        real_device: torch device this one maps onto when applied on a real machine, or None.
        reserved_bytes: bytes the runtime holds before the first tensor (module doc). A spec
            file without ``reserved`` gives a GPU :data:`GPU_CONTEXT_BYTES`; built here, a device
            reserves what it is given.
    """

    name: str
    kind: str
    memory_bytes: int
    peak_flops: float
    mem_bandwidth: float
    real_device: str | None = None
    reserved_bytes: int = 0

    def __post_init__(self) -> None:
        where = f"device {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ClusterSpecError(f"a device needs a non-empty string name, got {self.name!r}")
        if self.kind not in DEVICE_KINDS:
            raise ClusterSpecError(f"{where} has unknown kind {self.kind!r}; expected one of {list(DEVICE_KINDS)}")
        for label, value in (
            ("memory", self.memory_bytes),
            ("peak_flops", self.peak_flops),
            ("mem_bandwidth", self.mem_bandwidth),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ClusterSpecError(f"{where}: {label} must be a positive number, got {value!r}")
        reserved = self.reserved_bytes
        if isinstance(reserved, bool) or not isinstance(reserved, int) or reserved < 0:
            raise ClusterSpecError(f"{where}: reserved must be a non-negative number of bytes, got {reserved!r}")
        if reserved >= self.memory_bytes:
            raise ClusterSpecError(f"{where}: reserved ({reserved} bytes) leaves nothing of its memory "
                                   f"({self.memory_bytes} bytes); expected less than its memory")

    @property
    def is_gpu(self) -> bool:
        return self.kind in GPU_KINDS

    @property
    def usable_bytes(self) -> int:
        """The memory a placement may fill: ``memory_bytes`` less ``reserved_bytes``."""
        return self.memory_bytes - self.reserved_bytes


@dataclass(frozen=True)
class Link:
    """A connection from ``src`` to ``dst``: a transfer of b bytes takes ``latency_s + b / bandwidth_Bps``."""

    src: str
    dst: str
    latency_s: float
    bandwidth_Bps: float

    def __post_init__(self) -> None:
        where = f"link {self.src!r}->{self.dst!r}"
        if self.src == self.dst:
            raise ClusterSpecError(f"{where} connects a device to itself; links join two different devices")
        if not (isinstance(self.latency_s, (int, float)) and math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise ClusterSpecError(f"{where}: latency must be a non-negative number of seconds, got {self.latency_s!r}")
        if not (
            isinstance(self.bandwidth_Bps, (int, float))
            and math.isfinite(self.bandwidth_Bps)
            and self.bandwidth_Bps > 0
        ):
            raise ClusterSpecError(f"{where}: bandwidth must be a positive number of bytes/s, got {self.bandwidth_Bps!r}")

    def transfer_time(self, nbytes: float) -> float:
        """Seconds to move ``nbytes`` over this link (latency + bytes / bandwidth)."""
        return self.latency_s + nbytes / self.bandwidth_Bps


@dataclass(frozen=True)
class Cluster:
    """Devices and the links between them.

    Attributes:
        name: cluster name (for reports).
        devices: the devices, in the order placements index them.
        links: explicit links; each applies in both directions unless the reverse is also given.
        simulated: True when figures come from a spec (step times are simulated), False for
            discovered real devices (step times can be measured).
        default_link: latency/bandwidth for pairs without an explicit link, or None.
        spec_path: the spec file it was read from (absolute), so that a placement made on it
            can name the file, not just ``name``; None for presets, mappings and real devices.
    """

    name: str
    devices: tuple[Device, ...]
    links: tuple[Link, ...] = ()
    simulated: bool = True
    default_link: tuple[float, float] | None = None
    spec_path: str | None = field(default=None, compare=False)
    _links: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "links", tuple(self.links))
        if not self.devices:
            raise ClusterSpecError(f"cluster {self.name!r} has no devices; expected at least one")
        names = [d.name for d in self.devices]
        seen: set[str] = set()
        for i, n in enumerate(names):
            if n in seen:
                raise ClusterSpecError(f"devices[{i}]: duplicate device name {n!r}; device names must be unique")
            seen.add(n)
        if self.default_link is not None:
            lat, bw = self.default_link
            Link("default_link", "<any>", lat, bw)  # same checks as an explicit link
        table: dict[tuple[str, str], Link] = {}
        for i, link in enumerate(self.links):
            for end in (link.src, link.dst):
                if end not in seen:
                    raise ClusterSpecError(
                        f"links[{i}] ({link.src!r}-{link.dst!r}) names device {end!r}, which does not exist; "
                        f"devices are {names}"
                    )
            if (link.src, link.dst) in table:
                raise ClusterSpecError(f"links[{i}]: the link {link.src!r}->{link.dst!r} is given twice")
            table[(link.src, link.dst)] = link
        # Reverse directions not given explicitly mirror the forward one (symmetric links).
        for (a, b), link in list(table.items()):
            if (b, a) not in table:
                table[(b, a)] = Link(b, a, link.latency_s, link.bandwidth_Bps)
        if self.default_link is None:
            for a in names:
                for b in names:
                    if a != b and (a, b) not in table:
                        raise ClusterSpecError(
                            f"cluster {self.name!r} has no link between {a!r} and {b!r}; list one under "
                            f"'links' or declare a 'default_link'"
                        )
        self._links.update(table)

    @property
    def device_names(self) -> list[str]:
        return [d.name for d in self.devices]

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def device(self, name: str) -> Device:
        """The device called ``name``; :class:`ClusterSpecError` when there is none."""
        return self.devices[self.device_index(name)]

    def device_index(self, name: str) -> int:
        """Index of device ``name`` in :attr:`devices`."""
        for i, d in enumerate(self.devices):
            if d.name == name:
                return i
        raise ClusterSpecError(f"cluster {self.name!r} has no device {name!r}; devices are {self.device_names}")

    def link(self, a: str, b: str) -> Link:
        """The link carrying data from ``a`` to ``b`` (``a != b``)."""
        self.device_index(a)
        self.device_index(b)
        if a == b:
            raise ClusterSpecError(f"no link from device {a!r} to itself: data on one device is not transferred")
        found = self._links.get((a, b))
        if found is not None:
            return found
        if self.default_link is not None:
            return Link(a, b, *self.default_link)
        raise ClusterSpecError(f"cluster {self.name!r} has no link between {a!r} and {b!r}")

    def real_device_map(self, fallback: str = "cpu") -> dict[str, str]:
        """Device name -> torch device to use on a real machine.

        Real clusters map each device to itself; a virtual device maps to its
        ``real_device`` or to ``fallback``.
        """
        if not self.simulated:
            return {d.name: d.name for d in self.devices}
        return {d.name: d.real_device or fallback for d in self.devices}

    def describe(self) -> str:
        """One line per device, for reports."""
        source = "simulated spec" if self.simulated else "real devices (measured)"
        lines = [f"cluster {self.name} ({source}), {self.num_devices} devices:"]
        for d in self.devices:
            lines.append(
                f"  {d.name:<8} {d.kind:<5} {d.memory_bytes / 2**30:7.1f} GiB  {d.peak_flops / 1e12:7.2f} TFLOP/s  "
                f"{d.mem_bandwidth / 1e9:7.1f} GB/s" + (f"  ({d.usable_bytes / 2**30:.1f} GiB usable)" if d.reserved_bytes else "")
            )
        return "\n".join(lines)


# ----------------------------------------------------------------------------- spec files

_KIND_ALIASES = {k.lower(): k for k in DEVICE_KINDS}


def _entry_error(where: str, exc: Exception) -> ClusterSpecError:
    return ClusterSpecError(f"{where}: {exc}")


def _parse_device(entry: object, i: int) -> Device:
    where = f"devices[{i}]"
    if not isinstance(entry, Mapping):
        raise ClusterSpecError(f"{where} must be a mapping with name, kind, memory, peak_flops, mem_bandwidth; got {entry!r}")
    if "name" in entry:
        where = f"devices[{i}] ({entry['name']!r})"
    required = ("name", "kind", "memory", "peak_flops", "mem_bandwidth")
    missing = [k for k in required if k not in entry]
    if missing:
        raise ClusterSpecError(f"{where} misses field(s) {missing}; a device needs {list(required)}")
    unknown = sorted(set(entry) - set(required) - {"real_device", "reserved"})
    if unknown:
        raise ClusterSpecError(f"{where} has unknown field(s) {unknown}; "
                               f"allowed: {list(required) + ['real_device', 'reserved']}")
    kind = _KIND_ALIASES.get(str(entry["kind"]).lower())
    if kind is None:
        raise ClusterSpecError(f"{where} has unknown device kind {entry['kind']!r}; expected one of {list(DEVICE_KINDS)}")
    try:
        memory = parse_bytes(entry["memory"])
        reserved = (parse_bytes(entry["reserved"], allow_zero=True) if "reserved" in entry
                    else GPU_CONTEXT_BYTES if kind in GPU_KINDS else 0)
        flops = parse_flops(entry["peak_flops"])
        bandwidth = parse_bandwidth(entry["mem_bandwidth"])
    except UnitError as exc:
        raise _entry_error(where, exc) from None
    real = entry.get("real_device")
    if real is not None and not isinstance(real, str):
        raise ClusterSpecError(f"{where}: real_device must be a torch device string such as 'cpu', got {real!r}")
    if not isinstance(entry["name"], str) or not entry["name"].strip():
        raise ClusterSpecError(f"devices[{i}]: name must be a non-empty string such as 'gpu0', got {entry['name']!r}")
    for label, value, (low, high), unit in (("peak_flops", flops, FLOPS_RANGE, "FLOP/s"),
                                            ("mem_bandwidth", bandwidth, BANDWIDTH_RANGE, "B/s")):
        if not low <= value <= high:
            raise ClusterSpecError(f"{where}: {label} {entry[label]!r} is outside what any device has; "
                                   f"expected {low:.0e} to {high:.0e} {unit}")
    if "reserved" not in entry and reserved >= memory:
        raise ClusterSpecError(f"{where}: memory {entry['memory']!r} is no more than the {GPU_CONTEXT_BYTES // 2**20} MiB "
                               "a GPU's CUDA context takes before the first tensor; expected more memory, or "
                               "'reserved' given explicitly (e.g. reserved: 0)")
    try:
        return Device(str(entry["name"]), kind, memory, flops, bandwidth, real, reserved)
    except ClusterSpecError as exc:
        raise _entry_error(where, exc) from None


def _parse_link_figures(entry: Mapping, where: str) -> tuple[float, float]:
    missing = [k for k in ("latency", "bandwidth") if k not in entry]
    if missing:
        raise ClusterSpecError(f"{where} misses field(s) {missing}; a link needs latency and bandwidth")
    try:
        return parse_seconds(entry["latency"]), parse_bandwidth(entry["bandwidth"])
    except UnitError as exc:
        raise _entry_error(where, exc) from None


def _parse_links(entry: object, i: int) -> list[Link]:
    where = f"links[{i}]"
    if not isinstance(entry, Mapping):
        raise ClusterSpecError(f"{where} must be a mapping with between/from+to, latency, bandwidth; got {entry!r}")
    if "between" in entry:
        ends = entry["between"]
        if not isinstance(ends, (list, tuple)) or len(ends) != 2 or not all(isinstance(e, str) for e in ends):
            raise ClusterSpecError(f"{where}: 'between' must list two device names, got {ends!r}")
        src, dst = ends
    elif "from" in entry and "to" in entry:
        # A one-directional link; the reverse mirrors it unless listed separately.
        src, dst = str(entry["from"]), str(entry["to"])
    else:
        raise ClusterSpecError(f"{where} misses 'between: [a, b]' (or 'from' and 'to'); a link joins two devices")
    where = f"links[{i}] ({src!r}-{dst!r})"
    latency, bandwidth = _parse_link_figures(entry, where)
    try:
        return [Link(src, dst, latency, bandwidth)]
    except ClusterSpecError as exc:
        raise _entry_error(where, exc) from None


def _refuse_contradicting_links(entries: list, links: list[Link]) -> None:
    """``between: [a, b]`` sets both directions, so another entry for ``b -> a`` (a second
    ``between``, or a ``from``/``to``) contradicts it unless its figures are the same. (Two
    ``from``/``to`` entries for one direction are the Cluster's "given twice".)"""
    claimed: dict[tuple[str, str], tuple[int, Link, bool]] = {}
    for i, (entry, link) in enumerate(zip(entries, links)):
        between = "between" in entry
        for direction in [(link.src, link.dst)] + ([(link.dst, link.src)] if between else []):
            held = claimed.setdefault(direction, (i, link, between))
            j, other, other_between = held
            if j == i or not (between or other_between):
                continue
            if (other.latency_s, other.bandwidth_Bps) != (link.latency_s, link.bandwidth_Bps):
                k = j if other_between else i
                raise ClusterSpecError(
                    f"links[{i}] ({link.src!r}-{link.dst!r}) gives {direction[0]!r}->{direction[1]!r} other figures "
                    f"than links[{j}] ({other.src!r}-{other.dst!r}), and links[{k}]'s 'between' covers both "
                    "directions; expected one entry per pair (or 'from'/'to' entries for a link that differs "
                    "by direction)")


def cluster_from_spec(spec: object, default_name: str = "cluster") -> Cluster:
    """Build a :class:`Cluster` from a parsed spec mapping (the content of a YAML/JSON file)."""
    if not isinstance(spec, Mapping):
        raise ClusterSpecError(f"a cluster spec must be a mapping with 'devices' (and 'links'); got {type(spec).__name__}")
    unknown = sorted(set(spec) - {"name", "devices", "links", "default_link", "description"})
    if unknown:
        raise ClusterSpecError(
            f"cluster spec has unknown key(s) {unknown}; allowed: name, devices, links, default_link, description"
        )
    if "devices" not in spec:
        raise ClusterSpecError("cluster spec misses 'devices'; expected a list of devices")
    devices_raw = spec["devices"]
    if not isinstance(devices_raw, list) or not devices_raw:
        raise ClusterSpecError(f"cluster spec 'devices' must be a non-empty list, got {devices_raw!r}")
    devices = [_parse_device(e, i) for i, e in enumerate(devices_raw)]
    links_raw = spec.get("links") or []
    if not isinstance(links_raw, list):
        raise ClusterSpecError(f"cluster spec 'links' must be a list, got {links_raw!r}")
    links = [link for i, e in enumerate(links_raw) for link in _parse_links(e, i)]
    _refuse_contradicting_links(links_raw, links)
    default = spec.get("default_link")
    default_link = None
    if default is not None:
        if not isinstance(default, Mapping):
            raise ClusterSpecError(f"'default_link' must be a mapping with latency and bandwidth, got {default!r}")
        default_link = _parse_link_figures(default, "default_link")
    name = spec.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise ClusterSpecError(f"cluster spec 'name' must be a non-empty string such as '4xV100', got {name!r}")
    return Cluster(name, tuple(devices), tuple(links), True, default_link)


def read_spec_file(path: str | os.PathLike[str]) -> object:
    """Parse a YAML or JSON spec file; :class:`ClusterSpecError` when it cannot be read."""
    # Not UTF-8, nested too deeply, a key given twice, a syntax error: one line each.
    return read_document(path, ClusterSpecError, "cluster spec")


def make_cluster(devices: Iterable[Device], links: Iterable[Link] = (), name: str = "cluster",
                 simulated: bool = True, default_link: tuple[float, float] | None = None) -> Cluster:
    """Convenience constructor for code that builds clusters programmatically."""
    return Cluster(name, tuple(devices), tuple(links), simulated, default_link)
