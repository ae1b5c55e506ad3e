"""Checkpoint -> ONNX, parity against torch, manifest, and the bundle folder.

torch and onnx are imported inside the functions that need them (the package stays import-light).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from devices.labels import ACTIONS, INPUT_NAME, OTHER, OUTPUT_NAMES, POSE_AXES, POSE_SCALE, QUALITY_DIAGNOSTIC, VIEW_LABELS
from devices.preprocess import NORM_MEAN, NORM_STD
from edge_app.bundle import (BUNDLE_JSON, FILE_FOR_PRECISION, MANIFEST_KEY, SCHEMA_VERSION, sha256_file,
                             view_scores)

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # holds devices/, training/, export/, edge_app/
# Quality from which an error matters for the app's capture decision: most held-out (frame, view)
# pairs are ~0 (no such view in the image) and would hide an error near the capture line in a plain mean.
QUALITY_METER_MIN = 0.3


class ExportError(ValueError):
    """The export cannot produce a trustworthy bundle (bad checkpoint, parity or accuracy gate failed)."""

    user_facing = True


# ----------------------------------------------------------------------------------------------
# Checkpoint and ONNX graph
# ----------------------------------------------------------------------------------------------

def load_weights(path: str | os.PathLike):
    """Load a training checkpoint with training.models.load_checkpoint.

    Returns:
        (model in eval mode, checkpoint dict).

    Raises:
        ExportError: file missing, training.models unavailable, or a checkpoint without the keys
            the bundle needs.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint {path} does not exist (train one with `pocus train`)")
    try:
        from training.models import load_checkpoint
    except ImportError as e:
        raise ExportError(f"cannot load {path}: training.models is not available ({e})") from e
    model, ckpt = load_checkpoint(path)
    missing = [k for k in ("model_name", "labels", "input_size") if k not in ckpt]
    if missing:
        raise ExportError(f"{path}: checkpoint lacks {', '.join(missing)} (not written by `pocus train`?)")
    return model.eval(), ckpt


def targets_of(labels: Mapping[str, Any]) -> list[str]:
    """Target views (quality/action/pose heads): the views without OTHER."""
    return [v for v in labels["views"] if v != OTHER]


def output_shapes(labels: Mapping[str, Any]) -> dict[str, list]:
    """Output shapes with a symbolic batch, from the label lists (the model contract)."""
    V, T, A, P = len(labels["views"]), len(targets_of(labels)), len(labels["actions"]), len(labels["pose_axes"])
    return {"view_logits": ["batch", V], "quality": ["batch", T], "action_logits": ["batch", T, A],
            "pose_offset": ["batch", T, P]}


def export_onnx(model, path: str | os.PathLike, input_size: int, opset: int = 18, exporter: str = "dynamo") -> Path:
    """Export a model with the four-output contract to ONNX with a dynamic batch axis.

    Args:
        model: torch module returning a tuple ordered as devices.labels.OUTPUT_NAMES.
        path: where to write the .onnx file.
        input_size: side of the square input.
        opset: ONNX opset (>= 17).
        exporter: "dynamo" (torch.export based, static non-batch output shapes) or "legacy" (TorchScript).

    Returns:
        The path written.

    Raises:
        ExportError: the model does not return four outputs, or the graph fails onnx.checker.
    """
    import onnx
    import torch

    if opset < 17:
        raise ExportError(f"opset {opset} is too old: use 17 or newer")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.zeros(2, 1, input_size, input_size)
    with torch.no_grad():
        out = model(example)
    if not isinstance(out, (tuple, list)) or len(out) != len(OUTPUT_NAMES):
        raise ExportError(f"the model must return a tuple of {len(OUTPUT_NAMES)} tensors ({', '.join(OUTPUT_NAMES)}), "
                          f"got {type(out).__name__}")
    names = dict(input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), opset_version=opset)
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=4096)
        # torch.export's own deprecation chatter and "torchvision is not installed" lines are not ours to fix
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(model, (example,), dynamic_shapes=({0: batch},), dynamo=True,
                                        optimize=True, verbose=False, **names)
        program.save(str(path))
    elif exporter == "legacy":
        axes = {n: {0: "batch"} for n in (INPUT_NAME, *OUTPUT_NAMES)}
        torch.onnx.export(model, (example,), str(path), dynamic_axes=axes, dynamo=False, do_constant_folding=True,
                          **names)
    else:
        raise ExportError(f"unknown exporter {exporter!r}: use dynamo or legacy")
    graph = onnx.load(str(path))
    try:
        onnx.checker.check_model(graph, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path}: exported graph fails onnx.checker: {e}") from e
    return path


