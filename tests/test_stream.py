"""Streaming ingestion (raycls.stream, raycls.sources): layouts, the one decoder, exactly-once
epochs across ranks, exact validation, a hard-killed worker, bad files. The runs are shared
(`stream_runs` in conftest.py); the HTTP half is in tests/serving/test_stream_serving.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raycls.sources import SourceError, open_source, row_id

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- layouts


def test_torchvision_layout_gives_the_splits(stream_tree) -> None:
    src = open_source(f"imagefolder:{stream_tree['root']}")
    assert src.layout == "splits" and src.classes == ["cat", "dog", "fox"]
    assert src.channels == 3  # RGB files among grey ones
    for split in ("val", "test"):  # the folders are the splits: nothing moved around
        want = sorted(str(p) for p, _ in stream_tree["files"][split])
        assert sorted(src.splits[split].paths) == want
    train = set(src.splits["train"].paths)
    assert {str(p) for p, _ in stream_tree["files"]["train"]} <= train
    assert set(map(str, stream_tree["corrupt"])) <= train  # bad files are found when decoded


def test_layout_rules(tmp_path: Path) -> None:
    from tests.imagetree import make_tree

    # train/ alone: a seeded val share of it, and no test split at all
    make_tree(tmp_path / "a", per_class={"train": 10}, extras=False)
    a = open_source(f"imagefolder:{tmp_path / 'a'}", val_fraction=0.2, seed=1)
    assert set(a.splits) == {"train", "val"} and len(a.splits["val"]) == 6
    assert open_source(f"imagefolder:{tmp_path / 'a'}", 0.2, 1).splits["val"].paths == \
        a.splits["val"].paths  # seeded
    # flat: seeded test and val shares
    make_tree(tmp_path / "b", layout="flat", per_class={"all": 10}, extras=False)
    b = open_source(f"imagefolder:{tmp_path / 'b'}")
    assert b.layout == "flat" and sum(len(s) for s in b.splits.values()) == 30
    assert set(b.splits) == {"train", "val", "test"}
    # a class in val/ that train/ lacks is named
    (tmp_path / "a" / "val" / "wolf").mkdir(parents=True)
    with pytest.raises(SourceError, match=r"\['wolf'\].*train lacks"):
        open_source(f"imagefolder:{tmp_path / 'a'}")
    # split folders mixed with class folders is refused, not trained as classes
    (tmp_path / "a" / "val" / "wolf").rmdir()
    (tmp_path / "a" / "cat").mkdir()
    with pytest.raises(SourceError, match="mixes split folders"):
        open_source(f"imagefolder:{tmp_path / 'a'}")


def test_parquet_layouts(tmp_path: Path, stream_tree) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [(Path(p).read_bytes(), c) for p, c in stream_tree["files"]["train"]]
    names = ["cat", "dog", "fox"]
    # string labels, a split column, a glob over two files
    rows = [{"image": b, "label": names[c], "split": "train" if i % 4 else "val"}
            for i, (b, c) in enumerate(files)]
    pq.write_table(pa.Table.from_pylist(rows[:10]), tmp_path / "p1.parquet")
    pq.write_table(pa.Table.from_pylist(rows[10:]), tmp_path / "p2.parquet")
    src = open_source(f"parquet:{tmp_path}/p*.parquet")
    assert src.classes == names and set(src.splits) == {"train", "val"}
    got = {r["id"]: r["label"] for s in src.splits.values() for r in s.iter_rows()}
    assert got == {row_id(b): c for b, c in files}  # every row once, labels by name
    assert len(list(src.splits["val"].iter_rows())) == len(src.splits["val"]) == 8
    # integer labels, no split: seeded shares by hash, all rows kept exactly once
    pq.write_table(pa.Table.from_pylist([{"image": b, "label": c} for b, c in files]),
                   tmp_path / "flat.parquet")
    flat = open_source(f"parquet:{tmp_path / 'flat.parquet'}")
    assert flat.classes == ["0", "1", "2"]
    seen = [r["id"] for s in flat.splits.values() for r in s.iter_rows()]
    assert sorted(seen) == sorted(row_id(b) for b, _ in files)
    with pytest.raises(SourceError, match="does not exist"):
        open_source(f"parquet:{tmp_path / 'nope'}")


# ----------------------------------------------------------------------------- one decoder


@pytest.mark.ray
def test_one_decoder_for_every_path(ray_session, stream_tree) -> None:
    """Grey, RGBA, palette, CMYK, 16-bit and odd-sized files become the same uint8 arrays through
    the streaming decode tasks (Ray Data), the driver's bounded reads, the in-memory loader and
    the bundle decoder that `raycls predict` and serving use."""
    from PIL import Image

    from raycls.data import load_dataset
    from raycls.images import decode_image
    from raycls.stream import decode_batch, decode_split

    spec = f"imagefolder:{stream_tree['root']}"
    src = open_source(spec)
    mem = load_dataset(spec, image_size=24)
    modes = set()
    for name, split in src.splits.items():
        good = [r for r in split.iter_rows() if "corrupt" not in r["path"]]
        modes |= {Image.open(r["path"]).mode for r in good}
        served = {r["id"]: decode_image(r["image"], 3, 24, 24, resize="center-crop")
                  for r in good}
        local = {}
        for chunk in decode_split(split, 3, 24):
            local.update({int(i): im for i, im, ok in
                          zip(chunk["id"], chunk["image"], chunk["valid"], strict=True) if ok})
        tasks = {int(r["id"]): r["image"] for r in split.to_ray().map_batches(
            decode_batch, fn_kwargs={"channels": 3, "size": 24, "train": False}).iter_rows()
            if r["valid"]}
        assert served.keys() == local.keys() == tasks.keys()
        for i, arr in served.items():
            np.testing.assert_array_equal(local[i], arr)
            np.testing.assert_array_equal(tasks[i], arr)
        # the in-memory loader: the same multiset of arrays (Ray Data does not keep the order)
        held = getattr(mem, name).images.numpy()
        assert sorted(a.tobytes() for a in held) == sorted(a.tobytes() for a in served.values())
    assert {"L", "RGBA", "P", "CMYK", "I;16"} <= modes


# ----------------------------------------------------------------------------- the runs


def _ids_by_epoch(ids_dir: Path) -> dict[int, list[int]]:
    """Per epoch: the ids of the newest file of each rank, concatenated."""
    newest: dict[tuple[int, int], Path] = {}
    for f in sorted(ids_dir.glob("ids-e*-r*-t*.json")):
        e, r, t = (int(part[1:]) for part in f.stem.split("-")[1:])
        if (e, r) not in newest or t > int(newest[e, r].stem.split("-t")[1]):
            newest[e, r] = f
    out: dict[int, list[int]] = {}
    for (e, _), f in sorted(newest.items()):
        out.setdefault(e, []).extend(json.loads(f.read_text()))
    return out


def _expected_ids(dataset: str) -> set[int]:
    src = open_source(dataset)
    return {r["id"] for r in src.splits["train"].iter_rows()}


def _single_process_val_acc(run: dict) -> tuple[float, float]:
    from raycls.checkpoints import model_from_checkpoint, read_checkpoint_meta
    from raycls.epoch import evaluate_batches
    from raycls.stream import decode_split

    result = run["result"]
    newest = max((p for p in run["run_dir"].glob("checkpoint_*") if (p / "meta.json").is_file()),
                 key=lambda p: p.name)
    meta = read_checkpoint_meta(newest)
    model, _ = model_from_checkpoint(newest)
    src = open_source(result["config"]["dataset"])
    info = meta["data"]
    batches = ((torch.from_numpy(c["image"]), torch.from_numpy(c["label"]),
                torch.from_numpy(c["valid"]))
               for c in decode_split(src.splits["val"], info["channels"], info["image_size"]))
    mean = torch.tensor(info["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(info["std"]).view(1, -1, 1, 1)
    _, correct, count = evaluate_batches(model, batches, mean=mean, std=std,
                                         device=torch.device("cpu"))
    assert count == len(src.splits["val"])  # validation read every image, none dropped
    return meta["metrics"]["val_acc"], correct / count


@pytest.mark.ray
@pytest.mark.parametrize("kind", ["imagefolder", "parquet"])
def test_streaming_run_sees_every_image_once_per_epoch(stream_runs, kind: str) -> None:
    run = stream_runs[kind]
    result = run["result"]
    assert result["data_mode"] == "stream" and result["epochs"] == 2
    expected = _expected_ids(result["config"]["dataset"])
    epochs = _ids_by_epoch(run["ids"])
    assert sorted(epochs) == [0, 1]
    for epoch, ids in epochs.items():
        assert len(ids) == len(set(ids)), f"epoch {epoch}: an image was given twice"
        assert set(ids) == expected, f"epoch {epoch}: images missing or foreign"
    reported, recomputed = _single_process_val_acc(run)
    assert reported == pytest.approx(recomputed, abs=1e-9)


@pytest.mark.ray
def test_killed_worker_reads_the_interrupted_epoch_again(stream_runs) -> None:
    run = stream_runs["imagefolder"]
    marker = run["marker"]
    assert marker.exists(), "the worker was never killed"
    killed_at = marker.stat().st_mtime_ns
    newest = {}
    for f in run["ids"].glob("ids-e1-r*-t*.json"):
        rank = f.stem.split("-")[2]
        newest[rank] = max(newest.get(rank, 0), int(f.stem.split("-t")[1]))
    assert len(newest) == 2 and all(t > killed_at for t in newest.values())
    # the run still finished all its epochs, from a checkpoint
    assert run["result"]["epochs"] == 2
    assert run["result"]["history"][-1]["start_epoch"] >= 0


@pytest.mark.ray
def test_corrupt_files_are_skipped_and_named(stream_runs, stream_tree) -> None:
    bad = stream_runs["imagefolder"]["result"]["bad_images"]
    assert len(bad) == 2
    assert {b.split(":")[0] for b in bad} == set(map(str, stream_tree["corrupt"]))


@pytest.mark.ray
def test_more_bad_files_than_allowed_stop_the_run(stream_tree, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "raycls", "train", "--dataset",
           f"imagefolder:{stream_tree['root']}", "--epochs", "1", "--num-workers", "1",
           "--image-size", "16", "--max-bad-images", "1", "--storage-path", str(tmp_path)]
    env = {**os.environ, "RAY_ADDRESS": ""}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert "more than --max-bad-images 1" in p.stderr and "corrupt_0000.jpg" in p.stderr
