"""How long a node takes on a device, and how long a tensor takes to cross a link.

Node times, in order of preference:

1. **Profiled**: the node's ``fwd_time`` / ``bwd_time`` for the device's kind (``"cpu"``,
   ``"cuda"``), as measured by the profiler. A node with only ``time[kind]`` (forward +
   backward) is split 1:2, the usual forward:backward FLOP ratio.
2. **Roofline** where the kind was not profiled (every virtual GPU kind, or a node the
   profiler skipped), with ``peak_flops`` at double precision's rate for a node computing in
   float64 (:data:`FP64_RATE`) and at the tensor cores' for one computing in float16 or
   bfloat16 (:data:`HALF_RATE`) or for an fp32 convolution where PyTorch runs it in TF32
   (:data:`TF32_CONV_RATE`, :func:`peak_flops_for`)::

       fwd = max(flops / (peak_flops * efficiency), bytes_moved / mem_bandwidth) + ops * launch_overhead
       bwd = max(2 * flops / (peak_flops * efficiency), 2 * bytes_moved / mem_bandwidth) + ops * launch_overhead

   Backward is ~2x forward because it computes both the input and the weight gradients.
   ``ops`` is 1 for an op node and the number of member ops for a group node; a node that runs
   several kernels carries their count as ``num_ops`` (a leaf module with submodules,
   :mod:`graphs.leaf_kernels`; an autocast region torch.export wrapped, :mod:`graphs.region_costs`).
3. **Zero** for nodes with neither times nor FLOPs nor bytes (placeholders, output, views),
   and a zero backward for a node whose output takes no part in autograd.

A node's **optimizer update** (the parameters it owns, updated by ``optimizer.step()``
after the backward) is the profiled ``opt_time`` of the kind where that kind was profiled
for the node, else the roofline::

    opt = param_bytes * (3 + 2 * state_factor) / mem_bandwidth + tensors * (1 + state_factor) * launch_overhead

(read parameter and gradient and write the parameter, read and write each state tensor —
Adam's two moments: ``state_factor`` 2 — one kernel per tensor touched), with
``state_factor`` from :data:`envs.sim.optimizer_state.OPTIMIZER_STATE_FACTOR` for the optimizer the
graph was profiled with (``graph.graph["optimizer"]``, default plain SGD) and ``tensors``
the node's ``param_tensors`` (1 when it owns parameters but the attribute is missing).

**Host and device parts** (:meth:`CostModel.op_cost`, what the simulators read; issue 15).
Each op costs, per phase (forward F, backward B, optimizer O), seconds on the *host*
thread that issues it (``hF, hB, hO``) and seconds on the device's stream (``dF, dB, dO``):

* on a **CPU** the op runs on the host thread itself: ``h* = `` the whole time, ``d* = 0``
  (profiled CPU ticks are taken in situ, so they already hold the per-node Python and
  dispatch cost);
* on a **GPU** the host pays the launch (``ops * launch_overhead_s``, or a profiled
  ``host_time[kind]`` where the profiler recorded one) and the stream the rest: a roofline
  op's device time is ``max(compute, memory)`` with *no* launch overhead on the device; a
  profiled GPU time is split as ``h = min(launch, time)``, ``d = time - h``. The optimizer
  update on a GPU: ``hO = tensors * (1 + state) * launch``, ``dO`` the bytes term.

**Fixed parts** (:meth:`CostModel.op_fixed`, what pipelines and DDP read: rule P2 of
:mod:`envs.sim.pipeline`): the host seconds of an op's forward and backward that a
micro-batch does not shrink. On a CPU, the node's measured ``fwd_fixed[kind]`` /
``bwd_fixed[kind]`` where the graph was also profiled on a micro-batch
(:mod:`graphs.profile.batch_scaling`), else the per-op dispatch :data:`CPU_DISPATCH_S`;
either at most the op's host time. On a GPU the host part is the launches, which a
micro-batch does not shrink either (the simulators read the fixed parts on CPUs only and
take a GPU stage as ``max(host, device / M)``).

``node_cost`` keeps the old two-number view ``(hF + dF, hB + dB + hO + dO)`` for readers
that want one figure per phase (baselines, features).

**Fixed host costs** of a step (:class:`HostOverheads`): the host cost of one copy node
(``Tensor.to``), of the loss, of entering ``loss.backward()``, and of the rest of the step
(``zero_grad``, the optimizer's Python loop). Their defaults (:data:`DEFAULT_HOST`) are
measured on this machine; the command is in :class:`HostOverheads`.

The roofline constants per kind (:class:`Roofline`) come from :data:`DEFAULT_ROOFLINE`.
The CPU constants can be **calibrated** (:func:`calibrate`) by least squares against the
graph's profiled CPU times, which :meth:`CostModel.for_graph` does automatically when the
graph holds CPU profiles. Virtual GPU kinds cannot be calibrated on a machine without
them: they keep the same model with GPU defaults (cuBLAS/cuDNN reach ~60-75% of fp32 peak
on large matmuls and convolutions; a kernel launch costs a few microseconds, more on the
older K40 driver stack).

A transfer of ``b`` bytes over a link costs ``latency + b / bandwidth`` (see
:meth:`envs.hardware.cluster.Link.transfer_time`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx
import numpy as np

from envs.hardware.cluster import Cluster, Device
from envs.sim.optimizer_state import OPTIMIZER_STATE_FACTOR

#: Fixed host seconds per CPU op that a micro-batch does not shrink where the graph was not
#: profiled on one (module doc, "Fixed parts"): the per-op dispatch, 2.1-2.7 us per fx node
#: measured for :class:`HostOverheads`.
CPU_DISPATCH_S = 2.4e-6

#: Backward FLOPs (and bytes) per forward FLOP for the roofline estimate.
BACKWARD_FACTOR = 2.0

#: fx ops that never compute (their cost is zero whatever their attributes say).
NON_COMPUTE_OPS = frozenset({"placeholder", "output", "get_attr"})

#: Double precision's FLOP rate as a fraction of ``peak_flops`` (fp32), by device kind, from the
#: vendors' datasheets (non-tensor-core figures): K40 1.43 of 4.29 TFLOP/s, V100 SXM2 7.8 of 15.7,
#: A100 9.7 of 19.5, H100 SXM 34 of 67 (H200 the same chip); a CPU's vector units hold half as
#: many float64 lanes as float32 ones. A float64 model's matmuls on a K40 were costed 3x too fast.
#: ``"cuda"`` (a real GPU of unknown model) is profiled, not rooflined, and keeps 1.
FP64_RATE: dict[str, float] = {"cpu": 0.5, "K40": 1.43 / 4.29, "V100": 7.8 / 15.7, "A100": 9.7 / 19.5,
                               "H100": 34.0 / 67.0, "H200": 34.0 / 67.0}

#: Node output dtypes that compute in double precision (``attrs["dtype"]`` as captured).
DOUBLE_DTYPES = frozenset({"torch.float64", "torch.complex128"})

_A100_HALF = 312.0 / 19.5
_H100_HALF = 989.4 / 67.0

#: Half precision's FLOP rate as a multiple of ``peak_flops`` (fp32), by device kind and dtype:
#: the dense tensor-core figures of the vendors' datasheets over their fp32 ones. V100 SXM2 125
#: of 15.7 TFLOP/s in float16; Volta's tensor cores take no bfloat16 (cuBLAS runs it without
#: them: the fp32 rate at best, so 1). A100 312 of 19.5 in both; H100 SXM 989.4 of 67 (the H200
#: is the same chip). The K40 has no tensor cores and no fast half arithmetic; a real GPU
#: (``"cuda"``) and a CPU are profiled, not rooflined. Without it a float16 or bfloat16 matmul
#: (a model under ``torch.autocast``: its region's output dtype, :mod:`graphs.region_costs`)
#: was costed at the fp32 rate, 8x (V100) to 16x (A100) too slow. An op that is not a matmul
#: or a convolution gains nothing from tensor cores, but it is memory-bound, where the memory
#: term (2-byte elements, already counted) decides. Measured on a real GPU by the prepared GPU
#: check (``benchmarks/gpu_check.py``: half-precision matmul rate against fp32).
HALF_RATE: dict[str, dict[str, float]] = {
    "V100": {"torch.float16": 125.0 / 15.7},
    "A100": {"torch.float16": _A100_HALF, "torch.bfloat16": _A100_HALF},
    "H100": {"torch.float16": _H100_HALF, "torch.bfloat16": _H100_HALF},
    "H200": {"torch.float16": _H100_HALF, "torch.bfloat16": _H100_HALF},
}


#: An fp32 convolution's FLOP rate as a multiple of ``peak_flops``, by device kind: PyTorch runs
#: fp32 convolutions on TF32 tensor cores by default on Ampere and later GPUs
#: (``torch.backends.cudnn.conv.fp32_precision`` is ``"tf32"``, checked on torch 2.13; matmuls'
#: ``torch.backends.cuda.matmul.fp32_precision`` is ``"none"``: IEEE fp32, so they keep 1). The
#: dense TF32 figures of the datasheets: A100 156 of 19.5 TFLOP/s, H100 SXM 494.7 of 67 (H200 the
#: same chip). V100 and K40 have no TF32.
TF32_CONV_RATE: dict[str, float] = {"A100": 156.0 / 19.5, "H100": 494.7 / 67.0, "H200": 494.7 / 67.0}


def peak_flops_for(device: Device, dtype: object, convolution: bool = False) -> float:
    """``device``'s peak FLOP/s for a node whose output has ``dtype`` (its string as captured):
    :data:`FP64_RATE` of ``peak_flops`` in double precision, :data:`HALF_RATE` times it in half
    precision, :data:`TF32_CONV_RATE` times it for an fp32 ``convolution``, ``peak_flops``
    otherwise.

    >>> from envs.hardware.cluster import Device
    >>> k40 = Device("gpu0", "K40", 12 * 2**30, 4.29e12, 288e9)
    >>> round(peak_flops_for(k40, "torch.float64") / 1e12, 2), peak_flops_for(k40, "torch.float32") / 1e12
    (1.43, 4.29)
    >>> v100 = Device("gpu0", "V100", 16 * 2**30, 15.7e12, 900e9)
    >>> peak_flops_for(v100, "torch.float16") / 1e12, peak_flops_for(v100, "torch.bfloat16") / 1e12
    (125.0, 15.7)
    """
    if dtype in DOUBLE_DTYPES:
        return device.peak_flops * FP64_RATE.get(device.kind, 1.0)
    if convolution and str(dtype) == "torch.float32":
        return device.peak_flops * TF32_CONV_RATE.get(device.kind, 1.0)
    return device.peak_flops * HALF_RATE.get(device.kind, {}).get(str(dtype), 1.0)


def node_peak_flops(device: Device, attrs: Mapping[str, Any]) -> float:
    """:func:`peak_flops_for` a node, read off its attributes (``dtype``, ``convolution``)."""
    return peak_flops_for(device, attrs.get("dtype"), bool(attrs.get("convolution")))


@dataclass(frozen=True)
class Roofline:
    """Roofline constants of one device kind.

    Attributes:
        efficiency: fraction of ``peak_flops`` a counted FLOP (matmul/conv) runs at.
        launch_overhead_s: fixed seconds per op (kernel launch / dispatcher overhead).
    """

    efficiency: float
    launch_overhead_s: float

    def __post_init__(self) -> None:
        if not (0 < self.efficiency <= 1):
            raise ValueError(f"roofline efficiency must be in (0, 1], got {self.efficiency}")
        if self.launch_overhead_s < 0:
            raise ValueError(f"launch overhead must be >= 0, got {self.launch_overhead_s}")


#: Defaults per device kind (see the module docstring for where they come from).
DEFAULT_ROOFLINE: dict[str, Roofline] = {
    "cpu": Roofline(0.5, 5e-6),
    "cuda": Roofline(0.65, 6e-6),
    "K40": Roofline(0.6, 10e-6),
    "V100": Roofline(0.7, 6e-6),
    "A100": Roofline(0.7, 5e-6),
    "H100": Roofline(0.7, 4e-6),
    # Same chip as the H100 (more, faster memory): its constants until benchmarks/gpu_check.py's
    # measured ones (--to-preset writes them to <preset>.roofline.json) replace them.
    "H200": Roofline(0.7, 4e-6),
}


@dataclass(frozen=True)
class HostOverheads:
    """Fixed host-thread seconds of one training step in one process (see the module doc).

    Attributes:
        copy_s: one ``to_device`` node (``Tensor.to``) on the host, besides the copy itself.
        loss_s: the loss computation after the forward.
        backward_call_s: entering and leaving ``loss.backward()`` (engine set-up, GIL release).
        step_s: the rest of a step outside the ops: the GraphModule call, ``zero_grad``, the
            optimizer's Python loop.

    The defaults were measured on this 2-core VM, one torch thread, with ``python3
    benchmarks/bench_simulator.py --calibrate`` (an fx GraphModule of k tiny ops, of k
    ``to_device`` copy nodes, and its backward, k = 1..128; recorded with the load average in
    benchmarks/results/simulator.md): per copy node 2.2 us, ``backward()`` fixed 17-22 us
    (20 us), the GraphModule call 1.6-2.0 us (``step_s``; :meth:`CostModel.for_graph` adds the
    profiled ``optimizer_fixed`` of the graph's CPU profile, the optimizer step's time owned
    by no parameter). The loss is a node of the captured graph when the model computes it;
    ``loss_s`` is 0. The per-op dispatch (2.1-2.7 us per fx node) is inside the profiled CPU
    op times and the GPU kinds' ``launch_overhead_s``.
    """

    copy_s: float = 2.2e-6
    loss_s: float = 0.0
    backward_call_s: float = 20e-6
    step_s: float = 1.6e-6

    def __post_init__(self) -> None:
        for name in ("copy_s", "loss_s", "backward_call_s", "step_s"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"host overhead {name} must be a finite number >= 0, got {value!r}")


#: The measured defaults (see :class:`HostOverheads`).
DEFAULT_HOST = HostOverheads()

#: Columns of :meth:`CostModel.op_costs`: host and device seconds of forward, backward, optimizer.
COST_COLUMNS = ("hF", "dF", "hB", "dB", "hO", "dO")


def _num(attrs: Mapping[str, Any], key: str) -> float:
    value = attrs.get(key)
    if value is None:
        return 0.0
    return float(value)


def _op_count(attrs: Mapping[str, Any]) -> int:
    """How many ops a node stands for (group nodes carry their members)."""
    if "num_ops" in attrs:
        return int(attrs["num_ops"])
    members = attrs.get("members")
    if members:
        return len(members)
    return 1


def trained_param_bytes(attrs: Mapping[str, Any]) -> float:
    """A node's ``param_bytes`` that get a gradient, optimizer state and an all-reduce: less its
    ``frozen_bytes`` (buffers, parameters with ``requires_grad=False``; docs/contracts.md).

    >>> trained_param_bytes({"param_bytes": 100, "frozen_bytes": 60}), trained_param_bytes({"param_bytes": 100})
    (40.0, 100.0)
    """
    return max(_num(attrs, "param_bytes") - _num(attrs, "frozen_bytes"), 0.0)


def param_grad_bytes(attrs: Mapping[str, Any]) -> float:
    """Bytes of a node's parameter gradients: its trained bytes (:func:`trained_param_bytes`), where
    a sparse gradient (``nn.Embedding(sparse=True)``: the rows looked up, ``sparse_grad_bytes``)
    replaces the dense one of the parameters it is for (``sparse_param_bytes``).

    >>> param_grad_bytes({"param_bytes": 1000, "sparse_param_bytes": 800, "sparse_grad_bytes": 50})
    250.0
    """
    trained = trained_param_bytes(attrs)
    return trained - min(_num(attrs, "sparse_param_bytes"), trained) + _num(attrs, "sparse_grad_bytes")


def node_requires_grad(attrs: Mapping[str, Any]) -> bool:
    """Whether a node's output takes part in autograd (default: yes, except inputs and output)."""
    if "requires_grad" in attrs:
        return bool(attrs["requires_grad"])
    return attrs.get("op") not in ("placeholder", "output")


