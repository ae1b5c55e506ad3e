"""`pocus source / record / stream / bench sources` and the light-import promise of devices."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from devices.bench import cine_frames, write_dicom, write_recording
from devices.cli import parse_options
from devices.igtl import IGTLinkSource
from edge_app.cli import main

ROOT = Path(__file__).resolve().parents[1]
FRAMES = cine_frames(6, 40, 48)


@pytest.fixture(scope="module")
def dicom_file(tmp_path_factory):
    return write_dicom(tmp_path_factory.mktemp("cli") / "loop.dcm", FRAMES)


def _json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_source_json_and_text(dicom_file, capsys):
    assert main(["source", f"dicom:{dicom_file}", "--frames", "4", "--json", "-o", "realtime=false"]) == 0
    out = _json_out(capsys)
    assert out["frames"] == 4 and (out["height"], out["width"]) == (40, 48) and out["dtype"] == "uint8"
    assert out["fps"] == pytest.approx(25.0) and out["spacing_mm"] == pytest.approx([0.3, 0.3])
    assert out["read_ms_mean"] > 0 and out["has_pose"] is False
    assert main(["source", f"dicom:{dicom_file}", "--frames", "10", "-o", "realtime=false"]) == 0
    text = capsys.readouterr().out
    assert "frame size  40x48 (HxW) uint8" in text and "6 read, 0 timeouts, end of stream" in text


def test_clear_errors_not_tracebacks(tmp_path, capsys):
    assert main(["source", f"video:{tmp_path / 'missing.mp4'}"]) == 1
    assert "error: video file not found" in capsys.readouterr().err
    assert main(["source", "dicom:x.dcm", "-o", "loop"]) == 1
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["source", f"dicom:{tmp_path}/x.dcm", "-o", "colour=blue"]) == 1
    assert "bad source option" in capsys.readouterr().err
    assert main(["source", "nosuchkind:1"]) == 1
    assert "known kinds" in capsys.readouterr().err


def test_record_then_replay(dicom_file, tmp_path, capsys):
    out = tmp_path / "session"
    assert main(["record", f"dicom:{dicom_file}", "--out", str(out), "--frames", "4", "-o", "realtime=false"]) == 0
    assert "recorded 4 frames" in capsys.readouterr().out
    session = json.loads((out / "session.json").read_text())
    assert session["meta"]["spec"] == f"dicom:{dicom_file}" and session["frames"] == 4
    assert main(["source", f"rec:{out}", "--frames", "10", "--json"]) == 0
    got = _json_out(capsys)
    assert got["frames"] == 4 and got["end_of_stream"] and got["spacing_mm"] == pytest.approx([0.3, 0.3])


def test_stream_serves_images_and_pose(tmp_path):
    session = write_recording(tmp_path / "posed", FRAMES, fps=50.0)
    proc = subprocess.Popen([sys.executable, "-m", "edge_app.cli", "stream", f"rec:{session}", "--port", "0",
                             "--frames", "200", "--wait-client", "10", "-o", "loop=true", "-o", "realtime=true"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        line = proc.stdout.readline()
        assert "serving rec:posed on 127.0.0.1:" in line, line + proc.stderr.read()
        port = int(line.split("127.0.0.1:")[1].split()[0])
        with IGTLinkSource("127.0.0.1", port, connect_timeout_s=5) as src:
            frames = [f for f in (src.read(timeout=2.0) for _ in range(5)) if f is not None]
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    assert len(frames) >= 3
    assert any(np.array_equal(frames[-1].image, f) for f in FRAMES)
    poses = [f.pose for f in frames if f.pose is not None]
    assert poses and poses[-1][0, 3] in range(len(FRAMES))  # write_recording's pose: x = frame number


def test_bench_sources_small(capsys):
    assert main(["bench", "sources", "--frames", "3", "--size", "32x48", "--json"]) == 0
    results = _json_out_multiline(capsys)["results"]
    kinds = {r["kind"] for r in results}
    assert kinds == {"video", "dicom", "rec", "igtl"}
    assert len(results) == 11 and all(r["frames"] == 3 and r["fps"] > 0 for r in results), results


def _json_out_multiline(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_sim_smoke(capsys):
    assert main(["source", "sim", "--frames", "3", "--json", "-o", "realtime=false"]) == 0
    out = _json_out(capsys)
    assert out["frames"] == 3 and out["has_pose"] is True


@settings(max_examples=25, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
                       st.one_of(st.booleans(), st.integers(-1000, 1000), st.sampled_from(["Image", "MJPG"])),
                       max_size=5))
def test_parse_options_property(options):
    pairs = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()]
    assert parse_options(pairs) == options


def test_devices_import_stays_light():
    code = ("import sys, devices, devices.cli, devices.video, devices.dicom, devices.igtl, devices.recorder, "
            "devices.sector\nheavy = [m for m in ('torch', 'pydicom', 'pyigtl', 'kivy', 'onnxruntime') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout
