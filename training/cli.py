"""`pocus train`, `pocus val` and `pocus sim dataset`: argparse front-ends (heavy imports inside run)."""
from __future__ import annotations

import argparse
import inspect
import json
import re
from pathlib import Path
from typing import Callable

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "checkpoints" / "default.pt"

Run = Callable[[argparse.Namespace], int]


def _config_help() -> str:
    """The config keys with their defaults and why-comments, read from TrainConfig's source."""
    from training import train

    lines = ["config keys (key=value overrides; YAML files use the same keys):"]
    for m in re.finditer(r"^    (\w+): [^=]+= (.+?)\s+# (.+)$", inspect.getsource(train.TrainConfig), re.M):
        default = m.group(2).replace("field(default_factory=dict)", "{}")
        lines.append(f"  {m.group(1)}={default}  -- {m.group(3)}")
    return "\n".join(lines)


def configure_train(parser: argparse.ArgumentParser) -> Run:
    """`pocus train [--config cfg.yaml] [key=value ...]`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = ("Train a guidance model on simulated patients (rendered on the fly or from shards made "
                          "by `pocus sim dataset`) and/or a real dataset. Several GPUs: "
                          "torchrun --nproc_per_node N -m training.train [same arguments].")
    parser.epilog = _config_help() + ("\n\nexample:\n  pocus train --config training/configs/default.yaml "
                                      "data_dir=data/sim epochs=10 name=try1")
    parser.add_argument("--config", help="YAML file of config keys (overrides the defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    def run(args: argparse.Namespace) -> int:
        from training.train import config_dict, load_config, run_training

        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(config_dict(cfg), sort_keys=False), end="")
            return 0
        run_dir = run_training(cfg)
        print(f"run folder: {run_dir} (best.pt, last.pt, metrics.csv, loss_curves.png, confusion.png)")
        return 0

    return run


def configure_dataset(parser: argparse.ArgumentParser) -> Run:
    """`pocus sim dataset --out DIR --patients N --frames-per-patient K [--split train|val|test]`."""
    parser.description = ("Pre-render labelled simulator frames to <out>/<split>/p<seed>.npz, one shard per patient. "
                          "Resumable: complete shards already there are skipped. Patient seeds: train 0+, "
                          "val 10000+, test 20000+ (disjoint).")
    parser.add_argument("--out", required=True, help="dataset root folder")
    parser.add_argument("--patients", type=int, required=True, help="number of patients")
    parser.add_argument("--frames-per-patient", type=int, default=150, help="frames per patient (default 150)")
    parser.add_argument("--split", default="train", choices=["train", "val", "test"], help="seed range (default train)")
    parser.add_argument("--heldout-settings", action="store_true",
                        help="use only the held-out scanner settings (depth >= 190 mm), for testing")
    parser.add_argument("--workers", type=int, default=2, help="rendering processes (default 2)")
    parser.add_argument("--size", type=int, default=128, help="image size in px (default 128, the model input)")
    parser.add_argument("--seed-offset", type=int, default=0, help="first seed relative to the split's base")

    def run(args: argparse.Namespace) -> int:
        from training.data import write_dataset

        if args.patients < 1:
            raise ValueError(f"--patients must be >= 1, got {args.patients}")
        paths = write_dataset(args.out, args.split, args.patients, args.frames_per_patient, args.workers,
                              args.heldout_settings, args.size, args.seed_offset)
        print(f"{len(paths)} shards in {Path(args.out) / args.split}")
        return 0

    return run


def configure_val(parser: argparse.ArgumentParser) -> Run:
    """`pocus val [--weights W] [--data DIR] [--patients N] [--seed S] [--json]`."""
    parser.description = ("Evaluate a checkpoint. Default: held-out simulated patients (test seeds 20000+, never "
                          "used in training), once with training-range scanner settings and once with held-out "
                          "settings (depth >= 190 mm). --data: shards folder or a real dataset "
                          "(EchoNet-Dynamic, CAMUS, or a folder with labels.csv).")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="checkpoint (default: the shipped model)")
    parser.add_argument("--data", help="shards folder (p*.npz, or a root with test/) or a real dataset folder")
    parser.add_argument("--split", default="test", help="split of a real dataset (default test; 'all' for all)")
    parser.add_argument("--patients", type=int, default=20, help="simulated test patients (default 20)")
    parser.add_argument("--frames-per-patient", type=int, default=60, help="frames per simulated patient (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="draws another held-out set: seeds 20000 + 1000*S ...")
    parser.add_argument("--no-heldout", action="store_true", help="skip the held-out scanner settings set")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", help="also write metrics.json and confusion PNGs to this folder")
    parser.add_argument("--json", action="store_true", help="print metrics as JSON")

    def run(args: argparse.Namespace) -> int:
        results = evaluate(args)
        if args.out:
            from training.train import save_confusion

            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(results, indent=1))
            for name, m in results["sets"].items():
                if "confusion" in m:
                    import numpy as np

                    save_confusion(np.asarray(m["confusion"]), out / f"confusion_{name}.png", name)
        if args.json:
            print(json.dumps(results, indent=1))
        else:
            print(format_table(results))
        return 0

    return run


def evaluate(args: argparse.Namespace) -> dict:
    """Metrics of `args.weights` on each evaluation set ({"weights", "sets": {name: metrics}})."""
    import torch

    from training import data as D
    from training.metrics import compute_metrics
    from training.models import load_checkpoint
    from training.train import predict

    torch.set_num_threads(2)
    model, ckpt = load_checkpoint(args.weights)
    size = int(ckpt.get("input_size", 128))
    sets: dict[str, D.FrameArrays] = {}
    if args.data:
        root = Path(args.data)
        if list(root.glob("p*.npz")):
            sets[root.name] = D.load_shards(root)
        elif (root / "test").is_dir() and list((root / "test").glob("p*.npz")):
            sets["test"] = D.load_shards(root / "test")
        else:
            from training.real_data import detect_layout, load_real

            sets[detect_layout(root)] = load_real(root, None if args.split == "all" else args.split)
    else:
        if args.patients < 1 or args.seed < 0 or args.seed > 9:
            raise ValueError("--patients must be >= 1 and --seed in 0..9")
        seeds = D.split_seeds("test", args.patients, 1000 * args.seed)
        sets["test"] = D.render_arrays(seeds, args.frames_per_patient, size=size, progress=True)
        if not args.no_heldout:
            sets["test_heldout_depth"] = D.render_arrays(seeds, args.frames_per_patient, heldout=True, size=size,
                                                         progress=True)
    results = {"weights": str(args.weights), "epoch": ckpt.get("epoch"), "config_hash": ckpt.get("config_hash"),
               "sets": {}}
    for name, arrays in sets.items():
        outputs, labels = predict(model, D.FrameDataset(arrays, None, 0, size), args.batch_size, progress=True)
        results["sets"][name] = compute_metrics(outputs, labels, arrays.meta.get("acoustic"))
    return results


def format_table(results: dict) -> str:
    """Main metrics of each set, one column per set."""
    from devices.labels import VIEWS

    keys = ["n_frames", "view_acc", "view_ece", "action_acc", "action_acc_onview", "action_acc_other",
            "action_acc_visible", "action_acc_blind", "action_acc_near", "action_acc_far", "quality_spearman", "quality_spearman_all", "quality_mae",
            "quality_safe_recall", *(f"quality_safe_recall_{v}" for v in VIEWS), "pose_mae"]
    sets = results["sets"]
    lines = [f"weights: {results['weights']}", f"{'metric':<26}" + "".join(f"{n:>20}" for n in sets)]
    for k in keys:
        if any(k in m for m in sets.values()):
            cells = [m.get(k) for m in sets.values()]
            lines.append(f"{k:<26}" + "".join(f"{'-':>20}" if c is None else
                                              (f"{c:>20d}" if isinstance(c, int) else f"{c:>20.4f}") for c in cells))
    return "\n".join(lines)
