"""TensorBoard for a training run or a search trial: what each Train worker logs, and the figures.

`Board` lives in every Train worker; rank 0 alone writes, with torch's `SummaryWriter`, into the
run directory (or the trial's). The global step is the epoch (1-based): the scalars each epoch;
at the run's last epoch the confusion matrix on the val split (every rank's share, summed) and a
grid of sample predictions. `raycls.tracking` describes both trackers and how runs reach them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raycls.config import TrainConfig

EPOCH_SCALARS = ("train_loss", "val_loss", "val_acc", "lr", "images_per_s")
SAMPLE_IMAGES = 32  # predictions shown in the grid (rank 0's first val images)
MATRIX_MAX_CLASSES = 200  # above this a confusion-matrix image is unreadable: not drawn


def board_dir(cfg: TrainConfig, run_dir: Path | str) -> str | None:
    """Where a run's event files go: its own directory, when TensorBoard is on and the storage
    is a local or mounted path (`SummaryWriter` does not write to object storage)."""
    if not cfg.tensorboard or "://" in str(run_dir):
        return None
    return str(run_dir)


class Board:
    """One Train worker's part of the TensorBoard log. Every rank counts its share of the
    confusion matrix (the ranks' val shares differ); rank 0 alone writes. Off when `log_dir` is
    empty (the same on every rank, so all ranks agree on the collective in `epoch`)."""

    def __init__(self, log_dir: str | None, rank: int, start_epoch: int, classes: list[str]):
        self.on, self.classes = bool(log_dir), list(classes)
        k = len(self.classes)
        self.confusion = torch.zeros(k * k, dtype=torch.int64)
        self.samples: list[tuple[torch.Tensor, int, int]] = []  # (uint8 CHW, label, prediction)
        self.writer = None
        if self.on and rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides events from earlier files at this step or later, i.e.
            # epochs logged after the checkpoint this worker group resumed from
            self.writer = SummaryWriter(log_dir, purge_step=start_epoch + 1)

    def observe(self, images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor,
                keep: torch.Tensor) -> None:
        """One val batch: uint8 (B, C, H, W) images, labels, predicted classes, valid rows."""
        if not self.on:
            return
        keep = keep.cpu().bool()
        y, p = labels.cpu().long()[keep], preds.cpu().long()[keep]
        k = len(self.classes)
        self.confusion += torch.bincount(y * k + p, minlength=k * k)
        room = SAMPLE_IMAGES - len(self.samples)
        if self.writer is not None and room > 0:
            shown = images.cpu()[keep][:room]
            self.samples += [(x, int(a), int(b)) for x, a, b in zip(shown, y, p, strict=False)]

    def epoch(self, metrics: dict[str, Any], last: bool, device: torch.device) -> None:
        """After an epoch's evaluation, on every rank: the scalars at step = epoch; at the last
        epoch also the images. Called before the epoch's report: a search trial can be ended by
        Tune as soon as its last report arrives, so nothing may wait until after it."""
        if not self.on:
            return
        step = int(metrics["epoch"])
        confusion = self.confusion
        if last and dist.is_available() and dist.is_initialized():
            confusion = confusion.to(device)  # NCCL reduces CUDA tensors only
            dist.all_reduce(confusion)
        if self.writer is not None:
            for key in EPOCH_SCALARS:
                self.writer.add_scalar(key, metrics[key], step)
            if last:
                k = len(self.classes)
                if k <= MATRIX_MAX_CLASSES:
                    self.writer.add_figure("confusion_matrix",
                                           confusion_figure(confusion.cpu().view(k, k),
                                                            self.classes), step)
                if self.samples:
                    self.writer.add_figure("sample_predictions",
                                           samples_figure(self.samples, self.classes), step)
                self.writer.close()
                self.writer = None
            else:
                self.writer.flush()  # a crash must not lose finished epochs (default: 120 s)
        self.confusion = torch.zeros_like(self.confusion)
        self.samples = []


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # workers have no display
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(matrix: torch.Tensor, classes: list[str]):
    """Rows: true class, columns: predicted; colour by the row's share, counts written in."""
    plt = _pyplot()
    k = len(classes)
    counts = matrix.numpy()
    share = counts / counts.sum(1, keepdims=True).clip(min=1)
    side = min(16.0, 2.5 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if k <= 40:
        names = [c[:12] for c in classes]
        ax.set_xticks(range(k), names, rotation=90), ax.set_yticks(range(k), names)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    accuracy = counts.trace() / max(1, counts.sum())
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    ax.set_title(f"val: {counts.sum()} images, accuracy {accuracy:.4f}")
    fig.tight_layout()
    return fig


def samples_figure(samples: list[tuple[torch.Tensor, int, int]], classes: list[str]):
    """Up to 32 val images, each titled with its prediction (green right, red wrong: true)."""
    plt = _pyplot()
    cols = min(8, len(samples))
    rows = -(-len(samples) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, label, pred) in zip(axes.flat, samples, strict=False):
        if image.shape[0] == 1:
            ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(image[:3].permute(1, 2, 0).numpy(), interpolation="nearest")
        right = label == pred
        title = classes[pred][:10] + ("" if right else f"\n({classes[label][:10]})")
        ax.set_title(title, fontsize=7, color="green" if right else "red")
    fig.tight_layout()
    return fig
