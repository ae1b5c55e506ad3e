"""Evaluation metrics (scikit-learn / scipy) and the masked multi-task loss.

Missing labels: view / action = -1, quality / pose = NaN; every metric and loss ignores them.

Metrics (all on frames that carry the label):
    view_acc, confusion (rows true, cols predicted, order VIEW_LABELS), view_ece (15-bin
        expected calibration error of the top-1 probability)
    quality_mae; quality_spearman: rank correlation pooled over (frame, target view) pairs in the
        meter's range, i.e. where the true OR the predicted quality is >= METER_RESOLUTION (pairs
        that both sides call "no view" carry no order and are left out; every false alarm and every
        miss stays in); quality_spearman_all: over all pairs (dominated by the order of values
        below 1e-6, far from every target); quality_mae_<VIEW>, quality_spearman_<VIEW> (meter range)
    action_acc: best action toward the selected target, where every target view is selected in
        turn (pooled over frames x views); action_acc_<VIEW>; action_acc_onview (frames whose true
        view is a standard view) and action_acc_other (true view OTHER: off-heart images); with the
        simulator's acoustic factor: action_acc_visible (some heart visible) and action_acc_blind
        (no heart in the image: the pose, hence the action, cannot be read from it);
        action_acc_near / action_acc_far: (frame, target) pairs within / beyond VIEW_RADIUS of the
        target (fine guidance on the view vs finding the way from far)
    pose_mae: mean absolute pose-offset error in normalized units (POSE_SCALE), pose_mae_<axis>
        in mm / deg
    quality_safe_recall: share of the truly diagnostic (frame, view) pairs that one quality threshold
        can select while at most SAFE_BAD_SHARE of the selected pairs are not diagnostic: the top of
        the quality scale that auto-capture relies on (closed-loop false captures are non-diagnostic
        images rated at the top); quality_safe_recall_<VIEW> with a threshold per view
"""
from __future__ import annotations

from typing import Any

import numpy as np

from devices.labels import POSE_AXES, POSE_SCALE, QUALITY_DIAGNOSTIC, QUALITY_GOOD, VIEW_LABELS, VIEW_RADIUS, VIEWS

METER_RESOLUTION = 0.01  # quality below this reads as "no view" on a quality meter
SAFE_BAD_SHARE = 0.01    # quality_safe_recall: the false-capture target of the closed loop


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """ECE: sum over equal-width confidence bins of |accuracy - mean confidence| x bin fraction.

    Per-bin accuracy and confidence come from sklearn's calibration_curve; the bin weights from
    the same bin edges.
    """
    from sklearn.calibration import calibration_curve

    confidence = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    correct = np.asarray(correct).astype(int)
    if len(confidence) == 0:
        return float("nan")
    if correct.min() == correct.max():  # calibration_curve needs both classes
        return float(abs(correct.mean() - confidence.mean()))
    prob_true, prob_pred = calibration_curve(correct, confidence, n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], confidence, side="right"), minlength=n_bins)
    counts = counts[counts > 0]
    return float(np.sum(counts / counts.sum() * np.abs(prob_true - prob_pred)))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def safe_recall(q_true: np.ndarray, q_pred: np.ndarray, bad_share: float = SAFE_BAD_SHARE) -> float:
    """Largest share of the diagnostic pairs a threshold on q_pred selects with at most bad_share of
    the selection non-diagnostic (NaN with no diagnostic pair). Ties count as one threshold."""
    diag = q_true >= QUALITY_DIAGNOSTIC
    if not diag.any():
        return float("nan")
    order = np.argsort(-q_pred, kind="stable")
    good, bad = np.cumsum(diag[order]), np.cumsum(~diag[order])
    cut = np.r_[q_pred[order][1:] != q_pred[order][:-1], True]      # a threshold can stop only here
    ok = cut & (bad <= bad_share * np.arange(1, len(order) + 1))
    return float(good[ok].max() / diag.sum()) if ok.any() else 0.0


