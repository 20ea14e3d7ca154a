"""Batched image augmentations on the training device, found by a readable policy string.

Everything here works on whole batches: float32 images (B, C, H, W) in [0, 1] on any device, one
call per batch, each image with its own random parameters. Affine ops (rotate, shear, translate)
share one `affine_grid`/`grid_sample` with per-image matrices; an op-choosing policy (RandAugment,
TrivialAugment, AutoAugment, PBA) loops over its ~15 op kinds, never over images.

Policy strings (canonical form is what `Augment.policy` and `str(parse_policy(s))` give):

    none                     no augmentation
    default                  crop{size//8 or 1}-flip, or crop{...} where flipping is not allowed
    crop4                    reflect-pad 4 px, then a random 4 px translation (a random crop)
    flip                     horizontal flip with probability 1/2
    cutout8                  one 8x8 square per image, filled with the image's mean
    rand-n2-m9               RandAugment: 2 ops per image, magnitude 9 of 30 (torchvision scale)
    trivial                  TrivialAugment Wide: 1 op per image, random magnitude, wide ranges
    autoaug-cifar10          AutoAugment's published CIFAR-10 policy (25 sub-policies)
    pba:rotate=0.3/5,...     PBA: per-op (probability, magnitude level 0-9); up to 2 ops an image

Components join with "-" in any order and always apply as crop, flip, core policy, cutout
(the order of torchvision's CIFAR recipes), e.g. "crop4-flip-rand-n2-m9-cutout8".

Magnitudes map to the op ranges torchvision uses (RandAugment/AutoAugment "standard" ranges,
TrivialAugment "wide" ranges), with one change: magnitude 0 is always the identity (solarize uses
`x > threshold`, posterize at 8 bits returns the input), so a PBA search can start from "off".
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import equalize as _tv_equalize

__all__ = [
    "Augment",
    "build_augment",
    "canonical_policy",
    "explore_policy",
    "load_policy_schedule",
    "mix_batch",
    "parse_policy",
    "policy_for_epoch",
    "policy_slug",
    "save_policy_schedule",
]

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


# ----------------------------------------------------------------------------- core policies


@dataclass(frozen=True)
class RandAugment:
    num_ops: int = 2
    magnitude: int = 9  # 0..30, torchvision's 31 bins

    def __str__(self) -> str:
        return f"rand-n{self.num_ops}-m{self.magnitude}"

    def __call__(self, images: torch.Tensor, rng: _Rng, image_size: int) -> torch.Tensor:
        b = len(images)
        mag = torch.full((b,), self.magnitude / 30, device=images.device)
        for _ in range(self.num_ops):
            images = apply_ops(images, rng.randint(len(RAND_OPS), b), mag, RAND_OPS, rng, STANDARD)
        return images


@dataclass(frozen=True)
class TrivialAugment:
    def __str__(self) -> str:
        return "trivial"

    def __call__(self, images: torch.Tensor, rng: _Rng, image_size: int) -> torch.Tensor:
        b = len(images)
        mag = rng.randint(31, b).to(images.dtype) / 30  # a fresh magnitude bin per image
        ranges = wide_ranges(image_size)
        return apply_ops(images, rng.randint(len(RAND_OPS), b), mag, RAND_OPS, rng, ranges)


@dataclass(frozen=True)
class AutoAugment:
    name: str = "cifar10"

    def __str__(self) -> str:
        return f"autoaug-{self.name}"

    def __call__(self, images: torch.Tensor, rng: _Rng, image_size: int) -> torch.Tensor:
        b, dev = len(images), images.device
        sub = rng.randint(len(AUTOAUG_CIFAR10), b)  # one sub-policy per image
        for slot in range(2):
            table = [p[slot] for p in AUTOAUG_CIFAR10]
            ops = torch.tensor([PBA_OPS.index(n) for n, _, _ in table], device=dev)[sub]
            prob = torch.tensor([p for _, p, _ in table], device=dev)[sub]
            mag = torch.tensor([m / LEVELS for _, _, m in table], device=dev)[sub]
            ops = torch.where(rng.uniform(b) < prob, ops, -1)
            images = apply_ops(images, ops, mag, PBA_OPS, rng, STANDARD)
        return images


@dataclass(frozen=True)
class PBAPolicy:
    """Per-op (probability, magnitude level 0-9) over PBA_OPS; ops not listed are (0, 0)."""

    params: tuple[tuple[str, float, int], ...] = ()  # canonical: PBA_OPS order, no (0, 0)

    def __str__(self) -> str:
        body = ",".join(f"{n}={_fmt_prob(p)}/{m}" for n, p, m in self.params)
        return f"pba:{body}"

    def table(self) -> dict[str, tuple[float, int]]:
        t = dict.fromkeys(PBA_OPS, (0.0, 0))
        t.update({n: (p, m) for n, p, m in self.params})
        return t

    def __call__(self, images: torch.Tensor, rng: _Rng, image_size: int) -> torch.Tensor:
        # PBA's apply_policy per image: draw count in {0,1,2} (p .2/.3/.5), shuffle the ops, walk
        # them flipping each op's coin, apply the first `count` that come up. Vectorised: random
        # keys give each image its own order; cumsum finds its first and second successes.
        b, dev, k = len(images), images.device, len(PBA_OPS)
        table = self.table()
        prob = torch.tensor([table[n][0] for n in PBA_OPS], device=dev)
        mag = torch.tensor([table[n][1] / LEVELS for n in PBA_OPS], device=dev)
        u = rng.uniform(b)
        count = (u >= 0.2).long() + (u >= 0.5).long()
        order = torch.argsort(rng.uniform(b * k).view(b, k), dim=1)  # (b, k) op indices
        hit = (rng.uniform(b * k).view(b, k) < prob[order]).long()  # coin per op, in order
        rank = hit.cumsum(1) * hit  # 1 for the first success, 2 for the second, 0 otherwise
        for slot in (1, 2):
            is_slot = rank == slot
            ops = order.gather(1, is_slot.long().argmax(1, keepdim=True)).squeeze(1)
            ops = torch.where(is_slot.any(1) & (count >= slot), ops, -1)
            images = apply_ops(images, ops, mag[ops.clamp(min=0)], PBA_OPS, rng, STANDARD)
        return images


Core = RandAugment | TrivialAugment | AutoAugment | PBAPolicy


def _fmt_prob(p: float) -> str:
    return f"{round(p, 4):g}"


# ----------------------------------------------------------------------------- policy strings

VALID_FORMS = (
    "valid policies: 'none'; 'default'; or components joined by '-': 'crop<PAD>', 'flip', "
    "'cutout<SIZE>', plus at most one of 'rand-n<NUM_OPS>-m<MAGNITUDE 0-30>', 'trivial', "
    "'autoaug-cifar10', 'pba:<op>=<prob 0-1>/<level 0-9>,...' with ops "
    f"{', '.join(PBA_OPS)}; e.g. 'crop4-flip-rand-n2-m9-cutout8'"
)


@dataclass(frozen=True)
class Policy:
    crop: int = 0  # pad/translate in px; 0 = off
    flip: bool = False
    core: Core | None = None
    cutout: int = 0  # square side in px; 0 = off

    def __str__(self) -> str:
        parts = [f"crop{self.crop}"] if self.crop else []
        parts += ["flip"] if self.flip else []
        parts += [str(self.core)] if self.core is not None else []
        parts += [f"cutout{self.cutout}"] if self.cutout else []
        return "-".join(parts) or "none"


def _bad(policy: str, why: str) -> ValueError:
    return ValueError(f"augmentation policy {policy!r}: {why}; {VALID_FORMS}")


def _parse_pba(policy: str, body: str) -> PBAPolicy:
    found: dict[str, tuple[float, int]] = {}
    for item in filter(None, body.split(",")):
        m = re.fullmatch(r"([a-z_]+)=([0-9.]+)/([0-9]+)", item)
        if not m:
            raise _bad(policy, f"PBA entry {item!r} is not <op>=<prob>/<level>")
        name, p_text, level_text = m.groups()
        if name not in PBA_OPS:
            raise _bad(policy, f"unknown PBA op {name!r}")
        if name in found:
            raise _bad(policy, f"PBA op {name!r} is listed twice")
        try:
            p = float(p_text)
        except ValueError:
            raise _bad(policy, f"probability {p_text!r} of {name} is not a number") from None
        level = int(level_text)
        if not 0 <= p <= 1 or not 0 <= level <= LEVELS:
            raise _bad(policy, f"{name}: probability must be in [0, 1] and level in 0..{LEVELS}")
        found[name] = (round(p, 4), level)
    params = tuple((n, *found[n]) for n in PBA_OPS if n in found and found[n] != (0.0, 0))
    return PBAPolicy(params)


def parse_policy(policy: str, *, image_size: int = 32, allow_flip: bool = True) -> Policy:
    """Parse a policy string (see the module docstring). `image_size` and `allow_flip` resolve
    "default" and check the crop; raises ValueError naming the problem and the valid forms."""
    text = policy.strip().lower() if isinstance(policy, str) else None
    if not text:
        raise _bad(str(policy), "empty or not a string")
    if text == "default":
        return Policy(crop=max(image_size // 8, 1), flip=allow_flip)
    tokens = text.split("-")
    if "none" in tokens or "default" in tokens:
        if len(tokens) > 1:
            raise _bad(policy, "'none' and 'default' cannot be combined with other components")
        return Policy()
    crop, flip, core, cut = 0, False, None, 0
    i = 0
    while i < len(tokens):
        tok, i = tokens[i], i + 1
        new_core: Core | None = None
        if m := re.fullmatch(r"crop(\d+)", tok):
            if crop:
                raise _bad(policy, "crop given twice")
            crop = int(m.group(1))
            if crop < 1:
                raise _bad(policy, "crop needs a padding of at least 1 px")
        elif m := re.fullmatch(r"cutout(\d+)", tok):
            if cut:
                raise _bad(policy, "cutout given twice")
            cut = int(m.group(1))
            if cut < 1:
                raise _bad(policy, "cutout needs a size of at least 1 px")
        elif tok == "flip":
            if flip:
                raise _bad(policy, "flip given twice")
            if not allow_flip:
                raise _bad(
                    policy,
                    "flip is disabled for this dataset (digits are not mirror-symmetric); "
                    "remove 'flip'",
                )
            flip = True
        elif tok == "rand":
            n, mag = 2, 9
            seen = set()
            while i < len(tokens) and (m := re.fullmatch(r"([nm])(\d+)", tokens[i])):
                if m.group(1) in seen:
                    raise _bad(policy, f"rand: {m.group(1)} given twice")
                seen.add(m.group(1))
                n, mag = (int(m.group(2)), mag) if m.group(1) == "n" else (n, int(m.group(2)))
                i += 1
            if not 1 <= n <= len(RAND_OPS) or not 0 <= mag <= 30:
                raise _bad(policy, f"rand needs n in 1..{len(RAND_OPS)} and m in 0..30")
            new_core = RandAugment(n, mag)
        elif tok == "trivial":
            new_core = TrivialAugment()
        elif tok == "autoaug":
            if i < len(tokens) and tokens[i] == "cifar10":
                i += 1
            new_core = AutoAugment()
        elif tok.startswith("pba:"):
            new_core = _parse_pba(policy, tok[4:])
        else:
            raise _bad(policy, f"unknown component {tok!r}")
        if new_core is not None:
            if core is not None:
                raise _bad(policy, f"only one of rand/trivial/autoaug/pba, got {core} and {tok}")
            core = new_core
    if crop and crop >= image_size:
        raise _bad(policy, f"crop{crop} must be smaller than the image size ({image_size})")
    return Policy(crop=crop, flip=flip, core=core, cutout=cut)


def canonical_policy(policy: str, *, image_size: int = 32, allow_flip: bool = True) -> str:
    return str(parse_policy(policy, image_size=image_size, allow_flip=allow_flip))


def policy_slug(policy: str, max_len: int = 60) -> str:
    """A file-name-safe short form of a policy for run and trial names: PBA strings hold "/" (a
    path separator) and can run to 300 characters, past file-name limits. Long ones keep their
    start and a hash, so distinct policies keep distinct names."""
    slug = re.sub(r"[^a-z0-9._-]+", "_", policy.lower()).strip("_") or "none"
    if len(slug) <= max_len:
        return slug
    digest = hashlib.sha1(policy.encode()).hexdigest()[:8]
    return f"{slug[: max_len - 9]}_{digest}"


# ----------------------------------------------------------------------------- the callable


class Augment:
    """A parsed policy bound to a dataset's shape. Call it on each training batch."""

    def __init__(self, policy: Policy, *, channels: int, image_size: int):
        self.spec, self.channels, self.image_size = policy, channels, image_size
        self.policy = str(policy)  # canonical: logs, run names, checkpoints

    def __repr__(self) -> str:
        return f"Augment({self.policy!r})"

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """images: float (B, C, H, W) in [0, 1] -> same shape, dtype and device, in [0, 1]."""
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(
                f"augment expects float images (B, C, H, W) in [0, 1], got {images.dtype} "
                f"{tuple(images.shape)}; convert uint8 with images.float() / 255"
            )
        if images.shape[1] != self.channels:
            raise ValueError(
                f"augment was built for {self.channels}-channel images, got "
                f"{images.shape[1]} channels; build it with the dataset's channels"
            )
        if len(images) == 0 or self.policy == "none":
            return images
        rng = _Rng(generator, images.device)
        s = self.spec
        if s.crop:
            images = random_crop(images, s.crop, rng)
        if s.flip:
            images = random_flip(images, rng)
        if s.core is not None:
            images = s.core(images, rng, self.image_size)
        if s.cutout:
            images = cutout(images, torch.full((len(images),), s.cutout, device=images.device), rng)
        return images


