"""`pocus export` and `pocus bench model` end to end on a tiny checkpoint in training's format."""
import json

import pytest

from edge_app.bundle import load_bundle, read_bundle_json
from edge_app.cli import main
from helpers_export import SIZE, break_for_int8, make_frames, trained_tiny_model


def _checkpoint(path, broken=False):
    import torch

    from training.models import create_model, make_checkpoint

    torch.manual_seed(0)
    model = trained_tiny_model(model=create_model("pocusnet_tiny"))
    if broken:
        model = break_for_int8(model)
    torch.save(make_checkpoint(model, "pocusnet_tiny", {}, {"lr": 0.01}, {"view_acc": 1.0}, 2, input_size=SIZE), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(autouse=True)
def fake_sim(monkeypatch):
    """Held-out frames from the synthetic generator instead of the simulator (fast, 32x32)."""
    import export.heldout

    def frames(n, first_patient=0, frames_per_patient=10, size=SIZE, seed=0, progress=True):
        return make_frames(n, seed=first_patient + seed, size=size)
    monkeypatch.setattr(export.heldout, "sim_frames", frames)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    import export.heldout

    out = tmp_path_factory.mktemp("bundle") / "b"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export.heldout, "sim_frames", lambda n, first_patient=0, frames_per_patient=10, size=SIZE, seed=0,
                   progress=True: make_frames(n, seed=first_patient + seed, size=size))
        rc = main(["export", "--weights", str(checkpoint), "--int8", "--fp16", "--out", str(out),
                   "--calib", "64", "--eval", "100"])
    assert rc == 0
    return out


def test_export_writes_a_verified_bundle(exported, checkpoint):
    info = read_bundle_json(exported)
    assert {e["precision"] for e in info["files"].values()} == {"fp32", "int8", "fp16"}
    manifest = info["manifest"]
    assert manifest["model"]["name"] == "pocusnet_tiny" and manifest["model"]["flops"] > 0
    assert manifest["training"]["checkpoint"].endswith("tiny.pt")
    assert manifest["export"]["parity_vs_torch"]["frames"] == 100
    assert 0 < manifest["thresholds"]["confidence_min"] <= 1
    accuracy = manifest["export"]["heldout_accuracy"]
    assert accuracy["frames"] == 100 and accuracy["fp32"]["view_acc"] >= 0.9 and "int8" in accuracy
    int8 = load_bundle(exported, precision="int8")
    gate = int8.manifest["precision_check"]
    assert gate["passed"] and gate["view_agreement"] >= 0.99 and gate["settings"]["method"]
    assert json.loads((exported / "export_config.json").read_text())["int8"] is True


def test_export_is_reproducible_with_source_date_epoch(checkpoint, tmp_path, monkeypatch):
    """Same checkpoint, same settings, SOURCE_DATE_EPOCH set: byte-identical bundle files."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1790000000")
    for out in ("a", "b"):
        assert main(["export", "--weights", str(checkpoint), "--int8", "--out", str(tmp_path / out),
                     "--calib", "32", "--eval", "40"]) == 0
    for name in ("model.onnx", "model.int8.onnx", "bundle.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert read_bundle_json(tmp_path / "a")["created"] == "2026-09-21T14:13:20Z"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    assert main(["export", "--weights", str(checkpoint), "--out", str(tmp_path / "c"), "--calib", "32",
                 "--eval", "40"]) == 1


def test_export_fails_clearly_on_missing_weights(tmp_path, capsys):
    assert main(["export", "--weights", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "b")]) == 1
    assert "nope.pt does not exist" in capsys.readouterr().err


def test_export_rejects_unknown_keep_float(checkpoint, tmp_path, capsys):
    rc = main(["export", "--weights", str(checkpoint), "--int8", "--keep-float", "no_such_node",
               "--out", str(tmp_path / "b"), "--calib", "32", "--eval", "40"])
    assert rc == 1
    assert "--keep-float: no_such_node not in the graph; nodes are:" in capsys.readouterr().err
    assert not (tmp_path / "b" / "bundle.json").exists()


def test_export_stops_when_int8_loses_accuracy(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "broken.pt", broken=True)
    out = tmp_path / "b"
    rc = main(["export", "--weights", str(ckpt), "--int8", "--out", str(out), "--calib", "64", "--eval", "100"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "int8 accuracy gate FAILED" in err and "Try: --keep-float" in err
    assert not (out / "bundle.json").exists() and (out / "int8_gate_failed.json").exists()
    keep = err.split("Try: --keep-float ")[1].split()[0]
    rc = main(["export", "--weights", str(ckpt), "--int8", "--keep-float", keep, "--out", str(out),
               "--calib", "64", "--eval", "100"])
    assert rc == 0 and load_bundle(out).precision == "int8"


def test_bench_model_table_and_json(exported, checkpoint, capsys):
    assert main(["bench", "model", "--bundle", str(exported), "--weights", str(checkpoint),
                 "--frames", "60", "--runs", "30", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {(r["format"], r["precision"]): r for r in result["rows"]}
    assert set(rows) == {("PyTorch", "fp32"), ("ONNX", "fp32"), ("ONNX", "int8"), ("ONNX", "fp16")}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"] and r["view_acc"] >= 0.9
    assert result["peak_gflops"] > 0 and result["flops"] > 0
    assert rows[("ONNX", "fp32")]["speedup_vs_torch"] > 0
    assert set(result["targets"]) == {"ort_fp32_vs_torch", "int8_vs_fp32", "int8_p50_ms"}

    from export.bench import format_table
    table = format_table(result)
    assert "p50 ms" in table and "PyTorch" in table and "target int8_p50_ms" in table
