"""The ONNX model and the proofs it passes before `raycls export` may bundle it.

Top to bottom: the uint8-in wrapper that folds /255 and mean/std into the graph; the export
(dynamo, opset 18, dynamic batch, one file) and `onnx.checker`; the parity gate (PyTorch vs
onnxruntime on held-out images in batches of 1, 7, then 64 and the remainder); onnxruntime
accuracy; static INT8 quantisation. Nothing here reads checkpoints or writes bundles
(raycls.export does).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

OPSET = 18
MAX_IR_VERSION = 10  # onnx 1.23 can write IR 14; onnxruntime 1.3x loads IR <= 11 (10 suffices)
PARITY_MAX_ABS_DIFF = 1e-3  # logits
PARITY_MIN_TOP1_AGREEMENT = 0.999
PARITY_BATCH_SIZES = (1, 7, 64)  # then 64s and the remainder: 1,000 images run 1, 7, 32 and 64


class ExportError(RuntimeError):
    """Export refused: the message says which check failed, by how much, and what to do."""


# ----------------------------------------------------------------------------- ONNX graph


class UInt8Classifier(nn.Module):
    """uint8 images (N, C, H, W) -> logits (N, K), with x/255 and (x - mean)/std folded into
    one multiply-add: x * 1/(255 std) - mean/std, so serving only decodes and resizes."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -mean_t / std_t)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.float() * self.scale + self.shift)


def normalise(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """The training-side preprocessing, written the plain way: the parity gate's reference."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def export_onnx(model: nn.Module, data: dict[str, Any], opset: int = OPSET) -> bytes:
    """Export `model` (eval) with preprocessing folded in; returns checked single-file bytes."""
    wrapped = UInt8Classifier(model, data["mean"], data["std"]).eval()
    c, size = data["channels"], data["image_size"]
    example = torch.zeros(2, c, size, size, dtype=torch.uint8)
    try:
        program = torch.onnx.export(
            wrapped,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes={"images": {0: torch.export.Dim("N", min=1)}},
            external_data=False,
            verbose=False,
        )
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed for this model: {e}") from None
    proto = program.model_proto
    # onnxruntime refuses IR versions newer than it knows; opset 18 needs nothing past IR 10
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise ExportError("the exported model uses external data; bundles are single files")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected the exported graph: {e}") from None
    return proto.SerializeToString()


def cpu_session(model_bytes: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])


def batch_schedule(n: int, sizes: tuple[int, ...] = PARITY_BATCH_SIZES) -> list[int]:
    """Batch sizes covering n images: each of `sizes` once, then the largest, then the rest."""
    out, left = [], n
    for s in sizes:
        if left <= 0:
            break
        out.append(min(s, left))
        left -= out[-1]
    while left > 0:
        out.append(min(sizes[-1], left))
        left -= out[-1]
    return out


def run_onnx(session: ort.InferenceSession, images: np.ndarray, sizes: list[int]) -> np.ndarray:
    chunks, start = [], 0
    for s in sizes:
        chunks.append(session.run(["logits"], {"images": images[start : start + s]})[0])
        start += s
    return np.concatenate(chunks)


@torch.no_grad()
def torch_logits(
    model: nn.Module, images: torch.Tensor, data: dict[str, Any], batch: int = 256
) -> np.ndarray:
    model.eval()
    starts = range(0, len(images), batch)
    out = [model(normalise(images[i : i + batch], data["mean"], data["std"])) for i in starts]
    return torch.cat(out).float().numpy()


def check_parity(
    model: nn.Module, data: dict[str, Any], model_bytes: bytes, images: torch.Tensor
) -> dict[str, Any]:
    """The parity gate. Returns the report; raises ExportError naming the broken limit."""
    sizes = batch_schedule(len(images))
    ref = torch_logits(model, images, data)
    got = run_onnx(cpu_session(model_bytes), images.numpy(), sizes)
    if got.shape != ref.shape:
        raise ExportError(f"parity gate: ONNX logits {got.shape} vs PyTorch {ref.shape}")
    max_abs_diff = float(np.abs(got - ref).max())
    agreement = float((got.argmax(1) == ref.argmax(1)).mean())
    report = {
        "max_abs_diff": max_abs_diff,
        "top1_agreement": agreement,
        "num_images": len(images),
        "batch_sizes": sorted(set(sizes)),
    }
    problems = []
    if not max_abs_diff <= PARITY_MAX_ABS_DIFF:  # `not <=` also catches NaN
        problems.append(
            f"max |logit difference| {max_abs_diff:.3g} exceeds the limit {PARITY_MAX_ABS_DIFF:g} "
            f"by {max_abs_diff - PARITY_MAX_ABS_DIFF:.3g}"
        )
    if agreement < PARITY_MIN_TOP1_AGREEMENT:
        problems.append(
            f"top-1 agreement {agreement:.2%} is below the limit {PARITY_MIN_TOP1_AGREEMENT:.1%} "
            f"by {(PARITY_MIN_TOP1_AGREEMENT - agreement) * 100:.2f} points"
        )
    if problems:
        raise ExportError(
            f"parity gate failed on {len(images)} images (batch sizes {report['batch_sizes']}): "
            + "; ".join(problems)
            + ". No bundle was written: the ONNX model does not compute what the checkpoint does "
            "(an unsupported op, or a model changed after export?)"
        )
    return report


def onnx_accuracy(session: ort.InferenceSession, images: np.ndarray, labels: np.ndarray) -> float:
    logits = run_onnx(session, images, batch_schedule(len(images), (256,)))
    return float((logits.argmax(1) == labels).mean())


# ----------------------------------------------------------------------------- INT8


class _Calibration:
    """onnxruntime CalibrationDataReader over uint8 training images (duck-typed: get_next)."""

    def __init__(self, images: np.ndarray, batch: int = 32):
        self._batches: Iterator[np.ndarray] = (
            images[i : i + batch] for i in range(0, len(images), batch)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        b = next(self._batches, None)
        return None if b is None else {"images": b}


def quantize_int8(model_bytes: bytes, calibration: np.ndarray) -> bytes:
    """Static QDQ quantisation (int8 weights per channel, uint8 activations), MinMax-calibrated."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Calibration, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(model_bytes)
        # the quantiser logs a root-logger warning per unfused BatchNorm ("axis out of range"
        # for its 1-D weight): harmless here, and the accuracy check below is what decides
        root, level = logging.getLogger(), logging.getLogger().level
        root.setLevel(logging.ERROR)
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre),
                str(out),
                Reader(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        finally:
            root.setLevel(level)
        proto = onnx.load(str(out))
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    return proto.SerializeToString()
