"""scaling: `raycls train` with 1 vs 2 workers (on a GPU machine: 1 vs all GPUs), images/s and
time to a validation accuracy.

    python bench/scaling.py --quick
    python bench/scaling.py --gpu

Same data (a Fashion-MNIST subset), model, global batch (split over the workers), epochs and seed.
Images/s is the figure Ray Train's workers report (all ranks together, steps only, first epoch
dropped); time to accuracy is the training clock (train + validation per epoch) until val_acc first
reaches the target. Runs alternate (1, 2, 1, 2 workers). On 2 CPU cores shared with everything else
two workers compete with each other for the same cores, so efficiency well below 2x is expected;
DAWNBench's small nets scaled at 51-86% from 1 to 4-8 GPUs.
"""

from __future__ import annotations

import time

import harness
from train_overhead import ray_run

from raycls.config import TrainConfig

SETTINGS = {  # mode -> (dataset, train images, epochs, rounds, val_acc target)
    "tiny": ("digits", 512, 2, 1, 0.3),
    # quick: one alternation (1 worker, 2 workers): every run pays ~12 s of fixed Ray Train
    # start-up and teardown here, so a second round would cost two more of those
    "quick": ("fashion-mnist", 4096, 3, 1, 0.70),
    "full": ("fashion-mnist", 30000, 5, 2, 0.87),
}


def main() -> None:
    args = harness.parser(__doc__.splitlines()[0]).parse_args()
    started = time.time()
    name, n_train, epochs, rounds, target = SETTINGS[harness.mode(args)]
    notes: list[str] = []
    if args.gpu:
        import torch

        many = max(1, torch.cuda.device_count())
        notes.append("--gpu path written but unmeasured here (no GPU on this machine)")
    else:
        many = 2
    ds = harness.subset(harness.load(name), n_train, n_val=2000, n_test=1000)
    harness.start_ray(num_cpus=max(2, many), env=None)
    base = TrainConfig(
        dataset=name, model="resnet_small", num_epochs=epochs, batch_size=256, lr=0.2,
        num_workers=1, cpus_per_worker=1, use_gpu=args.gpu, keep_checkpoints=1, max_failures=0,
    )  # fmt: skip
    runs = harness.alternate(
        {n: (lambda n=n: ray_run(ds, base.replace(num_workers=n))) for n in (1, many)}, rounds
    )

    def to_target(run) -> float | None:
        # ray_run keeps images/s and val_acc per epoch; the clock is rebuilt from images/s
        clock = 0.0
        for ips, acc in zip(run["images_per_s"], run["val_acc"], strict=True):
            clock += len(ds.train) / ips
            if acc >= target:
                return clock
        return None

    ips = {n: harness.median([x for r in rs for x in r["images_per_s"][1:]])
           for n, rs in runs.items()}  # fmt: skip
    tta = {n: [t for t in map(to_target, rs) if t is not None] for n, rs in runs.items()}
    unit = "GPU" if args.gpu else "CPU worker"
    cond = (f"{name} {len(ds.train)} images, resnet_small, global batch 256, {epochs} epochs, "
            f"{rounds} run(s) each, alternating; 1 thread per worker; 2 shared cores")  # fmt: skip
    rows = [
        harness.row(f"images/s with {many} {unit}s", ips[many], "images/s",
                    reference=f"1 {unit}", reference_value=ips[1], conditions=cond),
        harness.row(f"scaling efficiency, {many} {unit}s", ips[many] / ips[1] / many, "fraction",
                    reference="ideal 1.0 (DAWNBench small nets: 0.51-0.86)", conditions=cond),
    ]  # fmt: skip
    if tta[1] and tta[many]:
        rows.append(harness.row(
            f"seconds of training to val_acc {target:.0%}, {many} {unit}s",
            harness.median(tta[many]), "s", reference=f"1 {unit}",
            reference_value=harness.median(tta[1]), higher_is_better=False,
            conditions=cond + "; training steps only",
        ))  # fmt: skip
    else:
        notes.append(f"val_acc {target:.0%} not reached by every configuration: {tta}")
    details = {"runs": {str(k): v for k, v in runs.items()}, "time_to_target_s": tta}
    harness.write_result(args.out, "scaling", args, rows, details, notes, started)


if __name__ == "__main__":
    main()
