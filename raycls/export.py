"""`raycls export`: checkpoint -> ONNX bundle that has proved itself against PyTorch.

Pipeline, top to bottom (steps 2-5's model and proofs live in raycls.onnx_model; this module
finds the checkpoint and data, runs them in order and writes the bundle):
1. resolve the checkpoint (a checkpoint dir, or a run dir whose result.json names the best one);
2. wrap the model so the graph takes uint8 `images` (N, C, H, W) and does /255 and mean/std itself;
3. `torch.onnx.export` (dynamo, opset 18, dynamic batch, one file), then
   `onnx.checker.check_model(full_check=True)`;
4. the parity gate: PyTorch vs onnxruntime on >= 1,000 held-out images in batches of 1, 7, then
   64 until fewer remain, then the remainder (1,000 images: sizes 1, 7, 32, 64); max |logit diff|
   <= 1e-3 and top-1 agreement >= 99.9%, or no bundle is written;
5. onnxruntime accuracy on the test split (`onnx_test_acc`), optional static INT8 quantisation
   kept only within 1 accuracy point of FP32;
6. `bundle.write_bundle` (atomic), then the bundle is loaded back through `bundle.load_bundle`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch

from raycls.bundle import (
    FORMAT_VERSION,
    INT8_MODEL_FILE,
    MODEL_FILE,
    BundleError,
    load_bundle,
    write_bundle,
)
from raycls.checkpoints import CheckpointError, model_from_checkpoint
from raycls.onnx_model import (
    OPSET,
    ExportError,
    check_parity,
    cpu_session,
    export_onnx,
    onnx_accuracy,
    quantize_int8,
)
from raycls.runs import read_train_result

CALIBRATION_IMAGES = 512  # training images that calibrate the INT8 ranges
INT8_MAX_ACC_DROP = 0.01  # 1 percentage point of test accuracy
ACC_WARN_GAP = 0.002  # ONNX vs training test_acc: warn above 0.2 points


# ----------------------------------------------------------------------------- checkpoint


def run_result_of(ckpt: Path) -> dict[str, Any] | None:
    """The run's result.json one folder up, when it names `ckpt` as the run's best checkpoint
    (its test_acc was measured on that checkpoint); None otherwise."""
    result = read_train_result(ckpt.parent)
    # by folder name: Ray Train's names are timestamped, and the run may have moved since
    if result is not None and Path(str(result["checkpoint"])).name == ckpt.resolve().name:
        return result
    return None


def resolve_checkpoint(source: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """(checkpoint dir, run result.json or None) for a checkpoint dir or a finished run dir; a
    checkpoint dir gets its run's result.json when that names it (see run_result_of)."""
    p = Path(source)
    if (p / "meta.json").is_file():
        return p, run_result_of(p)
    result_path = p / "result.json"
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_text())
            ckpt = Path(result["checkpoint"])
        except (ValueError, KeyError, TypeError) as e:
            raise ExportError(f"{result_path}: has no usable 'checkpoint' entry ({e})") from None
        for candidate in (ckpt, p / ckpt, p / ckpt.name):
            if (candidate / "meta.json").is_file():
                return candidate, result
        raise ExportError(
            f"{result_path} names checkpoint {ckpt}, which does not exist (moved or deleted?); "
            "pass a checkpoint directory instead"
        )
    if not p.exists():
        raise ExportError(f"{p}: no such checkpoint or run directory")
    found = sorted(str(m.parent) for m in p.glob("**/meta.json"))[:5]
    hint = f"; checkpoints found inside: {', '.join(found)}" if found else ""
    raise ExportError(
        f"{p}: neither a checkpoint (no meta.json) nor a finished run (no result.json){hint}"
    )


# ----------------------------------------------------------------------------- bundle


def versions() -> dict[str, str]:
    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "ray": version("ray"),  # metadata only: export must not start or import Ray
        "raycls": version("raycls"),
    }


def parity_images(ds: Any, n: int, seed: int = 0) -> torch.Tensor:
    """n held-out images (validation + test, seeded sample); topped up from the training split
    only for datasets too small to have n held-out images (digits has ~500)."""
    held_out = torch.cat([ds.val.images, ds.test.images])
    if len(held_out) < n:
        held_out = torch.cat([held_out, ds.train.images[: n - len(held_out)]])
    order = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(seed))
    return held_out[order[:n]].contiguous()


