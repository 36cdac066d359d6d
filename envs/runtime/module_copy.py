"""Copies of a model that keep what ``copy.deepcopy`` loses: :func:`deep_copy`.

``copy.deepcopy`` leaves out a parameter's gradient hooks and the attributes set on it, and
refuses the computed tensors that ``torch.nn.utils.prune`` and the old ``weight_norm`` keep as
attributes; ``GraphModule.__deepcopy__`` also forgets which buffers are non-persistent
(:func:`_copy_graph_module`). apply copies the captured graph with these and the numerical
check copies the user's model with them, so both sides of a check keep the same hooks.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.fx as fx

from graphs.forward_checks import pin_constant_inputs
from graphs.module_attributes import keep_plain_attributes
from graphs.stale_state import held_tensors

__all__ = ["deep_copy"]


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


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
    memo = _computed_attributes(module)
    twin = copy.deepcopy(module, memo)
    _rebind_hook_closures(module, twin, memo)
    _leaf_script_parameters(twin)
    _keep_parameter_extras(module, twin)
    return twin


#: The hook tables of a module whose functions :func:`_rebind_hook_closures` rebinds.
_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _rebind_hook_closures(src: torch.nn.Module, twin: torch.nn.Module, memo: dict[int, Any]) -> None:
    """Make the copy's hooks that are closures refer to the copy.

    ``copy.deepcopy`` copies a function by reference, so a hook registered as a closure over the
    model (``self.body[1].register_forward_hook(lambda m, i, o: self.features.__setitem__("mid",
    o))``, deep supervision) still wrote into the *original*'s ``features`` while the copy's
    forward read its own: the check's reference computed with a stale activation and called a
    right placement different (gradients 1.9e-02 apart). A closure cell holding an object this
    copy copied (``memo``: original id -> copy) is given the copy, and so is one holding a module
    that shares its parameter table with a copied one (the model ``get_model()`` built, of which
    the model placer holds is a view when forward() takes fewer inputs than the batch gives);
    bound-method hooks are rebound by deepcopy itself."""
    by_table = {id(vars(o).get("_parameters")): t for o, t in zip(src.modules(), twin.modules())}

    def copied(value: Any) -> Any:
        if id(value) in memo:
            return memo[id(value)]
        if isinstance(value, torch.nn.Module):
            return by_table.get(id(vars(value).get("_parameters")), value)
        return value

    for module in twin.modules():
        for table in _HOOK_TABLES:
            hooks = getattr(module, table, None) or {}
            for key, hook in list(hooks.items()):
                if isinstance(hook, types.FunctionType):
                    hooks[key] = _rebound(hook, copied)


def _rebound(hook: types.FunctionType, copied: Callable[[Any], Any]) -> types.FunctionType:
    """``hook`` with each closure cell's value replaced by ``copied(value)``; ``hook`` itself
    when it is no closure or no value changes."""
    if not hook.__closure__:
        return hook
    new_cells, changed = [], False
    for cell in hook.__closure__:
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell stays empty
            new_cells.append(types.CellType())
            continue
        twin_value = copied(value)
        changed |= twin_value is not value
        new_cells.append(types.CellType(twin_value))
    if not changed:
        return hook
    rebound = types.FunctionType(hook.__code__, hook.__globals__, hook.__name__, hook.__defaults__, tuple(new_cells))
    rebound.__kwdefaults__ = hook.__kwdefaults__
    rebound.__dict__.update(hook.__dict__)
    return rebound


def _leaf_script_parameters(twin: torch.nn.Module) -> None:
    """Make the parameters of ``twin``'s TorchScript modules leaves again: ``copy.deepcopy`` of a
    ``torch.jit.script``-ed module gives clones with a ``grad_fn`` (CloneBackward0; torch 2.13),
    which no optimizer takes ("can't optimize a non-leaf Tensor") and whose gradient flows back
    into the original's."""
    for root in twin.modules():
        if not isinstance(root, torch.jit.ScriptModule):
            continue
        owners = dict(root.named_modules())  # a ScriptModule has no get_submodule
        for name, p in list(root.named_parameters()):
            if p.is_leaf:
                continue
            path, _, leaf = name.rpartition(".")
            setattr(owners[path], leaf, torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad))


def _computed_attributes(root: torch.nn.Module) -> dict[int, Any]:
    """A deep-copy memo giving each module attribute that holds a tensor computed with gradients
    (not a parameter or buffer) a detached copy of it.

    ``torch.nn.utils.prune`` and the old ``torch.nn.utils.weight_norm`` keep such a tensor
    (``weight = weight_orig * weight_mask``) and recompute it in a forward pre-hook at every call;
    torch refuses to deep-copy a tensor that is not a graph leaf, so apply_placement failed on
    every such model (walkthrough: RuntimeError "Only Tensors created explicitly by the user").
    The copy's value is the current one; its hook recomputes it from the copied parameters.

    Tensors inside an attribute's dicts, lists and tuples count too: a forward hook that keeps
    an activation for a loss (``self.features["mid"] = output``, deep supervision) left one there
    after every forward, and the numerical check ended placer with that RuntimeError's traceback."""
    memo: dict[int, Any] = {}
    for _, _, _, value in held_tensors(root, private=True):
        if not isinstance(value, torch.nn.Parameter) and value.grad_fn is not None and id(value) not in memo:
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
