"""Training loop: one visible config, simulator or real data, CPU / one GPU / torchrun (DDP).

    pocus train --config training/configs/default.yaml epochs=5 lr=1e-3
    torchrun --nproc_per_node 4 -m training.train --config training/configs/default.yaml device=cuda

Config precedence: the dataclass defaults below < YAML file < key=value overrides. The resolved
config is written to runs/<name>/config.yaml. Outputs in runs/<name>/: last.pt (every epoch, with
optimizer, for resume), best.pt (best validation score, see metrics.score), metrics.csv /
metrics.json (one row per epoch), loss_curves.png, confusion.png.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class TrainConfig:
    name: str = "default"              # run folder: <out_dir>/<name>/
    out_dir: str = "runs"              # where run folders go
    model: str = "pocusnet_s"          # registry name, see training.models.list_models()
    model_kwargs: dict = field(default_factory=dict)  # constructor overrides, e.g. {dropout: 0.2}
    data_dir: str = ""                 # pre-rendered shards root (train/, val/); "" = render the simulator on the fly
    real_dir: str = ""                 # optional real dataset (EchoNet/CAMUS/generic) added to training: view/quality only
    train_patients: int = 200          # on the fly: seeds 0..N-1; with data_dir: at most this many shards (0 = all)
    val_patients: int = 20             # validation patients (seeds 10000+) when data_dir has no val/
    frames_per_patient: int = 100      # on the fly: frames per patient per epoch (new poses every epoch)
    loop_poses: str = ""               # on the fly: .npz from `pocus eval poses` (closed-loop poses, DAgger); "" = none
    loop_pose_share: float = 0.3       # share of training poses drawn from loop_poses when it is set
    val_frames_per_patient: int = 60   # frames per validation patient when rendered here
    input_size: int = 128              # model input side in px (devices.preprocess.INPUT_SIZE for shipping)
    epochs: int = 30                   # passes over the training set
    time_limit_min: float = 0.0        # stop after this many minutes (0 = none); the LR schedule then ends on time
    epochs_per_run: int = 0            # stop after this many epochs in this invocation (0 = all); resume=auto goes on
    batch_size: int = 128              # per process (DDP: global batch = batch_size x world size)
    lr: float = 2e-3                   # AdamW peak learning rate (cosine decay to lr x min_lr_frac)
    min_lr_frac: float = 0.02          # final LR as a fraction of lr
    warmup_frac: float = 0.03          # fraction of the run with linear LR warm-up
    weight_decay: float = 0.05         # AdamW decoupled weight decay
    label_smoothing: float = 0.02      # for the view and action cross-entropies (labels are sharp thresholds)
    w_view: float = 1.0                # loss weights: view CE
    w_quality: float = 2.0             #   quality BCE (small values, needs a push for rank correlation)
    w_action: float = 1.0              #   action CE (per target view)
    w_pose: float = 0.5                #   pose SmoothL1 (auxiliary; normalized units)
    w_quality_overrate: float = 1.0    #   x quality BCE where a non-diagnostic image is rated good (false captures)
    augment_p: float = 0.3             # probability of each scanner augmentation (0 = off)
    workers: int = 1                   # DataLoader worker processes (0 = in the training process; on-the-fly rendering wants >= 1)
    seed: int = 0                      # everything random derives from it
    threads: int = 2                   # torch CPU threads per process
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    amp: bool = True                   # mixed precision on CUDA (ignored on CPU)
    channels_last: bool = True         # NHWC: 265 vs 168 img/s training pocusnet_s on 2 CPU threads
    resume: str = ""                   # path to a last.pt to continue from, or "auto" (<run>/last.pt if present)
    init_weights: str = ""             # start from this checkpoint's weights (fine-tune); fresh optimizer and schedule
    ship_dir: str = ""                 # if set, each new best is also written there as default.pt/.yaml/_metrics.json
    log_every: int = 20                # steps between progress-bar updates


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check/convert an override to the type of the field's default."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key '{key}' needs true/false, got {value!r}")
    if isinstance(default, int) and not isinstance(value, bool) and isinstance(value, int):
        return value
    if isinstance(default, float) and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            return float(value)  # YAML reads "3e-4" (no dot) as a string
        except ValueError:
            pass
    if isinstance(default, str):
        return "" if value is None else str(value)
    if isinstance(default, dict) and isinstance(value, dict):
        return value
    raise ValueError(f"config key '{key}' needs a {type(default).__name__}, got {value!r}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults < YAML file < key=value overrides (values parsed as YAML: 3, 1e-3, true, {a: 1}).

    Raises:
        FileNotFoundError: the YAML file does not exist.
        ValueError: unknown key, malformed override or wrong type (the message lists valid keys).
    """
    import yaml

    cfg = TrainConfig()
    names = [f.name for f in dataclasses.fields(cfg)]
    updates: list[tuple[str, Any, str]] = []
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must be a mapping of key: value")
        updates += [(k, v, str(path)) for k, v in data.items()]
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override '{item}' must look like key=value (e.g. epochs=5)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ValueError(f"override '{item}': value is not valid: {e}") from e
        updates.append((key.strip(), value, "command line"))
    for key, value, where in updates:
        if key not in names:
            raise ValueError(f"unknown config key '{key}' ({where}); valid keys: {', '.join(names)}")
        setattr(cfg, key, _coerce(key, value, getattr(TrainConfig(), key)))
    return cfg