def count_flops(onnx_path: str | os.PathLike, input_size: int) -> dict[str, int]:
    """FLOPs (2 x multiply-adds of Conv/Gemm/MatMul) and parameter count at batch 1, from the graph.

    Returns:
        {"flops": int, "params": int}
    """
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(onnx_path))
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    flops = 0
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[1] in inits:
            w = inits[node.input[1]]  # [Cout, Cin/groups, kh, kw]
            out = shapes.get(node.output[0], [])
            flops += 2 * int(np.prod(out[1:])) * int(np.prod(w.shape[1:])) if out else 0
        elif node.op_type in ("Gemm", "MatMul") and node.input[1] in inits:
            flops += 2 * int(np.prod(inits[node.input[1]].shape))
    params = sum(int(a.size) for a in inits.values() if a.dtype.kind == "f")
    return {"flops": flops, "params": params}


# ----------------------------------------------------------------------------------------------
# Running and comparing
# ----------------------------------------------------------------------------------------------

def torch_outputs(model, x: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    """Run a torch model on x float32 [N, 1, H, W] in batches -> {output name: array}."""
    import torch

    parts: list[tuple] = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            parts.append(tuple(t.float().numpy() for t in model(torch.from_numpy(x[i:i + batch]))))
    return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(OUTPUT_NAMES)}


def ort_session(onnx_path: str | os.PathLike, threads: int = 1, providers: list | None = None):
    """A plain onnxruntime session (full graph optimization) for checks and benchmarks."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), sess_options=so, providers=providers or ["CPUExecutionProvider"])


def ort_outputs(model: Any, x: np.ndarray, batch: int = 64, threads: int = 2) -> dict[str, np.ndarray]:
    """Run an ONNX file (path) or an onnxruntime session on x in batches -> {output name: array}."""
    session = model if hasattr(model, "run") and hasattr(model, "get_inputs") else ort_session(model, threads)
    name = session.get_inputs()[0].name
    parts = [session.run(list(OUTPUT_NAMES), {name: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return {n: np.concatenate([p[k] for p in parts]) for k, n in enumerate(OUTPUT_NAMES)}


def compare_outputs(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Differences of `got` against `ref` on the same frames.

    Returns:
        {"max_abs_err": {output: float}, "mean_abs_err": {output: float}, "view_agreement": float,
         "action_agreement": float (best action for every target view, i.e. each view selected in
         turn), "action_agreement_per_target": [float], "quality_mae": float,
         "quality_mae_meter": float (over (frame, view) pairs where ref quality >= QUALITY_METER_MIN,
         where the app's capture decision lives; NaN if there are none), "frames": int}
    """
    max_err = {n: float(np.max(np.abs(ref[n].astype(np.float64) - got[n]))) for n in OUTPUT_NAMES}
    mean_err = {n: float(np.mean(np.abs(ref[n].astype(np.float64) - got[n]))) for n in OUTPUT_NAMES}
    view_agree = np.argmax(ref["view_logits"], -1) == np.argmax(got["view_logits"], -1)
    action_agree = np.argmax(ref["action_logits"], -1) == np.argmax(got["action_logits"], -1)  # [N, T]
    return {"frames": int(len(ref["view_logits"])), "max_abs_err": max_err, "mean_abs_err": mean_err,
            "view_agreement": float(view_agree.mean()), "action_agreement": float(action_agree.mean()),
            "action_agreement_per_target": [float(a) for a in action_agree.mean(0)],
            "quality_mae": mean_err["quality"], "quality_mae_meter": _meter_mae(ref["quality"], got["quality"])}


