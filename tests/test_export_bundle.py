"""edge_app.bundle: verification of bundles (hash, size, schema, manifest, IO) and running them."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from devices.labels import OUTPUT_NAMES, QUALITY_DIAGNOSTIC, VIEW_LABELS
from edge_app.bundle import (BUNDLE_JSON, SCHEMA_VERSION, BundleError, load_bundle, read_bundle_json,
                             verify_bundle, view_scores)
from helpers_export import SIZE, calib_x, eval_set, tiny_bundle, tiny_trained  # noqa: F401 - fixtures


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _edit_json(bundle_dir, change):
    path = bundle_dir / BUNDLE_JSON
    info = json.loads(path.read_text())
    change(info)
    path.write_text(json.dumps(info))


def test_manifest_round_trip(tiny_bundle):
    info = read_bundle_json(tiny_bundle)
    assert set(info["files"]) == {"model.onnx", "model.int8.onnx", "model.fp16.onnx"}
    for precision in ("fp32", "int8", "fp16"):
        b = load_bundle(tiny_bundle, precision=precision)
        m = b.manifest
        assert b.precision == m["precision"] == precision
        assert m["schema_version"] == SCHEMA_VERSION
        assert m["labels"]["views"] == list(VIEW_LABELS)
        assert [o["name"] for o in m["outputs"]] == list(OUTPUT_NAMES)
        assert m["input"]["shape"] == ["batch", 1, SIZE, SIZE]
        assert m["thresholds"]["quality_diagnostic"] == QUALITY_DIAGNOSTIC
        assert m["training"]["config_hash"] == "0" * 64
        # the embedded manifest equals bundle.json's apart from the per-file keys
        assert {k: v for k, v in m.items() if k not in ("precision", "file", "precision_check")} == info["manifest"]
        assert b.providers[0] == "CPUExecutionProvider"


def test_run_matches_torch_and_checks_input(tiny_bundle, tiny_trained, eval_set):
    import torch

    x = eval_set[0][:8]
    b = load_bundle(tiny_bundle, precision="fp32")
    out = b.run(x)
    assert list(out) == list(OUTPUT_NAMES)
    assert out["action_logits"].shape == (8, 5, 11) and out["pose_offset"].shape == (8, 5, 5)
    with torch.no_grad():
        ref = tiny_trained(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(out["view_logits"], ref, atol=1e-4)
    assert b.run(x[0])["view_logits"].shape == (1, len(VIEW_LABELS))  # [1, H, W] gets a batch axis
    with pytest.raises(ValueError, match="float32"):
        b.run(x.astype(np.float64))
    with pytest.raises(ValueError, match=f"{SIZE}"):
        b.run(np.zeros((1, 1, SIZE + 1, SIZE + 1), np.float32))


def test_profile_chooses_precision(tiny_bundle):
    assert load_bundle(tiny_bundle, profile="cpu").precision == "int8"
    # desktop-cuda prefers fp16, but on a CPU-only build fp16 is skipped for fp32
    with pytest.warns(UserWarning, match="not available"):
        b = load_bundle(tiny_bundle, profile="desktop-cuda")
    assert b.precision == ("fp16" if "CUDAExecutionProvider" in b.providers else "fp32")


def test_tampered_file_is_refused(bundle_copy):
    path = bundle_copy / "model.int8.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # flip one bit, same size
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.int8\.onnx has been modified: SHA-256"):
        load_bundle(bundle_copy, precision="int8")
    load_bundle(bundle_copy, precision="fp32")  # the other files are still fine
    with pytest.raises(BundleError, match="modified"):
        verify_bundle(bundle_copy)


def test_truncated_file_is_refused(bundle_copy):
    path = bundle_copy / "model.onnx"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(BundleError, match=r"model\.onnx is truncated: \d+ bytes, bundle.json says \d+"):
        load_bundle(bundle_copy, precision="fp32")


def test_missing_file_and_folder(bundle_copy, tmp_path):
    (bundle_copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.onnx is missing"):
        load_bundle(bundle_copy, precision="fp32")
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="bundle.json is missing"):
        load_bundle(tmp_path / "empty")


@pytest.mark.parametrize("where", ["bundle", "manifest"])
def test_schema_mismatch(bundle_copy, where):
    def change(info):
        (info if where == "bundle" else info["manifest"])["schema_version"] = SCHEMA_VERSION + 1
    _edit_json(bundle_copy, change)
    with pytest.raises(BundleError, match=f"schema_version is {SCHEMA_VERSION + 1} but this runtime reads version"):
        load_bundle(bundle_copy)


def test_damaged_bundle_json(bundle_copy):
    (bundle_copy / BUNDLE_JSON).write_text('{"schema_version": 1, "files": ')
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_copy)


def test_manifest_differs_from_bundle_json(bundle_copy):
    # bundle.json edited (thresholds loosened) without re-export: the embedded manifest disagrees
    _edit_json(bundle_copy, lambda info: info["manifest"]["thresholds"].update(confidence_min=0.0))
    with pytest.raises(BundleError, match="embedded manifest differs from bundle.json in thresholds"):
        load_bundle(bundle_copy, precision="fp32")


def test_io_mismatch_with_manifest(bundle_copy):
    """A manifest (re-signed consistently) that promises other output shapes than the graph has."""
    from export.onnx_export import write_bundle

    info = read_bundle_json(bundle_copy)
    manifest = info["manifest"]
    manifest["outputs"][0]["shape"] = ["batch", 7]
    src = bundle_copy / "model.onnx"
    shutil.copy(src, bundle_copy / "src.onnx")
    write_bundle(bundle_copy, {"fp32": bundle_copy / "src.onnx"}, manifest)
    with pytest.raises(BundleError, match="outputs .* do not match the manifest"):
        load_bundle(bundle_copy)


def test_unknown_precision(tiny_bundle, tmp_path):
    with pytest.raises(BundleError, match="unknown precision"):
        load_bundle(tiny_bundle, precision="int4")
    only_fp32 = tmp_path / "b"
    shutil.copytree(tiny_bundle, only_fp32)
    _edit_json(only_fp32, lambda info: [info["files"].pop(k) for k in ("model.int8.onnx", "model.fp16.onnx")])
    with pytest.raises(BundleError, match=r"no int8 model in this bundle \(it has fp32\)"):
        load_bundle(only_fp32, precision="int8")


def test_view_scores_by_hand():
    logits = np.array([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    confidence, energy = view_scores(logits)
    np.testing.assert_allclose(confidence, [1 / 6, np.exp(10) / (np.exp(10) + 5)])
    np.testing.assert_allclose(energy, [-np.log(6), -np.log(np.exp(10) + 5)])


def test_edge_import_is_light():
    code = ("import sys, edge_app.bundle; "
            "bad = [m for m in ('torch', 'onnx', 'onnxruntime', 'training') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shipped_bundle_verifies_and_runs():
    from edge_app.bundle import DEFAULT_BUNDLE_DIR

    if not (DEFAULT_BUNDLE_DIR / BUNDLE_JSON).is_file():
        pytest.skip("no shipped bundle yet (pocus export ... --out edge_app/bundles/default)")
    info = verify_bundle(DEFAULT_BUNDLE_DIR)
    b = load_bundle()  # the default folder and the cpu profile
    assert b.precision == ("int8" if any(e["precision"] == "int8" for e in info["files"].values()) else "fp32")
    size = b.input_size
    out = b.run(np.zeros((2, 1, size, size), np.float32))
    assert out["view_logits"].shape == (2, len(VIEW_LABELS)) and np.isfinite(out["pose_offset"]).all()
    th = b.thresholds
    assert 0 < th["confidence_min"] < 1 and np.isfinite(th["ood_energy_max"])