def compute_metrics(outputs: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                    acoustic: np.ndarray | None = None) -> dict[str, Any]:
    """All metrics from model outputs and labels (numpy, whole evaluation set).

    Args:
        outputs: "view_logits" [N, V+1], "quality" [N, V], "action_logits" [N, V, A], "pose_offset" [N, V, 5].
        labels: "view" [N], "quality" [N, V], "action" [N, V], "pose" [N, V, 5] (normalized), missing as -1/NaN.
        acoustic: optional simulator acoustic factor [N] (0 = no heart visible) for the action split.

    Returns:
        Flat dict of floats plus "confusion" (list of lists) and "n_frames".
    """
    from sklearn.metrics import accuracy_score, confusion_matrix

    m: dict[str, Any] = {"n_frames": int(len(labels["view"]))}
    view = np.asarray(labels["view"])
    has_view = view >= 0
    probs = softmax(np.asarray(outputs["view_logits"], dtype=np.float64))
    pred_view = probs.argmax(1)
    if has_view.any():
        m["view_acc"] = float(accuracy_score(view[has_view], pred_view[has_view]))
        m["confusion"] = confusion_matrix(view[has_view], pred_view[has_view],
                                          labels=list(range(len(VIEW_LABELS)))).tolist()
        m["view_ece"] = expected_calibration_error(probs[has_view].max(1), pred_view[has_view] == view[has_view])

    q_true, q_pred = np.asarray(labels["quality"], dtype=np.float64), np.asarray(outputs["quality"], dtype=np.float64)
    has_q = np.isfinite(q_true)
    if has_q.any():
        meter = has_q & ((np.nan_to_num(q_true) >= METER_RESOLUTION) | (q_pred >= METER_RESOLUTION))
        m["quality_mae"] = float(np.abs(q_true[has_q] - q_pred[has_q]).mean())
        m["quality_spearman"] = _spearman(q_true[meter], q_pred[meter])
        m["quality_spearman_all"] = _spearman(q_true[has_q], q_pred[has_q])
        m["quality_meter_frac"] = float(meter.sum() / has_q.sum())
        m["quality_safe_recall"] = safe_recall(q_true[has_q], q_pred[has_q])
        for v, name in enumerate(VIEWS):
            sel = has_q[:, v]
            if sel.any():
                m[f"quality_mae_{name}"] = float(np.abs(q_true[sel, v] - q_pred[sel, v]).mean())
                m[f"quality_spearman_{name}"] = _spearman(q_true[meter[:, v], v], q_pred[meter[:, v], v])
                m[f"quality_safe_recall_{name}"] = safe_recall(q_true[sel, v], q_pred[sel, v])

    a_true = np.asarray(labels["action"])
    a_pred = np.asarray(outputs["action_logits"]).argmax(-1)
    has_a = a_true >= 0
    if has_a.any():
        m["action_acc"] = float(accuracy_score(a_true[has_a], a_pred[has_a]))
        for v, name in enumerate(VIEWS):
            if has_a[:, v].any():
                m[f"action_acc_{name}"] = float(accuracy_score(a_true[has_a[:, v], v], a_pred[has_a[:, v], v]))
        splits = [("onview", (view >= 0) & (view < len(VIEWS))), ("other", view == len(VIEWS))]
        if acoustic is not None:
            acoustic = np.asarray(acoustic)
            splits += [("visible", acoustic > 0), ("blind", acoustic <= 0)]
        for key, rows in splits:
            sel = has_a & rows[:, None]
            if sel.any():
                m[f"action_acc_{key}"] = float(accuracy_score(a_true[sel], a_pred[sel]))
        dist = np.linalg.norm(np.asarray(labels["pose"], dtype=np.float64), axis=-1)  # [N, V], NaN if unknown
        for key, sel in (("near", dist <= VIEW_RADIUS), ("far", dist > VIEW_RADIUS)):
            sel = has_a & sel
            if sel.any():
                m[f"action_acc_{key}"] = float(accuracy_score(a_true[sel], a_pred[sel]))

    p_true, p_pred = np.asarray(labels["pose"], dtype=np.float64), np.asarray(outputs["pose_offset"], dtype=np.float64)
    has_p = np.isfinite(p_true)
    if has_p.any():
        err = np.abs(p_true - p_pred)
        m["pose_mae"] = float(err[has_p].mean())
        for i, axis in enumerate(POSE_AXES):
            sel = has_p[..., i]
            if sel.any():
                m[f"pose_mae_{axis}"] = float(err[..., i][sel].mean() * POSE_SCALE[i])
    return m


def score(metrics: dict[str, Any]) -> float:
    """One number to pick the best checkpoint: mean of view_acc, action_acc and quality_spearman present."""
    parts = [metrics[k] for k in ("view_acc", "action_acc", "quality_spearman")
             if k in metrics and np.isfinite(metrics[k])]
    return float(np.mean(parts)) if parts else -float("inf")


def multitask_loss(outputs: tuple, targets: dict, weights: dict[str, float], label_smoothing: float = 0.0
                   ) -> tuple[Any, dict[str, float]]:
    """Masked multi-task loss: CE(view) + BCE(quality) + CE(action per target) + SmoothL1(pose).

    Each term averages over the labelled elements only (a batch with no labels for a task adds 0).

    Args:
        outputs: model outputs (view_logits, quality, action_logits, pose_offset).
        targets: "view" [B] int64, "quality" [B, V], "action" [B, V] int64, "pose" [B, V, 5].
        weights: "view", "quality", "action", "pose" multipliers; optional "quality_overrate"
            (default 1): BCE weight of the pairs rated good (>= QUALITY_GOOD) that are not
            diagnostic, the errors that become false auto-captures.
        label_smoothing: for the two cross-entropies.

    Returns:
        (total loss tensor, {term: float value}).
    """
    import torch
    import torch.nn.functional as F

    view_logits, quality, action_logits, pose = (o.float() for o in outputs)
    zero = view_logits.sum() * 0.0  # keeps the graph (DDP needs every output used)
    terms = {}
    view = targets["view"]
    terms["view"] = (F.cross_entropy(view_logits, view, ignore_index=-1, label_smoothing=label_smoothing)
                     if (view >= 0).any() else zero)
    q = targets["quality"]
    mask = torch.isfinite(q)
    if mask.any():
        q_pred, q_true = quality[mask].clamp(1e-6, 1 - 1e-6), q[mask]
        bce = F.binary_cross_entropy(q_pred, q_true, reduction="none")
        overrated = (q_true < QUALITY_DIAGNOSTIC) & (q_pred.detach() >= QUALITY_GOOD)
        terms["quality"] = (bce * torch.where(overrated, weights.get("quality_overrate", 1.0), 1.0)).mean()
    else:
        terms["quality"] = zero + quality.sum() * 0.0
    a = targets["action"]
    terms["action"] = (F.cross_entropy(action_logits.reshape(-1, action_logits.shape[-1]), a.reshape(-1),
                                       ignore_index=-1, label_smoothing=label_smoothing)
                       if (a >= 0).any() else zero + action_logits.sum() * 0.0)
    p = targets["pose"]
    mask = torch.isfinite(p)
    terms["pose"] = (F.smooth_l1_loss(pose[mask], p[mask], beta=0.5) if mask.any() else zero + pose.sum() * 0.0)
    total = sum(weights[k] * v for k, v in terms.items())
    return total, {k: float(v.detach()) for k, v in terms.items()}
