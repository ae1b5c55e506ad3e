"""ONNX export, parity against torch, int8 gate, fp16, FLOPs and threshold calibration (tiny model)."""
import numpy as np
import pytest

from devices.labels import OUTPUT_NAMES
from export import onnx_export as ox
from export import quantize as q
from helpers_export import SIZE, break_for_int8, calib_x, eval_set, tiny_model, tiny_trained, trained_tiny_model  # noqa: F401


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_trained):
    work = tmp_path_factory.mktemp("onnx")
    fp32 = ox.export_onnx(tiny_trained, work / "model.onnx", SIZE)
    return work, fp32, q.preprocess_for_quant(fp32, work / "pre.onnx")


def test_graph_has_contract_names_and_dynamic_batch(exported):
    import onnx

    graph = onnx.load(str(exported[1])).graph
    assert [i.name for i in graph.input] == ["image"]
    assert [o.name for o in graph.output] == list(OUTPUT_NAMES)
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [1, SIZE, SIZE]
    out = ox.ort_outputs(exported[1], np.zeros((3, 1, SIZE, SIZE), np.float32))
    assert out["action_logits"].shape == (3, 5, 11)


def test_parity_with_torch(exported, tiny_trained, eval_set):
    x = eval_set[0]
    report = ox.compare_outputs(ox.torch_outputs(tiny_trained, x), ox.ort_outputs(exported[1], x))
    ox.check_parity(report, atol=1e-3)
    assert report["frames"] == len(x)
    assert max(report["max_abs_err"].values()) < 1e-4
    assert report["view_agreement"] == report["action_agreement"] == 1.0


def test_parity_failure_is_reported(tiny_trained, eval_set):
    ref = ox.torch_outputs(tiny_trained, eval_set[0][:20])
    off = {k: v.copy() for k, v in ref.items()}
    off["action_logits"][3, 2, 4] += 0.01
    with pytest.raises(ox.ExportError, match=r"(?s)does not match torch \(tolerance 0.001\).*action_logits\s+0.01"):
        ox.check_parity(ox.compare_outputs(ref, off), atol=1e-3)
    off["quality"][0, 0] = np.nan  # NaN must fail too
    with pytest.raises(ox.ExportError):
        ox.check_parity(ox.compare_outputs(ref, off), atol=1e-3)


def test_int8_gate_passes_on_a_well_behaved_model(exported, calib_x, eval_set):
    work, fp32, pre = exported
    int8 = q.quantize_int8(pre, work / "int8.onnx", calib_x)
    gate = q.int8_gate(ox.ort_outputs(fp32, eval_set[0]), ox.ort_outputs(int8, eval_set[0]))
    assert gate.passed, gate.failures
    assert gate.comparison["view_agreement"] >= 0.99 and gate.comparison["quality_mae"] <= 0.02
    assert int8.stat().st_size < fp32.stat().st_size


def test_int8_gate_fails_on_outlier_model_and_names_the_layers(tmp_path, calib_x, eval_set):
    model = break_for_int8(trained_tiny_model(steps=40))
    x = eval_set[0]
    fp32 = ox.export_onnx(model, tmp_path / "model.onnx", SIZE)
    ref = ox.torch_outputs(model, x)
    ox.check_parity(ox.compare_outputs(ref, ox.ort_outputs(fp32, x)), atol=1e-2)  # float is still fine
    pre = q.preprocess_for_quant(fp32, tmp_path / "pre.onnx")
    int8 = q.quantize_int8(pre, tmp_path / "int8.onnx", calib_x)
    gate = q.int8_gate(ox.ort_outputs(fp32, x), ox.ort_outputs(int8, x))
    assert not gate.passed and any("view agreement" in f for f in gate.failures)

    rows = q.layer_errors(pre, int8, x[:32])
    first = rows[0]  # the outlier activation is the first one in graph order
    assert first["op"] == "Relu" and first["qdq_worst_channel_db"] < 5 < first["qdq_sqnr_db"]
    keep = q.suggest_keep_float(pre, rows)
    report = q.format_gate_failure(gate, rows, keep)
    assert "int8 accuracy gate FAILED" in report and f"--keep-float {','.join(keep)}" in report

    fixed = q.quantize_int8(pre, tmp_path / "int8_fixed.onnx", calib_x, q.Int8Settings(keep_float=tuple(keep)))
    assert q.int8_gate(ox.ort_outputs(fp32, x), ox.ort_outputs(fixed, x)).passed


def test_keep_float_unknown_node(exported, calib_x, tmp_path):
    with pytest.raises(ox.ExportError, match="--keep-float: no_such_node not in the graph; nodes are: "):
        q.quantize_int8(exported[2], tmp_path / "x.onnx", calib_x, q.Int8Settings(keep_float=("no_such_node",)))


