"""Augmentation policies and the policy strings that name them: one class per policy family
(each a callable on a batch), and the parser that picks one by the string's prefix.

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
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch

from raycls.augment.ops import (
    AUTOAUG_CIFAR10,
    LEVELS,
    PBA_OPS,
    RAND_OPS,
    STANDARD,
    _Rng,
    apply_ops,
    wide_ranges,
)

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