def profiled_times(attrs: Mapping[str, Any], kind: str) -> tuple[float, float] | None:
    """(forward, backward) seconds profiled for ``kind``, or None when the kind was not profiled."""
    fwd = (attrs.get("fwd_time") or {}).get(kind)
    bwd = (attrs.get("bwd_time") or {}).get(kind)
    total = (attrs.get("time") or {}).get(kind)
    if fwd is not None:
        if bwd is None:
            bwd = (total - fwd) if total is not None else BACKWARD_FACTOR * fwd
        return float(fwd), max(float(bwd), 0.0)
    if total is not None:
        return float(total) / (1.0 + BACKWARD_FACTOR), float(total) * BACKWARD_FACTOR / (1.0 + BACKWARD_FACTOR)
    return None


def profiled_opt_time(attrs: Mapping[str, Any], kind: str) -> float | None:
    """Profiled optimizer-update seconds of ``kind``, or None when not profiled for this node."""
    value = (attrs.get("opt_time") or {}).get(kind)
    return None if value is None else max(float(value), 0.0)


def state_factor(optimizer: str | None) -> float:
    """Optimizer state bytes per parameter byte (unknown optimizers: Adam-sized, as envs.sim.problem_compile assumes)."""
    key = str(optimizer or "sgd").lower()
    return OPTIMIZER_STATE_FACTOR.get(key, OPTIMIZER_STATE_FACTOR["adam"])


