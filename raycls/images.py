"""The one image decoder: encoded bytes -> uint8 (C, H, W) for a model's input, used by training
ingestion, export's parity gate, `raycls predict`, `raycls evaluate` and serving alike.

Formats are sniffed before decoding (an unsupported but recognised format is a 415, garbage a
400), the pixel count is checked before any pixels are decoded (decompression bombs), every mode
(grey, RGBA, palette, CMYK, 16-bit) converts to the model's channels, and the resize follows the
bundle's rule: "stretch" or "center-crop". Standard library, numpy and Pillow only: no torch.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_MAX_PIXELS = 40_000_000  # a 24 KB PNG can claim 196 megapixels: refuse before decoding


class ImageError(ValueError):
    """A client image cannot be used; carries the HTTP status and a stable error code."""

    def __init__(self, message: str, status: int = 400, code: str = "not_an_image"):
        super().__init__(message)
        self.status = status
        self.code = code


# Formats with an unambiguous signature that we recognise only to answer 415 instead of 400.
# Formats whose "accept" test is weak (TGA, IPTC, ...) are left out: garbage must not read as TGA.
_SNIFFED_FORMATS = (
    "AVIF", "ICO", "CUR", "DDS", "EPS", "PSD", "PPM", "JPEG2000", "ICNS", "QOI", "SGI", "FITS",
    "BLP", "DCX", "FLI", "PCX", "XBM", "XPM", "SUN", "HDF5", "WMF",
)  # fmt: skip


def _sniff_format(prefix: bytes, candidates: tuple[str, ...]) -> str | None:
    """The first of `candidates` whose magic bytes start `prefix` (Pillow's signature checks on
    the first bytes only: no plugin parses anything), else None."""
    Image.init()
    for fmt in candidates:
        entry = Image.OPEN.get(fmt)
        if entry is None or entry[1] is None:
            continue
        try:
            if entry[1](prefix) is True:
                return fmt
        except Exception:  # a signature check that chokes on garbage just means "not this one"
            continue
    return None


def _sniff_other_format(prefix: bytes, allowed: tuple[str, ...]) -> str | None:
    """Name of a known but disallowed image format whose signature starts `prefix`, else None."""
    head = prefix.lstrip()[:64].lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in prefix[:512]):
        return "SVG"
    return _sniff_format(prefix, tuple(f for f in _SNIFFED_FORMATS if f not in allowed))


def _to_uint8_mode(im: Image.Image, channels: int) -> Image.Image:
    """Convert any decoded frame to 'L' (channels=1) or 'RGB' (channels=3)."""
    target = "L" if channels == 1 else "RGB"
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit and float images: Pillow's convert('L') clips instead of scaling, so a 16-bit
        # PNG would come out almost white. Scale 16-bit range down by 257 (65535 -> 255).
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0
        elif im.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        # Composite onto black: the colour hidden under fully transparent pixels is arbitrary,
        # black makes the result depend only on what is visible.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, rgba)
    if im.mode == "1":
        im = im.convert("L")
    if im.mode != target:
        try:
            im = im.convert(target)
        except (ValueError, OSError) as e:
            raise ImageError(
                f"image mode {im.mode} cannot be converted to {target}: {e}; send an RGB or "
                "greyscale image",
                415,
                "unsupported_type",
            ) from None
    return im


RESIZE_RULES = ("stretch", "center-crop")
_RESIZE_ALIASES = {"bilinear": "stretch"}  # bundles of format 1 before the crop rule existed


def resize_rule(name: str) -> str:
    """The canonical name of a resize rule ("stretch" or "center-crop"); ValueError otherwise."""
    rule = _RESIZE_ALIASES.get(name, name)
    if rule not in RESIZE_RULES:
        raise ValueError(f"resize rule {name!r}: use one of {', '.join(RESIZE_RULES)}")
    return rule


def open_image(
    data: bytes,
    channels: int,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: tuple[str, ...] = ALLOWED_FORMATS,
    draft: tuple[int, int] | None = None,
) -> Image.Image:
    """Encoded image bytes -> a decoded 'L' or 'RGB' Pillow image: the one way bytes become
    pixels in raycls (training ingestion, export, predict, evaluate and serving all come here).

    The pixel count is checked before any pixel is decoded; only the first frame is used; alpha
    is composited onto black, 16-bit images are scaled, palette/CMYK/grey converted. `draft`
    (width, height) lets a JPEG decode at a reduced scale that still covers that size (Pillow's
    `draft`, DCT scaling: a 4000x3000 photo decodes about 8x faster for a 224 px crop).
    Raises ImageError (status 400/413/415) for anything a client could have sent wrong.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}: must be 1 (greyscale) or 3 (RGB)")
    if not data:
        raise ImageError("empty image: no bytes", 400, "empty_image")
    formats = tuple(f.upper() for f in formats)
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning is noise here: our max_pixels check below decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}", 413, "too_many_pixels") from None
    except Exception:
        if _sniff_format(data[:1024], formats):
            # an accepted format's signature, but its header could not be read: cut short
            raise ImageError(
                "image data is truncated or corrupt (its header cannot be read)",
                400,
                "truncated_image",
            ) from None
        other = _sniff_other_format(data[:1024], formats)
        if other:
            raise ImageError(
                f"image format {other} is not accepted; send one of {', '.join(formats)}",
                415,
                "unsupported_type",
            ) from None
        raise ImageError(
            f"not a recognised image (accepted formats: {', '.join(formats)})", 400, "not_an_image"
        ) from None
    with im:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise ImageError(f"image has zero size ({w}x{h})", 400, "empty_image")
        if w * h > max_pixels:
            raise ImageError(
                f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}; "
                "downscale it before sending",
                413,
                "too_many_pixels",
            )
        try:
            im.seek(0)  # first frame of GIF / multi-page TIFF
            if draft is not None and im.format == "JPEG":
                im.draft(None, draft)  # scale only: the mode conversion stays ours
            im.load()
        except OSError as e:
            raise ImageError(
                f"image data is truncated or corrupt ({e})", 400, "truncated_image"
            ) from None
        except Exception as e:  # plugins raise SyntaxError/ValueError/struct.error on bad data
            raise ImageError(f"image data cannot be decoded ({e})", 400, "not_an_image") from None
        try:
            return _to_uint8_mode(im, channels)
        except ImageError:
            raise
        except Exception as e:
            raise ImageError(f"image cannot be converted ({e})", 400, "not_an_image") from None


