"""The classifier zoo: small CIFAR-style networks registered by name.

Every body maps normalized images (B, C, H, W), C in {1, 3}, H, W >= 8, to pooled features (B, D) via
``forward_features`` and has a linear ``head`` (D -> num_classes). Adaptive/global pooling before the
head makes each body independent of the input size. torchvision bodies are built with CIFAR stems
(stride-1 first conv, no max-pool), the usual adaptation for 32x32 inputs.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock
from torchvision.ops import Conv2dNormActivation

from .registry import register_model


class _Body(nn.Module):
    """A feature trunk (images -> (B, D)) plus a separate linear head.

    The head is kept out of the trunk (the torchvision classifier is replaced by ``nn.Identity``) so
    that each parameter appears once in the state dict.
    """

    def __init__(self, trunk: nn.Module, head: nn.Linear):
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _cifar_stem_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """3x3 stride-1 conv replacing an ImageNet stem; He init as torchvision uses for the rest of the net."""
    conv = nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _pool_flatten() -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


@register_model
def cnn(num_classes: int, in_channels: int) -> nn.Module:
    """Plain 4-layer CNN of the unlearnable-examples literature (Huang et al., ICLR 2021, "CNN").

    (conv3x3-BN-ReLU) x2, max-pool, (conv3x3-BN-ReLU) x2, max-pool, global average pool, linear.
    """
    trunk = nn.Sequential(
        Conv2dNormActivation(in_channels, 32, 3), Conv2dNormActivation(32, 64, 3), nn.MaxPool2d(2),
        Conv2dNormActivation(64, 128, 3), Conv2dNormActivation(128, 128, 3), nn.MaxPool2d(2),
        _pool_flatten())
    return _Body(trunk, nn.Linear(128, num_classes))


@register_model
def smallcnn(num_classes: int, in_channels: int) -> nn.Module:
    """A small CNN for 2-core CPUs (the demo): conv3x3-BN-ReLU of 16, 32, 64, 64 channels, pooled after the
    first two; about 1/15 of ``cnn``'s multiply-adds on 32x32 images."""
    trunk = nn.Sequential(
        Conv2dNormActivation(in_channels, 16, 3), nn.MaxPool2d(2), Conv2dNormActivation(16, 32, 3), nn.MaxPool2d(2),
        Conv2dNormActivation(32, 64, 3), Conv2dNormActivation(64, 64, 3), _pool_flatten())
    return _Body(trunk, nn.Linear(64, num_classes))


@register_model
def lenet(num_classes: int, in_channels: int) -> nn.Module:
    """LeNet-5 (LeCun et al., 1998) with ReLU and max-pooling; features are the 84-d fc output.

    Both 5x5 convs use padding 2 so an 8x8 input survives (8 -> 4 -> 2 spatially; an unpadded second
    conv would need >= 5x5 after the first pool). Adaptive pooling to 5x5 then restores the classic
    16*5*5 fc input for any image size.
    """
    trunk = nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(5), nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
        nn.Linear(120, 84), nn.ReLU(inplace=True))
    return _Body(trunk, nn.Linear(84, num_classes))


def _resnet_cifar(depth: int, num_classes: int, in_channels: int) -> nn.Module:
    """CIFAR ResNet-(6n+2) of He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016, Sec. 4.2).

    Three stages of n basic blocks at 16/32/64 channels; a stage's first block halves the resolution
    (except the first). Shape-changing shortcuts use 1x1 conv + BN (the paper's option B).
    """
    n = (depth - 2) // 6
    layers: list[nn.Module] = [_cifar_stem_conv(in_channels, 16), nn.BatchNorm2d(16), nn.ReLU(inplace=True)]
    inplanes = 16
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(n):
            s = stride if i == 0 else 1
            down = None
            if s != 1 or inplanes != planes:
                down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, s, bias=False), nn.BatchNorm2d(planes))
            layers.append(BasicBlock(inplanes, planes, s, down))
            inplanes = planes
    for m in layers:  # He init for convs, as in the paper and torchvision's ResNet
        for c in m.modules():
            if isinstance(c, nn.Conv2d):
                nn.init.kaiming_normal_(c.weight, mode="fan_out", nonlinearity="relu")
    return _Body(nn.Sequential(*layers, _pool_flatten()), nn.Linear(64, num_classes))


@register_model
def resnetc20(num_classes: int, in_channels: int) -> nn.Module:
    """CIFAR ResNet-20 (He et al., 2016): n = 3 blocks per stage, ~0.27M parameters."""
    return _resnet_cifar(20, num_classes, in_channels)


@register_model
def resnetc32(num_classes: int, in_channels: int) -> nn.Module:
    """CIFAR ResNet-32 (He et al., 2016): n = 5 blocks per stage, ~0.46M parameters."""
    return _resnet_cifar(32, num_classes, in_channels)


@register_model
def resnet18(num_classes: int, in_channels: int) -> nn.Module:
    """torchvision ResNet-18 (He et al., 2016) with the CIFAR stem: 3x3 stride-1 conv1, no max-pool."""
    net = tvm.resnet18(num_classes=num_classes)
    net.conv1 = _cifar_stem_conv(in_channels, 64)
    net.maxpool = nn.Identity()  # keep resolution: 32x32 would otherwise reach layer4 at 1x1
    head, net.fc = net.fc, nn.Identity()  # net(x) now returns the flattened avgpool output
    return _Body(net, head)


@register_model
def mobilenetv2(num_classes: int, in_channels: int) -> nn.Module:
    """torchvision MobileNetV2 (Sandler et al., CVPR 2018) in the common CIFAR setting.

    First conv stride 1 and the second bottleneck group stride 1 (instead of 2 each), so 32x32 inputs
    are downsampled 8x rather than 32x. The dropout before the classifier is dropped: head is the Linear.
    """
    setting = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2],
               [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    net = tvm.MobileNetV2(num_classes=num_classes, inverted_residual_setting=setting)
    stem = Conv2dNormActivation(in_channels, 32, stride=1, activation_layer=nn.ReLU6)
    nn.init.kaiming_normal_(stem[0].weight, mode="fan_out")  # same init as torchvision's other convs
    net.features[0] = stem
    head, net.classifier = net.classifier[1], nn.Identity()
    return _Body(net, head)


@register_model
def shufflenetv2(num_classes: int, in_channels: int) -> nn.Module:
    """torchvision ShuffleNetV2 1.0x (Ma et al., ECCV 2018) with a 3x3 stride-1 conv1 and no max-pool."""
    net = tvm.ShuffleNetV2([4, 8, 4], [24, 116, 232, 464, 1024], num_classes=num_classes)
    # torchvision leaves ShuffleNetV2 at PyTorch's default init, so the replacement conv does too
    net.conv1[0] = nn.Conv2d(in_channels, 24, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    head, net.fc = net.fc, nn.Identity()
    return _Body(net, head)
