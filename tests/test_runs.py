"""`raycls runs`: states, fields and next commands read from real run and search folders.

One real 2-epoch `raycls train` on digits (1 worker, ~30-60 s) is the finished run; the other
states are copies of it as train.py leaves them: interrupted (checkpoints, no result.json),
failed (error.json), running (a live driver's driver.pid). The search folder is laid out as
search.py's `prepare`/`run_search`/`report` write it, with trial checkpoints copied from the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raycls.cli import main as cli_main
from tests.conftest import REPO

ENV = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}


def raycls(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raycls", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def listing(storage: Path, capsys) -> dict[str, dict]:
    capsys.readouterr()
    assert cli_main(["runs", "--storage-path", str(storage), "--json"]) == 0
    return {e["name"]: e for e in json.loads(capsys.readouterr().out)}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """tmp/runs/done: a finished 2-epoch run; commands run in tmp (export writes tmp/models)."""
    root = tmp_path_factory.mktemp("runs-cmd")
    t0 = time.monotonic()
    log = root / "train.log"  # a file, not a pipe nobody reads while polling (it could fill)
    proc = subprocess.Popen(
        [sys.executable, "-m", "raycls", "train", "--num-workers", "1", "--epochs", "2",
         "--model-width", "4", "--storage-path", "runs", "--name", "done"],
        cwd=root, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT)
    seen = []  # the states `raycls runs` reports while the real driver works
    while proc.poll() is None and time.monotonic() - t0 < 600:
        if (root / "runs" / "done").is_dir():
            from raycls.runs import list_runs

            seen += [(e["state"], e["pid"]) for e in list_runs(str(root / "runs"))]
        time.sleep(0.5)
    proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text()[-3000:]
    print(f"raycls train: {time.monotonic() - t0:.0f} s")
    assert ("running", proc.pid) in seen, seen
    assert not (root / "runs" / "done" / "driver.pid").exists(), "the marker outlived the driver"
    return root


def copy_unfinished(work: Path, name: str) -> Path:
    """The finished run as an interrupted one looks: checkpoints kept, no result.json."""
    dst = work / "runs" / name
    shutil.copytree(work / "runs" / "done", dst)
    for f in ("result.json", "curves.png"):
        (dst / f).unlink(missing_ok=True)
    return dst


@pytest.mark.ray  # the module's real `raycls train` starts a local Ray
def test_finished_run_listed_and_its_export_command_works(work, capsys, monkeypatch):
    result = json.loads((work / "runs" / "done" / "result.json").read_text())
    monkeypatch.chdir(work)  # bundles are looked for in models/<name>, export's default output
    e = listing(work / "runs", capsys)["done"]
    assert (e["kind"], e["state"], e["epochs_done"], e["epochs_planned"]) == ("train", "finished",
                                                                              2, 2)
    assert e["val_acc"] == result["val_acc"] and e["test_acc"] == result["test_acc"]
    assert e["age_s"] < 600
    assert e["next"] == f"raycls export {work / 'runs' / 'done'}"

    assert cli_main(["runs", "--storage-path", "runs"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["name", "kind", "state", "epochs", "val_acc", "test_acc", "age",
                                "next"]
    row = next(line for line in table if line.startswith("done "))
    assert row.split()[:6] == ["done", "train", "finished", "2/2", f"{result['val_acc']:.4f}",
                               f"{result['test_acc']:.4f}"]

    cmd = shlex.split(e["next"])
    p = raycls(*cmd[1:], cwd=work)  # the printed command, as a user pastes it
    assert p.returncode == 0, p.stderr[-3000:]
    assert (work / "models" / "done" / "bundle.json").is_file()
    e = listing(work / "runs", capsys)["done"]  # exported: now the next step is serving it
    assert e["next"] == "serve run raycls.deploy model=models/done"
    assert e["bundle"] == "models/done"


@pytest.mark.ray  # the module's real `raycls train` starts a local Ray
def test_show_prints_result_history_and_files(work, capsys):
    capsys.readouterr()
    assert cli_main(["runs", "show", "done", "--storage-path", str(work / "runs")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("train done: finished, epochs 2/2")
    assert "config: dataset=digits, model=resnet_small, num_workers=1, num_epochs=2" in out
    history = [line.split() for line in out.splitlines() if line[:5].strip() in ("1", "2")]
    assert [h[0] for h in history] == ["1", "2"]
    assert f"files: {work / 'runs' / 'done'}" in out and "  result.json" in out
    assert "best checkpoint: " + json.loads(
        (work / "runs" / "done" / "result.json").read_text())["checkpoint"] in out
    assert cli_main(["runs", "show", "done", "--storage-path", str(work / "runs"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [h["epoch"] for h in shown["history"]] == [1, 2] and shown["test_acc"] is not None


@pytest.mark.ray  # the module's real `raycls train` starts a local Ray
def test_interrupted_and_failed_runs_say_how_to_resume(work, capsys):
    copy_unfinished(work, "stopped")
    failed = copy_unfinished(work, "broken")
    (failed / "error.json").write_text(json.dumps({"data_error": "12 unreadable images"}))
    storage = work / "runs"
    runs = listing(storage, capsys)
    for name, state in (("stopped", "interrupted"), ("broken", "failed")):
        e = runs[name]
        assert (e["state"], e["epochs_done"], e["test_acc"]) == (state, 2, None)
        assert e["val_acc"] == pytest.approx(runs["done"]["val_acc"])
        # the command train.py prints on Ctrl-C and on failure
        assert e["next"] == f"raycls train --resume {name} --storage-path {storage}"
    assert runs["broken"]["error"] == "12 unreadable images"
    assert Path(runs["stopped"]["checkpoint"]).parent == storage / "stopped"  # best kept so far
    assert cli_main(["runs", "--storage-path", str(storage)]) == 0
    assert "broken: failed: 12 unreadable images" in capsys.readouterr().out
    # the printed resume command is accepted (checked up to the point where Ray would start)
    p = raycls(*shlex.split(runs["stopped"]["next"])[1:], "--dry-run", cwd=work)
    assert p.returncode == 0 and "run stopped would train" in p.stdout, p.stderr[-2000:]


@pytest.mark.ray  # the module's real `raycls train` starts a local Ray
def test_running_while_the_driver_lives(work, capsys):
    run = copy_unfinished(work, "live")
    # a real driver process: mark_running as train.py calls it, then waits for its stdin
    code = ("import sys; from pathlib import Path; from raycls.runs import mark_running; "
            f"mark_running(Path({str(run)!r})); print('ok', flush=True); sys.stdin.read()")
    driver = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline().strip() == "ok"
        e = listing(work / "runs", capsys)["live"]
        assert (e["state"], e["pid"], e["next"]) == ("running", driver.pid, None)
        assert cli_main(["runs", "--storage-path", str(work / "runs")]) == 0
        assert f"(running, pid {driver.pid})" in capsys.readouterr().out
    finally:
        driver.stdin.close()  # the driver ends normally: its marker goes with it
        driver.wait(timeout=30)
    assert not (run / "driver.pid").exists()
    assert listing(work / "runs", capsys)["live"]["state"] == "interrupted"
    # a driver killed outright leaves its marker; a dead pid is not running
    (run / "driver.pid").write_text(json.dumps({"pid": driver.pid, "start": "1"}))
    assert listing(work / "runs", capsys)["live"]["state"] == "interrupted"


@pytest.mark.ray  # the module's real `raycls train` starts a local Ray
def test_search_folders(work, tmp_path, capsys):
    from raycls.config import TrainConfig
    from raycls.search.settings import SETTINGS_FILE, SUMMARY_FILE, SearchSettings

    # `raycls runs` lists what train and search write by default (it hardcodes one default)
    assert TrainConfig().storage_path == SearchSettings().storage_path == "./runs"
    storage = tmp_path / "runs"
    ckpt = Path(json.loads((work / "runs" / "done" / "result.json").read_text())["checkpoint"])
    for name in ("search-a", "search-b"):
        exp = storage / name
        settings = SearchSettings(name=name, storage_path=str(storage), num_samples=2,
                                  max_epochs=2, models_dir=str(tmp_path / "models"),
                                  space={"lr": [0.1, 0.2]})
        exp.mkdir(parents=True)
        (exp / SETTINGS_FILE).write_text(json.dumps(dataclasses.asdict(settings), indent=2))
        for trial in ("abc_00000", "abc_00001"):  # Tune's trial folders, Train's checkpoints
            shutil.copytree(ckpt, exp / f"trial-{trial}" / "checkpoint_000001")
    best = str(storage / "search-a" / "trial-abc_00000" / "checkpoint_000001")
    (storage / "search-a" / SUMMARY_FILE).write_text(json.dumps({
        "name": "search-a", "experiment": str(storage / "search-a"), "num_trials": 2,
        "errors": [], "bundle": None,
        "best": {"trial_id": "abc_00000", "val_acc": 0.75, "epoch": 2, "test_acc": 0.7,
                 "checkpoint": best},
    }))
    runs = listing(storage, capsys)
    a, b = runs["search-a"], runs["search-b"]
    assert (a["kind"], a["state"], a["val_acc"], a["test_acc"]) == ("search", "finished", 0.75, 0.7)
    assert (a["epochs_done"], a["epochs_planned"]) == (4, 4)
    assert a["next"] == f"raycls export {best} --output {tmp_path / 'models' / 'search-a'}"
    assert b["state"] == "interrupted" and b["test_acc"] is None
    assert b["next"] == f"raycls search --resume --name search-b --storage-path {storage}"
    assert [t["epochs"] for t in b["trials"]] == [2, 2]

    bundle = tmp_path / "models" / "search-a"  # as export_best leaves it
    bundle.mkdir(parents=True)
    (bundle / "bundle.json").write_text("{}")
    summary = json.loads((storage / "search-a" / SUMMARY_FILE).read_text())
    (storage / "search-a" / SUMMARY_FILE).write_text(json.dumps({**summary,
                                                                 "bundle": str(bundle)}))
    assert listing(storage, capsys)["search-a"]["next"] == f"serve run raycls.deploy model={bundle}"
    (storage / "search-b" / SUMMARY_FILE).write_text(json.dumps({
        "name": "search-b", "errors": [{"trial_id": "abc_00001", "error": "boom"}], "best": None,
    }))
    b = listing(storage, capsys)["search-b"]
    assert (b["state"], b["error"]) == ("failed", "1 trial(s) failed")
    assert b["next"] == f"raycls search --resume --name search-b --storage-path {storage}"
    assert cli_main(["runs", "show", "search-a", "--storage-path", str(storage)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("search search-a: finished") and "abc_00001       2" in out


def test_empty_missing_and_unknown(tmp_path, capsys):
    assert cli_main(["runs", "--storage-path", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(f"no runs or searches in {tmp_path}")
    assert cli_main(["runs", "--storage-path", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --storage-path {tmp_path / 'nope'}: no such folder")
    assert len(err.strip().splitlines()) == 1


def test_unknown_name_names_the_known_runs(tmp_path, capsys):
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "raycls_config.json").write_text(json.dumps({"num_epochs": 3}))
    capsys.readouterr()
    assert cli_main(["runs", "show", "r2", "--storage-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: no run or search 'r2' in {tmp_path} (known: r1)\n"


def test_imports_neither_torch_nor_ray(tmp_path):
    code = ("import sys; from raycls.cli import main; "
            f"rc = main(['runs', '--storage-path', {str(tmp_path)!r}]); "
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules, 'heavy import'; "
            "sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr


@pytest.mark.ray
def test_workers_failing_for_good_leave_a_failed_run(ray_session, tmp_path, capsys):
    """train.py writes error.json when Train gives up after a checkpoint (TrainingFailedError),
    so the run is listed as failed with the worker's error, not as interrupted."""
    from raycls.config import TrainConfig
    from raycls.run_folder import RunError
    from raycls.trainer import run_training

    cfg = TrainConfig(num_workers=1, num_epochs=2, model_width=4, max_failures=0,
                      storage_path=str(tmp_path / "runs"), name="crash",
                      extra={"fail_at_epoch": 1, "fail_marker": str(tmp_path / "marker")})
    with pytest.raises(RunError, match="--resume crash"):
        run_training(cfg)
    e = listing(tmp_path / "runs", capsys)["crash"]
    assert (e["state"], e["epochs_done"]) == ("failed", 1)
    assert "injected failure at epoch 1" in e["error"]
    assert e["next"] == f"raycls train --resume crash --storage-path {tmp_path / 'runs'}"
    assert cli_main(["runs", "--storage-path", str(tmp_path / "runs")]) == 0
    assert "crash: failed: RuntimeError: injected failure at epoch 1 on rank 0" in \
        capsys.readouterr().out
