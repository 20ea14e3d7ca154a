"""Ctrl-C in `raycls train`, as a terminal delivers it: SIGINT to the run's whole process group
under a pseudo-terminal. The run stops within seconds with exit status 130 and the exact resume
command, leaves no Ray process behind, and `--resume` then finishes every epoch."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

EPOCHS = 6


def read_until(fd: int, text: str, timeout: float) -> str:
    out, deadline = b"", time.monotonic() + timeout
    while text.encode() not in out:
        left = deadline - time.monotonic()
        if left <= 0:
            said = out.decode(errors="replace")
            raise AssertionError(f"no {text!r} within {timeout:.0f}s:\n{said}")
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            try:
                out += os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
    return out.decode(errors="replace")


def drain(fd: int) -> str:
    out = b""
    while select.select([fd], [], [], 0.2)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace")


def group_members(pgid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.ray
def test_ctrl_c_keeps_the_work_and_resume_finishes(tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "RAY_ADDRESS": "",  # a fresh local Ray, owned by the command
           "RAYCLS_PROGRESS_AFTER_S": "0", "RAYCLS_PROGRESS_SEND_S": "0"}  # a bar from step 1
    master, slave = os.openpty()
    cmd = [sys.executable, "-m", "raycls", "train", "--epochs", str(EPOCHS), "--num-workers", "1",
           "--storage-path", str(runs), "--name", "ctrl-c"]
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)  # its own group, as a shell's foreground job
    os.close(slave)
    try:
        # The epoch line is printed as its checkpoint goes to Train; Ctrl-C once it is on disk.
        seen = read_until(master, f"epoch 1/{EPOCHS} train_loss", timeout=240)
        deadline = time.monotonic() + 60
        while not list((runs / "ctrl-c").glob("checkpoint_*/meta.json")):
            assert time.monotonic() < deadline, "no checkpoint 60 s after the first epoch line"
            seen += drain(master)  # keep reading, so the run never blocks on a full terminal
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        t0 = time.monotonic()
        rc = proc.wait(timeout=60)
        stopped_in = time.monotonic() - t0
        seen += drain(master)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        os.close(master)
    print(f"stopped {stopped_in:.1f}s after SIGINT")
    assert rc == 130, seen[-3000:]
    bar = seen.split(f"epoch 1/{EPOCHS} train_loss")[0]
    assert f"[raycls] epoch 1/{EPOCHS}:" in bar and "step" in bar and "\r" in bar, bar[-2000:]
    assert stopped_in < 20, f"took {stopped_in:.1f}s to stop"
    assert "Traceback" not in seen, seen[-3000:]
    resume = f"raycls train --resume ctrl-c --storage-path {runs}"
    assert resume in seen, seen[-2000:]
    time.sleep(2)
    assert group_members(proc.pid) == [], "Ray processes of the run are still alive"
    assert list((runs / "ctrl-c").glob("checkpoint_*/meta.json")), "no checkpoint kept"

    p = subprocess.run([sys.executable, "-m", "raycls", *resume.split()[1:]], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((runs / "ctrl-c" / "result.json").read_text())
    assert [h["epoch"] for h in result["history"]] == list(range(1, EPOCHS + 1))
