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
    from raycls.train import local_ray_options

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