def roofline_opt_parts(attrs: Mapping[str, Any], device: Device, roofline: Roofline,
                       optimizer: str | None) -> tuple[float, float]:
    """(memory traffic, launches) seconds of a node's roofline optimizer update (module doc);
    both 0 for a node owning no parameters."""
    if attrs.get("op") in ("placeholder", "output"):
        return 0.0, 0.0
    nbytes = param_grad_bytes(attrs)  # a sparse gradient's update touches its rows only
    if nbytes <= 0:
        return 0.0, 0.0
    factor = state_factor(optimizer)
    tensors = _num(attrs, "param_tensors") if "param_tensors" in attrs else 1.0
    return nbytes * (3.0 + 2.0 * factor) / device.mem_bandwidth, tensors * (1.0 + factor) * roofline.launch_overhead_s


def roofline_opt_time(attrs: Mapping[str, Any], device: Device, roofline: Roofline, optimizer: str | None) -> float:
    """Roofline seconds of a node's optimizer update (module doc); 0 for a node owning no parameters."""
    work, launches = roofline_opt_parts(attrs, device, roofline, optimizer)
    return work + launches


def roofline_parts(attrs: Mapping[str, Any], device: Device, roofline: Roofline) -> tuple[float, float, float]:
    """(forward work, backward work, launch overhead) seconds of the roofline; all 0 for nodes
    that do no work. The work is what the device computes; the overhead is per launch."""
    if attrs.get("op") in NON_COMPUTE_OPS:
        return 0.0, 0.0, 0.0
    flops = _num(attrs, "flops")
    moved = _num(attrs, "bytes_moved")
    if flops <= 0 and moved <= 0:
        return 0.0, 0.0, 0.0
    compute = flops / (node_peak_flops(device, attrs) * roofline.efficiency)
    memory = moved / device.mem_bandwidth
    return max(compute, memory), BACKWARD_FACTOR * max(compute, memory), _op_count(attrs) * roofline.launch_overhead_s


