"""What every benchmark script shares: side-by-side timing, the JSON result format, the machine.

The machines are shared and noisy, so every figure is a ratio against a reference measured in the
same run: `alternate` runs A and B in turns (A B A B ...) and the medians are compared. A result is
one JSON file `bench/results/<name>.json`:

    {"name", "quick", "command", "hardware", "started", "wall_s",
     "rows": [{"figure", "value", "unit", "reference", "reference_value", "ratio",
               "target", "met", "conditions"}, ...],
     "details": {... raw samples, per-configuration numbers ...},
     "notes": [why a target was missed, what was skipped, ...]}

`bench/run.py` collects the rows of every result into `bench/RESULTS.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DATASETS = REPO.parent / "shared" / "datasets"
RESULTS = BENCH / "results"

# dataset registry name -> folder under ../shared/datasets
DATASET_DIRS = {"mnist": "mnist", "fashion-mnist": "fashion-mnist", "cifar10": "cifar10"}


class BenchSkip(RuntimeError):
    """A benchmark (or one part of it) cannot run here; the message says why."""


# ----------------------------------------------------------------------------- arguments


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="the short run of run.py --quick")
    p.add_argument(
        "--tiny", action="store_true", help="smallest possible run (tests): checks plumbing only"
    )
    p.add_argument("--gpu", action="store_true", help="use the GPU paths (default: CPU)")
    p.add_argument("--out", default=str(RESULTS), help=f"result folder (default: {RESULTS})")
    return p


def mode(args: argparse.Namespace) -> str:
    return "tiny" if args.tiny else "quick" if args.quick else "full"


# ----------------------------------------------------------------------------- timing


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def alternate(
    fns: dict[str, Callable[[], float | list[float]]], rounds: int
) -> dict[str, list[float]]:
    """Call each function in turn, `rounds` times (A B A B ...); collect what each returns.

    A function returns one sample or a list of samples (e.g. per-epoch images/s)."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            got = fn()
            samples[name].extend(got if isinstance(got, list) else [got])
    return samples


def ratio(value: float, reference: float) -> float:
    return float(value / reference) if reference else float("nan")


def row(
    figure: str,
    value: float | None,
    unit: str,
    *,
    reference: str = "",
    reference_value: float | None = None,
    higher_is_better: bool = True,
    target: float | None = None,
    conditions: str = "",
) -> dict[str, Any]:
    """One line of RESULTS.md. `target` applies to the ratio (value / reference_value), or to the
    value itself when there is no reference."""
    r = None
    if value is not None and reference_value:
        r = ratio(value, reference_value)
    judged = r if r is not None else value
    met = None
    if target is not None and judged is not None:
        met = bool(judged >= target) if higher_is_better else bool(judged <= target)
    return {
        "figure": figure,
        "value": value,
        "unit": unit,
        "reference": reference,
        "reference_value": reference_value,
        "ratio": r,
        "target": target,
        "higher_is_better": higher_is_better,
        "met": met,
        "conditions": conditions,
    }


# ----------------------------------------------------------------------------- the machine


def hardware() -> dict[str, Any]:
    """CPU model, cores, memory, load and library versions: the conditions of every figure."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()
        info["memory_gb"] = round(int(mem[1]) / 1e6, 1)
        info["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    from importlib import metadata

    for pkg in ("torch", "onnxruntime", "ray"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = "not installed"
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
    except ImportError:
        pass
    return info


def command_line() -> str:
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass
    args = [a for i, a in enumerate(sys.argv[1:]) if not _is_out_arg(sys.argv[1:], i)]
    return " ".join(["python", str(script), *args])


def _is_out_arg(argv: list[str], i: int) -> bool:
    # the output folder is where, not what: leave it out of the reproducible command
    return argv[i] == "--out" or (i > 0 and argv[i - 1] == "--out") or argv[i].startswith("--out=")


def write_result(
    out_dir: str | Path,
    name: str,
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    details: dict[str, Any],
    notes: list[str],
    started: float,
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": name,
        "mode": mode(args),
        "command": command_line(),
        "hardware": hardware(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_s": round(time.time() - started, 1),
        "rows": rows,
        "details": details,
        "notes": notes,
    }
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    os.replace(tmp, path)
    print(f"[bench] wrote {path} ({payload['wall_s']} s)", flush=True)
    return path


# ----------------------------------------------------------------------------- data and Ray


def dataset_dir(name: str) -> str:
    """The shared copy of a real dataset, or BenchSkip saying where it was looked for."""
    folder = DATASETS / DATASET_DIRS[name]
    if not folder.is_dir():
        raise BenchSkip(f"{folder} is absent (real datasets live in ../shared/datasets)")
    return str(folder)


def load(name: str, seed: int = 0):
    """A raycls Dataset: digits from scikit-learn, the others from ../shared/datasets."""
    from raycls.data import load_dataset

    if name == "digits":
        return load_dataset("digits", seed=seed)
    return load_dataset(name, data_dir=dataset_dir(name), seed=seed)


def subset(ds, n_train: int, n_val: int | None = None, n_test: int | None = None):
    """The first n images of each split (splits are already shuffled by seed where it matters)."""
    from dataclasses import replace

    from raycls.data import Split

    def cut(s: Split, n: int | None) -> Split:
        if n is None or n >= len(s):
            return s
        order = _seeded_order(len(s))[:n]
        return Split(s.images[order].contiguous(), s.labels[order].contiguous())

    return replace(ds, train=cut(ds.train, n_train), val=cut(ds.val, n_val),
                   test=cut(ds.test, n_test))  # fmt: skip


def _seeded_order(n: int):
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(0))


def start_ray(num_cpus: int = 2, env: dict[str, str] | None = None):
    """A fresh local Ray of our own (never someone else's `ray start`), started once per process.

    `num_cpus` is logical: Ray schedules by it; the 2 real cores are shared by everything."""
    import ray

    os.environ.update(env or {})
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    from raycls.ray_session import local_ray_options

    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        **local_ray_options(),
    )
    return ray


@contextmanager
def training_run(
    ds, cfg, prefix: str = "raycls-bench-"
) -> Iterator[tuple[dict[str, Any], float, Path]]:
    """`raycls train` through `run_training`, into a temporary storage path removed afterwards:
    yields (summary, wall seconds, run folder) while the run's files are still there."""
    from raycls.trainer import run_training

    storage = tempfile.mkdtemp(prefix=prefix)
    try:
        t0 = time.perf_counter()
        summary = run_training(cfg.replace(storage_path=storage, name=""), dataset=ds)
        yield summary, time.perf_counter() - t0, Path(storage) / summary["name"]
    finally:
        shutil.rmtree(storage, ignore_errors=True)
