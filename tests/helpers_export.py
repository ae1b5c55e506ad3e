"""Tiny models and synthetic frames with the training contract, for the export and bundle tests.

The model follows training/models.py's contract (a tuple ordered as devices.labels.OUTPUT_NAMES,
any input size via global pooling) but is small enough to train in a second on 32x32 frames, so the
int8 gate can be tested on a model with real decision margins.
"""
from __future__ import annotations

import numpy as np

from devices.labels import ACTIONS, POSE_AXES, VIEW_LABELS, VIEWS
from devices.preprocess import preprocess

SIZE = 32  # test input side (the real models take 128)


def make_frames(n: int, seed: int = 0, size: int = SIZE) -> tuple[np.ndarray, dict]:
    """Synthetic "views": class k puts a bright disk at one of 6 spots, plus speckle-like noise.

    Returns:
        x float32 [n, 1, size, size] made by devices.preprocess, labels {view [n], action [n, 5],
        quality [n, 5]} that a tiny network learns in a few steps.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    spots = [(0.3, 0.3), (0.3, 0.7), (0.5, 0.5), (0.7, 0.3), (0.7, 0.7), (0.5, 0.15)]
    views = rng.integers(0, len(VIEW_LABELS), n)
    x = np.empty((n, 1, size, size), np.float32)
    for i, k in enumerate(views):
        cy, cx = spots[k]
        r = size * rng.uniform(0.10, 0.16)
        disk = ((yy - cy * size) ** 2 + (xx - cx * size) ** 2) < r * r
        img = rng.gamma(2.0, 20.0, (size, size)) + 150.0 * disk
        x[i] = preprocess(np.clip(img, 0, 255).astype(np.uint8), size=size)
    targets = np.arange(len(VIEWS))
    action = (views[:, None] * 3 + targets[None, :]) % len(ACTIONS)
    quality = np.where(views[:, None] == targets[None, :], 0.9, 0.1).astype(np.float32)
    return x, {"view": views, "action": action, "quality": quality}


def tiny_model(width: int = 8, seed: int = 0):
    """A conv/BN/ReLU net with the four-head contract (untrained)."""
    import torch
    from torch import nn

    V, T, A, P = len(VIEW_LABELS), len(VIEWS), len(ACTIONS), len(POSE_AXES)

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers, c = [], 1
            for out in (width, 2 * width, 4 * width):
                layers += [nn.Conv2d(c, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
                c = out
            self.body = nn.Sequential(*layers)
            self.view = nn.Linear(c, V)
            self.quality = nn.Linear(c, T)
            self.action = nn.Linear(c, T * A)
            self.pose = nn.Linear(c, T * P)

        def forward(self, x):
            f = self.body(x).mean(dim=(2, 3))  # [B, C]
            return (self.view(f), torch.sigmoid(self.quality(f)),
                    self.action(f).view(-1, T, A), self.pose(f).view(-1, T, P))

    torch.manual_seed(seed)
    return Tiny()


def trained_tiny_model(steps: int = 80, seed: int = 0, model=None):
    """The tiny model (or `model`) fitted to `make_frames` (seconds on one CPU core), in eval mode."""
    import torch
    import torch.nn.functional as F

    model = tiny_model(seed=seed) if model is None else model
    torch.set_num_threads(1)
    x, y = make_frames(256, seed=seed + 100)
    xt = torch.from_numpy(x)
    view, action, quality = (torch.from_numpy(y[k]) for k in ("view", "action", "quality"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (32,), generator=g)
        v, q, a, _ = model(xt[idx])
        loss = (F.cross_entropy(v, view[idx]) + F.binary_cross_entropy(q, quality[idx])
                + F.cross_entropy(a.reshape(-1, a.shape[-1]), action[idx].reshape(-1)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def break_for_int8(model, scale: float = 3e4):
    """Make a model that quantizes badly while its float outputs stay sensible.

    Channel 0 after the first BN (conv/BN/ReLU nets) is made huge (gain and offset times `scale`) and the next conv's
    weights reading it are divided by `scale`: per-tensor int8 activations then have a step of about
    `scale` / 255, which wipes out every other channel of that layer.
    """
    import torch
    from torch import nn

    bn1 = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    conv2 = [m for m in model.modules() if isinstance(m, nn.Conv2d)][1]
    with torch.no_grad():
        # BN in eval: y = (x - mean) / sqrt(var + eps) * gamma + beta; scale gamma and beta of channel 0.
        bn1.weight[0] *= scale
        bn1.bias[0] = bn1.bias[0].abs() * scale + scale  # keep it positive so ReLU passes it
        conv2.weight[:, 0] /= scale
    return model.eval()


def fake_checkpoint(model, input_size: int = SIZE) -> dict:
    """A checkpoint dict in training's format for `model`."""
    from devices.labels import ACTIONS as acts

    return {"model_name": "tiny_test", "model_kwargs": {}, "state_dict": model.state_dict(),
            "config": {"lr": 0.01}, "config_hash": "0" * 64, "metrics": {"view_acc": 0.99}, "epoch": 3,
            "optimizer": None, "input_size": input_size,
            "labels": {"views": list(VIEW_LABELS), "actions": list(acts), "pose_axes": list(POSE_AXES)}}


def make_bundle(out_dir, model, calib_x: np.ndarray, precisions=("fp32", "int8")):
    """Export `model` and write a bundle with the library functions (what `pocus export` does, minus checks)."""
    import tempfile
    from pathlib import Path

    import torch

    from export import onnx_export as ox
    from export import quantize as q

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = fake_checkpoint(model)
        torch.save(ckpt, work / "tiny.pt")
        fp32 = ox.export_onnx(model, work / "model.onnx", SIZE)
        models = {"fp32": fp32}
        if "int8" in precisions:
            pre = q.preprocess_for_quant(fp32, work / "pre.onnx")
            models["int8"] = q.quantize_int8(pre, work / "int8.onnx", calib_x)
        if "fp16" in precisions:
            models["fp16"] = q.convert_fp16(fp32, work / "fp16.onnx")
        thresholds = ox.calibrate_thresholds(ox.ort_outputs(fp32, calib_x)["view_logits"])
        manifest = ox.build_manifest(ckpt, work / "tiny.pt", SIZE, thresholds, ox.count_flops(fp32, SIZE),
                                     {"exporter": "dynamo"})
        ox.write_bundle(out_dir, models, manifest)
    return out_dir


# ---- pytest fixtures shared by tests/test_export_*.py (import them by name into a test module) ----
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_trained():
    """The tiny model fitted to the synthetic frames (session-wide: a few seconds)."""
    return trained_tiny_model()


@pytest.fixture(scope="session")
def calib_x():
    return make_frames(96, seed=2)[0]


@pytest.fixture(scope="session")
def eval_set():
    return make_frames(200, seed=1)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_trained, calib_x):
    """A bundle folder with fp32 + int8 + fp16 of the tiny model. Copy it before damaging it."""
    return make_bundle(tmp_path_factory.mktemp("bundle"), tiny_trained, calib_x, ("fp32", "int8", "fp16"))
