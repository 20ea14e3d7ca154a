"""One epoch of plain PyTorch on one rank: `train_one_epoch` and `evaluate`, the optimizer and
learning-rate schedule they step, and the few collectives the ranks share (sums, RNG states).

Nothing here knows about Ray: raycls.worker calls these from inside Ray Train, and the benches
call them directly.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from raycls.augment import mix_batch
from raycls.config import TrainConfig


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float, scaled to [0, 1] then standardised per channel."""
    return (images.float().div_(255) - mean) / std


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
    """Linear warm-up to the peak lr over `warmup_epochs`, then cosine decay to zero."""
    total = cfg.num_epochs * steps_per_epoch
    warmup = max(1, int(cfg.warmup_epochs * steps_per_epoch)) if cfg.warmup_epochs else 0

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # no weight decay on norm layers and biases (1-d parameters), as in torchvision's references
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def memory_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, device):
    """Full batches of an in-memory shard: (uint8 images, labels, None = every row valid)."""
    for step in range(len(labels) // batch_size):
        sl = slice(step * batch_size, (step + 1) * batch_size)
        yield (images[sl].to(device, non_blocking=True), labels[sl].to(device, non_blocking=True),
               None)


def train_one_epoch(
    model, optimizer, scheduler, batches, *, cfg: TrainConfig, augment, mean, std,
    num_classes: int, device, generator: torch.Generator, on_step=None,
) -> tuple[float, int]:
    """One pass over this worker's batches of (uint8 (B, C, H, W), labels, valid mask or None).
    Rows masked invalid (files that did not decode) count for nothing. Returns (mean loss,
    images seen)."""
    model.train()
    total_loss, seen = 0.0, 0
    mixing = cfg.aug_mixup_alpha > 0 or cfg.aug_cutmix_alpha > 0
    for step, (x, y, valid) in enumerate(batches, 1):
        x = augment(x.float().div_(255), generator)  # (B, C, H, W) in [0, 1]
        x = (x - mean) / std
        target = y
        if mixing:
            x, target = mix_batch(
                x, y, num_classes, cfg.aug_mixup_alpha, cfg.aug_cutmix_alpha, generator
            )
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        losses = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing,
                                 reduction="none")
        n = len(y) if valid is None else int(valid.sum())
        loss = losses.mean() if valid is None else (losses * valid).sum() / max(1, n)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # every rank steps on every batch, masked or not: DDP stays in lockstep
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * n
        seen += n
        if on_step is not None:
            on_step(step, seen)
    return total_loss / max(1, seen), seen


@torch.no_grad()
def evaluate_batches(model, batches, *, mean, std, device, observe=None):
    """(sum of losses, number correct, count) over valid rows: summed so ranks can add.
    `observe(images, labels, predictions, valid)` sees every batch (raycls.board.Board)."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for images, y, valid in batches:
        x = normalise(images.to(device), mean, std)
        y = y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x).float()
        keep = torch.ones_like(y, dtype=torch.bool) if valid is None else valid.to(device)
        loss_sum += F.cross_entropy(logits[keep], y[keep], reduction="sum").item()
        correct += (logits.argmax(1) == y)[keep].sum().item()
        count += int(keep.sum())
        if observe is not None:
            observe(images, y, logits.argmax(1), keep)
    return loss_sum, correct, count


def evaluate(model, images, labels, *, mean, std, device, batch_size: int = 512):
    """evaluate_batches over in-memory arrays (the last partial batch included)."""
    batches = ((images[i : i + batch_size], labels[i : i + batch_size], None)
               for i in range(0, len(labels), batch_size))
    return evaluate_batches(model, batches, mean=mean, std=std, device=device)


def all_sum(values: list[float], device) -> list[float]:
    """Sum a few scalars over all ranks (no-op on a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def gather_rng(generator: torch.Generator, device, world: int) -> list[torch.Tensor]:
    """Every rank's augmentation RNG state, so a resumed run continues each rank's stream."""
    state = generator.get_state()
    if world == 1 or not dist.is_initialized():
        return [state]
    states = [torch.empty_like(state) for _ in range(world)]
    if device.type == "cuda":  # NCCL gathers CUDA tensors only
        moved = [s.to(device) for s in states]
        dist.all_gather(moved, state.to(device))
        return [s.cpu() for s in moved]
    dist.all_gather(states, state)
    return states