def _meter_mae(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean |got - ref| quality where ref >= QUALITY_METER_MIN (NaN when no pair is that high)."""
    meter = np.asarray(ref) >= QUALITY_METER_MIN
    return float(np.mean(np.abs(np.asarray(got, np.float64)[meter] - ref[meter]))) if meter.any() else float("nan")


def check_parity(report: Mapping[str, Any], atol: float = 1e-3, what: str = "ONNX fp32") -> None:
    """Raise ExportError with the whole report when any output differs from torch by more than `atol`."""
    bad = {n: e for n, e in report["max_abs_err"].items() if not e <= atol}  # `not <=` also catches NaN
    if bad:
        raise ExportError(f"{what} does not match torch (tolerance {atol:g}):\n{format_comparison(report)}\n"
                          "The exported graph computes something else: try --exporter legacy, or check the "
                          "model for ops that behave differently in eval/export.")


def format_comparison(report: Mapping[str, Any]) -> str:
    """Readable lines: per-output max/mean abs error, then the label agreements."""
    lines = [f"  {'output':<14} {'max abs err':>12} {'mean abs err':>13}"]
    for n in report["max_abs_err"]:
        lines.append(f"  {n:<14} {report['max_abs_err'][n]:>12.3g} {report['mean_abs_err'][n]:>13.3g}")
    per_target = ", ".join(f"{a:.1%}" for a in report["action_agreement_per_target"])
    lines.append(f"  view agreement {report['view_agreement']:.2%}, best-action agreement "
                 f"{report['action_agreement']:.2%} (per target: {per_target}), quality MAE "
                 f"{report['quality_mae']:.4f} on {report['frames']} frames")
    return "\n".join(lines)


def calibrate_thresholds(view_logits: np.ndarray, percentile: float = 1.0) -> dict[str, Any]:
    """Safety-gate thresholds from in-distribution held-out frames.

    Args:
        view_logits: [N, V+1] outputs on held-out in-distribution frames.
        percentile: share (%) of in-distribution frames the gate may reject.

    Returns:
        {"quality_diagnostic", "confidence_min" (max softmax below it = model unsure),
         "ood_energy_max" (energy = -logsumexp above it = out of distribution), "percentile", "frames",
         "definitions"} (see edge_app.bundle.view_scores).
    """
    confidence, energy = view_scores(view_logits)
    return {
        "quality_diagnostic": QUALITY_DIAGNOSTIC,
        "confidence_min": float(np.percentile(confidence, percentile)),
        "ood_energy_max": float(np.percentile(energy, 100.0 - percentile)),
        "percentile": percentile,
        "frames": int(len(confidence)),
        "definitions": {
            "confidence": "max(softmax(view_logits)); unsure when < confidence_min",
            "energy": "-logsumexp(view_logits); out of distribution when > ood_energy_max",
            "calibration": f"{percentile:g}% of held-out in-distribution frames fall outside each threshold",
        },
    }


# ----------------------------------------------------------------------------------------------
# Manifest and bundle
# ----------------------------------------------------------------------------------------------

def export_time() -> str:
    """UTC time stamp for manifests, or SOURCE_DATE_EPOCH's when set (reproducible builds): with it,
    exporting the same checkpoint twice gives byte-identical files (the time stamp was the only
    difference, measured on the shipped checkpoint).

    Raises:
        ValueError: SOURCE_DATE_EPOCH is not a whole number of seconds.
    """
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        when = _dt.datetime.now(_dt.timezone.utc)
    else:
        try:
            when = _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc)
        except ValueError:
            raise ValueError(f"SOURCE_DATE_EPOCH must be whole seconds since 1970, got {epoch!r}") from None
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def build_manifest(ckpt: Mapping[str, Any], checkpoint_path: str | os.PathLike, input_size: int,
                   thresholds: Mapping[str, Any], graph_info: Mapping[str, Any],
                   export_info: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest shared by every file of a bundle (the per-file keys are added by `write_bundle`).

    Args:
        ckpt: the training checkpoint dict.
        checkpoint_path: where it was read from (recorded so `pocus bench model` finds it).
        input_size: model input side.
        thresholds: from `calibrate_thresholds`.
        graph_info: {"flops", "params"} from `count_flops`.
        export_info: exporter, opset, versions, parity figures.
    """
    labels = ckpt["labels"]
    checkpoint_path = Path(checkpoint_path)
    digest = sha256_file(checkpoint_path)
    try:  # relative to the repository / install root when inside it, so the bundle stays portable
        shown_path = str(checkpoint_path.resolve().relative_to(PACKAGE_ROOT))
    except ValueError:
        shown_path = str(checkpoint_path.resolve())
    shapes = output_shapes(labels)
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {"name": ckpt["model_name"], "version": digest[:12], "epoch": ckpt.get("epoch"),
                  "kwargs": ckpt.get("model_kwargs", {}), **graph_info},
        "labels": {"views": list(labels["views"]), "targets": targets_of(labels),
                   "actions": list(labels["actions"]), "pose_axes": list(labels["pose_axes"]),
                   "pose_scale": [float(s) for s in POSE_SCALE] if list(labels["pose_axes"]) == list(POSE_AXES) else None},
        "input": {"name": INPUT_NAME, "shape": ["batch", 1, input_size, input_size], "dtype": "float32",
                  "normalization": {"mean": NORM_MEAN, "std": NORM_STD,
                                    "formula": "(pixel / 255 - mean) / std after square pad + resize",
                                    "function": "devices.preprocess.preprocess"}},
        "outputs": [{"name": n, "shape": shapes[n], "dtype": "float32"} for n in OUTPUT_NAMES],
        "thresholds": dict(thresholds),
        "metrics": _jsonable(ckpt.get("metrics", {})),
        "training": {"config_hash": ckpt.get("config_hash"), "checkpoint": shown_path,
                     "checkpoint_sha256": digest, "epoch": ckpt.get("epoch")},
        "export": dict(export_info),
    }


