"""Long streaming scenarios (`pytest -m slow tests/test_stream_slow.py`): a dataset several times
Ray's object store, and CIFAR-10 as a PNG image folder against the built-in loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import shared_dataset

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# A fresh Ray with a small object store, then one streaming run: the driver prints its peak RSS.
CAPPED_RUN = textwrap.dedent("""
    import json, resource, sys
    import ray
    from raycls.config import TrainConfig
    from raycls.ray_session import local_ray_options
    from raycls.trainer import run_training

    ray.init(address="local", num_cpus=3, object_store_memory=int(sys.argv[2]) * 2**20,
             include_dashboard=False, **local_ray_options())
    cfg = TrainConfig(dataset=f"imagefolder:{sys.argv[1]}", image_size=224, num_epochs=1,
                      num_workers=1, cpus_per_worker=1, batch_size=64, storage_path=sys.argv[3])
    result = run_training(cfg)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"epochs": result["epochs"], "driver_peak_mb": peak_mb,
                      "train": result["history"][-1]}))
""")


def test_dataset_four_times_the_object_store_trains(tmp_path: Path) -> None:
    from tests.imagetree import make_jpeg_tree

    store_mb = 300
    n = 9_000  # 9,000 x 3 x 224 x 224 uint8 = 1.35 GB decoded: over 4x the 300 MiB store
    make_jpeg_tree(tmp_path / "tree", n, size=256, layout="splits")
    assert n * 3 * 224 * 224 >= 4 * store_mb * 2**20
    p = subprocess.run(
        [sys.executable, "-c", CAPPED_RUN, str(tmp_path / "tree"), str(store_mb),
         str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=1800, cwd=REPO,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["epochs"] == 1
    # the driver never holds the pixels: far below the 1.2 GB they decode to
    print(json.dumps(out))
    assert out["driver_peak_mb"] < 1200, out


def _write_cifar_pngs(root: Path) -> None:
    from PIL import Image

    from raycls.data import find_cifar10, read_cifar_batch

    folder = find_cifar10(str(shared_dataset("cifar10")), download=False)
    classes = [c.strip() for c in (folder / "batches.meta.txt").read_text().splitlines()
               if c.strip()]
    parts = {"train": [folder / f"data_batch_{i}.bin" for i in range(1, 6)],
             "test": [folder / "test_batch.bin"]}
    for split, files in parts.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
        k = 0
        for f in files:
            images, labels = read_cifar_batch(f)
            for x, y in zip(images, labels, strict=True):
                Image.fromarray(np.ascontiguousarray(x.transpose(1, 2, 0))).save(
                    root / split / classes[y] / f"{k:05d}.png")
                k += 1


@pytest.mark.ray
def test_cifar10_png_folder_matches_the_builtin_loader(ray_session, tmp_path: Path) -> None:
    """Same epochs, seed and model: streaming the PNGs (whole-image crops, so both paths see the
    same pixels before the batch augmentation) reaches the built-in loader's accuracy +- 1 point."""
    from raycls.config import TrainConfig
    from raycls.trainer import run_training

    _write_cifar_pngs(tmp_path / "cifar-png")
    common = {"num_epochs": 3, "num_workers": 1, "cpus_per_worker": 2, "batch_size": 256,
              "lr": 0.2, "aug_policy": "crop4-flip", "seed": 0,
              "storage_path": str(tmp_path / "runs")}
    builtin = run_training(TrainConfig(dataset="cifar10",
                                       data_dir=str(shared_dataset("cifar10")), **common))
    streamed = run_training(TrainConfig(dataset=f"imagefolder:{tmp_path / 'cifar-png'}",
                                        aug_crop_scale=1.0, image_size=32, **common))
    assert streamed["data_mode"] == "stream" and streamed["test_images"] == 10_000
    assert abs(streamed["test_acc"] - builtin["test_acc"]) <= 0.01, (builtin, streamed)
