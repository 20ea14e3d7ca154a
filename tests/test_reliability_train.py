"""Training faults (README "Reliability", scenarios 1-5): inject the fault, assert the outcome."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raycls.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from raycls.config import TrainConfig
from raycls.models import build_model
from raycls.run_folder import resolve_run
from raycls.trainer import run_training
from tests.conftest import REPO


def _checkpoint(d: Path) -> Path:
    model = build_model("resnet_small", 10, 1, 8, width=4)
    meta = {"config": TrainConfig().to_dict(), "epoch": 0, "metrics": {"val_acc": 0.5},
            "data": {"name": "digits", "classes": [str(i) for i in range(10)], "channels": 1,
                     "image_size": 8, "mean": [0.3], "std": [0.37]}}
    save_checkpoint(d, {"model": model.state_dict()}, meta)
    return d


def test_corrupted_checkpoint_is_refused_by_load_resume_and_export(tmp_path):
    """Scenario 5: one flipped byte is caught by the sha256 before anything is unpickled."""
    ckpt = _checkpoint(tmp_path / "runs" / "r1" / "checkpoint_0")
    load_checkpoint(ckpt)  # intact: loads
    data = bytearray((ckpt / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ckpt / "checkpoint.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 .* does not match .* corrupted"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="checkpoint_0/checkpoint.pt: sha256"):
        resolve_run(TrainConfig(storage_path=str(tmp_path / "runs")), "r1")
    out = subprocess.run(
        [sys.executable, "-m", "raycls", "export", str(ckpt), "--output", str(tmp_path / "m")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert out.returncode != 0 and "corrupted" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "m").exists()
    (ckpt / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json: corrupted"):
        load_checkpoint(ckpt)


def small(tmp_path, **kw) -> TrainConfig:
    base = dict(dataset="digits", num_epochs=5, num_workers=2, batch_size=64, lr=0.1,
                storage_path=str(tmp_path / "runs"), max_failures=1)
    return TrainConfig(**{**base, **kw})


@pytest.mark.ray
@pytest.mark.slow
def test_worker_exception_resumes_from_newest_and_matches_uninterrupted(ray_session, tmp_path):
    """Scenario 1: a raised exception restarts the group from the newest checkpoint."""
    marker = tmp_path / "failed-once"
    faulty = run_training(small(tmp_path, extra={"fail_at_epoch": 3, "fail_mode": "raise",
                                                 "fail_marker": str(marker)}))
    clean = run_training(small(tmp_path))
    assert marker.exists()
    assert {h["start_epoch"] for h in faulty["history"]} == {0, 3}  # the newest: 3 epochs done
    assert faulty["epochs"] == clean["epochs"] == 5
    # Every rank's RNG, the data order, optimizer and scheduler come back from the checkpoint:
    # the resumed run retraces the uninterrupted one, epoch by epoch.
    lost = [h["train_loss"] for h in faulty["history"]]
    kept = [h["train_loss"] for h in clean["history"]]
    print("train_loss resumed", lost, "uninterrupted", kept)
    assert lost == pytest.approx(kept, rel=1e-6)
    assert faulty["test_acc"] == pytest.approx(clean["test_acc"], abs=1e-9)


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.split("\n"):
        if line.strip():
            p, pp = map(int, line.split())
            children.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


@pytest.mark.slow
def test_driver_sigkill_then_resume(tmp_path):
    """Scenario 4: SIGKILL the `raycls train` driver mid-run; `--resume` continues from the last
    checkpoint, and every checkpoint written before the kill is intact."""
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "raycls", "train", "--epochs", "30", "--num-workers", "1",
           "--batch-size", "32", "--name", "victim", "--storage-path", str(runs)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(runs.glob("victim/checkpoint_*/meta.json"))) < 3:
        time.sleep(0.5)
    family = _descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)
    for pid in family:  # the local Ray this driver started: stop it, by pid, if it outlived it
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    done_before = [json.loads(m.read_text())["epoch"] for m in
                   runs.glob("victim/checkpoint_*/meta.json")]
    assert len(done_before) >= 3, "the run never got to 3 checkpoints"
    assert not (runs / "victim" / "result.json").exists()
    for meta in runs.glob("victim/checkpoint_*/meta.json"):
        load_checkpoint(meta.parent)  # none corrupted
    resumed = subprocess.run(cmd[:4] + ["--resume", "victim", "--storage-path", str(runs),
                                        "--json"],
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    restart = max(h["start_epoch"] for h in summary["history"])
    assert restart >= max(done_before)  # continued from the newest checkpoint it had
    assert summary["epochs"] == 30 and summary["test_acc"] > 0.9
    assert torch.tensor([h["epoch"] for h in summary["history"]]).diff().min() >= 1
