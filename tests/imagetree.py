"""Real image trees for tests and benchmarks, generated on the spot.

`make_tree` writes a small, deliberately messy folder tree (several formats, modes and sizes, a
16-bit PNG, optional truncated files), `make_jpeg_tree` a large plain one (RGB JPEGs, quality 90)
fast enough to write tens of thousands of files. Both return a manifest:

    {"files": {split: [(path, class_index), ...]}, "classes": [...], "corrupt": [paths]}

`split` is "train" / "val" / "test" for the `splits` layout (`root/<split>/<class>/<file>`) and
"all" for the `flat` layout (`root/<class>/<file>`). Corrupt files are listed only under "corrupt".

Every image is learnable and distinct: class c has its own colour, brightness and stripe angle
(all three survive greyscale and random-resized crops), and each file gets its own stripe phase and
pixel noise, so no two files are byte-identical and a tiny model beats chance within 2 epochs.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")
EXTENSIONS = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "GIF": "gif",
    "TIFF": "tif",
}
# which modes each format is written in (CMYK only as JPEG, P / RGBA only as PNG)
_MODES_BY_FORMAT = {"JPEG": ("RGB", "L", "CMYK"), "PNG": ("RGB", "L", "RGBA", "P")}
# every 7th file is one of these, so each kind appears in a default-sized tree
_EXTRA_KINDS = (("PNG", "I;16"), ("WEBP", "RGB"), ("BMP", "RGB"), ("GIF", "P"), ("TIFF", "RGB"))
_PERIOD = 8  # stripe period in pixels


def _palette(n: int) -> np.ndarray:
    """(n, 3) float RGB: evenly spaced hues and a brightness ramp, so classes differ in grey too."""
    out = np.empty((n, 3))
    for c in range(n):
        h = c / n
        k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0  # HSV -> RGB with s=v=1
        rgb = 1.0 - np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
        value = 0.45 + 0.5 * (c / max(n - 1, 1))
        out[c] = 255.0 * value * (0.35 + 0.65 * rgb)
    return out


def _class_tile(c: int, n: int, height: int, width: int) -> np.ndarray:
    """(height + 2P, width + 2P, 3) float pattern of class c; a random window of it = a phase."""
    angle = math.pi * c / n
    y, x = np.mgrid[0 : height + 2 * _PERIOD, 0 : width + 2 * _PERIOD].astype(np.float64)
    s = 0.5 + 0.5 * np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / _PERIOD)
    return _palette(n)[c] * (0.55 + 0.45 * s)[..., None]


def _pixels(rng: np.random.Generator, tile: np.ndarray, height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8: a random window of the class tile plus pixel noise."""
    oy, ox = rng.integers(0, 2 * _PERIOD, size=2)
    window = tile[oy : oy + height, ox : ox + width]
    noise = rng.normal(0.0, 14.0, size=window.shape)
    return np.clip(window + noise, 0, 255).astype(np.uint8)


