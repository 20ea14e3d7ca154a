"""The driver side of a training run: fit Ray Train's TorchTrainer on it, test its best
checkpoint, write result.json and the curves.

Reads top to bottom: the TorchTrainer (`build_trainer`, shared with each Tune trial, and the
health-check interval its `fit` runs under), the run itself (`run_training`), then the test
accuracy of a checkpoint and the curves. The run's name and resumed config are
raycls.run_folder; what each worker runs is raycls.worker; the command is raycls.train.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raycls.augment import build_augment, load_policy_schedule
from raycls.checkpoints import rank_key, read_checkpoint_meta
from raycls.config import ConfigError, TrainConfig
from raycls.console import Console, collect_ray_logs, open_channel
from raycls.data import DataError, Dataset
from raycls.epoch import evaluate_batches
from raycls.ingest import RunData
from raycls.interrupt import Interrupted, fit_interruptibly, second_interrupt_exits
from raycls.ray_session import scoped_env
from raycls.run_error import RUN_ERROR_FILE, clear_run_error, read_run_error
from raycls.run_folder import (
    RunError,
    forget_unstarted_run,
    newest_epoch,
    resolve_run,
    starts_over,
    starts_over_note,
)
from raycls.runs import TRAIN_CONFIG, TRAIN_RESULT, mark_running
from raycls.worker import NO_FLIP_DATASETS, train_loop_per_worker


def build_trainer(cfg: TrainConfig, data: RunData, callbacks=None, console=None,
                  board_dir: str | None = None):
    """The TorchTrainer for a run; shared by `raycls train` and each Tune trial. `console`: the
    driver's queue for rank 0's lines and progress (None: rank 0 prints them). `board_dir`:
    where rank 0 writes TensorBoard event files (None: none)."""
    import ray.train

    extra: dict[str, Any] = {}
    if data.mode == "stream":  # ray: Train splits the Ray Datasets over the workers
        from raycls.stream import data_config

        loop_data = {"_stream_info": {**data.info, "counts": data.counts}}
        extra = {"datasets": data.datasets, "dataset_config": data_config()}
    else:
        loop_data = {"_data": data.memory_ref}
    if console is not None:
        loop_data["_console"] = console
    if board_dir:
        loop_data["_board"] = board_dir
    return _trainer_class()(
        train_loop_per_worker,
        train_loop_config={**cfg.to_dict(), **loop_data},
        **extra,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, "GPU": 1 if cfg.use_gpu else 0},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute="val_acc",
                checkpoint_score_order="max",
            ),
            callbacks=callbacks,
            # Ray Train logs every report with all its metrics at INFO; our epoch line says it
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def fast_health_checks():
    """RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5 for one `fit`, unless the user set it; restored after.

    Train V2's controller polls its workers every 2 s by default, and each report() waits for
    that poll (see raycls.worker.save_and_report), as does the end of the run: about 1.5 s lost
    per epoch and per run. 0.5 s measured 12-16 s instead of 24-25 s for a 2-epoch run on 2
    cores; the poll itself is cheap. No Train option sets it: the controller reads the variable
    (TrainController.__init__), and `fit` hands it over when it starts the controller
    (DataParallelTrainer._initialize_and_run_controller: get_env_vars_to_propagate, the
    controller's runtime_env), so the process needs it only while `fit` runs. Two overlapping
    fits in one process share the first one's setting: the second may end up with Train's 2 s.
    """
    return scoped_env({HEALTH_CHECK_ENV: "0.5"})


@functools.cache
def _trainer_class():
    """TorchTrainer whose `fit` runs under fast_health_checks: `raycls train` and every Tune trial
    (raycls.search calls `trainer.fit()` itself) alike. Made on first use, so that importing
    this module does not import Ray."""
    from ray.train.torch import TorchTrainer

    class RayclsTorchTrainer(TorchTrainer):
        def fit(self):
            with fast_health_checks():
                return super().fit()

    return RayclsTorchTrainer


def test_accuracy(checkpoint_dir: str, batches) -> tuple[float | None, float | None, int]:
    """(test_acc, test_loss, images) of a checkpoint over test batches, on this process's CPU;
    (None, None, 0) when the dataset has no test split."""
    from raycls.checkpoints import model_from_checkpoint

    model, meta = model_from_checkpoint(checkpoint_dir)
    mean = torch.tensor(meta["data"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(meta["data"]["std"]).view(1, -1, 1, 1)
    loss, correct, count = evaluate_batches(
        model, batches, mean=mean, std=std, device=torch.device("cpu")
    )
    if not count:
        return None, None, 0
    return correct / count, loss / count, count


def check_policies(cfg: TrainConfig, info: dict[str, Any]) -> None:
    """Build every augmentation policy of the run against the dataset now, not in every worker."""
    policies = [cfg.aug_policy]
    if cfg.aug_policy_file:
        policies += [p for _, p in load_policy_schedule(cfg.aug_policy_file)]
    for policy in policies:
        build_augment(policy, channels=info["channels"], image_size=info["image_size"],
                      allow_flip=info["name"] not in NO_FLIP_DATASETS)


def run_training(cfg: TrainConfig, resume: str | None = None, dataset: Dataset | None = None,
                 console: bool = False):
    """Train (or resume) one run and return its result dict (also written to result.json).
    `console`: rank 0's lines and progress come to this process and are shown here
    (raycls.console), and Ray's worker logs are collected into the run's ray.log."""
    import ray
    import ray.train

    from raycls import tracking
    from raycls.board import board_dir
    from raycls.ingest import prepare_data, test_batches

    cfg = resolve_run(cfg, resume)
    if starts_over(cfg, resume):
        print(f"[raycls] {starts_over_note(cfg)}", flush=True)
    data, ds = prepare_data(cfg, dataset)
    free = ray.cluster_resources().get("CPU", 0) - cfg.num_workers * cfg.cpus_per_worker
    if data.mode == "stream" and free < 1:
        raise RunError(
            f"streaming needs at least one CPU for Ray Data beside the {cfg.num_workers} "
            f"worker(s) x {cfg.cpus_per_worker} CPU(s), and the cluster has "
            f"{ray.cluster_resources().get('CPU', 0):g}: lower --num-workers, or start Ray with "
            "more CPUs (`ray start --num-cpus N`)"
        )
    check_policies(cfg, data.info)
    run_dir = Path(cfg.storage_path) / cfg.name
    mlflow_run = tracking.start_training(cfg, run_dir)  # None unless MLflow is asked for
    if "://" not in cfg.storage_path:
        run_dir.mkdir(parents=True, exist_ok=True)
        # a copy for people to read (and for `raycls runs` before the first checkpoint); what a
        # resume trains with is the config in the newest checkpoint's meta.json (resume_config)
        (run_dir / TRAIN_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2))
        mark_running(run_dir)  # driver.pid while this driver lives: `raycls runs` shows "running"
    print(
        f"[raycls] run {cfg.name}: {data.header()}, model {cfg.model}, "
        f"{cfg.num_workers} worker(s), {cfg.num_epochs} epochs, batch {cfg.batch_size} -> "
        f"{cfg.storage_path}/{cfg.name}" + (" (Ray's own logs: ray.log there)" if console else ""),
        flush=True,
    )
    t0 = time.perf_counter()
    clear_run_error(cfg)  # a resumed run starts without the error it stopped on
    queue = open_channel() if console else None
    view = Console(queue) if console else None
    trainer = build_trainer(cfg, data, console=queue, board_dir=board_dir(cfg, run_dir),
                            callbacks=mlflow_run.callbacks() if mlflow_run else None)
    try:
        result = fit_interruptibly(trainer, idle=view.drain if view else None)
    except KeyboardInterrupt:
        second_interrupt_exits()
        tracking.end(mlflow_run, "KILLED")
        kept = newest_epoch(run_dir) if "://" not in cfg.storage_path else None
        if kept == 0 and forget_unstarted_run(run_dir, cfg.storage_path):
            raise Interrupted("interrupted before the first epoch ended; nothing was kept (the "
                              "run folder is removed)") from None
        raise Interrupted(
            "interrupted; the run's checkpoints are kept"
            + (f" (newest: epoch {kept})" if kept else "") + ". Continue it with "
            f"`raycls train --resume {cfg.name} --storage-path {cfg.storage_path}`") from None
    except ray.train.TrainingFailedError as e:
        tracking.end(mlflow_run, "FAILED")
        logs = f" (Ray's logs: {run_dir / 'ray.log'})" if console else ""
        if not forget_unstarted_run(run_dir, cfg.storage_path):
            if "://" not in cfg.storage_path:  # `raycls runs` shows it failed, not interrupted
                (run_dir / RUN_ERROR_FILE).write_text(json.dumps({"training_error": str(e)}))
            raise RunError(
                f"training failed: {e}\nThe run's checkpoints are kept{logs}: continue it with "
                f"`raycls train --resume {cfg.name} --storage-path {cfg.storage_path}`"
            ) from None
        raise RunError(f"training failed before its first checkpoint: {e}") from None
    finally:
        if console and "://" not in cfg.storage_path:
            collect_ray_logs(run_dir)
    train_time = time.perf_counter() - t0
    stopped = read_run_error(cfg)  # a deterministic error the workers stopped on, not retried
    if stopped:
        tracking.end(mlflow_run, "FAILED")
    if "config_error" in stopped:
        forget_unstarted_run(run_dir, cfg.storage_path)
        raise ConfigError(stopped["config_error"])
    if "data_error" in stopped:
        raise DataError(stopped["data_error"])
    if not result.best_checkpoints:
        raise RunError("training produced no checkpoint")
    # the one order of checkpoints (rank_key: val_acc, then lower val_loss), as search and export
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: rank_key(cm[1]))
    with best_ckpt.as_directory() as d:
        test_acc, test_loss, test_count = test_accuracy(d, test_batches(data, ds))
    with result.checkpoint.as_directory() as d:  # the newest checkpoint holds the full history
        newest = read_checkpoint_meta(d)
    history = newest["history"]
    summary = {
        "name": cfg.name,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "test_images": test_count,
        "val_acc": best_metrics["val_acc"],
        "best_epoch": best_metrics["epoch"],
        "epochs": history[-1]["epoch"],
        "checkpoint": best_ckpt.path,
        "images_per_s": float(np.median([h["images_per_s"] for h in history])),
        "train_time_s": train_time,
        "data_mode": data.mode,
        "bad_images": newest.get("bad_images", []),
        "config": cfg.to_dict(),
        "classes": list(data.info["classes"]),
        "history": [{k: h[k] for k in HISTORY_KEYS} for h in history],
    }
    if "://" not in cfg.storage_path:
        plot_curves(history, run_dir / "curves.png", cfg.name)
        (run_dir / TRAIN_RESULT).write_text(json.dumps(summary, indent=2))
    tested = f"test_acc {test_acc:.4f}" if test_acc is not None else "no test split"
    print(
        f"[raycls] done: {tested} (best val_acc {summary['val_acc']:.4f} at epoch "
        f"{summary['best_epoch']}), {train_time:.1f}s; best checkpoint {summary['checkpoint']}",
        flush=True,
    )
    tracking.finish_training(cfg, run_dir, mlflow_run, summary)  # artifacts; where to look
    return summary


HISTORY_KEYS = ("epoch", "train_loss", "val_loss", "val_acc", "images_per_s", "epoch_time_s",
                "aug_policy", "start_epoch")


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = {k: [r[k] for r in history] for k in ("epoch", "train_loss", "val_loss", "val_acc")}
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(h["epoch"], h["train_loss"], label="train_loss")
    a.plot(h["epoch"], h["val_loss"], label="val_loss")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend()
    b.plot(h["epoch"], h["val_acc"], label="val_acc", color="tab:green")
    b.set_xlabel("epoch"), b.set_ylabel("accuracy"), b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def stream_cpus(cfg: TrainConfig) -> int:
    """CPUs a run needs: its workers', plus one for Ray Data when it streams."""
    from raycls.ingest import resolve_mode

    return cfg.num_workers * cfg.cpus_per_worker + (resolve_mode(cfg) == "stream")

