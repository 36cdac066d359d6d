"""Inception-V3 (Szegedy et al. 2016, "Rethinking the Inception Architecture").

The full network: the stem (five conv layers, two max-pools), three Inception-A modules
(35×35), the grid reduction B, four Inception-C modules with factorised 7×7 convolutions
(17×17), the grid reduction D, two Inception-E modules with expanded 3×3 filter banks
(8×8), global average pooling, dropout-free classifier. Every convolution is conv → batch
norm (eps 0.001) → ReLU. The auxiliary classifier on the 17×17 grid is optional
(``aux_logits``, off by default; when on, ``forward`` returns ``(logits, aux_logits)``
and the loss adds 0.4× the auxiliary cross-entropy, as in the paper).

Paper preset: 299×299 images, 1,000 classes, batch 32 (23.8M parameters without the
auxiliary head, 27.2M with it). Small preset: the same modules with every channel count
scaled by 1/8, 75×75 images (the smallest size the stride pattern admits), 10 classes.

Model file: ``get_example_inputs`` → ``(images, labels)``; ``get_loss`` is the
cross-entropy against ``labels``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from graphs.zoo.presets import MODEL_SEED, ZooArgumentError, check_positive_int, image_batch, resolve, seeded

NAME = "inception_v3"
MIN_IMAGE_SIZE = 75  # below this the 8×8 grid of the last stage shrinks to nothing
AUX_MIN_GRID = 17  # the auxiliary head's 5×5/3 pool and 5×5 conv need the full 17×17 grid
AUX_WEIGHT = 0.4


def grid_17(image_size: int) -> int:
    """Side of the "17×17" feature map (input of Mixed_6b..6e) for square images of ``image_size``."""
    side = (image_size - 3) // 2 + 1  # Conv2d_1a_3x3, stride 2
    side = side - 2  # Conv2d_2a_3x3 (2b keeps the size)
    side = (side - 3) // 2 + 1  # max-pool
    side = side - 2  # Conv2d_4a_3x3 (3b is 1×1)
    side = (side - 3) // 2 + 1  # max-pool → the 35×35 grid
    return (side - 3) // 2 + 1  # Mixed_6a, stride 2


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
    """Width multiplier, classes, auxiliary head and example batch of the Inception-V3."""

    width: float
    classes: int
    image_size: int
    batch_size: int
    aux_logits: bool = False


PRESETS: dict[str, InceptionConfig] = {
    "small": InceptionConfig(width=0.125, classes=10, image_size=MIN_IMAGE_SIZE, batch_size=2),
    "paper": InceptionConfig(width=1.0, classes=1000, image_size=299, batch_size=32),
}


def config(size: str = "small", **overrides: object) -> InceptionConfig:
    """The preset for ``size`` with overrides (``aux_logits``, ``batch_size``, ``image_size``) applied and checked."""
    cfg = resolve(PRESETS, size, NAME, **overrides)
    for name in ("classes", "image_size", "batch_size"):
        check_positive_int(NAME, name, getattr(cfg, name))
    if cfg.image_size < MIN_IMAGE_SIZE:
        raise ZooArgumentError(f"{NAME}: image_size must be at least {MIN_IMAGE_SIZE}, got {cfg.image_size}")
    if not isinstance(cfg.aux_logits, bool):
        raise ZooArgumentError(f"{NAME}: aux_logits must be true or false, got {cfg.aux_logits!r}")
    if cfg.aux_logits and grid_17(cfg.image_size) < AUX_MIN_GRID:
        raise ZooArgumentError(
            f"{NAME}: the auxiliary classifier needs images of at least 299×299 "
            f"(a 17×17 grid at Mixed_6e), got image_size={cfg.image_size}; pass image_size=299"
        )
    return cfg


class ConvBN(nn.Module):
    """Convolution without bias → batch norm → ReLU, the unit every Inception layer is made of."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int = 1, padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(bn(conv(x)))``."""
        return F.relu(self.bn(self.conv(x)))


class Channels:
    """Scales the paper's channel counts by the width multiplier (at least 2 channels each)."""

    def __init__(self, width: float) -> None:
        self.width = width

    def __call__(self, channels: int) -> int:
        return max(2, int(round(channels * self.width)))


