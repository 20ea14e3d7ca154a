"""inference: onnxruntime vs PyTorch eager on the same model and batch sizes; INT8 vs FP32.

    python bench/inference.py --quick

The model is the default `resnet_small` at Fashion-MNIST's shape (1x28x28), exported by
`raycls.onnx_model.export_onnx` (uint8 in, normalisation inside the graph) and quantized by
`raycls.onnx_model.quantize_int8` (static QDQ, calibrated on real training images), exactly what a
bundle ships. PyTorch runs the same wrapped module (`UInt8Classifier`) under
`torch.inference_mode()`. Both sides use one thread, so the shared machine's other load moves them
alike; blocks of calls alternate (torch, ORT FP32, ORT INT8, ...) and medians are compared.

PyTorch eager has no INT8 path for this conv net without rewriting the model (eager-mode static
quantization needs QuantStub/DeQuantStub and fused modules; `quantize_dynamic` covers Linear
layers only), so INT8 is measured in onnxruntime only, against both FP32 figures.
"""

from __future__ import annotations

import time
from typing import Any

import harness
import numpy as np
import onnxruntime as ort
import torch

from raycls.models import build_model
from raycls.onnx_model import UInt8Classifier, export_onnx, quantize_int8

SETTINGS = {  # mode -> (dataset, calls per block, rounds)
    "tiny": ("digits", 3, 1),
    "quick": ("fashion-mnist", 30, 3),
    "full": ("fashion-mnist", 100, 5),
}
BATCH_SIZES = (1, 8, 64)


def ort_session(model_bytes: bytes, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def images_per_s(fn, batch: int, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return batch * calls / (time.perf_counter() - t0)


def main() -> None:
    args = harness.parser(__doc__.splitlines()[0]).parse_args()
    started = time.time()
    name, calls, rounds = SETTINGS[harness.mode(args)]
    torch.set_num_threads(1)
    ds = harness.load(name)
    data = ds.describe()
    torch.manual_seed(0)
    model = build_model("resnet_small", len(ds.classes), ds.channels, ds.image_size).eval()
    wrapped = UInt8Classifier(model, data["mean"], data["std"]).eval()
    fp32 = export_onnx(model, data)
    order = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(0))
    int8 = quantize_int8(fp32, ds.train.images[order[:256]].numpy())
    sessions = {"ort_fp32": ort_session(fp32), "ort_int8": ort_session(int8)}

    rows, notes, details = [], [], {"calls_per_block": calls, "rounds": rounds, "per_batch": {}}
    for batch in BATCH_SIZES:
        x_np = np.ascontiguousarray(ds.test.images[:batch].numpy())
        x_t = torch.from_numpy(x_np)

        def run_torch(x=x_t) -> None:
            with torch.inference_mode():
                wrapped(x)

        fns = {
            "torch_fp32": run_torch,
            **{k: (lambda s=s, x=x_np: s.run(["logits"], {"images": x})) for k, s in
               sessions.items()},
        }  # fmt: skip
        for fn in fns.values():  # warm-up: first calls allocate and pick kernels
            images_per_s(fn, batch, 3)
        samples = harness.alternate(
            {k: (lambda f=f, b=batch: images_per_s(f, b, calls)) for k, f in fns.items()}, rounds
        )
        med = {k: harness.median(v) for k, v in samples.items()}
        details["per_batch"][batch] = {"median_images_per_s": med, "samples": samples}
        cond = (f"resnet_small {ds.channels}x{ds.image_size}x{ds.image_size}, batch {batch}, "
                f"1 thread, median of {rounds} alternating blocks of {calls} calls")  # fmt: skip
        rows.append(harness.row(
            f"onnxruntime FP32 images/s, batch {batch}", med["ort_fp32"], "images/s",
            reference="PyTorch eager FP32", reference_value=med["torch_fp32"],
            target=1.5 if batch == 1 else None, conditions=cond,
        ))  # fmt: skip
        rows.append(harness.row(
            f"onnxruntime INT8 images/s, batch {batch}", med["ort_int8"], "images/s",
            reference="onnxruntime FP32", reference_value=med["ort_fp32"], conditions=cond,
        ))  # fmt: skip
    # INT8 accuracy cost, so its speed is read beside what it gives up
    test_x, test_y = ds.test.images.numpy(), ds.test.labels.numpy()
    accs: dict[str, Any] = {}
    for k, s in sessions.items():
        logits = np.concatenate([s.run(["logits"], {"images": test_x[i : i + 256]})[0]
                                 for i in range(0, len(test_x), 256)])  # fmt: skip
        accs[k] = float((logits.argmax(1) == test_y).mean())
    details["untrained_test_acc_agreement"] = accs
    notes.append(
        "The model is untrained (speed does not depend on the weights); INT8 accuracy is checked "
        "on trained models by `raycls export --int8` (kept only within 1 point of FP32)."
    )
    notes.append(
        "PyTorch INT8 not measured: eager mode has no static INT8 for conv nets without model "
        "rewrites (QuantStub/fusion); quantize_dynamic covers Linear layers only."
    )
    harness.write_result(args.out, "inference", args, rows, details, notes, started)


if __name__ == "__main__":
    main()
