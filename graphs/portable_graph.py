"""A GraphModule that crosses a process boundary with its node names intact.

Pickling an ``fx.GraphModule`` keeps its generated Python code and traces that code again on
load (``torch/fx/graph_module.py``: ``reduce_graph_module`` -> ``_deserialize_graph_module``).
Node names then come from the re-trace: for a graph torch.export captured they change
(``linear`` becomes ``linear_default``, parameters become placeholders), and export's own
tracer class cannot even be built there (``_ModuleStackTracer`` needs a ``scope_root``). A
placement names nodes, so a worker that loads such a module cannot find them.

:class:`PortableGraph` carries the graph itself instead: every node's name, op, target,
arguments (other nodes by name) and type (operators by name), the graph's code generator (torch.export's
pytree in/out specs), and a plain module holding the submodules, parameters and buffers.
:meth:`PortableGraph.module` rebuilds the same graph, node for node.

Example::

    portable = PortableGraph.of(gm)
    again = pickle.loads(pickle.dumps(portable)).module()
    assert [n.name for n in again.graph.nodes] == [n.name for n in gm.graph.nodes]
"""

from __future__ import annotations

import importlib
import io
import pickle
import sys
import types
from dataclasses import dataclass
from typing import Any

import cloudpickle
import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["PortableGraph", "portable_pickle"]


@dataclass(frozen=True)
class _NodeRef:
    """An argument that is another node, by name."""

    name: str


@dataclass(frozen=True)
class _OpRef:
    """An ATen-style operator (``torch.ops.<ns>.<op>[.<overload>]``) by name: operator
    objects do not pickle."""

    namespace: str
    op: str
    overload: str | None

    @classmethod
    def of(cls, target: Any) -> Any:
        if isinstance(target, torch._ops.OpOverload):
            return cls(target.namespace, target._opname, target._overloadname)
        if isinstance(target, torch._ops.OpOverloadPacket):
            namespace, _, op = target._qualified_op_name.partition("::")
            return cls(namespace, op, None)
        return target

    def resolve(self) -> Any:
        packet = getattr(getattr(torch.ops, self.namespace), self.op)
        return packet if self.overload is None else getattr(packet, self.overload)


@dataclass(frozen=True)
class _FunctionRef:
    """A function by the module attribute it is published as. ``torch.nn.functional.max_pool2d``
    (and every other ``boolean_dispatch`` function) is made inside a factory, so pickle looks it
    up as ``boolean_dispatch.<locals>.fn`` and fails: Inception-v3's graph could not reach a
    worker process."""

    module: str
    name: str

    @classmethod
    def of(cls, target: Any) -> Any:
        module, name = getattr(target, "__module__", None), getattr(target, "__name__", None)
        if (callable(target) and "<locals>" in getattr(target, "__qualname__", "") and module and name
                and getattr(sys.modules.get(module), name, None) is target):
            return cls(module, name)
        return _OpRef.of(target)

    def resolve(self) -> Any:
        return getattr(importlib.import_module(self.module), self.name)


@dataclass(frozen=True)
class _PortableNode:
    name: str
    op: str
    target: Any
    args: Any
    kwargs: Any
    type: Any


@dataclass
class PortableGraph:
    """What :meth:`module` needs to rebuild a GraphModule with the same nodes (module doc)."""

    nodes: list[_PortableNode]
    codegen: Any
    root: nn.Module
    class_name: str

    @classmethod
    def of(cls, gm: fx.GraphModule) -> PortableGraph:
        """``gm`` as a picklable description (its tensors are shared, not copied)."""
        nodes = [_PortableNode(n.name, n.op, _FunctionRef.of(n.target), _refs(n.args), _refs(n.kwargs), n.type)
                 for n in gm.graph.nodes]
        root = nn.Module()
        for name, child in gm.named_children():
            root.add_module(name, child)
        for name, p in gm.named_parameters(recurse=False):
            root.register_parameter(name, p)
        for name, b in gm.named_buffers(recurse=False):
            root.register_buffer(name, b, persistent=name not in gm._non_persistent_buffers_set)
        # Plain tensor attributes a get_attr reads (torch.export's lifted constants).
        for n in gm.graph.nodes:
            if n.op == "get_attr" and "." not in str(n.target) and not hasattr(root, str(n.target)):
                setattr(root, str(n.target), getattr(gm, str(n.target)))
        root.training = gm.training
        return cls(nodes, gm.graph._codegen, root, type(gm).__name__)

    def module(self) -> fx.GraphModule:
        """The GraphModule again: the same nodes, names, code generator and tensors."""
        graph = fx.Graph()
        graph._codegen = self.codegen
        made: dict[str, fx.Node] = {}
        for p in self.nodes:
            args = _resolved(p.args, made)
            kwargs = _resolved(p.kwargs, made)
            target = p.target.resolve() if isinstance(p.target, (_OpRef, _FunctionRef)) else p.target
            node = graph.create_node(p.op, target, args, kwargs, name=p.name, type_expr=p.type)
            made[p.name] = node
            assert node.name == p.name, f"node {p.name!r} came back as {node.name!r}"
        gm = fx.GraphModule(self.root, graph, class_name=self.class_name)
        gm.train(self.root.training)
        return gm


