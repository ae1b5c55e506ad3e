"""`pocus export`: checkpoint -> verified ONNX bundle (fp32, optional int8 / fp16).

Steps: export with torch.onnx -> parity against torch on held-out simulated frames (fails the export
when off) -> safety-gate thresholds calibrated on held-out frames -> int8 static QDQ with an accuracy
gate (fails with a per-layer report when off) -> fp16 -> manifest in every file + bundle.json ->
reload through edge_app.bundle.load_bundle as the app will.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from devices.preprocess import INPUT_SIZE


@dataclass
class ExportConfig:
    """Defaults of `pocus export`; every field can be set from the command line."""

    weights: str = "training/checkpoints/default.pt"  # the shipped checkpoint
    out: str = ""               # bundle folder; empty = runs/export/<checkpoint name>
    int8: bool = False          # add model.int8.onnx (CPU targets)
    fp16: bool = False          # add model.fp16.onnx (GPU targets)
    profile: str = ""           # a device profile: its precisions are produced when no --int8/--fp16 is given
    calib: int = 1000           # calibration frames: int8 ranges and the OOD/confidence thresholds (their 1 %
                                #   tails: 200 frames put the shipped model's confidence_min at 0.663, 1000 at 0.545)
    calib_dir: str = ""         # a folder of the user's images to calibrate on instead of the simulator
    eval: int = 500             # held-out frames for parity and the int8 gate (1 % = 5 frames)
    frames_per_patient: int = 10  # several poses per simulated patient, many patients
    seed: int = 0               # another draw of held-out patients (shifts the patient seeds)
    exporter: str = "dynamo"    # dynamo: static non-batch output shapes and a folded graph; legacy: TorchScript
    opset: int = 18             # the dynamo exporter's native opset (>= 17 required)
    atol: float = 1e-3          # fp32 ONNX vs torch: max abs error on every output
    ood_percentile: float = 1.0  # share (%) of in-distribution frames the OOD / confidence gates may reject
    int8_method: str = ""       # empty = export.quantize.INT8_DEFAULT (chosen by measurement)
    int8_activation: str = ""   # empty = INT8_DEFAULT
    keep_float: str = ""        # comma-separated node names left in float in the int8 model
    int8_sweep: bool = False    # measure every calibration method x activation type and stop
    threads: int = 2            # torch / onnxruntime threads for the checks


def configure_export(parser: argparse.ArgumentParser):
    """Add the export arguments; return the command."""
    d = ExportConfig()
    parser.description = (
        "Export a training checkpoint to a verified ONNX bundle folder: model.onnx (fp32) plus "
        "model.int8.onnx / model.fp16.onnx on request, each with its manifest, and bundle.json with their "
        "SHA-256. Fails when fp32 ONNX does not match torch or when int8 loses accuracy (it then prints the "
        "layers to keep in float). Held-out frames come from simulated patients training never saw.")
    parser.epilog = ("example (the shipped bundle): pocus export --weights training/checkpoints/default.pt "
                     "--int8 --out edge_app/bundles/default")
    parser.add_argument("--weights", default=d.weights, help=f"training checkpoint (default {d.weights})")
    parser.add_argument("--out", default=d.out, help="bundle folder (default runs/export/<checkpoint name>)")
    parser.add_argument("--int8", action="store_true", help="add the int8 static-quantized model (CPU)")
    parser.add_argument("--fp16", action="store_true", help="add the fp16 model (GPU providers)")
    parser.add_argument("--profile", default=d.profile,
                        help="device profile (cpu, jetson-orin, desktop-cuda or a .yaml): produce its precisions "
                             "when neither --int8 nor --fp16 is given, and check the bundle loads with it")
    parser.add_argument("--calib", type=int, default=d.calib, metavar="N",
                        help=f"calibration frames for int8 and the OOD thresholds (default {d.calib})")
    parser.add_argument("--calib-dir", default=d.calib_dir, metavar="DIR",
                        help="calibrate on a folder of your images (png/jpg) instead of simulated frames")
    parser.add_argument("--eval", type=int, default=d.eval, metavar="N",
                        help=f"held-out frames for parity and the int8 gate (default {d.eval})")
    parser.add_argument("--keep-float", default=d.keep_float, metavar="NODES",
                        help="comma-separated graph nodes kept in float in the int8 model (the gate report names them)")
    parser.add_argument("--int8-method", default=d.int8_method, choices=["", "minmax", "entropy", "percentile"],
                        help="calibration method (default: the measured choice, see export/README.md)")
    parser.add_argument("--int8-activation", default=d.int8_activation, choices=["", "quint8", "qint8"],
                        help="activation type (default: the measured choice)")
    parser.add_argument("--int8-sweep", action="store_true",
                        help="measure accuracy and speed of every calibration method x activation type on this CPU, "
                             "print the table and stop (writes no bundle)")
    parser.add_argument("--exporter", default=d.exporter, choices=["dynamo", "legacy"],
                        help=f"torch.onnx exporter (default {d.exporter})")
    parser.add_argument("--opset", type=int, default=d.opset, help=f"ONNX opset, >= 17 (default {d.opset})")
    parser.add_argument("--atol", type=float, default=d.atol, help=f"fp32 parity tolerance (default {d.atol:g})")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="draw other held-out patients (default 0: calibration 10000+, evaluation 20000+)")
    parser.add_argument("--threads", type=int, default=d.threads, help=f"CPU threads for the checks (default {d.threads})")
    return run_export


def _config(args: argparse.Namespace) -> ExportConfig:
    values = {f.name: getattr(args, f.name) for f in fields(ExportConfig) if hasattr(args, f.name)}
    return ExportConfig(**values)


def run_export(args: argparse.Namespace) -> int:
    """Run `pocus export` (see the module docstring)."""
    export_bundle(_config(args))
    return 0


def _frames(cfg: ExportConfig, input_size: int):
    """(calibration x, eval x, eval labels or None, description)."""
    from export.heldout import CALIB_FIRST_PATIENT, EVAL_FIRST_PATIENT, folder_frames, sim_frames

    if cfg.calib_dir:
        calib_x = folder_frames(cfg.calib_dir, cfg.calib, input_size)
        where = f"{len(calib_x)} images from {cfg.calib_dir}"
    else:
        calib_x, _ = sim_frames(cfg.calib, CALIB_FIRST_PATIENT, cfg.frames_per_patient, input_size, cfg.seed)
        where = f"{cfg.calib} simulated frames, patients {CALIB_FIRST_PATIENT}+"
    try:
        eval_x, eval_y = sim_frames(cfg.eval, EVAL_FIRST_PATIENT, cfg.frames_per_patient, input_size, cfg.seed)
    except ValueError:
        if not cfg.calib_dir:
            raise
        print("simulator unavailable: the parity and int8 checks use the calibration images")
        eval_x, eval_y = calib_x, None
    return calib_x, eval_x, eval_y, where


def export_bundle(cfg: ExportConfig) -> Path | None:
    """Do the whole export described by `cfg`.

    Returns:
        Path of the bundle.json written (None after --int8-sweep).

    Raises:
        ExportError: bad checkpoint, parity failure, int8 gate failure, unknown --keep-float nodes.
        BundleError: unknown profile, or the written bundle fails to load.
    """
    import onnxruntime as ort
    import torch

    from edge_app.bundle import load_bundle, load_profile
    from export import onnx_export as ox
    from export import quantize as q

    t_start = time.perf_counter()
    ox.export_time()  # a bad SOURCE_DATE_EPOCH fails here, not after minutes of work
    torch.set_num_threads(cfg.threads)
    profile = load_profile(cfg.profile) if cfg.profile else None
    precisions = ["fp32"] + [p for p, on in (("int8", cfg.int8), ("fp16", cfg.fp16)) if on]
    if profile and not (cfg.int8 or cfg.fp16):
        precisions += [p for p in profile.precision if p not in precisions]
    settings = replace(q.INT8_DEFAULT, method=cfg.int8_method or q.INT8_DEFAULT.method,
                       activation_type=cfg.int8_activation or q.INT8_DEFAULT.activation_type,
                       keep_float=tuple(n.strip() for n in cfg.keep_float.split(",") if n.strip()))

    model, ckpt = ox.load_weights(cfg.weights)
    ox.check_labels(ckpt["labels"])
    input_size = int(ckpt.get("input_size") or INPUT_SIZE)
    out_dir = Path(cfg.out or f"runs/export/{Path(cfg.weights).stem}")
    print(f"export {ckpt['model_name']} from {cfg.weights} -> {out_dir} ({', '.join(precisions)})")
    calib_x, eval_x, eval_y, calib_where = _frames(cfg, input_size)

    with tempfile.TemporaryDirectory(prefix="pocus_export_") as tmp:
        work = Path(tmp)
        fp32 = ox.export_onnx(model, work / "model.onnx", input_size, cfg.opset, cfg.exporter)
        torch_out = ox.torch_outputs(model, eval_x)
        fp32_out = ox.ort_outputs(fp32, eval_x, threads=cfg.threads)
        parity = ox.compare_outputs(torch_out, fp32_out)
        print(f"fp32 ONNX vs torch on {len(eval_x)} held-out frames:\n{ox.format_comparison(parity)}")
        ox.check_parity(parity, cfg.atol)
        thresholds = ox.calibrate_thresholds(ox.ort_outputs(fp32, calib_x, threads=cfg.threads)["view_logits"],
                                             cfg.ood_percentile)
        thresholds["calibration_frames"] = calib_where
        models, per_file = {"fp32": fp32}, {}

        if "int8" in precisions or cfg.int8_sweep:
            pre = q.preprocess_for_quant(fp32, work / "model.pre.onnx")
            if cfg.int8_sweep:
                print(q.format_sweep(q.sweep(fp32, pre, calib_x, eval_x, work, threads=1)))
                return None
            int8 = q.quantize_int8(pre, work / "model.int8.onnx", calib_x, settings)
            gate = q.int8_gate(fp32_out, ox.ort_outputs(int8, eval_x, threads=cfg.threads))
            if not gate.passed:
                rows = q.layer_errors(pre, int8, eval_x[:64])
                (out_dir).mkdir(parents=True, exist_ok=True)
                (out_dir / "int8_gate_failed.json").write_text(json.dumps(
                    {"gate": gate.as_dict(), "layers": rows, "settings": asdict(settings)}, indent=2))
                raise ox.ExportError(q.format_gate_failure(gate, rows, q.suggest_keep_float(pre, rows))
                                     + f"\n  (details in {out_dir / 'int8_gate_failed.json'}; no bundle written)")
            print(f"int8 gate passed: view agreement {gate.comparison['view_agreement']:.2%}, best-action agreement "
                  f"{gate.comparison['action_agreement']:.2%}, quality MAE {gate.comparison['quality_mae']:.4f} "
                  f"({gate.comparison['quality_mae_meter']:.4f} where quality >= {ox.QUALITY_METER_MIN:g})")
            models["int8"] = int8
            per_file["int8"] = {"precision_check": {"vs": "fp32", **gate.as_dict(), "settings": asdict(settings),
                                                    "calibration_frames": calib_where}}
        if "fp16" in precisions:
            fp16 = q.convert_fp16(fp32, work / "model.fp16.onnx")
            check = q.int8_gate(fp32_out, ox.ort_outputs(fp16, eval_x, threads=cfg.threads))  # same limits
            print(f"fp16 vs fp32 (CPU provider): view agreement {check.comparison['view_agreement']:.2%}, "
                  f"max abs err {max(check.comparison['max_abs_err'].values()):.2g}")
            if not check.passed:
                raise ox.ExportError("fp16 loses accuracy: " + "; ".join(check.failures)
                                     + f"\n{ox.format_comparison(check.comparison)}")
            models["fp16"] = fp16
            per_file["fp16"] = {"precision_check": {"vs": "fp32", **check.as_dict()}}

        heldout = {}
        if eval_y is not None:  # against the simulator's ground truth, as `pocus bench model` reports it
            from export.bench import accuracy

            heldout = {"frames": len(eval_x), "fp32": accuracy(fp32_out, eval_y)}
            if "int8" in models:
                heldout["int8"] = accuracy(ox.ort_outputs(models["int8"], eval_x, threads=cfg.threads), eval_y)
            print("held-out accuracy: " + ", ".join(
                f"{p} view {a['view_acc']:.3f} action {a['action_acc']:.3f} quality MAE {a['quality_mae']:.4f}"
                for p, a in heldout.items() if p != "frames"))
        export_info = {"exporter": cfg.exporter, "opset": cfg.opset, "torch": torch.__version__,
                       "onnxruntime": ort.__version__,
                       "created": ox.export_time(),
                       "parity_vs_torch": {k: parity[k] for k in ("frames", "max_abs_err", "view_agreement",
                                                                  "action_agreement")},
                       "atol": cfg.atol, "heldout_accuracy": heldout}
        manifest = ox.build_manifest(ckpt, cfg.weights, input_size, thresholds,
                                     ox.count_flops(fp32, input_size), export_info)
        bundle_json = ox.write_bundle(out_dir, models, manifest, per_file)

    (out_dir / "export_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    print(f"bundle {out_dir}:")
    info = json.loads(bundle_json.read_text())
    for name, entry in info["files"].items():
        bundle = load_bundle(out_dir, profile=profile or "cpu", precision=entry["precision"])
        check = ox.compare_outputs(fp32_out, ox.ort_outputs(bundle.session, eval_x))
        print(f"  {name:<18} {entry['precision']:<5} {entry['size_bytes'] / 1e6:6.2f} MB  sha256 {entry['sha256'][:12]}  "
              f"loads on {bundle.providers[0]}, view agreement with fp32 {check['view_agreement']:.1%}")
    print(f"  thresholds: confidence_min {thresholds['confidence_min']:.3f}, ood_energy_max "
          f"{thresholds['ood_energy_max']:.3f}, quality_diagnostic {thresholds['quality_diagnostic']}")
    print(f"done in {time.perf_counter() - t_start:.0f} s")
    return bundle_json
