"""The bundle format and the shared image decoder: what serving trusts, so it must refuse loudly.

Models here are built with onnx.helper (a Flatten + MatMul classifier), so these tests need
neither torch nor an export and run in well under a second.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from raycls.bundle import (
    FORMAT_VERSION,
    BundleError,
    load_bundle,
    newest_bundle,
    softmax,
    write_bundle,
)
from raycls.images import ImageError, decode_image

C, H, W, K = 1, 4, 4, 3
NOISE = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)  # incompressible


def linear_onnx(c: int = C, h: int = H, w: int = W, k: int = K, seed: int = 0) -> bytes:
    """uint8 images (N, c, h, w) -> Cast -> Flatten -> MatMul -> logits (N, k)."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(c * h * w, k)).astype(np.float32) / 255
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
            helper.make_node("Flatten", ["x"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "weight"], ["logits"]),
        ],
        "linear",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", c, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k])],
        [numpy_helper.from_array(weight, "weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # onnx 1.23 would write IR 14, which onnxruntime may not load
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def bundle_meta(name: str = "tiny", created: str = "2025-01-01T00:00:00+00:00") -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "classes": ["a", "b", "c"],
        "input": {
            "channels": C,
            "height": H,
            "width": W,
            "dtype": "uint8",
            "layout": "NCHW",
            "resize": "bilinear",
        },
        "metrics": {"val_acc": 0.5, "test_acc": 0.5, "onnx_test_acc": 0.5},
        "created": created,
    }


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return write_bundle(tmp_path / "models" / "tiny", bundle_meta(), {"model.onnx": linear_onnx()})


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


# ----------------------------------------------------------------------------- load / verify


def test_write_then_load_runs_the_verified_model(bundle_dir: Path) -> None:
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    assert set(meta["sha256"]) == {"model.onnx"}
    assert not [p for p in bundle_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs
    b = load_bundle(bundle_dir)
    assert (b.name, b.classes, b.channels, b.height, b.width) == ("tiny", ["a", "b", "c"], 1, 4, 4)
    images = np.random.default_rng(1).integers(0, 256, (5, C, H, W), dtype=np.uint8)
    logits = b.logits(images)
    assert logits.shape == (5, K) and logits.dtype == np.float32
    # the reference computation of the same linear model: the session really runs these bytes
    weight = numpy_helper.to_array(onnx.load_from_string(linear_onnx()).graph.initializer[0])
    np.testing.assert_allclose(logits, images.reshape(5, -1).astype(np.float32) @ weight, rtol=1e-5)
    preds = b.predict(images, top_k=2)
    assert len(preds) == 5 and all(len(p) == 2 for p in preds)
    for row, p in zip(logits, preds, strict=True):
        assert p[0]["index"] == int(row.argmax())
        assert p[0]["label"] == b.classes[p[0]["index"]]
        assert p[0]["probability"] >= p[1]["probability"]
    assert len(b.predict(images, top_k=50)[0]) == K  # top_k is capped at the number of classes


def test_one_changed_byte_is_refused(bundle_dir: Path) -> None:
    model = bundle_dir / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx: sha256 mismatch"):
        load_bundle(bundle_dir)


def test_wrong_hash_in_bundle_json_is_refused(bundle_dir: Path) -> None:
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    meta["sha256"]["model.onnx"] = "0" * 64
    (bundle_dir / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(bundle_dir)


def test_missing_files_are_refused(bundle_dir: Path) -> None:
    (bundle_dir / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.onnx: missing"):
        load_bundle(bundle_dir)
    (bundle_dir / "bundle.json").unlink()
    with pytest.raises(BundleError, match=r"bundle\.json: missing"):
        load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="no such bundle directory"):
        load_bundle(bundle_dir.parent / "nope")


def test_unknown_format_version_is_refused(bundle_dir: Path) -> None:
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    meta["format_version"] = 99
    (bundle_dir / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="unknown format_version 99"):
        load_bundle(bundle_dir)


def test_model_input_must_match_bundle_json(tmp_path: Path) -> None:
    # a model for 1x5x5 images in a bundle that claims 1x4x4: hashes fine, shapes do not
    d = write_bundle(tmp_path / "m", bundle_meta(), {"model.onnx": linear_onnx(h=5, w=5)})
    with pytest.raises(BundleError, match=r"does not match bundle\.json: input shape"):
        load_bundle(d)
    meta = bundle_meta()
    meta["classes"] = ["a", "b"]  # the model has 3 outputs
    d = write_bundle(tmp_path / "m2", meta, {"model.onnx": linear_onnx()})
    with pytest.raises(BundleError, match="3 outputs but bundle.json lists 2"):
        load_bundle(d)


def test_path_traversal_names_in_bundle_json_are_refused(bundle_dir: Path) -> None:
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    meta["sha256"]["../secret"] = "0" * 64
    (bundle_dir / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="invalid file name"):
        load_bundle(bundle_dir)


def test_int8_requested_but_absent_names_the_reason(tmp_path: Path) -> None:
    meta = bundle_meta()
    meta["int8"] = {"kept": False, "test_acc": 0.1, "reason": "accuracy dropped 5.0 points"}
    d = write_bundle(tmp_path / "m", meta, {"model.onnx": linear_onnx()})
    with pytest.raises(BundleError, match="accuracy dropped 5.0 points"):
        load_bundle(d, int8=True)


def test_rewrite_replaces_a_bundle_and_newest_bundle_picks_latest(tmp_path: Path) -> None:
    root = tmp_path / "models"
    with pytest.raises(BundleError, match="raycls export"):
        newest_bundle(root)
    write_bundle(
        root / "old", bundle_meta("old", "2025-01-01T00:00:00+00:00"), {"model.onnx": linear_onnx()}
    )
    write_bundle(
        root / "new",
        bundle_meta("new", "2025-06-01T00:00:00+00:00"),
        {"model.onnx": linear_onnx(seed=1)},
    )
    assert newest_bundle(root).name == "new"
    # overwrite "old" with a later bundle: it becomes the newest and its hash is the new model's
    write_bundle(
        root / "old",
        bundle_meta("old", "2025-09-01T00:00:00+00:00"),
        {"model.onnx": linear_onnx(seed=2)},
    )
    assert newest_bundle(root).name == "old"
    assert load_bundle(root / "old").session is not None
    assert sorted(p.name for p in root.iterdir()) == ["new", "old"]


def test_bundle_module_does_not_import_torch() -> None:
    code = "import sys, raycls.bundle; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_softmax_is_stable_and_normalised() -> None:
    p = softmax(np.array([[1000.0, 1000.0, -1000.0], [0.0, 0.0, 0.0]], dtype=np.float32))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(p[0], [0.5, 0.5, 0.0], atol=1e-6)


# ----------------------------------------------------------------------------- decode_image


def test_decode_png_roundtrips_exactly() -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    out = decode_image(png_bytes(grey), 1, 8, 8)
    assert out.shape == (1, 8, 8) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], grey)
    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(png_bytes(rgb), 3, 6, 7), rgb.transpose(2, 0, 1))


