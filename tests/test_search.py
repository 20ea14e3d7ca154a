"""raycls.search: presets and space checks (no cluster), then real searches on a local Ray.

The Ray tests run real Tune trials that each fit a real TorchTrainer on digits, export the winner
through the real parity gate and load the bundle as serving does. The driver-kill/--resume and
PBT scenarios start their own Ray in a subprocess and are marked slow.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raycls.config import ConfigError, TrainConfig
from raycls.search.reports import schedule_from_history, train_command
from raycls.search.settings import SearchSettings, resolve_settings
from raycls.search.space import build_space, check_policies, derive_concurrency, trial_config
from raycls.search.trainable import train_run_name

REPO = Path(__file__).resolve().parents[1]


def write_preset(tmp_path: Path, **doc) -> str:
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


# ----------------------------------------------------------------------------- no cluster


def test_shipped_presets_resolve_and_build_their_space():
    for preset in sorted(REPO.glob("tune/*.yaml")):
        settings = resolve_settings(str(preset), {})
        space = build_space(settings, trial_config(settings))
        assert set(settings.space) <= set(space)
        TrainConfig.from_dict({k: v for k, v in space.items() if k not in settings.space})


def test_preset_errors_name_the_problem(tmp_path):
    cases = [
        ({"spcae": {}}, r"unknown key\(s\) \['spcae'\]"),
        ({"space": {"lr_rate": [0.1]}}, "'lr_rate' is not a TrainConfig field"),
        ({"space": {"num_epochs": [3, 5]}}, "use --max-epochs"),
        ({"space": {"lr": {"normal": [0, 1]}}}, "is not one distribution"),
        ({"space": {"lr": {"loguniform": [0.0, 0.1]}}}, "needs 0 < low < high"),
        ({"space": {"lr": {"uniform": [0.1]}}}, "uniform needs 2 numbers"),
        ({"space": {"lr": [0.1, -1.0]}}, "lr: value -1.0 is invalid.*must be positive"),
        ({"space": {"optimizer": ["sgd", "adam"]}}, "choose sgd or adamw"),
        ({"scheduler": "hyperband"}, "scheduler='hyperband'"),
        ({"scheduler": "pbt", "num_samples": 1}, "PBT needs a population"),
        ({"scheduler": "grid", "space": {"lr": {"uniform": [0.1, 0.2]}}}, "grid scheduler needs"),
    ]
    for doc, message in cases:
        with pytest.raises(ConfigError, match=message):
            settings = resolve_settings(write_preset(tmp_path, **doc), {})
            build_space(settings, trial_config(settings))
    with pytest.raises(ConfigError, match="no preset 'nosuch'.*available: .*default"):
        resolve_settings("nosuch", {})


def test_policies_are_checked_against_the_dataset():
    from raycls.data import load_dataset

    ds = load_dataset("digits").describe()
    ok = SearchSettings(space={"aug_policy": ["default", "crop1-cutout2", "pba:"]})
    check_policies(ok, ds)
    with pytest.raises(ConfigError, match="'crop1-flip' does not suit digits.*flip is disabled"):
        check_policies(SearchSettings(space={"aug_policy": ["crop1-flip"]}), ds)
    with pytest.raises(ConfigError, match="rand-n9"):
        check_policies(SearchSettings(mutations={"aug_policy": ["rand-n99-m9"]}), ds)


def test_grid_scheduler_expands_choices_and_overrides_win(tmp_path):
    from ray import tune

    preset = write_preset(tmp_path, scheduler="grid", space={"lr": [0.05, 0.1]})
    settings = resolve_settings(preset, {"max_epochs": 3, "num_samples": None})
    assert settings.max_epochs == 3 and settings.num_samples == 1
    space = build_space(settings, trial_config(settings))
    assert space["lr"] == tune.grid_search([0.05, 0.1])
    assert space["num_epochs"] == 3 and space["num_workers"] == 1


def test_concurrency_comes_from_the_cluster():
    s = SearchSettings(workers_per_trial=2)
    assert derive_concurrency(s, {"CPU": 8.0}) == 4
    assert derive_concurrency(SearchSettings(), {"CPU": 2.0}) == 2
    assert derive_concurrency(SearchSettings(gpus_per_trial=1), {"CPU": 16.0, "GPU": 2.0}) == 2
    assert derive_concurrency(SearchSettings(max_concurrent_trials=3), {"CPU": 1.0}) == 3
    with pytest.raises(Exception, match="lower --workers-per-trial"):
        derive_concurrency(SearchSettings(workers_per_trial=4), {"CPU": 2.0})
    # streaming trials leave a quarter of the CPUs (at least one) to Ray Data's decode tasks
    assert derive_concurrency(SearchSettings(), {"CPU": 4.0}, streaming=True) == 3
    assert derive_concurrency(SearchSettings(), {"CPU": 16.0}, streaming=True) == 12


def test_train_run_names_are_trial_stable():
    assert train_run_name("abc_00001", "") == "train-abc_00001"
    a = train_run_name("abc_00001", "/x/trial-abc_00001/checkpoint_000003")
    assert a == train_run_name("abc_00001", "/x/trial-abc_00001/checkpoint_000003")
    assert a != train_run_name("abc_00001", "/x/trial-abc_00002/checkpoint_000003")


def test_schedule_from_history_and_the_train_command(tmp_path):
    history = [{"epoch": e, "aug_policy": p} for e, p in
               [(1, "crop1"), (2, "crop1"), (3, "pba:rotate=0.2/3"), (4, "pba:rotate=0.2/3")]]
    assert schedule_from_history(history) == [(0, "crop1"), (2, "pba:rotate=0.2/3")]
    cfg = TrainConfig(lr=0.2, batch_size=64, use_gpu=True).to_dict()
    cmd = train_command(cfg, tmp_path / "s.json")
    assert "--lr 0.2" in cmd and "--batch-size 64" in cmd and "--use-gpu" in cmd
    assert f"--policy-file {tmp_path / 's.json'}" in cmd and "--aug-policy" not in cmd


def test_val_acc_ties_go_to_the_lower_val_loss_in_rows_and_checkpoints(tmp_path):
    """The one order (raycls.checkpoints.rank_key), where Tune's picks would take the first tie:
    the epoch the table names is the checkpoint that is exported."""
    import pandas as pd
    from ray.tune import Checkpoint, Result

    from raycls.search.reports import best_checkpoint, trial_rows

    epochs = [{"epoch": 1, "val_acc": 0.9, "val_loss": 0.5},
              {"epoch": 2, "val_acc": 0.9, "val_loss": 0.3},
              {"epoch": 3, "val_acc": 0.8, "val_loss": 0.2}]
    ckpts = [(Checkpoint(str(tmp_path / f"c{m['epoch']}")), m) for m in epochs]

    def result(trial: str, history: list[dict] | None, error: Exception | None = None) -> Result:
        return Result(
            metrics={**history[-1], "config": {"lr": 0.1}} if history else {},
            checkpoint=ckpts[-1][0] if history else None, error=error,
            path=str(tmp_path / f"trial-{trial}"),
            metrics_dataframe=pd.DataFrame(history) if history else None,
            best_checkpoints=ckpts if history else None,
        )

    tie = [{**m, "val_loss": 0.4} if m["epoch"] == 2 else m for m in epochs[:2]]
    grid = [result("none", None, RuntimeError("boom")), result("b", tie), result("a", epochs)]
    rows = trial_rows(grid, ["lr"], max_epochs=3)
    assert [r["trial_id"] for r in rows] == ["a", "b", "none"]
    assert rows[0]["best_epoch"] == 2 and rows[0]["val_loss"] == 0.3
    assert [r["status"] for r in rows] == ["done", "stopped early", "ERROR"]
    assert rows[0]["config"] == {"lr": 0.1} and rows[2]["curve"] == []
    assert best_checkpoint(grid[2]).path == str(tmp_path / "c2")
    assert grid[2].get_best_checkpoint("val_acc", "max").path == str(tmp_path / "c1")  # Tune's


def test_cli_refuses_bad_input_without_a_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, str(REPO / "tune" / "search.py"), "--preset", "nosuch"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert run.returncode == 2 and run.stderr.startswith("error: no preset 'nosuch'")
    assert "Traceback" not in run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "raycls", "search", "--scheduler", "pbt", "--num-samples", "1"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert run.returncode == 2 and "PBT needs a population" in run.stderr


def test_the_command_parses_its_flags_without_importing_ray():
    """A new local Ray gets its settings (RAY_AUTH_MODE) before the first Ray import."""
    code = ("import sys, argparse, raycls.search, raycls.search.run, raycls.search.reports; "
            "raycls.search.add_arguments(argparse.ArgumentParser()); "
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


# ----------------------------------------------------------------------------- real searches


def tiny(tmp_path: Path, **overrides) -> SearchSettings:
    base = dict(
        name="tiny", storage_path=str(tmp_path / "runs"), models_dir=str(tmp_path / "models"),
        scheduler="random", num_samples=2, max_epochs=2, grace_period=1,
        max_concurrent_trials=2, base={"max_failures": 0, "batch_size": 64},
        space={"lr": [0.1, 0.2], "aug_policy": ["default", "crop1-cutout2"]},
    )
    return SearchSettings(**{**base, **overrides})


@pytest.mark.ray
def test_tiny_search_end_to_end(ray_session, tmp_path, capsys):
    from raycls.augment import load_policy_schedule
    from raycls.bundle import load_bundle
    from raycls.search.run import run_search
    from raycls.search_console import TUNE_QUIET_ENV
    from raycls.tracking import TUNE_LOGGER_ENV

    switches = {**TUNE_QUIET_ENV, **TUNE_LOGGER_ENV}  # Tune's, set for the search's fit only
    already = {k for k in switches if k in os.environ}
    summary = run_search(tiny(tmp_path))
    assert {k for k in switches if k in os.environ} == already
    exp = tmp_path / "runs" / "tiny"
    assert summary["errors"] == [] and summary["num_trials"] == 2
    rows = list(csv.DictReader((exp / "results.csv").open()))
    assert [r["rank"] for r in rows] == ["1", "2"]
    accs = [float(r["val_acc"]) for r in rows]
    assert accs == sorted(accs, reverse=True) and all(r["epochs"] == "2" for r in rows)
    assert (exp / "val_acc.png").stat().st_size > 5000
    best = json.loads((exp / "best_config.json").read_text())
    TrainConfig.from_dict(best)  # a valid config `raycls train` can rerun
    assert best["lr"] == float(rows[0]["lr"]) and best["num_epochs"] == 2
    schedule = load_policy_schedule(str(exp / "best_policy_schedule.json"))
    assert schedule[0][0] == 0 and schedule[0][1] in ("crop1", "crop1-cutout2")
    # each trial trained once, in its own trial-stable Train run
    assert sorted(p.name for p in (exp / "train-runs").iterdir()) == sorted(
        f"train-{r['trial_id']}" for r in rows)
    bundle = load_bundle(tmp_path / "models" / "tiny")
    assert bundle.meta["parity"]["top1_agreement"] >= 0.999
    assert abs(bundle.meta["metrics"]["onnx_test_acc"] - summary["best"]["test_acc"]) < 0.01
    # the winner's PyTorch test accuracy, measured on the exported checkpoint, is the bundle's
    assert bundle.meta["metrics"]["test_acc"] == summary["best"]["test_acc"]
    assert "not recorded" not in capsys.readouterr().out  # (Tune's result.json is no run's)
    assert summary["bundle"] == str(tmp_path / "models" / "tiny")


@pytest.mark.ray
def test_search_streams_an_image_folder(ray_session, stream_tree, tmp_path):
    """Trials stream their data through Ray Data and the winner exports from the folder."""
    from raycls.bundle import load_bundle
    from raycls.search.run import run_search

    settings = tiny(tmp_path, dataset=f"imagefolder:{stream_tree['root']}", max_epochs=1,
                    base={"max_failures": 0, "batch_size": 16, "image_size": 16},
                    space={"lr": 0.1}, num_samples=1)
    summary = run_search(settings)
    assert summary["errors"] == [] and summary["num_trials"] == 1
    assert summary["best"]["test_acc"] is not None
    bundle = load_bundle(tmp_path / "models" / "tiny")
    assert bundle.meta["input"]["resize"] == "center-crop" and bundle.height == 16


@pytest.mark.ray
def test_a_trial_that_raises_fails_the_search(ray_session, tmp_path, capsys):
    import argparse

    from raycls.search import add_arguments, main

    marker = tmp_path / "failed"
    bad = {"fail_at_epoch": 1, "fail_mode": "raise", "fail_always": True,
           "fail_marker": str(marker)}
    preset = write_preset(
        tmp_path, scheduler="random", num_samples=1, max_epochs=2,
        base={"max_failures": 0, "batch_size": 64}, space={"extra": {"grid": [{}, bad]}},
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([
        "--preset", preset, "--name", "failing", "--storage-path", str(tmp_path / "runs"),
        "--models-dir", str(tmp_path / "models"), "--max-concurrent-trials", "2",
    ])
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1 and marker.exists()
    assert "error: 1 of 2 trial(s) failed" in err
    assert "injected failure at epoch 1" in err and "--resume --name failing" in err
    assert not (tmp_path / "models" / "failing").exists()  # no export from a failed search
    rows = (tmp_path / "runs" / "failing" / "results.csv").read_text()
    assert "ERROR" in rows and "done" in rows
    # the printed `--resume --name failing` is accepted (Tune then retries the errored trial)
    from raycls.search.run import newest_unfinished, prepare
    from raycls.search.settings import SUMMARY_FILE

    settings = resolve_settings(preset, {"storage_path": str(tmp_path / "runs")})
    assert newest_unfinished(tmp_path / "runs") == "failing"
    resumed, exp = prepare(dataclasses.replace(settings, name="failing"), resume=True)
    assert resumed.name == "failing" and not (exp / SUMMARY_FILE).exists()


@pytest.mark.ray
def test_a_trial_that_errors_once_is_retried_from_its_checkpoint(ray_session, tmp_path, capsys):
    """Reliability scenario 6: Train gives up at once (max_failures 0), Tune retries the trial
    from its newest checkpoint, and the search ends with no errors."""
    import argparse

    from raycls.search import add_arguments, main

    marker = tmp_path / "failed-once"
    once = {"fail_at_epoch": 2, "fail_mode": "raise", "fail_rank": 0, "fail_marker": str(marker)}
    preset = write_preset(
        tmp_path, scheduler="random", num_samples=1, max_epochs=3, max_trial_failures=1,
        base={"max_failures": 0, "batch_size": 64, "extra": once},
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([
        "--preset", preset, "--name", "retried", "--storage-path", str(tmp_path / "runs"),
        "--no-export",
    ])
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    assert marker.exists(), "the injected failure never happened"
    exp = tmp_path / "runs" / "retried"
    runs = sorted(p.name for p in (exp / "train-runs").iterdir())
    # the first Train run died at epoch 3; the retry is a run started from a Tune checkpoint
    assert len(runs) == 2 and any("-from-" in r for r in runs), runs
    rows = (exp / "results.csv").read_text()
    assert "ERROR" not in rows


def run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    return subprocess.Popen(
        [sys.executable, str(REPO / "tune" / "search.py"), *args], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kw,
    )


def stop_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this test started (the driver and the Ray it started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


@pytest.mark.ray
@pytest.mark.slow
def test_killed_driver_resumes_without_rerunning_finished_trials(tmp_path):
    preset = write_preset(
        tmp_path, scheduler="random", num_samples=1, max_epochs=3, max_concurrent_trials=1,
        base={"max_failures": 0, "batch_size": 64}, space={"lr": {"grid": [0.05, 0.1, 0.2]}},
    )
    common = ["--preset", preset, "--name", "killed", "--storage-path", str(tmp_path / "runs"),
              "--models-dir", str(tmp_path / "models")]
    exp = tmp_path / "runs" / "killed"
    proc = run_cli(common)
    try:
        deadline = time.monotonic() + 400
        # Kill once the second trial reported an epoch: one trial at a time, so the first has
        # finished and Tune has recorded it (a trial that reported its last epoch but was still
        # RUNNING in the snapshot is rightly restored and finished again)
        while time.monotonic() < deadline and proc.poll() is None:
            progress = sorted(exp.glob("trial-*/progress.csv"))
            lines = [len(p.read_text().strip().splitlines()) for p in progress]
            if len(lines) >= 2 and lines[0] == 1 + 3 and lines[1] >= 2:
                break
            time.sleep(1)
        assert len(lines) >= 2, "the second trial did not start in time"
        done = [progress[0]]
    finally:
        stop_group(proc)
    finished = {p.parent.name for p in done}
    before = {p.parent.name: p.read_text() for p in exp.glob("trial-*/progress.csv")}
    runs_before = sorted(p.name for p in (exp / "train-runs").iterdir())

    proc = run_cli([*common, "--resume"])
    out, _ = proc.communicate(timeout=500)
    assert proc.returncode == 0, out[-3000:]
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["num_trials"] == 3 and summary["errors"] == []
    for trial in finished:  # not re-run: same results, no new Train run
        assert (exp / trial / "progress.csv").read_text() == before[trial]
    runs_after = sorted(p.name for p in (exp / "train-runs").iterdir())
    new_runs = set(runs_after) - set(runs_before)
    assert not any(r.removeprefix("train-").startswith(t.removeprefix("trial-"))
                   for r in new_runs for t in finished)
    rows = (exp / "results.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 and all(",done," in r for r in rows)
    # the final best is exactly the best val_acc any trial reported, the finished one included
    import pandas as pd

    reported = max(pd.read_csv(p)["val_acc"].max() for p in exp.glob("trial-*/progress.csv"))
    assert summary["best"]["val_acc"] == pytest.approx(reported)
    assert (tmp_path / "models" / "killed" / "bundle.json").is_file()


@pytest.mark.ray
@pytest.mark.slow
def test_pbt_writes_a_replayable_schedule(ray_session, tmp_path):
    from raycls.augment import load_policy_schedule
    from raycls.search.run import run_search
    from raycls.trainer import run_training

    settings = tiny(
        tmp_path, name="pbt", scheduler="pbt", num_samples=2, max_epochs=4,
        perturbation_interval=1, quantile_fraction=0.5, export=False,
        space={"aug_policy": "pba:", "lr": [0.05, 0.2]},
        mutations={"label_smoothing": [0.0, 0.05, 0.1]},
    )
    summary = run_search(settings)
    exp = tmp_path / "runs" / "pbt"
    assert summary["errors"] == [] and summary["best"] is not None
    schedule = load_policy_schedule(str(exp / "best_policy_schedule.json"))
    assert schedule[0] == (0, "pba:") and all(p.startswith("pba:") for _, p in schedule)
    # PBT explored: the exploiting trial moved on from the empty starting policy
    final = [r["final_aug_policy"] for r in csv.DictReader((exp / "results.csv").open())]
    assert len(final) == 2 and any(p != "pba:" for p in final), final
    # a PBT restart resumes from a cloned checkpoint in a fresh Train run
    assert any("-from-" in p.name for p in (exp / "train-runs").iterdir())
    replay = run_training(TrainConfig(
        dataset="digits", num_epochs=4, num_workers=1, batch_size=64,
        aug_policy_file=str(exp / "best_policy_schedule.json"),
        storage_path=str(tmp_path / "replay"),
    ))
    assert [h["aug_policy"] for h in replay["history"]] == [
        next(p for s, p in reversed(schedule) if s <= e) for e in range(4)
    ]
