"""The search's console and Ctrl-C (`python tune/search.py`, raycls.search_console): raycls's
lines only in a pipe (Ray's go to the search's ray.log, `--verbose` shows them), and a real
SIGINT to the search's process group under a pseudo-terminal stops it with the resume command,
which then finishes. Tiny settings on digits: 1-2 trials of 1-4 epochs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.pty_run import ctrl_c_under_pty, group_members

REPO = Path(__file__).resolve().parents[1]
PREFIXES = ("[raycls] ", "error: ")  # raycls.search_console.LINE_PREFIXES, as documented
ENV = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}  # a fresh local Ray each


def preset(tmp_path: Path, **doc) -> str:
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump({
        "dataset": "digits", "scheduler": "random", "workers_per_trial": 1,
        "base": {"max_failures": 0, "batch_size": 64}, **doc}))
    return str(path)


def search(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tune" / "search.py"), "--storage-path",
         str(tmp_path / "runs"), "--models-dir", str(tmp_path / "models"), *flags],
        env=ENV, capture_output=True, text=True, timeout=400)


def console_lines(p: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]


@pytest.mark.ray
def test_search_console_is_raycls_lines_and_ray_goes_to_the_log(tmp_path):
    two = preset(tmp_path, num_samples=2, max_epochs=2, max_concurrent_trials=2,
                 space={"lr": [0.1, 0.2]})
    p = search(tmp_path, "--preset", two, "--name", "quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    lines = console_lines(p)
    strangers = [line for line in lines if not line.startswith(PREFIXES)]
    assert not strangers, "not raycls's lines:\n" + "\n".join(strangers[:20])
    exp = tmp_path / "runs" / "quiet"
    assert lines[0].startswith("[raycls] search quiet:") and "ray.log" in lines[0]
    assert lines[-2] == f"[raycls] bundle: {tmp_path / 'models' / 'quiet'}"
    assert lines[-1].startswith("[raycls] serve it: serve run raycls.deploy model=")
    # one line per trial event, from the driver: each trial starts, reports 2 epochs, finishes
    trials = [line.split()[2] for line in lines if line.endswith(" started: aug=default lr=0.1")
              or line.endswith(" started: aug=default lr=0.2")]
    assert len(trials) == 2, lines
    for tid in trials:
        assert sum(line.startswith(f"[raycls] trial {tid} epoch 1/2: val_acc ")
                   for line in lines) == 1
        assert sum(line.startswith(f"[raycls] trial {tid} finished: best val_acc ")
                   for line in lines) == 1
    log = (exp / "ray.log").read_text()
    for ray_words in ("Checkpoint successfully created", "Reporting training result 1",
                      "ray.tune"):  # Tune's trial, Train's worker, Tune's driver-side records
        assert ray_words in log, ray_words

    one = preset(tmp_path, num_samples=1, max_epochs=1, space={"lr": 0.1})
    verbose = search(tmp_path, "--preset", one, "--name", "loud", "--no-export", "--verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "(RayTrainWorker pid=" in verbose.stdout + verbose.stderr  # Ray's output, live


@pytest.mark.slow  # ~3.5 minutes: a search, its Ctrl-C, its resume (train: default run)
@pytest.mark.ray
def test_ctrl_c_keeps_the_search_and_resume_finishes(tmp_path):
    epochs = 4
    slow = preset(tmp_path, num_samples=1, max_epochs=epochs, space={"lr": 0.1},
                  base={"max_failures": 0, "batch_size": 8})  # ~2 s epochs on 2 cores
    common = ["--preset", slow, "--name", "ctrl-c", "--storage-path", str(tmp_path / "runs"),
              "--models-dir", str(tmp_path / "models")]
    pid, rc, seen, stopped_in = ctrl_c_under_pty(
        [sys.executable, str(REPO / "tune" / "search.py"), *common], ENV,
        f"epoch 1/{epochs}: val_acc")
    print(f"stopped {stopped_in:.1f}s after SIGINT")
    assert rc == 130, seen[-3000:]
    assert stopped_in < 20, f"took {stopped_in:.1f}s to stop"
    assert "Traceback" not in seen, seen[-3000:]
    resume = (f"python tune/search.py --resume --name ctrl-c --storage-path "
              f"{tmp_path / 'runs'}")
    assert resume in seen, seen[-2000:]
    time.sleep(2)
    assert group_members(pid) == [], "Ray processes of the search are still alive"
    exp = tmp_path / "runs" / "ctrl-c"
    assert not (exp / "summary.json").exists()

    p = subprocess.run([sys.executable, str(REPO / "tune" / "search.py"), *resume.split()[2:],
                        "--models-dir", str(tmp_path / "models")],
                       env=ENV, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["errors"] == [] and summary["num_trials"] == 1
    assert ",done," in (exp / "results.csv").read_text()
    lines = console_lines(p)
    assert [line for line in lines if not line.startswith(PREFIXES)] == [], lines
    assert lines[-1].startswith("[raycls] serve it:")
    assert any(" restarted after epoch " in line or " started: " in line for line in lines), lines


def test_ctrl_c_handler_first_raises_then_after_tune_exits_at_once():
    """No Ray started: before Tune takes SIGINT over, Ctrl-C is a KeyboardInterrupt; once Tune
    has set up its callbacks (and handed SIGINT back after its own stop), it exits with 130."""
    code = (
        "import os, signal\n"
        "from raycls.search_console import CtrlC\n"
        "with CtrlC() as c:\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    except KeyboardInterrupt:\n"
        "        print('first: KeyboardInterrupt', flush=True)\n"
        "    c.setup()\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    print('not reached')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 130, p.stderr[-2000:]
    assert p.stdout.splitlines() == ["first: KeyboardInterrupt"]
