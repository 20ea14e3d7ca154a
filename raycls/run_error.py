"""The run's error file: a deterministic error that the workers stop on, left for the driver.

Some errors would only repeat on every retry (a model that cannot be built, too many unreadable
images). The workers report instead of raising, so that Train does not restart the worker group
`--max-failures` times, and rank 0 writes the message into the run folder, where the driver
reads it after `fit` (Train's Result carries only the metrics of checkpointed reports).
"""

from __future__ import annotations

import json

from raycls.config import TrainConfig
from raycls.runs import TRAIN_ERROR

RUN_ERROR_FILE = TRAIN_ERROR  # {"config_error" | "data_error": message}, in the run folder


def _run_error_path(cfg: TrainConfig):
    """(pyarrow filesystem, path of the run's error file): local, NFS or object storage alike,
    as every rank and the driver see the run folder."""
    import pyarrow.fs

    fs, run_dir = pyarrow.fs.FileSystem.from_uri(f"{cfg.storage_path.rstrip('/')}/{cfg.name}")
    return fs, run_dir, f"{run_dir}/{RUN_ERROR_FILE}"


def stop_run(cfg: TrainConfig, rank: int, kind: str, message: str, metrics=None) -> None:
    """End the run on every rank for an error that a retry would only repeat (a model that cannot
    be built, too many unreadable images). Reported instead of raised, so that Train does not
    restart the worker group --max-failures times; rank 0 leaves the message for the driver,
    since Train's Result carries only the metrics of checkpointed reports. Every rank reports,
    so the ranks stay in step."""
    import ray.train

    if rank == 0:
        fs, run_dir, path = _run_error_path(cfg)
        fs.create_dir(run_dir, recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(json.dumps({kind: message}).encode())
    ray.train.report({**(metrics or {}), kind: message})


def read_run_error(cfg: TrainConfig) -> dict[str, str]:
    fs, _, path = _run_error_path(cfg)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return {}


def clear_run_error(cfg: TrainConfig) -> None:
    fs, _, path = _run_error_path(cfg)
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass

