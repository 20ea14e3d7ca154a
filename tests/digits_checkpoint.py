"""A real digits checkpoint in about a second: what the export and predict/evaluate tests export."""

from __future__ import annotations

from pathlib import Path

import torch

from raycls.checkpoints import save_checkpoint
from raycls.config import TrainConfig
from raycls.data import load_dataset
from raycls.models import build_model
from raycls.onnx_model import normalise


def train_digits_checkpoint(directory: Path, steps: int = 60, width: int = 4) -> dict:
    """A few AdamW steps on digits (about a second on one thread); returns the meta written."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    ds = load_dataset("digits")
    data = ds.describe()
    model = build_model("resnet_small", len(ds.classes), ds.channels, ds.image_size, width=width)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(ds.train), (64,))
        x = normalise(ds.train.images[idx], data["mean"], data["std"])
        loss = torch.nn.functional.cross_entropy(model(x), ds.train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        x = normalise(ds.test.images, data["mean"], data["std"])
        test_acc = (model(x).argmax(1) == ds.test.labels).float().mean().item()
    meta = {
        "config": TrainConfig(model_width=width).to_dict(),
        "data": data,
        "epoch": 1,
        "metrics": {"val_acc": 0.5, "test_acc": test_acc},
    }
    save_checkpoint(directory, {"model": model.state_dict()}, meta)
    return meta
