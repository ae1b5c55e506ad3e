"""int8 static post-training quantization (QDQ) with an accuracy gate, and the fp16 conversion.

The calibration method, activation type and weight range are chosen by measurement on the target
CPU (`pocus export --int8-sweep`); see INT8_DEFAULT and export/README.md.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from export.onnx_export import (QUALITY_METER_MIN, ExportError, compare_outputs, format_comparison, ort_outputs,
                                ort_session)

METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("quint8", "qint8")


@dataclass(frozen=True)
class Int8Settings:
    """How to quantize. Weights are always symmetric int8 per output channel.

    Attributes:
        method: calibration method: minmax | entropy | percentile.
        activation_type: quint8 (asymmetric, u8s8 kernels) | qint8 (symmetric, s8s8).
        reduce_range: 7-bit weights (guards u8s8 saturation on CPUs without VNNI).
        per_channel: per-output-channel weight scales.
        keep_float: node names (of the pre-processed graph) left in float.
        float_stem: leave the first conv (the one reading the image) in float.
        batch: calibration batch size.
    """

    method: str = "minmax"
    activation_type: str = "quint8"
    reduce_range: bool = False
    per_channel: bool = True
    keep_float: tuple[str, ...] = ()
    float_stem: bool = False
    batch: int = 16

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.activation_type not in ACTIVATION_TYPES:
            raise ValueError(f"unknown activation type {self.activation_type!r}: choose {', '.join(ACTIVATION_TYPES)}")


# Chosen by measurement on the 2-core AVX2 CPU without VNNI (AMD EPYC, one thread) with
# `pocus export --int8-sweep` on pocusnet_s, 200 calibration / 500 held-out simulated frames
# (table in export/README.md):
# - float stem: the first conv reads the 1-channel image (a 9-long dot product that the u8s8 kernels
#   pad and waste): in int8 the whole model ran no faster than fp32 (1.44 vs 1.42 ms); with that conv
#   in fp32, 0.97 ms. It also keeps the image itself from being rounded to 8 bits.
# - activations QUInt8: QInt8 ran 15-25 % slower (MLAS has no native s8s8 path on AVX2) and its action
#   agreement was lower (98.1-98.8 % vs 99.0-99.2 %).
# - 8-bit weights (reduce_range False): ORT suggests 7-bit weights on non-VNNI CPUs against int16
#   saturation in vpmaddubsw; here 7 bits measured no faster and slightly less accurate (view
#   agreement 99.4 vs 99.8 %), and the accuracy gate catches a model where saturation would bite.
# - percentile (99.999th) calibration: the best of the three on action agreement (99.2 %), equal on
#   view and quality; entropy gave exactly minmax's scales on this ReLU net. Same speed for all three.
INT8_DEFAULT = Int8Settings(method="percentile", activation_type="quint8", reduce_range=False, float_stem=True)


@dataclass(frozen=True)
class GateLimits:
    """int8 vs fp32 on held-out frames; below these the int8 file is not shipped."""

    view_agreement_min: float = 0.99    # argmax of view_logits
    action_agreement_min: float = 0.98  # argmax of action_logits for the selected target (every target in turn)
    quality_mae_max: float = 0.02       # mean |quality_int8 - quality_fp32|
    quality_mae_meter_max: float = 0.03  # ... where fp32 quality >= QUALITY_METER_MIN: int8 may add at
    #                                      most a tenth of the app's 0.25 capture margin there


@dataclass
class GateResult:
    """Outcome of the int8 accuracy gate."""

    passed: bool
    comparison: dict
    limits: GateLimits
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        c = self.comparison
        return {"passed": self.passed, "failures": self.failures, "limits": asdict(self.limits), "frames": c["frames"],
                "view_agreement": c["view_agreement"], "action_agreement": c["action_agreement"],
                "action_agreement_per_target": c["action_agreement_per_target"], "quality_mae": c["quality_mae"],
                "quality_mae_meter": c["quality_mae_meter"], "max_abs_err": c["max_abs_err"]}


class ArrayReader:
    """onnxruntime CalibrationDataReader over an array of preprocessed frames."""

    def __init__(self, x: np.ndarray, input_name: str, batch: int = 16) -> None:
        # Equal batches only: onnxruntime's histogram calibrators (entropy, percentile) stack the
        # per-batch outputs and fail on a short last batch, so the remainder is dropped.
        batch = max(1, min(batch, len(x)))
        self.x, self.input_name, self.batch = x[:len(x) // batch * batch], input_name, batch
        self.rewind()

    def rewind(self) -> None:
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self.x):
            return None
        feed = {self.input_name: self.x[self._i:self._i + self.batch]}
        self._i += self.batch
        return feed

    def __iter__(self):
        self.rewind()
        return iter(self.get_next, None)


def preprocess_for_quant(fp32_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """onnxruntime's quant_pre_process: shape inference and graph optimization (folds BN into conv)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=False)
    return Path(out_path)


