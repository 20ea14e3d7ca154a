"""Does augmentation dominate the training step? ms per batch of 256 for each policy, against one
resnet_small training step (forward, backward, SGD update) on the same batch and device.

    .venv/bin/python bench/augment_cost.py                 # CPU, all threads
    .venv/bin/python bench/augment_cost.py --threads 1     # CPU, one thread
    .venv/bin/python bench/augment_cost.py --device cuda   # GPU (times with synchronize)

Prints one table per image shape (28x28 grey, 32x32 RGB): median ms per batch over --repeats
timed calls after --warmup calls, and the share of (augment + step) the augmentation takes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from raycls.augment import build_augment, mix_batch
from raycls.models import build_model

POLICIES = [
    "none",
    "default",
    "crop4-flip",
    "cutout8",
    "rand-n2-m9",
    "trivial",
    "autoaug-cifar10",
    # a mid-search PBA policy: every op on with small probabilities
    "pba:rotate=0.2/5,shear_x=0.2/4,shear_y=0.1/4,translate_x=0.3/6,translate_y=0.3/6,"
    "brightness=0.2/5,contrast=0.2/5,color=0.2/5,sharpness=0.2/5,posterize=0.1/3,"
    "solarize=0.1/3,equalize=0.2/0,autocontrast=0.2/0,invert=0.1/0,cutout=0.3/6",
    "crop4-flip-rand-n2-m9-cutout8",
]


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def bench_shape(
    channels: int, size: int, args: argparse.Namespace, device: torch.device
) -> list[tuple[str, float]]:
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(args.batch_size, channels, size, size, generator=g, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), generator=g, device=device)

    model = build_model("resnet_small", 10, channels, size).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        opt.step()

    rows = [("resnet_small train step", time_ms(step, device, args.warmup, args.repeats))]
    for policy in POLICIES:
        # flip allowed for both shapes here: this measures cost, not what suits digits
        aug = build_augment(policy, channels=channels, image_size=size, allow_flip=True)
        label = aug.policy if aug.policy == policy else f"{policy} ({aug.policy})"
        rows.append((label, time_ms(lambda a=aug: a(images, g), device, 2, args.repeats)))
    for name, mix, cut in (("mixup (alpha 0.2)", 0.2, 0.0), ("cutmix (alpha 1.0)", 0.0, 1.0)):
        fn = lambda m=mix, c=cut: mix_batch(images, labels, 10, m, c, g)  # noqa: E731
        rows.append((name, time_ms(fn, device, 2, args.repeats)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch default")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default: 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls, median kept (default: 5)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible; use --device cpu")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}, median of {args.repeats}")  # fmt: skip
    for channels, size in ((1, 28), (3, 32)):
        rows = bench_shape(channels, size, args, device)
        step_ms = rows[0][1]
        print(f"\n{size}x{size}x{channels}  {'ms/batch':>9}  {'% of aug+step':>13}")
        for label, ms in rows:
            share = "" if label.startswith("resnet") else f"{100 * ms / (ms + step_ms):12.1f}%"
            print(f"  {label[:60]:60s} {ms:9.2f}  {share}")


if __name__ == "__main__":
    main()