def center_box(size: tuple[int, int], height: int, width: int) -> tuple[float, float, float, float]:
    """The largest centred box of the target's aspect ratio inside an image of `size` (w, h)."""
    w, h = size
    if w * height > h * width:  # wider than the target: trim the sides
        bw, bh = h * width / height, h
    else:
        bw, bh = w, w * height / width
    left, top = (w - bw) / 2, (h - bh) / 2
    return (left, top, left + bw, top + bh)


def to_array(frame: Image.Image) -> np.ndarray:
    """'L' or 'RGB' Pillow image -> uint8 (C, H, W)."""
    arr = np.asarray(frame, dtype=np.uint8)  # (H, W) or (H, W, 3)
    return np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))


def resize_image(
    frame: Image.Image, height: int, width: int, rule: str = "stretch",
    box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Resize a decoded frame to uint8 (C, height, width) with Pillow BILINEAR.

    "stretch": the whole image to the target size (aspect ratio not kept; what the built-in
    datasets' bundles use). "center-crop": the largest centred box of the target's aspect ratio,
    resized (validation, test and serving for imagefolder/parquet datasets). `box` overrides the
    rule with an explicit source box (the training crops of `raycls.stream`).
    """
    rule = resize_rule(rule)
    if box is None and rule == "center-crop":
        box = center_box(frame.size, height, width)
    full = (0.0, 0.0, float(frame.size[0]), float(frame.size[1]))
    if frame.size != (width, height) or (box is not None and tuple(box) != full):
        frame = frame.resize((width, height), Image.Resampling.BILINEAR, box=box)
    return to_array(frame)


def draft_size(height: int, width: int, zoom: float = 1.0) -> tuple[int, int]:
    """The (width, height) a JPEG must at least decode to so that crops `zoom` times smaller
    than the image still have the target's resolution (see open_image's `draft`). Either rule's
    box spans the whole image in at least one dimension, so zoom 1 keeps the target's detail."""
    return (max(1, round(width * zoom)), max(1, round(height * zoom)))


def decode_image(
    data: bytes,
    channels: int,
    height: int,
    width: int,
    *,
    resize: str = "stretch",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: tuple[str, ...] = ALLOWED_FORMATS,
) -> np.ndarray:
    """Encoded image bytes -> uint8 (C, H, W) by `open_image` then `resize_image(rule=resize)`.

    Shared by training ingestion, export, `raycls predict`, `raycls evaluate` and serving, so a
    served answer equals a local one and the model is served the pixels it was validated on.
    """
    rule = resize_rule(resize)
    frame = open_image(data, channels, max_pixels=max_pixels, formats=formats,
                       draft=draft_size(height, width))
    return resize_image(frame, height, width, rule)
