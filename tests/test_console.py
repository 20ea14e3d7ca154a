"""`raycls train`'s console: raycls's lines only (Ray's go to the run's ray.log), progress inside
an epoch as plain lines in a pipe; `--verbose` shows Ray's own output live. (The live bar on a
terminal is checked under a pseudo-terminal in tests/test_interrupt.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# what raycls prints; anything else on the console is someone else's chatter
PREFIXES = ("[raycls] ", "error: ", "warning: ")
FAST_PROGRESS = {"RAYCLS_PROGRESS_AFTER_S": "0", "RAYCLS_PROGRESS_EVERY_S": "0",
                 "RAYCLS_PROGRESS_SEND_S": "0"}  # show progress from the first step


def train(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", **FAST_PROGRESS}
    return subprocess.run(
        [sys.executable, "-m", "raycls", "train", "--num-workers", "2", "--storage-path",
         str(tmp_path / "runs"), *flags], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.ray
def test_console_shows_raycls_lines_and_ray_goes_to_the_log(tmp_path):
    p = train(tmp_path, "--epochs", "2", "--name", "quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]
    strangers = [line for line in lines if not line.startswith(PREFIXES)]
    assert not strangers, "not raycls's lines:\n" + "\n".join(strangers[:20])
    assert lines[0].startswith("[raycls] run quiet:") and "ray.log" in lines[0]
    assert lines[-2].startswith("[raycls] done: test_acc")
    run_dir = tmp_path / "runs" / "quiet"
    assert lines[-1] == f"[raycls] TensorBoard: tensorboard --logdir {run_dir}"
    assert any(line.startswith("[raycls] epoch 1/2: step ") and "images/s, eta" in line
               for line in lines), "no progress line inside an epoch"
    assert sum(line.startswith("[raycls] epoch 2/2 train_loss") for line in lines) == 1
    log = (run_dir / "ray.log").read_text()
    assert "Reporting training result 1" in log  # Ray Train's own words, kept for the record

    verbose = train(tmp_path, "--epochs", "1", "--verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "RayTrainWorker pid=" in verbose.stdout + verbose.stderr  # Ray's output, live
