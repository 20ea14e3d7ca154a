"""Batched image augmentations on the training device, found by a readable policy string.

`build_augment(policy, ...)` gives the callable a training step applies to each batch. The parts,
one job each: `ops` (pixel ops and the op table), `policies` (RandAugment, TrivialAugment,
AutoAugment, PBA and the policy-string grammar), `mix` (mixup / cutmix), `schedules` (PBA
schedule files and the PBT explore step).
"""

from __future__ import annotations

import torch

from raycls.augment.mix import mix_batch
from raycls.augment.ops import _Rng, cutout, random_crop, random_flip
from raycls.augment.policies import Policy, canonical_policy, parse_policy, policy_slug
from raycls.augment.schedules import (
    explore_policy,
    load_policy_schedule,
    policy_for_epoch,
    save_policy_schedule,
)

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
