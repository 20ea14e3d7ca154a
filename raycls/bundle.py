"""The bundle: the one hand-off from training to serving.

A bundle is a folder `models/NAME/` with `model.onnx` (uint8 `images` (N, C, H, W) in, float32
`logits` (N, K) out, scaling and normalisation inside the graph), optionally `model.int8.onnx`, and
`bundle.json` (classes, input shape, metrics, parity report, training config, library versions and
the sha256 of every model file).

This module imports only the standard library, numpy, Pillow and onnxruntime, never torch: a
serving replica loads a bundle with nothing else installed, and nothing here unpickles anything.
Model bytes are hashed first and the onnxruntime session is created from those same verified bytes,
so a file swapped between the check and the load cannot slip through.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from raycls.images import decode_image, resize_rule

FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
INT8_MODEL_FILE = "model.int8.onnx"
META_FILE = "bundle.json"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


class BundleError(RuntimeError):
    """A bundle is missing a file, fails its hash, has an unknown format or mismatched model."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) logits, computed stably in float64, returned as float32."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


DEFAULT_TOP_K = 5  # classes per answer when none is asked for (predict; the server's top_k=)


def resolve_top_k(top_k: int | None, num_classes: int, default: int = DEFAULT_TOP_K) -> int:
    """The one top_k rule of `raycls predict` and the server's /v1 classify: none asked means
    `default` capped at the model's classes (a 2-class model answers 2); an asked top_k must be
    in 1..num_classes, else ValueError (the server answers it with 422)."""
    if top_k is None:
        return max(1, min(default, num_classes))
    if not 1 <= top_k <= num_classes:
        raise ValueError(f"top_k={top_k}: out of range: use 1..{num_classes} (the model's classes)")
    return top_k


