"""Distributed training on a real local Ray cluster: learning, naming rules, fault tolerance."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from raycls.checkpoints import save_checkpoint
from raycls.cli import main as cli_main
from raycls.config import ConfigError, TrainConfig
from raycls.run_folder import RunError, resolve_run
from raycls.trainer import run_training


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
    (tmp_path / "done" / "result.json").write_text("{damaged")  # still finished, no traceback
    with pytest.raises(RunError, match="already finished"):
        resolve_run(TrainConfig(storage_path=str(tmp_path)), "done")
    (tmp_path / "half").mkdir()
    with pytest.raises(RunError, match="continue it with --resume half"):
        resolve_run(TrainConfig(storage_path=str(tmp_path), name="half"), None)
    with pytest.raises(RunError, match="no run directory"):
        resolve_run(TrainConfig(storage_path=str(tmp_path)), "missing")
    assert resolve_run(TrainConfig(storage_path=str(tmp_path)), "half").name == "half"


def test_resume_takes_the_newest_checkpoints_config_not_the_readable_copy(tmp_path):
    """One source of truth: meta.json of the newest checkpoint (by epoch, not by folder name)
    decides; raycls_config.json, edited by hand here, and today's flags do not."""
    run = tmp_path / "r1"
    for folder, epoch, num_epochs in (("checkpoint_a", 1, 7), ("checkpoint_b", 0, 6)):
        save_checkpoint(run / folder, {"model": {}},
                        {"config": TrainConfig(num_epochs=num_epochs, lr=0.3).to_dict(),
                         "epoch": epoch})
    (run / "raycls_config.json").write_text(json.dumps(TrainConfig(num_epochs=99).to_dict()))
    cfg = resolve_run(TrainConfig(storage_path=str(tmp_path), num_epochs=2), "r1")
    assert (cfg.num_epochs, cfg.lr, cfg.name) == (7, 0.3, "r1")


def test_resume_before_the_first_checkpoint_starts_over_from_the_copy(tmp_path, capsys):
    run = tmp_path / "early"
    run.mkdir()
    (run / "raycls_config.json").write_text(json.dumps(TrainConfig(num_epochs=3).to_dict()))
    assert resolve_run(TrainConfig(storage_path=str(tmp_path)), "early").num_epochs == 3
    rc = cli_main(["train", "--resume", "early", "--storage-path", str(tmp_path), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "3 epochs" in out, out
    assert "early has no checkpoint yet: it starts over from epoch 1, with the config in its " \
        "raycls_config.json" in out
    (run / "raycls_config.json").write_text("{half written")
    rc = cli_main(["train", "--resume", "early", "--storage-path", str(tmp_path), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "raycls_config.json: unreadable" in err and "Traceback" not in err, err


def test_fast_health_checks_last_only_as_long_as_fit(monkeypatch):
    """build_trainer's trainer polls its workers every 0.5 s during `fit` (Train reads the
    variable when fit starts the controller), and leaves the process environment as it was."""
    from ray.train.torch import TorchTrainer

    from raycls.trainer import HEALTH_CHECK_ENV, _trainer_class

    monkeypatch.delenv(HEALTH_CHECK_ENV, raising=False)
    monkeypatch.setattr(TorchTrainer, "fit", lambda self: os.environ.get(HEALTH_CHECK_ENV))
    trainer = object.__new__(_trainer_class())  # fit alone, without building a real trainer
    assert isinstance(trainer, TorchTrainer)
    assert trainer.fit() == "0.5" and HEALTH_CHECK_ENV not in os.environ
    monkeypatch.setenv(HEALTH_CHECK_ENV, "3")  # the user's own setting wins, and stays
    assert trainer.fit() == "3" and os.environ[HEALTH_CHECK_ENV] == "3"


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
    copy = tmp_path / "runs" / "flaky" / "raycls_config.json"
    copy.write_text(json.dumps({**json.loads(copy.read_text()), "num_epochs": 6}))  # by hand
    summary = run_training(small(tmp_path), resume="flaky")
    assert summary["epochs"] == 3  # the checkpoint's config, not the edited copy's 6 epochs
    assert json.loads(copy.read_text())["num_epochs"] == 3  # the copy shows what ran
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
