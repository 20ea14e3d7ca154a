"""`raycls evaluate BUNDLE`: measure a bundle on a test split through onnxruntime.

This is how anyone checks a bundle's claims: test-split top-1 and top-5 accuracy, a per-class
precision/recall/F1 report, macro one-vs-rest ROC AUC and a confusion-matrix PNG, computed from the
bundle's own ONNX model (verified by sha256 on load), compared with what bundle.json claims.
Runs on the CPU; needs no GPU and no Ray cluster.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from raycls.bundle import Bundle, BundleError, load_bundle, read_bundle_meta, softmax


class InputError(ValueError):
    """A command-line input that cannot work, found before any data loads; reads
    `field=value: why and the fix` (printed as `error: ...`, exit status 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Measure a bundle on a dataset's test split through onnxruntime (CPU; no GPU, no Ray): "
        "top-1/top-5 accuracy, per-class report, macro one-vs-rest ROC AUC, a confusion-matrix "
        "PNG, and the gap to the training test_acc recorded in the bundle. A dataset whose "
        "channels, image size or classes do not fit the bundle is refused before it loads. "
        "Exit status: 0 measured, 1 the data could not be read, 2 a bad input (nothing loaded)."
    )
    parser.add_argument("bundle", help="bundle directory written by `raycls export`")
    parser.add_argument(
        "--dataset", default=None,
        help="digits, mnist, fashion-mnist, cifar10, imagefolder:PATH or parquet:PATH; it must "
             "have the bundle's channels and classes, and images of the bundle's size or of the "
             "training dataset's size (default: the dataset the bundle was trained on)",
    )  # fmt: skip
    parser.add_argument(
        "--data-dir", default=None,
        help="where mnist / fashion-mnist / cifar10 files live (default: the bundle config's "
             "data_dir)",
    )  # fmt: skip
    parser.add_argument(
        "--int8", action="store_true",
        help="evaluate the bundle's model.int8.onnx (default: off, the FP32 model.onnx)",
    )
    parser.add_argument(
        "--output-dir", default=None,
        help="where confusion_matrix.png and report.json go (default: reports/<bundle name>)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=256,
        help="images per onnxruntime call, at least 1 (default: 256)",
    )
    parser.add_argument(
        "--max-images", type=int, default=10_000,
        help="test images read from an imagefolder/parquet dataset, at least 1 (default: 10000; "
             "built-in datasets are always measured on their whole test split)",
    )  # fmt: skip
    parser.add_argument(
        "--json", action="store_true",
        help="also print the figures as one JSON line, last (default: off)",
    )


# ----------------------------------------------------------------------------- input checks


def _shape_text(channels: int, height: int, width: int) -> str:
    return f"{channels}x{height}x{width}"


def _classes_text(classes: list[str] | tuple[str, ...]) -> str:
    shown = ", ".join(list(classes)[:4]) + (", ..." if len(classes) > 4 else "")
    return f"{len(classes)} classes ({shown})"


