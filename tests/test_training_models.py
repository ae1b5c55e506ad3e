"""Model registry, contract shapes, FLOP budget and checkpoint format."""
import hashlib
import json

import pytest
import torch
from torch import nn

from devices.labels import ACTIONS, POSE_AXES, VIEW_LABELS, VIEWS
from training.models import (config_hash, count_macs, count_params, create_model, list_models, load_checkpoint,
                             make_checkpoint)

V, A = len(VIEWS), len(ACTIONS)


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_contract(name):
    torch.manual_seed(0)
    model = create_model(name)
    x = torch.randn(2, 1, 32, 32)
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 4
    view, quality, action, pose = out
    assert view.shape == (2, len(VIEW_LABELS))
    assert quality.shape == (2, V) and bool(((quality >= 0) & (quality <= 1)).all())
    assert action.shape == (2, V, A)
    assert pose.shape == (2, V, len(POSE_AXES))
    sum(o.sum() for o in out).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", list_models())
def test_only_plain_foldable_layers(name):
    allowed = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Linear, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout,
               nn.Sequential)
    model = create_model(name)
    for m in model.modules():
        if m is model:
            continue
        assert isinstance(m, allowed), f"{name}: {type(m).__name__} is not a plain layer"
        if isinstance(m, nn.Conv2d):
            assert m.groups == 1 and m.bias is None  # dense conv, BN folds into it
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    assert all(isinstance(c, nn.Conv2d) == (i % 2 == 0) for i, c in enumerate(convs))  # conv -> BN pairs


def test_default_model_budget():
    model = create_model("pocusnet_s")
    assert count_params(model) <= 2_000_000
    flops = 2 * count_macs(model, 128)
    assert 30e6 <= flops <= 0.3e9


def test_count_macs_by_hand():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    # conv: 2 out channels x 16 pixels x 9 taps; linear: 3 x 32
    assert count_macs(model, 4) == 2 * 16 * 9 + 3 * 32


def test_unknown_model_lists_known():
    with pytest.raises(ValueError, match="pocusnet_s"):
        create_model("resnet9000")


def test_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(1)
    model = create_model("pocusnet_tiny")
    model.eval()
    cfg = {"lr": 0.1, "name": "x"}
    ck = make_checkpoint(model, "pocusnet_tiny", {}, cfg, {"view_acc": 0.5}, 3, None, 32)
    assert set(ck) == {"model_name", "model_kwargs", "state_dict", "config", "config_hash", "metrics", "epoch",
                       "optimizer", "input_size", "labels"}
    assert ck["config_hash"] == hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()
    assert ck["labels"] == {"views": list(VIEW_LABELS), "actions": list(ACTIONS), "pose_axes": list(POSE_AXES)}
    torch.save(ck, tmp_path / "m.pt")
    loaded, ck2 = load_checkpoint(tmp_path / "m.pt")
    assert not loaded.training and ck2["epoch"] == 3
    x = torch.randn(3, 1, 32, 32)
    for a, b in zip(model(x), loaded(x)):
        assert torch.allclose(a, b)


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    ck = make_checkpoint(create_model("pocusnet_tiny"), "pocusnet_tiny", {}, {}, {}, 0)
    ck["labels"]["views"] = ["A", "B"]
    torch.save(ck, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other labels"):
        load_checkpoint(tmp_path / "other.pt")


def test_config_hash_is_order_independent():
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1}) != config_hash({"a": 2, "b": 2})
