"""ResNet-50 (He et al. 2016): bottleneck residual blocks in stages of 3, 4, 6 and 3.

A 7×7 stride-2 stem and max-pool; four stages of bottleneck blocks (1×1 reduce, 3×3,
1×1 expand ×4, batch norm after each conv, a projection shortcut where the shape
changes, stride on the 3×3 conv as in the common "v1.5" form); global average pool and a
fully connected classifier. The paper preset is ImageNet: 224×224 images, 1,000 classes,
batch 32, base width 64 (25.6M parameters). The small preset keeps the full depth (every
block is there) with base width 4, 32×32 images and 10 classes.

Model file: ``get_example_inputs`` → ``(images, labels)``; ``get_loss`` is the
cross-entropy of the logits against ``labels``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from graphs.zoo.presets import MODEL_SEED, check_positive_int, image_batch, resolve, seeded

NAME = "resnet50"
STAGES: tuple[int, ...] = (3, 4, 6, 3)
EXPANSION = 4


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """Width, classes and example batch of the ResNet-50."""

    base_width: int
    classes: int
    image_size: int
    batch_size: int


PRESETS: dict[str, ResNetConfig] = {
    "small": ResNetConfig(base_width=4, classes=10, image_size=32, batch_size=2),
    "paper": ResNetConfig(base_width=64, classes=1000, image_size=224, batch_size=32),
}


def config(size: str = "small", **overrides: object) -> ResNetConfig:
    """The preset for ``size`` with overrides (``batch_size``, ``image_size``) applied and checked."""
    cfg = resolve(PRESETS, size, NAME, **overrides)
    for name in ("base_width", "classes", "image_size", "batch_size"):
        check_positive_int(NAME, name, getattr(cfg, name))
    return cfg


class Bottleneck(nn.Module):
    """``relu(x' + shortcut(x))`` with ``x'`` = 1×1 → 3×3 (stride) → 1×1 ×4 convolutions, each batch-normed."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One bottleneck block on ``x [batch, in_channels, h, w]``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet50(nn.Module):
    """ResNet-50: ``forward(images)`` → logits ``[batch, classes]``."""

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        w = cfg.base_width
        self.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        in_channels = w
        for index, blocks in enumerate(STAGES):
            width = w * 2**index
            stride = 1 if index == 0 else 2
            layer = []
            for block in range(blocks):
                layer.append(Bottleneck(in_channels, width, stride if block == 0 else 1))
                in_channels = width * EXPANSION
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, cfg.classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``images [batch, 3, h, w]`` → logits; ``labels`` only ride along to ``get_loss`` and are not read."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def get_model(size: str = "small") -> nn.Module:
    """ResNet-50 at ``size`` ("small" or "paper"), seeded so every call is identical."""
    cfg = config(size)
    with seeded(MODEL_SEED):
        return ResNet50(cfg)


def get_example_inputs(size: str = "small", batch_size: int | None = None,
                       image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [b, 3, s, s] float32, labels [b] int64)``, seeded."""
    cfg = config(size, batch_size=batch_size, image_size=image_size)
    return image_batch(cfg.batch_size, cfg.image_size, cfg.classes)


def get_loss(logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [batch, classes]`` against ``labels [batch]``."""
    return F.cross_entropy(logits, labels)


def get_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 and weight decay 1e-4, as He et al. trained ResNets (lr 0.1 at batch 256)."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
