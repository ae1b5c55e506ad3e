"""`pocus app` end to end in a subprocess: headless JSON output, replay of a recording, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_app.engine import EngineConfig

REPO = Path(__file__).resolve().parents[1]
# Runs the real CLI with a fake live source ("fakeus") registered and the scripted predictor.
LAUNCH = ("import sys; sys.path.insert(0, 'tests'); import helpers_engine as h; h.register_fake_source(); "
          "from edge_app.cli import main; sys.exit(main(sys.argv[1:]))")
SCRIPTED = ["--predictor", "helpers_engine:make_scripted"]


def pocus(*args, env=None, timeout=60):
    environment = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", LAUNCH, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=environment)


def json_lines(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_headless_json_two_seconds(tmp_path):
    r = pocus("app", "--headless", "--json", "--seconds", "2", "--source", "fakeus:30", *SCRIPTED,
              "--target", "PSAX", "--captures", str(tmp_path / "caps"))
    assert r.returncode == 0, r.stderr
    lines = json_lines(r.stdout)
    summary = lines[-1]
    per_frame = [x for x in lines[:-1] if x["frame"] >= 0]
    assert summary["summary"] is True and summary["end"] == "time limit"
    assert 40 <= summary["frames"] <= 62 and summary["frames"] == len(per_frame)
    assert summary["fps"] > 20 and summary["latency_ms_p50"] < summary["latency_ms_p99"] + 1e-9
    assert summary["drops"] <= 3 and summary["model"] == "scripted" and summary["source"] == "fakeus"
    frame_indices = [x["frame"] for x in per_frame]
    assert frame_indices == sorted(frame_indices)
    last = per_frame[-1]
    assert last["state"] == "GUIDING" and last["action"] == "ROTATE_CW" and last["target"] == "PSAX"
    assert set(last) >= {"t", "available", "reasons", "view", "quality", "instruction", "fps", "latency_ms"}
    assert last["capture_level"] == pytest.approx(EngineConfig(quality_threshold=last["quality_threshold"]).capture_level("PSAX"))


def test_status_line_mode_and_no_display_message():
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    r = subprocess.run([sys.executable, "-c", LAUNCH, "app", "--seconds", "1", "--source", "fakeus", *SCRIPTED],
                       cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("no display: running headless") == 1
    assert "GUIDING" in r.stdout and "Rotate clockwise" in r.stdout
    assert "frames in" in r.stdout.splitlines()[-1]


def test_replay_of_a_recording_at_max_speed(tmp_path):
    recorder = pytest.importorskip("devices.recorder", reason="devices/recorder.py not written yet")
    from devices.base import Frame
    from helpers_engine import us_image

    with recorder.SessionRecorder(tmp_path / "session", source_name="test") as rec:
        for i in range(45):
            rec.append(Frame(image=us_image(i / 30, 64), t=100 + i / 30, index=i))
    args = ("app", "--headless", "--json", "--source", f"rec:{tmp_path / 'session'}", "--replay-speed", "max",
            *SCRIPTED)
    r1, r2 = pocus(*args), pocus(*args)
    assert r1.returncode == 0, r1.stderr
    a, b = json_lines(r1.stdout), json_lines(r2.stdout)
    assert a[-1]["frames"] == 45 and a[-1]["drops"] == 0 and a[-1]["end"] == "end of source"
    # Same instructions at the same recorded times in both runs (regression-test use).
    key = lambda rows: [(x["frame"], x["t"], x["state"], x["instruction"]) for x in rows[:-1]]  # noqa: E731
    assert key(a) == key(b)
    assert a[-2]["reasons"] == ["the source has no more frames"]


def test_record_then_replay_keeps_the_instruction_shown(tmp_path):
    recorder = pytest.importorskip("devices.recorder", reason="devices/recorder.py not written yet")
    r = pocus("app", "--headless", "--seconds", "1", "--source", "fakeus:30", *SCRIPTED,
              "--record", str(tmp_path / "s1"))
    assert r.returncode == 0, r.stderr
    src = recorder.open_recording(tmp_path / "s1")
    with src:
        n = 0
        for frame in src:
            n += 1
            extra = src.last_entry.get("extra", {})
    assert n >= 20 and extra["instruction"] == "Rotate clockwise" and extra["model"]["action"][0] == "ROTATE_CW"


@pytest.mark.parametrize("args, message", [
    (("--seconds", "0"), "--seconds must be > 0"),
    (("--target", "A5C"), "unknown target view 'A5C'"),
    (("--protocol", "cardiac-arrest"), "unknown protocol"),
    (("--source", "nosuch:1"), "unknown source 'nosuch:1'"),
    (("--source", "igtl://127.0.0.1:1", "--replay-speed", "max"), "--replay-speed applies to files"),
    (("--predictor", "no_such_module:x"), "cannot load it"),
])
def test_bad_input_gives_one_clear_line(args, message):
    r = pocus("app", "--headless", "--seconds", "1", "--source", "fakeus", *SCRIPTED, *args)
    assert r.returncode == 1
    assert message in r.stderr and "Traceback" not in r.stderr


def test_missing_bundle_is_a_clear_error(tmp_path):
    r = pocus("app", "--headless", "--seconds", "1", "--source", "fakeus", "--bundle", str(tmp_path / "nope"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "nope" in r.stderr


def test_default_app_on_the_simulator_with_the_shipped_bundle():
    r = subprocess.run([sys.executable, "-m", "edge_app.cli", "app", "--headless", "--json", "--seconds", "2"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = json_lines(r.stdout)
    summary = lines[-1]
    assert summary["frames"] >= 20 and summary["source"].startswith("sim")
    states = {x["state"] for x in lines[:-1]}
    assert states & {"SEARCHING", "GUIDING", "HOLD", "CAPTURED"}
    assert np.isfinite(summary["latency_ms_p99"])
