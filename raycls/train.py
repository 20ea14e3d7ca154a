"""Distributed training: a plain PyTorch loop per worker, run by Ray Train's TorchTrainer.

Reads top to bottom: the per-worker pieces (`train_one_epoch`, `evaluate`), the worker function
Ray Train runs on every rank (`train_loop_per_worker`), the driver (`run_training`) and the
`raycls train` command. The Ray-specific lines are few and marked `# ray:`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from raycls.augment import build_augment, load_policy_schedule, mix_batch, policy_for_epoch
from raycls.config import ConfigError, TrainConfig
from raycls.console import (
    Channel,
    Console,
    capture_driver_logs,
    collect_ray_logs,
    open_channel,
)
from raycls.data import DataError, Dataset, bad_images_message
from raycls.ingest import RunData
from raycls.interrupt import (
    EXIT_INTERRUPTED,
    Interrupted,
    fit_interruptibly,
    second_interrupt_exits,
)
from raycls.models import (
    CheckpointError,
    build_model,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
    verify_checkpoint,
)
from raycls.ray_session import add_address_argument, init_ray, shutdown_ray
from raycls.runs import TRAIN_CONFIG, TRAIN_ERROR, mark_running

# Datasets whose labels change under a mirror image (a flipped 2 is no digit): no random flips.
NO_FLIP_DATASETS = ("digits", "mnist")


class RunError(RuntimeError):
    """A run cannot start or finish as asked; the message says why and what to do."""


# ----------------------------------------------------------------------------- per-worker pieces


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float, scaled to [0, 1] then standardised per channel."""
    return (images.float().div_(255) - mean) / std


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
    """Linear warm-up to the peak lr over `warmup_epochs`, then cosine decay to zero."""
    total = cfg.num_epochs * steps_per_epoch
    warmup = max(1, int(cfg.warmup_epochs * steps_per_epoch)) if cfg.warmup_epochs else 0

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # no weight decay on norm layers and biases (1-d parameters), as in torchvision's references
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def memory_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, device):
    """Full batches of an in-memory shard: (uint8 images, labels, None = every row valid)."""
    for step in range(len(labels) // batch_size):
        sl = slice(step * batch_size, (step + 1) * batch_size)
        yield (images[sl].to(device, non_blocking=True), labels[sl].to(device, non_blocking=True),
               None)


def train_one_epoch(
    model, optimizer, scheduler, batches, *, cfg: TrainConfig, augment, mean, std,
    num_classes: int, device, generator: torch.Generator, on_step=None,
) -> tuple[float, int]:
    """One pass over this worker's batches of (uint8 (B, C, H, W), labels, valid mask or None).
    Rows masked invalid (files that did not decode) count for nothing. Returns (mean loss,
    images seen)."""
    model.train()
    total_loss, seen = 0.0, 0
    mixing = cfg.aug_mixup_alpha > 0 or cfg.aug_cutmix_alpha > 0
    for step, (x, y, valid) in enumerate(batches, 1):
        x = augment(x.float().div_(255), generator)  # (B, C, H, W) in [0, 1]
        x = (x - mean) / std
        target = y
        if mixing:
            x, target = mix_batch(
                x, y, num_classes, cfg.aug_mixup_alpha, cfg.aug_cutmix_alpha, generator
            )
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        losses = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing,
                                 reduction="none")
        n = len(y) if valid is None else int(valid.sum())
        loss = losses.mean() if valid is None else (losses * valid).sum() / max(1, n)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # every rank steps on every batch, masked or not: DDP stays in lockstep
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * n
        seen += n
        if on_step is not None:
            on_step(step, seen)
    return total_loss / max(1, seen), seen


