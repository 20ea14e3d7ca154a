"""Experiment tracking: TensorBoard event files for every run and trial, MLflow runs when asked.

One job: hand what training already measures to the two trackers users open. Nothing here
decides how a run trains; `raycls.trainer` and `raycls.search` call it at a few marked points.

TensorBoard (always on; `--no-tensorboard` turns it off). `Board` (raycls.board) lives in every
Train worker; rank 0 alone writes, with torch's `SummaryWriter`, into the run directory
(`<storage-path>/<name>/`) or, in a search, the trial's directory (`<search>/trial-<id>/`), so
`tensorboard --logdir <storage-path>` shows runs and trials side by side. The global step is the
epoch (1-based): train_loss, val_loss, val_acc, lr, images_per_s each epoch; at the run's last
epoch the confusion matrix on the val split (every rank's share, summed) and a grid of sample
predictions. A resumed or restarted worker group opens a new event file in the same directory
with `purge_step` = its first epoch, so TensorBoard hides whatever was logged past the checkpoint
it resumed from: no epoch appears twice.

MLflow (opt-in: `--mlflow-uri URI`, or $MLFLOW_TRACKING_URI). One MLflow run per training run or
trial, found again by its directory (tag `raycls.dir`) so a resumed run or a retried trial goes on
in the same MLflow run; a search's trials are nested under a parent run. The driver logs the
resolved config as params and the artifacts at the end (curves and result for a run; results,
plot, best config and the exported bundle for a search); per-epoch metrics come from
`MlflowEpochs`, a Ray Train callback that runs in the Train controller, which Ray places on the
driver's node, so a local sqlite store works. MLflow is imported only when asked for, and a
tracking failure is a warning, never the end of a training run.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from raycls.board import EPOCH_SCALARS, board_dir
from raycls.config import ConfigError, TrainConfig

EXPERIMENT = "raycls"  # MLflow experiment unless $MLFLOW_EXPERIMENT_NAME names another
MLFLOW_MISSING = "MLflow is not installed; pip install 'raycls[mlflow]'"


def command_lines(logdir: str | None, mlflow: dict[str, str] | None) -> list[str]:
    """The console's last tracking lines: how to look at what was logged."""
    lines = []
    if logdir:
        lines.append(f"[raycls] TensorBoard: tensorboard --logdir {logdir}")
    if mlflow:
        lines.append(f"[raycls] MLflow: run {mlflow['run_id']} in experiment "
                     f"{mlflow['experiment']!r} at {mlflow['uri']}")
    return lines


# ----------------------------------------------------------------------------- MLflow


def mlflow_uri(value: str = "") -> str:
    """The tracking URI asked for: the flag, else $MLFLOW_TRACKING_URI, else "" (off)."""
    return value or os.environ.get("MLFLOW_TRACKING_URI", "")


def open_client(uri: str):
    """An MlflowClient for `uri` (imports MLflow, whose INFO lines would land on the console)."""
    try:
        import mlflow  # noqa: F401 - configures MLflow's loggers, quieted below
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(f"mlflow_uri={uri}: {MLFLOW_MISSING}") from None
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def experiment_id(client) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def params_of(values: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, v if isinstance(v, str) else json.dumps(v)) for k, v in values.items()]


def find_run(client, experiment: str, directory: str):
    """The MLflow run tagged with this run or trial directory, or None."""
    quoted = directory.replace("'", "\\'")
    found = client.search_runs([experiment], filter_string=f"tags.`raycls.dir` = '{quoted}'",
                               max_results=1)
    return found[0] if found else None


def find_or_create(client, experiment: str, directory: str, name: str,
                   params: dict[str, Any], parent: str | None = None) -> str:
    """The MLflow run of the run or trial in `directory` (its tag `raycls.dir`): the one an
    earlier attempt made (a resume, a retried trial, a PBT restart) or a new one with `params`
    (MLflow params cannot change, so they are logged once)."""
    found = find_run(client, experiment, directory)
    if found:
        if found.info.status != "RUNNING":
            client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id
    tags = {"raycls.dir": directory}
    if parent:
        tags["mlflow.parentRunId"] = parent  # how MLflow nests runs
    run_id = client.create_run(experiment, tags=tags, run_name=name).info.run_id
    client.log_batch(run_id, params=params_of(params))
    return run_id


def config_params(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k != "mlflow_uri"}


