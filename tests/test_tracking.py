"""raycls.tracking: what TensorBoard and MLflow get from a run and from a search.

Event files are read back with TensorBoard's own reader (EventAccumulator, which also applies
the purge a resumed run asks for), never by file name; MLflow runs are read from a local sqlite
store in the test's folder. The two Ray tests are one 2-epoch run on 1 worker and one search of
2 trials x 1 epoch, on digits.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from raycls.board import EPOCH_SCALARS, Board
from raycls.config import TrainConfig


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def steps(acc, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def image_size(acc, tag: str) -> tuple[int, int]:
    from PIL import Image

    (event,) = acc.Images(tag)
    return Image.open(io.BytesIO(event.encoded_image_string)).size


def fake_epoch(epoch: int, val_acc: float) -> dict:
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.1 / epoch,
            "val_acc": val_acc, "lr": 0.1, "images_per_s": 1000.0}


# ----------------------------------------------------------------------------- no cluster


def test_a_resumed_board_hides_the_epochs_after_its_checkpoint(tmp_path):
    """A run logs epochs 1-3, crashes, and resumes from epoch 1's checkpoint: TensorBoard shows
    each epoch once, with the resumed run's values for epochs 2 and 3, and the final images."""
    classes = ["a", "b", "c"]
    cpu = torch.device("cpu")
    first = Board(str(tmp_path), rank=0, start_epoch=0, classes=classes)
    for epoch in (1, 2, 3):
        first.epoch(fake_epoch(epoch, 0.1), last=False, device=cpu)
    first.writer.close()  # the crash: nothing after epoch 3 was written
    resumed = Board(str(tmp_path), rank=0, start_epoch=1, classes=classes)
    images = torch.randint(0, 255, (4, 1, 8, 8), dtype=torch.uint8)
    labels, preds = torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])
    for epoch in (2, 3, 4):
        resumed.observe(images, labels, preds, torch.ones(4, dtype=torch.bool))
        resumed.epoch(fake_epoch(epoch, 0.9), last=epoch == 4, device=cpu)
    acc = events(tmp_path)
    for key in EPOCH_SCALARS:
        assert steps(acc, key) == [1, 2, 3, 4]
    assert [e.value for e in acc.Scalars("val_acc")] == pytest.approx([0.1, 0.9, 0.9, 0.9])
    assert acc.Images("confusion_matrix")[0].step == 4
    assert min(image_size(acc, "confusion_matrix")) > 100
    assert acc.Images("sample_predictions")[0].step == 4


def test_other_ranks_and_a_board_that_is_off_write_nothing(tmp_path):
    Board(str(tmp_path / "r1"), rank=1, start_epoch=0, classes=["a"]).epoch(
        fake_epoch(1, 0.5), last=True, device=torch.device("cpu"))
    off = Board(None, rank=0, start_epoch=0, classes=["a"])
    off.epoch(fake_epoch(1, 0.5), last=True, device=torch.device("cpu"))
    assert off.writer is None and not (tmp_path / "r1").exists()


def test_mlflow_flags_and_a_missing_mlflow_is_one_clear_line(monkeypatch):
    import argparse
    import importlib.util

    from raycls.config import ConfigError
    from raycls.preflight import check_tracking
    from raycls.search import add_arguments as search_arguments
    from raycls.train import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--mlflow-uri", "sqlite:///m.db",
                                              "--no-tensorboard"]))
    assert cfg.mlflow_uri == "sqlite:///m.db" and cfg.tensorboard is False
    search = argparse.ArgumentParser()
    search_arguments(search)
    assert search.parse_args(["--mlflow-uri", "http://h:5000"]).mlflow_uri == "http://h:5000"

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^mlflow_uri=sqlite:///m.db: MLflow is not installed; "
                                          r"pip install 'raycls\[mlflow\]'$"):
        check_tracking(cfg)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://h:5000")
    with pytest.raises(ConfigError, match=r"^MLFLOW_TRACKING_URI=http://h:5000: .*raycls\[mlflow"):
        check_tracking(TrainConfig())
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    check_tracking(TrainConfig())  # nothing asked for: nothing needed


# ----------------------------------------------------------------------------- real runs


def mlflow_client(tmp_path: Path, monkeypatch) -> tuple[str, object]:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow puts a new experiment's artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, MlflowClient(tracking_uri=uri)


def artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    return {Path(f.path).name for f in client.list_artifacts(run_id, path)}