def load_matching_dataset(meta: dict[str, Any], data_dir: str | None,
                          num_images: int = 1000) -> Any:
    """The dataset the checkpoint was trained on, checked against the checkpoint's data meta."""
    from raycls.data import DataError, load_dataset
    from raycls.ingest import MAX_EVAL_IMAGES, sample_dataset
    from raycls.sources import SourceError, is_encoded

    cfg, data = meta["config"], meta["data"]
    try:
        if is_encoded(cfg["dataset"]):  # a bounded read, however large the dataset
            limits = {"train": max(CALIBRATION_IMAGES, num_images), "val": num_images,
                      "test": MAX_EVAL_IMAGES}
            ds = sample_dataset(cfg, data, limits)
        else:
            ds = load_dataset(
                cfg["dataset"],
                data_dir=data_dir or cfg["data_dir"],
                image_size=cfg.get("image_size", 0),
                val_fraction=cfg.get("val_fraction", 0.1),
                seed=cfg.get("seed", 0),
            )
    except (DataError, SourceError) as e:
        raise ExportError(f"cannot load dataset {cfg['dataset']!r}: {e} (set --data-dir)") from None
    got = (list(ds.classes), ds.channels, ds.image_size)
    want = (list(data["classes"]), data["channels"], data["image_size"])
    if got != want:
        raise ExportError(
            f"dataset {cfg['dataset']!r} has classes/channels/size {got}, but the checkpoint was "
            f"trained on {want}; point --data-dir at the training data"
        )
    return ds


def export_bundle(
    source: str | Path,
    output: str | Path,
    *,
    data_dir: str | None = None,
    int8: bool = False,
    num_parity_images: int = 1000,
    overwrite: bool = False,
    test_acc: float | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Checkpoint or run dir -> verified bundle at `output`. See the module docstring.
    `test_acc`: PyTorch's test accuracy of this very checkpoint, when the caller measured it (a
    search does, for its winner); else it comes from the run's result.json where that names it."""
    # torch and onnxruntime take turns on the parity batches: more than 4 threads only
    # oversubscribe the cores (beside a search's driver, too); capped for this call alone
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(4, threads)))
    try:
        return _export_bundle(source, output, data_dir=data_dir, int8=int8,
                              num_parity_images=num_parity_images, overwrite=overwrite,
                              measured=test_acc, log=log)
    finally:
        torch.set_num_threads(threads)


