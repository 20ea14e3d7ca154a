"""train_overhead: images/s of `raycls train` (Ray Train, 1 worker) vs a plain PyTorch loop, and
the step time with vs without augmentation.

    python bench/train_overhead.py --quick

Same model (resnet_small), data (a Fashion-MNIST subset), global batch, augmentation policy and
thread count on both sides. Ray's side is `raycls.trainer.run_training` exactly as `raycls train`
runs it; its images/s is the per-epoch figure the worker reports (training steps only, setup
excluded, as in Ray's own benchmark). The plain side is the loop a user would write, in this
process. Runs alternate (Ray, plain, Ray, plain); the first epoch of each run is warm-up and is
dropped; the ratio is of the medians.

The augmentation part times one training step on a fixed batch with the dataset's default policy
vs `none` (and, for reference, CIFAR-shaped images and a RandAugment policy), alternating blocks.
"""

from __future__ import annotations

import time
from typing import Any

import harness
import torch
import torch.nn.functional as F

from raycls.augment import build_augment
from raycls.config import TrainConfig
from raycls.epoch import build_optimizer, lr_lambda
from raycls.models import build_model
from raycls.worker import NO_FLIP_DATASETS

SETTINGS = {  # mode -> (dataset, train images, epochs per run, rounds, aug steps per block)
    "tiny": ("digits", 512, 2, 1, 3),
    # quick: each `raycls train` run costs ~12 s of Ray Train start-up and teardown here whatever
    # the data size; epochs of ~3 s (4,096 images) keep one scheduler hiccup from deciding a ratio
    "quick": ("fashion-mnist", 4096, 3, 2, 5),
    "full": ("fashion-mnist", 30000, 5, 3, 20),
}
# (channels, size, policy, target): the default policy at the dataset's shape and at CIFAR's;
# RandAugment (no target, for reference) outside --quick
AUG_CASES = {"quick": ((None, None, "default", 1.15), (3, 32, "default", 1.15))}


# ----------------------------------------------------------------------------- the plain loop


