"""CIFAR-10 ResNets (He et al. 2016, section 4.2) with the parameter-free option-A shortcut,
named so that the akamaster/pytorch_resnet_cifar10 weights load key for key."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Tensors the model has that the akamaster checkpoints lack (the shortcuts' zero channels).
NOT_IN_CHECKPOINTS = ("*.shortcut.front", "*.shortcut.back")


class ShortcutA(nn.Module):
    """Subsample by 2 and zero-pad channels by planes//4 on both sides (no parameters).

    The zero channels are buffers concatenated around the input rather than a fixed pad
    width in the code, so structured pruning can remove them like any other channel of the
    residual stream: the shrunk model then pads fewer zeros, with no change to this code."""

    def __init__(self, planes: int):
        super().__init__()
        self.register_buffer("front", torch.zeros(planes // 4))
        self.register_buffer("back", torch.zeros(planes // 4))

    def forward(self, x):
        x = x[:, :, ::2, ::2]
        n, _, h, w = x.shape
        front = self.front.view(1, -1, 1, 1).expand(n, -1, h, w)
        back = self.back.view(1, -1, 1, 1).expand(n, -1, h, w)
        return torch.cat([front, x, back], 1)


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = ShortcutA(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes, layers = 16, []
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(planes, width, 2 if (i > 0 and j == 0) else 1))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)
