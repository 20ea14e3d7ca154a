"""Streaming ingestion: encoded images -> Ray Data decode tasks -> every Train worker's batches.

For datasets of any size (`imagefolder:`, `parquet:`, local or on object storage). The driver
lists files (`raycls.sources`) and never holds pixels; Ray Data CPU tasks decode and crop with the
one decoder (`raycls.images.open_image`), uint8 (C, H, W) on the wire; each worker reads its shard
with `iter_torch_batches`. Normalisation and the batch augmentation policies stay on the training
device (`raycls.worker`), exactly as for the in-memory datasets.

- train: a RandomResizedCrop-style box (area share in [`aug_crop_scale`, 1], aspect ratio 3/4 to
  4/3) resized to `image_size`; a seeded file-order shuffle that changes every epoch, plus a local
  shuffle buffer on each worker. No global shuffle and no materialisation: memory is bounded by
  the batch, the prefetch and Ray Data's object-store budget, not by the dataset.
- val/test: the largest centred box of the target's aspect ratio, resized ("center-crop"); the
  same rule goes into the checkpoint and the bundle, so serving preprocesses as validation did.
- a file that does not decode is masked out of its batch (ranks stay in lockstep) and named;
  past `max_bad_images` the run stops with a clear error (see `raycls.worker`).
- epochs are the resume points: Ray 2.60 cannot resume a dataset mid-epoch, so a restarted worker
  group reads the interrupted epoch again from its start.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raycls.images import ImageError, center_box, draft_size, open_image, resize_image
from raycls.sources import ImageSource, SplitSource, open_source

ASPECT_RATIOS = (3 / 4, 4 / 3)  # RandomResizedCrop's default range (torchvision, timm)
DEFAULT_IMAGE_SIZE = 32  # --image-size 0 for encoded datasets (they have no native size)
STATS_SAMPLE = 256  # training images decoded on the driver for the per-channel mean/std
PREFETCH_BATCHES = 2
SHUFFLE_BUFFER_BYTES = 256 * 2**20  # the local shuffle buffer's budget per worker (uint8 rows)


# ----------------------------------------------------------------------------- decoding


def random_box(size: tuple[int, int], min_scale: float, rng: random.Random):
    """A RandomResizedCrop box (left, top, right, bottom) inside an image of `size` (w, h):
    area share in [min_scale, 1], log-uniform aspect ratio; the whole image when min_scale is 1."""
    w, h = size
    if min_scale >= 1:
        return (0.0, 0.0, float(w), float(h))
    log_lo, log_hi = math.log(ASPECT_RATIOS[0]), math.log(ASPECT_RATIOS[1])
    for _ in range(10):  # torchvision's rejection sampling, then its centre fallback
        area = w * h * rng.uniform(min_scale, 1.0)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        bw, bh = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if 0 < bw <= w and 0 < bh <= h:
            left, top = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            return (left, top, left + bw, top + bh)
    return center_box(size, 1, 1)  # the centred square


def decode_one(
    data: bytes, channels: int, size: int, *, train: bool, min_scale: float,
    rng: random.Random, max_pixels: int,
) -> np.ndarray:
    """Encoded bytes -> uint8 (C, size, size): random crop (train) or centre crop (val/test)."""
    zoom = 1 / math.sqrt(min_scale) if train and min_scale < 1 else 1.0
    frame = open_image(data, channels, max_pixels=max_pixels, draft=draft_size(size, size, zoom))
    if not train:
        return resize_image(frame, size, size, "center-crop")
    return resize_image(frame, size, size, box=random_box(frame.size, min_scale, rng))


def decode_batch(
    batch: dict[str, Any], *, channels: int, size: int, train: bool, min_scale: float = 1.0,
    max_pixels: int = 40_000_000,
) -> dict[str, Any]:
    """Ray Data map_batches: rows of encoded `image` -> uint8 `image` (N, C, size, size), with
    `valid` False and `error` naming the file for images that do not decode (zeros instead)."""
    rng = random.Random()  # crops need no reproducibility; every task draws its own
    n = len(batch["label"])
    images = np.zeros((n, channels, size, size), np.uint8)
    valid = np.ones(n, bool)
    errors = [""] * n
    for i in range(n):
        try:
            images[i] = decode_one(batch["image"][i], channels, size, train=train,
                                   min_scale=min_scale, rng=rng, max_pixels=max_pixels)
        except ImageError as e:
            valid[i], errors[i] = False, f"{batch['path'][i]}: {e}"
    return {"image": images, "label": np.asarray(batch["label"], np.int64),
            "id": np.asarray(batch["id"], np.int64), "valid": valid,
            "error": np.asarray(errors, dtype=object)}


def decode_split(
    split: SplitSource, channels: int, size: int, *, limit: int | None = None, chunk: int = 256,
) -> Iterator[dict[str, np.ndarray]]:
    """In this process, no Ray: decoded val-rule chunks of a split, at most `limit` rows. Bounded
    memory (one chunk at a time) for test evaluation, export's parity images and statistics."""
    rows: dict[str, list] = {"image": [], "label": [], "id": [], "path": []}
    for row in split.iter_rows(limit=limit):
        for key in rows:
            rows[key].append(row[key])
        if len(rows["label"]) == chunk:
            yield decode_batch(rows, channels=channels, size=size, train=False)
            rows = {key: [] for key in rows}
    if rows["label"]:
        yield decode_batch(rows, channels=channels, size=size, train=False)