@pytest.mark.ray
def test_a_run_logs_to_tensorboard_and_mlflow(ray_session, tmp_path, monkeypatch, capsys):
    from raycls.trainer import run_training

    uri, client = mlflow_client(tmp_path, monkeypatch)
    cfg = TrainConfig(dataset="digits", num_epochs=2, num_workers=1, batch_size=64,
                      storage_path=str(tmp_path / "runs"), max_failures=0, mlflow_uri=uri)
    summary = run_training(cfg)
    run_dir = tmp_path / "runs" / summary["name"]

    acc = events(run_dir)
    for key in EPOCH_SCALARS:
        assert steps(acc, key) == [1, 2], key
    assert [e.value for e in acc.Scalars("val_acc")] == pytest.approx(
        [h["val_acc"] for h in summary["history"]])
    assert acc.Images("confusion_matrix")[0].step == 2
    assert acc.Images("sample_predictions")[0].step == 2
    assert f"[raycls] TensorBoard: tensorboard --logdir {run_dir}" in capsys.readouterr().out

    experiment = client.get_experiment_by_name("raycls")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == summary["mlflow"]["run_id"] and run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.1" and run.data.params["dataset"] == "digits"
    assert run.data.params["num_epochs"] == "2" and "mlflow_uri" not in run.data.params
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert sorted(m.step for m in history) == [1, 2]
    assert {"train_loss", "val_loss", "lr", "images_per_s", "test_acc"} <= set(run.data.metrics)
    assert {"curves.png", "result.json"} <= artifacts(client, run.info.run_id)


@pytest.mark.ray
def test_a_search_logs_trials_side_by_side_and_nested(ray_session, tmp_path, monkeypatch):
    from raycls.search.run import run_search
    from raycls.search.settings import SearchSettings

    uri, client = mlflow_client(tmp_path, monkeypatch)
    settings = SearchSettings(
        name="tracked", storage_path=str(tmp_path / "runs"), models_dir=str(tmp_path / "models"),
        scheduler="grid", num_samples=1, max_epochs=1, max_concurrent_trials=2,  # 2 lr values
        base={"max_failures": 0, "batch_size": 64}, space={"lr": [0.05, 0.2]}, mlflow_uri=uri,
    )
    summary = run_search(settings)
    assert summary["errors"] == [] and summary["bundle"]
    exp = tmp_path / "runs" / "tracked"

    trials = sorted(p for p in exp.glob("trial-*") if p.is_dir())
    assert len(trials) == 2
    for trial in trials:
        acc = events(trial)
        assert steps(acc, "val_acc") == [1] and steps(acc, "lr") == [1]
        assert acc.Images("confusion_matrix")[0].step == 1
        # Tune's own tensorboardX logger is off: raycls's charts only
        assert not [t for t in acc.Tags()["scalars"] if t.startswith("ray/")]

    experiment = client.get_experiment_by_name("raycls")
    (parent,) = client.search_runs([experiment.experiment_id],
                                   filter_string="tags.`raycls.kind` = 'search'")
    assert parent.info.run_id == summary["mlflow"]["run_id"]
    assert parent.info.status == "FINISHED" and parent.data.params["scheduler"] == "grid"
    assert {"results.csv", "val_acc.png", "best_config.json"} <= artifacts(client,
                                                                           parent.info.run_id)
    assert {"bundle.json", "model.onnx"} <= artifacts(client, parent.info.run_id, "bundle")
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2, [c.data.tags for c in children]
    assert sorted(c.data.params["lr"] for c in children) == ["0.05", "0.2"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")] == [1], \
            child.data.tags
    best = [c for c in children if c.data.tags.get("raycls.best") == "true"]
    assert len(best) == 1 and best[0].data.tags["raycls.dir"] == str(
        exp / f"trial-{summary['best']['trial_id']}")
    assert json.loads((exp / "summary.json").read_text())["mlflow"]["run_id"] == \
        parent.info.run_id


def test_an_unreachable_mlflow_store_is_one_clear_line(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from raycls.config import ConfigError
    from raycls.tracking import start_training

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow retries for minutes
    with pytest.raises(ConfigError, match=r"^mlflow_uri=http://127.0.0.1:9: the MLflow store "
                                          r"cannot be used: "):
        start_training(TrainConfig(mlflow_uri="http://127.0.0.1:9", name="x"), tmp_path / "x")
