"""Apply a placement to a captured model: one fx GraphModule that runs across devices.

A placement maps fx node names (the placement graph's node names) to torch device
strings. :func:`apply_placement` returns a deep copy of the GraphModule in which

* every ``call_module`` node's parameters and buffers live on that node's device,
* every ``get_attr`` tensor lives on its node's device,
* every op that names a device, and every factory op that names none (``torch.arange(n)``),
  makes its tensor on its node's device; a random draw (``torch.randn``) still draws where
  the original does, with a transfer to its node's device right after it
  (:func:`factories_where_placed`),
* a transfer node (:func:`to_device`) sits on every cut edge, one per
  (producer, destination device) and shared by all consumers on that device,
* inputs are moved to every device that consumes them,
* outputs are gathered on ``output_device``,
* state only the eval graph reads (a head only eval mode calls) lives where the eval
  forward's data reaches it (:func:`graphs.eval_mode.eval_only_state`).

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
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import networkx as nx
import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

from envs.runtime.device_map import placement_device_map
from envs.runtime.real_devices import real_device_problem
from graphs.capture import pin_constant_inputs, set_training_modes
from graphs.errors import PlacerError
from graphs.eval_mode import eval_only_state
from graphs.gc_pause import paused_gc
from graphs.module_attributes import keep_plain_attributes
from graphs.ops import draws_random, in_place_writes, is_factory, storage_roots, view_parent, written_nodes

__all__ = [
    "ApplyError",
    "apply_placement",
    "to_device",
    "deep_copy",
    "factories_where_placed",
    "transfer_nodes",
    "written_inputs",
    "write_back",
    "placement_device_map",
    "RealizedPlacement",
    "realize_placement",
]


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


class ApplyError(PlacerError, ValueError):
    """A placement that cannot be applied to the model it was given."""


#: Tensor methods / attributes that read only metadata: a consumer doing only this
#: does not need the tensor on its own device, so no copy is made for it.
_METADATA_METHODS = frozenset({"size", "dim", "numel", "nelement", "ndimension"})
_METADATA_ATTRS = frozenset({"shape", "dtype", "ndim", "is_cuda", "requires_grad"})

def to_device(value: Any, device: str, non_blocking: bool = False, copy: bool = False) -> Any:
    """Move every tensor inside ``value`` (nested tuples/lists/dicts) to ``device``.

    Non-tensor leaves pass through unchanged. This is the target of every transfer
    node that :func:`apply_placement` inserts. ``copy``: a tensor already on ``device``
    is cloned rather than passed on as itself, as a move between two real devices gives
    the destination its own storage.
    """
    if isinstance(value, fx.Proxy):
        # Unpickling a GraphModule re-traces its code (fx's _deserialize_graph_module): tree_map
        # would pass the Proxy through and the transfer would vanish from the graph, the loaded
        # model's ops on one device then reading tensors of another.
        return value.tracer.create_proxy("call_function", to_device, (value, device),
                                         {"non_blocking": non_blocking, **({"copy": True} if copy else {})})

    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            moved = x.to(device, non_blocking=non_blocking)
            return moved.clone() if copy and moved is x else moved
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            # pytree leaves a dataclass output whole: its tensors stayed where they were made,
            # not on the output device the loss code was promised (walkthrough).
            return dataclasses.replace(x, **{f.name: to_device(getattr(x, f.name), device, non_blocking, copy)
                                             for f in dataclasses.fields(x) if f.init})
        return x

    return tree_map(move, value)


def _as_graph_module(model: Any) -> fx.GraphModule:
    gm = getattr(model, "gm", model)
    if not isinstance(gm, fx.GraphModule):
        raise ApplyError(
            f"apply_placement expects a torch.fx.GraphModule or a CapturedModel (with .gm); "
            f"got {type(model).__name__}"
        )
    return gm


def _parse_device(name: Any, node: str, must_exist: bool = True) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ApplyError(
            f"node {node!r} is placed on {name!r}, which is not a torch device string; "
            f"expected e.g. 'cpu', 'cuda:0' (map virtual devices with realize_placement first)"
        ) from exc
    problem = real_device_problem(name) if must_exist else None
    if problem is not None:  # cuda:0 on a CPU-only build, meta: refused here, not as a torch traceback mid-run
        raise ApplyError(f"node {node!r} is placed on a device this machine cannot use: {problem}")
    return device


def _canonical(dev: torch.device) -> str:
    # "cuda" and "cuda:0" are the same device once a tensor lives there, and a CPU tensor
    # reports "cpu" whatever index was asked for; compare canonically.
    if dev.type == "cpu":
        return "cpu"
    if dev.index is None and dev.type in ("cuda", "xpu", "mps"):
        return f"{dev.type}:0"
    return str(dev)


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


def _tensor_attr(root: torch.nn.Module, qualname: str) -> tuple[torch.nn.Module, str, Any]:
    owner_path, _, attr = qualname.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    return owner, attr, getattr(owner, attr)


class _Mover:
    """Moves parameters, buffers and attribute tensors, refusing to split a shared one."""

    def __init__(self, root: torch.nn.Module, real: Any, move: bool = True) -> None:
        self.root = root
        self.real = real  # device name -> torch device string
        self.move = move  # False: claim only, to find a conflict before anything moves
        self.where: dict[int, tuple[str, str]] = {}  # id(tensor) -> (device, who)

    def claim(self, tensor: torch.Tensor, device: str, who: str) -> None:
        key = id(tensor)
        prev = self.where.get(key)
        if prev is not None and prev[0] != device:
            raise ApplyError(
                f"{who} needs a tensor on {device} that {prev[1]} needs on {prev[0]}; a module or "
                f"tensor used by several nodes must have all of them on one device "
                f"(group the placement graph so shared modules are co-located)"
            )
        self.where[key] = (device, who)

    def move_module(self, path: str, device: str, who: str) -> None:
        mod = self.root.get_submodule(path)
        for name, p in mod.named_parameters(recurse=True):
            self.claim(p, device, who)
        for name, b in mod.named_buffers(recurse=True):
            self.claim(b, device, who)
        if not self.move:
            return
        real = self.real(device)
        for sub in mod.modules():
            self._move_own(sub, real)
            if isinstance(sub, torch.nn.RNNBase) and torch.device(real).type == "cuda":
                # Module.to() would do this: cuDNN wants the weights in one contiguous chunk.
                sub.flatten_parameters()

    def move_attr(self, qualname: str, device: str, who: str) -> None:
        owner, attr, value = _tensor_attr(self.root, qualname)
        if isinstance(value, torch.nn.Module):
            self.move_module(qualname, device, who)
            return
        if not isinstance(value, torch.Tensor):
            return
        self.claim(value, device, who)
        if self.move:
            # Parameters, buffers and plain tensor attributes (fx's _tensor_constant*) alike.
            self._move_tensor(value, self.real(device))

    @staticmethod
    def _move_tensor(t: torch.Tensor, device: str) -> None:
        if _canonical(t.device) != device:
            # Assigning .data keeps the tensor object (so tied weights stay tied and an
            # optimizer built afterwards sees the moved Parameter).
            t.data = t.data.to(device)
            if t.grad is not None:
                t.grad.data = t.grad.data.to(device)

    def _move_own(self, mod: torch.nn.Module, device: str) -> None:
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is not None:
                self._move_tensor(t, device)


def _effective_devices(
    gm: fx.GraphModule, placement: Mapping[str, str], output_device: str
) -> dict[str, str | None]:
    """Device each node runs on: its placement, adjusted for mutation; None for inputs."""
    nodes = list(gm.graph.nodes)
    first = next((placement[n.name] for n in nodes if n.name in placement), output_device)
    dev: dict[str, str | None] = {}
    for n in nodes:
        if n.op == "placeholder":
            dev[n.name] = None  # the caller's tensor: moved to each consuming device
        elif n.op == "output":
            dev[n.name] = output_device
        elif n.name in placement:
            dev[n.name] = placement[n.name]
        elif n.op == "get_attr":
            placed_users = [u for u in n.users if u.name in placement]
            dev[n.name] = placement[placed_users[0].name] if placed_users else None
        else:
            # Unplaced compute (e.g. nodes added after capture) runs with its first input.
            ins = [dev.get(a.name) for a in n.all_input_nodes if dev.get(a.name) is not None]
            dev[n.name] = ins[0] if ins else first
    for n in nodes:  # unplaced get_attr whose users were unplaced too
        if n.op == "get_attr" and dev[n.name] is None:
            ins = [dev[u.name] for u in n.users if dev[u.name] is not None]
            dev[n.name] = ins[0] if ins else first

    # Mutation: state follows the op that updates it; an in-place op on an activation
    # runs where that activation lives. A view of a tensor that something updates in place
    # (h.narrow(...), buf[:2]) runs where that tensor lives too: a view made on another
    # device would be a copy, so a write through it would miss the tensor, and the tensor's
    # updates would miss it.
    root = storage_roots(gm.graph.nodes, gm)
    written = {root[arg].name for n in nodes for arg in written_nodes(n, gm)}
    state_owner: dict[str, str] = {}
    for n in nodes:
        for arg in written_nodes(n, gm):
            base = root[arg]
            if base.op != "get_attr" or (arg is not base and base.name in state_owner):
                continue
            prev = state_owner.get(base.name)
            if prev is not None and prev != dev[n.name]:
                raise ApplyError(
                    f"state {base.target!r} is updated in place on {prev} and on {dev[n.name]}; "
                    f"the ops that update it must be on one device"
                )
            state_owner[base.name] = dev[n.name]  # type: ignore[assignment]
    dev.update(state_owner)
    homes = written_inputs(gm, dev, root)
    for n in nodes:
        parent = view_parent(n)
        if root[n].name in homes and (parent is not None or written_nodes(n, gm)):
            dev[n.name] = homes[root[n].name]  # a view or an update of an input: where it is moved to
            continue
        if parent is not None and root[n].name in written and dev.get(parent.name) is not None:
            dev[n.name] = dev[parent.name]
        for arg in written_nodes(n, gm):
            if arg.op != "get_attr" and dev.get(arg.name) is not None:
                dev[n.name] = dev[arg.name]
    return dev


def written_inputs(gm: fx.GraphModule, dev: Mapping[str, str | None],
                   roots: Mapping[fx.Node, fx.Node] | None = None) -> dict[str, str]:
    """``{input: device}`` for the inputs (placeholders) that forward() updates in place
    (``x.mul_(2)``, ``x[:, 0] = 0``), each with the device of its first update.

    Every other input is copied to each device that reads it; such an input is moved once, to
    that device, where all its updates and views run and from which its readers elsewhere get
    their copies, and its final value is written back into the caller's tensor
    (:func:`write_back`), as the original model updates it. Copied per reader, each update
    landed on a copy of its own and the caller's tensor was left as it was (walkthrough: outputs
    2.19 off, the input 4.93 off, over two devices with copying transfers).
    """
    if roots is None:
        roots = storage_roots(gm.graph.nodes, gm)
    homes: dict[str, str] = {}
    for writer, written in in_place_writes(gm, roots):
        device = dev.get(writer.name)
        if written.op == "placeholder" and device is not None:
            homes.setdefault(written.name, device)
    return homes


def write_back(caller: Any, value: Any) -> None:
    """Copy ``value`` (an input forward() updated in place, on the device it was moved to) into
    ``caller`` (the caller's tensor), unless it is that tensor: see :func:`written_inputs`."""
    if isinstance(caller, fx.Proxy):  # fx re-traces the code when a placed model is unpickled
        caller.tracer.create_proxy("call_function", write_back, (caller, value), {})
        return
    if isinstance(caller, torch.Tensor) and isinstance(value, torch.Tensor) and value is not caller:
        caller.copy_(value)


def _updated_in_place(gm: fx.GraphModule) -> set[str]:
    """Nodes whose storage some op updates in place: the written tensor, its views and the
    in-place ops' results (a view made before the update sees it; a copy made then would not)."""

    def tensor(n: fx.Node) -> str:  # two get_attr nodes of one attribute read one tensor
        return f"attr:{n.target}" if n.op == "get_attr" else n.name

    roots = storage_roots(gm.graph.nodes, gm)
    targets = {tensor(written) for _, written in in_place_writes(gm)}
    return {n.name for n in gm.graph.nodes if tensor(roots[n]) in targets}


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
    dev = _effective_devices(src, canon, output_device)
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
    dev = _effective_devices(gm, canon, output_device)

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
    homes = written_inputs(gm, dev)

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


def _transfer_node(graph: fx.Graph, producer: fx.Node, src: str | None, dst: str, real: str, non_blocking: bool,
                   copy_transfers: bool) -> fx.Node:
    """A :func:`to_device` node moving ``producer``'s value from ``src`` to ``dst`` (``real`` on this
    machine), at the graph's insertion point; non-blocking only towards an accelerator (module doc)."""
    t = graph.call_function(
        to_device,
        (producer, real),
        {"non_blocking": bool(non_blocking and torch.device(real).type != "cpu"),
         **({"copy": True} if copy_transfers else {})},
    )
    t.name = graph._graph_namespace.create_name(f"{producer.name}_to_{_ident(dst)}", None)
    t.meta["placer_transfer"] = (src, dst)
    return t


def factories_where_placed(graph: fx.Graph, placed: Callable[[fx.Node], tuple[str, str]],
                           non_blocking: bool = True, copy_transfers: bool = False) -> list[fx.Node]:
    """Make every op of ``graph`` that names a device, and every factory that names none, make its
    tensor on its node's device; returns the transfers it inserted. ``placed(node)``: the node's
    device name and this machine's device for it (apply: the placement's; a pipeline stage: its one
    device).

    A constant ``device=`` (torch.export bakes the capture's into factory ops and ``.to``) is
    replaced. A factory without one (``torch.arange(n)``, ``torch.zeros(n)`` in an fx graph:
    :func:`graphs.ops.is_factory`) would make its tensor on the default device whatever the
    placement, and its consumers on the placed device would get no transfer (the value is not
    where the placement, and the simulator, say it is), so it is given its node's device; its
    dtype and other arguments stay. A device computed in the graph (``device=x.device``)
    follows its data already and is left alone.

    A random draw (:func:`graphs.ops.draws_random`: ``torch.randn``) is not moved: another
    device's generator draws other numbers, and the placed model must compute the original's.
    It draws where the original does (its constant ``device=``, else the default device at the
    time of this call), and a transfer right after it brings its value to its placed device,
    where its consumers (and the simulator) expect it. That transfer's source is the real device
    the draw is made on, not a device name of the placement.
    """
    copies: list[fx.Node] = []
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        named = n.kwargs.get("device")
        if not isinstance(named, (torch.device, str)) and (named is not None or not is_factory(n)):
            continue
        name, real = placed(n)
        device = torch.device(real)
        if not draws_random(n):
            if named is None or torch.device(named) != device:
                n.kwargs = {**n.kwargs, "device": device}
            continue
        drawn = torch.device(named) if named is not None else torch.get_default_device()
        if _canonical(drawn) == _canonical(device):
            continue
        with graph.inserting_after(n):
            t = _transfer_node(graph, n, str(drawn), name, real, non_blocking, copy_transfers)
        n.replace_all_uses_with(t, delete_user_cb=lambda user: user is not t)
        copies.append(t)
    return copies


def _copy_graph_module(src: fx.GraphModule) -> fx.GraphModule:
    """A deep copy that keeps which buffers are non-persistent.

    ``GraphModule.__deepcopy__`` rebuilds the module and forgets ``persistent=False``, so
    such a buffer would appear in the placed model's ``state_dict()`` and loading that
    back into the original with ``strict=True`` would fail on an unexpected key.
    """
    gm = deep_copy(src)
    copies = dict(gm.named_modules(remove_duplicate=False))
    for path, mod in src.named_modules(remove_duplicate=False):
        twin = copies.get(path)
        if twin is not None and mod._non_persistent_buffers_set:
            twin._non_persistent_buffers_set.update(k for k in mod._non_persistent_buffers_set if k in twin._buffers)
    # The rebuild also makes buffers of plain tensor attributes (fx's constants), and drops hooks.
    keep_plain_attributes(gm, (n for n, _ in src.named_buffers(remove_duplicate=False)))
    if getattr(src, "placer_constant_inputs", None):
        pin_constant_inputs(gm, src.placer_constant_inputs)
    return gm  # a refusal of eval mode comes along (graphs.eval_mode.refuse_eval_mode)


def deep_copy(module: ModuleT) -> ModuleT:
    """``copy.deepcopy(module)`` with what it loses or refuses kept: its parameters' gradient
    hooks and attributes (:func:`_keep_parameter_extras`), and the computed tensors prune and the
    old weight_norm keep as attributes (:func:`_computed_attributes`). apply copies the captured
    graph with it, and the numerical check copies the user's model with it, so both sides keep
    the same hooks."""
    twin = copy.deepcopy(module, _computed_attributes(module))
    _keep_parameter_extras(module, twin)
    return twin


def _computed_attributes(root: torch.nn.Module) -> dict[int, Any]:
    """A deep-copy memo giving each module attribute that holds a tensor computed with gradients
    (not a parameter or buffer) a detached copy of it.

    ``torch.nn.utils.prune`` and the old ``torch.nn.utils.weight_norm`` keep such a tensor
    (``weight = weight_orig * weight_mask``) and recompute it in a forward pre-hook at every call;
    torch refuses to deep-copy a tensor that is not a graph leaf, so apply_placement failed on
    every such model (walkthrough: RuntimeError "Only Tensors created explicitly by the user").
    The copy's value is the current one; its hook recomputes it from the copied parameters."""
    memo: dict[int, Any] = {}
    for module in root.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) \
                    and value.grad_fn is not None and id(value) not in memo:
                memo[id(value)] = value.detach().clone()
    return memo