def config_dict(cfg: TrainConfig) -> dict:
    """Plain dict (YAML/JSON-able) of a config."""
    return dataclasses.asdict(cfg)


# Written above a shipped checkpoint's config: a record of the run, not a recipe to rerun as is.
SHIPPED_CONFIG_HEADER = ("# The settings of the run that made this checkpoint, as it ran. Paths (data, loop poses,\n"
                         "# init weights, ship_dir) are the training machine's and may not exist here.\n")


def save_yaml(data: dict, path: Path, header: str = "") -> None:
    import yaml

    path.write_text(header + yaml.safe_dump(data, sort_keys=False))


def lr_at(cfg: TrainConfig, progress: float) -> float:
    """Warm-up then cosine decay; progress in [0, 1]."""
    if progress < cfg.warmup_frac:
        return cfg.lr * max(progress / max(cfg.warmup_frac, 1e-9), 0.01)
    p = min((progress - cfg.warmup_frac) / max(1 - cfg.warmup_frac, 1e-9), 1.0)
    lo = cfg.lr * cfg.min_lr_frac
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * p))


def _dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _device(cfg: TrainConfig, local_rank: int) -> Any:
    import torch

    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{cfg.device}' asked for but CUDA is not available; use device=cpu")
    return torch.device(name)


def _to_device(targets: dict, device: Any) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in targets.items()}