def check_labels(labels: Mapping[str, Any]) -> None:
    """Refuse checkpoints whose label lists disagree with this runtime's devices.labels.

    The guidance engine maps action indices to instructions through devices.labels, so a silent
    reordering would give wrong instructions.
    """
    ours = {"views": list(VIEW_LABELS), "actions": list(ACTIONS), "pose_axes": list(POSE_AXES)}
    for key, expected in ours.items():
        if list(labels.get(key, [])) != expected:
            raise ExportError(f"checkpoint labels[{key!r}] = {list(labels.get(key, []))} differ from devices.labels "
                              f"({expected}); retrain with the current labels")


def _jsonable(value: Any) -> Any:
    """Checkpoint metrics as plain JSON (numpy/torch scalars to floats, arrays to lists)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def embed_manifest(src: str | os.PathLike, dst: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Copy an ONNX file to `dst` with the manifest in metadata_props[MANIFEST_KEY]."""
    import onnx

    model = onnx.load(str(src))
    for i in reversed(range(len(model.metadata_props))):
        if model.metadata_props[i].key == MANIFEST_KEY:
            del model.metadata_props[i]
    model.metadata_props.add(key=MANIFEST_KEY, value=json.dumps(manifest, sort_keys=True))
    model.producer_name = "pocus export"
    model.doc_string = f"POCUS Guide {manifest['model']['name']} {manifest['model']['version']} {manifest.get('precision')}"
    onnx.save(model, str(dst))
    return Path(dst)


def write_bundle(out_dir: str | os.PathLike, models: Mapping[str, str | os.PathLike], manifest: Mapping[str, Any],
                 per_file: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write the bundle folder: one ONNX file per precision with its manifest, then bundle.json.

    Args:
        out_dir: bundle folder (created; existing model files and bundle.json are replaced).
        models: {precision: path of the ONNX file to ship}.
        manifest: the shared manifest (`build_manifest`).
        per_file: {precision: extra manifest keys for that file}, e.g. the int8 "precision_check" record.

    Returns:
        The path of bundle.json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for precision, src in models.items():
        name = FILE_FOR_PRECISION[precision]
        extra = dict((per_file or {}).get(precision, {}))
        tmp = out_dir / f".{name}.tmp"
        embed_manifest(src, tmp, {**manifest, **extra, "precision": precision, "file": name})
        os.replace(tmp, out_dir / name)
        files[name] = {"sha256": sha256_file(out_dir / name), "size_bytes": (out_dir / name).stat().st_size,
                       "precision": precision}
    for stale in set(FILE_FOR_PRECISION.values()) - set(files):  # an older export's files would mislead
        (out_dir / stale).unlink(missing_ok=True)
    info = {"schema_version": SCHEMA_VERSION, "created": export_time(),
            "files": files, "manifest": dict(manifest)}
    tmp = out_dir / f".{BUNDLE_JSON}.tmp"
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out_dir / BUNDLE_JSON)
    return out_dir / BUNDLE_JSON
