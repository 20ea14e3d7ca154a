"""A training run's name and folder: a fresh unique name for a new run, the checks and the
config for a resumed one, and what is left of a run that never reached its first checkpoint.

One source of truth for a resumed run's config: its newest checkpoint's meta.json; the folder's
raycls_config.json is a readable copy (see `resume_config`). Local folders only are inspected;
an object-store run (s3://...) is resumed with the flags given.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from raycls.checkpoints import read_checkpoint_meta, verify_checkpoint
from raycls.config import TrainConfig
from raycls.runs import TRAIN_CONFIG, TRAIN_RESULT, read_train_result


class RunError(RuntimeError):
    """A run cannot start or finish as asked; the message says why and what to do."""


def new_run_name(cfg: TrainConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{cfg.dataset.split(':')[0]}-{cfg.model}-{stamp}-{secrets.token_hex(2)}"


def resolve_run(cfg: TrainConfig, resume: str | None) -> TrainConfig:
    """New runs get a unique name; a finished run is never silently reused; a resumed run takes
    its newest checkpoint's config (resume_config)."""
    storage = cfg.storage_path if "://" in cfg.storage_path else os.path.abspath(cfg.storage_path)
    if resume:
        run_dir = Path(storage) / resume
        if "://" not in storage and not run_dir.is_dir():
            runs = sorted(p.name for p in Path(storage).glob("*") if p.is_dir())[-3:]
            raise RunError(f"resume={resume}: no run directory {run_dir}; "
                           + (f"runs there: {', '.join(runs)}" if runs else
                              "start a new run without --resume"))
        if (run_dir / TRAIN_RESULT).exists():  # finished, even if the file is damaged since
            best = (read_train_result(run_dir) or {}).get("checkpoint", "")
            raise RunError(
                f"resume={resume}: the run already finished ({run_dir}/{TRAIN_RESULT}); to train "
                f"it further, start a new run from its best checkpoint: `raycls train "
                f"--resume-from {best or run_dir / 'checkpoint_...'} --num-epochs N` (with the "
                "run's other flags)")
        previous = resume_config(run_dir)  # the run's own config, not today's flags
        if previous is not None:
            cfg = TrainConfig.from_dict({**previous, "storage_path": storage, "name": resume})
        return cfg.replace(name=resume, storage_path=storage)
    name = cfg.name or new_run_name(cfg)
    run_dir = Path(storage) / name
    if "://" not in storage and run_dir.exists():
        finished = (run_dir / TRAIN_RESULT).exists()
        raise RunError(
            f"name={name}: the run already exists in {storage} "
            f"({'finished' if finished else 'unfinished'}); "
            + ("choose another --name" if finished else f"continue it with --resume {name}")
        )
    return cfg.replace(name=name, storage_path=storage)


def resume_config(run_dir: Path) -> dict[str, Any] | None:
    """The config a resumed run continues with: the one its newest checkpoint trained with
    (meta.json's "config", as in nanoGPT: one store). A run with no checkpoint yet has trained
    nothing, so it starts over with the flags it was started with, from raycls_config.json;
    None when neither exists (an object-store run: the flags given now)."""
    newest = None
    for ckpt in sorted(run_dir.glob("checkpoint_*")):
        if (ckpt / "meta.json").exists():  # no meta.json = never finished, never used
            meta = read_checkpoint_meta(ckpt)
            if newest is None or meta["epoch"] > newest[1]["epoch"]:
                newest = ckpt, meta
    if newest is not None:
        verify_checkpoint(newest[0])  # the one resumed from: refuse it corrupted (sha256), once
        if not isinstance(newest[1].get("config"), dict):
            raise RunError(f"{newest[0]}/meta.json: no \"config\" to resume with; start a new "
                           f"run from it with `raycls train --resume-from {newest[0]}`")
        return newest[1]["config"]
    saved = run_dir / TRAIN_CONFIG
    if not saved.exists():
        return None
    try:
        return json.loads(saved.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{saved}: unreadable ({e}); the run has no checkpoint yet, so nothing "
                       "is lost: start it again as a new run") from None


def starts_over(cfg: TrainConfig, resume: str | None) -> bool:
    """A local run resumed before its first checkpoint: it trains again from epoch 0."""
    return bool(resume) and "://" not in cfg.storage_path and newest_epoch(
        Path(cfg.storage_path) / cfg.name) == 0


def starts_over_note(cfg: TrainConfig) -> str:
    copy = (Path(cfg.storage_path) / cfg.name / TRAIN_CONFIG).exists()
    return (f"run {cfg.name} has no checkpoint yet: it starts over from epoch 1, with "
            + (f"the config in its {TRAIN_CONFIG}" if copy else "the flags given now"))


def newest_epoch(run_dir: Path) -> int:
    """Epochs done by the newest complete checkpoint of a local run (0 for none)."""
    done = 0
    for meta in run_dir.glob("checkpoint_*/meta.json"):
        try:
            done = max(done, json.loads(meta.read_text())["epoch"] + 1)
        except (OSError, ValueError, KeyError):
            continue
    return done


def forget_unstarted_run(run_dir: Path, storage_path: str) -> bool:
    """Remove a local run folder that holds no checkpoint (nothing to resume, nothing to keep:
    a later attempt under the same name must not trip over it). True when it was removed."""
    if "://" in storage_path or any(run_dir.glob("checkpoint_*/meta.json")):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True