def predict(model: Any, dataset: Any, batch_size: int = 256, device: Any = "cpu", workers: int = 0,
            progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Run a model over a dataset of (image, targets). Returns (outputs, labels) as numpy arrays."""
    import torch
    from tqdm import tqdm

    from devices.labels import OUTPUT_NAMES

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    outs: dict[str, list] = {k: [] for k in OUTPUT_NAMES}
    labs: dict[str, list] = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for x, t in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
            for k, o in zip(OUTPUT_NAMES, model(x.to(device))):
                outs[k].append(o.float().cpu().numpy())
            for k, v in t.items():
                labs.setdefault(k, []).append(v.numpy())
    model.train(was_training)
    return ({k: np.concatenate(v) for k, v in outs.items()}, {k: np.concatenate(v) for k, v in labs.items()})


def eval_loss(outputs: dict[str, np.ndarray], labels: dict[str, np.ndarray], cfg: TrainConfig) -> float:
    """The training loss on numpy outputs (for validation curves)."""
    import torch

    from devices.labels import OUTPUT_NAMES
    from training.metrics import multitask_loss

    total, _ = multitask_loss(tuple(torch.from_numpy(outputs[k]) for k in OUTPUT_NAMES),
                              {k: torch.from_numpy(v) for k, v in labels.items()}, _weights(cfg), 0.0)
    return float(total)


def _weights(cfg: TrainConfig) -> dict[str, float]:
    return {"view": cfg.w_view, "quality": cfg.w_quality, "action": cfg.w_action, "pose": cfg.w_pose,
            "quality_overrate": cfg.w_quality_overrate}


def build_datasets(cfg: TrainConfig, rank: int = 0, world: int = 1, probe_factory: Any = None
                   ) -> tuple[Any, Any]:
    """(train dataset, validation FrameDataset) for a config."""
    from training import data as D
    from training.augment import Augment

    factory = probe_factory or D.make_sim_probe
    aug = Augment(cfg.augment_p) if cfg.augment_p > 0 else None
    parts = []
    if cfg.data_dir:
        parts.append(D.load_shards(Path(cfg.data_dir) / "train", cfg.train_patients or None))
    if cfg.real_dir:
        from training.real_data import load_real

        parts.append(load_real(cfg.real_dir, split="train"))
    if parts and cfg.loop_poses:
        raise ValueError("loop_poses applies to on-the-fly rendering: leave data_dir and real_dir empty")
    if parts:
        train = D.FrameDataset(D.FrameArrays.concat(parts), aug, cfg.seed, cfg.input_size)
    else:
        loop = D.LoopPoses.load(cfg.loop_poses, cfg.loop_pose_share) if cfg.loop_poses else None
        train = D.SimStream(D.split_seeds("train", cfg.train_patients), cfg.frames_per_patient, aug, cfg.seed,
                            cfg.input_size, rank, world, factory, loop=loop)
    val_dir = Path(cfg.data_dir) / "val" if cfg.data_dir else None
    if val_dir is not None and val_dir.is_dir():
        val = D.load_shards(val_dir, cfg.val_patients or None)
    elif cfg.real_dir and not cfg.data_dir and cfg.val_patients == 0:
        from training.real_data import load_real

        val = load_real(cfg.real_dir, split="val")
    else:
        val = D.render_arrays(D.split_seeds("val", cfg.val_patients), cfg.val_frames_per_patient,
                              size=cfg.input_size, probe_factory=factory, progress=rank == 0)
    return train, D.FrameDataset(val, None, cfg.seed, cfg.input_size)


def save_plots(history: list[dict], run_dir: Path) -> None:
    """loss_curves.png: train/val loss and the main validation metrics per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a1.plot(ep, [h["val_loss"] for h in history], "o-", label="val")
    a1.set(xlabel="epoch", ylabel="loss", title="loss")
    a1.legend()
    for key in ("view_acc", "action_acc", "quality_spearman"):
        a2.plot(ep, [h.get(key, np.nan) for h in history], "o-", label=key)
    a2.set(xlabel="epoch", title="validation", ylim=(0, 1))
    a2.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss_curves.png", dpi=80)
    plt.close(fig)


def save_confusion(cm: np.ndarray, path: Path, title: str = "view confusion (rows: true)") -> None:
    """Confusion matrix PNG with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from devices.labels import VIEW_LABELS

    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(cm / np.maximum(cm.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8)
    ax.set(xticks=range(len(VIEW_LABELS)), yticks=range(len(VIEW_LABELS)), xticklabels=VIEW_LABELS,
           yticklabels=VIEW_LABELS, xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def ship_checkpoint(ckpt: dict, ship_dir: str | Path, name: str = "default") -> Path:
    """Write <ship_dir>/<name>.pt without optimizer state (small), plus <name>.yaml and <name>_metrics.json.

    Files are written atomically (temp file + rename), so a reader never sees half a checkpoint.
    """
    import torch

    ship_dir = Path(ship_dir)
    ship_dir.mkdir(parents=True, exist_ok=True)
    slim = {k: v for k, v in ckpt.items() if k != "train_state"}
    slim["optimizer"] = None
    out = ship_dir / f"{name}.pt"
    tmp = ship_dir / f".{name}.pt.tmp"
    torch.save(slim, tmp)
    os.replace(tmp, out)
    save_yaml(ckpt["config"], ship_dir / f"{name}.yaml", SHIPPED_CONFIG_HEADER)
    (ship_dir / f"{name}_metrics.json").write_text(json.dumps(
        {"epoch": ckpt["epoch"], "config_hash": ckpt["config_hash"], "sim_fingerprint": ckpt.get("sim_fingerprint"),
         **ckpt["metrics"]}, indent=2))
    return out


def run_training(cfg: TrainConfig, probe_factory: Any = None, progress: bool = True) -> Path:
    """Train per `cfg` (single process or one torchrun rank). Returns the run folder.

    Args:
        cfg: resolved config.
        probe_factory: (seed, settings, size) -> probe; the real simulator by default (tests pass a fake).
        progress: tqdm bar on rank 0.
    """
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from training.data import sim_fingerprint
    from training.metrics import compute_metrics, multitask_loss, score
    from training.models import create_model, make_checkpoint

    rank, world, local_rank = _dist_info()
    fingerprint = sim_fingerprint()   # once per run: it parses the simulator's code (~0.15 s)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") or
                                (cfg.device == "auto" and torch.cuda.is_available()) else "gloo")
    torch.set_num_threads(max(cfg.threads, 1))
    device = _device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    is_main = rank == 0
    run_dir = Path(cfg.out_dir) / cfg.name
    conf = config_dict(cfg)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(conf, run_dir / "config.yaml")

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, **cfg.model_kwargs).to(device)
    mem = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=mem)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    if cfg.init_weights:
        from training.models import load_checkpoint

        init_model, init_ck = load_checkpoint(cfg.init_weights)
        if init_ck["model_name"] != cfg.model:
            raise ValueError(f"init_weights {cfg.init_weights} holds a {init_ck['model_name']}, not a {cfg.model}")
        model.load_state_dict(init_model.state_dict())
    start_epoch, step, best, history, elapsed0 = 0, 0, -float("inf"), [], 0.0
    resume = cfg.resume
    if resume == "auto":
        resume = str(run_dir / "last.pt") if (run_dir / "last.pt").is_file() else ""
    if resume:
        if not Path(resume).is_file():
            raise FileNotFoundError(f"resume checkpoint {resume} does not exist")
        ck = torch.load(resume, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        ts = ck.get("train_state", {})
        start_epoch, step = ck["epoch"] + 1, ts.get("step", 0)
        best, history, elapsed0 = ts.get("best_score", best), ts.get("history", []), ts.get("elapsed_s", 0.0)

    train_set, val_set = build_datasets(cfg, rank, world, probe_factory)
    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    is_stream = isinstance(train_set, torch.utils.data.IterableDataset)
    sampler = None
    if not is_stream:
        sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=cfg.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                                         num_workers=cfg.workers, drop_last=True,
                                         persistent_workers=False, pin_memory=device.type == "cuda")
    if is_stream:  # every rank must run the same number of steps (DDP): the smallest rank's count
        steps_per_epoch = min(train_set.num_batches(cfg.batch_size, cfg.workers, r) for r in range(world))
    else:
        steps_per_epoch = len(sampler) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"training set too small for batch_size={cfg.batch_size}: lower batch_size or add data")
    total_steps = steps_per_epoch * cfg.epochs
    limit_s = cfg.time_limit_min * 60.0
    t_start = time.time() - elapsed0
    weights = _weights(cfg)

    def progress_now() -> float:
        p = step / max(total_steps, 1)
        return max(p, (time.time() - t_start) / limit_s) if limit_s > 0 else p

    stop = False
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout etc.: reproducible per epoch (resume)
        train_set.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        ddp_model.train()
        sums: dict[str, float] = {}
        n_batches, n_images, t_epoch = 0, 0, time.time()
        bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   disable=not (progress and is_main), leave=False)
        for x, targets in bar:
            lr = lr_at(cfg, progress_now())
            for g in opt.param_groups:
                g["lr"] = lr
            x = x.to(device, non_blocking=True).to(memory_format=mem)
            targets = _to_device(targets, device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                outputs = ddp_model(x)
            loss, terms = multitask_loss(outputs, targets, weights, cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            scaler.step(opt)
            scaler.update()
            step += 1
            n_batches += 1
            n_images += x.shape[0] * world
            for k, v in {"loss": float(loss.detach()), **terms}.items():
                sums[k] = sums.get(k, 0.0) + v
            if n_batches % cfg.log_every == 0 or n_batches == 1:
                bar.set_postfix(loss=f"{sums['loss'] / n_batches:.3f}", lr=f"{lr:.1e}",
                                img_s=f"{n_images / (time.time() - t_epoch):.0f}")
            if limit_s > 0:
                stop = time.time() - t_start >= limit_s
                if world > 1:  # ranks decide together, or one would wait forever in the next all-reduce
                    flag = torch.tensor([int(stop)], device=device)
                    dist.all_reduce(flag)
                    stop = bool(flag.item())
            if stop or n_batches >= steps_per_epoch:
                break
        bar.close()
        train_s = time.time() - t_epoch
        if is_main:
            outputs_np, labels_np = predict(model, val_set, 256, device)
            metrics = compute_metrics(outputs_np, labels_np)
            row = {"epoch": epoch, "step": step, "lr": lr_at(cfg, progress_now()),
                   **{("train_loss" if k == "loss" else f"train_{k}"): v / max(n_batches, 1) for k, v in sums.items()},
                   "val_loss": eval_loss(outputs_np, labels_np, cfg),
                   **{k: v for k, v in metrics.items() if k != "confusion"},
                   "images_per_s": n_images / max(train_s, 1e-9), "elapsed_s": time.time() - t_start}
            history.append(row)
            s = score(metrics)
            ckpt = make_checkpoint(model, cfg.model, cfg.model_kwargs, conf, metrics, epoch, opt.state_dict(),
                                   cfg.input_size)
            ckpt["sim_fingerprint"] = fingerprint  # which simulator version made the images and labels
            ckpt["train_state"] = {"step": step, "best_score": max(best, s), "history": history,
                                   "elapsed_s": time.time() - t_start}
            torch.save(ckpt, run_dir / "last.pt")
            if s > best:
                best = s
                torch.save(ckpt, run_dir / "best.pt")
                save_confusion(np.asarray(metrics["confusion"]), run_dir / "confusion.png")
                if cfg.ship_dir:
                    ship_checkpoint(ckpt, cfg.ship_dir)
            _write_metrics(history, run_dir)
            save_plots(history, run_dir)
            if progress:
                tqdm.write(f"epoch {epoch + 1}: loss {row['train_loss']:.3f} val {row['val_loss']:.3f} "
                           f"view {metrics.get('view_acc', float('nan')):.3f} "
                           f"action {metrics.get('action_acc', float('nan')):.3f} "
                           f"quality rho {metrics.get('quality_spearman', float('nan')):.3f} "
                           f"{row['images_per_s']:.0f} img/s")
        if world > 1:
            dist.barrier()  # the others wait while rank 0 validates and saves
        if stop or (cfg.epochs_per_run > 0 and epoch + 1 - start_epoch >= cfg.epochs_per_run):
            break
    if world > 1:
        _check_replicas_agree(model, device)
        dist.destroy_process_group()
    return run_dir


def _check_replicas_agree(model: Any, device: Any) -> None:
    """DDP sanity check: every rank ends with the same weights (else gradients were not synchronized)."""
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        mine = torch.stack([p.double().sum() for p in model.parameters()]).to(device)
        lo, hi = mine.clone(), mine.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.allclose(lo, hi, rtol=1e-6, atol=1e-8):
        raise RuntimeError("distributed ranks ended with different weights: gradients were not synchronized")


def _write_metrics(history: list[dict], run_dir: Path) -> None:
    (run_dir / "metrics.json").write_text(json.dumps(history, indent=1))
    keys = list(dict.fromkeys(k for h in history for k in h))
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m training.train` / torchrun (same arguments as `pocus train`)."""
    import argparse

    from training.cli import configure_train

    parser = argparse.ArgumentParser(prog="python -m training.train")
    run = configure_train(parser)
    return int(run(parser.parse_args(argv)) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
