"""Multi-task guidance models, created by name from a registry, and the checkpoint format.

Every model takes float32 [B, 1, H, W] (made by `devices.preprocess.preprocess`) and returns a tuple
in the order of `devices.labels.OUTPUT_NAMES`:

    view_logits   [B, V+1]   raw logits, order VIEW_LABELS
    quality       [B, V]     sigmoid, 0..1, quality of the image as each target view
    action_logits [B, V, A]  raw logits of the best action toward each target view, order ACTIONS
    pose_offset   [B, V, 5]  target - current in normalized units (mm or deg / POSE_SCALE)

The default "pocusnet_s" uses only conv3x3 -> BatchNorm -> ReLU blocks, global average pooling and
linear layers: BatchNorm folds into the conv at export, and plain dense convolutions quantize to
int8 well even on CPUs without VNNI (depthwise convolutions do not). Models are size-agnostic
(global pooling), so tests may feed 32x32 images.

Checkpoint (the export engineer depends on these keys; keep them exactly):
    {"model_name", "model_kwargs", "state_dict", "config", "config_hash", "metrics", "epoch",
     "optimizer", "input_size", "labels": {"views", "actions", "pose_axes"}}
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from devices.labels import ACTIONS, POSE_AXES, VIEW_LABELS, VIEWS

N_VIEWS = len(VIEWS)            # V = 5 target views
N_CLASSES = len(VIEW_LABELS)    # V + 1 with OTHER
N_ACTIONS = len(ACTIONS)        # A = 11
N_AXES = len(POSE_AXES)         # 5

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a model factory under `name`."""
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS[name] = fn
        return fn
    return wrap


def list_models() -> list[str]:
    """Names accepted by `create_model`, sorted."""
    return sorted(_MODELS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Create a registered model by name.

    Args:
        name: one of `list_models()`, e.g. "pocusnet_s".
        **kwargs: forwarded to the model's constructor (e.g. `widths`, `dropout`).

    Returns:
        The model (train mode, random init).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}': choose one of {', '.join(list_models())}")
    return _MODELS[name](**kwargs)


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """conv3x3 (no bias) -> BatchNorm -> ReLU: the one block, foldable at export."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class PocusNet(nn.Module):
    """Plain CNN trunk + four heads.

    Args:
        widths: channels of the stem and of each stage; each stage halves the resolution
            (stride-2 conv) then adds `depth - 1` stride-1 convs.
        depth: convs per stage (after the stem).
        hidden: width of the shared fully connected layer before the heads.
        dropout: dropout before the heads (training only).
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128, 192), depth: int = 2,
                 hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2 or depth < 1:
            raise ValueError(f"PocusNet needs >= 2 widths and depth >= 1, got widths={widths} depth={depth}")
        layers: list[nn.Module] = [conv_bn_relu(1, widths[0], stride=2)]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers.append(conv_bn_relu(c_in, c_out, stride=2))
            layers.extend(conv_bn_relu(c_out, c_out) for _ in range(depth - 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1], hidden), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout))
        self.view_head = nn.Linear(hidden, N_CLASSES)
        self.quality_head = nn.Linear(hidden, N_VIEWS)
        self.action_head = nn.Linear(hidden, N_VIEWS * N_ACTIONS)
        self.pose_head = nn.Linear(hidden, N_VIEWS * N_AXES)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.neck(self.pool(self.features(x)))                      # [B, hidden]
        view_logits = self.view_head(h)                                  # [B, V+1]
        quality = torch.sigmoid(self.quality_head(h))                    # [B, V]
        action_logits = self.action_head(h).view(-1, N_VIEWS, N_ACTIONS)  # [B, V, A]
        pose_offset = self.pose_head(h).view(-1, N_VIEWS, N_AXES)         # [B, V, 5]
        return view_logits, quality, action_logits, pose_offset


@register_model("pocusnet_s")
def pocusnet_s(**kwargs: Any) -> PocusNet:
    """Default shipped model: 0.92M params, 52M MACs (104 MFLOPs) at 128x128."""
    return PocusNet(**{"widths": (16, 32, 64, 128, 192), "depth": 2, "hidden": 256, **kwargs})


@register_model("pocusnet_m")
def pocusnet_m(**kwargs: Any) -> PocusNet:
    """Shipped model since 2026-11-27 (grown from pocusnet_s by `pocus grow`): 2.50M params, 170M MACs
    (341 MFLOPs) at 128x128; int8 takes ~0.8 ms on one thread of the 2-core dev machine (README)."""
    return PocusNet(**{"widths": (24, 48, 96, 160, 256), "depth": 3, "hidden": 256, **kwargs})


@register_model("pocusnet_tiny")
def pocusnet_tiny(**kwargs: Any) -> PocusNet:
    """Tests and smoke runs: a few thousand parameters."""
    return PocusNet(**{"widths": (4, 8, 16), "depth": 1, "hidden": 16, "dropout": 0.0, **kwargs})


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int = 128) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (conv and linear layers, via hooks).

    FLOPs are usually quoted as 2 x MACs. BatchNorm, ReLU and pooling are ignored (BN folds away).
    """
    total = [0]

    def conv_hook(m: nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total[0] += out.numel() * k

    def linear_hook(m: nn.Linear, _inp: Any, out: torch.Tensor) -> None:
        total[0] += out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, input_size, input_size))
    model.train(was_training)
    for h in handles:
        h.remove()
    return total[0]


def config_hash(config: dict) -> str:
    """sha256 of the config's canonical JSON (sorted keys): identifies a training run."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def make_checkpoint(model: nn.Module, model_name: str, model_kwargs: dict, config: dict,
                    metrics: dict, epoch: int, optimizer: Any = None, input_size: int = 128) -> dict:
    """Build the checkpoint dict in the one format export and val read."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    return {
        "model_name": model_name,
        "model_kwargs": dict(model_kwargs),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": config,
        "config_hash": config_hash(config),
        "metrics": dict(metrics),
        "epoch": int(epoch),
        "optimizer": optimizer,
        "input_size": int(input_size),
        "labels": {"views": list(VIEW_LABELS), "actions": list(ACTIONS), "pose_axes": list(POSE_AXES)},
    }


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """Load a checkpoint written by training and rebuild its model.

    Args:
        path: a .pt file in the checkpoint format above.
        map_location: torch device for the tensors.

    Returns:
        (model in eval mode, checkpoint dict).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a checkpoint of this format, or labels that differ from devices.labels.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (train one with `pocus train`)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise ValueError(f"checkpoint {path} cannot be read: {e}") from e
    missing = [k for k in ("model_name", "model_kwargs", "state_dict", "labels") if k not in ckpt]
    if not isinstance(ckpt, dict) or missing:
        raise ValueError(f"checkpoint {path} is not a POCUS Guide checkpoint (missing {missing})")
    labels = ckpt["labels"]
    if list(labels.get("views", [])) != list(VIEW_LABELS) or list(labels.get("actions", [])) != list(ACTIONS):
        raise ValueError(f"checkpoint {path} was trained with other labels {labels}; "
                         f"this code uses views {list(VIEW_LABELS)} and actions {list(ACTIONS)}")
    model = create_model(ckpt["model_name"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt
