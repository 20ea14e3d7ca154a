"""Model registry: every architecture raycls trains, by name.

`build_model(name, num_classes, in_channels, image_size)` returns a plain `nn.Module` taking
normalised float images (B, C, H, W) and returning logits (B, K). Names:

- `resnet_small` (default): a small residual CNN in the spirit of the fastest CIFAR-10 nets
  (airbench, ResNet-9): conv stem, then stages of conv -> max-pool -> BN -> GELU with one residual
  conv each, global max-pool, linear head. Stages stop before the feature map gets below 2x2, so
  the same net serves 8x8 digits, 28x28 MNIST and 32x32 CIFAR. Above 64 px the stem cuts the
  image into patches first (stride 2-8), so 128-224 px photos train at a practical rate.
- `resnet18`: torchvision's ResNet-18 with a small-image stem (3x3 conv, no max-pool) for 32x32.
- any torchvision classification model by name (`mobilenet_v3_small`, `vgg11_bn`, ...), adapted
  to the dataset's channels (grey is repeated to RGB) and to small images (upsampled to 32x32).

The checkpoint format that stores these models is raycls.checkpoints.
"""

from __future__ import annotations

import os
import pickle

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- resnet_small


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()
    )


class Stage(nn.Module):
    """conv -> (max-pool) -> BN -> GELU, then one residual conv_bn."""

    def __init__(self, c_in: int, c_out: int, pool: bool):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.norm = nn.BatchNorm2d(c_out)
        self.res = conv_bn(c_out, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm(self.pool(self.conv(x))))
        return x + self.res(x)


PATCH_STEM_ABOVE = 64  # px: larger inputs are cut into patches before the first 3x3 conv


def patch_stride(image_size: int) -> int:
    """1 up to 64 px; above, the power of two that brings the map to at most 48 px (128 -> 4,
    224 -> 8), so 128-224 px photos cost about what 28-32 px images do."""
    stride = 1
    if image_size > PATCH_STEM_ABOVE:
        while image_size / stride > 48:
            stride *= 2
    return stride


class ResNetSmall(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int = 16):
        super().__init__()
        stride = patch_stride(image_size)
        if stride == 1:  # small images keep full resolution (8x8 digits, 28-32 px)
            self.stem = conv_bn(in_channels, width)
        else:  # a patchify stem (as in ConvNeXt / ViT): non-overlapping stride x stride patches
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, stride, stride=stride, bias=False),
                nn.BatchNorm2d(width), nn.GELU(),
            )
        stages, c, size = [], width, image_size // stride
        for c_out in (width, 2 * width, 4 * width):
            pool = size >= 4  # keep at least a 2x2 map after pooling
            stages.append(Stage(c, c_out, pool))
            c, size = c_out, (size // 2 if pool else size)
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c, num_classes, bias=False)
        # airbench's trick: a scaled-down head output keeps early logits small and training stable
        self.scale = 1 / 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, K)
        x = self.stages(self.stem(x))
        x = torch.amax(x, dim=(2, 3))
        return self.head(x) * self.scale


# ----------------------------------------------------------------------------- torchvision


class InputAdapter(nn.Module):
    """Feeds grey or tiny images to an ImageNet-shaped torchvision model."""

    def __init__(self, net: nn.Module, in_channels: int, min_size: int):
        super().__init__()
        self.net, self.in_channels, self.min_size = net, in_channels, min_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] < self.min_size or x.shape[-2] < self.min_size:
            x = F.interpolate(x, size=(self.min_size, self.min_size), mode="bilinear")
        return self.net(x)


def _replace_head(net: nn.Module, num_classes: int) -> None:
    """Swap the last Linear layer for a fresh one with `num_classes` outputs."""
    parent, attr = None, None
    for _name, module in net.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear):
                parent, attr = module, child_name
    if parent is None:
        raise ValueError(f"{type(net).__name__} has no Linear head to replace")
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))


def _torchvision_model(
    name: str, num_classes: int, in_channels: int, image_size: int, pretrained: str
) -> nn.Module:
    import torchvision

    if pretrained:
        net = torchvision.models.get_model(name, weights=None)
        try:
            net.load_state_dict(torch.load(pretrained, map_location="cpu", weights_only=True))
        except (RuntimeError, OSError, pickle.UnpicklingError) as e:  # not weights for `name`
            raise ValueError(f"--pretrained {pretrained}: not {name} weights that torch can "
                             f"load ({str(e).splitlines()[0][:200]})") from None
        _replace_head(net, num_classes)
    else:
        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if name == "resnet18" and image_size <= 64:
        # small-image stem (as in CIFAR ResNets): 3x3 conv, stride 1, no max-pool
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
        return InputAdapter(net, in_channels, min_size=8)
    return InputAdapter(net, in_channels, min_size=32)


def list_models() -> list[str]:
    import torchvision

    return ["resnet_small", *torchvision.models.list_models(module=torchvision.models)]


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    width: int = 16,
    pretrained: str = "",
) -> nn.Module:
    if name == "resnet_small":
        if pretrained:
            raise ValueError("--pretrained applies to torchvision models only, not resnet_small")
        return ResNetSmall(num_classes, in_channels, image_size, width)
    import torchvision

    valid = torchvision.models.list_models(module=torchvision.models)
    if name not in valid:
        raise ValueError(f"unknown model {name!r}; valid models: resnet_small, {', '.join(valid)}")
    if pretrained and not os.path.isfile(pretrained):
        raise ValueError(
            f"--pretrained {pretrained!r}: no such file. Download torchvision's weights for "
            f"{name} (e.g. torchvision.models.get_model_weights({name!r}).DEFAULT.url) and pass "
            "the local .pth path"
        )
    return _torchvision_model(name, num_classes, in_channels, image_size, pretrained)
