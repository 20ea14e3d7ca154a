"""How a run's data reaches the Train workers: decoded in memory, or streamed through Ray Data.

`prepare_data(cfg)` is called once by the driver (`raycls train`, or a search for all its
trials) and returns a `RunData`: the dataset's description, its split sizes and either an
object-store reference to uint8 arrays (`memory`) or lazy Ray Datasets (`stream`). `auto` streams
`imagefolder:`/`parquet:` and keeps the built-in datasets in memory, where they are faster;
`--data-mode stream` also streams a built-in dataset (from its arrays), so the two paths can be
compared on the same images. `test_batches` reads a bounded number of test images in the driver.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raycls.data import Dataset, load_dataset
from raycls.sources import is_encoded

MAX_EVAL_IMAGES = 10_000  # test images a run evaluates in the driver (a bounded read)


@dataclass
class RunData:
    """What build_trainer needs; small enough to pass to every Tune trial."""

    mode: str  # "memory" | "stream"
    info: dict[str, Any]  # the checkpoint's data description (classes, channels, size, ...)
    counts: dict[str, int]
    memory_ref: Any = None  # memory: ObjectRef of {"info", "train_x", ...}
    datasets: dict[str, Any] = field(default_factory=dict)  # stream: "train", "val"
    source: Any = None  # stream from files: the ImageSource (for the test split)

    @property
    def name(self) -> str:
        return str(self.info["name"])

    def header(self) -> str:
        c, s = self.info["channels"], self.info["image_size"]
        test = self.counts.get("test", 0)
        return (f"{self.name} ({self.counts['train']} train / {self.counts['val']} val / "
                + (f"{test} test" if test else "no test split") + f", {c}x{s}x{s}, {self.mode})")


def resolve_mode(cfg: Any) -> str:
    if cfg.data_mode != "auto":
        return cfg.data_mode
    return "stream" if is_encoded(cfg.dataset) else "memory"


def load_memory(cfg: Any) -> Dataset:
    return load_dataset(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.val_fraction, cfg.seed,
                        max_bad_images=cfg.max_bad_images)


def payload(ds: Dataset) -> dict[str, Any]:
    return {
        "info": ds.describe(),
        "train_x": ds.train.images.numpy(), "train_y": ds.train.labels.numpy(),
        "val_x": ds.val.images.numpy(), "val_y": ds.val.labels.numpy(),
    }


def prepare_data(cfg: Any, dataset: Dataset | None = None) -> tuple[RunData, Dataset | None]:
    """(RunData, the in-memory Dataset or None when the images stay on disk)."""
    import ray

    mode = resolve_mode(cfg)
    if mode == "stream" and is_encoded(cfg.dataset):
        from raycls.stream import open_stream

        stream = open_stream(cfg)
        return RunData("stream", stream.info, stream.counts, datasets=stream.datasets,
                       source=stream.source), None
    ds = dataset or load_memory(cfg)
    counts = {"train": len(ds.train), "val": len(ds.val), "test": len(ds.test)}
    info = ds.describe()
    if mode == "memory":
        return RunData("memory", info, counts, memory_ref=ray.put(payload(ds))), ds
    return RunData("stream", {**info, "counts": counts}, counts,
                   datasets=array_datasets(ds)), ds


# ----------------------------------------------------------------------------- built-ins


def _rows(batch: dict[str, np.ndarray], ref: Any) -> dict[str, np.ndarray]:
    import ray

    images, labels = ray.get(ref)
    ids = batch["id"].astype(np.int64)
    n = len(ids)
    return {"image": images[ids], "label": labels[ids], "id": ids,
            "valid": np.ones(n, bool), "error": np.asarray([""] * n, dtype=object)}


def array_datasets(ds: Dataset) -> dict[str, Any]:
    """A built-in dataset's train/val as Ray Datasets of the same rows as the streaming decode
    emits (image, label, id, valid, error). Block order is shuffled (once, seeded); the train
    worker's local buffer shuffles within it every epoch."""
    import ray

    out = {}
    for name, split in (("train", ds.train), ("val", ds.val)):
        ref = ray.put((split.images.numpy(), split.labels.numpy()))
        ids = ray.data.range(len(split), override_num_blocks=max(1, len(split) // 512))
        if name == "train":
            ids = ids.randomize_block_order(seed=0)
        out[name] = ids.map_batches(_rows, fn_kwargs={"ref": ref}, batch_size=512)
    return out


# ----------------------------------------------------------------------------- test split


def test_batches(data: RunData, ds: Dataset | None, limit: int = MAX_EVAL_IMAGES,
                 batch_size: int = 512) -> Iterator[tuple[Any, Any, Any]]:
    """(uint8 images, labels, valid) batches of the test split, in this process: all of it from
    memory, or at most `limit` images decoded chunk by chunk (validation rule) from the files."""
    import torch

    if ds is not None:
        for i in range(0, len(ds.test), batch_size):
            yield ds.test.images[i : i + batch_size], ds.test.labels[i : i + batch_size], None
        return
    split = data.source.splits.get("test") if data.source is not None else None
    if split is None:
        return
    from raycls.stream import decode_split

    for chunk in decode_split(split, data.info["channels"], data.info["image_size"],
                              limit=limit, chunk=batch_size):
        yield (torch.from_numpy(chunk["image"]), torch.from_numpy(chunk["label"]),
               torch.from_numpy(chunk["valid"]))


def sample_dataset(cfg: dict[str, Any], info: dict[str, Any], limits: dict[str, int]) -> Dataset:
    """A bounded in-memory Dataset of an encoded dataset for export: at most `limits[split]`
    images of each split, decoded in this process with the validation rule (no Ray)."""
    import torch

    from raycls.data import Split
    from raycls.sources import open_source
    from raycls.stream import decode_split

    src = open_source(cfg["dataset"], cfg.get("val_fraction", 0.1), cfg.get("seed", 0))
    c, size = src.channels, info["image_size"]
    splits = {}
    for name in ("train", "val", "test"):
        x, y = [np.zeros((0, c, size, size), np.uint8)], [np.zeros(0, np.int64)]
        if name in src.splits and limits.get(name, 0) > 0:
            for chunk in decode_split(src.splits[name], c, size, limit=limits[name]):
                x.append(chunk["image"][chunk["valid"]])
                y.append(chunk["label"][chunk["valid"]])
        splits[name] = Split(torch.from_numpy(np.concatenate(x)),
                             torch.from_numpy(np.concatenate(y)))
    return Dataset(src.name, src.classes, tuple(info["mean"]), tuple(info["std"]),
                   splits["train"], splits["val"], splits["test"], resize="center-crop")