def roofline_times(attrs: Mapping[str, Any], device: Device, roofline: Roofline) -> tuple[float, float]:
    """(forward, backward) seconds from FLOPs and bytes moved, zero for nodes that do no work."""
    fwd, bwd, overhead = roofline_parts(attrs, device, roofline)
    return fwd + overhead, bwd + overhead


@dataclass(frozen=True)
class CostModel:
    """Node and transfer costs for one graph on one cluster.

    Attributes:
        roofline: roofline constants per device kind (missing kinds use :data:`DEFAULT_ROOFLINE`).
        use_profiles: use profiled times where present (False forces the roofline everywhere).
        optimizer: the optimizer whose update the roofline estimates (a key of
            :data:`envs.sim.optimizer_state.OPTIMIZER_STATE_FACTOR`; None: plain SGD).
        host: the step's fixed host costs (:class:`HostOverheads`).
    """

    roofline: Mapping[str, Roofline] = field(default_factory=dict)
    use_profiles: bool = True
    optimizer: str | None = None
    host: HostOverheads = DEFAULT_HOST

    def roofline_for(self, kind: str) -> Roofline:
        return self.roofline.get(kind) or DEFAULT_ROOFLINE[kind]

    @classmethod
    def for_graph(cls, graph: nx.DiGraph, cluster: Cluster, optimizer: str | None = None) -> "CostModel":
        """The default cost model: CPU roofline calibrated on the graph's CPU profiles when present,
        optimizer updates estimated for ``optimizer`` (default: the one the graph was profiled with),
        the step's fixed host cost plus the profiled ``optimizer_fixed`` (see :class:`HostOverheads`)."""
        cpus = [d for d in cluster.devices if d.kind == "cpu"]
        fitted: dict[str, Roofline] = {}
        if cpus:
            fit = calibrate(graph, cpus[0])
            if fit is not None:
                fitted["cpu"] = fit
        host = DEFAULT_HOST
        fixed = ((graph.graph.get("profile_info") or {}).get("cpu") or {}).get("optimizer_fixed")
        if fixed is not None and np.isfinite(float(fixed)) and float(fixed) > 0:
            host = replace(host, step_s=host.step_s + float(fixed))
        return cls(roofline=fitted, optimizer=optimizer or graph.graph.get("optimizer"), host=host)

    def node_cost(self, attrs: Mapping[str, Any], device: Device) -> tuple[float, float]:
        """(forward, backward + optimizer update) seconds of a node (its attribute dict) on ``device``."""
        times = profiled_times(attrs, device.kind) if self.use_profiles else None
        if times is None:
            times = roofline_times(attrs, device, self.roofline_for(device.kind))
        if not node_requires_grad(attrs):
            return times[0], 0.0
        return times[0], times[1] + self.opt_cost(attrs, device)

    def opt_cost(self, attrs: Mapping[str, Any], device: Device) -> float:
        """Seconds of a node's optimizer update on ``device``: profiled for its kind, else the roofline."""
        opt = profiled_opt_time(attrs, device.kind) if self.use_profiles else None
        if opt is None:
            opt = roofline_opt_time(attrs, device, self.roofline_for(device.kind), self.optimizer)
        return opt

    def op_cost(self, attrs: Mapping[str, Any], device: Device) -> tuple[float, float, float, float, float, float]:
        """``(hF, dF, hB, dB, hO, dO)``: host and device seconds of forward, backward and optimizer
        update of a node on ``device`` (module doc, "Host and device parts")."""
        roof = self.roofline_for(device.kind)
        grad = node_requires_grad(attrs)
        times = profiled_times(attrs, device.kind) if self.use_profiles else None
        opt = profiled_opt_time(attrs, device.kind) if self.use_profiles else None
        if device.kind == "cpu":
            fwd, bwd = times if times is not None else roofline_times(attrs, device, roof)
            if opt is None:
                opt = roofline_opt_time(attrs, device, roof, self.optimizer)
            return (fwd, 0.0, bwd, 0.0, opt, 0.0) if grad else (fwd, 0.0, 0.0, 0.0, 0.0, 0.0)
        if times is not None:
            launch = _op_count(attrs) * roof.launch_overhead_s
            host = (attrs.get("host_time") or {}).get(device.kind)
            h_f = min(float(host) if host is not None else launch, times[0])
            h_b = min(launch, times[1])
            parts = (h_f, times[0] - h_f, h_b, times[1] - h_b)
        else:
            work_f, work_b, launch = roofline_parts(attrs, device, roof)
            parts = (launch, work_f, launch, work_b)
        if not grad:
            return parts[0], parts[1], 0.0, 0.0, 0.0, 0.0
        if opt is not None:
            _, launches = roofline_opt_parts(attrs, device, roof, self.optimizer)
            h_o = min(launches, opt)
            return (*parts, h_o, opt - h_o)
        work_o, launches = roofline_opt_parts(attrs, device, roof, self.optimizer)
        return (*parts, launches, work_o)

    def op_fixed(self, attrs: Mapping[str, Any], device: Device, cost: Sequence[float]) -> tuple[float, float]:
        """(forward, backward) host seconds of a node on ``device`` that a micro-batch does not
        shrink (module doc, "Fixed parts"), ``cost`` its :meth:`op_cost`."""
        host_f, host_b = float(cost[0]), float(cost[2])
        if device.kind != "cpu":
            return host_f, host_b
        fixed_f = (attrs.get("fwd_fixed") or {}).get(device.kind) if self.use_profiles else None
        fixed_b = (attrs.get("bwd_fixed") or {}).get(device.kind) if self.use_profiles else None
        f = CPU_DISPATCH_S if fixed_f is None else max(float(fixed_f), 0.0)
        b = CPU_DISPATCH_S if fixed_b is None else max(float(fixed_b), 0.0)
        return min(host_f, f), min(host_b, b)

    def op_fixed_costs(self, graph: nx.DiGraph, order: Sequence[str], devices: Sequence[Device],
                       cost: np.ndarray) -> np.ndarray:
        """[N, D, 2] :meth:`op_fixed` of the nodes in ``order`` on ``devices``, ``cost`` their
        :meth:`op_costs`."""
        out = np.zeros((len(order), len(devices), 2))
        for i, name in enumerate(order):
            attrs = graph.nodes[name]
            for j, dev in enumerate(devices):
                out[i, j] = self.op_fixed(attrs, dev, cost[i, j])
        return out

    def op_costs(self, graph: nx.DiGraph, order: Sequence[str], devices: Sequence[Device]) -> np.ndarray:
        """[N, D, 6] :meth:`op_cost` of the nodes in ``order`` on ``devices`` (columns :data:`COST_COLUMNS`)."""
        out = np.zeros((len(order), len(devices), 6))
        for i, name in enumerate(order):
            attrs = graph.nodes[name]
            for j, dev in enumerate(devices):
                out[i, j] = self.op_cost(attrs, dev)
        return out

    def node_times(self, graph: nx.DiGraph, order: Sequence[str], devices: Sequence[Device]) -> tuple[np.ndarray, np.ndarray]:
        """[N, D] forward and backward seconds for the nodes in ``order`` on ``devices``."""
        fwd = np.zeros((len(order), len(devices)))
        bwd = np.zeros((len(order), len(devices)))
        for i, name in enumerate(order):
            attrs = graph.nodes[name]
            for j, dev in enumerate(devices):
                fwd[i, j], bwd[i, j] = self.node_cost(attrs, dev)
        return fwd, bwd

    @staticmethod
    def transfer_time(nbytes: float, cluster: Cluster, src: str, dst: str) -> float:
        """Seconds to move ``nbytes`` from device ``src`` to ``dst`` (0 on the same device)."""
        if src == dst:
            return 0.0
        return cluster.link(src, dst).transfer_time(nbytes)


