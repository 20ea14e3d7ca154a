"""The benchmark suite cannot rot: each benchmark runs in its tiny configuration and writes a
result JSON with its fields (speed is not asserted: it is what the benchmarks measure). Plus the
pieces that need no Ray: the load generator against the plain server over real HTTP, and the
RESULTS.md table.

The Ray benchmarks start their own local Ray in a subprocess (30 s to 2 minutes each on 2 cores,
about 6 minutes in all); they run in the default suite so that CI catches a broken script.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
ROW_KEYS = {"figure", "value", "unit", "reference", "reference_value", "ratio", "target", "met",
            "conditions"}  # fmt: skip
RESULT_KEYS = {"name", "mode", "command", "hardware", "started", "wall_s", "rows", "details",
               "notes"}  # fmt: skip


def run_bench(name: str, out: Path, *extra: str, timeout: int = 900) -> dict:
    """Run bench/<name>.py --tiny into `out` and return its parsed JSON."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), "--tiny", "--out", str(out), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / f"{name}.json").read_text())
    assert RESULT_KEYS <= set(result), set(result)
    assert result["name"] == name and result["mode"] == "tiny"
    assert f"bench/{name}.py --tiny" in result["command"]
    assert result["hardware"]["cpus"] >= 1 and "torch" in result["hardware"]
    for row in result["rows"]:
        assert ROW_KEYS <= set(row), row
    return result


def figures(result: dict) -> list[str]:
    return [r["figure"] for r in result["rows"]]


def test_inference_benchmark(tmp_path):
    result = run_bench("inference", tmp_path)
    names = figures(result)
    for batch in (1, 8, 64):
        assert f"onnxruntime FP32 images/s, batch {batch}" in names
        assert f"onnxruntime INT8 images/s, batch {batch}" in names
    for row in result["rows"]:
        assert row["value"] > 0 and row["reference_value"] > 0 and row["ratio"] > 0
    batch1 = next(r for r in result["rows"] if r["figure"].endswith("FP32 images/s, batch 1"))
    assert batch1["target"] == 1.5 and isinstance(batch1["met"], bool)


@pytest.mark.ray
def test_train_overhead_benchmark(tmp_path):
    result = run_bench("train_overhead", tmp_path)
    ray_row = result["rows"][0]
    assert ray_row["figure"].startswith("raycls train (Ray Train, 1 worker) images/s")
    assert ray_row["value"] > 0 and ray_row["reference_value"] > 0 and ray_row["target"] == 0.95
    aug = [r for r in result["rows"] if r["figure"].startswith("train step with augmentation")]
    assert len(aug) == 3 and all(r["value"] > 0 and r["reference_value"] > 0 for r in aug)
    runs = result["details"]["runs"]
    assert len(runs["ray"]) == len(runs["plain"]) == 1
    assert len(runs["ray"][0]["images_per_s"]) == 2  # tiny: 2 epochs, every epoch reported


@pytest.mark.ray
def test_scaling_benchmark(tmp_path):
    result = run_bench("scaling", tmp_path)
    assert {"1", "2"} == set(result["details"]["runs"])
    assert figures(result)[0] == "images/s with 2 CPU workers"
    assert result["rows"][0]["value"] > 0 and result["rows"][0]["reference_value"] > 0


@pytest.mark.ray
def test_time_to_accuracy_benchmark(tmp_path):
    result = run_bench("time_to_accuracy", tmp_path)
    curve = result["details"]["digits"]["curve"]
    assert [p["epoch"] for p in curve] == [1, 2]
    assert all(0 <= p["test_acc"] <= 1 and p["seconds"] > 0 for p in curve)
    assert (tmp_path / "training_accuracy.png").stat().st_size > 1000


@pytest.mark.ray
def test_serving_benchmark(tmp_path):
    result = run_bench("serving", tmp_path, "--port", "0", "--profile")
    points = result["details"]["points"]
    servers = {p["server"] for p in points}
    # one replica per core, plus (on a multi-core machine) a single replica beside it and a point
    # with 16 images per multipart request
    many = {"plain-1", "fast-1", "fast-multi"} if (os.cpu_count() or 1) > 1 else set()
    assert servers == {"plain", "fast", "plain-default", "default"} | many
    assert all(p["ok"] > 0 and p["errors"] == 0 for p in points), points
    assert any("Serve throughput-optimized + HAProxy req/s" in f for f in figures(result))
    assert any("vs in-process ceiling" in f for f in figures(result))
    if many:
        assert any(f.endswith("ONE replica") for f in figures(result))
        multi = [r for r in result["rows"] if "16 images per request" in r["figure"]]
        assert len(multi) == 1 and multi[0]["value"] > 0 and multi[0]["reference_value"] > 0
    assert "inclusive" in result["details"]["profile"], result["details"]["profile"]
    assert (tmp_path / "serving_throughput.png").stat().st_size > 1000


