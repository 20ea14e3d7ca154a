"""Hooks for tests only: off unless a test sets their keys in `TrainConfig.extra`.

The worker calls each at one line. With none of `fail_at_epoch` / `record_ids_dir` in `extra`
(as in every run that `raycls train` or `raycls search` starts) they return at once and change
nothing; tests set them to inject a worker failure or to see which images each rank trained on.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from raycls.config import TrainConfig


def maybe_inject_failure(cfg: TrainConfig, epoch: int, rank: int, step: int = 0) -> None:
    """Off unless `extra={"fail_at_epoch": E, "fail_mode": "raise"|"exit", "fail_marker": PATH}`
    makes rank `fail_rank` (default 1) fail once at the start of epoch E, or after
    `fail_after_batches` batches of it (mid-epoch); the marker file records that it already
    failed, so the restarted run goes on."""
    spec = cfg.extra
    if "fail_at_epoch" not in spec or epoch != spec["fail_at_epoch"]:
        return
    if step != spec.get("fail_after_batches", 0):
        return
    if rank != spec.get("fail_rank", 1 if cfg.num_workers > 1 else 0):
        return
    marker = Path(spec["fail_marker"])
    if marker.exists() and not spec.get("fail_always"):
        return
    marker.write_text(f"failed at epoch {epoch}\n")
    if spec.get("fail_mode") == "exit":
        os._exit(1)  # a hard crash: no exception, no cleanup
    raise RuntimeError(f"injected failure at epoch {epoch} on rank {rank}")


def record_ids(cfg: TrainConfig, data, epoch: int) -> None:
    """Off unless `extra={"record_ids_dir": DIR}`: each rank writes the ids of the streamed
    training images it was given in `epoch` (one file per rank and epoch, named by the time).
    `data`: the rank's raycls.worker.WorkerData."""
    folder = cfg.extra.get("record_ids_dir")
    if folder and data.streaming:
        ids = torch.cat(data.seen_ids).tolist() if data.seen_ids else []
        name = f"ids-e{epoch}-r{data.rank}-t{time.time_ns()}.json"
        Path(folder, name).write_text(json.dumps(ids))

