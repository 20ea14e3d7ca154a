"""The `raycls train` command: one flag per TrainConfig field, checked before Ray starts.

The run itself is raycls.run_folder (its name, resumed config), raycls.trainer (the driver) and
raycls.worker (what every rank runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from raycls.checkpoints import CheckpointError
from raycls.config import ConfigError, TrainConfig
from raycls.console import capture_driver_logs
from raycls.data import DataError
from raycls.interrupt import EXIT_INTERRUPTED, Interrupted
from raycls.ray_session import add_address_argument, init_ray, shutdown_ray
from raycls.run_folder import RunError, resolve_run, starts_over, starts_over_note
from raycls.trainer import run_training, stream_cpus

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
                        "(a folder under --storage-path) from its newest checkpoint, with the "
                        "config saved in that checkpoint (training flags given with it are "
                        "ignored); a finished run: use --resume-from CHECKPOINT")
    parser.add_argument("--json", action="store_true", help="print result.json as the last line")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own output live (default: off: raycls's lines only; "
                        "Ray's go to the run's ray.log)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check every flag and input, print the run that would start, and "
                        "exit without starting Ray")
    add_address_argument(parser)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)} - SKIP_FLAGS
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return TrainConfig.from_dict(values)


def main(args: argparse.Namespace) -> int:
    from raycls.preflight import check_config

    try:  # everything that can be wrong with the flags, before Ray starts (exit 2)
        cfg = config_from_args(args)
        if not args.resume:  # a resumed run takes its newest checkpoint's config (checked below)
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
        if starts_over(resolved, args.resume):
            print(f"[raycls] {starts_over_note(resolved)}")
        if args.json:
            print(json.dumps(resolved.to_dict()))
        return 0
    try:
        init_ray(args.address, min_cpus=stream_cpus(resolved), log_to_driver=args.verbose)
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
