"""Ctrl-C in `raycls train`, as a terminal delivers it: SIGINT to the run's whole process group
under a pseudo-terminal. The run stops within seconds with exit status 130 and the exact resume
command, leaves no Ray process behind, and `--resume` then finishes every epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.pty_run import ctrl_c_under_pty, drain, group_members

EPOCHS = 6


@pytest.mark.ray
def test_ctrl_c_keeps_the_work_and_resume_finishes(tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "RAY_ADDRESS": "",  # a fresh local Ray, owned by the command
           "RAYCLS_PROGRESS_AFTER_S": "0", "RAYCLS_PROGRESS_SEND_S": "0"}  # a bar from step 1
    cmd = [sys.executable, "-m", "raycls", "train", "--epochs", str(EPOCHS), "--num-workers", "1",
           "--storage-path", str(runs), "--name", "ctrl-c"]

    def checkpoint_on_disk(fd: int) -> str:
        # The epoch line is printed as its checkpoint goes to Train; Ctrl-C once it is on disk.
        seen, deadline = "", time.monotonic() + 60
        while not list((runs / "ctrl-c").glob("checkpoint_*/meta.json")):
            assert time.monotonic() < deadline, "no checkpoint 60 s after the first epoch line"
            seen += drain(fd)  # keep reading, so the run never blocks on a full terminal
        return seen

    pid, rc, seen, stopped_in = ctrl_c_under_pty(cmd, env, f"epoch 1/{EPOCHS} train_loss",
                                                 ready=checkpoint_on_disk)
    print(f"stopped {stopped_in:.1f}s after SIGINT")
    assert rc == 130, seen[-3000:]
    bar = seen.split(f"epoch 1/{EPOCHS} train_loss")[0]
    assert f"[raycls] epoch 1/{EPOCHS}:" in bar and "step" in bar and "\r" in bar, bar[-2000:]
    assert stopped_in < 20, f"took {stopped_in:.1f}s to stop"
    assert "Traceback" not in seen, seen[-3000:]
    resume = f"raycls train --resume ctrl-c --storage-path {runs}"
    assert resume in seen, seen[-2000:]
    time.sleep(2)
    assert group_members(pid) == [], "Ray processes of the run are still alive"
    assert list((runs / "ctrl-c").glob("checkpoint_*/meta.json")), "no checkpoint kept"

    p = subprocess.run([sys.executable, "-m", "raycls", *resume.split()[1:]], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((runs / "ctrl-c" / "result.json").read_text())
    assert [h["epoch"] for h in result["history"]] == list(range(1, EPOCHS + 1))
