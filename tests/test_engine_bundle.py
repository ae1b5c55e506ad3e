"""BundlePredictor (preprocess -> bundle -> probabilities), the e2e benchmark, the shipped bundle."""
from pathlib import Path

import numpy as np
import pytest

from devices.base import Frame, Source
from devices.labels import ACTIONS, VIEW_LABELS, VIEWS
from devices.preprocess import preprocess
from edge_app.bench import format_table, run_e2e
from edge_app.engine import BundlePredictor, EngineConfig, GuidanceEngine
from helpers_engine import ScriptedPredictor, noise_image, us_image

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "edge_app" / "bundles" / "default" / "bundle.json"


class FakeBundle:
    """Records its input and returns fixed logits (batch 1)."""

    precision = "int8"
    name = "fake 1 int8"

    def __init__(self, size=64, mean=0.1, std=0.3):
        self.manifest = {"input": {"name": "image", "shape": ["batch", 1, size, size],
                                   "normalization": {"mean": mean, "std": std}},
                         "labels": {"views": list(VIEW_LABELS), "targets": list(VIEWS), "actions": list(ACTIONS)},
                         "thresholds": {"quality_diagnostic": 0.65, "confidence_min": 0.3, "ood_energy_max": -2.5}}
        rng = np.random.default_rng(0)
        self.out = {"view_logits": rng.normal(size=(1, 6)).astype(np.float32) * 3,
                    "quality": np.array([[1.2, 0.5, -0.1, 0.3, 0.9]], np.float32),
                    "action_logits": rng.normal(size=(1, 5, 11)).astype(np.float32),
                    "pose_offset": rng.normal(size=(1, 5, 5)).astype(np.float32)}
        self.inputs = []

    def run(self, x):
        self.inputs.append(x)
        return self.out


def test_bundle_predictor_probabilities_energy_and_preprocessing():
    bundle = FakeBundle()
    pred = BundlePredictor(bundle, warmup=False)
    image = us_image(0.3, 100)
    out = pred.predict(image)
    np.testing.assert_allclose(bundle.inputs[0], preprocess(image, 64, 0.1, 0.3)[None], rtol=1e-6)
    logits = bundle.out["view_logits"][0].astype(np.float64)
    expected = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(out.view_probs, expected, rtol=1e-5)
    assert out.ood_score == pytest.approx(-np.log(np.exp(logits).sum()), rel=1e-6)
    assert out.confidence == pytest.approx(expected.max(), rel=1e-5)
    np.testing.assert_allclose(out.action_probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out.quality, [1.0, 0.5, 0.0, 0.3, 0.9])
    assert set(pred.last_timings) == {"preprocess_ms", "inference_ms"}
    assert pred.views == VIEWS and (pred.name, pred.precision) == ("fake 1 int8", "int8")


def test_engine_takes_thresholds_from_the_bundle_manifest():
    engine = GuidanceEngine(None, BundlePredictor(FakeBundle(), warmup=False))
    assert (engine.config.quality_threshold, engine.config.min_confidence, engine.config.max_ood_energy) == \
        (0.65, 0.3, None)   # the energy gate is opt-in (EngineConfig.max_ood_energy)
    explicit = GuidanceEngine(None, BundlePredictor(FakeBundle(), warmup=False), EngineConfig(quality_threshold=0.5))
    assert explicit.config.quality_threshold == 0.5


def test_bundle_with_other_actions_is_refused():
    bundle = FakeBundle()
    bundle.manifest["labels"]["actions"] = ["LEFT", "RIGHT"]
    with pytest.raises(ValueError, match="actions"):
        BundlePredictor(bundle)


class EndlessSource(Source):
    """Unpaced synthetic frames (the benchmark paces them)."""

    name = "endless"

    def __init__(self):
        self.i = 0

    def read(self, timeout=None):
        frame = Frame(image=us_image(self.i / 60, 64), t=self.i / 60, index=self.i)
        self.i += 1
        return frame


def test_e2e_benchmark_machinery_with_fakes():
    r = run_e2e(EndlessSource(), ScriptedPredictor(), seconds=1.0, fps=50, warmup_s=0.2)
    assert 40 <= r["offered"] <= 55 and r["processed"] + r["dropped"] <= r["offered"] + 1
    assert r["latency_ms"]["p50"] is not None and r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
    assert set(r["stages_ms"]) == {"read", "mailbox wait", "preprocess", "inference", "smoothing+gates"}
    shares = [s["share"] for s in r["stages_ms"].values() if s["share"] is not None]
    assert 0.5 < sum(shares) <= 1.15   # stage means come from slightly different frame sets: ~1 +- noise
    assert r["rss_mb"]["start"] > 10 and r["rss_mb"]["max"] >= r["rss_mb"]["end"]
    text = format_table(r)
    assert "pipeline keeps up" in text and "smoothing+gates" in text


@pytest.fixture(scope="module")
def shipped():
    if not SHIPPED.exists():
        pytest.skip("the shipped bundle edge_app/bundles/default does not exist yet")
    from edge_app.bundle import load_bundle

    return BundlePredictor(load_bundle(precision="int8"))


def test_shipped_bundle_runs_and_gates_noise(shipped):
    out = shipped.predict(us_image(0.0, 128))
    assert out.view_probs.shape == (6,) and np.isfinite(out.ood_score)
    engine = GuidanceEngine(None, shipped)
    for i in range(15):
        s = engine.process(Frame(image=noise_image(128, seed=i), t=i / 30, index=i))
    assert not s.available and "input does not look like a cardiac view" in s.reasons


def test_shipped_bundle_on_simulated_frames_gates_and_other_class(shipped):
    """Sim frames are real-looking ultrasound: the OOD/unsure gates must not block them; frames off
    every standard view (true OTHER) never get HOLD, and an arrow shown there mostly leads toward
    the target (the engine guides from OTHER frames only when the model is sure of the way)."""
    from devices.labels import VIEW_LABELS, action_delta, pose_distance
    from devices.sim import SimulatedProbe

    rng = np.random.default_rng(5)
    blocked, other_total, other_hold, arrows, arrows_closer = 0, 0, 0, 0, 0
    n = 0
    for seed in range(20000, 20004):
        probe = SimulatedProbe(patient_seed=seed, realtime=False)
        for k in range(6):
            pose = probe.sample_pose(rng, "window" if k % 2 else "near")
            engine = GuidanceEngine(None, shipped)
            for i in range(10):
                image, labels = probe.render(pose, i / 30)
                s = engine.process(Frame(image=image, t=i / 30, index=i))
            n += 1
            blocked += not s.available
            if VIEW_LABELS[labels["view"]] == "OTHER":
                other_total += 1
                other_hold += s.state == "HOLD"
                if s.state == "GUIDING":
                    t = VIEW_LABELS.index(s.target)
                    after = probe.labels(pose + action_delta(s.action, 0.5))
                    arrows += 1
                    arrows_closer += pose_distance(after["pose_offset"][t]) < pose_distance(labels["pose_offset"][t])
    assert blocked <= 0.1 * n, f"{blocked}/{n} simulated frames blocked by the safety gates"
    assert other_total >= 8 and other_hold == 0, f"{other_hold}/{other_total} OTHER frames told to hold"
    assert arrows >= 5 and arrows_closer >= 0.7 * arrows, f"{arrows_closer}/{arrows} arrows on OTHER frames lead closer"