def check_builtin_dataset(meta: dict[str, Any], name: str) -> None:
    """A built-in dataset against the bundle, from the registry's declared shape (nothing
    loads): same channels and classes, and images either of the bundle's size or of the size of
    the dataset it was trained on (then resized as in training). Raises InputError."""
    from raycls.data import BUILTIN_SHAPES, DATASETS
    from raycls.preflight import closest

    if name not in BUILTIN_SHAPES:
        raise InputError(f"dataset={name}: unknown dataset{closest(name, list(BUILTIN_SHAPES))};"
                         f" choose {', '.join(DATASETS)}")
    inp, classes = meta["input"], list(meta["classes"])
    trained_on = str((meta.get("config") or {}).get("dataset", ""))
    trained = BUILTIN_SHAPES.get(trained_on)

    def fits(shape: Any) -> bool:
        sizes = {(inp["height"], inp["width"])}
        if trained is not None:
            sizes.add((trained.image_size, trained.image_size))
        return (shape.channels == inp["channels"] and list(shape.classes) == classes
                and (shape.image_size, shape.image_size) in sizes)  # fmt: skip

    shape = BUILTIN_SHAPES[name]
    if fits(shape):
        return
    wants = _shape_text(inp["channels"], inp["height"], inp["width"])
    has = _shape_text(shape.channels, shape.image_size, shape.image_size)
    if shape.channels != inp["channels"]:
        why = f"its images have {shape.channels} channel(s) ({has}), the bundle takes {wants}"
    elif list(shape.classes) != classes:
        why = (f"its {_classes_text(shape.classes)} are not the bundle's "
               f"{_classes_text(classes)}")
    else:
        seen = f" (trained on {trained_on} at its native size)" if trained is not None else ""
        why = (f"its images are {has}, the bundle takes {wants}{seen}: they would be resized "
               f"to {inp['height']}x{inp['width']} and the accuracy would mean nothing")
    fitting = [n for n, sh in BUILTIN_SHAPES.items() if fits(sh)]
    fix = (f"evaluate on {' or '.join(fitting)}" if fitting else
           "evaluate on the bundle's own kind of data (imagefolder:PATH or parquet:PATH)")
    raise InputError(f"dataset={name}: {why}; {fix}")


def check_encoded_dataset(bundle_classes: list[str], channels: int, src: Any, name: str) -> None:
    """An imagefolder/parquet dataset's classes and channels (from its listing and a probe of a
    few files, before decoding the test split) against the bundle's. Raises InputError."""
    if list(src.classes) != bundle_classes:
        raise InputError(f"dataset={name}: its {_classes_text(src.classes)} are not the "
                         f"bundle's {_classes_text(bundle_classes)}; evaluate on data with the "
                         "bundle's class folders / labels, in its order")
    if src.channels != channels and channels == 1:
        raise InputError(f"dataset={name}: its images are colour (3 channels), the bundle takes "
                         "greyscale (1 channel); evaluate on the data it was trained on")


def check_inputs(meta: dict[str, Any], name: str, data_dir: str) -> None:
    """Every input of an evaluation that can be checked before data loads: the dataset name,
    its shape and classes against the bundle, and that its files are there (preflight's
    rules). Raises InputError."""
    from raycls.config import ConfigError, TrainConfig
    from raycls.preflight import dataset_shape
    from raycls.sources import is_encoded

    if not is_encoded(name):
        check_builtin_dataset(meta, name)  # before dataset_shape, which may download cifar10
    try:
        dataset_shape(TrainConfig(dataset=name, data_dir=data_dir))
    except ConfigError as e:
        raise InputError(str(e)) from None


def bundle_error(bundle_path: str | Path, e: BundleError) -> str:
    """`bundle=PATH: why`, without the path twice when the message starts with it."""
    return f"bundle={bundle_path}: {str(e).removeprefix(f'{Path(bundle_path)}: ')}"


