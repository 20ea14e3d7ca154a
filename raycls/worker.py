"""What Ray Train runs on every rank: `train_loop_per_worker`, in named steps.

Reads top to bottom: the rank's data (`WorkerData`: its in-memory shard or its streaming
readers), then the steps the loop calls in order: `setup` (config, device, data, model,
optimizer), `restore` (from Train's checkpoint after a restart, or from `resume_from`),
`run_epoch` (train, evaluate, metrics) and `save_and_report` (rank 0's checkpoint and every
rank's `ray.train.report`). The PyTorch inside the steps is raycls.epoch; the Ray-specific
lines are few and marked `# ray:`. The loop is a module-level function, so that Train's
workers can import it.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raycls import test_seams
from raycls.augment import build_augment, load_policy_schedule, policy_for_epoch
from raycls.checkpoints import load_checkpoint, save_checkpoint
from raycls.config import TrainConfig
from raycls.console import Channel
from raycls.data import bad_images_message
from raycls.epoch import (
    all_sum,
    build_optimizer,
    evaluate_batches,
    gather_rng,
    lr_lambda,
    memory_batches,
    train_one_epoch,
    unwrap,
)
from raycls.models import build_model
from raycls.run_error import stop_run

# Datasets whose labels change under a mirror image (a flipped 2 is no digit): no random flips.
NO_FLIP_DATASETS = ("digits", "mnist")


class WorkerData:
    """One rank's data for the run: its in-memory shard or its streaming readers."""

    def __init__(self, config: dict[str, Any], cfg: TrainConfig, rank: int, world: int, device):
        import ray
        import ray.train

        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.streaming = "_data" not in config
        if self.streaming:
            from raycls.stream import ShardReader

            self.info = config["_stream_info"]
            # ray: each worker's share of the Ray Data pipelines (streaming_split)
            self.train = ShardReader(ray.train.get_dataset_shard("train"), self.info, device)
            self.val = ShardReader(ray.train.get_dataset_shard("val"), self.info, device)
            self.num_train = self.info["counts"]["train"]
        else:
            with warnings.catch_warnings():  # arrays from the object store are read-only
                warnings.simplefilter("ignore", UserWarning)
                data = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                        for k, v in ray.get(config["_data"]).items()}  # ray: object store
            self.info = data["info"]
            self.train_x, self.train_y = data["train_x"], data["train_y"]
            self.val_x, self.val_y = data["val_x"][rank::world], data["val_y"][rank::world]
            self.num_train = len(self.train_y)
        self.batch_size = max(1, min(cfg.batch_size_per_worker, self.num_train // world))
        if self.streaming:  # equal shares of num_train // world rows, the last batch partial
            self.steps_per_epoch = max(1, math.ceil(self.num_train // world / self.batch_size))
        else:
            self.steps_per_epoch = max(1, self.num_train // (self.batch_size * world))

    def train_batches(self, epoch: int):
        """This rank's batches of epoch `epoch`: a different order every epoch, seeded."""
        seed = self.cfg.seed * 100_003 + epoch
        if self.streaming:
            batches = self.train.epoch(self.batch_size, shuffle_seed=seed + self.rank)
            for step, b in enumerate(batches):
                if step:
                    test_seams.maybe_inject_failure(self.cfg, epoch, self.rank, step)
                self.seen_ids.append(b["ids"])
                yield b["images"], b["labels"], b["valid"]
            return
        # the same permutation on every rank, then each takes its own slice
        order = torch.randperm(self.num_train, generator=torch.Generator().manual_seed(seed))
        shard = order[: self.steps_per_epoch * self.batch_size * self.world][self.rank::self.world]
        yield from memory_batches(self.train_x[shard], self.train_y[shard], self.batch_size,
                                  self.device)

    def val_batches(self):
        if self.streaming:
            for b in self.val.epoch(512):
                yield b["images"], b["labels"], b["valid"]
            return
        for i in range(0, len(self.val_y), 512):
            yield self.val_x[i : i + 512], self.val_y[i : i + 512], None

    def new_bad_images(self) -> list[str]:
        """Undecodable files this epoch met on any rank (every rank gets the same list)."""
        if not self.streaming:
            return []
        mine = self.train.bad + self.val.bad
        self.train.bad.clear(), self.val.bad.clear()
        if self.world == 1 or not dist.is_initialized():
            return sorted(set(mine))
        gathered: list[list[str]] = [[] for _ in range(self.world)]
        dist.all_gather_object(gathered, mine)
        return sorted({b for part in gathered for b in part})

    seen_ids: list[torch.Tensor]


@dataclasses.dataclass
class Worker:
    """One rank's run: what `setup` builds and every later step reads and advances."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    data: WorkerData
    console: Channel  # rank 0's lines and progress
    mean: torch.Tensor  # (1, C, 1, 1)
    std: torch.Tensor  # (1, C, 1, 1)
    model: torch.nn.Module  # DDP-wrapped (prepare_model); unwrap() for the plain module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    schedule: list | None  # a PBA policy schedule (--aug-policy-file), else None
    generator: torch.Generator  # this rank's augmentation RNG, checkpointed per rank
    start_epoch: int = 0  # epochs already done when this worker group started
    best_val_acc: float = -1.0
    stale: int = 0  # epochs without a val_acc gain
    history: list[dict] = dataclasses.field(default_factory=list)
    bad_images: list[str] = dataclasses.field(default_factory=list)
    board: Any = None  # raycls.board.Board

    @property
    def info(self) -> dict[str, Any]:
        return self.data.info


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs. `config` is TrainConfig.to_dict() plus `_data` (an
    object ref to the dataset arrays, loaded once by the driver) or `_stream_info` (the
    description of a dataset streamed through `ray.train.get_dataset_shard`)."""
    from raycls.board import Board

    w = setup(config)
    if w is None:
        return  # the model cannot be built: stop_run told the driver, on every rank
    restore(w)
    # TensorBoard: every rank counts val predictions, rank 0 writes (into `_board`, if given)
    w.board = Board(config.get("_board"), w.rank, w.start_epoch, w.info["classes"])
    for epoch in range(w.start_epoch, w.cfg.num_epochs):
        test_seams.maybe_inject_failure(w.cfg, epoch, w.rank)
        metrics = run_epoch(w, epoch)
        if metrics is None:
            return  # too many unreadable images: stop_run ended the run on every rank
        save_and_report(w, epoch, metrics)
        if metrics["should_stop"]:
            if w.rank == 0:
                w.console.line(f"early stop: no val_acc gain for {w.stale} epochs")
            break


def setup(config: dict[str, Any]) -> Worker | None:
    """Config, device, data, model, optimizer, schedule and RNG of this rank; None (after
    stop_run) when the model cannot be built."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict({k: v for k, v in config.items() if not k.startswith("_")})
    ctx = ray.train.get_context()  # ray:
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.cpus_per_worker)  # this worker process's CPUs
    device = ray.train.torch.get_device()  # ray:
    data = WorkerData(config, cfg, rank, world, device)
    info = data.info
    num_classes = len(info["classes"])

    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts it)
    try:
        model = build_model(
            cfg.model, num_classes, info["channels"], info["image_size"], cfg.model_width,
            cfg.pretrained,
        ).to(device)
    except (ValueError, TypeError, OSError) as e:
        # the same on every rank and every retry: a report, not an exception, so that Train
        # does not restart the worker group --max-failures times for nothing
        stop_run(cfg, rank, "config_error", f"model={cfg.model}: cannot be built for "
                 f"{info['channels']}x{info['image_size']}px images and {num_classes} classes "
                 f"({e})")
        return None
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # ray: DDP wrapper, moves to device
    optimizer = build_optimizer(cfg, model)
    return Worker(
        cfg=cfg, rank=rank, world=world, device=device, data=data,
        console=Channel(config.get("_console"), rank),
        mean=torch.tensor(info["mean"], device=device).view(1, -1, 1, 1),
        std=torch.tensor(info["std"], device=device).view(1, -1, 1, 1),
        model=model, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                    lr_lambda(cfg, data.steps_per_epoch)),
        schedule=load_policy_schedule(cfg.aug_policy_file) if cfg.aug_policy_file else None,
        generator=torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank),
    )


def restore(w: Worker) -> None:
    """Continue from Train's checkpoint after a restart, else from `resume_from` (a new run
    from a checkpoint; Tune: PBT exploit or a retried trial); nothing to do for a fresh run."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()  # ray: set after a restart
    if checkpoint is not None:
        # as_directory, not to_directory: a local checkpoint is read where it is. to_directory
        # copies it into one temp folder per node, and a second rank's copy can overwrite the
        # file while the first rank loads it (seen here: "checkpoint.pt: cannot be loaded")
        with checkpoint.as_directory() as restore_dir:  # ray:
            state, meta = load_checkpoint(restore_dir)
    elif w.cfg.resume_from:
        restore_dir = w.cfg.resume_from
        state, meta = load_checkpoint(restore_dir)
    else:
        return
    unwrap(w.model).load_state_dict(state["model"])
    w.optimizer.load_state_dict(state["optimizer"])
    w.scheduler.load_state_dict(state["scheduler"])
    w.generator.set_state(state["rng"][w.rank % len(state["rng"])])
    w.start_epoch = meta["epoch"] + 1
    w.best_val_acc, w.stale = meta["best_val_acc"], meta["epochs_without_improvement"]
    w.history, w.bad_images = meta["history"], meta.get("bad_images", [])
    if w.rank == 0:
        w.console.line(f"resumed from {restore_dir} ({meta['epoch'] + 1} epochs done"
                       + (", the interrupted epoch is read again from its start)"
                          if w.data.streaming else ")"))


def run_epoch(w: Worker, epoch: int) -> dict[str, Any] | None:
    """Train one epoch, evaluate, and return the epoch's metrics (summed over the ranks);
    None (after stop_run) when the run met more unreadable images than it may skip."""
    cfg, data, info, mean_std = w.cfg, w.data, w.info, {"mean": w.mean, "std": w.std}
    policy = policy_for_epoch(w.schedule, epoch) if w.schedule else cfg.aug_policy
    augment = build_augment(
        policy, channels=info["channels"], image_size=info["image_size"],
        allow_flip=info["name"] not in NO_FLIP_DATASETS,
    )
    data.seen_ids = []
    t0, started = time.perf_counter(), time.monotonic()

    def on_step(step: int, images: int) -> None:
        w.console.progress(epoch + 1, cfg.num_epochs, step, data.steps_per_epoch,
                           images * w.world, started)  # every rank steps in lockstep

    train_loss, seen = train_one_epoch(
        w.model, w.optimizer, w.scheduler, data.train_batches(epoch), cfg=cfg,
        augment=augment, num_classes=len(info["classes"]), device=w.device,
        generator=w.generator, on_step=on_step, **mean_std,
    )
    train_time = time.perf_counter() - t0
    test_seams.record_ids(cfg, data, epoch)
    # the plain module, not DDP: DDP's forward syncs buffers (a collective), and val shares
    # may differ by a batch between ranks (seen here: a hang)
    val_loss, correct, count = evaluate_batches(
        unwrap(w.model), data.val_batches(), device=w.device, observe=w.board.observe, **mean_std
    )
    loss_sum, seen_all, val_loss, correct, count = all_sum(
        [train_loss * seen, seen, val_loss, correct, count], w.device
    )
    new_bad = [b for b in data.new_bad_images() if b not in w.bad_images]
    w.bad_images += new_bad
    metrics = {
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(1, seen_all),
        "val_loss": val_loss / max(1, count),
        "val_acc": correct / max(1, count),
        "images_per_s": seen_all / max(train_time, 1e-9),  # all ranks step in lockstep
        "lr": w.scheduler.get_last_lr()[0],  # where the schedule ended this epoch
        "epoch_time_s": time.perf_counter() - t0,
        "train_time_s": train_time,
        "aug_policy": augment.policy,
        "start_epoch": w.start_epoch,  # epochs already done when this worker group started
        "bad_images": len(w.bad_images),
    }
    if new_bad and w.rank == 0:
        w.console.line(f"warning: skipped {len(new_bad)} unreadable image(s) in epoch "
                       f"{epoch + 1}: " + "; ".join(new_bad[:5])
                       + (" ..." if len(new_bad) > 5 else ""))
    if len(w.bad_images) > cfg.max_bad_images:
        # every rank saw the same gathered list, so all stop here together; a report
        # instead of an exception, so that Train does not retry what would fail again
        message = bad_images_message(cfg.dataset, w.bad_images, cfg.max_bad_images)
        stop_run(cfg, w.rank, "data_error", message, metrics)
        return None
    improved = metrics["val_acc"] > w.best_val_acc
    w.best_val_acc = max(w.best_val_acc, metrics["val_acc"])
    w.stale = 0 if improved else w.stale + 1
    stop_early = cfg.early_stop_patience and w.stale >= cfg.early_stop_patience
    metrics["should_stop"] = bool(stop_early)
    w.history.append(metrics)  # carried in every checkpoint, so restarts keep the whole story
    w.board.epoch(metrics, last=bool(stop_early) or epoch + 1 == cfg.num_epochs, device=w.device)
    return metrics


def save_and_report(w: Worker, epoch: int, metrics: dict[str, Any]) -> None:
    """Rank 0 writes the epoch's checkpoint (with the run's config, so that resume and export
    need nothing else) and prints the epoch line; every rank reports the metrics."""
    import ray.train

    rngs = gather_rng(w.generator, w.device, w.world)  # a collective: every rank takes part
    with tempfile.TemporaryDirectory(prefix="raycls-ckpt-") as tmp:
        ckpt = None
        if w.rank == 0:  # ray: rank 0 alone writes the checkpoint
            save_checkpoint(
                tmp,
                {"model": unwrap(w.model).state_dict(), "optimizer": w.optimizer.state_dict(),
                 "scheduler": w.scheduler.state_dict(), "rng": rngs},
                {"config": w.cfg.to_dict(), "data": w.info, "epoch": epoch, "metrics": metrics,
                 "best_val_acc": w.best_val_acc, "epochs_without_improvement": w.stale,
                 "history": w.history, "bad_images": w.bad_images},
            )
            ckpt = ray.train.Checkpoint.from_directory(tmp)
            w.console.line(
                f"epoch {epoch + 1}/{w.cfg.num_epochs} "
                f"train_loss {metrics['train_loss']:.4f} val_loss {metrics['val_loss']:.4f} "
                f"val_acc {metrics['val_acc']:.4f} images/s {metrics['images_per_s']:.0f} "
                f"time {metrics['epoch_time_s']:.1f}s aug {metrics['aug_policy']}"
            )
        # ray: every rank reports every epoch. Synchronous on purpose: report returns once
        # the previous epoch's checkpoint reached the controller, so a crash never loses more
        # than one epoch (asynchronous upload saves up to ~2 s an epoch but can lose several).
        ray.train.report(metrics, checkpoint=ckpt)
