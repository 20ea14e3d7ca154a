"""Batched pixel ops for augmentation, and the op table the policies draw from.

Everything works on whole batches: float32 images (B, C, H, W) in [0, 1] on any device, each
image with its own random parameters. Affine ops (rotate, shear, translate) share one
`affine_grid`/`grid_sample` with per-image matrices; `apply_ops` loops over op kinds, never over
images. Magnitudes map to the ranges torchvision uses (RandAugment/AutoAugment "standard",
TrivialAugment "wide"), except that magnitude 0 is always the identity (solarize uses
`x > threshold`, posterize at 8 bits returns the input), so a PBA search can start from "off".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import equalize as _tv_equalize

# ----------------------------------------------------------------------------- randomness


class _Rng:
    """Draws from an optional torch.Generator on that generator's own device, then moves the
    result to the images' device: a CPU generator can seed CUDA batches reproducibly."""

    def __init__(self, generator: torch.Generator | None, device: torch.device):
        self.gen, self.device = generator, device
        self.gen_device = generator.device if generator is not None else device

    def uniform(self, n: int) -> torch.Tensor:  # (n,) in [0, 1)
        u = torch.rand(n, generator=self.gen, device=self.gen_device)
        return u.to(self.device)

    def randint(self, high: int, n: int) -> torch.Tensor:  # (n,) int64 in [0, high)
        i = torch.randint(0, high, (n,), generator=self.gen, device=self.gen_device)
        return i.to(self.device)

    def sign(self, n: int) -> torch.Tensor:  # (n,) of +-1.0
        return torch.where(self.uniform(n) < 0.5, -1.0, 1.0)

    def seed(self) -> int:  # one Python-level seed, for scalar draws torch has no generator for
        return int(torch.randint(0, 2**62, (1,), generator=self.gen, device=self.gen_device))


# ----------------------------------------------------------------------------- pixel ops
# Each takes images (b, C, H, W) and per-image parameters (b,), returns new images.


