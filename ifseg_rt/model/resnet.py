"""ResNet v1.5 stages 1-3 (stem + layer1..3, output stride 16), the OFA image backbone (ofa.md §4)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine terms, all four stored as buffers (IFSeg's frozen BN).

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``; no ``num_batches_tracked``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        scale = self.weight.to(dt) * (self.running_var.to(dt) + self.eps).rsqrt()
        shift = self.bias.to(dt) - self.running_mean.to(dt) * scale
        return (x * scale.to(x.dtype)[:, None, None] + shift.to(x.dtype)[:, None, None])


class EvalBatchNorm2d(nn.BatchNorm2d):
    """OFA's plain BatchNorm2d (weight/bias are parameters, ``num_batches_tracked`` kept for key parity), which
    this project always evaluates with its running statistics ("frozen-BN semantics"), also in train mode."""

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, *, in_ch: int, width: int, stride: int, downsample: bool, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)  # v1.5: stride on the 3x3
        self.bn2 = norm(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = norm(width * 4)
        self.downsample = None
        if downsample:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, width * 4, 1, stride=stride, bias=False), norm(width * 4))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(skip + out)


class ResNet(nn.Module):
    """Stem + layer1..3. Input ``Bx3xHxW`` -> ``Bx(16*width)xceil(H/16)xceil(W/16)``."""

    def __init__(self, *, layers: Sequence[int], width: int = 64, frozen_bn: bool = True, eps: float = 1e-5):
        super().__init__()
        bn_cls = FrozenBatchNorm2d if frozen_bn else EvalBatchNorm2d

        def norm(c):
            return bn_cls(c, eps=eps)

        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(width)
        in_ch = width
        for k, (n_blocks, mult, stride) in enumerate(zip(layers, (1, 2, 4), (1, 2, 2)), start=1):
            blocks = []
            for i in range(n_blocks):
                blocks.append(Bottleneck(in_ch=in_ch, width=width * mult, stride=stride if i == 0 else 1,
                                         downsample=i == 0, norm=norm))
                in_ch = width * mult * 4
            setattr(self, f"layer{k}", nn.Sequential(*blocks))
        self.out_channels = in_ch
        self.channels_last = False

    def use_channels_last(self) -> "ResNet":
        """Keep the convolution weights and run the activations in channels-last (NHWC) memory order: oneDNN's
        native layout on the CPU, so no reorder per convolution (measured on OFA-Base at 512², 2 threads: bf16 engine
        -15 %, fp32 -7 %, identical labels). For inference: safetensors cannot save such weights as they are."""
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        return self.layer3(self.layer2(self.layer1(x)))