class MlflowEpochs(UserCallback):
    """Ray Train callback (runs in the Train controller): each report's rank-0 metrics into the
    run's MLflow run, step = epoch. Finds (or makes) that run on its first report, so a Tune
    trial needs no MLflow import of its own; a failing store warns once and training goes on."""

    def __init__(self, uri: str, experiment: str, directory: str, name: str,
                 params: dict[str, Any], parent: str | None = None):
        self.uri, self.experiment, self.directory, self.name = uri, experiment, directory, name
        self.params, self.parent = params, parent
        self.client, self.run_id, self.failed = None, None, False

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        if self.failed or not metrics or "epoch" not in metrics[0]:
            return
        for attempt in range(3):  # trials share a sqlite store: a write can meet a lock
            try:
                if self.run_id is None:
                    self.client = open_client(self.uri)
                    self.run_id = find_or_create(self.client, self.experiment, self.directory,
                                                 self.name, self.params, self.parent)
                log_epoch(self.client, self.run_id, metrics[0])
                return
            except Exception as e:  # noqa: BLE001 - tracking must never stop training
                if attempt == 2:
                    self.failed = True
                    print(f"warning: MLflow logging stopped for {self.name}: {e}",
                          file=sys.stderr)
                else:
                    time.sleep(1.0)


def log_epoch(client, run_id: str, metrics: dict[str, Any]) -> None:
    from mlflow.entities import Metric

    now, step = int(time.time() * 1000), int(metrics["epoch"])
    values = [Metric(k, float(metrics[k]), now, step) for k in (*EPOCH_SCALARS, "epoch_time_s")
              if isinstance(metrics.get(k), int | float) and not isinstance(metrics[k], bool)]
    client.log_batch(run_id, metrics=values)


class TrainingRun:
    """The MLflow side of one `raycls train` run, held by the driver."""

    def __init__(self, cfg: TrainConfig, run_dir: Path):
        self.uri = mlflow_uri(cfg.mlflow_uri)
        self.client = open_client(self.uri)
        self.experiment = experiment_id(self.client)
        self.directory, self.name = str(run_dir), cfg.name
        self.run_id = find_or_create(self.client, self.experiment, self.directory, cfg.name,
                                     config_params(cfg))
        self.client.set_tag(self.run_id, "raycls.kind", "train")

    def callbacks(self) -> list[UserCallback]:
        return [MlflowEpochs(self.uri, self.experiment, self.directory, self.name, {})]

    def info(self) -> dict[str, str]:
        name = self.client.get_experiment(self.experiment).name
        return {"uri": self.uri, "experiment": name, "run_id": self.run_id}


def start_training(cfg: TrainConfig, run_dir: Path) -> TrainingRun | None:
    """The run's MLflow run when MLflow is asked for (None otherwise)."""
    uri = mlflow_uri(cfg.mlflow_uri)
    if not uri:
        return None
    with store_errors(uri):
        return TrainingRun(cfg, run_dir)


class store_errors:
    """An MLflow store that cannot be used when a run or search starts is one clear line (a
    ConfigError naming the URI), not MLflow's traceback; nothing has trained yet."""

    def __init__(self, uri: str):
        self.uri = uri

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> None:
        if error is not None and not isinstance(error, ConfigError | KeyboardInterrupt):
            first = (str(error).strip().splitlines() or [kind.__name__])[0][:300]
            raise ConfigError(f"mlflow_uri={self.uri}: the MLflow store cannot be used: "
                              f"{first}") from None


def end(run: Any, status: str) -> None:
    """Mark an MLflow run (TrainingRun or SearchRun) FINISHED, FAILED or KILLED."""
    if run is not None:
        try:
            run.client.set_terminated(run.run_id, status=status)
        except Exception as e:  # noqa: BLE001 - the run's own result matters more
            print(f"warning: could not end MLflow run {run.run_id}: {e}", file=sys.stderr)


def finish_training(cfg: TrainConfig, run_dir: Path, run: TrainingRun | None,
                    summary: dict[str, Any]) -> None:
    """At a run's end: its curves and result as artifacts, the run FINISHED, then the lines
    that say where to look."""
    if run is not None:
        for name in ("curves.png", "result.json", "raycls_config.json"):
            if (run_dir / name).is_file():
                run.client.log_artifact(run.run_id, str(run_dir / name))
        if summary.get("test_acc") is not None:
            run.client.log_metric(run.run_id, "test_acc", summary["test_acc"])
        end(run, "FINISHED")
        summary["mlflow"] = run.info()
    for line in command_lines(board_dir(cfg, run_dir), summary.get("mlflow")):
        print(line, flush=True)


# ----------------------------------------------------------------------------- searches


class SearchRun:
    """The MLflow parent run of a search, held by the search driver; trials nest under it."""

    def __init__(self, uri: str, exp: Path, name: str, settings: dict[str, Any]):
        self.uri = uri
        self.client = open_client(uri)
        self.experiment = experiment_id(self.client)
        params = {k: v for k, v in settings.items() if k != "mlflow_uri"}
        self.run_id = find_or_create(self.client, self.experiment, str(exp), name, params)
        self.client.set_tag(self.run_id, "raycls.kind", "search")


