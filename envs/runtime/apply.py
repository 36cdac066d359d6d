"""Apply a placement to a captured model: one fx GraphModule that runs across devices.

A placement maps fx node names (the placement graph's node names) to torch device
strings. :func:`apply_placement` returns a deep copy of the GraphModule in which

* every ``call_module`` node's parameters and buffers live on that node's device,
* every ``get_attr`` tensor lives on its node's device,
* every op that names a device, and every factory op that names none (``torch.arange(n)``),
  makes its tensor on its node's device; a random draw (``torch.randn``) still draws where
  the original does, with a transfer to its node's device right after it
  (:func:`envs.runtime.transfers.factories_where_placed`),
* a transfer node (:func:`envs.runtime.transfers.to_device`) sits on every cut edge, one per
  (producer, destination device) and shared by all consumers on that device,
* inputs are moved to every device that consumes them,
* outputs are gathered on ``output_device``,
* state only the eval graph reads (a head only eval mode calls) lives where the eval
  forward's data reaches it (:func:`graphs.eval_interpreter.eval_only_state`).

Autograd runs each backward op on the device of its forward op and ``Tensor.to`` is
differentiable, so the same module trains (forward, loss, backward, optimizer step)
across the devices with no further change.

Mutation rules (why the applied model computes exactly what the original does):
state that an op updates in place (BatchNorm running statistics, ``num_batches_tracked``
in export graphs) is moved to the device of the op that updates it, and an in-place op
on an activation runs on the device of the tensor it mutates. Otherwise the update
would land on a transferred copy and be lost. The same holds through views: a view of a
tensor that is updated in place runs where that tensor lives, and its readers on other
devices get their copy right before they read it (a copy made when the view was made
would miss the update, as a real device's copy does; a CPU "copy" is the tensor itself).

Non-blocking copies: a transfer is issued with ``non_blocking=True`` only when its
destination is an accelerator. Host→device copies from pageable memory are staged
synchronously by the driver and from pinned memory are ordered on the stream, and
device→device copies are stream ordered, so these are safe (as with any non-blocking
copy, a caller's pinned input must not be overwritten on the host before the step has
used it). A device→host copy with ``non_blocking=True`` may still be in flight when the
CPU reads the tensor, so copies to the CPU are always blocking.

This module rewrites the graph; the pieces it is built from live apart, one concept each:
device names (:mod:`envs.runtime.device_names`), the device of each node under the mutation
rules (:mod:`envs.runtime.node_devices`), moving state (:mod:`envs.runtime.state_mover`),
transfer nodes (:mod:`envs.runtime.transfers`), copies that keep hooks
(:mod:`envs.runtime.module_copy`) and the error (:mod:`envs.runtime.apply_error`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import networkx as nx
import torch.fx as fx

from envs.runtime.apply_error import ApplyError
from envs.runtime.device_map import placement_device_map
from envs.runtime.device_names import RealizedPlacement, _canonical, _resolver, realize_placement
from envs.runtime.module_copy import _copy_graph_module
from envs.runtime.node_devices import _effective_devices, _updated_in_place, write_back
from envs.runtime.state_mover import _Mover
from envs.runtime.transfers import _transfer_node, factories_where_placed, to_device, transfer_nodes
from graphs.eval_interpreter import eval_only_state
from graphs.gc_pause import paused_gc
from graphs.module_modes import set_training_modes

# ApplyError, realize_placement, RealizedPlacement, placement_device_map and transfer_nodes are
# documented here (docs/contracts.md); to_device and write_back are the call targets of placed
# graphs, which a GraphModule pickled by an earlier version imports from this module.
__all__ = [
    "ApplyError",
    "apply_placement",
    "to_device",
    "transfer_nodes",
    "write_back",
    "placement_device_map",
    "RealizedPlacement",
    "realize_placement",
]


#: Tensor methods / attributes that read only metadata: a consumer doing only this
#: does not need the tensor on its own device, so no copy is made for it.
_METADATA_METHODS = frozenset({"size", "dim", "numel", "nelement", "ndimension"})
_METADATA_ATTRS = frozenset({"shape", "dtype", "ndim", "is_cuda", "requires_grad"})


def _as_graph_module(model: Any) -> fx.GraphModule:
    gm = getattr(model, "gm", model)
    if not isinstance(gm, fx.GraphModule):
        raise ApplyError(
            f"apply_placement expects a torch.fx.GraphModule or a CapturedModel (with .gm); "
            f"got {type(model).__name__}"
        )
    return gm


def _metadata_only(user: fx.Node, producer: fx.Node) -> bool:
    """True when ``user`` reads only device-independent metadata of ``producer``."""
    if user.op == "call_method" and user.target in _METADATA_METHODS and user.args[:1] == (producer,):
        return True
    if user.op == "call_function":
        if user.target is getattr and len(user.args) == 2 and user.args[1] in _METADATA_ATTRS:
            return True
        name = str(user.target)
        if name.startswith("aten.sym_size") or name.startswith("aten.sym_numel") or name.startswith("aten.sym_stride"):
            return True
    return False


def apply_placement(
    model: Any,
    placement: Mapping[str, str],
    output_device: str | None = None,
    non_blocking: bool = True,
    inplace: bool = False,
    real_devices: Mapping[str, str] | None = None,
    copy_transfers: bool = False,
) -> fx.GraphModule:
    """Return a GraphModule that runs ``model`` with each node on its placed device.

    Args:
        model: a ``torch.fx.GraphModule`` (from ``torch.fx.symbolic_trace``, from
            ``torch.export.export(...).module()``) or a ``CapturedModel`` (its ``.gm``).
        placement: ``{fx node name: device}``. Devices are torch device strings, or
            cluster device names when ``real_devices`` maps them. Nodes left out run
            with their first input (get_attr nodes: with their first user).
        output_device: where outputs are gathered (a device as in ``placement``);
            default the output node's placed device, else the first placed device.
        non_blocking: allow non-blocking copies where they are safe (see module doc).
        inplace: modify ``model`` itself instead of a deep copy.
        real_devices: ``{device name: torch device string}`` for virtual devices. Cut
            edges are decided on the names, so a transfer node sits between two virtual
            devices even when both map onto the same real device (the copy is then a
            no-op at run time, but the graph is the one a real cluster would run).
        copy_transfers: every transfer gives its destination a tensor of its own, also
            between virtual devices on one real device. The numerical check runs so: a
            no-op transfer hands over the tensor itself, so a copy made before an in-place
            update of it would still see the update here and not on a real cluster.

    Returns:
        The placed GraphModule. It carries ``placer_placement`` (device name per node),
        ``placer_real_devices`` (name → torch device), ``placer_output_device`` and,
        when the placement is module-aligned, ``hf_device_map`` (real devices; see
        :func:`placement_device_map`).

    Raises:
        ApplyError: unknown node names, devices that are neither torch devices nor
            mapped, or a module/tensor used by several nodes placed on different devices.
    """
    with paused_gc():  # copying and rewriting a large graph: see graphs.gc_pause
        return _apply(model, placement, output_device, non_blocking, inplace, real_devices, copy_transfers)


def check_applicable(model: Any, placement: Mapping[str, str], output_device: str | None = None,
                     real_devices: Mapping[str, str] | None = None) -> None:
    """Raise the ``ApplyError`` that :func:`apply_placement` would, without copying or moving anything.

    For placements taken from the user (the tuner's given candidates): one that splits a
    shared module was found only when the tuner switched to it, in the middle of training,
    with the model half moved.
    """
    src = _as_graph_module(model)
    canon, output_device, resolve = _resolved_placement(src, placement, output_device, real_devices)
    dev, _ = _effective_devices(src, canon, output_device)
    mover = _Mover(src, resolve.real, move=False)
    for n in src.graph.nodes:
        if n.op == "call_module":
            mover.move_module(str(n.target), dev[n.name], f"node {n.name!r}")  # type: ignore[arg-type]
        elif n.op == "get_attr":
            mover.move_attr(str(n.target), dev[n.name], f"node {n.name!r}")  # type: ignore[arg-type]


def _resolved_placement(src: fx.GraphModule, placement: Mapping[str, str], output_device: str | None,
                        real_devices: Mapping[str, str] | None) -> tuple[dict[str, str], str, _resolver]:
    """Canonical device per placed node, the output device and the resolver (unknown nodes refused)."""
    names = {n.name for n in src.graph.nodes}
    unknown = sorted(set(placement) - names)
    if unknown:
        raise ApplyError(
            f"placement names {len(unknown)} node(s) that are not in the model's graph, e.g. "
            f"{unknown[:3]}; expected the fx node names of the captured model"
        )
    resolve = _resolver(real_devices)
    canon = {n: resolve.name(d, n) for n, d in placement.items()}
    if output_device is None:
        out_node = next(n for n in src.graph.nodes if n.op == "output")
        output_device = canon.get(out_node.name) or next(
            (canon[n.name] for n in src.graph.nodes if n.name in canon), "cpu"
        )
    return canon, resolve.name(output_device, "output"), resolve


def _apply(model: Any, placement: Mapping[str, str], output_device: str | None, non_blocking: bool,
           inplace: bool, real_devices: Mapping[str, str] | None, copy_transfers: bool = False) -> fx.GraphModule:
    src = _as_graph_module(model)
    canon, output_device, resolve = _resolved_placement(src, placement, output_device, real_devices)

    gm = src if inplace else _copy_graph_module(src)
    graph = gm.graph
    dev, homes = _effective_devices(gm, canon, output_device)

    # 1. Parameters, buffers and attribute tensors to their node's device.
    mover = _Mover(gm, resolve.real)
    for n in graph.nodes:
        if n.op == "call_module":
            mover.move_module(str(n.target), dev[n.name], f"node {n.name!r}")  # type: ignore[arg-type]
        elif n.op == "get_attr":
            mover.move_attr(str(n.target), dev[n.name], f"node {n.name!r}")  # type: ignore[arg-type]

    # 2. Ops that name a device, and factories that name none, make their tensor where placed.
    def placed(n: fx.Node) -> tuple[str, str]:
        name = dev[n.name]
        assert name is not None  # only placeholders have no device, and they call nothing
        return name, resolve.real(name)

    for t in factories_where_placed(graph, placed, non_blocking, copy_transfers):
        dev[t.name] = t.meta["placer_transfer"][1]

    # 3. A transfer on every cut edge, one per (producer, destination device). A tensor
    #    that some op updates in place is copied right before each consumer instead: a
    #    copy made when it was produced would miss the updates between (an EMA buffer
    #    read after its mul_/add_, an activation read after its relu_).
    updated = _updated_in_place(gm)

    def cut(producer: fx.Node, late: bool) -> None:
        src_dev = dev[producer.name]
        transfers: dict[Any, fx.Node] = {}
        for user in list(producer.users):
            dst = dev.get(user.name)
            if dst is None or dst == src_dev or _metadata_only(user, producer):
                continue
            t = transfers.get(user if late else dst)
            if t is None:
                anchor = producer if producer.op != "placeholder" else _last_placeholder(graph)
                with graph.inserting_before(user) if late else graph.inserting_after(anchor):
                    t = _transfer_node(graph, producer, src_dev, dst, resolve.real(dst), non_blocking, copy_transfers)
                dev[t.name] = dst
                transfers[user if late else dst] = t
            user.replace_input_with(producer, t)

    moved_inputs: list[tuple[fx.Node, fx.Node]] = []
    for producer in list(graph.nodes):
        if producer.op == "output":
            continue
        home = homes.get(producer.name)
        if home is None:
            cut(producer, late=producer.name in updated)
            continue
        # An input updated in place: moved once to its home, its readers elsewhere copy from there.
        with graph.inserting_after(_last_placeholder(graph)):
            moved = _transfer_node(graph, producer, None, home, resolve.real(home), non_blocking, copy_transfers)
        dev[moved.name] = home
        producer.replace_all_uses_with(moved, delete_user_cb=lambda user: user is not moved)
        cut(moved, late=True)
        moved_inputs.append((producer, moved))
    output = next(n for n in graph.nodes if n.op == "output")
    for caller, moved in moved_inputs:
        with graph.inserting_before(output):
            graph.call_function(write_back, (caller, moved))

    graph.lint()
    gm.recompile()  # the eval forward, where the captured graph has one, comes back with it (follow_eval_mode)
    gm.placer_placement = {n.name: dev[n.name] for n in graph.nodes if dev.get(n.name) is not None}
    gm.placer_real_devices = {d: resolve.real(d) for d in set(gm.placer_placement.values())}
    gm.placer_output_device = output_device
    # State only the eval graph reads (a head only eval mode calls) goes where its data is
    # placed: no training op moved it, and the eval forward would run it where the user's model was.
    eval_mover = _Mover(gm, str)
    for target, real in eval_only_state(gm).items():
        eval_mover.move_attr(target, _canonical(real), f"the eval graph's {target!r}")
    nx_graph = getattr(model, "graph", None)
    device_map = placement_device_map(
        nx_graph if isinstance(nx_graph, nx.DiGraph) else src,
        {n: resolve.real(d) for n, d in canon.items()},
    )
    if device_map is not None:
        gm.hf_device_map = device_map
    modes = getattr(model, "training_modes", None)
    if modes and not inplace:
        # The graph was traced in these modes (a model in eval mode is captured in training mode),
        # while the modules it shares with the user's model went back to theirs: the copy had a
        # root in training mode over BatchNorms in eval mode.
        set_training_modes(gm, modes)
    return gm


def _last_placeholder(graph: fx.Graph) -> fx.Node:
    # Input transfers go after all placeholders: fx requires placeholders first.
    last = None
    for n in graph.nodes:
        if n.op == "placeholder":
            last = n
    assert last is not None
    return last