def build_augment(policy: str, *, channels: int, image_size: int, allow_flip: bool) -> Augment:
    """Build the augmentation for a dataset. `allow_flip=False` for digits/MNIST-like data."""
    if channels < 1 or image_size < 1:
        raise ValueError(f"channels ({channels}) and image_size ({image_size}) must be >= 1")
    spec = parse_policy(policy, image_size=image_size, allow_flip=allow_flip)
    return Augment(spec, channels=channels, image_size=image_size)


# ----------------------------------------------------------------------------- mixup / cutmix


def mix_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    mixup_alpha: float,
    cutmix_alpha: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) with a shuffled copy of the batch.
    Returns (images, soft targets (B, K) float). With both alphas 0: the images and one-hot
    targets. With both > 0, each batch uses one of the two with probability 1/2 (timm's rule).
    Label smoothing stays in the loss (`F.cross_entropy(..., label_smoothing=...)` accepts soft
    targets), so the two knobs combine."""
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}: must be >= 0")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"labels must be (B,) matching images, got {tuple(labels.shape)}")
    targets = F.one_hot(labels.long(), num_classes).to(images.device, images.dtype)
    if (mixup_alpha == 0 and cutmix_alpha == 0) or len(images) < 2:
        return images, targets
    rng = _Rng(generator, images.device)
    py = random.Random(rng.seed())  # torch's Beta sampler takes no generator
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or py.random() < 0.5)
    lam = py.betavariate(*(2 * [cutmix_alpha if use_cutmix else mixup_alpha]))
    perm = torch.randperm(len(images), generator=rng.gen, device=rng.gen_device).to(images.device)
    if use_cutmix:
        h, w = images.shape[2:]
        r = math.sqrt(1 - lam)  # box covers 1 - lam of the area, clipped at the border
        ch, cw = int(h * r), int(w * r)
        cy, cx = py.randrange(h), py.randrange(w)
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = images[perm][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the label weight is the true pixel share
    else:
        images = lam * images + (1 - lam) * images[perm]
    return images, lam * targets + (1 - lam) * targets[perm]


# ----------------------------------------------------------------------------- schedules (PBA)

SCHEDULE_FORMAT = "raycls-aug-schedule"


def _check_schedule(schedule: object, where: str) -> list[tuple[int, str]]:
    if not isinstance(schedule, list) or not schedule:
        raise ValueError(f"{where}: a schedule is a non-empty list of [start_epoch, policy]")
    out: list[tuple[int, str]] = []
    for entry in schedule:
        ok = isinstance(entry, list | tuple) and len(entry) == 2
        if not ok or not isinstance(entry[0], int) or not isinstance(entry[1], str):
            raise ValueError(f"{where}: entry {entry!r} is not [start_epoch (int), policy (str)]")
        if out and entry[0] <= out[-1][0]:
            raise ValueError(
                f"{where}: start epochs must strictly increase, got {entry[0]} after {out[-1][0]}"
            )
        # "default" stays symbolic: it resolves per dataset when the worker builds it
        is_default = entry[1].strip().lower() == "default"
        policy = "default" if is_default else canonical_policy(entry[1])
        out.append((entry[0], policy))
    if out[0][0] != 0:
        raise ValueError(f"{where}: the first entry must start at epoch 0, got {out[0][0]}")
    return out


def save_policy_schedule(path: str, schedule: list[tuple[int, str]]) -> None:
    """Write a schedule [(start_epoch, policy), ...] as JSON (the format a search exports)."""
    checked = _check_schedule([list(e) for e in schedule], "save_policy_schedule")
    doc = {"format": SCHEDULE_FORMAT, "version": 1, "schedule": [list(e) for e in checked]}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def load_policy_schedule(path: str) -> list[tuple[int, str]]:
    """Read a schedule file: {"format": ..., "schedule": [[epoch, policy], ...]} or a bare list."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"policy schedule {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"policy schedule {path}: not valid JSON ({e})") from None
    schedule = doc.get("schedule") if isinstance(doc, dict) else doc
    return _check_schedule(schedule, f"policy schedule {path}")


def policy_for_epoch(schedule: list[tuple[int, str]], epoch: int) -> str:
    """The policy in force at `epoch`: the last entry whose start is <= epoch."""
    if not schedule:
        raise ValueError("empty policy schedule")
    current = schedule[0][1]
    for start, policy in schedule:
        if start <= epoch:
            current = policy
    return current


def _perturb(value: int, high: int, rng: random.Random, low: int = 0) -> int:
    # PBA's explore (Ho et al. 2019): resample uniformly with probability 0.2, else move up or
    # down by 0-3 steps, clipped to the range
    if rng.random() < 0.2:
        return rng.randint(low, high)
    step = rng.choice((0, 1, 2, 3)) * (1 if rng.random() < 0.5 else -1)
    return min(max(value + step, low), high)


def explore_policy(policy: str, rng: random.Random) -> str:
    """PBT explore step. PBA policies: every op's probability (in tenths) and level moved as PBA
    does. RandAugment: num_ops and magnitude (steps of 3 on 0-30). Other policies have nothing
    to search and come back unchanged (canonicalised); crop/flip/cutout are kept."""
    if policy.strip().lower() == "default":
        return "default"
    spec = parse_policy(policy)
    core = spec.core
    if isinstance(core, PBAPolicy):
        table = core.table()
        params = []
        for name in PBA_OPS:
            p, level = table[name]
            tenths = _perturb(round(p * 10), 10, rng)
            params.append((name, tenths / 10, _perturb(level, LEVELS, rng)))
        core = PBAPolicy(tuple(e for e in params if (e[1], e[2]) != (0.0, 0)))
    elif isinstance(core, RandAugment):
        n = _perturb(core.num_ops, 4, rng, low=1)
        core = RandAugment(n, 3 * _perturb(round(core.magnitude / 3), 10, rng))
    return str(Policy(crop=spec.crop, flip=spec.flip, core=core, cutout=spec.cutout))