@torch.no_grad()
def evaluate_batches(model, batches, *, mean, std, device, observe=None):
    """(sum of losses, number correct, count) over valid rows: summed so ranks can add.
    `observe(images, labels, predictions, valid)` sees every batch (tracking.Board)."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for images, y, valid in batches:
        x = normalise(images.to(device), mean, std)
        y = y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x).float()
        keep = torch.ones_like(y, dtype=torch.bool) if valid is None else valid.to(device)
        loss_sum += F.cross_entropy(logits[keep], y[keep], reduction="sum").item()
        correct += (logits.argmax(1) == y)[keep].sum().item()
        count += int(keep.sum())
        if observe is not None:
            observe(images, y, logits.argmax(1), keep)
    return loss_sum, correct, count


def evaluate(model, images, labels, *, mean, std, device, batch_size: int = 512):
    """evaluate_batches over in-memory arrays (the last partial batch included)."""
    batches = ((images[i : i + batch_size], labels[i : i + batch_size], None)
               for i in range(0, len(labels), batch_size))
    return evaluate_batches(model, batches, mean=mean, std=std, device=device)


def all_sum(values: list[float], device) -> list[float]:
    """Sum a few scalars over all ranks (no-op on a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def maybe_inject_failure(cfg: TrainConfig, epoch: int, rank: int, step: int = 0) -> None:
    """Test hook: `extra={"fail_at_epoch": E, "fail_mode": "raise"|"exit", "fail_marker": PATH}`
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


# ----------------------------------------------------------------------------- the worker


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
                    maybe_inject_failure(self.cfg, epoch, self.rank, step)
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


def record_ids_seam(cfg: TrainConfig, data: WorkerData, epoch: int) -> None:
    """Test seam, off unless `extra={"record_ids_dir": DIR}`: each rank writes the ids of the
    training images it was given in `epoch` (one file per rank and epoch, named by the time)."""
    folder = cfg.extra.get("record_ids_dir")
    if folder and data.streaming:
        ids = torch.cat(data.seen_ids).tolist() if data.seen_ids else []
        name = f"ids-e{epoch}-r{data.rank}-t{time.time_ns()}.json"
        Path(folder, name).write_text(json.dumps(ids))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs. `config` is TrainConfig.to_dict() plus `_data` (an
    object ref to the dataset arrays, loaded once by the driver) or `_stream_info` (the
    description of a dataset streamed through `ray.train.get_dataset_shard`)."""
    import ray
    import ray.train
    import ray.train.torch

    from raycls.tracking import Board

    cfg = TrainConfig.from_dict({k: v for k, v in config.items() if not k.startswith("_")})
    ctx = ray.train.get_context()  # ray:
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.cpus_per_worker)
    device = ray.train.torch.get_device()  # ray:
    data = WorkerData(config, cfg, rank, world, device)
    console = Channel(config.get("_console"), rank)  # rank 0's lines and progress
    info = data.info
    num_classes = len(info["classes"])
    mean = torch.tensor(info["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(info["std"], device=device).view(1, -1, 1, 1)

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
        return
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # ray: DDP wrapper, moves to device
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, data.steps_per_epoch))
    schedule = load_policy_schedule(cfg.aug_policy_file) if cfg.aug_policy_file else None
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)

    start_epoch, best_val_acc, stale, history, bad_images = 0, -1.0, 0, [], []
    checkpoint = ray.train.get_checkpoint()  # ray: set after a restart
    restore_dir = None
    if checkpoint is not None:
        restore_dir = checkpoint.to_directory()
    elif cfg.resume_from:
        restore_dir = cfg.resume_from  # Tune: PBT exploit or a retried trial
    if restore_dir:
        state, meta = load_checkpoint(restore_dir)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["rng"][rank % len(state["rng"])])
        start_epoch = meta["epoch"] + 1
        best_val_acc, stale = meta["best_val_acc"], meta["epochs_without_improvement"]
        history, bad_images = meta["history"], meta.get("bad_images", [])
        if rank == 0:
            console.line(f"resumed from {restore_dir} ({meta['epoch'] + 1} epochs done"
                + (", the interrupted epoch is read again from its start)"
                   if data.streaming else ")"))
    # TensorBoard: every rank counts val predictions, rank 0 writes (into `_board`, if given)
    board = Board(config.get("_board"), rank, start_epoch, info["classes"])

    mean_std = {"mean": mean, "std": std}
    for epoch in range(start_epoch, cfg.num_epochs):
        maybe_inject_failure(cfg, epoch, rank)
        policy = policy_for_epoch(schedule, epoch) if schedule else cfg.aug_policy
        augment = build_augment(
            policy, channels=info["channels"], image_size=info["image_size"],
            allow_flip=info["name"] not in NO_FLIP_DATASETS,
        )
        data.seen_ids = []
        t0, started = time.perf_counter(), time.monotonic()

        def on_step(step: int, images: int, epoch: int = epoch, started: float = started) -> None:
            console.progress(epoch + 1, cfg.num_epochs, step, data.steps_per_epoch,
                             images * world, started)  # every rank steps in lockstep

        train_loss, seen = train_one_epoch(
            model, optimizer, scheduler, data.train_batches(epoch), cfg=cfg,
            augment=augment, num_classes=num_classes, device=device, generator=generator,
            on_step=on_step, **mean_std,
        )
        train_time = time.perf_counter() - t0
        record_ids_seam(cfg, data, epoch)
        # the plain module, not DDP: DDP's forward syncs buffers (a collective), and val shares
        # may differ by a batch between ranks (seen here: a hang)
        val_loss, correct, count = evaluate_batches(
            unwrap(model), data.val_batches(), device=device, observe=board.observe, **mean_std
        )
        loss_sum, seen_all, val_loss, correct, count = all_sum(
            [train_loss * seen, seen, val_loss, correct, count], device
        )
        new_bad = [b for b in data.new_bad_images() if b not in bad_images]
        bad_images += new_bad
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(1, seen_all),
            "val_loss": val_loss / max(1, count),
            "val_acc": correct / max(1, count),
            "images_per_s": seen_all / max(train_time, 1e-9),  # all ranks step in lockstep
            "lr": scheduler.get_last_lr()[0],  # where the schedule ended this epoch
            "epoch_time_s": time.perf_counter() - t0,
            "train_time_s": train_time,
            "aug_policy": augment.policy,
            "start_epoch": start_epoch,  # epochs already done when this worker group started
            "bad_images": len(bad_images),
        }
        if new_bad and rank == 0:
            console.line(f"warning: skipped {len(new_bad)} unreadable image(s) in epoch "
                         f"{epoch + 1}: " + "; ".join(new_bad[:5])
                         + (" ..." if len(new_bad) > 5 else ""))
        if len(bad_images) > cfg.max_bad_images:
            # every rank saw the same gathered list, so all stop here together; a report
            # instead of an exception, so that Train does not retry what would fail again
            message = bad_images_message(cfg.dataset, bad_images, cfg.max_bad_images)
            stop_run(cfg, rank, "data_error", message, metrics)
            return
        improved = metrics["val_acc"] > best_val_acc
        best_val_acc, stale = max(best_val_acc, metrics["val_acc"]), 0 if improved else stale + 1
        stop_early = cfg.early_stop_patience and stale >= cfg.early_stop_patience
        metrics["should_stop"] = bool(stop_early)
        history.append(metrics)  # carried in every checkpoint, so restarts keep the whole story
        board.epoch(metrics, last=bool(stop_early) or epoch + 1 == cfg.num_epochs, device=device)

        rngs = gather_rng(generator, device, world)
        with tempfile.TemporaryDirectory(prefix="raycls-ckpt-") as tmp:
            ckpt = None
            if rank == 0:  # ray: rank 0 alone writes the checkpoint
                save_checkpoint(
                    tmp,
                    {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": rngs},
                    {"config": cfg.to_dict(), "data": info, "epoch": epoch, "metrics": metrics,
                     "best_val_acc": best_val_acc, "epochs_without_improvement": stale,
                     "history": history, "bad_images": bad_images},
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                console.line(
                    f"epoch {epoch + 1}/{cfg.num_epochs} "
                    f"train_loss {metrics['train_loss']:.4f} val_loss {metrics['val_loss']:.4f} "
                    f"val_acc {metrics['val_acc']:.4f} images/s {metrics['images_per_s']:.0f} "
                    f"time {metrics['epoch_time_s']:.1f}s aug {augment.policy}"
                )
            # ray: every rank reports every epoch. Synchronous on purpose: report returns once
            # the previous epoch's checkpoint reached the controller, so a crash never loses more
            # than one epoch (asynchronous upload saves up to ~2 s an epoch but can lose several).
            ray.train.report(metrics, checkpoint=ckpt)
        if stop_early:
            if rank == 0:
                console.line(f"early stop: no val_acc gain for {stale} epochs")
            break


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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def gather_rng(generator: torch.Generator, device, world: int) -> list[torch.Tensor]:
    """Every rank's augmentation RNG state, so a resumed run continues each rank's stream."""
    state = generator.get_state()
    if world == 1 or not dist.is_initialized():
        return [state]
    states = [torch.empty_like(state) for _ in range(world)]
    if device.type == "cuda":  # NCCL gathers CUDA tensors only
        moved = [s.to(device) for s in states]
        dist.all_gather(moved, state.to(device))
        return [s.cpu() for s in moved]
    dist.all_gather(states, state)
    return states


# ----------------------------------------------------------------------------- the driver


def new_run_name(cfg: TrainConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{cfg.dataset.split(':')[0]}-{cfg.model}-{stamp}-{secrets.token_hex(2)}"


def resolve_run(cfg: TrainConfig, resume: str | None) -> TrainConfig:
    """New runs get a unique name; a finished run is never silently reused."""
    storage = cfg.storage_path if "://" in cfg.storage_path else os.path.abspath(cfg.storage_path)
    if resume:
        run_dir = Path(storage) / resume
        if "://" not in storage and not run_dir.is_dir():
            runs = sorted(p.name for p in Path(storage).glob("*") if p.is_dir())[-3:]
            raise RunError(f"resume={resume}: no run directory {run_dir}; "
                           + (f"runs there: {', '.join(runs)}" if runs else
                              "start a new run without --resume"))
        if (run_dir / "result.json").exists():
            best = json.loads((run_dir / "result.json").read_text()).get("checkpoint", "")
            raise RunError(
                f"resume={resume}: the run already finished ({run_dir}/result.json); to train "
                f"it further, start a new run from its best checkpoint: `raycls train "
                f"--resume-from {best or run_dir / 'checkpoint_...'} --num-epochs N` (with the "
                "run's other flags)")
        for ckpt in sorted(run_dir.glob("checkpoint_*")):
            if (ckpt / "meta.json").exists():  # no meta.json = never finished, never used
                verify_checkpoint(ckpt)  # refuse to resume into a corrupted checkpoint
        saved = run_dir / TRAIN_CONFIG
        if saved.exists():  # resume with the run's own config, not today's defaults
            previous = json.loads(saved.read_text())
            cfg = TrainConfig.from_dict({**previous, "storage_path": storage, "name": resume})
        return cfg.replace(name=resume, storage_path=storage)
    name = cfg.name or new_run_name(cfg)
    run_dir = Path(storage) / name
    if "://" not in storage and run_dir.exists():
        finished = (run_dir / "result.json").exists()
        raise RunError(
            f"name={name}: the run already exists in {storage} "
            f"({'finished' if finished else 'unfinished'}); "
            + ("choose another --name" if finished else f"continue it with --resume {name}")
        )
    return cfg.replace(name=name, storage_path=storage)


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


def build_trainer(cfg: TrainConfig, data: RunData, callbacks=None, console=None,
                  board_dir: str | None = None):
    """The TorchTrainer for a run; shared by `raycls train` and each Tune trial. `console`: the
    driver's queue for rank 0's lines and progress (None: rank 0 prints them). `board_dir`:
    where rank 0 writes TensorBoard event files (None: none)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    # Train V2's controller polls its workers every 2 s by default, and each report() waits for
    # that poll (see train_loop_per_worker), as does the end of the run: about 1.5 s lost per
    # epoch and per run. 0.5 s measured 12-16 s instead of 24-25 s for a 2-epoch run on 2 cores;
    # the poll itself is cheap. Train passes this variable on to the controller it starts.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

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
    return TorchTrainer(
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


def test_accuracy(checkpoint_dir: str, batches) -> tuple[float | None, float | None, int]:
    """(test_acc, test_loss, images) of a checkpoint over test batches, on this process's CPU;
    (None, None, 0) when the dataset has no test split."""
    from raycls.models import model_from_checkpoint

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
    from raycls.ingest import prepare_data, test_batches

    cfg = resolve_run(cfg, resume)
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
    trainer = build_trainer(cfg, data, console=queue, board_dir=tracking.board_dir(cfg, run_dir),
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
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1]["val_acc"])
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
        (run_dir / "result.json").write_text(json.dumps(summary, indent=2))
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


# ----------------------------------------------------------------------------- the command

FLAG_HELP = {  # every TrainConfig field's flag; add_arguments appends the default
    "dataset": "digits | mnist | fashion-mnist | cifar10 | imagefolder:PATH | parquet:PATH "
    "(a file, folder, glob or s3:// / gs:// URI)",
    "data_dir": "folder holding mnist / fashion-mnist's IDX files or cifar10 (downloaded there "
    "when missing)",
    "image_size": "train at this many pixels a side; 0 = the dataset's native size (digits 8, "
    "mnist 28, cifar10 32; 32 for imagefolder/parquet)",
    "val_fraction": "share of the training split held out (seeded) for validation when the "
    "dataset has no val split",
    "seed": "seeds the split, the model init and the augmentation RNG",
    "data_mode": "auto | memory | stream: stream decodes with Ray Data on the fly (any size), "
    "memory decodes once into the object store; auto streams imagefolder/parquet only",
    "max_bad_images": "undecodable images skipped (and named) before the run stops",
    "model": "resnet_small, or any torchvision classification model by name (resnet18, "
    "mobilenet_v3_small, efficientnet_b0, convnext_tiny, ...)",
    "model_width": "channels of resnet_small's first stage (stages double it)",
    "pretrained": "torchvision weights file (.pth) to start from (torchvision models only)",
    "num_epochs": "epochs to train",
    "batch_size": "global batch, split evenly over the workers",
    "optimizer": "sgd (Nesterov momentum) or adamw",
    "lr": "peak learning rate (after warm-up) for the global batch",
    "momentum": "SGD momentum (adamw: beta1)",
    "weight_decay": "L2 weight decay",
    "warmup_epochs": "linear warm-up epochs, then cosine decay to 0",
    "label_smoothing": "cross-entropy label smoothing in [0, 1)",
    "aug_policy": "augmentation policy: 'none', 'default' (per dataset) or components joined by "
    "'-': crop<PAD>, flip, cutout<SIZE>, plus at most one of rand-n<N>-m<M 0-30>, trivial, "
    "autoaug-cifar10, pba:<op>=<prob>/<level>,...; e.g. crop4-flip-rand-n2-m9-cutout8",
    "aug_mixup_alpha": "Beta(alpha, alpha) mixup; 0 = off",
    "aug_cutmix_alpha": "Beta(alpha, alpha) cutmix; 0 = off",
    "aug_policy_file": "a PBA schedule JSON (from a search) to train with; overrides --aug-policy",
    "aug_crop_scale": "streaming: smallest image-area share a random training crop keeps "
    "(1 = whole image)",
    "num_workers": "Ray Train workers (data-parallel DDP ranks)",
    "use_gpu": "one GPU per worker (NCCL); else CPU workers (gloo)",
    "cpus_per_worker": "CPUs (and torch threads) per worker",
    "keep_checkpoints": "best checkpoints kept, ranked by val_acc",
    "early_stop_patience": "stop after this many epochs without a val_acc gain; 0 = never",
    "max_failures": "worker-group restarts allowed (Ray Train FailureConfig); -1 = unlimited",
    "storage_path": "where runs are written (local path, NFS or s3://)",
    "name": "run name (a folder under --storage-path); empty = a fresh unique one",
    "resume_from": "start a new run from this checkpoint folder (weights, optimizer, epoch); "
    "continues training a finished run",
    "tensorboard": "write TensorBoard event files (per-epoch scalars, confusion matrix, sample "
    "predictions) into the run folder: `tensorboard --logdir <storage-path>`",
    "mlflow_uri": "also log to MLflow at this tracking URI (e.g. sqlite:///mlflow.db or "
    "http://host:5000; needs `pip install 'raycls[mlflow]'`); empty = $MLFLOW_TRACKING_URI, "
    "else off",
}
CHOICES = {"optimizer": ("sgd", "adamw"), "data_mode": ("auto", "memory", "stream")}
SKIP_FLAGS = {"extra"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (kebab-case), with its default in the help."""
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in SKIP_FLAGS:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{FLAG_HELP[f.name]} (default: {default!r})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_text,
                                choices=CHOICES.get(f.name))
    parser.add_argument("--epochs", dest="num_epochs", type=int, help="alias of --num-epochs")
    parser.add_argument("--policy-file", dest="aug_policy_file", help="alias of --aug-policy-file")
    parser.add_argument("--resume", metavar="RUN", help="continue the unfinished run named RUN "
                        "(a folder under --storage-path) from its newest checkpoint, with its "
                        "own saved flags; a finished run: use --resume-from CHECKPOINT")
    parser.add_argument("--json", action="store_true", help="print result.json as the last line")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own output live (default: off: raycls's lines only; "
                        "Ray's go to the run's ray.log)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check every flag and input, print the run that would start, and "
                        "exit without starting Ray")
    add_address_argument(parser)


def stream_cpus(cfg: TrainConfig) -> int:
    """CPUs a run needs: its workers', plus one for Ray Data when it streams."""
    from raycls.ingest import resolve_mode

    return cfg.num_workers * cfg.cpus_per_worker + (resolve_mode(cfg) == "stream")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)} - SKIP_FLAGS
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return TrainConfig.from_dict(values)