def node_names(onnx_path: str | os.PathLike) -> list[str]:
    """Names of the nodes of a graph (what --keep-float takes)."""
    import onnx

    return [n.name for n in onnx.load(str(onnx_path)).graph.node]


def quantize_int8(pre_path: str | os.PathLike, out_path: str | os.PathLike, calib_x: np.ndarray,
                  settings: Int8Settings = INT8_DEFAULT) -> Path:
    """Static QDQ quantization of a pre-processed fp32 graph.

    Args:
        pre_path: output of `preprocess_for_quant`.
        out_path: int8 file to write.
        calib_x: float32 [N, 1, H, W] calibration frames (devices.preprocess).
        settings: method, activation type, excluded nodes.

    Returns:
        out_path.

    Raises:
        ExportError: a --keep-float name is not a node of the graph, or no calibration frames.
    """
    if len(calib_x) == 0:
        raise ExportError("int8 calibration needs frames, got none")
    import onnx

    graph = onnx.load(str(pre_path)).graph
    names = [n.name for n in graph.node]
    unknown = [n for n in settings.keep_float if n not in names]
    if unknown:
        raise ExportError(f"--keep-float: {', '.join(unknown)} not in the graph; nodes are: {', '.join(names)}")
    input_name = graph.input[0].name
    keep = list(settings.keep_float)
    if settings.float_stem:
        keep += [n.name for n in graph.node if n.op_type == "Conv" and input_name in n.input][:1]
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
        _quantize_static(pre_path, out_path, calib_x, settings, input_name, keep)
    return Path(out_path)


def _quantize_static(pre_path, out_path, calib_x, settings: Int8Settings, input_name: str, keep: list[str]) -> None:
    """onnxruntime's quantize_static with our settings: QDQ, symmetric int8 weights."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[settings.method]
    act = {"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}[settings.activation_type]
    quantize_static(
        str(pre_path), str(out_path), ArrayReader(calib_x, input_name, settings.batch),
        quant_format=QuantFormat.QDQ, per_channel=settings.per_channel, reduce_range=settings.reduce_range,
        activation_type=act, weight_type=QuantType.QInt8, calibrate_method=method,
        nodes_to_exclude=keep or None,
        extra_options={"ActivationSymmetric": settings.activation_type == "qint8", "WeightSymmetric": True,
                       "CalibMovingAverage": False},
    )


def int8_gate(fp32_out: Mapping[str, np.ndarray], int8_out: Mapping[str, np.ndarray],
              limits: GateLimits = GateLimits()) -> GateResult:
    """Compare int8 outputs with fp32 outputs on the same held-out frames."""
    c = compare_outputs(fp32_out, int8_out)
    failures = []
    if not c["view_agreement"] >= limits.view_agreement_min:
        failures.append(f"view agreement {c['view_agreement']:.2%} < {limits.view_agreement_min:.0%}")
    if not c["action_agreement"] >= limits.action_agreement_min:
        failures.append(f"best-action agreement {c['action_agreement']:.2%} < {limits.action_agreement_min:.0%}")
    if not c["quality_mae"] <= limits.quality_mae_max:
        failures.append(f"quality mean abs change {c['quality_mae']:.4f} > {limits.quality_mae_max}")
    if not c["quality_mae_meter"] <= limits.quality_mae_meter_max:   # NaN (no frame in range) fails too
        failures.append(f"quality mean abs change where fp32 quality >= {QUALITY_METER_MIN:g} {c['quality_mae_meter']:.4f} > "
                        f"{limits.quality_mae_meter_max} (NaN: no held-out frame that good)")
    return GateResult(passed=not failures, comparison=c, limits=limits, failures=failures)


def _sqnr_db(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(whole-tensor SQNR, worst-channel SQNR) in dB; channels on axis 1, all-zero channels skipped.

    The whole-tensor figure is dominated by the largest channels, so an outlier channel that
    pushes every other one below the int8 step hides there; the worst channel shows it.
    """
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    whole = 20 * np.log10(max(np.linalg.norm(ref), 1e-12) / max(np.linalg.norm(ref - got), 1e-12))
    if ref.ndim < 2:
        return float(whole), float(whole)
    r = np.moveaxis(ref, 1, 0).reshape(ref.shape[1], -1)
    g = np.moveaxis(got, 1, 0).reshape(ref.shape[1], -1)
    norm = np.linalg.norm(r, axis=1)
    live = norm > 1e-6 * max(norm.max(), 1e-12)
    per = 20 * np.log10(norm[live] / np.maximum(np.linalg.norm(r - g, axis=1)[live], 1e-12))
    return float(whole), float(per.min()) if per.size else float(whole)