def _keep_parameter_extras(src: torch.nn.Module, twin: torch.nn.Module) -> None:
    """Give ``twin``'s parameters (a deep copy of ``src``) what ``Parameter.__deepcopy__`` leaves
    out of ``src``'s: their gradient hooks and the attributes the model set on them.

    It copies the data alone, so a hook the model put on a weight
    (``emb.weight.register_hook(lambda g: g * mask)``, rows kept frozen; a per-weight clip;
    ``register_post_accumulate_grad_hook``) was gone from the placed model: other gradients, no
    error (walkthrough: gradients 0.106 off); and so was an attribute that sorts parameters into
    optimizer groups (``p._optim = {"weight_decay": 0.0}``, ``p.no_weight_decay = True``), which
    then put the placed model's weights in other groups than the model's."""
    theirs = dict(src.named_parameters())
    for name, p in twin.named_parameters():
        original = theirs.get(name)
        if original is None or original is p:
            continue
        for key, value in vars(original).items():
            if key not in vars(p):
                setattr(p, key, copy.deepcopy(value))
        for hook in (original._backward_hooks or {}).values():
            p.register_hook(hook)
        for hook in (getattr(original, "_post_accumulate_grad_hooks", None) or {}).values():
            p.register_post_accumulate_grad_hook(hook)


