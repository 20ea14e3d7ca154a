"""The self-describing checkpoint format: what a training run saves each epoch, and reads back.

A checkpoint is a directory with `checkpoint.pt` (tensors and plain values only, loaded with
`weights_only=True`) and `meta.json` (config, classes, metrics, epoch, history, and the sha256 of
`checkpoint.pt`), so resume and export need nothing but the checkpoint and corruption is caught
before load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

# torch is imported where tensors are read or written, not here: reading meta.json and ranking
# checkpoints (`raycls runs`, the search's reports, preflight) needs no torch.

CHECKPOINT_FORMAT = "raycls-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted."""


def rank_key(metrics: dict[str, Any]) -> tuple[float, float]:
    """The one order of a run's checkpoints (and of a search's epochs and trials): higher
    val_acc, then lower val_loss. Hand-written because Ray's picks (Result.get_best_checkpoint,
    ResultGrid.get_best_result) break val_acc ties by position, and ties are common on a small
    validation split: the best checkpoint a run tests, a search reports and export bundles must
    be the same one."""
    return metrics["val_acc"], -metrics.get("val_loss", 0.0)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any], meta: dict[str, Any]):
    """Write `checkpoint.pt` and then `meta.json` (with its hash) into `directory`.

    `meta.json` is written last and atomically (temp file + rename): a directory whose meta.json
    exists holds a complete checkpoint, and a half-written `checkpoint.pt` fails its hash.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    import torch

    torch.save(state, d / "checkpoint.pt")
    meta = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        **meta,
        "sha256": {"checkpoint.pt": _sha256(d / "checkpoint.pt")},
    }
    tmp = d / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, d / "meta.json")


def read_checkpoint_meta(directory: str | os.PathLike) -> dict[str, Any]:
    d = Path(directory)
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(
            f"{d}: not a raycls checkpoint (no meta.json); pass a checkpoint directory or a run "
            "directory"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: corrupted ({e})") from None
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{meta_path}: unsupported checkpoint format {meta.get('format')!r} "
            f"version {meta.get('version')!r} (expected {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION})"
        )
    return meta


def verify_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint's completeness and sha256 without loading it; returns its meta."""
    d = Path(directory)
    meta = read_checkpoint_meta(d)
    pt = d / "checkpoint.pt"
    if not pt.is_file():
        raise CheckpointError(f"{pt}: missing (the checkpoint is incomplete)")
    expected = meta.get("sha256", {}).get("checkpoint.pt")
    actual = _sha256(pt)
    if actual != expected:
        raise CheckpointError(
            f"{pt}: sha256 {actual[:12]}... does not match meta.json ({str(expected)[:12]}...); "
            "the checkpoint is corrupted. Resume or export from another checkpoint of the run."
        )
    return meta


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify and load a checkpoint: returns (state, meta). Refuses corrupted files."""
    meta = verify_checkpoint(directory)
    pt = Path(directory) / "checkpoint.pt"
    try:
        import torch

        state = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # hash matched but content unreadable: still refuse clearly
        raise CheckpointError(f"{pt}: cannot be loaded ({e})") from None
    return state, meta


def model_from_checkpoint(directory: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model (eval mode) from a checkpoint alone."""
    from raycls.models import build_model

    state, meta = load_checkpoint(directory)
    cfg, data = meta["config"], meta["data"]
    model = build_model(
        cfg["model"], len(data["classes"]), data["channels"], data["image_size"], cfg["model_width"]
    )
    model.load_state_dict(state["model"])
    return model.eval(), meta