def layer_errors(pre_path: str | os.PathLike, int8_path: str | os.PathLike, x: np.ndarray) -> list[dict[str, Any]]:
    """Where int8 loses accuracy, per quantized activation in graph order.

    Uses onnxruntime.quantization.qdq_loss_debug to run both graphs with every tensor as an output.

    Returns:
        [{"tensor", "node" (its producer in the float graph), "op", "sqnr_db" (float model vs int8
          model, whole tensor), "qdq_sqnr_db" (this tensor's own int8 rounding, whole tensor),
          "qdq_worst_channel_db" (own rounding, worst channel)}], in graph order.
    """
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, create_activation_matching,
                                                          modify_model_output_intermediate_tensors)

    graph = onnx.shape_inference.infer_shapes(onnx.load(str(pre_path))).graph
    order = {o: (i, n.name, n.op_type) for i, n in enumerate(graph.node) for o in n.output}
    channels = {v.name: (v.type.tensor_type.shape.dim[1].dim_value if len(v.type.tensor_type.shape.dim) > 1 else 0)
                for v in (*graph.value_info, *graph.output)}
    name = graph.input[0].name
    reader = ArrayReader(x, name, 16)
    batches = [reader.batch] * (len(reader.x) // reader.batch)
    with tempfile.TemporaryDirectory() as tmp:
        aug_f, aug_q = Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx"
        modify_model_output_intermediate_tensors(str(pre_path), str(aug_f))
        modify_model_output_intermediate_tensors(str(int8_path), str(aug_q))
        float_acts = collect_activations(str(aug_f), reader)
        qdq_acts = collect_activations(str(aug_q), reader)
    rows = []
    for tensor, match in create_activation_matching(qdq_acts, float_acts).items():
        if tensor not in order or not match.get("float"):
            continue
        # qdq_loss_debug flattens every tensor: restore [batch, channel, rest] to rank channels.
        c = channels.get(tensor) or 1
        pre, post, ref = (np.concatenate([a.reshape(b, c, -1) for a, b in zip(match[k], batches)])
                          for k in ("pre_qdq", "post_qdq", "float"))
        index, node, op = order[tensor]
        if op == "Relu":  # the quantizer folds a Relu into its producer's u8 range: compare rectified values
            pre = np.maximum(pre, 0)
        whole, _ = _sqnr_db(ref, post)
        own, own_worst = _sqnr_db(pre, post)
        rows.append({"index": index, "tensor": tensor, "node": node, "op": op, "sqnr_db": whole,
                     "qdq_sqnr_db": own, "qdq_worst_channel_db": own_worst})
    return sorted(rows, key=lambda r: r["index"])


def suggest_keep_float(pre_path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], min_db: float = 15.0) -> list[str]:
    """Nodes to keep in float so the first badly rounded activation stays float.

    The first tensor (graph order) whose worst channel loses more than `min_db` to its own int8
    rounding; its producer (with the Conv/Gemm it is fused with) and its consumers.
    """
    import onnx

    bad = next((r for r in rows if r["qdq_worst_channel_db"] < min_db), None)
    if bad is None:
        return []
    nodes = list(onnx.load(str(pre_path)).graph.node)
    by_output = {o: n for n in nodes for o in n.output}
    producer = by_output[bad["tensor"]]
    keep = [producer.name]
    if producer.op_type in ("Relu", "Clip") and producer.input[0] in by_output:
        keep.insert(0, by_output[producer.input[0]].name)
    keep += [n.name for n in nodes if bad["tensor"] in n.input]
    return keep


