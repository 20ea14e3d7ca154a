"""Bad flags are refused before Ray starts: `error: field=value: why`, exit 2, in seconds, no run
folder left behind; a configuration error inside a worker is not retried."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from raycls.config import ConfigError, TrainConfig


def run_cli(args: list[str], cwd: Path) -> tuple[int, str, float]:
    # A Ray address nobody listens on: a command that reached Ray would fail with a connection
    # error (exit 1), so exit 2 with the field's message proves the check came first.
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "raycls", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0


def run_in_process(args: list[str], capfd, monkeypatch) -> tuple[int, str, float]:
    from raycls.cli import main

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    t0 = time.perf_counter()
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    seconds = time.perf_counter() - t0
    out, err = capfd.readouterr()
    return rc, out + err, seconds


def test_bad_flags_fail_fast_with_the_field(tmp_path, capfd, monkeypatch):
    runs = tmp_path / "runs"
    finished = runs / "done-run"
    finished.mkdir(parents=True)
    (finished / "result.json").write_text(json.dumps({"checkpoint": str(finished / "ck")}))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not weights")
    preset = tmp_path / "typo.yaml"
    preset.write_text("dataset: digits\nmax_epochs: 1\n"
                      "space:\n  model: [resnet_small, resnet_smal]\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    train = ["train", "--storage-path", str(runs)]
    cases = {  # flags -> (the field the message must name, text it must contain)
        "--model nosuchmodel": ("model=nosuchmodel", "unknown model"),
        "--model resnet_smal": ("model=resnet_smal", "did you mean resnet_small"),
        "--dataset nosuch": ("dataset=nosuch", "choose digits"),
        "--dataset imagefolder:/nope": ("dataset=imagefolder:/nope", "no such folder"),
        "--dataset parquet:/nonexistent/*.parquet": ("dataset=parquet:", "no such file"),
        "--aug-policy bogus": ("aug_policy=bogus", "unknown component"),
        "--aug-policy crop9": ("aug_policy=crop9", "smaller than the image size (8)"),
        "--policy-file /missing.json": ("aug_policy_file=/missing.json", "no such file"),
        "--resume nosuchrun": ("resume=nosuchrun", "no run directory"),
        "--resume done-run": ("resume=done-run", "--resume-from"),
        f"--dataset mnist --data-dir {empty}": (f"data_dir={empty}", "IDX"),
        "--resume-from /nope": ("resume_from=/nope", "no meta.json"),
        "--model resnet18 --pretrained /missing.pth": ("pretrained=/missing.pth", "no such file"),
        "--pretrained /x.pth": ("pretrained=/x.pth", "torchvision models only"),
        "--num-epochs 0": ("num_epochs=0", "at least 1"),
        "--optimizer adam": ("--optimizer", "invalid choice"),
    }
    commands = {flags: train + flags.split() for flags in cases}
    cases["search --preset typo"] = ("model=resnet_smal", "did you mean resnet_small")
    commands["search --preset typo"] = ["search", "--preset", str(preset),
                                        "--storage-path", str(tmp_path / "searches")]
    # A few as real commands, timed from a cold start; the rest in this process (the same
    # code path, without paying torch's import once per case).
    cold = ["--model nosuchmodel", "--dataset imagefolder:/nope", "search --preset typo"]
    with ThreadPoolExecutor(3) as pool:
        answers = dict(zip(cold, pool.map(lambda f: run_cli(commands[f], tmp_path), cold),
                           strict=True))
    for flags in commands.keys() - set(cold):
        answers[flags] = run_in_process(commands[flags], capfd, monkeypatch)
    for flags, (rc, out, seconds) in answers.items():
        field, why = cases[flags]
        assert rc == 2, f"{flags}: exit {rc}\n{out}"
        assert "Traceback" not in out, f"{flags}:\n{out}"
        assert field in out and why in out, f"{flags}: expected {field!r} / {why!r} in\n{out}"
        assert seconds < 20, f"{flags}: took {seconds:.1f}s (3 at once on 2 cores)"
    assert sorted(p.name for p in runs.iterdir()) == ["done-run"], "a refused run left a folder"
    assert not (tmp_path / "searches").exists()


def test_help_states_every_default_and_the_grammar():
    # wide: argparse wraps at hyphens ("--resume-" / "from") at a terminal's usual width
    out = subprocess.run([sys.executable, "-m", "raycls", "train", "--help"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "400"}).stdout
    flat = " ".join(out.split())
    assert "0 = the dataset's native size" in flat
    assert "{sgd,adamw}" in flat and "{auto,memory,stream}" in flat
    assert "rand-n<N>-m<M 0-30>" in flat and "torchvision classification model" in flat
    assert "--resume-from CHECKPOINT" in flat
    from raycls.cli import build_parser

    for command in ("train", "search"):
        parser = build_parser([command])
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        for action in sub._actions:
            if action.dest == "help" or not action.option_strings:
                continue
            assert action.help, f"{command} {action.option_strings}: no help"
            quiet = action.default in (None, False) or "alias" in action.help
            assert quiet or "default" in action.help, f"{command} {action.option_strings}"


def test_worker_config_error_is_not_retried(ray_session, tmp_path):
    """Weights that are not the model's fail every rank the same way: reported once (a
    ConfigError, not Train's retries ending in TrainingFailedError), and no run folder kept."""
    from raycls.trainer import run_training

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not weights")
    cfg = TrainConfig(model="resnet18", pretrained=str(junk), num_epochs=1, num_workers=1,
                      batch_size=16, storage_path=str(tmp_path / "runs"), max_failures=2)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="model=resnet18: cannot be built .*not resnet18 weights"):
        run_training(cfg)
    assert time.perf_counter() - t0 < 60
    assert not any((tmp_path / "runs").iterdir())
