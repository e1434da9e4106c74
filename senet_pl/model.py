"""Squeeze-and-Excitation ResNets (Hu et al., arXiv 1709.01507) in plain PyTorch.

Module names follow torchvision's ``resnet.py`` (``conv1``, ``layer1`` ... ``fc``,
``downsample``), so with ``se=False`` a torchvision ResNet state dict loads unchanged.
SE is an injected part of each block (as in timm): ``se=False`` swaps it for
``nn.Identity`` and leaves everything else identical, which makes SE vs. ResNet a
one-switch comparison.
"""

import typing
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
from torch import nn
from torchvision.ops import SqueezeExcitation

Stem = Literal["cifar", "imagenet"]
AttnLayer = Callable[[int], nn.Module]


class GlobalAvgPool2d(nn.Module):
    """The mean of each channel over H and W, as (N, C, 1, 1): ``nn.AdaptiveAvgPool2d(1)``'s values.

    Computed as a sum times 1/(HW), because then the backward pass hands on the gradient as a
    broadcast view. ``AdaptiveAvgPool2d(1)`` runs as ``mean``, whose backward writes out an NCHW
    gradient; in an SE block that is added to the channels_last gradient of the rescaling product,
    and adding tensors of mixed layouts is slow on CPU (SE-ResNet-18, batch 128, bf16 autocast,
    channels_last, 2 cores: 40 ms of gradient additions per step instead of 8).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum((2, 3), keepdim=True) * (1.0 / (x.shape[-2] * x.shape[-1]))


class SEBlock(SqueezeExcitation):
    """Squeeze-and-Excitation block, Sec. 3 of the paper, applied to a feature map U (N, C, H, W).

    ====================  =======================================  ==========================
    paper                 equation                                 attribute
    ====================  =======================================  ==========================
    squeeze F_sq          z_c = 1/(HW) sum_ij u_c(i, j)   (Eq. 2)  ``avgpool``
    W_1 (C -> C/r)        first FC of the excitation               ``fc1``
    delta                 ReLU                                     ``activation``
    W_2 (C/r -> C)        second FC of the excitation              ``fc2``
    sigma                 s = sigma(W_2 delta(W_1 z))     (Eq. 3)  ``scale_activation``
    F_scale               x~_c = s_c * u_c                (Eq. 4)  ``forward`` returns it
    ====================  =======================================  ==========================

    The FCs are 1x1 convolutions on the pooled (N, C, 1, 1) tensor, which is the same
    map as a fully connected layer; they keep their biases, as in the authors' release.
    The implementation is torchvision's ``SqueezeExcitation``; this class fixes its width
    from the reduction ratio r and squeezes with ``GlobalAvgPool2d`` (the same mean, with a
    faster backward in channels_last).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        """
        Args:
            channels: C, the number of channels of the feature map being recalibrated.
            reduction: r, the reduction ratio of the bottleneck (C/r hidden units, at least 1).
        """
        if reduction < 1:
            raise ValueError(f"SE reduction ratio must be >= 1, got {reduction}")
        super().__init__(channels, max(1, channels // reduction))
        self.avgpool = GlobalAvgPool2d()


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding; no bias because a BatchNorm follows."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution; no bias because a BatchNorm follows."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    """Projection shortcut (ResNet option B) where the shape changes, identity otherwise."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34); SE rescales the residual branch before the addition."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, attn_layer: AttnLayer | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = attn_layer(planes) if attn_layer else nn.Identity()
        self.downsample = _shortcut(inplanes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Fig. 3 of the paper: the gate multiplies the residual branch once. (The tutorial
        # this project started from multiplied by the branch a second time, squaring it.)
        out = self.se(out)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck (ResNet-50/101/152), stride on the 3x3 as in torchvision."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, attn_layer: AttnLayer | None = None) -> None:
        super().__init__()
        width = planes * self.expansion
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, width)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.se = attn_layer(width) if attn_layer else nn.Identity()
        self.downsample = _shortcut(inplanes, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]
# depth -> (block, blocks per stage), Table 1 of He et al. (2016).
LAYERS: dict[int, tuple[Block, tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
Depth = Literal[18, 34, 50, 101, 152]
STEMS: tuple[str, ...] = typing.get_args(Stem)
# Total downsampling of each stem plus the three stride-2 stages: images smaller than this
# leave the last stage with less than one pixel of real input per position.
MIN_IMAGE_SIZE = {"cifar": 8, "imagenet": 32}


class SEResNet(nn.Module):
    """SE-ResNet (or, with ``se=False``, a plain ResNet of the same structure)."""

    def __init__(
        self,
        depth: Depth = 18,
        stem: Stem = "cifar",
        in_channels: int = 1,
        num_classes: int = 10,
        se: bool = True,
        reduction: int = 16,
    ) -> None:
        """
        Args:
            depth: 18 or 34 (BasicBlock), 50, 101 or 152 (Bottleneck).
            stem: "cifar" (3x3 conv, stride 1, no max-pool: for small images such as 28x28)
                or "imagenet" (7x7 conv, stride 2, then 3x3 max-pool: 4x downsampling).
            in_channels: channels of the input images (1 for MNIST).
            num_classes: size of the output layer.
            se: insert an SE block in every residual block; False gives a plain ResNet.
            reduction: the SE reduction ratio r.
        """
        super().__init__()
        if depth not in LAYERS:
            raise ValueError(f"depth must be one of {sorted(LAYERS)}, got {depth}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        block, layers = LAYERS[depth]
        attn_layer = partial(SEBlock, reduction=reduction) if se else None

        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)

        self.inplanes = 64
        self.layer1 = self._make_layer(block, 64, layers[0], 1, attn_layer)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, attn_layer)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, attn_layer)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, attn_layer)
        self.avgpool = GlobalAvgPool2d()
        self.fc = nn.Linear(self.inplanes, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self, block: Block, planes: int, blocks: int, stride: int = 1, attn_layer: AttnLayer | None = None
    ) -> nn.Sequential:
        """One stage: ``blocks`` residual blocks of width ``planes``; the first one changes the stride/width."""
        layers = []
        for b in range(blocks):
            layers.append(block(self.inplanes, planes, stride if b == 0 else 1, attn_layer))
            self.inplanes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# Builders, named as torchvision and timm name the variants (e.g. timm's ``seresnet18``).
def se_resnet18(**kwargs: Any) -> SEResNet:
    """SE-ResNet-18; keyword arguments as ``SEResNet`` (stem, in_channels, num_classes, reduction)."""
    return SEResNet(depth=18, se=True, **kwargs)


def se_resnet34(**kwargs: Any) -> SEResNet:
    """SE-ResNet-34."""
    return SEResNet(depth=34, se=True, **kwargs)


def se_resnet50(**kwargs: Any) -> SEResNet:
    """SE-ResNet-50 (Bottleneck blocks)."""
    return SEResNet(depth=50, se=True, **kwargs)


def se_resnet101(**kwargs: Any) -> SEResNet:
    """SE-ResNet-101."""
    return SEResNet(depth=101, se=True, **kwargs)


def se_resnet152(**kwargs: Any) -> SEResNet:
    """SE-ResNet-152."""
    return SEResNet(depth=152, se=True, **kwargs)


def resnet18(**kwargs: Any) -> SEResNet:
    """The plain ResNet-18 of the same structure (no SE blocks)."""
    return SEResNet(depth=18, se=False, **kwargs)


def resnet34(**kwargs: Any) -> SEResNet:
    """Plain ResNet-34."""
    return SEResNet(depth=34, se=False, **kwargs)


def resnet50(**kwargs: Any) -> SEResNet:
    """Plain ResNet-50."""
    return SEResNet(depth=50, se=False, **kwargs)


def resnet101(**kwargs: Any) -> SEResNet:
    """Plain ResNet-101."""
    return SEResNet(depth=101, se=False, **kwargs)


def resnet152(**kwargs: Any) -> SEResNet:
    """Plain ResNet-152."""
    return SEResNet(depth=152, se=False, **kwargs)