def _ident(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "dev"


class _resolver:
    """Device names → canonical names and real torch device strings."""

    def __init__(self, real_devices: Mapping[str, str] | None) -> None:
        self.checked: dict[str, str | None] = {}  # real device -> why it cannot be used (None: it can)
        self.canonical: dict[str, str] = {}
        self.mapping = None
        if real_devices is not None:
            self.mapping = {
                str(k): _canonical(_parse_device(v, f"<device {k}>", must_exist=False))
                for k, v in real_devices.items()
            }

    def name(self, device: Any, node: str) -> str:
        if self.mapping is not None:
            if str(device) not in self.mapping:
                raise ApplyError(
                    f"node {node!r} is placed on {device!r}, which real_devices does not map; "
                    f"known devices are {sorted(self.mapping)}"
                )
            real = self.mapping[str(device)]
            if real not in self.checked:
                self.checked[real] = real_device_problem(real)
            problem = self.checked[real]
            if problem is not None:
                raise ApplyError(f"node {node!r} is placed on {device!r}, which maps onto a device this machine "
                                 f"cannot use: {problem}")
            return str(device)
        if not isinstance(device, str):
            return _canonical(_parse_device(device, node))
        if device not in self.canonical:  # once per device, not once per node
            self.canonical[device] = _canonical(_parse_device(device, node))
        return self.canonical[device]

    def real(self, name: str) -> str:
        return self.mapping[name] if self.mapping is not None else name


def _last_placeholder(graph: fx.Graph) -> fx.Node:
    # Input transfers go after all placeholders: fx requires placeholders first.
    last = None
    for n in graph.nodes:
        if n.op == "placeholder":
            last = n
    assert last is not None
    return last


def transfer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The transfer nodes :func:`apply_placement` inserted into ``gm``."""
    return [n for n in gm.graph.nodes if "placer_transfer" in n.meta]


# --------------------------------------------------------------------------- virtual devices


@dataclass(frozen=True)
class RealizedPlacement:
    """A placement over cluster device names mapped onto real torch devices.

    Attributes:
        assignment: node → real torch device string.
        virtual_to_real: cluster device name → real device string.
        shared: real device → the virtual devices mapped onto it (only where > 1).
        note: a sentence for reports; says when a measured time cannot show parallelism.
    """

    assignment: dict[str, str]
    virtual_to_real: dict[str, str]
    shared: dict[str, list[str]] = field(default_factory=dict)
    note: str = ""

    @property
    def parallel(self) -> bool:
        """False when several virtual devices share one real device."""
        return not self.shared


def realize_placement(placement: Mapping[str, str], devices: Any) -> RealizedPlacement:
    """Map a placement over cluster device names to real torch devices.

    Args:
        placement: node → cluster device name.
        devices: a mapping ``{cluster device name: real device}``, a Cluster (anything
            with ``.devices``), or an iterable of Device-like objects with ``name`` and
            ``real_device`` (a device whose ``real_device`` is empty maps to its own name).

    Raises:
        ApplyError: a placed device the mapping does not know, or a real device that is
            not a torch device string.
    """
    mapping = _real_mapping(devices)
    unknown = sorted({d for d in placement.values() if d not in mapping})
    if unknown:
        raise ApplyError(
            f"placement uses device(s) {unknown} that the cluster does not define; "
            f"devices are {sorted(mapping)}"
        )
    for v, r in mapping.items():
        try:
            torch.device(r)
        except (RuntimeError, TypeError):
            raise ApplyError(
                f"device {v!r} maps onto {r!r}, which is not a torch device; name the cluster the placement "
                f"was made for (`--cluster 4xK40`, a spec file whose devices have a real_device such as 'cpu' or "
                f"'cuda:0')"
            ) from None
    used = sorted(set(placement.values()))
    by_real: dict[str, list[str]] = {}
    for v in used:
        by_real.setdefault(_canonical(torch.device(mapping[v])), []).append(v)
    shared = {r: vs for r, vs in by_real.items() if len(vs) > 1}
    note = ""
    if shared:
        parts = [f"{', '.join(vs)} → {r}" for r, vs in shared.items()]
        note = (
            "virtual devices share one real device ("
            + "; ".join(parts)
            + "): the measured time shows no parallelism between them"
        )
    return RealizedPlacement(
        assignment={n: _canonical(torch.device(mapping[d])) for n, d in placement.items()},
        virtual_to_real={v: _canonical(torch.device(r)) for v, r in mapping.items()},
        shared=shared,
        note=note,
    )


def _real_mapping(devices: Any) -> dict[str, str]:
    if isinstance(devices, Mapping):
        return {str(k): str(v) for k, v in devices.items()}
    devs: Iterable[Any] = getattr(devices, "devices", devices)
    out: dict[str, str] = {}
    for d in devs:
        name = getattr(d, "name", None)
        if name is None:
            raise ApplyError(f"expected Device objects with a name and real_device; got {d!r}")
        out[str(name)] = str(getattr(d, "real_device", None) or name)
    return out
