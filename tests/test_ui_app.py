"""The real Kivy app under Xvfb: screenshots of the window, checked pixel by pixel.

Each fixture starts the app once in a subprocess (tests/helpers_ui.py is the launcher) on the
simulator, through the real
GuidanceEngine when edge_app.engine imports, and reads back the screenshots the app saves
(POCUS_UI_SCREENSHOT_DIR) with a JSON sidecar saying what was shown and where.
"""
import os
import shutil
import signal
import time

import numpy as np
import pytest

from edge_app.ui.display import COLORS, ICON_CAPTURED, ICON_SEARCHING, ICON_UNAVAILABLE
from tests.helpers_ui import color_mask, crop, load_shots, run_app

pytestmark = [
    pytest.mark.ui,
    pytest.mark.skipif(shutil.which("xvfb-run") is None,
                       reason="xvfb-run is missing (apt-get install xvfb xauth libgl1 libgl1-mesa-dri)"),
]


def _ok(proc) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "RUN_UI_RETURNED 0" in out and "ENGINE_STOPPED" in out, out[-3000:]
    return out


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A novice in practice mode: follows the arrow with the keyboard, then taps CAPTURE."""
    out = tmp_path_factory.mktemp("ui_live")
    proc = run_app(out, "--source", "auto", "--engine", "auto", "--follow", "1.0:5.5",
                   "--tap", "2.0:record_button,4.0:record_button,6.0:capture_button",
                   "--record-base", str(out / "rec"), exit_after_s=7.5, every_s=0.5)
    return _ok(proc), load_shots(out), out / "rec"


@pytest.fixture(scope="module")
def stalled(tmp_path_factory):
    """The source stops producing frames after 2 s; the window is then closed with SIGTERM (SDL quit)."""
    out = tmp_path_factory.mktemp("ui_stall")
    proc = run_app(out, "--source", "auto", "--engine", "auto", "--stall-after-s", "2.0",
                   "--tap", "0.5:protocol_button", "--pid-file",
                   str(out / "pid"), exit_after_s=None, every_s=0.5, background=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "shot_009.json").exists():  # about 5 s of window time
            assert proc.poll() is None and time.monotonic() < deadline, "the app did not get going"
            time.sleep(0.2)
        t_close = time.monotonic()
        os.kill(int((out / "pid").read_text()), signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=20)
        close_s = time.monotonic() - t_close
    finally:
        if proc.poll() is None:
            proc.kill()
    proc.stderr = ""
    proc.stdout = stdout
    return _ok(proc), load_shots(out), close_s


@pytest.fixture(scope="module")
def icons(tmp_path_factory):
    """Every icon the instruction can show, on a 1920x1080 screen (scripted: one state per shot)."""
    out = tmp_path_factory.mktemp("ui_icons")
    proc = run_app(out, "--engine", "icons", "--source", "fake", size="1920x1080", exit_after_s=None,
                   every_s=0.3, env={"POCUS_UI_EXIT_AFTER_SHOTS": "15"})
    return _ok(proc), load_shots(out)


def _gray_fraction(pixels: np.ndarray) -> float:
    p = pixels.astype(np.int16)
    return float(np.mean((np.abs(p[..., 0] - p[..., 1]) <= 2) & (np.abs(p[..., 1] - p[..., 2]) <= 2)))


# ---------------------------------------------------------------------------------------------
# live run
# ---------------------------------------------------------------------------------------------

def test_live_image_is_shown_and_moves(live):
    _, shots, _ = live
    assert len(shots) >= 10
    seen = [(rgb, info) for rgb, info in shots if info["state"] and info["state"]["frame_index"] >= 0]
    assert len(seen) >= 8, "the image never appeared"
    (a, ia), (b, ib) = seen[0], seen[-1]
    assert ia["rects"]["image"] == ib["rects"]["image"]
    x, y, w, h = ia["rects"]["image"]
    assert w >= 400 and h >= 400, f"image drawn too small: {w}x{h} px"
    icon = ia["rects"]["icon"]
    assert icon[0] + icon[2] <= x, f"the instruction icon covers the image on a 1280x800 window: {ia['rects']}"
    img_a, img_b = crop(a, [x, y, w, h]), crop(b, [x, y, w, h])
    assert _gray_fraction(img_a) > 0.97, "the live image is not grayscale where it is drawn"
    assert img_a.std() > 10, "the live image region is flat"
    assert np.abs(img_a.astype(np.int16) - img_b.astype(np.int16)).mean() > 2, "the image did not change"
    assert ib["state"]["frame_index"] > ia["state"]["frame_index"]


def test_texture_is_created_once_and_updated_in_place(live):
    info = live[1][-1][1]  # the last screenshot
    assert info["texture_creations"] == 1
    # Software GL (llvmpipe under Xvfb) on a busy 2-core box draws only a few frames per second;
    # every drawn frame should still show a new image.
    assert info["blits"] >= 10, info["blits"]
    assert info["tick_ms_mean"] < 15, f"UI tick too slow: {info['tick_ms_mean']:.1f} ms"


def test_instruction_icon_colour_follows_the_state(live):
    _, shots, _ = live
    kinds = set()
    for rgb, info in shots:
        kind = info["display"]["kind"]
        kinds.add(kind)
        icon = crop(rgb, info["rects"]["icon"])
        yellow = color_mask(icon, COLORS["arrow"]).mean()
        green = color_mask(icon, COLORS["hold"]).mean()
        amber = color_mask(icon, COLORS["unavailable"], tol=25).mean()
        if kind == "guide":
            assert yellow > 0.02, f"no arrow drawn for {info['display']['icon']} ({yellow:.3f})"
        elif kind in ("hold", "captured"):
            assert green > 0.03 and yellow < 0.002, (kind, green, yellow)
        elif kind == "unavailable":
            assert amber > 0.02 and yellow < 0.002, (amber, yellow)
    assert "guide" in kinds and ({"hold", "captured"} & kinds), f"the novice never reached the view: {kinds}"


def test_following_the_arrows_reaches_the_view_and_captures(live):
    out, shots, _ = live
    infos = [info for _, info in shots]
    q = [i["display"]["quality"] for i in infos if i["display"]["kind"] != "unavailable"]
    assert max(q) >= infos[-1]["display"]["threshold"] > q[0], f"quality never got diagnostic: {q}"
    assert infos[-1]["captures_shown"] >= 2, "auto capture + CAPTURE tap should give two tiles"


def _check_meter(shots):
    for rgb, info in shots:
        d = info["display"]
        x, y, w, h = info["rects"]["meter_bar"]
        column = crop(rgb, [x + w // 2, y, 1, h])[:, 0]                           # top to bottom
        color = (COLORS["muted"] if d["kind"] == "unavailable" else
                 COLORS["quality_ok"] if d["quality"] >= d["threshold"] else COLORS["quality_low"])
        filled = color_mask(column, color, tol=30).mean()
        assert abs(filled - d["quality"]) < 0.05, f"bar shows {filled:.2f}, state says {d['quality']:.2f}"
        tick_row = y + round(h * (1 - d["threshold"]))
        tick = crop(rgb, [x + w + 4, tick_row - 3, 3, 7])                          # beside the bar
        assert color_mask(tick, COLORS["threshold"], tol=30).any(), "threshold mark missing"


def test_quality_meter_fill_and_threshold_match_the_state(live):
    _check_meter(live[1])


def test_record_button_starts_and_stops_a_session_recording(live):
    out, shots, rec = live
    if "FakeEngine" in out:
        pytest.skip("edge_app.engine is not available: the fake engine records nothing")
    assert any(i["display"]["recording"] for _, i in shots), "RECORD never showed as recording"
    assert not shots[-1][1]["display"]["recording"], "the second tap did not stop the recording"
    sessions = list(rec.glob("session_*"))
    assert len(sessions) == 1, sessions
    lines = (sessions[0] / "frames.jsonl").read_text().splitlines()
    assert 20 <= len(lines) <= 90, f"{len(lines)} frames for about 2 s of recording"


def test_touch_targets_are_at_least_48_px(live):
    min_w, min_h = live[1][-1][1]["min_touch_px"]
    assert min_w >= 48 and min_h >= 48, (min_w, min_h)


# ---------------------------------------------------------------------------------------------
# source stops, window closed
# ---------------------------------------------------------------------------------------------

def test_stalled_source_shows_guidance_unavailable(stalled):
    _, shots, _ = stalled
    first, last = shots[0][1], shots[-1]
    assert first["display"]["kind"] != "unavailable" or first["state"]["frame_index"] < 0
    rgb, info = last
    d = info["display"]
    assert d["kind"] == "unavailable" and d["banner"].startswith("Guidance unavailable: ")
    assert "frame" in d["banner"], d["banner"]  # "no new frame for X s" (or the fake engine's wording)
    banner = crop(rgb, info["rects"]["banner"])
    assert color_mask(banner, COLORS["unavailable"], tol=25).mean() > 0.6, "banner is not amber"
    icon = crop(rgb, info["rects"]["icon"])
    assert color_mask(icon, COLORS["unavailable"], tol=25).mean() > 0.02
    assert color_mask(icon, COLORS["arrow"]).mean() < 0.002, "an arrow is still drawn"
    _check_meter(shots)  # greyed out while unavailable


def test_protocol_button_starts_the_protocol_and_lights_its_first_view(stalled):
    _, shots, _ = stalled
    rgb, info = shots[-1]
    d = info["display"]
    assert d["target"] == "PLAX" and d["protocol_text"] == "Protocol 1/5: PLAX", d
    def blueness(view):  # Kivy's pressed toggle button is blue, the others grey
        px = crop(rgb, info["rects"][f"target_{view}"]).astype(int)
        return float(np.mean(px[..., 2] - px[..., 0]))
    assert blueness("PLAX") > 60 and abs(blueness("A4C")) < 20, (blueness("PLAX"), blueness("A4C"))


def test_closing_the_window_stops_the_engine_promptly(stalled):
    out, _, close_s = stalled
    assert close_s < 10, f"closing took {close_s:.1f} s"


# ---------------------------------------------------------------------------------------------
# every icon, big screen
# ---------------------------------------------------------------------------------------------

ICON_COLOR = {ICON_UNAVAILABLE: "unavailable", ICON_SEARCHING: "searching", ICON_CAPTURED: "hold", "HOLD": "hold"}


def test_every_icon_is_drawn_in_its_colour(icons):
    _, shots = icons
    assert shots[0][1]["window"] == [1920, 1080]
    assert shots[0][0].shape[:2] == (1080, 1920)
    seen = {}
    for rgb, info in shots:
        name = info["display"]["icon"]
        icon = crop(rgb, info["rects"]["icon"])
        color = COLORS[ICON_COLOR.get(name, "arrow")]
        share = color_mask(icon, color, tol=25).mean()
        assert share > 0.02, f"{name}: only {share:.3f} of the icon in its colour"
        if name in ICON_COLOR:
            assert color_mask(icon, COLORS["arrow"], tol=25).mean() < 0.002, f"{name} shows an arrow"
        seen[name] = color_mask(icon, color, tol=25)
    expected = {"SLIDE_HEAD", "SLIDE_FEET", "SLIDE_LEFT", "SLIDE_RIGHT", "ROTATE_CW", "ROTATE_CCW",
                "TILT_MARKER", "TILT_AWAY", "ROCK_MARKER", "ROCK_AWAY", "HOLD", ICON_CAPTURED,
                ICON_SEARCHING, ICON_UNAVAILABLE}
    assert expected <= set(seen), f"never shown: {expected - set(seen)}"
    moves = sorted(n for n in seen if n not in ICON_COLOR)
    for i, a in enumerate(moves):  # every instruction looks different from every other
        for b in moves[i + 1:]:
            iou = (seen[a] & seen[b]).sum() / max((seen[a] | seen[b]).sum(), 1)
            assert iou < 0.8, f"{a} and {b} look alike (IoU {iou:.2f})"


def _centroid(mask):
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean()


def test_arrows_point_the_right_way(icons):
    _, shots = icons
    last = {info["display"]["icon"]: (rgb, info) for rgb, info in shots}
    for name, (dx, dy) in {"SLIDE_HEAD": (0, -1), "SLIDE_FEET": (0, 1), "SLIDE_LEFT": (1, 0),
                           "SLIDE_RIGHT": (-1, 0)}.items():
        rgb, info = last[name]
        icon = crop(rgb, info["rects"]["icon"])
        px, py = _centroid(color_mask(icon, COLORS["marker"], tol=25))     # the probe on the body
        ax, ay = _centroid(color_mask(icon, COLORS["arrow"], tol=25))      # the arrow
        # screen: head up, patient's left on the screen's right (patient seen from the front)
        assert (ax - px) * dx + (ay - py) * dy > 10, f"{name} arrow points the wrong way"
    for name, side in {"TILT_MARKER": 1, "ROCK_MARKER": 1, "TILT_AWAY": -1, "ROCK_AWAY": -1}.items():
        rgb, info = last[name]
        icon = crop(rgb, info["rects"]["icon"])
        ax, _ = _centroid(color_mask(icon, COLORS["arrow"], tol=25))
        assert (ax - icon.shape[1] / 2) * side > 5, f"{name} swings to the wrong side"


def test_blind_frame_shows_the_move_over_the_black_image_and_says_why(icons):
    from edge_app.engine import NO_HEART_IN_VIEW
    rgb, info = icons[1][-1]     # icon_states' last state: an arrow on a blind (all black) frame
    assert info["display"]["banner"].startswith(NO_HEART_IN_VIEW)
    icon = crop(rgb, info["rects"]["icon"])
    assert color_mask(icon, COLORS["arrow"], tol=25).mean() > 0.02, "no arrow drawn on the blind frame"
    assert crop(rgb, info["rects"]["image"]).mean() < 10, "the black frame is not what the image shows"


def test_big_screen_layout_fits_and_does_not_overlap(icons):
    _, shots = icons
    info = shots[-1][1]
    W, H = info["window"]
    r = info["rects"]
    for name, (x, y, w, h) in r.items():
        assert 0 <= x and 0 <= y and x + w <= W and y + h <= H, f"{name} is off screen: {r[name]}"
    image, meter = r["image"], r["meter_bar"]
    assert image[0] + image[2] <= meter[0], "the quality meter covers the image"
    assert r["icon"][0] + r["icon"][2] <= image[0], f"the instruction icon covers the image: {r}"
    assert image[3] >= 0.6 * H, f"image only {image[3]} px tall on a {H} px screen"
    assert min(info["min_touch_px"]) >= 48


# ---------------------------------------------------------------------------------------------
# through the real command line: `pocus app` opens this UI when a display exists
# ---------------------------------------------------------------------------------------------

def test_pocus_app_opens_the_window_and_shows_the_end_of_a_clip(tmp_path):
    pytest.importorskip("edge_app.app_cli", reason="`pocus app` (edge_app/app_cli.py) not written yet")
    import subprocess
    import sys

    import cv2

    from tests.helpers_ui import ROOT, FakeProbe
    probe = FakeProbe(size=128)
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 30, (128, 128), False)
    for i in range(90):  # 3 s: the arrow must still show after a slow start on a loaded machine
        writer.write(probe.render(probe.pose, i / 30))
    writer.release()
    shots = tmp_path / "shots"
    env = dict(os.environ, KIVY_NO_ARGS="1", KIVY_NO_CONSOLELOG="1", KIVY_HOME=str(tmp_path / "kivy"),
               POCUS_UI_SCREENSHOT_DIR=str(shots), POCUS_UI_SCREENSHOT_EVERY_S="0.5", POCUS_UI_EXIT_AFTER_S="5.5",
               PYTHONPATH=str(ROOT), LP_NUM_THREADS="1")
    cmd = ["xvfb-run", "-a", "-s", "-screen 0 1280x800x24", sys.executable, "-m", "edge_app.cli", "app",
           "--source", f"video:{clip}", "--predictor", "tests.helpers_ui:make_constant_predictor",
           "--captures", str(tmp_path / "captures")]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "headless" not in proc.stderr, "pocus app did not open the window"
    got = load_shots(shots)
    icons_seen = [info["display"]["icon"] for _, info in got]
    assert "ROTATE_CW" in icons_seen, icons_seen
    rgb, info = next((r, i) for r, i in got if i["display"]["icon"] == "ROTATE_CW")
    assert color_mask(crop(rgb, info["rects"]["icon"]), COLORS["arrow"]).mean() > 0.02
    assert not info["practice"], "a video file is not a movable probe: no practice bar"
    from edge_app.safety import REASON_ENDED
    assert got[-1][1]["display"]["banner"] == f"Guidance unavailable: {REASON_ENDED}"
