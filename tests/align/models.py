"""Small architectures for the alignment tests (task.model / task.data targets).

A BatchNorm CNN on the 8x8 digits images (conv maps flattened into a linear layer), a
deeper one (four conv blocks, global average pooling) and a torchvision-style ResNet
(BasicBlocks, a downsampling stage). Referenced from tests as
``f"{MODELS}:build_cnn"``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from merge_cli.task import load_module

_DIGITS = Path(__file__).resolve().parents[2] / "recipes" / "tasks" / "digits.py"


def _digits():
    return load_module(_DIGITS)


def image_data(split: str, batch_size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Digits as [B, 1, 8, 8] images."""
    return [(x.reshape(-1, 1, 8, 8), y) for x, y in _digits().data(split, batch_size=batch_size)]


def build_cnn(width: int = 8) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * 6 * 6, 10),
    )


def build_bn_cnn4(widths: tuple[int, ...] = (32, 32, 64, 64), classes: int = 10) -> nn.Sequential:
    """A VGG-like BatchNorm CNN on [B, 1, 8, 8] images: conv blocks (3x3 conv, BatchNorm,
    ReLU; 2x2 max-pool after the second), global average pooling, linear -> classes."""
    layers: list[nn.Module] = []
    channels = 1
    for index, width in enumerate(widths):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        if index == 1:
            layers.append(nn.MaxPool2d(2))
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(
            BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width)
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_resnet(width: int = 8) -> ResNet:
    return ResNet(width)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (fresh ones are 0/1)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator))
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator))
    return model.eval()