def _export_bundle(source, output, *, data_dir, int8, num_parity_images, overwrite, measured,
                   log) -> Path:
    out = Path(output)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it")
    if num_parity_images < 1000:
        raise ExportError(f"--parity-images {num_parity_images}: the gate needs at least 1000")
    ckpt, result = resolve_checkpoint(source)
    try:
        model, meta = model_from_checkpoint(ckpt)
    except (CheckpointError, KeyError, RuntimeError, ValueError) as e:
        raise ExportError(f"cannot rebuild the model from {ckpt}: {e}") from None
    data, cfg = meta["data"], meta["config"]
    ds = load_matching_dataset(meta, data_dir, num_parity_images)

    model_bytes = export_onnx(model, data)
    log(f"exported {ckpt} to ONNX (opset {OPSET}, {len(model_bytes) / 1e6:.2f} MB); checker ok")
    parity = check_parity(model, data, model_bytes, parity_images(ds, num_parity_images))
    log(
        f"parity ok: max |logit diff| {parity['max_abs_diff']:.2e}, top-1 agreement "
        f"{parity['top1_agreement']:.2%} on {parity['num_images']} images, "
        f"batch sizes {parity['batch_sizes']}"
    )

    # a dataset without a test split (an imagefolder with train/ and val/ only) is measured on val
    split = "test" if len(ds.test) else "val"
    held = ds.test if len(ds.test) else ds.val
    test_x, test_y = held.images.numpy(), held.labels.numpy()
    onnx_test_acc = onnx_accuracy(cpu_session(model_bytes), test_x, test_y)
    train_metrics = {**meta.get("metrics", {}), **(result or {})}
    if measured is not None:
        train_metrics["test_acc"] = measured
    test_acc = train_metrics.get("test_acc")
    # a `raycls train` run's result.json that names another checkpoint (a search trial's folder
    # holds Tune's result.json instead, one JSON line per epoch: not a run result)
    if measured is None and result is None and read_train_result(ckpt.parent) is not None:
        log(f"note: {ckpt.parent / 'result.json'} has the test accuracy of the run's best "
            "checkpoint, not of this one: test_acc is not recorded (export the run directory "
            "for the best checkpoint)")
    metrics = {
        "val_acc": train_metrics.get("val_acc"),
        "test_acc": test_acc,
        f"onnx_{split}_acc": onnx_test_acc,
    }
    trained = f"{test_acc:.4f}" if isinstance(test_acc, float) else "not recorded"
    log(f"onnx {split} accuracy {onnx_test_acc:.4f} on {len(test_y)} images "
        f"(training: {trained})")
    if isinstance(test_acc, float) and abs(onnx_test_acc - test_acc) > ACC_WARN_GAP:
        log(
            f"warning: ONNX test accuracy differs from training's by "
            f"{abs(onnx_test_acc - test_acc) * 100:.2f} points (is the test split the same?)"
        )

    files = {MODEL_FILE: model_bytes}
    bundle_meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": out.name,
        "classes": list(data["classes"]),
        "input": {
            "channels": data["channels"],
            "height": data["image_size"],
            "width": data["image_size"],
            "dtype": "uint8",
            "layout": "NCHW",
            # the validation rule of training: serving and predict fit images the same way
            "resize": data.get("resize", "stretch"),
        },
        "metrics": metrics,
        "parity": parity,
        "config": cfg,
        "versions": versions(),
        "source": {"checkpoint": str(ckpt.resolve()), "epoch": meta.get("epoch")},
    }
    if int8:
        order = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(0))
        calibration = ds.train.images[order[:CALIBRATION_IMAGES]].numpy()
        int8_bytes = quantize_int8(model_bytes, calibration)
        int8_acc = onnx_accuracy(cpu_session(int8_bytes), test_x, test_y)
        drop = onnx_test_acc - int8_acc
        kept = drop <= INT8_MAX_ACC_DROP
        reason = (
            f"test accuracy {int8_acc:.4f} vs FP32 {onnx_test_acc:.4f} "
            f"({drop * 100:+.2f} points drop; limit {INT8_MAX_ACC_DROP * 100:.1f})"
        )
        bundle_meta["int8"] = {"kept": kept, "test_acc": int8_acc, "reason": reason}
        metrics["int8_test_acc"] = int8_acc
        if kept:
            files[INT8_MODEL_FILE] = int8_bytes
            log(f"INT8 model kept: {reason}")
        else:
            log(f"INT8 model dropped (not written): {reason}")
    bundle_meta["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    write_bundle(out, bundle_meta, files)
    load_bundle(out, int8=INT8_MODEL_FILE in files)  # the hand-off must load as serving loads it
    log(f"wrote bundle {out}")
    return out


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Export a training checkpoint to an ONNX bundle that has proved itself: onnx.checker, "
        "the parity gate against PyTorch, test accuracy through onnxruntime; no bundle is "
        "written when a check fails. Exit status: 0 written, 1 refused (the message says why)."
    )
    parser.add_argument(
        "source",
        help="a checkpoint directory (checkpoint.pt + meta.json; Ray Train names them "
             "checkpoint_<timestamp>) or a finished run directory (its result.json names the "
             "best checkpoint). The run's test_acc is recorded either way when result.json "
             "(one folder up from a checkpoint) names that checkpoint",
    )  # fmt: skip
    parser.add_argument(
        "--output", "-o", default="",
        help="bundle directory to write (default: models/<run name>)",
    )
    parser.add_argument(
        "--data-dir", default=None,
        help="where the dataset lives, for the parity images and the test accuracy (default: "
             "the checkpoint config's data_dir)",
    )  # fmt: skip
    parser.add_argument(
        "--int8", action="store_true",
        help=f"also write a static INT8 model.int8.onnx, kept only within "
             f"{INT8_MAX_ACC_DROP * 100:g} point of FP32 test accuracy (default: off)",
    )  # fmt: skip
    parser.add_argument(
        "--parity-images", type=int, default=1000,
        help="held-out images the parity gate compares, at least 1000 (default: 1000)",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing bundle at --output (default: off, an existing one is refused)",
    )


def default_output(source: str) -> Path:
    p = Path(source).resolve()
    name = p.parent.name if p.name.startswith("checkpoint") else p.name
    return Path("models") / name


def main(args: argparse.Namespace) -> int:
    output = Path(args.output) if args.output else default_output(args.source)
    try:
        export_bundle(
            args.source,
            output,
            data_dir=args.data_dir,
            int8=args.int8,
            num_parity_images=args.parity_images,
            overwrite=args.overwrite,
        )
    except (ExportError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