def main(args: argparse.Namespace) -> int:
    from raycls.preflight import check_config

    try:  # everything that can be wrong with the flags, before Ray starts (exit 2)
        cfg = config_from_args(args)
        if not args.resume:  # a resumed run takes its own saved config (checked below)
            check_config(cfg)
        resolved = resolve_run(cfg, args.resume)
        if args.resume:
            check_config(resolved)
    except (ConfigError, RunError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"[raycls] dry run: the flags are valid; run {resolved.name} would train "
              f"{resolved.model} on {resolved.dataset}, {resolved.num_workers} worker(s), "
              f"{resolved.num_epochs} epochs -> {resolved.storage_path}/{resolved.name} "
              "(nothing was started)")
        if args.json:
            print(json.dumps(resolved.to_dict()))
        return 0
    try:
        init_ray(args.address, min_cpus=stream_cpus(cfg), log_to_driver=args.verbose)
        if not args.verbose:  # after ray.init, which sets up the "ray" logger afresh
            capture_driver_logs()  # Ray's driver-side warnings, kept for the run's ray.log
        summary = run_training(resolved, resume=args.resume, console=True)
    except Interrupted as e:
        shutdown_ray()  # this run's workers and, for a local Ray, every Ray process of it
        print(f"[raycls] {e}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except (RunError, DataError, CheckpointError, ConfigError, ValueError, ConnectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary))
    return 0