def test_decode_resizes_with_pillow_bilinear() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = decode_image(png_bytes(rgb), 3, 8, 9)
    expected = np.asarray(Image.fromarray(rgb).resize((9, 8), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out, expected.transpose(2, 0, 1))
    assert decode_image(png_bytes(rgb), 1, 8, 9).shape == (1, 8, 9)  # RGB -> grey


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_decode_every_allowed_format(fmt: str) -> None:
    rgb = np.full((10, 10, 3), 200, dtype=np.uint8)
    out = decode_image(png_bytes(rgb, fmt), 3, 10, 10)
    assert out.shape == (3, 10, 10)
    assert abs(int(out.mean()) - 200) <= 3  # lossy formats land close


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "CMYK", "1", "I;16"])
def test_decode_converts_odd_modes(mode: str) -> None:
    im = Image.new(mode, (5, 4))
    buf = io.BytesIO()
    im.save(buf, "TIFF" if mode == "CMYK" else "PNG")
    assert decode_image(buf.getvalue(), 3, 4, 5).shape == (3, 4, 5)
    assert decode_image(buf.getvalue(), 1, 4, 5).shape == (1, 4, 5)


def test_decode_16_bit_is_scaled_not_clipped() -> None:
    a = np.full((4, 4), 32896, dtype=np.uint16)  # 128 * 257: mid-grey in 16 bits
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    assert int(decode_image(buf.getvalue(), 1, 4, 4).max()) == 128