def bundle_logits(bundle: Bundle, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate(
        [bundle.logits(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )


def compute_metrics(labels: np.ndarray, logits: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Top-1/top-5 accuracy, per-class report, macro OvR ROC AUC and the confusion matrix."""
    from sklearn.metrics import (
        classification_report,
        confusion_matrix,
        roc_auc_score,
        top_k_accuracy_score,
    )

    probs = softmax(logits)
    k = len(classes)
    pred = probs.argmax(1)
    indices = list(range(k))  # every class, also those absent from this test split
    # with five classes or fewer each label is in the top five (sklearn would warn that
    # such a score is meaningless and, for two classes, want one score column)
    top5 = 1.0 if k <= 5 else top_k_accuracy_score(labels, probs, k=5, labels=indices)
    report = classification_report(
        labels, pred, labels=indices, target_names=classes, output_dict=True, zero_division=0
    )
    text = classification_report(
        labels, pred, labels=indices, target_names=classes, digits=4, zero_division=0
    )
    try:
        if k == 2:
            auc = float(roc_auc_score(labels, probs[:, 1]))
        else:
            # roc_auc_score wants rows summing to exactly 1; float32 softmax is off by ~1e-7
            p64 = probs.astype(np.float64)
            p64 /= p64.sum(axis=1, keepdims=True)
            auc = float(
                roc_auc_score(labels, p64, multi_class="ovr", average="macro", labels=indices)
            )
    except ValueError:  # a class absent from the labels: AUC is undefined for it
        auc = None
    return {
        "num_images": int(len(labels)),
        "test_acc": float((pred == labels).mean()),
        "top5_acc": float(top5),
        "roc_auc_macro_ovr": auc,
        "per_class": {
            c: {
                "precision": report[c]["precision"],
                "recall": report[c]["recall"],
                "f1": report[c]["f1-score"],
                "support": int(report[c]["support"]),
            }
            for c in classes
        },
        "confusion_matrix": confusion_matrix(labels, pred, labels=indices).tolist(),
        "report_text": text,
    }


def plot_confusion_matrix(matrix: list[list[int]], classes: list[str], path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    cm = np.asarray(matrix)
    k = len(classes)
    size = max(4.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    # row-normalised colours (recall per class), raw counts as text
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ConfusionMatrixDisplay(norm, display_labels=classes).plot(
        ax=ax, cmap="Blues", include_values=False, colorbar=False, xticks_rotation=45,
        im_kw={"vmin": 0, "vmax": 1},
    )
    ax.set(xlabel="predicted", ylabel="true", title=title)
    plt.setp(ax.get_xticklabels(), ha="right")
    if k <= 30:
        # by hand: the display writes the values it colours, and these are counts over recall
        for i in range(k):
            for j in range(k):
                color = "white" if norm[i, j] > 0.5 else "black"
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=color, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def builtin_test_split(bundle: Bundle, name: str, cfg: dict[str, Any], data_dir: str):
    from raycls.data import DataError, load_dataset

    try:
        ds = load_dataset(
            name,
            data_dir=data_dir,
            image_size=bundle.height,
            val_fraction=cfg.get("val_fraction", 0.1),
            seed=cfg.get("seed", 0),
        )
    except DataError as e:
        raise BundleError(f"cannot load dataset {name!r}: {e} (set --data-dir)") from None
    return ds.classes, ds.channels, ds.test.images.numpy(), ds.test.labels.numpy()


def encoded_test_split(bundle: Bundle, name: str, cfg: dict[str, Any], max_images: int):
    """At most `max_images` test images of an imagefolder/parquet dataset, each decoded by the
    bundle exactly as serving decodes it (no Ray, no torch); files that do not decode are
    counted out and named."""
    from raycls.images import ImageError
    from raycls.sources import SourceError, open_source

    try:
        src = open_source(name, cfg.get("val_fraction", 0.1), cfg.get("seed", 0))
    except SourceError as e:
        raise BundleError(f"cannot read dataset {name!r}: {e}") from None
    check_encoded_dataset(bundle.classes, bundle.channels, src, name)
    if "test" not in src.splits:
        raise InputError(f"dataset={name}: has no test split (no test/ folder or rows); "
                         "evaluate on data with one")
    images, labels, bad = [], [], []
    for row in src.splits["test"].iter_rows(limit=max_images):
        try:
            images.append(bundle.decode(row["image"]))
            labels.append(row["label"])
        except ImageError as e:
            bad.append(f"{row['path']}: {e}")
    if bad:
        print(f"warning: skipped {len(bad)} unreadable image(s): {'; '.join(bad[:5])}",
              file=sys.stderr)
    if not images:
        raise BundleError(f"dataset {name!r}: no readable test images")
    return src.classes, src.channels, np.stack(images), np.asarray(labels, np.int64)


def evaluate_bundle(
    bundle_path: str | Path,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    int8: bool = False,
    output_dir: str | Path | None = None,
    batch_size: int = 256,
    max_images: int = 10_000,
) -> dict[str, Any]:
    """Evaluate a bundle on a dataset's test split; writes the PNG and report.json. Raises
    InputError (before any data loads) for an input that cannot work, BundleError otherwise."""
    from raycls.sources import is_encoded

    try:
        meta = read_bundle_meta(bundle_path)
    except BundleError as e:
        raise InputError(bundle_error(bundle_path, e)) from None
    cfg = meta.get("config") or {}
    name = dataset or cfg.get("dataset")
    if not name:
        raise InputError(f"dataset=(none): {bundle_path}/bundle.json has no training config; "
                         "pass --dataset")
    data_dir = data_dir or cfg.get("data_dir", "data")
    check_inputs(meta, name, data_dir)
    try:
        bundle = load_bundle(bundle_path, int8=int8)
    except BundleError as e:
        raise InputError(bundle_error(bundle_path, e)) from None
    if is_encoded(name):
        classes, channels, images, labels = encoded_test_split(bundle, name, cfg, max_images)
    else:
        classes, channels, images, labels = builtin_test_split(bundle, name, cfg, data_dir)
    if channels != bundle.channels or list(classes) != bundle.classes:
        raise BundleError(
            f"dataset {name!r} ({channels} channels, classes {list(classes)[:5]}...) does "
            f"not match the bundle ({bundle.channels} channels, classes {bundle.classes[:5]}...)"
        )
    logits = bundle_logits(bundle, images, batch_size)
    figures = compute_metrics(labels, logits, bundle.classes)
    out = Path(output_dir) if output_dir else Path("reports") / bundle.name
    png = out / ("confusion_matrix.int8.png" if int8 else "confusion_matrix.png")
    title = f"{bundle.name} ({bundle.model_file}) on {name} test: acc {figures['test_acc']:.4f}"
    plot_confusion_matrix(figures["confusion_matrix"], bundle.classes, png, title)
    claimed = bundle.meta.get("metrics", {})
    claimed_key = "int8_test_acc" if int8 else "onnx_test_acc"
    result = {
        "bundle": str(bundle.path),
        "model_file": bundle.model_file,
        "dataset": name,
        **{k: v for k, v in figures.items() if k != "report_text"},
        "claimed_test_acc": claimed.get("test_acc"),
        f"claimed_{claimed_key}": claimed.get(claimed_key),
        "confusion_matrix_png": str(png),
    }
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    result["report_text"] = figures["report_text"]
    return result


def main(args: argparse.Namespace) -> int:
    for field, value in (("batch_size", args.batch_size), ("max_images", args.max_images)):
        if value < 1:
            print(f"error: {field}={value}: must be at least 1 (--{field.replace('_', '-')})",
                  file=sys.stderr)
            return 2
    try:
        r = evaluate_bundle(
            args.bundle,
            dataset=args.dataset,
            data_dir=args.data_dir,
            int8=args.int8,
            output_dir=args.output_dir,
            batch_size=args.batch_size,
            max_images=args.max_images,
        )
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    auc = r["roc_auc_macro_ovr"]
    print(
        f"{r['bundle']} ({r['model_file']}) on {r['dataset']} test split, {r['num_images']} images"
    )
    print(r.pop("report_text"))
    print(f"top-1 accuracy  {r['test_acc']:.4f}")
    print(f"top-5 accuracy  {r['top5_acc']:.4f}")
    print(f"macro OvR AUC   {auc:.4f}" if auc is not None else "macro OvR AUC   undefined")
    claimed = r["claimed_test_acc"]
    if isinstance(claimed, float):
        gap = (r["test_acc"] - claimed) * 100
        print(f"training test_acc {claimed:.4f} (measured {gap:+.2f} points against it)")
    print(f"confusion matrix {r['confusion_matrix_png']}")
    if args.json:
        print(json.dumps(r))
    return 0
