"""The training flags of a model's modules, by module path, and those a traced graph baked in.

placer places a training step, so capture traces a model in training mode and puts the user's
modes back afterwards (:func:`training_modes`, :func:`set_training_modes`; the runtime switches
placed and original models with them too). A tracer runs ``if self.training:`` in the modules it
traces through, so the graph computes the mode it read: :func:`modes_on` names the submodules
whose flag the graph baked in, which :func:`graphs.eval_mode.follow_eval_mode` checks at every
forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch.fx as fx
from torch import nn

#: torch.nn layers whose mode lives in their ops' own flags: fx calls them whole (a ``call_module``
#: that follows the layer's flag), and :func:`graphs.eval_arguments.export_module_modes` checks them in a
#: torch.export graph only where the flag changes what they compute (an LSTM without dropout does not).
_MODE_IN_OPS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                                             nn.RNNBase, nn.modules.dropout._DropoutNd, nn.RReLU)


def modes_on(gm: fx.GraphModule, modes_read: Mapping[str, bool], model: nn.Module) -> dict[str, bool]:
    """The modes of ``modes_read`` (module path of ``model`` -> the training flag forward() read of
    it while traced) that ``gm`` can be told otherwise: those of its submodules (not the root, whose
    flag switches between the training and the eval forward; nor the layers of :data:`_MODE_IN_OPS`),
    which :func:`graphs.eval_mode.follow_eval_mode` checks at every forward.

    A tracer runs ``if self.training:`` and ``F.dropout(h, p, self.training)`` in a module it
    traces through, so the graph computes the mode it read: ``placed.backbone.eval()`` (a frozen
    backbone) changed nothing, with no error (walkthrough: outputs 0.52 off under fx; 0.015 under
    torch.export, whose ops' own flags were checked but not forward()'s branches).
    """
    modes: dict[str, bool] = {}
    for path, flag in modes_read.items():
        if not path:
            continue
        with contextlib.suppress(AttributeError):
            gm.get_submodule(path)  # a module without state (a Dropout) is not on the graph's module
            if not isinstance(model.get_submodule(path), _MODE_IN_OPS):
                modes[path] = flag
    return modes


def training_modes(module: nn.Module) -> dict[str, bool]:
    """module path -> its ``training`` flag."""
    return {path: m.training for path, m in module.named_modules(remove_duplicate=False)}


def set_training_modes(module: nn.Module, modes: dict[str, bool]) -> None:
    """Set each module's ``training`` flag from ``modes`` (paths not in it are left alone)."""
    for path, m in module.named_modules(remove_duplicate=False):
        if path in modes:
            m.training = modes[path]