def _encode(rgb: np.ndarray, fmt: str, mode: str, rng: np.random.Generator) -> bytes:
    """Encode (H, W, 3) uint8 as `fmt` in `mode`."""
    im = Image.fromarray(rgb, "RGB")
    if mode == "L":
        im = im.convert("L")
    elif mode == "CMYK":
        im = im.convert("CMYK")
    elif mode == "RGBA":
        # mostly opaque: the visible content (composited onto black on decode) keeps the class
        alpha = rng.integers(200, 256, size=rgb.shape[:2], dtype=np.uint8)
        im.putalpha(Image.fromarray(alpha, "L"))
    elif mode == "P":
        im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    elif mode == "I;16":
        grey = np.asarray(im.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
        im = Image.fromarray(grey)  # mode I;16
        assert im.mode == "I;16", im.mode
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.save(buf, "JPEG", quality=90)
    elif fmt == "WEBP":
        im.save(buf, "WEBP", quality=90)
    else:
        im.save(buf, fmt)
    return buf.getvalue()


def _truncated_jpeg(rgb: np.ndarray) -> bytes:
    """A JPEG cut inside its header (before the scan): Pillow cannot even identify it."""
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    sos = data.find(b"\xff\xda")
    return data[: max(sos // 2, 4)]


def _kinds(formats, modes) -> list[tuple[str, str]]:
    kinds = [(f, m) for f in formats for m in _MODES_BY_FORMAT.get(f, ("RGB",)) if m in modes]
    if not kinds:
        raise ValueError(f"no (format, mode) pair from formats={formats} modes={modes}")
    return kinds


def make_tree(
    root,
    *,
    layout: str = "splits",
    classes=("cat", "dog", "fox"),
    per_class=None,
    sizes=((40, 32), (64, 64), (23, 57)),
    formats=("JPEG", "PNG"),
    modes=("RGB", "L", "RGBA", "P", "CMYK"),
    seed: int = 0,
    corrupt: int = 0,
    extras: bool = True,
) -> dict:
    """Write a mixed-format image tree under `root`; returns the manifest (module docstring).

    per_class: images per class and split (default {"train": 8, "val": 3, "test": 3}); with
    layout="flat" the counts are summed into one folder per class. sizes: (width, height) pairs,
    cycled. extras: every 7th file is a 16-bit PNG, WEBP, BMP, GIF or TIFF (in turn).
    corrupt: extra truncated JPEGs written into the train class folders (class folders if flat).
    """
    if layout not in ("splits", "flat"):
        raise ValueError(f"layout={layout!r}: must be 'splits' or 'flat'")
    per_class = dict(per_class or {"train": 8, "val": 3, "test": 3})
    root = Path(root)
    rng = np.random.default_rng(seed)
    n = len(classes)
    kinds = _kinds(formats, modes)
    extra = [k for k in _EXTRA_KINDS if k[0] != "PNG" or "PNG" in formats] if extras else []
    tiles = {}
    if layout == "flat":
        groups = {"all": sum(per_class.values())}
    else:
        groups = {s: k for s, k in per_class.items() if k > 0}
    files: dict[str, list[tuple[str, int]]] = {g: [] for g in groups}
    j = plain = 0  # running file numbers: pick the size and the (format, mode)
    for group, count in groups.items():
        for c, name in enumerate(classes):
            folder = root / name if layout == "flat" else root / group / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                w, h = sizes[j % len(sizes)]
                if (w, h, c) not in tiles:
                    tiles[w, h, c] = _class_tile(c, n, h, w)
                if extra and j % 7 == 3:
                    fmt, mode = extra[(j // 7) % len(extra)]
                else:
                    fmt, mode = kinds[plain % len(kinds)]
                    plain += 1
                data = _encode(_pixels(rng, tiles[w, h, c], h, w), fmt, mode, rng)
                tag = mode.replace(";", "").lower()
                path = folder / f"{group}_{c}_{i:04d}_{tag}.{EXTENSIONS[fmt]}"
                path.write_bytes(data)
                files[group].append((str(path), c))
                j += 1
    bad = []
    for k in range(corrupt):
        c = k % n
        folder = root / classes[c] if layout == "flat" else root / "train" / classes[c]
        folder.mkdir(parents=True, exist_ok=True)
        w, h = sizes[k % len(sizes)]
        path = folder / f"corrupt_{k:04d}.jpg"
        path.write_bytes(_truncated_jpeg(_pixels(rng, _class_tile(c, n, h, w), h, w)))
        bad.append(str(path))
    return {"files": files, "classes": list(classes), "corrupt": bad}


def make_jpeg_tree(
    root,
    n_images: int,
    size: int = 160,
    classes: int = 10,
    seed: int = 0,
    *,
    layout: str = "flat",
    val_fraction: float = 0.1,
    quality: int = 90,
) -> dict:
    """Write `n_images` plain RGB JPEGs (size x size, `classes` balanced classes) for benchmarks.

    layout="flat": `root/<class>/` (manifest split "all"); layout="splits": `root/train/<class>/`
    and `root/val/<class>/` with `val_fraction` of each class in val. About 1-2 ms a 160 px file.
    """
    if layout not in ("splits", "flat"):
        raise ValueError(f"layout={layout!r}: must be 'splits' or 'flat'")
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = [f"class{c:02d}" for c in range(classes)]
    tiles = [_class_tile(c, classes, size, size).astype(np.int16) for c in range(classes)]
    # one bank of noise, read at a random offset per file: ~3x faster than fresh normals
    bank = np.clip(rng.normal(0.0, 14.0, size=1 << 22), -60, 60).astype(np.int16)
    n_px = size * size * 3
    files: dict[str, list[tuple[str, int]]] = {}
    for c, name in enumerate(names):
        count = n_images // classes + (1 if c < n_images % classes else 0)
        n_val = round(count * val_fraction) if layout == "splits" else 0
        for i in range(count):
            group = "all" if layout == "flat" else ("val" if i < n_val else "train")
            folder = root / name if layout == "flat" else root / group / name
            if i == 0 or (layout == "splits" and i == n_val):
                folder.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            oy, ox = rng.integers(0, 2 * _PERIOD, size=2)
            start = int(rng.integers(0, bank.size - n_px))
            noise = bank[start : start + n_px].reshape(size, size, 3)
            rgb = np.clip(tiles[c][oy : oy + size, ox : ox + size] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(rgb, "RGB").save(buf, "JPEG", quality=quality)
            path = folder / f"{c:02d}_{i:06d}.jpg"
            path.write_bytes(buf.getvalue())
            files.setdefault(group, []).append((str(path), c))
    return {"files": files, "classes": names, "corrupt": []}
