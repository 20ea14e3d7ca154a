"""Dataset tooling: the generated image trees the data tests stand on, and `raycls data convert` /
`raycls data inspect` on real files (in-process and through the CLI, with exit codes)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raycls.convert import convert
from raycls.datatools import UsageError, inspect
from raycls.images import decode_image
from raycls.sources import open_source
from tests.imagetree import make_jpeg_tree, make_tree

REPO = Path(__file__).resolve().parents[1]

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


# ----------------------------------------------------------------------------- raycls data


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raycls", "data", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _read_parquet(folder: Path) -> tuple[list[dict], list]:
    import pyarrow.parquet as pq

    shards = sorted(folder.glob("part-*.parquet"))
    rows = [r for s in shards for r in pq.read_table(s).to_pylist()]
    return rows, [pq.read_schema(s).metadata for s in shards]


def test_convert_round_trips_a_splits_tree(tmp_path):
    m = make_tree(tmp_path / "tree", corrupt=2)
    summary = convert(f"imagefolder:{tmp_path / 'tree'}", tmp_path / "pq", log=lambda _: None)
    assert summary["images"] == {"train": 24, "val": 9, "test": 9}
    assert sorted(b["path"] for b in summary["bad_images"]) == sorted(m["corrupt"])
    rows, metas = _read_parquet(tmp_path / "pq")
    by_bytes = {r["image"]: r for r in rows}
    assert len(by_bytes) == len(rows) == 42  # every file once, none twice, no corrupt file
    for split, files in m["files"].items():
        for path, label in files:
            row = by_bytes[Path(path).read_bytes()]  # bytes unchanged
            assert (row["label"], row["split"]) == (label, split)
    for meta in metas:
        assert json.loads(meta[b"raycls.classes"]) == ["cat", "dog", "fox"]
        assert meta[b"raycls.split"].decode() in ("train", "val", "test")
    # split-major shards, each in a shuffled order (classes mixed within a shard)
    assert [s["split"] for s in summary["shards"]] == ["train", "val", "test"]
    assert [r["label"] for r in rows[:24]] != sorted(r["label"] for r in rows[:24])
    assert not list(tmp_path.glob(".pq.*"))  # no temporary folder left behind


def test_convert_output_reads_back_through_sources(tmp_path):
    m = make_tree(tmp_path / "tree")
    summary = convert(f"imagefolder:{tmp_path / 'tree'}", tmp_path / "pq", log=lambda _: None)
    src = open_source(f"parquet:{tmp_path / 'pq'}")
    assert src.classes == m["classes"]
    assert {n: len(s) for n, s in src.splits.items()} == summary["images"]
    by_bytes = {Path(p).read_bytes(): (c, split) for split, f in m["files"].items() for p, c in f}
    for name, split in src.splits.items():
        rows = list(split.iter_rows())
        assert len(rows) == summary["images"][name]
        assert all(by_bytes[r["image"]] == (r["label"], name) for r in rows)


def test_convert_keeps_a_flat_trees_seeded_shares(tmp_path):
    make_tree(tmp_path / "flat", layout="flat", classes=("a", "b"))
    spec = f"imagefolder:{tmp_path / 'flat'}"
    summary = convert(spec, tmp_path / "pq", seed=3, log=lambda _: None)
    listed = open_source(spec, seed=3)
    assert summary["images"] == {n: len(s) for n, s in listed.splits.items()}
    rows, _ = _read_parquet(tmp_path / "pq")
    for name, split in listed.splits.items():
        expect = sorted(Path(p).read_bytes() for p in split.paths)
        assert sorted(r["image"] for r in rows if r["split"] == name) == expect


def test_convert_shards_by_size(tmp_path):
    make_jpeg_tree(tmp_path / "j", 600, size=48, classes=3, layout="splits")
    summary = convert(f"imagefolder:{tmp_path / 'j'}", tmp_path / "pq", shard_mb=0.3,
                      log=lambda _: None)  # fmt: skip
    import pyarrow.parquet as pq

    assert len(summary["shards"]) > 2
    for shard in summary["shards"]:
        meta = pq.ParquetFile(tmp_path / "pq" / shard["file"]).metadata
        assert meta.num_rows == shard["rows"]
        assert all(meta.row_group(i).num_rows <= 256 for i in range(meta.num_row_groups))
    assert sum(s["rows"] for s in summary["shards"]) == 600


def test_convert_cli_exit_codes(tmp_path):
    make_tree(tmp_path / "tree", corrupt=3)
    src, dst = f"imagefolder:{tmp_path / 'tree'}", str(tmp_path / "pq")
    ok = _cli("convert", src, dst)
    assert ok.returncode == 0, ok.stderr
    assert "24 train, 9 val, 9 test" in ok.stdout and "skipped 3 unreadable" in ok.stdout
    again = _cli("convert", src, dst)
    assert again.returncode == 2 and "error: dst=" in again.stderr and "--overwrite" in again.stderr
    assert _cli("convert", src, dst, "--overwrite").returncode == 0
    too_many = _cli("convert", src, str(tmp_path / "pq2"), "--max-bad-images", "2")
    assert too_many.returncode == 1 and "error: --max-bad-images=2" in too_many.stderr
    assert not (tmp_path / "pq2").exists() and not list(tmp_path.glob(".pq2*"))
    missing = _cli("convert", f"imagefolder:{tmp_path / 'nope'}", str(tmp_path / "pq3"))
    assert missing.returncode == 1 and "error: dataset=imagefolder:" in missing.stderr
    bad_flag = _cli("convert", src, str(tmp_path / "pq4"), "--shard-mb", "0")
    assert bad_flag.returncode == 2 and "error: --shard-mb=0" in bad_flag.stderr
    not_folder = _cli("convert", f"parquet:{dst}", str(tmp_path / "pq5"))
    assert not_folder.returncode == 2 and "imagefolder:PATH" in not_folder.stderr
    for p in (ok, again, too_many, missing, bad_flag, not_folder):
        assert "Traceback" not in p.stderr


def test_convert_overwrite_refuses_a_foreign_folder(tmp_path):
    make_tree(tmp_path / "tree", per_class={"train": 2, "val": 1})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="did not write"):
        convert(f"imagefolder:{tmp_path / 'tree'}", tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_inspect_reports_classes_counts_and_bad_files(tmp_path):
    m = make_tree(tmp_path / "tree", corrupt=2)
    report = inspect(f"imagefolder:{tmp_path / 'tree'}", sample=1000)
    assert report["classes"] == ["cat", "dog", "fox"] and report["channels"] == 3
    assert {n: s["count"] for n, s in report["splits"].items()} == {"train": 26, "val": 9,
                                                                  "test": 9}  # fmt: skip
    train = report["splits"]["train"]
    assert sorted(b["path"] for b in train["unreadable"]) == sorted(m["corrupt"])
    assert train["width"]["min"] == 23 and train["height"]["max"] == 64
    assert "JPEG/CMYK" in train["formats"] and "PNG/I;16" in train["formats"]
    assert inspect(f"imagefolder:{tmp_path / 'tree'}", sample=5)["splits"]["val"]["sampled"] == 5

    proc = _cli("inspect", f"imagefolder:{tmp_path / 'tree'}", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "classes (3): cat, dog, fox" in proc.stdout and "train: 26 images" in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1])["splits"]["test"]["count"] == 9

    bad = _cli("inspect", f"imagefolder:{tmp_path / 'none'}")
    assert bad.returncode == 1 and bad.stderr.startswith("error: dataset=imagefolder:")
    assert _cli("inspect", f"imagefolder:{tmp_path / 'tree'}", "--sample", "0").returncode == 2
    assert _cli("inspect").returncode == 2  # argparse: the dataset is required


def test_inspect_reads_converted_parquet(tmp_path):
    make_tree(tmp_path / "tree")
    convert(f"imagefolder:{tmp_path / 'tree'}", tmp_path / "pq", log=lambda _: None)
    report = inspect(f"parquet:{tmp_path / 'pq'}", sample=4)
    assert report["classes"] == ["cat", "dog", "fox"] and report["splits"]["val"]["count"] == 9
    assert report["splits"]["train"]["sampled"] == 4 and not report["splits"]["train"]["unreadable"]