def start_search(settings: Any, exp: Path) -> dict[str, Any]:
    """What every trial needs for tracking (plain values: it travels to the trial actors)."""
    import dataclasses

    track: dict[str, Any] = {"exp": str(exp), "mlflow": None}
    uri = mlflow_uri(settings.mlflow_uri)
    if uri:
        with store_errors(uri):
            parent = SearchRun(uri, exp, settings.name, dataclasses.asdict(settings))
        track["mlflow"] = {"uri": uri, "experiment": parent.experiment, "parent": parent.run_id}
    return track


def trial_dir(exp: Path | str, trial_id: str) -> Path:
    return Path(exp) / f"trial-{trial_id}"  # as the search's trial_dirname_creator names it


def for_trial(track: dict[str, Any] | None, trial_id: str,
              cfg: TrainConfig) -> tuple[str | None, list[UserCallback]]:
    """(TensorBoard directory, Train callbacks) of one trial's Train run."""
    if not track:
        return None, []
    where = trial_dir(track["exp"], trial_id)
    callbacks: list[UserCallback] = []
    if track["mlflow"]:
        ml = track["mlflow"]
        callbacks.append(MlflowEpochs(ml["uri"], ml["experiment"], str(where), trial_id,
                                      config_params(cfg), parent=ml["parent"]))
    return (str(where) if cfg.tensorboard else None), callbacks


def finish_search(settings: Any, exp: Path, rows: list[dict[str, Any]],
                  summary: dict[str, Any]) -> None:
    """At a search's end: each trial's MLflow run ended with its status, the parent run given
    the reports and the exported bundle as artifacts; then the lines that say where to look."""
    uri = mlflow_uri(settings.mlflow_uri)
    if uri:
        try:
            summary["mlflow"] = close_search(uri, exp, settings.name, rows, summary)
        except Exception as e:  # noqa: BLE001 - the search's own result matters more
            print(f"warning: MLflow: the search's runs were not closed: {e}", file=sys.stderr)
    logdir = str(exp) if settings.base.get("tensorboard", True) else None
    for line in command_lines(logdir, summary.get("mlflow")):
        print(line, flush=True)


def close_search(uri: str, exp: Path, name: str, rows: list[dict[str, Any]],
                 summary: dict[str, Any]) -> dict[str, str]:
    parent = SearchRun(uri, exp, name, {})
    client = parent.client
    for rank, row in enumerate(rows, 1):
        found = find_run(client, parent.experiment, str(trial_dir(exp, row["trial_id"])))
        if found is None:  # a trial that never reported an epoch
            continue
        run_id = found.info.run_id
        client.set_tag(run_id, "raycls.status", row["status"])
        client.set_tag(run_id, "raycls.rank", str(rank))
        if rank == 1 and summary.get("best"):
            client.set_tag(run_id, "raycls.best", "true")
        client.set_terminated(run_id, status="FAILED" if row["status"] == "ERROR" else "FINISHED")
    for file in ("results.csv", "val_acc.png", "best_config.json", "best_policy_schedule.json"):
        if (exp / file).is_file():
            client.log_artifact(parent.run_id, str(exp / file))
    best = summary.get("best") or {}
    if best.get("test_acc") is not None:
        client.log_metric(parent.run_id, "best_test_acc", best["test_acc"])
    if best.get("val_acc") is not None:
        client.log_metric(parent.run_id, "best_val_acc", best["val_acc"])
    if summary.get("bundle"):
        client.log_artifacts(parent.run_id, summary["bundle"], artifact_path="bundle")
    client.set_terminated(parent.run_id,
                          status="FAILED" if summary["errors"] or not best else "FINISHED")
    return {"uri": uri, "experiment": client.get_experiment(parent.experiment).name,
            "run_id": parent.run_id}


# with tune_loggers(): read when Tuner.fit starts (raycls.search.run sets it for the fit only)
TUNE_LOGGER_ENV = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}


def tune_loggers() -> list:
    """A new search's Tune loggers: CSV and JSON (what a restored search reads back), passed
    explicitly, and Tune's switch that stops it adding its own tensorboardX logger, whose
    `ray/tune/*` charts would sit beside raycls's in every trial directory. Only for a new
    search: a restored one keeps the callbacks it was started with, and one started before
    raycls passed these must keep Tune's automatic CSV logger (it then gets Tune's charts too)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [CSVLoggerCallback(), JsonLoggerCallback()]