@dataclass
class Bundle:
    path: Path
    meta: dict[str, Any]  # parsed bundle.json
    session: ort.InferenceSession
    model_file: str = MODEL_FILE  # which model file the session runs (model.onnx or the INT8 one)

    @property
    def name(self) -> str:
        return str(self.meta["name"])

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def channels(self) -> int:
        return int(self.meta["input"]["channels"])

    @property
    def height(self) -> int:
        return int(self.meta["input"]["height"])

    @property
    def width(self) -> int:
        return int(self.meta["input"]["width"])

    @property
    def input_name(self) -> str:
        return INPUT_NAME

    @property
    def resize(self) -> str:
        """How images are fitted to the input size: the validation rule of training."""
        return resize_rule(str(self.meta["input"].get("resize", "stretch")))

    def decode(self, data: bytes, **kwargs: Any) -> np.ndarray:
        """Encoded image bytes -> uint8 (C, H, W) sized for this bundle (see decode_image)."""
        return decode_image(
            data, self.channels, self.height, self.width, resize=self.resize, **kwargs
        )

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) -> float32 logits (N, K)."""
        images = np.asarray(images)
        expected = (self.channels, self.height, self.width)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(
                f"images must be uint8 (N, {', '.join(map(str, expected))}); got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        (out,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images)})
        return out.astype(np.float32, copy=False)

    def predict(self, images: np.ndarray, top_k: int = 5) -> list[list[dict[str, Any]]]:
        """Per image: top-k [{"label", "index", "probability"}], most probable first."""
        if top_k < 1:
            raise ValueError(f"top_k={top_k}: must be at least 1")
        probs = softmax(self.logits(images))
        k = min(top_k, probs.shape[1])
        classes = self.classes
        # stable sort on -p: equal probabilities keep label order, so answers are deterministic
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [
            [{"label": classes[i], "index": int(i), "probability": float(p[i])} for i in row]
            for row, p in zip(order, probs, strict=True)
        ]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_file_name(name: str, where: Path) -> None:
    # bundle.json is data from disk: a key like "../x" must not make us read outside the bundle
    if not name or name != os.path.basename(name) or name in (".", "..") or "\\" in name:
        raise BundleError(f"{where}: sha256 lists an invalid file name {name!r}")


def read_bundle_meta(path: str | Path) -> dict[str, Any]:
    """Parse and sanity-check `bundle.json` of the bundle at `path` (no model is loaded)."""
    d = Path(path)
    if not d.is_dir():
        raise BundleError(
            f"{d}: no such bundle directory; create one with "
            f"`raycls export CHECKPOINT --output {d}`"
        )
    meta_path = d / META_FILE
    if not meta_path.is_file():
        raise BundleError(f"{meta_path}: missing; {d} is not a complete bundle (re-run export)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{meta_path}: not valid JSON ({e}); re-run export") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path}: expected a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{meta_path}: unknown format_version {version!r} (this raycls reads version "
            f"{FORMAT_VERSION}); re-export the bundle with this raycls version"
        )
    for key in ("name", "classes", "input", "sha256"):
        if key not in meta:
            raise BundleError(f"{meta_path}: required key {key!r} is missing")
    inp = meta["input"]
    for key in ("channels", "height", "width"):
        if not isinstance(inp.get(key), int) or inp[key] < 1:
            raise BundleError(f"{meta_path}: input.{key} must be a positive integer")
    try:
        resize_rule(str(inp.get("resize", "stretch")))
    except ValueError as e:
        raise BundleError(f"{meta_path}: input.resize: {e}") from None
    if inp.get("dtype", "uint8") != "uint8":
        raise BundleError(f"{meta_path}: input.dtype {inp.get('dtype')!r} unsupported (uint8)")
    if not isinstance(meta["classes"], list) or not meta["classes"]:
        raise BundleError(f"{meta_path}: classes must be a non-empty list of names")
    if not isinstance(meta["sha256"], dict) or MODEL_FILE not in meta["sha256"]:
        raise BundleError(f"{meta_path}: sha256 must list {MODEL_FILE}")
    for name in meta["sha256"]:
        _check_file_name(name, meta_path)
    return meta


def _verified_bytes(d: Path, meta: dict[str, Any], name: str) -> bytes:
    file = d / name
    if not file.is_file():
        raise BundleError(f"{file}: missing (bundle.json lists it); re-run export")
    data = file.read_bytes()
    expected = meta["sha256"][name]
    actual = sha256_bytes(data)
    if actual != expected:
        raise BundleError(
            f"{file}: sha256 mismatch (file {actual[:16]}..., bundle.json {str(expected)[:16]}...);"
            " the file was modified or corrupted. Refusing to load it; re-export the bundle"
        )
    return data


def _check_session(session: ort.InferenceSession, meta: dict[str, Any], file: Path) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    inp = meta["input"]
    expected = [inp["channels"], inp["height"], inp["width"]]
    problems = []
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        problems.append(f"inputs are {[i.name for i in inputs]}, expected ['{INPUT_NAME}']")
    else:
        i = inputs[0]
        if i.type != "tensor(uint8)":
            problems.append(f"input type {i.type}, expected tensor(uint8)")
        if len(i.shape) != 4 or list(i.shape[1:]) != expected:
            problems.append(f"input shape {i.shape}, bundle.json says [N, {expected}]")
    if not outputs or outputs[0].name != OUTPUT_NAME:
        problems.append(f"outputs are {[o.name for o in outputs]}, expected ['{OUTPUT_NAME}']")
    else:
        o = outputs[0]
        k = o.shape[-1] if o.shape else None
        if o.type != "tensor(float)":
            problems.append(f"output type {o.type}, expected tensor(float)")
        if isinstance(k, int) and k != len(meta["classes"]):
            problems.append(f"model has {k} outputs but bundle.json lists {len(meta['classes'])}")
    if problems:
        raise BundleError(f"{file} does not match bundle.json: " + "; ".join(problems))


def load_bundle(
    path: str | Path,
    *,
    int8: bool = False,
    providers: list[str] | None = None,
    session_options: ort.SessionOptions | None = None,
) -> Bundle:
    """Verify every model file's sha256, then open the chosen one in onnxruntime from its bytes.

    `int8=True` runs `model.int8.onnx` (refused when the bundle has none). Raises BundleError
    naming the file and the problem.
    """
    d = Path(path)
    meta = read_bundle_meta(d)
    verified = {name: _verified_bytes(d, meta, name) for name in meta["sha256"]}
    name = INT8_MODEL_FILE if int8 else MODEL_FILE
    if name not in verified:
        reason = (meta.get("int8") or {}).get("reason", "it was not exported with --int8")
        raise BundleError(f"{d}: has no {INT8_MODEL_FILE} ({reason}); load the FP32 model")
    try:
        session = ort.InferenceSession(
            verified[name],
            sess_options=session_options,
            providers=providers or ["CPUExecutionProvider"],
        )
    except Exception as e:
        raise BundleError(f"{d / name}: onnxruntime cannot load it ({e})") from None
    _check_session(session, meta, d / name)
    return Bundle(path=d, meta=meta, session=session, model_file=name)


def newest_bundle(root: str | Path = "models") -> Path:
    """The bundle directory under `root` with the latest `created` time in its bundle.json."""
    r = Path(root)
    found: list[tuple[str, Path]] = []
    if r.is_dir():
        for meta_path in r.glob(f"*/{META_FILE}"):
            if meta_path.parent.name.startswith("."):  # a bundle still being written
                continue
            try:
                created = json.loads(meta_path.read_text()).get("created", "")
            except (OSError, ValueError):
                continue
            found.append((str(created), meta_path.parent))
    if not found:
        raise BundleError(
            f"no bundle found under {r}/; create one with `python tune/search.py` or "
            "`raycls export CHECKPOINT --output models/NAME`, or pass model=PATH"
        )
    return max(found)[1]


def write_bundle(
    directory: str | Path, meta: dict[str, Any], model_files: dict[str, bytes]
) -> Path:
    """Write model files and bundle.json (with their sha256) so no half-written bundle is visible.

    Everything goes into a hidden temp dir beside `directory`, which is then renamed into place;
    an existing bundle at `directory` is replaced.
    """
    d = Path(directory)
    if MODEL_FILE not in model_files:
        raise BundleError(f"write_bundle: {MODEL_FILE} is required")
    d.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    meta.setdefault("format_version", FORMAT_VERSION)
    meta.setdefault("name", d.name)
    meta.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    meta["sha256"] = {}
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.tmp-", dir=d.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a server may run as another user
        for name, data in model_files.items():
            _check_file_name(name, d)
            (tmp / name).write_bytes(data)
            meta["sha256"][name] = sha256_bytes(data)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if d.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{d.name}.old-", dir=d.parent))
            os.replace(d, old / "bundle")
            os.replace(tmp, d)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return d
