"""Masked multi-task loss and evaluation metrics."""
import numpy as np
import pytest
import torch

from devices.labels import ACTIONS, VIEW_LABELS, VIEWS
from training.metrics import compute_metrics, expected_calibration_error, multitask_loss, safe_recall, score

V, A, N = len(VIEWS), len(ACTIONS), 6
W = {"view": 1.0, "quality": 1.0, "action": 1.0, "pose": 1.0}


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    outputs = (torch.randn(N, V + 1, generator=g), torch.rand(N, V, generator=g) * 0.8 + 0.1,
               torch.randn(N, V, A, generator=g), torch.randn(N, V, 5, generator=g))
    targets = {"view": torch.randint(0, V + 1, (N,), generator=g), "quality": torch.rand(N, V, generator=g),
               "action": torch.randint(0, A, (N, V), generator=g), "pose": torch.randn(N, V, 5, generator=g)}
    return outputs, targets


def test_masked_loss_equals_loss_on_labelled_subset():
    outputs, targets = _batch()
    masked = {k: v.clone() for k, v in targets.items()}
    masked["view"][3:] = -1
    masked["quality"][3:] = float("nan")
    masked["action"][3:] = -1
    masked["pose"][3:] = float("nan")
    _, terms = multitask_loss(outputs, masked, W)
    _, ref = multitask_loss(tuple(o[:3] for o in outputs), {k: v[:3] for k, v in targets.items()}, W)
    for k in W:
        assert terms[k] == pytest.approx(ref[k], rel=1e-5), k


def test_masked_labels_get_no_gradient():
    outputs, targets = _batch(1)
    outputs = tuple(o.clone().requires_grad_(True) for o in outputs)
    targets["view"][0] = -1
    targets["quality"][0] = float("nan")
    targets["action"][0] = -1
    targets["pose"][0] = float("nan")
    loss, _ = multitask_loss(outputs, targets, W)
    loss.backward()
    for o in outputs:
        assert torch.all(o.grad[0] == 0) and torch.any(o.grad[1:] != 0)


def test_all_missing_gives_zero_and_backprops():
    outputs, targets = _batch(2)
    outputs = tuple(o.clone().requires_grad_(True) for o in outputs)
    targets = {"view": torch.full((N,), -1), "quality": torch.full((N, V), float("nan")),
               "action": torch.full((N, V), -1), "pose": torch.full((N, V, 5), float("nan"))}
    loss, terms = multitask_loss(outputs, targets, W)
    loss.backward()
    assert float(loss.detach()) == 0.0 and all(v == 0.0 for v in terms.values())


def test_overrate_weight_scales_only_good_rated_non_diagnostic_pairs():
    """The weight multiplies the BCE of pairs rated >= QUALITY_GOOD with a non-diagnostic label."""
    q_pred = torch.tensor([[0.9, 0.9, 0.3, 0.7, 0.5]])
    q_true = torch.tensor([[0.2, 0.9, 0.1, 0.2, 0.5]])  # only the first pair is over-rated
    outputs, targets = _batch()
    outputs = (outputs[0][:1], q_pred, outputs[2][:1], outputs[3][:1])
    targets = {k: v[:1] for k, v in targets.items()} | {"quality": q_true}
    bce = torch.nn.functional.binary_cross_entropy(q_pred, q_true, reduction="none")[0]
    _, plain = multitask_loss(outputs, targets, W)
    _, weighted = multitask_loss(outputs, targets, W | {"quality_overrate": 5.0})
    assert plain["quality"] == pytest.approx(float(bce.mean()), rel=1e-5)
    assert weighted["quality"] == pytest.approx(float((bce.sum() + 4.0 * bce[0]) / 5), rel=1e-5)
    for k in ("view", "action", "pose"):
        assert weighted[k] == plain[k]


def _perfect(n=40, seed=0):
    rng = np.random.default_rng(seed)
    view = rng.integers(0, V + 1, n)
    q = rng.random((n, V)).astype(np.float32)
    act = rng.integers(0, A, (n, V))
    pose = rng.normal(size=(n, V, 5)).astype(np.float32)
    outputs = {"view_logits": np.eye(V + 1)[view] * 20, "quality": q.copy(), "action_logits": np.eye(A)[act] * 20,
               "pose_offset": pose.copy()}
    return outputs, {"view": view, "quality": q, "action": act, "pose": pose}


def test_perfect_predictions():
    outputs, labels = _perfect()
    m = compute_metrics(outputs, labels)
    assert m["view_acc"] == 1.0 and m["action_acc"] == 1.0
    assert m["quality_mae"] < 1e-6 and m["quality_spearman"] == pytest.approx(1.0)
    assert m["pose_mae"] < 1e-6 and m["view_ece"] < 1e-6
    assert np.trace(np.array(m["confusion"])) == 40
    assert score(m) == pytest.approx(1.0)