def calibrate(graph: nx.DiGraph, device: Device, kind: str = "cpu", min_nodes: int = 3) -> Roofline | None:
    """Fit the roofline constants of ``kind`` to the graph's profiled forward times.

    Least squares on the *relative* error over the nodes profiled on ``kind`` that have
    FLOPs or bytes, so that small ops (where the launch overhead dominates) weigh as much
    as large ones (where the efficiency does). For each efficiency on a log grid the best
    launch overhead has a closed form (weighted least squares of a scaled offset, clipped
    at 0); the pair with the smallest error wins. Returns None when fewer than
    ``min_nodes`` nodes qualify.
    """
    flops, moved, times, ops = [], [], [], []
    for _, attrs in graph.nodes(data=True):
        if attrs.get("op") in NON_COMPUTE_OPS:
            continue
        prof = profiled_times(attrs, kind)
        f, b = _num(attrs, "flops"), _num(attrs, "bytes_moved")
        if prof is None or (f <= 0 and b <= 0):
            continue
        # in fp32-equivalent FLOPs
        flops.append(f * device.peak_flops / node_peak_flops(device, attrs))
        moved.append(b)
        times.append(prof[0])
        ops.append(_op_count(attrs))
    if len(times) < min_nodes:
        return None
    flops_a, moved_a, t, ops_a = (np.asarray(x, dtype=np.float64) for x in (flops, moved, times, ops))
    keep = t > 0
    if keep.sum() < min_nodes:
        return None
    flops_a, moved_a, t, ops_a = flops_a[keep], moved_a[keep], t[keep], ops_a[keep]
    memory = moved_a / device.mem_bandwidth
    w = 1.0 / t**2  # relative residuals: ((t - pred) / t)^2
    best: tuple[float, Roofline] | None = None
    for eff in np.logspace(-3, 0, 193):
        base = np.maximum(flops_a / (device.peak_flops * eff), memory)
        # residual = t - base - ops*c; weighted least squares: c = <w ops, t-base> / <w ops, ops>
        c = max(float(np.dot(w * ops_a, t - base) / np.dot(w * ops_a, ops_a)), 0.0)
        err = float(np.sum(w * (t - base - ops_a * c) ** 2))
        if best is None or err < best[0]:
            best = (err, Roofline(float(eff), c))
    assert best is not None
    return best[1]


def with_roofline(model: CostModel, kind: str, roofline: Roofline) -> CostModel:
    """A copy of ``model`` with ``kind``'s roofline constants replaced."""
    table = dict(model.roofline)
    table[kind] = roofline
    return replace(model, roofline=table)
