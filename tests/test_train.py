"""Distributed training on a real local Ray cluster: learning, naming rules, fault tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raycls.config import ConfigError, TrainConfig
from raycls.train import RunError, resolve_run, run_training


def test_config_refuses_unknown_and_invalid_fields():
    with pytest.raises(ConfigError, match="unknown config field.*'lr_rate'"):
        TrainConfig.from_dict({"lr_rate": 0.1})
    with pytest.raises(ConfigError, match="batch_size=1: the global batch must be at least"):
        TrainConfig(batch_size=1, num_workers=2)
    with pytest.raises(ConfigError, match="optimizer='adam': choose sgd or adamw"):
        TrainConfig(optimizer="adam")
    cfg = TrainConfig(batch_size=256, num_workers=4)
    assert cfg.batch_size_per_worker == 64
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_run_names_are_unique_and_finished_runs_are_not_reused(tmp_path):
    a = resolve_run(TrainConfig(storage_path=str(tmp_path)), None)
    b = resolve_run(TrainConfig(storage_path=str(tmp_path)), None)
    assert a.name != b.name and a.storage_path == str(tmp_path)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "result.json").write_text("{}")
    with pytest.raises(RunError, match="name=done: .*already exists .*finished.*another --name"):
        resolve_run(TrainConfig(storage_path=str(tmp_path), name="done"), None)
    with pytest.raises(RunError, match="already finished"):
        resolve_run(TrainConfig(storage_path=str(tmp_path)), "done")
    (tmp_path / "half").mkdir()
    with pytest.raises(RunError, match="continue it with --resume half"):
        resolve_run(TrainConfig(storage_path=str(tmp_path), name="half"), None)
    with pytest.raises(RunError, match="no run directory"):
        resolve_run(TrainConfig(storage_path=str(tmp_path)), "missing")
    assert resolve_run(TrainConfig(storage_path=str(tmp_path)), "half").name == "half"


def small(tmp_path, **kw) -> TrainConfig:
    base = dict(dataset="digits", num_epochs=4, num_workers=2, batch_size=64, lr=0.1,
                storage_path=str(tmp_path / "runs"), max_failures=1)
    return TrainConfig(**{**base, **kw})


@pytest.mark.ray
def test_loss_decreases_on_two_workers(ray_session, tmp_path):
    summary = run_training(small(tmp_path, num_epochs=3))
    losses = [h["train_loss"] for h in summary["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0] * 0.8
    run_dir = tmp_path / "runs" / summary["name"]
    saved = json.loads((run_dir / "result.json").read_text())
    for key in ("test_acc", "val_acc", "epochs", "checkpoint", "images_per_s", "train_time_s",
                "config"):
        assert key in saved
    assert saved["epochs"] == 3 and (run_dir / "curves.png").stat().st_size > 1000
    best = Path(saved["checkpoint"])  # the kept checkpoint lives in the run and is complete
    assert best.parent == run_dir and (best / "meta.json").is_file(), saved["checkpoint"]
    with pytest.raises(RunError, match="already finished"):
        run_training(small(tmp_path), resume=summary["name"])


@pytest.mark.ray
def test_hard_killed_worker_resumes_from_checkpoint(ray_session, tmp_path):
    """A worker dies with os._exit at the start of epoch 3: Ray Train restarts the group from a
    checkpoint no older than one epoch before the newest, and the run completes."""
    marker = tmp_path / "failed-once"
    cfg = small(tmp_path, num_epochs=5, extra={"fail_at_epoch": 2, "fail_mode": "exit",
                                               "fail_marker": str(marker)})
    summary = run_training(cfg)
    assert marker.exists(), "the injected failure never happened"
    starts = sorted({h["start_epoch"] for h in summary["history"]})
    assert starts[0] == 0 and len(starts) == 2, summary["history"]
    assert starts[1] in (1, 2)  # resumed from epoch 2's checkpoint, or epoch 1's at worst
    assert summary["epochs"] == 5
    assert summary["test_acc"] >= 0.85


@pytest.mark.ray
def test_failure_without_retries_exits_then_resume_completes(ray_session, tmp_path):
    marker = tmp_path / "failed-once"
    cfg = small(tmp_path, num_epochs=3, max_failures=0, name="flaky",
                extra={"fail_at_epoch": 1, "fail_mode": "raise", "fail_marker": str(marker)})
    with pytest.raises(RunError, match="(?s)injected failure.*--resume flaky"):
        run_training(cfg)
    summary = run_training(small(tmp_path), resume="flaky")
    assert summary["epochs"] == 3
    assert min(h["start_epoch"] for h in summary["history"] if h["epoch"] > 1) == 1


def test_workers_find_their_own_ray_api_server(ray_session):
    """Train V2's PlacementGroupCleaner polls the State API from a worker; without an address it
    reads /tmp/ray/ray_current_cluster, which a stopped `ray start` leaves stale (12 s lost per
    run). local_ray_options() names this Ray's own API server for every worker."""
    import time

    ray = ray_session
    expected = ray.get_runtime_context().runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"]

    @ray.remote(num_cpus=0)
    def resolve() -> tuple[str, float]:
        from ray.dashboard.utils import get_address_for_submission_client

        t0 = time.perf_counter()
        return get_address_for_submission_client(None), time.perf_counter() - t0

    url, seconds = ray.get(resolve.remote())
    assert url == expected and url.startswith("http://127.0.0.1:")
    assert seconds < 1.0
