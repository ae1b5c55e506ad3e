"""`pocus grow`: turn a trained PocusNet into a wider and deeper one that starts from the same function.

Training a larger model from scratch throws away hours of training; Net2Net (Chen et al., 2016) keeps
them. Wider: each new channel copies an old one (filter, BatchNorm parameters and statistics) and
the next layer's weights on the copies are divided by the number of copies, so the sum is unchanged;
a little noise on the copies lets them learn apart. Deeper: each stage's extra convs are identity
kernels whose BatchNorm gives back its input (gamma = std, beta = mean of that input, measured on
rendered training frames), exact in eval mode and close in train mode (batch statistics).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn


def _stages(net: nn.Module) -> list[list[nn.Sequential]]:
    """features as [[stem], [stage 1 convs], ...]: a stage starts at each stride-2 conv after the stem."""
    layers = list(net.features)
    stages = [[layers[0]]]
    for layer in layers[1:]:
        if layer[0].stride[0] == 2:
            stages.append([])
        stages[-1].append(layer)
    return stages


def _copy_conv(small: nn.Sequential, big: nn.Sequential, in_map: np.ndarray, in_count: np.ndarray,
               rng: np.random.Generator, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Copy one conv/BN block into a wider one; returns the output channel map and copy counts."""
    c_old, c_new = small[0].out_channels, big[0].out_channels
    out_map = np.concatenate([np.arange(c_old), rng.integers(0, c_old, c_new - c_old)])
    w = small[0].weight.data[:, in_map] / torch.tensor(in_count[in_map], dtype=torch.float32)[None, :, None, None]
    w = w[out_map].clone()
    copies = torch.from_numpy(np.arange(c_new) >= c_old)
    if noise > 0 and copies.any():
        g = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
        w[copies] += noise * float(w[copies].std()) * torch.randn(w[copies].shape, generator=g)
    big[0].weight.data.copy_(w)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(big[1], name).data.copy_(getattr(small[1], name).data[out_map])
    return out_map, np.bincount(out_map, minlength=c_old).astype(np.float32)


def _identity(block: nn.Sequential, inputs: torch.Tensor) -> None:
    """Make a conv/BN/ReLU block give back its (non-negative, post-ReLU) input."""
    conv, bn = block[0], block[1]
    w = torch.zeros_like(conv.weight)
    w[torch.arange(conv.out_channels), torch.arange(conv.out_channels), 1, 1] = 1.0
    conv.weight.data.copy_(w)
    mean, var = inputs.mean(dim=(0, 2, 3)), inputs.var(dim=(0, 2, 3), unbiased=False)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    bn.weight.data.copy_(torch.sqrt(var + bn.eps))
    bn.bias.data.copy_(mean)


def grow(small: nn.Module, big: nn.Module, frames: torch.Tensor, noise: float = 0.01, seed: int = 0) -> nn.Module:
    """Fill `big` (a PocusNet with as many stages, >= widths and depth, the same hidden width) so it
    computes what `small` does on `frames` [N, 1, S, S] (the inputs its identity layers are set on).

    Raises:
        ValueError: the two networks do not fit (the message says how).
    """
    s_stages, b_stages = _stages(small), _stages(big)
    s_hidden, b_hidden = small.neck[1], big.neck[1]
    widths_ok = all(b[0][0].out_channels >= s[0][0].out_channels for s, b in zip(s_stages, b_stages))
    if (len(s_stages) != len(b_stages) or not widths_ok or s_hidden.out_features != b_hidden.out_features
            or any(len(b) < len(s) for s, b in zip(s_stages, b_stages))):
        raise ValueError("grow needs the same number of stages, widths and convs per stage at least as large, "
                         f"and the same hidden width: {[len(s) for s in s_stages]} convs, hidden "
                         f"{s_hidden.out_features} -> {[len(b) for b in b_stages]}, hidden {b_hidden.out_features}")
    rng = np.random.default_rng(seed)
    big.eval()
    in_map, in_count = np.array([0]), np.array([1.0], np.float32)
    h = frames
    with torch.no_grad():
        for s_stage, b_stage in zip(s_stages, b_stages):
            for i, block in enumerate(b_stage):
                if i < len(s_stage):
                    in_map, in_count = _copy_conv(s_stage[i], block, in_map, in_count, rng, noise)
                else:
                    _identity(block, h)
                h = block(h)
        scale = torch.tensor(in_count[in_map], dtype=torch.float32)[None]
        b_hidden.weight.data.copy_(s_hidden.weight.data[:, in_map] / scale)
        b_hidden.bias.data.copy_(s_hidden.bias.data)
        for head in ("view_head", "quality_head", "action_head", "pose_head"):
            getattr(big, head).load_state_dict(getattr(small, head).state_dict())
    return big


def grow_checkpoint(src: str | Path, out: str | Path, model: str = "pocusnet_m", patients: int = 24,
                    noise: float = 0.01) -> dict:
    """Grow the model of checkpoint `src` into a `model` checkpoint at `out`; returns the largest output
    differences (eval mode) on the frames used, for the caller to print."""
    from training import data as D
    from training.models import create_model, load_checkpoint, make_checkpoint

    small, ck = load_checkpoint(src)
    size = int(ck.get("input_size", 128))
    ds = D.FrameDataset(D.render_arrays(D.split_seeds("train", patients), 40, size=size), None, 0, size)
    frames = torch.from_numpy(np.stack([ds[i][0] for i in range(len(ds))]))
    big = grow(small, create_model(model), frames, noise=noise)
    with torch.no_grad():
        a, b = small(frames[:256]), big(frames[:256])
    diff = {name: float((u - v).abs().max()) for name, u, v in zip(("view", "quality", "action", "pose"), a, b)}
    config = {**ck.get("config", {}), "model": model, "init_weights": str(src)}
    torch.save(make_checkpoint(big, model, {}, config, {}, 0, None, size), out)
    return diff


def configure_grow(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """`pocus grow --weights IN.pt --out OUT.pt [--model pocusnet_m]`."""
    parser.description = ("Grow a trained checkpoint into a wider and deeper model that starts from the same "
                          "outputs (Net2Net), then fine-tune it with `pocus train model=NAME init_weights=OUT.pt`.")
    parser.add_argument("--weights", default=str(Path(__file__).resolve().parent / "checkpoints" / "default.pt"),
                        help="checkpoint to grow (default: the shipped one)")
    parser.add_argument("--out", required=True, help="checkpoint to write")
    parser.add_argument("--model", default="pocusnet_m", help="registered model to grow into (default pocusnet_m)")
    parser.add_argument("--patients", type=int, default=24, help="training patients (x40 frames) that set the "
                        "identity layers' BatchNorm (default 24)")
    parser.add_argument("--noise", type=float, default=0.01, help="relative noise on copied filters (default 0.01)")

    def run(args: argparse.Namespace) -> int:
        diff = grow_checkpoint(args.weights, args.out, args.model, args.patients, args.noise)
        print(f"wrote {args.out}; largest output change on the frames used: "
              + ", ".join(f"{k} {v:.4f}" for k, v in diff.items()))
        return 0

    return run
