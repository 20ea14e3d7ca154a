"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) of a batch with its shuffled copy."""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from raycls.augment.ops import _Rng


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