# ----------------------------------------------------------------------------- the driver


@dataclass
class StreamData:
    """What a training run needs to stream a dataset: metadata and lazy Ray Datasets."""

    source: ImageSource
    info: dict[str, Any]  # the dataset description saved in checkpoints (as Dataset.describe)
    datasets: dict[str, Any] = field(default_factory=dict)  # "train", "val": ray.data.Dataset

    @property
    def counts(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.source.splits.items()}


def channel_stats(split: SplitSource, channels: int, size: int, n: int = STATS_SAMPLE):
    """Per-channel mean/std of [0, 1] pixels over a sample of n training images."""
    chunks = [c["image"][c["valid"]] for c in decode_split(split, channels, size, limit=n)]
    x = np.concatenate(chunks).astype(np.float64) / 255 if chunks else np.zeros((1, channels, 1, 1))
    x = x.transpose(1, 0, 2, 3).reshape(channels, -1)
    std = np.maximum(x.std(axis=1), 1e-3)  # a constant-colour sample must not divide by zero
    return tuple(x.mean(axis=1).tolist()), tuple(std.tolist())


def describe_source(src: ImageSource, image_size: int, crop_scale: float) -> dict[str, Any]:
    size = image_size or DEFAULT_IMAGE_SIZE
    mean, std = channel_stats(src.splits["train"], src.channels, size)
    return {
        "name": src.name, "classes": list(src.classes), "channels": src.channels,
        "image_size": size, "mean": list(mean), "std": list(std),
        "resize": "center-crop",  # val/test and serving; training crops are random
        "train_crop": {"rule": "random-resized", "min_scale": crop_scale,
                       "aspect_ratios": list(ASPECT_RATIOS)},
        "layout": src.layout, "counts": {n: len(s) for n, s in src.splits.items()},
    }


def open_stream(cfg: Any, source: ImageSource | None = None) -> StreamData:
    """List the dataset and build the lazy train/val pipelines for `cfg` (a TrainConfig)."""
    src = source or open_source(cfg.dataset, cfg.val_fraction, cfg.seed)
    info = describe_source(src, cfg.image_size, cfg.aug_crop_scale)
    common = {"channels": info["channels"], "size": info["image_size"]}
    train = src.splits["train"].to_ray(shuffle_seed=cfg.seed).map_batches(
        decode_batch, fn_kwargs={**common, "train": True, "min_scale": cfg.aug_crop_scale},
        batch_size=64,
    )
    val = src.splits["val"].to_ray().map_batches(
        decode_batch, fn_kwargs={**common, "train": False}, batch_size=64,
    )
    return StreamData(src, info, {"train": train, "val": val})


def data_config():
    """Train splits both datasets over the workers: train with equal shares (every rank must
    take the same number of steps; at most world_size - 1 images of an epoch are left out), val
    without dropping any image (ranks sum their counts, so unequal shares are fine)."""
    from ray.train import DataConfig

    class StreamDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                hints = worker_node_ids if self._enable_shard_locality else None
                splits = ds.streaming_split(world_size, equal=name == "train",
                                            locality_hints=hints)
                for i, split in enumerate(splits):
                    output[i][name] = split
            return output

    return StreamDataConfig()


# ----------------------------------------------------------------------------- the worker


def _collate_class():
    from ray.data.collate_fn import NumpyBatchCollateFn

    class MaskedCollate(NumpyBatchCollateFn):
        """numpy batch -> tensors; keeps the names of undecodable files on the side."""

        def __init__(self):
            self.bad: list[str] = []

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            import torch

            valid = batch["valid"]
            if not valid.all():
                self.bad += [str(e) for e in batch["error"][~valid]]
            # copies: Ray hands out read-only views of the object store, which torch refuses
            # to wrap without a warning; a uint8 batch copy costs little beside its decode
            return {
                "images": torch.from_numpy(np.array(batch["image"], np.uint8)),
                "labels": torch.from_numpy(np.array(batch["label"], np.int64)),
                "ids": torch.from_numpy(np.array(batch["id"], np.int64)),
                "valid": torch.from_numpy(np.array(valid, bool)),
            }

    return MaskedCollate


def shuffle_buffer_rows(info: dict[str, Any], batch_size: int) -> int:
    row_bytes = info["channels"] * info["image_size"] ** 2
    return max(batch_size, min(8 * batch_size, SHUFFLE_BUFFER_BYTES // row_bytes))


class ShardReader:
    """One worker's view of a split: an epoch of (images, labels, ids, valid) batches on
    `device`, and the undecodable files met so far."""

    def __init__(self, shard: Any, info: dict[str, Any], device: Any):
        self.shard, self.info, self.device = shard, info, device
        self.collate = _collate_class()()

    @property
    def bad(self) -> list[str]:
        return self.collate.bad

    def epoch(self, batch_size: int, *, shuffle_seed: int | None = None) -> Iterator[dict]:
        shuffle = shuffle_seed is not None
        yield from self.shard.iter_torch_batches(
            batch_size=batch_size, prefetch_batches=PREFETCH_BATCHES, collate_fn=self.collate,
            device=self.device, drop_last=False,
            local_shuffle_buffer_size=shuffle_buffer_rows(self.info, batch_size)
            if shuffle else None,
            local_shuffle_seed=shuffle_seed,
        )