def format_gate_failure(result: GateResult, rows: Sequence[Mapping[str, Any]], suggestion: Sequence[str] = ()) -> str:
    """The report printed when the int8 gate fails: what was lost and which layers to keep in float."""
    lines = ["int8 accuracy gate FAILED: " + "; ".join(result.failures), format_comparison(result.comparison),
             "  activations in graph order: SQNR of the int8 model vs float, and of each tensor's own int8 rounding "
             "(whole tensor / worst channel):",
             f"  {'node':<28} {'op':<12} {'tensor':<22} {'vs float dB':>11} {'own dB':>7} {'worst ch dB':>11}"]
    for r in rows:
        flag = "  <-" if r["qdq_worst_channel_db"] < 15 else ""
        lines.append(f"  {r['node'][:28]:<28} {r['op'][:12]:<12} {r['tensor'][:22]:<22} {r['sqnr_db']:>11.1f} "
                     f"{r['qdq_sqnr_db']:>7.1f} {r['qdq_worst_channel_db']:>11.1f}{flag}")
    if suggestion:
        lines.append(f"  Try: --keep-float {','.join(suggestion)}")
    lines.append("  (or another --int8-method, or ship fp32 only by leaving out --int8)")
    return "\n".join(lines)


def convert_fp16(fp32_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """fp16 weights and compute with float32 inputs/outputs (for GPU providers)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))
    return Path(out_path)


def sweep(fp32_path: str | os.PathLike, pre_path: str | os.PathLike, calib_x: np.ndarray, eval_x: np.ndarray,
          workdir: str | os.PathLike, combos: Iterable[Int8Settings] | None = None,
          threads: int = 1, runs: int = 600, progress: bool = True) -> list[dict[str, Any]]:
    """Measure every calibration method x activation type x reduce_range on this CPU (plus the default
    with the other stem choice): gate figures against fp32, and latency at batch 1 measured in
    interleaved rounds so that background load hits every variant alike.

    Returns:
        Rows {method, activation_type, reduce_range, float_stem, view_agreement, action_agreement,
        quality_mae, passed, p50_ms, p50_fp32_ms, speedup}.
    """
    from tqdm import tqdm

    from export.bench import latency_rounds

    stem = INT8_DEFAULT.float_stem
    combos = list(combos or [Int8Settings(method=m, activation_type=a, reduce_range=r, float_stem=stem)
                             for m in METHODS for a in ACTIVATION_TYPES for r in (False, True)]
                  + [replace(INT8_DEFAULT, float_stem=not stem)])
    fp32_out = ort_outputs(fp32_path, eval_x)
    x1 = np.ascontiguousarray(eval_x[:1])
    sessions = {"fp32": ort_session(fp32_path, threads)}
    rows = []
    for i, s in enumerate(tqdm(combos, desc="int8 sweep", disable=not progress)):
        path = quantize_int8(pre_path, Path(workdir) / f"sweep_{i}.onnx", calib_x, s)
        gate = int8_gate(fp32_out, ort_outputs(path, eval_x))
        sessions[i] = ort_session(path, threads)
        rows.append({"method": s.method, "activation_type": s.activation_type, "reduce_range": s.reduce_range,
                     "float_stem": s.float_stem, "view_agreement": gate.comparison["view_agreement"],
                     "action_agreement": gate.comparison["action_agreement"],
                     "quality_mae": gate.comparison["quality_mae"], "passed": gate.passed})
    feeds = {k: (lambda s=s, name=s.get_inputs()[0].name: s.run(None, {name: x1})) for k, s in sessions.items()}
    times = latency_rounds(feeds, runs)
    base = float(np.median(times["fp32"]))
    for i, row in enumerate(rows):
        p50 = float(np.median(times[i]))
        row.update(p50_ms=p50, p50_fp32_ms=base, speedup=base / p50)
    return rows


def format_sweep(rows: Sequence[Mapping[str, Any]]) -> str:
    """The sweep as a table."""
    head = f"{'method':<11}{'act':<8}{'7bit':<6}{'stem':<6}{'view agr':>9}{'act agr':>9}{'qual MAE':>9}{'gate':>6}{'p50 ms':>8}{'x fp32':>8}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['method']:<11}{r['activation_type']:<8}{str(r['reduce_range']):<6}"
                     f"{'fp32' if r['float_stem'] else 'int8':<6}{r['view_agreement']:>9.2%}"
                     f"{r['action_agreement']:>9.2%}{r['quality_mae']:>9.4f}{'pass' if r['passed'] else 'FAIL':>6}"
                     f"{r['p50_ms']:>8.3f}{r['speedup']:>8.2f}")
    if rows:
        lines.append(f"fp32 p50 {rows[0]['p50_fp32_ms']:.3f} ms (batch 1, one thread)")
    return "\n".join(lines)