def _refs(value: Any) -> Any:
    """``value`` with every node replaced by a :class:`_NodeRef` to it."""
    if isinstance(value, fx.Node):
        return _NodeRef(value.name)
    if isinstance(value, tuple):
        return tuple(_refs(v) for v in value)
    if isinstance(value, list):
        return [_refs(v) for v in value]
    if isinstance(value, dict):
        return {k: _refs(v) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_refs(value.start), _refs(value.stop), _refs(value.step))
    return value


def _resolved(value: Any, made: dict[str, fx.Node]) -> Any:
    """``value`` with every :class:`_NodeRef` replaced by the node of that name."""
    if isinstance(value, _NodeRef):
        return made[value.name]
    if isinstance(value, tuple):
        return tuple(_resolved(v, made) for v in value)
    if isinstance(value, list):
        return [_resolved(v, made) for v in value]
    if isinstance(value, dict):
        return {k: _resolved(v, made) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_resolved(value.start, made), _resolved(value.stop, made), _resolved(value.step, made))
    return value


def _hooked_parameter(data: torch.Tensor, requires_grad: bool, hooks: list[Any], state: dict[str, Any]) -> nn.Parameter:
    """A parameter again with the gradient hooks it had (:meth:`torch.Tensor.register_hook`)."""
    parameter = nn.Parameter(data, requires_grad=requires_grad)
    parameter.__dict__.update(state)
    for hook in hooks:
        parameter.register_hook(hook)
    return parameter


def _parametrized_module(base: type[nn.Module], state: dict[str, Any], names: list[str]) -> nn.Module:
    """A module with parametrized tensors again (:mod:`torch.nn.utils.parametrize`): its
    pickled state (the parametrizations and their originals among its submodules) under the
    class parametrize makes, with a property for each parametrized tensor, as
    ``register_parametrization`` leaves it."""
    module = base.__new__(base)
    module.__dict__.update(state)
    parametrize._inject_new_class(module)
    for name in names:
        parametrize._inject_property(module, name)
    return module


def _script_module(data: bytes) -> torch.jit.ScriptModule:
    """A TorchScript module again, from the bytes :func:`torch.jit.save` wrote."""
    return torch.jit.load(io.BytesIO(data))


class _Pickler(cloudpickle.Pickler):
    """A pickler for what a model holds beyond its tensors.

    - A TorchScript module is written as its ``torch.jit.save`` archive: pickle refuses one
      ("Tried to serialize object __torch__.<model file>.Gate which does not have a
      __getstate__ method defined!"), so a graph holding a ``torch.jit.script``-ed layer could
      not reach the pipeline's worker processes.
    - A function pickle cannot find by name (a lambda or a closure registered as a module's
      forward hook, ``self.head.register_forward_pre_hook(lambda m, i: ...)``) is written by
      value, as cloudpickle writes it; pickle refused it ("Can't pickle local object
      'Net.__init__.<locals>.<lambda>'"), so no pipeline or DDP of such a model was measured.
      Functions and classes it can find by name are written by name, as pickle writes them.
    - A module with parametrized tensors (``torch.nn.utils.parametrizations.spectral_norm`` or
      ``weight_norm``, ``parametrize.register_parametrization``) is written as its class before
      parametrizing, its state and the names of its parametrized tensors: torch refuses to pickle
      one ("Serialization of parametrized modules is only supported through state_dict()"),
      so no pipeline or DDP of a spectrally normalised GAN was measured.
    - A parameter with gradient hooks (``self.fc.weight.register_hook(lambda g: g.clamp(-1, 1))``)
      is written with them: torch pickles a tensor without its hooks (``Tensor._reduce_ex_internal``
      writes an empty ``OrderedDict``), so a pipeline stage or DDP replica in another process
      trained on the unhooked gradient.
    """

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.jit.ScriptModule):
            buffer = io.BytesIO()
            torch.jit.save(obj, buffer)
            return _script_module, (buffer.getvalue(),)
        if isinstance(obj, nn.Module) and parametrize.is_parametrized(obj):
            names = [name for name, _ in obj.get_submodule("parametrizations").named_children()]
            return _parametrized_module, (parametrize.type_before_parametrizations(obj), dict(obj.__dict__), names)
        if type(obj) is nn.Parameter and obj._backward_hooks:
            return _hooked_parameter, (obj.detach(), obj.requires_grad, list(obj._backward_hooks.values()),
                                       dict(obj.__dict__))
        return super().reducer_override(obj)


#: ``torch.save(obj, path, pickle_module=portable_pickle)``: pickle, with TorchScript modules
#: written as their archives and local functions by value (:class:`_Pickler`); ``torch.load``
#: reads the file as usual.
portable_pickle = types.SimpleNamespace(Pickler=_Pickler, Unpickler=pickle.Unpickler, load=pickle.load,
                                        __name__="pickle")