def test_bad_int8_settings():
    with pytest.raises(ValueError, match="unknown calibration method"):
        q.Int8Settings(method="kl")
    with pytest.raises(ValueError, match="unknown activation type"):
        q.Int8Settings(activation_type="int4")


def test_fp16_keeps_float32_io(exported, eval_set, tmp_path):
    import onnx

    fp16 = q.convert_fp16(exported[1], tmp_path / "fp16.onnx")
    graph = onnx.load(str(fp16)).graph
    f32 = onnx.TensorProto.FLOAT
    assert all(v.type.tensor_type.elem_type == f32 for v in (*graph.input, *graph.output))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    x = eval_set[0][:50]
    check = q.int8_gate(ox.ort_outputs(exported[1], x), ox.ort_outputs(fp16, x))
    assert check.passed and max(check.comparison["max_abs_err"].values()) < 0.05


def test_flops_by_hand(tmp_path):
    model = tiny_model(width=8)
    path = ox.export_onnx(model, tmp_path / "m.onnx", SIZE)
    # convs 3x3 stride 2: 1->8 at 16x16, 8->16 at 8x8, 16->32 at 4x4; heads 32 -> 6 + 5 + 55 + 25
    macs = 8 * 16 * 16 * 9 * 1 + 16 * 8 * 8 * 9 * 8 + 32 * 4 * 4 * 9 * 16 + 32 * (6 + 5 + 55 + 25)
    info = ox.count_flops(path, SIZE)
    assert info["flops"] == 2 * macs
    assert info["params"] == sum(p.numel() for p in model.parameters()) - 2 * (8 + 16 + 32)  # BN folded


def test_thresholds_at_the_percentile():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (1000, 6))
    t = ox.calibrate_thresholds(logits, percentile=1.0)
    conf = np.exp(logits).max(1) / np.exp(logits).sum(1)
    energy = -np.log(np.exp(logits).sum(1))
    assert np.mean(conf < t["confidence_min"]) == pytest.approx(0.01, abs=0.002)
    assert np.mean(energy > t["ood_energy_max"]) == pytest.approx(0.01, abs=0.002)
    assert t["frames"] == 1000 and t["quality_diagnostic"] == 0.6


def test_folder_frames(tmp_path):
    import cv2

    from export.heldout import folder_frames

    for i in range(3):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), np.full((40, 60), 50 * i, np.uint8))
    (tmp_path / "notes.txt").write_text("ignored")
    x = folder_frames(tmp_path, size=SIZE)
    assert x.shape == (3, 1, SIZE, SIZE) and x.dtype == np.float32
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png: cannot decode"):
        folder_frames(tmp_path, size=SIZE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no images"):
        folder_frames(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        folder_frames(tmp_path / "missing")


def test_sim_frames_from_the_simulator():
    pytest.importorskip("devices.sim", reason="the simulator (devices/sim) is not there yet")
    from devices.labels import VIEWS
    from export.heldout import sim_frames

    x, labels = sim_frames(4, first_patient=20000, frames_per_patient=2, size=SIZE, progress=False)
    assert x.shape == (4, 1, SIZE, SIZE) and x.dtype == np.float32 and np.isfinite(x).all()
    assert labels["view"].shape == (4,) and labels["action"].shape == (4, len(VIEWS))
    assert labels["quality"].shape == (4, len(VIEWS)) and ((labels["quality"] >= 0) & (labels["quality"] <= 1)).all()
    with pytest.raises(ValueError, match="at least one"):
        sim_frames(0)


def test_int8_gate_catches_a_quality_error_only_near_the_capture_line():
    rng = np.random.default_rng(0)
    n = 200
    ref = {"view_logits": rng.normal(size=(n, 6)).astype(np.float32), "quality": np.zeros((n, 5), np.float32),
           "action_logits": rng.normal(size=(n, 5, 11)).astype(np.float32),
           "pose_offset": np.zeros((n, 5, 5), np.float32)}
    ref["quality"][:10, 0] = 0.9                       # 10 of 1000 pairs are good views
    got = {k: v.copy() for k, v in ref.items()}
    got["quality"][:10, 0] = 0.8                       # int8 off by 0.1 exactly there
    gate = q.int8_gate(ref, got)
    assert gate.comparison["quality_mae"] == pytest.approx(0.001, abs=1e-6)   # the plain mean hides it
    assert gate.comparison["quality_mae_meter"] == pytest.approx(0.1, abs=1e-6)
    assert not gate.passed and any("where fp32 quality >= 0.3" in f for f in gate.failures)
    ref["quality"][:] = 0.0                           # nothing to judge the meter range on: not a pass
    assert not q.int8_gate(ref, {k: v.copy() for k, v in ref.items()}).passed
