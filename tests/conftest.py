"""Shared fixtures: the real datasets beside the project, and ONE local Ray cluster per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"

# Serve's mode must be chosen before Ray starts. "fast" = the throughput-optimized mode with
# HAProxy that the README tells users to run; "default" = Serve's stock HTTP proxy.
SERVE_MODE = os.environ.get("RAYCLS_TEST_SERVE_MODE", "fast")
SERVE_FAST_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


def shared_dataset(name: str) -> Path:
    """Path of a dataset in ../shared/datasets, or skip the test saying why."""
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (the real datasets live in ../shared/datasets)")
    return path


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """A local Ray cluster started once for the whole test session (4 logical CPUs on 2 cores,
    so a 2-worker training run and a Serve replica can coexist)."""
    import ray

    if SERVE_MODE == "fast":
        os.environ.update(SERVE_FAST_ENV)
    else:
        for k in SERVE_FAST_ENV:
            os.environ.pop(k, None)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    from raycls.ray_session import local_ray_options

    ray.init(
        address="local",  # always a fresh cluster of our own, never someone else's `ray start`
        num_cpus=4,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=True,
        **local_ray_options(),  # each Train run's teardown would wait 12 s otherwise
    )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve may never have started
        pass
    ray.shutdown()


# ----------------------------------------------------------------------------- streaming runs


@pytest.fixture(scope="session")
def stream_tree(tmp_path_factory):
    """A generated train/val/test JPEG/PNG tree (mixed sizes; grey, RGBA, palette, CMYK and
    16-bit files) with 2 truncated JPEGs in train: 32 training files, even for 2 ranks."""
    from tests.imagetree import make_tree

    root = tmp_path_factory.mktemp("stream") / "tree"
    manifest = make_tree(root, per_class={"train": 10, "val": 4, "test": 4}, corrupt=2)
    return {"root": root, **manifest}


def _stream_run(tmp: Path, dataset: str, **extra) -> dict:
    from raycls.config import TrainConfig
    from raycls.export import export_bundle
    from raycls.trainer import run_training

    ids = tmp / "ids"
    ids.mkdir(parents=True)
    cfg = TrainConfig(
        dataset=dataset, image_size=24, num_epochs=2, num_workers=2, batch_size=8,
        data_mode="stream", storage_path=str(tmp / "runs"), max_failures=1,
        extra={"record_ids_dir": str(ids), **extra},
    )
    result = run_training(cfg)
    run_dir = Path(cfg.storage_path) / result["name"]
    bundle = export_bundle(run_dir, tmp / "models" / dataset.split(":")[0], log=lambda m: None)
    return {"result": result, "ids": ids, "run_dir": run_dir, "bundle": bundle}


@pytest.fixture(scope="session")
def stream_runs(ray_session, stream_tree, tmp_path_factory):
    """Two streaming runs on 2 workers, trained once for the session and exported:
    `imagefolder` from the tree, with rank 1 hard-killed (os._exit) after 2 batches of epoch 2,
    and `parquet` from what `raycls data convert` wrote from the same tree."""
    from raycls.convert import convert

    tmp = tmp_path_factory.mktemp("stream-runs")
    marker = tmp / "killed"
    runs = {
        "imagefolder": _stream_run(
            tmp / "if", f"imagefolder:{stream_tree['root']}", fail_at_epoch=1,
            fail_after_batches=2, fail_mode="exit", fail_marker=str(marker),
        )
    }
    runs["imagefolder"]["marker"] = marker
    convert(f"imagefolder:{stream_tree['root']}", tmp / "parquet", log=lambda m: None)
    runs["parquet"] = _stream_run(tmp / "pq", f"parquet:{tmp / 'parquet'}")
    return runs
