"""Dataset tooling: the generated image trees the data tests stand on, and `raycls data convert` /
`raycls data inspect` on real files (in-process and through the CLI, with exit codes)."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raycls.bundle import decode_image
from tests.imagetree import make_jpeg_tree, make_tree

# ----------------------------------------------------------------------------- generated trees


def _all(manifest: dict) -> list[tuple[str, int]]:
    return [f for files in manifest["files"].values() for f in files]


def test_make_tree_writes_a_mixed_decodable_tree(tmp_path):
    m = make_tree(tmp_path, corrupt=2)
    assert m["classes"] == ["cat", "dog", "fox"]
    assert {s: len(f) for s, f in m["files"].items()} == {"train": 24, "val": 9, "test": 9}
    for split, files in m["files"].items():
        for path, label in files:
            assert Path(path).parent == tmp_path / split / m["classes"][label]
    kinds, digests = Counter(), set()
    for path, _ in _all(m):
        data = Path(path).read_bytes()
        digests.add(hashlib.sha256(data).hexdigest())
        with Image.open(path) as im:
            kinds[im.format, im.mode] += 1
            assert im.mode != "CMYK" or im.format == "JPEG"
            assert im.mode not in ("P", "RGBA") or im.format in ("PNG", "GIF")
        assert decode_image(data, 3, 24, 24).shape == (3, 24, 24)
    assert len(digests) == len(_all(m)), "two generated files are byte-identical"
    formats = {f for f, _ in kinds}
    assert {"JPEG", "PNG"} <= formats and formats & {"WEBP", "BMP", "GIF", "TIFF"}
    assert {("PNG", "I;16"), ("JPEG", "CMYK"), ("PNG", "P"), ("PNG", "RGBA")} <= set(kinds)
    assert len(m["corrupt"]) == 2
    for path in m["corrupt"]:
        assert Path(path).parent.parent == tmp_path / "train"
        with pytest.raises(Exception):  # noqa: B017 - Pillow raises OSError or SyntaxError
            with Image.open(path) as im:
                im.verify()


def test_make_tree_flat_layout_and_seed(tmp_path):
    m = make_tree(tmp_path / "a", layout="flat", classes=("x", "y"), per_class={"train": 3})
    assert list(m["files"]) == ["all"] and len(m["files"]["all"]) == 6
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x", "y"]
    again = make_tree(tmp_path / "b", layout="flat", classes=("x", "y"), per_class={"train": 3})
    for (p, _), (q, _) in zip(m["files"]["all"], again["files"]["all"], strict=True):
        assert Path(p).read_bytes() == Path(q).read_bytes()  # same seed, same bytes


def test_make_tree_is_learnable(tmp_path):
    """Nearest class mean on 16 px greyscale pixels, fitted on train, beats chance on val+test:
    the class signal survives greyscale, the modes and the sizes."""
    m = make_tree(tmp_path, per_class={"train": 12, "val": 6, "test": 6})

    def xy(files):
        x = np.stack([decode_image(Path(p).read_bytes(), 1, 16, 16).ravel() for p, _ in files])
        return x.astype(np.float64) / 255.0, np.array([c for _, c in files])

    x, y = xy(m["files"]["train"])
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    xt, yt = xy(m["files"]["val"] + m["files"]["test"])
    pred = ((xt[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yt).mean() > 0.6  # chance is 1/3


def test_make_jpeg_tree_counts_and_layouts(tmp_path):
    m = make_jpeg_tree(tmp_path / "s", 50, size=32, classes=5, layout="splits", val_fraction=0.2)
    assert {s: len(f) for s, f in m["files"].items()} == {"train": 40, "val": 10}
    assert Counter(c for _, c in m["files"]["val"]) == dict.fromkeys(range(5), 2)
    m = make_jpeg_tree(tmp_path / "f", 23, size=32, classes=4)
    assert len(m["files"]["all"]) == 23 and len(list((tmp_path / "f").glob("*/*.jpg"))) == 23
    with Image.open(m["files"]["all"][0][0]) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (32, 32))
    digests = {hashlib.sha256(Path(p).read_bytes()).digest() for p, _ in m["files"]["all"]}
    assert len(digests) == 23
