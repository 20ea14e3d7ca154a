"""Test bundles: a tiny MLP trained on the digits test set's neighbours, exported for real.

Built with torch.onnx.export + raycls.bundle.write_bundle (the same format raycls.export writes),
so the serving tests run against a genuine sha256-verified bundle with a meaningful onnx_test_acc.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def build_digits_bundle(
    directory: Path, name: str = "digits", seed: int = 0, parity: bool = False
) -> dict:
    """Train a 64-32-10 MLP on digits for ~1 s, export it, write a bundle; return test data.
    `parity=True`: a second task on the same images (classes "even", "odd"), for serving two
    models that must give different answers."""
    import torch
    from torch import nn

    from raycls import bundle as bundle_lib
    from raycls.data import load_dataset

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    ds = load_dataset("digits", val_fraction=0.1, seed=0)
    classes = ["even", "odd"] if parity else list(ds.classes)
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)

    class Net(nn.Module):
        """uint8 images in, logits out: scaling and normalisation inside, as export does."""

        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, len(classes))
            )

        def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N, 1, 8, 8) uint8
            x = (images.float() / 255.0 - mean) / std
            return self.body(x)

    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    x, y = ds.train.images, ds.train.labels % 2 if parity else ds.train.labels
    for _ in range(300):  # full batch; ~95% test accuracy
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    buf = io.BytesIO()
    torch.onnx.export(
        net, (x[:2],), buf, input_names=["images"], output_names=["logits"],
        dynamic_axes={"images": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False,
    )  # fmt: skip
    onnx_bytes = buf.getvalue()

    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    test_x, test_y = ds.test.images.numpy(), ds.test.labels.numpy()
    test_y = test_y % 2 if parity else test_y
    logits = sess.run(["logits"], {"images": test_x})[0]
    onnx_test_acc = float((logits.argmax(1) == test_y).mean())
    meta = {
        "name": name,
        "classes": classes,
        "input": {
            "channels": 1,
            "height": 8,
            "width": 8,
            "dtype": "uint8",
            "layout": "NCHW",
            "resize": "bilinear",
        },  # fmt: skip
        "metrics": {"onnx_test_acc": onnx_test_acc, "test_acc": onnx_test_acc},
        "config": {"dataset": "digits", "model": "mlp-test"},
    }
    path = bundle_lib.write_bundle(directory, meta, {"model.onnx": onnx_bytes})
    return {"path": path, "test_images": test_x, "test_labels": test_y, "acc": onnx_test_acc}


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (C, H, W) -> PNG bytes (lossless, so the server decodes the same pixels)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buf, "PNG")
    return buf.getvalue()
