"""Export: the ONNX graph is valid, computes what PyTorch computes, and a bad export is refused.

A tiny resnet_small (width 4) trained ~1 s on digits serves as the checkpoint. The exports here
are real (torch.onnx dynamo exporter, onnx.checker, onnxruntime), a few seconds each.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from raycls import export as export_mod
from raycls import onnx_model
from raycls.bundle import INT8_MODEL_FILE, MODEL_FILE, load_bundle
from raycls.cli import main as cli_main
from raycls.data import load_dataset
from raycls.export import ExportError, export_bundle, resolve_checkpoint
from raycls.onnx_model import check_parity, export_onnx, normalise
from tests.digits_checkpoint import train_digits_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ckpt") / "checkpoint_2026-12-02_07-11-10.591943"  # Ray's naming
    train_digits_checkpoint(d)
    return d


@pytest.fixture(scope="module")
def exported(checkpoint: Path) -> tuple[torch.nn.Module, dict, bytes]:
    from raycls.checkpoints import model_from_checkpoint

    model, meta = model_from_checkpoint(checkpoint)
    return model, meta["data"], export_onnx(model, meta["data"])


def digits_images(n: int) -> torch.Tensor:
    ds = load_dataset("digits")
    return torch.cat([ds.val.images, ds.test.images, ds.train.images])[:n]


# ----------------------------------------------------------------------------- the graph


def test_exported_graph_passes_checker_and_has_the_bundle_signature(exported) -> None:
    _, data, model_bytes = exported
    proto = onnx.load_from_string(model_bytes)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version <= onnx_model.MAX_IR_VERSION
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type) == ("images", "tensor(uint8)")
    assert isinstance(inp.shape[0], str)  # dynamic batch dimension
    assert inp.shape[1:] == [data["channels"], data["image_size"], data["image_size"]]
    assert (out.name, out.type, out.shape[1]) == ("logits", "tensor(float)", len(data["classes"]))


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_onnxruntime_matches_pytorch(exported, batch_size: int) -> None:
    model, data, model_bytes = exported
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    for images in (
        digits_images(batch_size),
        torch.randint(0, 256, (batch_size, 1, 8, 8), dtype=torch.uint8),  # off-distribution too
    ):
        (got,) = session.run(["logits"], {"images": images.numpy()})
        with torch.no_grad():
            ref = model(normalise(images, data["mean"], data["std"])).numpy()
        assert got.shape == (batch_size, 10)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
        assert (got.argmax(1) == ref.argmax(1)).all()


def test_parity_gate_passes_on_a_faithful_export(exported) -> None:
    model, data, model_bytes = exported
    report = check_parity(model, data, model_bytes, digits_images(1000))
    assert report["num_images"] == 1000
    assert report["max_abs_diff"] <= 1e-3 and report["top1_agreement"] >= 0.999
    assert {1, 7, 64} <= set(report["batch_sizes"])


def test_parity_gate_refuses_a_model_changed_after_export(exported) -> None:
    model, data, model_bytes = exported
    patched = copy.deepcopy(model)
    with torch.no_grad():
        patched.head.weight.add_(0.05 * torch.randn_like(patched.head.weight))
    with pytest.raises(ExportError, match=r"parity gate failed.*exceeds the limit 0\.001 by"):
        check_parity(patched, data, model_bytes, digits_images(1000))


def test_parity_gate_names_the_top1_limit(exported) -> None:
    model, data, model_bytes = exported
    # swap two classes' head rows: logits move a lot AND predictions change -> both limits named
    patched = copy.deepcopy(model)
    with torch.no_grad():
        patched.head.weight[[0, 1]] = patched.head.weight[[1, 0]].clone()
    with pytest.raises(ExportError, match=r"top-1 agreement .* below the limit 99\.9%"):
        check_parity(patched, data, model_bytes, digits_images(1000))


def test_broken_export_writes_no_bundle(checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    real_export = export_mod.export_onnx

    def export_a_different_model(model, data, opset=onnx_model.OPSET):
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.head.weight.mul_(1.5)
        return real_export(other, data, opset)

    monkeypatch.setattr(export_mod, "export_onnx", export_a_different_model)
    out = tmp_path / "models" / "broken"
    with pytest.raises(ExportError, match="parity gate failed"):
        export_bundle(checkpoint, out, log=lambda _: None)
    assert not out.exists()
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())


# ----------------------------------------------------------------------------- the bundle


def test_cli_export_writes_a_bundle_that_loads(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "models" / "digits-tiny"
    assert cli_main(["export", str(checkpoint), "--output", str(out), "--int8"]) == 0
    printed = capsys.readouterr().out
    assert "parity ok" in printed and "INT8 model" in printed
    meta = json.loads((out / "bundle.json").read_text())
    for key in (
        "format_version", "name", "classes", "input", "metrics", "parity", "config",
        "versions", "sha256", "created",
    ):  # fmt: skip
        assert key in meta, key
    assert meta["name"] == "digits-tiny"
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["input"] == {
        "channels": 1, "height": 8, "width": 8, "dtype": "uint8", "layout": "NCHW",
        "resize": "stretch",
    }  # fmt: skip
    assert meta["parity"]["num_images"] >= 1000
    assert set(meta["versions"]) == {"torch", "onnx", "onnxruntime", "ray", "raycls"}
    assert meta["config"]["model_width"] == 4
    # ONNX accuracy on the test split is the checkpoint's own test accuracy (same images)
    ckpt_meta = json.loads((checkpoint / "meta.json").read_text())
    assert abs(meta["metrics"]["onnx_test_acc"] - ckpt_meta["metrics"]["test_acc"]) < 0.003
    # INT8: either kept (within 1 point, file present and hashed) or dropped with a reason
    int8 = meta["int8"]
    assert int8["test_acc"] == meta["metrics"]["int8_test_acc"]
    if int8["kept"]:
        assert meta["metrics"]["onnx_test_acc"] - int8["test_acc"] <= 0.01
        assert INT8_MODEL_FILE in meta["sha256"] and (out / INT8_MODEL_FILE).is_file()
        b8 = load_bundle(out, int8=True)
        assert b8.model_file == INT8_MODEL_FILE
        ds = load_dataset("digits")
        acc = (b8.logits(ds.test.images.numpy()).argmax(1) == ds.test.labels.numpy()).mean()
        assert abs(acc - int8["test_acc"]) < 1e-9
    else:
        assert not (out / INT8_MODEL_FILE).exists() and int8["reason"]
    b = load_bundle(out)
    assert b.model_file == MODEL_FILE and b.classes == meta["classes"]
    # refuses to overwrite without --overwrite: one-line error, exit 1
    assert cli_main(["export", str(checkpoint), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err


def test_int8_dropped_when_outside_the_accuracy_limit(
    checkpoint: Path, tmp_path: Path, monkeypatch
) -> None:
    # a run directory (result.json names the best checkpoint) and an impossible INT8 limit
    run = tmp_path / "runs" / "run1"
    run.mkdir(parents=True)
    (run / "result.json").write_text(
        json.dumps({"checkpoint": str(checkpoint), "test_acc": 0.42, "val_acc": 0.41})
    )
    monkeypatch.setattr(export_mod, "INT8_MAX_ACC_DROP", -1.0)
    lines: list[str] = []
    out = export_bundle(run, tmp_path / "models" / "m", int8=True, log=lines.append)
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["metrics"]["test_acc"] == 0.42  # the run's result wins over the checkpoint's
    assert meta["int8"]["kept"] is False and "points drop" in meta["int8"]["reason"]
    assert INT8_MODEL_FILE not in meta["sha256"] and not (out / INT8_MODEL_FILE).exists()
    assert any(line.startswith("INT8 model dropped") for line in lines)
    assert any(line.startswith("warning: ONNX test accuracy differs") for line in lines)


def test_export_of_a_checkpoint_folder_records_the_runs_test_acc(
    checkpoint: Path, tmp_path: Path, capsys
) -> None:
    """docs/cli-export.md's second example: a checkpoint folder of a run (Ray Train names them
    checkpoint_<timestamp>) gets the test_acc of result.json one folder up, so evaluate prints
    its gap line; a checkpoint the run did not measure gets none, and export says why."""
    import shutil

    run = tmp_path / "runs" / "digits-run"
    best = Path(shutil.copytree(checkpoint, run / "checkpoint_2026-12-02_07-11-10.591943"))
    other = Path(shutil.copytree(checkpoint, run / "checkpoint_2026-12-02_07-11-10.253328"))
    # the run was trained elsewhere and moved: result.json's path is stale, the name is not
    (run / "result.json").write_text(json.dumps(
        {"checkpoint": f"/elsewhere/runs/digits-run/{best.name}", "test_acc": 0.4242,
         "val_acc": 0.41}))  # fmt: skip
    assert resolve_checkpoint(best)[1]["test_acc"] == 0.4242
    assert resolve_checkpoint(other)[1] is None
    out = tmp_path / "models" / "m"
    assert cli_main(["export", str(best), "-o", str(out)]) == 0
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["metrics"]["test_acc"] == 0.4242 and meta["metrics"]["val_acc"] == 0.41
    capsys.readouterr()
    assert cli_main(["evaluate", str(out), "--output-dir", str(tmp_path / "r")]) == 0
    assert "training test_acc 0.4242 (measured " in capsys.readouterr().out
    lines: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(7)
    try:
        export_bundle(other, tmp_path / "models" / "o", log=lines.append)
        assert torch.get_num_threads() == 7, "export left its thread cap on the process"
    finally:
        torch.set_num_threads(threads)
    assert any(line.startswith("note: ") and "not of this one" in line for line in lines)


def test_resolve_checkpoint_errors_are_clear(checkpoint: Path, tmp_path: Path) -> None:
    assert resolve_checkpoint(checkpoint) == (checkpoint, None)
    with pytest.raises(ExportError, match="no such checkpoint or run directory"):
        resolve_checkpoint(tmp_path / "missing")
    run = tmp_path / "crashed"
    (run / "checkpoint_000003").mkdir(parents=True)
    (run / "checkpoint_000003" / "meta.json").write_text("{}")
    with pytest.raises(ExportError, match="no result.json.*checkpoint_000003"):
        resolve_checkpoint(run)
    (run / "result.json").write_text(json.dumps({"checkpoint": str(tmp_path / "gone")}))
    with pytest.raises(ExportError, match="does not exist"):
        resolve_checkpoint(run)


def test_cli_export_reports_bad_input_without_traceback(tmp_path: Path, capsys) -> None:
    assert cli_main(["export", str(tmp_path / "nope"), "--output", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