def test_decode_first_gif_frame_only() -> None:
    frames = [Image.new("L", (4, 4), v) for v in (10, 250)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert int(decode_image(buf.getvalue(), 1, 4, 4).mean()) == 10


@pytest.mark.parametrize(
    "data, status, code",
    [
        (b"", 400, "empty_image"),
        (b"this is not an image at all" * 4, 400, "not_an_image"),
        (png_bytes(NOISE)[:300], 400, "truncated_image"),  # cut inside the pixel data
        (b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', 415, "unsupported_type"),
    ],
)
def test_decode_rejects_bad_bytes(data: bytes, status: int, code: str) -> None:
    with pytest.raises(ImageError) as e:
        decode_image(data, 1, 8, 8)
    assert (e.value.status, e.value.code) == (status, code)


def test_decode_rejects_a_format_not_allowed() -> None:
    ico = png_bytes(np.zeros((16, 16, 3), np.uint8), "ICO")
    with pytest.raises(ImageError, match="ICO is not accepted") as e:
        decode_image(ico, 3, 8, 8)
    assert (e.value.status, e.value.code) == (415, "unsupported_type")
    # and a caller can narrow the list: a valid PNG refused when only JPEG is allowed
    with pytest.raises(ImageError) as e:
        decode_image(png_bytes(np.zeros((4, 4), np.uint8)), 1, 4, 4, formats=("JPEG",))
    assert e.value.status in (400, 415)


def test_decompression_bomb_refused_before_decoding() -> None:
    buf = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buf, "PNG")  # ~64 kB on disk, 64 megapixels decoded
    assert len(buf.getvalue()) < 200_000
    with pytest.raises(ImageError, match="over the limit") as e:
        decode_image(buf.getvalue(), 1, 8, 8)
    assert (e.value.status, e.value.code) == (413, "too_many_pixels")
    with pytest.raises(ImageError) as e:
        decode_image(png_bytes(np.zeros((10, 10), np.uint8)), 1, 8, 8, max_pixels=99)
    assert e.value.code == "too_many_pixels"


# ----------------------------------------------------------------------------- fuzzing

_VALID = {fmt: png_bytes(NOISE[:16, :16], fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF")}


@settings(max_examples=150, deadline=None)
@given(
    fmt=st.sampled_from(sorted(_VALID)),
    cut=st.integers(0, 2000),
    flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 255)), max_size=4),
)
def test_corrupted_images_raise_only_image_error(fmt: str, cut: int, flips) -> None:
    """Truncated or bit-flipped files of every allowed format: an array or an ImageError, never
    another exception (which serving would turn into a 500)."""
    data = bytearray(_VALID[fmt][: max(1, cut)])
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    try:
        out = decode_image(bytes(data), 3, 8, 8)
    except ImageError as e:
        assert e.status in (400, 413, 415) and e.code
    else:
        assert out.shape == (3, 8, 8) and out.dtype == np.uint8


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=512))
def test_random_bytes_raise_only_image_error(data: bytes) -> None:
    try:
        decode_image(data, 1, 8, 8)
    except ImageError as e:
        assert e.status in (400, 413, 415)