class InceptionA(nn.Module):
    """35×35 module: 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg-pool→1×1, concatenated."""

    def __init__(self, in_channels: int, pool_features: int, c: Channels) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, c(64), 1)
        self.branch5x5_1 = ConvBN(in_channels, c(48), 1)
        self.branch5x5_2 = ConvBN(c(48), c(64), 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, c(64), 1)
        self.branch3x3dbl_2 = ConvBN(c(64), c(96), 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(c(96), c(96), 3, padding=1)
        self.branch_pool = ConvBN(in_channels, c(pool_features), 1)
        self.out_channels = 2 * c(64) + c(96) + c(pool_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Four parallel branches on ``x``, concatenated along channels."""
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1))
        return torch.cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35→17: 3×3 stride 2 | 1×1→3×3→3×3 stride 2 | max-pool stride 2."""

    def __init__(self, in_channels: int, c: Channels) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, c(384), 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, c(64), 1)
        self.branch3x3dbl_2 = ConvBN(c(64), c(96), 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(c(96), c(96), 3, stride=2)
        self.out_channels = c(384) + c(96) + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Three parallel strided branches, concatenated."""
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, bd, bp], dim=1)


class InceptionC(nn.Module):
    """17×17 module with 7×7 convolutions factorised into 1×7 and 7×1."""

    def __init__(self, in_channels: int, channels_7x7: int, c: Channels) -> None:
        super().__init__()
        c7 = c(channels_7x7)
        self.branch1x1 = ConvBN(in_channels, c(192), 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, c(192), (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, c(192), (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, c(192), 1)
        self.out_channels = 4 * c(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Four parallel branches, concatenated."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1))
        return torch.cat([b1, b7, bd, bp], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17→8: 1×1→3×3 stride 2 | 1×1→1×7→7×1→3×3 stride 2 | max-pool stride 2."""

    def __init__(self, in_channels: int, c: Channels) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, c(192), 1)
        self.branch3x3_2 = ConvBN(c(192), c(320), 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, c(192), 1)
        self.branch7x7x3_2 = ConvBN(c(192), c(192), (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(c(192), c(192), (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(c(192), c(192), 3, stride=2)
        self.out_channels = c(320) + c(192) + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Three parallel strided branches, concatenated."""
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class InceptionE(nn.Module):
    """8×8 module whose 3×3 branches split into parallel 1×3 and 3×1 convolutions (expanded filter bank)."""

    def __init__(self, in_channels: int, c: Channels) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, c(320), 1)
        self.branch3x3_1 = ConvBN(in_channels, c(384), 1)
        self.branch3x3_2a = ConvBN(c(384), c(384), (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(c(384), c(384), (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, c(448), 1)
        self.branch3x3dbl_2 = ConvBN(c(448), c(384), 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(c(384), c(384), (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(c(384), c(384), (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, c(192), 1)
        self.out_channels = c(320) + 4 * c(384) + c(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Four parallel branches (two of them forking in two), concatenated."""
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], dim=1)
        bp = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1))
        return torch.cat([b1, b3, bd, bp], dim=1)


class InceptionAux(nn.Module):
    """Auxiliary classifier on the 17×17 grid: 5×5/3 avg-pool → 1×1 → 5×5 → global pool → linear."""

    def __init__(self, in_channels: int, classes: int, c: Channels) -> None:
        super().__init__()
        self.conv0 = ConvBN(in_channels, c(128), 1)
        self.conv1 = ConvBN(c(128), c(768), 5)
        self.fc = nn.Linear(c(768), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Auxiliary logits ``[batch, classes]`` from the 17×17 feature map."""
        x = self.conv1(self.conv0(F.avg_pool2d(x, 5, stride=3)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InceptionV3(nn.Module):
    """Inception-V3: ``forward(images)`` → logits (and auxiliary logits when ``aux_logits``)."""

    def __init__(self, cfg: InceptionConfig) -> None:
        super().__init__()
        c = Channels(cfg.width)
        self.Conv2d_1a_3x3 = ConvBN(3, c(32), 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(c(32), c(32), 3)
        self.Conv2d_2b_3x3 = ConvBN(c(32), c(64), 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(c(64), c(80), 1)
        self.Conv2d_4a_3x3 = ConvBN(c(80), c(192), 3)
        self.Mixed_5b = InceptionA(c(192), 32, c)
        self.Mixed_5c = InceptionA(self.Mixed_5b.out_channels, 64, c)
        self.Mixed_5d = InceptionA(self.Mixed_5c.out_channels, 64, c)
        self.Mixed_6a = InceptionB(self.Mixed_5d.out_channels, c)
        self.Mixed_6b = InceptionC(self.Mixed_6a.out_channels, 128, c)
        self.Mixed_6c = InceptionC(self.Mixed_6b.out_channels, 160, c)
        self.Mixed_6d = InceptionC(self.Mixed_6c.out_channels, 160, c)
        self.Mixed_6e = InceptionC(self.Mixed_6d.out_channels, 192, c)
        self.AuxLogits = InceptionAux(self.Mixed_6e.out_channels, cfg.classes, c) if cfg.aux_logits else None
        self.Mixed_7a = InceptionD(self.Mixed_6e.out_channels, c)
        self.Mixed_7b = InceptionE(self.Mixed_7a.out_channels, c)
        self.Mixed_7c = InceptionE(self.Mixed_7b.out_channels, c)
        # PyTorch's default (Kaiming-uniform) initialisation: the paper's truncated normal
        # changes nothing for placement and torch's rejection sampler takes ~8 s at paper size
        self.fc = nn.Linear(self.Mixed_7c.out_channels, cfg.classes)

    def forward(self, images: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``images [batch, 3, h, w]`` → logits; ``labels`` only ride along to ``get_loss`` and are not read."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(images)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)
        aux = self.AuxLogits(x) if self.AuxLogits is not None else None
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return logits if aux is None else (logits, aux)


def get_model(size: str = "small", aux_logits: bool | None = None, image_size: int | None = None) -> nn.Module:
    """Inception-V3 at ``size`` ("small" or "paper"), with the auxiliary head when ``aux_logits``; seeded.

    ``image_size`` only matters for checking that the auxiliary head fits the images.
    """
    cfg = config(size, aux_logits=aux_logits, image_size=image_size)
    with seeded(MODEL_SEED):
        return InceptionV3(cfg)


def get_example_inputs(size: str = "small", batch_size: int | None = None,
                       image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [b, 3, s, s] float32, labels [b] int64)``, seeded."""
    cfg = config(size, batch_size=batch_size, image_size=image_size)
    return image_batch(cfg.batch_size, cfg.image_size, cfg.classes)


def get_loss(output: torch.Tensor | tuple[torch.Tensor, torch.Tensor], images: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against ``labels``; with the auxiliary head, plus 0.4× its cross-entropy."""
    if isinstance(output, tuple):
        logits, aux = output
        return F.cross_entropy(logits, labels) + AUX_WEIGHT * F.cross_entropy(aux, labels)
    return F.cross_entropy(output, labels)


def get_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """RMSProp with decay 0.9 and ε = 1.0, learning rate 0.045, as in the Inception-V3 paper."""
    return torch.optim.RMSprop(params, lr=0.045, alpha=0.9, eps=1.0)