def affine(images: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """Per-image affine warp. mats (b, 2, 3) map OUTPUT pixel coordinates (relative to the image
    centre, x right, y down) to input coordinates; pixels from outside the image are black."""
    b, c, h, w = images.shape
    sx, sy = w / 2, h / 2  # affine_grid's normalised coordinates are pixels / half-size
    theta = mats.to(images.dtype).clone()
    theta[:, 0, 1] *= sy / sx
    theta[:, 1, 0] *= sx / sy
    theta[:, 0, 2] /= sx
    theta[:, 1, 2] /= sy
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _eye(b: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(2, 3, dtype=like.dtype, device=like.device).repeat(b, 1, 1)


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate counter-clockwise (as displayed) by `degrees` per image, about the centre."""
    t = torch.deg2rad(degrees.to(images.dtype))
    m = _eye(len(t), images)
    # output -> input is the inverse rotation; with y pointing down, this is CCW on screen
    m[:, 0, 0], m[:, 0, 1] = torch.cos(t), -torch.sin(t)
    m[:, 1, 0], m[:, 1, 1] = torch.sin(t), torch.cos(t)
    return affine(images, m)


def shear(images: torch.Tensor, factor: torch.Tensor, axis: str) -> torch.Tensor:
    """Shear about the centre: x += factor * y (axis "x") or y += factor * x (axis "y")."""
    m = _eye(len(factor), images)
    if axis == "x":
        m[:, 0, 1] = -factor
    else:
        m[:, 1, 0] = -factor
    return affine(images, m)


def translate(images: torch.Tensor, pixels: torch.Tensor, axis: str) -> torch.Tensor:
    """Shift content right (axis "x") or down (axis "y") by `pixels` (may be fractional)."""
    m = _eye(len(pixels), images)
    m[:, 0 if axis == "x" else 1, 2] = -pixels.to(images.dtype)
    return affine(images, m)


def _grey(images: torch.Tensor) -> torch.Tensor:  # (b, 1, H, W) luminance
    if images.shape[1] == 3:
        r, g, b = images.unbind(1)
        return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)  # torchvision's weights
    return images.mean(1, keepdim=True)


def _blend(images: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # PIL's ImageEnhance: factor 0 gives the degenerate image, 1 the original, >1 extrapolates
    f = factor.to(images.dtype).view(-1, 1, 1, 1)
    return (degenerate + f * (images - degenerate)).clamp_(0, 1)


def brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, torch.zeros_like(images), factor)


def contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, _grey(images).mean((1, 2, 3), keepdim=True), factor)


def color(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Saturation. A grey image is its own greyscale, so this is the identity on 1 channel."""
    if images.shape[1] == 1:
        return images.clone()
    return _blend(images, _grey(images), factor)


def sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with a 3x3 smoothed copy (PIL's SMOOTH kernel); border pixels stay as they are."""
    b, c, h, w = images.shape
    if h <= 2 or w <= 2:
        return images.clone()
    k = torch.ones(3, 3, dtype=images.dtype, device=images.device)
    k[1, 1] = 5
    k = (k / 13).expand(c, 1, 3, 3)
    smooth = images.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(images, k, groups=c)
    return _blend(images, smooth, factor)


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep `bits` (1-8) bits per channel; 8 bits returns the input unchanged."""
    levels = (2.0 ** bits.to(images.dtype)).view(-1, 1, 1, 1)
    out = (images * levels).floor_().clamp_(max=levels - 1) / levels
    return torch.where(bits.view(-1, 1, 1, 1) >= 8, images, out)


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert pixels strictly above the threshold (so threshold 1 is the identity)."""
    t = threshold.to(images.dtype).view(-1, 1, 1, 1)
    return torch.where(images > t, 1 - images, images)


def invert(images: torch.Tensor) -> torch.Tensor:
    return 1 - images


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """Stretch each channel of each image to [0, 1]; flat channels stay as they are."""
    lo = images.amin((2, 3), keepdim=True)
    hi = images.amax((2, 3), keepdim=True)
    flat = hi <= lo
    scale = torch.where(flat, 1.0, hi - lo)
    return torch.where(flat, images, (images - lo) / scale).clamp_(0, 1)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per channel (torchvision's batched kernel, PIL's algorithm)."""
    return _tv_equalize(images)


def cutout(images: torch.Tensor, size: torch.Tensor, rng: _Rng) -> torch.Tensor:
    """One size x size square per image (size per image, int), centred anywhere in the image so
    it may be clipped by the border (DeVries & Taylor 2017). Filled with the image's channel
    means, which is what zero-filling a normalised image does in the original."""
    b, c, h, w = images.shape
    size = size.to(torch.long).view(-1, 1)
    y0 = rng.randint(h, b).view(-1, 1) - size // 2
    x0 = rng.randint(w, b).view(-1, 1) - size // 2
    ys = torch.arange(h, device=images.device).view(1, -1)
    xs = torch.arange(w, device=images.device).view(1, -1)
    in_y = (ys >= y0) & (ys < y0 + size)  # (b, H)
    in_x = (xs >= x0) & (xs < x0 + size)  # (b, W)
    mask = (in_y[:, :, None] & in_x[:, None, :]).unsqueeze(1)  # (b, 1, H, W)
    return torch.where(mask, images.mean((2, 3), keepdim=True), images)


def random_crop(images: torch.Tensor, pad: int, rng: _Rng) -> torch.Tensor:
    """Reflect-pad by `pad`, then crop back to size at a random offset per image: a random
    translation of up to `pad` px with no black border for the net to learn (airbench's crop).
    One gather for the whole batch."""
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    pw = w + 2 * pad
    dy = rng.randint(2 * pad + 1, b)
    dx = rng.randint(2 * pad + 1, b)
    rows = dy[:, None] + torch.arange(h, device=images.device)  # (b, H)
    cols = dx[:, None] + torch.arange(w, device=images.device)  # (b, W)
    idx = (rows[:, :, None] * pw + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.flatten(2).gather(2, idx).view(b, c, h, w)


def random_flip(images: torch.Tensor, rng: _Rng) -> torch.Tensor:
    flip = (rng.uniform(len(images)) < 0.5).view(-1, 1, 1, 1)
    return torch.where(flip, images.flip(3), images)


# ----------------------------------------------------------------------------- op table


@dataclass(frozen=True)
class Ranges:
    """What magnitude 1.0 means for each op (torchvision's RandAugment / TrivialAugmentWide)."""

    rotate: float = 30.0  # degrees
    shear: float = 0.3  # shear factor
    translate: float = 150 / 331  # fraction of the image side
    enhance: float = 0.9  # brightness/contrast/color/sharpness factor 1 +- this
    posterize: int = 4  # bits removed
    cutout: float = 0.5  # fraction of the image side


STANDARD = Ranges()


def wide_ranges(image_size: int) -> Ranges:
    # TrivialAugment Wide: 32 px translation whatever the size (capped at a whole side)
    return Ranges(135.0, 0.99, min(1.0, 32 / max(image_size, 1)), 0.99, 6, 0.5)


# name -> fn(images, magnitude in [0, 1] per image, rng, ranges); signed ops pick a random sign
OpFn = Callable[[torch.Tensor, torch.Tensor, _Rng, Ranges], torch.Tensor]


def _signed(f: torch.Tensor, rng: _Rng) -> torch.Tensor:
    return f * rng.sign(len(f))


OPS: dict[str, OpFn] = {
    "identity": lambda x, f, g, r: x,
    "rotate": lambda x, f, g, r: rotate(x, _signed(f, g) * r.rotate),
    "shear_x": lambda x, f, g, r: shear(x, _signed(f, g) * r.shear, "x"),
    "shear_y": lambda x, f, g, r: shear(x, _signed(f, g) * r.shear, "y"),
    "translate_x": lambda x, f, g, r: translate(x, _signed(f, g) * r.translate * x.shape[3], "x"),
    "translate_y": lambda x, f, g, r: translate(x, _signed(f, g) * r.translate * x.shape[2], "y"),
    "brightness": lambda x, f, g, r: brightness(x, 1 + _signed(f, g) * r.enhance),
    "contrast": lambda x, f, g, r: contrast(x, 1 + _signed(f, g) * r.enhance),
    "color": lambda x, f, g, r: color(x, 1 + _signed(f, g) * r.enhance),
    "sharpness": lambda x, f, g, r: sharpness(x, 1 + _signed(f, g) * r.enhance),
    "posterize": lambda x, f, g, r: posterize(x, 8 - torch.round(f * r.posterize)),
    "solarize": lambda x, f, g, r: solarize(x, 1 - f),
    "equalize": lambda x, f, g, r: equalize(x),
    "autocontrast": lambda x, f, g, r: autocontrast(x),
    "invert": lambda x, f, g, r: invert(x),
    "cutout": lambda x, f, g, r: cutout(x, torch.round(f * r.cutout * min(x.shape[2:])), g),
}

# torchvision's RandAugment / TrivialAugmentWide op set
RAND_OPS = (
    "identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness",
    "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize",
)  # fmt: skip
# the standard set PBA searches over (Ho et al. 2019, minus the duplicated entries)
PBA_OPS = (
    "rotate", "shear_x", "shear_y", "translate_x", "translate_y", "brightness", "contrast",
    "color", "sharpness", "posterize", "solarize", "equalize", "autocontrast", "invert", "cutout",
)  # fmt: skip

# AutoAugment's CIFAR-10 policy as transcribed by torchvision: ((op, prob, level 0-9), x2)
AUTOAUG_CIFAR10 = (
    (("invert", 0.1, 0), ("contrast", 0.2, 6)), (("rotate", 0.7, 2), ("translate_x", 0.3, 9)),
    (("sharpness", 0.8, 1), ("sharpness", 0.9, 3)), (("shear_y", 0.5, 8), ("translate_y", 0.7, 9)),
    (("autocontrast", 0.5, 0), ("equalize", 0.9, 0)), (("shear_y", 0.2, 7), ("posterize", 0.3, 7)),
    (("color", 0.4, 3), ("brightness", 0.6, 7)), (("sharpness", 0.3, 9), ("brightness", 0.7, 9)),
    (("equalize", 0.6, 0), ("equalize", 0.5, 0)), (("contrast", 0.6, 7), ("sharpness", 0.6, 5)),
    (("color", 0.7, 7), ("translate_x", 0.5, 8)), (("equalize", 0.3, 0), ("autocontrast", 0.4, 0)),
    (("translate_y", 0.4, 3), ("sharpness", 0.2, 6)), (("brightness", 0.9, 6), ("color", 0.2, 8)),
    (("solarize", 0.5, 2), ("invert", 0.0, 0)), (("equalize", 0.2, 0), ("autocontrast", 0.6, 0)),
    (("equalize", 0.2, 0), ("equalize", 0.6, 0)), (("color", 0.9, 9), ("equalize", 0.6, 0)),
    (("autocontrast", 0.8, 0), ("solarize", 0.2, 8)), (("brightness", 0.1, 3), ("color", 0.7, 0)),
    (("solarize", 0.4, 5), ("autocontrast", 0.9, 0)),
    (("translate_y", 0.9, 9), ("translate_y", 0.7, 9)),
    (("autocontrast", 0.9, 0), ("solarize", 0.8, 3)), (("equalize", 0.8, 0), ("invert", 0.1, 0)),
    (("translate_y", 0.7, 9), ("autocontrast", 0.9, 0)),
)  # fmt: skip
LEVELS = 9  # AutoAugment / PBA magnitude levels 0..9; 9 is the op's full range


def apply_ops(
    images: torch.Tensor,
    op_index: torch.Tensor,
    magnitude: torch.Tensor,
    names: tuple[str, ...],
    rng: _Rng,
    ranges: Ranges,
) -> torch.Tensor:
    """Apply op `names[op_index[i]]` at `magnitude[i]` (in [0, 1]) to image i; index -1 skips.
    One pass per op kind over the images that drew it, not one per image."""
    out = images.clone()
    for k, name in enumerate(names):
        if name == "identity":
            continue
        sel = (op_index == k).nonzero().squeeze(1)
        if sel.numel():
            out[sel] = OPS[name](images[sel], magnitude[sel], rng, ranges)
    return out