@pytest.mark.slow  # ~5 minutes: three searches and a run; the search itself is in test_search
@pytest.mark.ray
def test_search_benchmark(tmp_path):
    result = run_bench("search", tmp_path)
    assert result["rows"], f"the search benchmark produced no figures: {result['notes']}"
    got = result["details"]["results"]
    assert set(got) == {"random", "asha", "pbt", "default"}
    assert all(0 <= r["best_val_acc"] <= 1 and r["epochs_used"] >= 1 for r in got.values())


def test_ingest_benchmark(tmp_path):
    result = run_bench("ingest", tmp_path)
    names = figures(result)
    assert any(n.startswith("streaming images/s into a no-op step") for n in names)
    assert any(n.startswith("streaming images/s into a resnet_small training step") for n in names)
    assert any(n.startswith("streaming time to first batch") for n in names)
    growth = [r for r in result["rows"] if r["figure"].startswith("streaming peak RSS")]
    assert {"driver", "train worker"} <= {r["figure"].split(", ")[1] for r in growth}
    for r in growth:
        assert r["value"] > 0 and r["reference_value"] > 0 and r["target"] == 1.2
    for side in ("stream", "torch"):
        runs = result["details"]["runs"]["small"][side]
        assert {e["step"] for e in runs[0]["epochs"]} == {"noop", "train"}
        assert all(e["images"] > 0 for e in runs[0]["epochs"])


def test_loadgen_against_plain_server(tmp_path):
    """The load generator over real HTTP to the real plain server (FastAPI + onnxruntime)."""
    sys.path.insert(0, str(BENCH))
    try:
        import serving
        from loadgen import run_load
    finally:
        sys.path.remove(str(BENCH))
    bundle = serving.make_bundle("small", tmp_path, tiny=True)
    proc, base = serving.start_plain(bundle["path"])
    try:
        res = run_load(base + "/v1/classify", bundle["pngs"][:4], 4, 1.0, warmup_s=0.2)
        bad = run_load(base + "/v1/classify", [b"not an image"], 1, 0.5, warmup_s=0.1)
    finally:
        serving.stop(proc)
    assert res["ok"] > 0 and res["errors"] == 0 and res["rps"] > 0
    assert 0 < res["p50_ms"] <= res["p99_ms"]
    assert bad["ok"] == 0 and bad["statuses"].get("400", 0) > 0  # errors are counted, not hidden
    with pytest.raises(OSError):  # stop() left nothing listening
        socket.create_connection(("127.0.0.1", urlsplit(base).port), timeout=2).close()


def test_run_py_table_and_bad_only(tmp_path):
    row = {"figure": "x images/s", "value": 90.0, "unit": "images/s", "reference": "plain",
           "reference_value": 100.0, "ratio": 0.9, "target": 0.95, "higher_is_better": True,
           "met": False, "conditions": "tiny"}  # fmt: skip
    result = {"name": "inference", "mode": "tiny", "command": "python bench/inference.py",
              "hardware": {"cpu": "TestCPU", "cpus": 2}, "started": "now", "wall_s": 1.0,
              "rows": [row], "details": {}, "notes": ["a note"]}  # fmt: skip
    (tmp_path / "inference.json").write_text(json.dumps(result))
    sys.path.insert(0, str(BENCH))
    try:
        import run
    finally:
        sys.path.remove(str(BENCH))
    md = tmp_path / "RESULTS.md"
    total = {"command": "python bench/run.py --quick", "wall_s": 61.0, "load_start": [1.5, 2, 3],
             "load_end": [4.5, 5, 6]}  # fmt: skip
    run.write_markdown(tmp_path, md, [{"name": "inference", "status": "ok", "wall_s": 1}], total)
    text = md.read_text()
    assert "TestCPU" in text and "| inference | x images/s | 90 images/s" in text
    assert "61 s in all (inference 1 s)" in text and "[1.5, 2, 3] at start" in text
    assert "0.90x" in text and "**missed**" in text and "a note" in text
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--only", "nonsense"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "unknown benchmark" in proc.stderr
    assert "Traceback" not in proc.stderr
