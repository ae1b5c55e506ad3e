"""`pocus bench train`: how fast a model trains here, and how fast the simulator can feed it.

Two figures, because on-the-fly training runs at the slower of the two: the training step on
synthetic batches (forward + backward + AdamW, mixed precision on CUDA: the model-bound ceiling) and
the labelled-frame rate of one DataLoader worker (`training.data.SimStream`: render + augment +
preprocess).
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable


def step_rate(model_name: str, device: str, batch_size: int, steps: int, threads: int, amp: bool = True) -> float:
    """Training images/s of one process on synthetic batches (after warm-up steps)."""
    import torch

    from training.metrics import multitask_loss
    from training.models import create_model

    torch.set_num_threads(threads)
    dev = torch.device(device)
    model = create_model(model_name).to(dev).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    use_amp = amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 1, 128, 128, generator=g).to(dev).to(memory_format=torch.channels_last)
    from devices.labels import VIEWS

    n_views = len(VIEWS)
    targets = {"view": torch.randint(0, n_views + 1, (batch_size,), generator=g).to(dev),
               "quality": torch.rand(batch_size, n_views, generator=g).to(dev),
               "action": torch.randint(0, 11, (batch_size, n_views), generator=g).to(dev),
               "pose": torch.randn(batch_size, n_views, 5, generator=g).to(dev)}
    weights = {"view": 1.0, "quality": 2.0, "action": 1.0, "pose": 0.5}

    def one() -> None:
        with torch.autocast(dev.type, dtype=torch.float16, enabled=use_amp):
            out = model(x)
        loss, _ = multitask_loss(out, targets, weights)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(max(3, steps // 10)):
        one()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        one()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - t)


def data_rate(frames: int, augment_p: float = 0.3) -> float:
    """Labelled frames/s of one DataLoader worker: the on-the-fly stream training uses (`SimStream`:
    render with random scanner settings, augment, preprocess)."""
    from training.augment import Augment
    from training.data import SimStream, render_patient

    render_patient(1, 4)  # warm-up: imports, shared scatterer field
    patients = max(1, -(-frames // 32))              # whole patients of 32 frames, as rendered
    stream = SimStream(list(range(100, 100 + patients)), 32, Augment(augment_p))
    t = time.perf_counter()
    done = sum(1 for _ in stream)
    return done / (time.perf_counter() - t)


def configure_bench_train(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.add_argument("--model", default="pocusnet_s", help="model registry name")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--frames", type=int, default=256, help="frames for the data-rate measurement (0: skip)")
    parser.add_argument("--json", action="store_true")

    def run(args: argparse.Namespace) -> int:
        import torch

        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        row = {"model": args.model, "device": device, "batch_size": args.batch_size,
               "train_images_per_s": round(step_rate(args.model, device, args.batch_size, args.steps, args.threads), 1)}
        if args.frames > 0:
            row["data_frames_per_s_per_worker"] = round(data_rate(args.frames), 1)
        if device.startswith("cuda"):
            row["gpu"] = torch.cuda.get_device_name(0)
        if args.json:
            print(json.dumps(row))
        else:
            for k, v in row.items():
                print(f"{k:32s} {v}")
        return 0

    return run