def test_metrics_by_hand():
    outputs, labels = _perfect(4)
    labels["view"] = np.array([0, 1, 2, -1])          # last frame has no view label
    outputs["view_logits"] = np.eye(V + 1)[[0, 2, 2, 0]] * 20  # frame 1 wrong
    labels["action"][:] = -1
    labels["action"][0] = 3
    outputs["action_logits"][0] = np.eye(A)[[3, 0, 0, 0, 0]]
    m = compute_metrics(outputs, labels)
    assert m["view_acc"] == pytest.approx(2 / 3)
    cm = np.array(m["confusion"])
    assert cm.shape == (len(VIEW_LABELS),) * 2 and cm[1, 2] == 1 and cm.sum() == 3
    assert m["action_acc"] == pytest.approx(1 / 5)  # frame 0: only the first target is right
    assert m["action_acc_PLAX"] == 1.0 and m["action_acc_PSAX"] == 0.0
    labels["pose"][0] = 0.0                    # frame 0 sits on every target: all its pairs are "near"
    labels["pose"][0, 0, 0] = 3.0              # ... except the first (normalized distance 3 > VIEW_RADIUS)
    m = compute_metrics(outputs, labels)
    assert m["action_acc_far"] == 1.0 and m["action_acc_near"] == 0.0


def test_ece_by_hand():
    # two frames at confidence 0.9, one right: |0.5 - 0.9| = 0.4
    assert expected_calibration_error(np.array([0.9, 0.9]), np.array([1, 0])) == pytest.approx(0.4)
    # 0.25 confident and wrong + 0.95 confident and right: (|0 - .25| + |1 - .95|) / 2
    assert expected_calibration_error(np.array([0.25, 0.95]), np.array([0, 1])) == pytest.approx(0.15)


def test_quality_spearman_meter_range_and_acoustic_split():
    outputs, labels = _perfect(30, seed=3)
    labels["quality"][:, :] = 1e-9                     # far from every target ...
    labels["quality"][:10, 0] = np.linspace(0.1, 0.9, 10)
    outputs["quality"][:] = np.random.default_rng(0).random((30, V)) * 1e-3  # ... model agrees, order random
    outputs["quality"][:10, 0] = np.linspace(0.1, 0.9, 10)
    m = compute_metrics(outputs, labels, acoustic=np.r_[np.zeros(5), np.ones(25)])
    assert m["quality_spearman"] == pytest.approx(1.0)  # only the 10 pairs on the meter
    assert m["quality_spearman_all"] < 0.9
    assert m["quality_meter_frac"] == pytest.approx(10 / (30 * V))
    outputs["quality"][20, 3] = 0.5                      # a false alarm enters the meter range and counts
    assert compute_metrics(outputs, labels)["quality_spearman"] < 1.0
    assert m["action_acc_visible"] == 1.0 and m["action_acc_blind"] == 1.0


def test_safe_recall_counts_what_one_threshold_selects_with_few_non_diagnostic():
    true = np.r_[np.linspace(0.61, 0.99, 60), np.linspace(0.0, 0.5, 140)]   # 60 diagnostic, 140 not
    assert safe_recall(true, true) == 1.0                      # perfect ranking: all of them, none bad
    pred = true.copy()
    pred[60] = 0.8                                             # one bad frame rated among the good ones
    above = int((true[:60] > 0.8).sum())                       # a threshold over it keeps only these
    assert safe_recall(true, pred) == pytest.approx(above / 60)   # 1 bad in <= 61 selected is over 1 %
    pred[60] = 0.995
    assert safe_recall(true, pred) == 0.0                      # rated at the very top: nothing is safe
    many = np.r_[np.linspace(0.61, 0.99, 150), 0.3]            # with 150 good, 1 bad in 151 is within 1 %
    assert safe_recall(many, np.r_[many[:150], 0.995]) == 1.0
    tied = np.r_[np.full(60, 0.9), 0.9, true[61:]]             # a tie cannot be split by a threshold
    assert safe_recall(true, tied) == 0.0
    assert np.isnan(safe_recall(np.full(5, 0.1), np.linspace(0, 1, 5)))


def test_compute_metrics_reports_safe_recall_pooled_and_per_view():
    outputs, labels = _perfect(40, seed=5)
    m = compute_metrics(outputs, labels)
    assert m["quality_safe_recall"] == pytest.approx(1.0)
    assert all(m[f"quality_safe_recall_{v}"] == pytest.approx(1.0) for v in VIEWS)
