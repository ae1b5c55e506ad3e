"""SessionRecorder / open_recording: round trip, damaged files, SIGKILL mid-write, append cost."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from devices.base import CorruptData, EndOfStream, Frame, SourceNotFound, create_source
from devices.recorder import RECORD, SessionRecorder, open_recording
from helpers_devices import frame_number, numbered_frames

FRAMES = numbered_frames(10, 24, 32)


def _record(folder: Path, n: int = 10, fps: float = 50.0) -> Path:
    with SessionRecorder(folder, source_name="test", meta={"model": "m1"}, fps=fps) as rec:
        for i in range(n):
            pose = np.eye(4)
            pose[:3, 3] = [i, 2 * i, 3.5]
            labels = {"view": np.int64(i % 3), "quality": np.float32([0.5, 0.25])}
            rec.append(Frame(image=FRAMES[i], t=100.0 + i / fps, index=i, spacing_mm=(0.3, 0.4), pose=pose,
                             labels=labels), extra={"instruction": f"step {i}", "probs": np.arange(3) / 4})
    return folder


def test_round_trip(tmp_path):
    folder = _record(tmp_path / "s")
    session = json.loads((folder / "session.json").read_text())
    assert session["format"] == "pocus-session" and session["version"] == 1
    assert session["source"] == "test" and session["meta"] == {"model": "m1"}
    assert session["frames"] == 10 and session["duration_s"] == pytest.approx(0.18)
    with open_recording(folder) as src:
        frames = list(src)
        assert not src.interrupted and src.truncated_bytes == 0 and src.skipped == 0
        assert src.fps == pytest.approx(50.0)
        assert src.last_entry["extra"] == {"instruction": "step 9", "probs": [0.0, 0.25, 0.5]}
    assert len(frames) == 10
    for i, f in enumerate(frames):
        assert np.array_equal(f.image, FRAMES[i])
        assert f.t == pytest.approx(i / 50.0) and f.index == i
        assert f.spacing_mm == (0.3, 0.4)
        assert f.pose[:3, 3] == pytest.approx([i, 2 * i, 3.5])
        assert f.labels == {"view": i % 3, "quality": [0.5, 0.25]}


def test_variable_sizes_loop_and_registry(tmp_path):
    folder = tmp_path / "v"
    with SessionRecorder(folder) as rec:
        rec.append(Frame(image=np.full((5, 7), 1, np.uint8), t=0.0, index=0))
        rec.append(Frame(image=np.full((9, 3), 2, np.uint8), t=0.1, index=1))
    with create_source(f"rec:{folder}", loop=True) as src:
        shapes = [src.read().image.shape for _ in range(5)]
    assert shapes == [(5, 7), (9, 3)] * 2 + [(5, 7)]


def test_truncated_tail_and_a_corrupt_record(tmp_path):
    folder = _record(tmp_path / "t")
    bin_path, index_path = folder / "frames.bin", folder / "frames.jsonl"
    data = bytearray(bin_path.read_bytes())
    record = RECORD.size + FRAMES[0].size
    data[3 * record + RECORD.size + 5] ^= 0xFF          # flip a pixel bit in record 3: CRC fails
    bin_path.write_bytes(bytes(data[: -record // 2]))    # and cut the last record in half
    lines = index_path.read_text().splitlines(True)
    index_path.write_text("".join(lines[:-1]) + lines[-1][:20])  # cut the last JSON line too
    with open_recording(folder) as src:
        frames = list(src)
        assert src.truncated_bytes == record - record // 2
        assert src.skipped == 1
    assert [frame_number(f.image) for f in frames] == [0, 1, 2, 4, 5, 6, 7, 8]


def test_bad_folders(tmp_path):
    with pytest.raises(SourceNotFound, match="not found"):
        open_recording(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceNotFound, match="no frames.bin"):
        open_recording(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "frames.bin").write_bytes(b"not a recording" * 10)
    with pytest.raises(CorruptData, match="frames.bin"):
        open_recording(tmp_path / "junk")
    _record(tmp_path / "used", n=1)
    with pytest.raises(FileExistsError):
        SessionRecorder(tmp_path / "used")
    rec = SessionRecorder(tmp_path / "closed")
    with pytest.raises(ValueError, match="dict"):
        rec.append(Frame(image=FRAMES[0], t=0, index=0), extra=[1, 2])
    rec.close()
    with pytest.raises(ValueError, match="closed"):
        rec.append(Frame(image=FRAMES[0], t=0, index=0))
    with pytest.raises(EndOfStream):
        open_recording(tmp_path / "closed").read()


def test_realtime_replay_is_paced(tmp_path):
    folder = _record(tmp_path / "p", n=8, fps=40.0)
    t0 = time.monotonic()
    with open_recording(folder, realtime=True) as src:
        n = sum(1 for _ in src)
    assert n == 8 and time.monotonic() - t0 >= 0.9 * 7 / 40.0


def test_append_is_cheap(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    with SessionRecorder(tmp_path / "fast") as rec:
        times = []
        for i in range(300):
            frame = Frame(image=image, t=i / 30.0, index=i, pose=np.eye(4))
            t0 = time.perf_counter()
            rec.append(frame, extra={"view": "A4C", "quality": 0.7, "probs": np.full(6, 1 / 6)})
            times.append(time.perf_counter() - t0)
    assert np.median(times) < 1e-3, f"append median {1e3 * np.median(times):.3f} ms"


CHILD = r"""
import sys, time, numpy as np
from devices.base import Frame
from devices.recorder import SessionRecorder
rec = SessionRecorder(sys.argv[1], source_name="child", fps=200.0)
i = 0
while True:
    img = np.full((64, 64), i % 251, np.uint8)
    rec.append(Frame(image=img, t=i / 200.0, index=i), extra={"i": i})
    i += 1
    if i % 20 == 0:
        print(i, rec.durable_frames, flush=True)
    time.sleep(0.005)
"""


def test_sigkill_mid_write_loses_at_most_a_second(tmp_path):
    folder = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    appended = durable = 0
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            appended, durable = map(int, child.stdout.readline().split())
            if durable >= 100:  # several flushes happened
                break
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=10)
        child.stdout.close()
    assert durable >= 100, "the child never reported durable frames"
    with open_recording(folder) as src:
        frames = list(src)
        assert src.interrupted
        entries = len(src.entries)
    assert len(frames) >= durable, "frames reported durable were lost"
    assert appended - len(frames) <= 200 * 1.0 + 20, "more than a second lost"
    assert all(f.image[0, 0] == i % 251 for i, f in enumerate(frames)), "replayed frames are not the recorded ones"
    assert entries >= durable
