"""Simulator datasets (with the fake probe), shards, streams and augmentations."""
import os

import numpy as np
import pytest
import torch

from devices.labels import HOLD_RADIUS, POSE_SCALE, VIEWS
from helpers_training import fake_factory
from training import data as D
from training.augment import Augment, Blur, GainContrast, Gamma, Jpeg, Noise, Overlay, PartialShadow, ShiftScale


def test_split_seeds_are_disjoint():
    train, val, test = (set(D.split_seeds(s, 10_000)) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert D.split_seeds("test", 3, 1000) == [21000, 21001, 21002]
    with pytest.raises(ValueError, match="unknown split"):
        D.split_seeds("dev", 3)
    with pytest.raises(ValueError, match="10000"):
        D.split_seeds("train", 10_001)


def test_heldout_settings_never_in_training_range():
    rng = np.random.default_rng(0)
    train = [D.draw_settings(rng)["depth_mm"] for _ in range(500)]
    held = [D.draw_settings(rng, heldout=True)["depth_mm"] for _ in range(500)]
    assert max(train) < D.HELDOUT_DEPTH_MM <= min(held)


def test_render_patient_mix_and_labels():
    a = D.render_patient(3, 300, size=32, probe_factory=fake_factory)
    assert a["image"].shape == (300, 32, 32) and a["image"].dtype == np.uint8
    assert a["quality"].shape == (300, len(VIEWS)) and a["pose_offset"].shape == (300, len(VIEWS), 5)
    frac = np.bincount(a["mode"], minlength=3) / 300
    assert np.allclose(frac, D.POSE_MIX, atol=0.08)
    # near frames sit within NEAR_RADIUS of some target; about half of them inside the HOLD radius
    dist = np.linalg.norm(a["pose_offset"] / POSE_SCALE, axis=-1).min(1)
    near = a["mode"] == 0
    assert dist[near].max() <= D.NEAR_RADIUS[1] + 1e-4
    assert 0.05 < np.mean(dist[near] <= HOLD_RADIUS) < 0.6
    assert len(np.unique(a["depth_mm"])) == D.SETTING_GROUPS
    b = D.render_patient(3, 300, size=32, probe_factory=fake_factory)
    assert all(np.array_equal(a[k], b[k]) for k in D.SHARD_KEYS)


def test_write_dataset_is_resumable(tmp_path):
    paths = D.write_dataset(tmp_path, "val", 3, 10, workers=1, size=32, probe_factory=fake_factory, progress=False)
    assert [p.name for p in paths] == ["p10000.npz", "p10001.npz", "p10002.npz"]
    stamps = {p: p.stat().st_mtime_ns for p in paths}
    paths[1].write_bytes(b"truncated")                       # a damaged shard is rendered again
    os.utime(paths[0], ns=(1, 1))                            # mark an intact one
    D.write_dataset(tmp_path, "val", 3, 10, workers=1, size=32, probe_factory=fake_factory, progress=False)
    assert paths[0].stat().st_mtime_ns == 1                  # skipped
    assert D.shard_complete(paths[1], 10) and paths[2].stat().st_mtime_ns == stamps[paths[2]]
    arrays = D.load_shards(tmp_path / "val")
    assert len(arrays) == 30
    with np.load(paths[0]) as z:
        assert np.allclose(arrays.pose[:10], z["pose_offset"] / POSE_SCALE, atol=1e-5)  # normalized on load


def test_shards_of_another_simulator_version_are_rendered_again(tmp_path):
    paths = D.write_dataset(tmp_path, "val", 2, 5, workers=1, size=32, probe_factory=fake_factory, progress=False)
    meta = tmp_path / "val" / "dataset.json"
    meta.write_text(meta.read_text().replace('"custom"', '"0123456789abcdef"'))
    for p in paths:
        os.utime(p, ns=(1, 1))
    D.write_dataset(tmp_path, "val", 2, 5, workers=1, size=32, probe_factory=fake_factory, progress=False)
    assert all(p.stat().st_mtime_ns > 1 for p in paths)


def test_sim_fingerprint_follows_code_not_comments(tmp_path):
    import shutil
    from pathlib import Path

    src = Path(D.__file__).resolve().parents[1] / "devices"
    shutil.copytree(src / "sim", tmp_path / "sim", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(src / "labels.py", tmp_path / "labels.py")
    assert D.sim_fingerprint(tmp_path) == D.sim_fingerprint()
    labels = tmp_path / "labels.py"
    text = labels.read_text()
    edited = text.replace("def best_action(", "# a comment\ndef best_action(", 1)
    edited = edited.replace('"""Best single action', '"""Reworded docstring. Best single action', 1)
    assert edited != text
    labels.write_text(edited)
    assert D.sim_fingerprint(tmp_path) == D.sim_fingerprint()     # comments and docstrings: same
    labels.write_text(text.replace("POSE_SCALE = np.array([10.0,", "POSE_SCALE = np.array([11.0,", 1))
    assert D.sim_fingerprint(tmp_path) != D.sim_fingerprint()     # a label change: shards are stale


def test_sim_fingerprint_is_the_same_on_every_python():
    import ast

    node = ast.parse("def f(x):\n    return x + 1\n").body[0]
    text = D._ast_text(node)
    assert "lineno" not in text and "Add()" in text
    node._fields = (*node._fields, "type_params")   # as Python 3.12 parses a def: one more, empty field
    node.type_params = []
    assert D._ast_text(node) == text
    node.type_params = [ast.TypeVar(name="T")] if hasattr(ast, "TypeVar") else [ast.Name(id="T")]
    assert D._ast_text(node) != text                 # a field with content still counts


def test_load_shards_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards"):
        D.load_shards(tmp_path / "missing")
    (tmp_path / "p00001.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="p00001.npz"):
        D.load_shards(tmp_path)


def test_frame_dataset_augmentation_is_reproducible():
    arrays = D.arrays_from_shard(D.render_patient(0, 4, size=32, probe_factory=fake_factory))
    ds = D.FrameDataset(arrays, Augment(p=1.0), seed=5, size=32)
    x0, t0 = ds[1]
    assert x0.shape == (1, 32, 32) and x0.dtype == np.float32 and t0["pose"].shape == (len(VIEWS), 5)
    assert np.array_equal(x0, ds[1][0])
    ds.set_epoch(1)
    assert not np.array_equal(x0, ds[1][0])


def test_sim_stream_splits_patients_between_workers():
    stream = D.SimStream(list(range(5)), 8, seed=1, size=32, probe_factory=fake_factory, shuffle_buffer=4)
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2, drop_last=True)
    batches = list(loader)
    assert len(batches) == stream.num_batches(4, 2) == 10
    views = torch.cat([b[1]["view"] for b in batches])
    assert len(views) == 40  # 5 patients x 8 frames once: the two workers did not both render everyone
    # rank split: rank 1 of 2 owns seeds 1 and 3 only
    assert D.SimStream(list(range(5)), 8, rank=1, world_size=2).__len__() == 16


def test_loop_poses_are_mixed_into_training_poses(tmp_path):
    """Closed-loop poses (offsets from a target) are re-applied to this patient's target with
    probability `share`; without them the pose stream is unchanged."""
    from helpers_training import TARGETS, FakeProbe

    offsets = np.array([[30.0, 0, 0, 0, 0], [0, 0, 0, 0, 5.0]])
    np.savez(tmp_path / "p.npz", view=np.array([2, 4]), offset=offsets, patient_seed=np.array([7, 8]))
    loop = D.LoopPoses.load(tmp_path / "p.npz", share=1.0)
    probe, rng = FakeProbe(), np.random.default_rng(0)
    drawn = [D.sample_training_pose(probe, rng, loop) for _ in range(20)]
    expected = {(tuple(TARGETS[VIEWS[2]] + offsets[0]), 1), (tuple(TARGETS[VIEWS[4]] + offsets[1]), 0)}
    assert {(tuple(p), m) for p, m in drawn} == expected       # 3 units away: medium; 0.5: near
    a = [D.sample_training_pose(probe, np.random.default_rng(1))[0] for _ in range(3)]
    b = [D.sample_training_pose(probe, np.random.default_rng(1), None)[0] for _ in range(3)]
    assert np.array_equal(a, b)
    half = D.LoopPoses.load(tmp_path / "p.npz", share=0.5)
    rows = D.render_patient(3, 40, size=32, probe_factory=fake_factory, loop=half)
    assert 0 < np.isin(rows["pose_offset"][:, 2, 0], [-30.0]).sum() < 40     # some frames, not all
    stream = D.SimStream([0, 1], 4, size=32, probe_factory=fake_factory, loop=half)
    assert len(list(stream)) == 8


@pytest.mark.parametrize("content, match", [
    (None, "not an .npz"),
    ({"view": np.array([0]), "offset": np.zeros((1, 4))}, "need view"),
    ({"view": np.array([9]), "offset": np.zeros((1, 5))}, "need view"),
    ({"view": np.array([0]), "offset": np.full((1, 5), np.nan)}, "need view"),
    ({"offset": np.zeros((1, 5))}, "not an .npz"),
])
def test_loop_poses_errors(tmp_path, content, match):
    path = tmp_path / "p.npz"
    if content is None:
        path.write_bytes(b"junk")
    else:
        np.savez(path, **content)
    with pytest.raises(ValueError, match=match):
        D.LoopPoses.load(path, 0.3)
    with pytest.raises(ValueError, match="loop_pose_share"):
        D.LoopPoses.load(path, 0.0)


AUGS = [GainContrast(), Gamma(), Blur(), Noise(), Jpeg(), PartialShadow(), Overlay(), ShiftScale()]


@pytest.mark.parametrize("t", AUGS, ids=lambda t: type(t).__name__)
def test_each_augmentation_keeps_format_and_is_seeded(t):
    img = np.random.default_rng(0).integers(0, 255, (48, 64)).astype(np.uint8)
    out = t(img, np.random.default_rng(3))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.array_equal(out, t(img, np.random.default_rng(3)))
    assert not np.array_equal(out, img)


def test_augment_chain():
    img = np.full((32, 32), 80, np.uint8)
    assert np.array_equal(Augment(p=0.0)(img, np.random.default_rng(0)), img)
    with pytest.raises(ValueError, match="uint8"):
        Augment()(img.astype(np.float32), np.random.default_rng(0))


def test_partial_shadow_darkens_a_wedge_below_the_apex():
    img = np.full((64, 64), 200, np.uint8)
    t = PartialShadow()
    out = t.apply(img, {"center_deg": 0.0, "width_deg": 20.0, "strength": 0.8, "start": 0.2})
    assert out[50, 32] < 80 and out[50, 5] == 200 and out[2, 32] == 200