def plain_run(ds, cfg: TrainConfig) -> dict[str, Any]:
    """The single-process loop a user writes instead: per-epoch images/s, as Ray's worker counts
    it (training steps only), and the wall time of the whole run (setup and validation too)."""
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.cpus_per_worker)  # what the Ray worker does with its CPUs
    torch.manual_seed(cfg.seed)
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    model = build_model(cfg.model, len(ds.classes), ds.channels, ds.image_size, cfg.model_width)
    batch = cfg.batch_size
    steps = len(ds.train) // batch
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    augment = build_augment(cfg.aug_policy, channels=ds.channels, image_size=ds.image_size,
                            allow_flip=ds.name not in NO_FLIP_DATASETS)  # fmt: skip
    generator = torch.Generator().manual_seed(cfg.seed)
    per_epoch, val_acc = [], []
    for _epoch in range(cfg.num_epochs):
        model.train()
        order = torch.randperm(len(ds.train), generator=generator)
        t0 = time.perf_counter()
        for step in range(steps):
            idx = order[step * batch : (step + 1) * batch]
            x = augment(ds.train.images[idx].float().div_(255), generator)  # (B, C, H, W)
            loss = F.cross_entropy(model((x - mean) / std), ds.train.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        per_epoch.append(steps * batch / (time.perf_counter() - t0))
        model.eval()
        with torch.no_grad():
            logits = model((ds.val.images.float() / 255 - mean) / std)
        val_acc.append(float((logits.argmax(1) == ds.val.labels).float().mean()))
    return {"images_per_s": per_epoch, "val_acc": val_acc,
            "wall_s": time.perf_counter() - t_start}  # fmt: skip


def ray_run(ds, cfg: TrainConfig) -> dict[str, Any]:
    """`raycls train` through its Python entry point, on the Ray started by this process."""
    with harness.training_run(ds, cfg) as (summary, wall, _):
        history = summary["history"]
    return {"images_per_s": [h["images_per_s"] for h in history],
            "val_acc": [h["val_acc"] for h in history], "wall_s": wall}  # fmt: skip


# ----------------------------------------------------------------------------- augmentation


def step_ms(channels: int, size: int, policy: str, steps: int, rounds: int) -> dict[str, Any]:
    """Median ms of one training step (batch 128) with `policy` vs without, alternating blocks."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(128, channels, size, size, generator=g)
    labels = torch.randint(0, 10, (128,), generator=g)
    model = build_model("resnet_small", 10, channels, size).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    augs = {
        "none": build_augment("none", channels=channels, image_size=size, allow_flip=True),
        "aug": build_augment(policy, channels=channels, image_size=size, allow_flip=True),
    }

    def block(aug) -> list[float]:
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            x = (aug(images, g) - 0.5) / 0.25
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), labels).backward()
            opt.step()
            out.append((time.perf_counter() - t0) * 1000)
        return out

    block(augs["aug"])  # warm-up both paths
    block(augs["none"])
    samples = harness.alternate({k: lambda a=a: block(a) for k, a in augs.items()}, rounds)
    # the augmentation alone, for the profile of where the step's time goes
    aug_only = []
    for _ in range(steps):
        t0 = time.perf_counter()
        augs["aug"](images, g)
        aug_only.append((time.perf_counter() - t0) * 1000)
    return {
        "policy": augs["aug"].policy,
        "shape": [channels, size, size],
        "with_ms": harness.median(samples["aug"]),
        "without_ms": harness.median(samples["none"]),
        "augment_only_ms": harness.median(aug_only),
        "samples": samples,
    }


# ----------------------------------------------------------------------------- main


def main() -> None:
    args = harness.parser(__doc__.splitlines()[0]).parse_args()
    started = time.time()
    mode = harness.mode(args)
    name, n_train, epochs, rounds, aug_steps = SETTINGS[mode]
    rows, notes, details = [], [], {}

    ds = harness.subset(harness.load(name), n_train, n_val=1000, n_test=1000)
    cfg = TrainConfig(
        dataset=name, model="resnet_small", num_epochs=epochs, batch_size=128, num_workers=1,
        cpus_per_worker=1, use_gpu=False, keep_checkpoints=1, max_failures=0,
        aug_policy="default", lr=0.05,
    )  # fmt: skip
    harness.start_ray(num_cpus=2)
    ray_plain = harness.alternate(
        {"ray": lambda: ray_run(ds, cfg), "plain": lambda: plain_run(ds, cfg)}, rounds
    )
    # drop each run's first (warm-up) epoch
    ips = {k: [x for r in runs for x in r["images_per_s"][1:]] for k, runs in ray_plain.items()}
    walls = {k: [r["wall_s"] for r in runs] for k, runs in ray_plain.items()}
    details["runs"] = ray_plain
    cond = (
        f"{name} {len(ds.train)} images 1x{ds.image_size}x{ds.image_size}, resnet_small, "
        f"batch 128, aug default, 1 thread, {epochs} epochs x {rounds} alternating runs each, "
        "first epoch dropped, median"
    )
    rows.append(harness.row(
        "raycls train (Ray Train, 1 worker) images/s", harness.median(ips["ray"]), "images/s",
        reference="plain PyTorch loop, same process setup",
        reference_value=harness.median(ips["plain"]), target=0.95, conditions=cond,
    ))  # fmt: skip
    rows.append(harness.row(
        f"raycls train wall time, {epochs} epochs (setup, validation, checkpoints included)",
        harness.median(walls["ray"]), "s", reference="plain loop wall time",
        reference_value=harness.median(walls["plain"]), higher_is_better=False, conditions=cond,
    ))  # fmt: skip

    cases = AUG_CASES.get(mode, ((None, None, "default", 1.15), (3, 32, "default", 1.15),
                                 (3, 32, "rand-n2-m9", None)))  # fmt: skip
    for channels, size, policy, target in cases:
        channels, size = channels or ds.channels, size or ds.image_size
        r = step_ms(channels, size, policy, aug_steps, rounds + 1)
        details[f"aug_{channels}x{size}_{policy}"] = r
        rows.append(harness.row(
            f"train step with augmentation `{r['policy']}` ({channels}x{size}x{size})",
            r["with_ms"], "ms", reference="same step, no augmentation",
            reference_value=r["without_ms"], higher_is_better=False, target=target,
            conditions=f"batch 128, resnet_small, 1 thread, median of {aug_steps} steps x "
            f"{rounds + 1} alternating blocks; augmentation alone {r['augment_only_ms']:.1f} ms",
        ))  # fmt: skip
    harness.write_result(args.out, "train_overhead", args, rows, details, notes, started)


if __name__ == "__main__":
    main()
