"""What the bedside screen says for each guidance state (no window needed)."""
import math
import subprocess
import sys

import pytest

from devices.labels import ACTION_TEXT, ACTIONS, QUALITY_DIAGNOSTIC
from edge_app.ui import _window_size
from edge_app.ui.display import (
    ICON_CAPTURED, ICON_SEARCHING, ICON_UNAVAILABLE, KEYMAP, capture_label, describe, is_practice_source,
)
from tests.helpers_ui import FakeProbe, FakeState

MOVES = [a for a in ACTIONS if a != "HOLD"]


def test_no_state_yet_is_unavailable_with_a_reason():
    d = describe(None)
    assert d.kind == "unavailable" and d.icon == ICON_UNAVAILABLE
    assert d.banner.startswith("Guidance unavailable: ") and len(d.banner) > len("Guidance unavailable: ")


@pytest.mark.parametrize("action", [None, "SLIDE_HEAD", "HOLD"])
def test_unavailable_never_shows_an_arrow(action):
    state = FakeState(available=False, action=action, reasons=("frozen image", "model unsure"), instruction="")
    d = describe(state)
    assert d.icon == ICON_UNAVAILABLE and d.kind == "unavailable"
    assert d.banner == "Guidance unavailable: frozen image; model unsure"


def test_engine_sentence_is_kept_when_unavailable():
    state = FakeState(available=False, reasons=("no new frame for 1.2 s",),
                      instruction="Guidance unavailable: no new frame for 1.2 s")
    assert describe(state).banner == "Guidance unavailable: no new frame for 1.2 s"


@pytest.mark.parametrize("action", MOVES)
def test_each_move_gets_its_own_icon_and_sentence(action):
    d = describe(FakeState(state="GUIDING", available=True, reasons=(), action=action, instruction="",
                           magnitude=2.0))
    assert (d.kind, d.icon, d.banner) == ("guide", action, ACTION_TEXT[action])
    assert d.caption == f"{action.split('_')[0].capitalize()}: large move"


@pytest.mark.parametrize("magnitude,word", [(0.2, "small"), (1.0, "medium"), (3.0, "large")])
def test_caption_grades_the_distance(magnitude, word):
    d = describe(FakeState(state="GUIDING", available=True, action="ROTATE_CW", magnitude=magnitude))
    assert word in d.caption


def test_hold_captured_and_searching():
    hold = describe(FakeState(state="HOLD", available=True, action="HOLD", instruction="Hold still",
                              hold_progress=0.4))
    assert (hold.kind, hold.icon, hold.hold_progress) == ("hold", "HOLD", 0.4)
    cap = describe(FakeState(state="CAPTURED", available=True, action="HOLD", instruction="A4C captured"))
    assert (cap.kind, cap.icon, cap.banner) == ("captured", ICON_CAPTURED, "A4C captured")
    search = describe(FakeState(state="SEARCHING", available=True, action=None, instruction="Looking for A4C"))
    assert (search.kind, search.icon, search.banner) == ("searching", ICON_SEARCHING, "Looking for A4C")


def test_quality_is_clamped_and_nan_safe():
    assert describe(FakeState(quality=1.7)).quality == 1.0
    assert describe(FakeState(quality=-0.3)).quality == 0.0
    assert describe(FakeState(quality=math.nan)).quality == 0.0
    assert describe(FakeState(quality_threshold=None)).threshold == QUALITY_DIAGNOSTIC


def test_meter_marks_the_capture_level_when_the_engine_gives_one():
    """The line on the meter is where auto-capture starts, not the bare diagnostic threshold."""
    from dataclasses import asdict
    from types import SimpleNamespace

    state = SimpleNamespace(**asdict(FakeState(quality_threshold=0.6)), capture_level=0.8)
    assert describe(state).threshold == 0.8
    assert describe(FakeState(quality_threshold=0.6)).threshold == 0.6   # older engines: the threshold


def test_view_text_and_protocol_progress():
    d = describe(FakeState(view="A4C", view_confidence=0.874, protocol=("PLAX", "PSAX"), protocol_step=1))
    assert d.view_text == "Seeing: A4C  87%"
    assert d.protocol_text == "Protocol 2/2: PSAX"
    assert describe(FakeState(protocol=("PLAX",), protocol_step=1)).protocol_text.startswith("Protocol done")
    assert describe(FakeState(view="OTHER")).view_text == "Seeing: no standard view"
    assert describe(FakeState(protocol=())).protocol_text == ""


def test_status_line_names_source_fps_latency_model_precision_drops():
    d = describe(FakeState(source_name="sim", fps=29.7, latency_ms=8.4, model_name="pocusnet_s",
                           precision="int8", dropped_frames=3))
    for part in ("sim", "30 fps", "latency 8 ms", "pocusnet_s (int8)", "dropped 3"):
        assert part in d.status_text


def test_keymap_covers_every_move_once_with_the_documented_keys():
    actions = [a for a, _ in KEYMAP.values()]
    assert sorted(actions) == sorted(MOVES)
    assert {k for k, (a, _) in KEYMAP.items() if a.startswith("SLIDE")} == {"up", "down", "left", "right"}
    assert {KEYMAP["q"][0], KEYMAP["e"][0]} == {"ROTATE_CW", "ROTATE_CCW"}
    assert {KEYMAP["w"][0], KEYMAP["s"][0]} == {"TILT_MARKER", "TILT_AWAY"}
    assert {KEYMAP["a"][0], KEYMAP["d"][0]} == {"ROCK_MARKER", "ROCK_AWAY"}
    # the key points where the pictogram's arrow points: patient's left is the screen's right
    assert KEYMAP["right"][0] == "SLIDE_LEFT" and KEYMAP["up"][0] == "SLIDE_HEAD"


def test_practice_mode_only_for_a_movable_probe():
    assert is_practice_source(FakeProbe(size=32))
    assert not is_practice_source(None)
    assert not is_practice_source(object())


def test_window_size_parsing():
    from types import SimpleNamespace
    assert _window_size(SimpleNamespace(window_size="1920x1080")) == (1920, 1080)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        _window_size(SimpleNamespace(window_size="big"))
    with pytest.raises(ValueError, match="too small"):
        _window_size(SimpleNamespace(window_size="100x80"))


def test_importing_the_ui_package_does_not_import_kivy():
    code = "import sys, edge_app.ui, edge_app.ui.display; assert 'kivy' not in sys.modules, 'kivy imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_engine_start_error_surfaces_before_any_window():
    code = (
        "import sys\n"
        "from devices.base import SourceNotFound\n"
        "from edge_app.ui import run_ui\n"
        "class E:\n"
        "    source = None\n"
        "    def start(self): raise SourceNotFound('clip.mp4: no such file')\n"
        "    def stop(self): raise AssertionError('stop without start')\n"
        "try:\n"
        "    run_ui(E(), None)\n"
        "except SourceNotFound as e:\n"
        "    assert 'kivy.core.window' not in sys.modules, 'a window was opened'\n"
        "    print('OK', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "KIVY_NO_ARGS": "1", "KIVY_NO_CONSOLELOG": "1"})
    assert "OK clip.mp4: no such file" in out.stdout, out.stderr[-2000:]


def test_fake_state_matches_the_engine_state_fields():
    engine = pytest.importorskip("edge_app.engine", reason="edge_app.engine not written yet")
    real = set(engine.GuidanceState.__dataclass_fields__)
    fake = set(FakeState.__dataclass_fields__)
    assert fake <= real, f"the UI reads fields the engine does not publish: {fake - real}"


def test_the_clip_list_says_how_each_clip_was_taken():
    from edge_app.engine import Capture

    assert capture_label(Capture("A4C", 0.874, None, 1.0)) == "[b]A4C[/b]  q 0.87"
    assert capture_label(Capture("PSAX", 0.78, None, 1.0, best_achievable=True)) == "[b]PSAX[/b]  q 0.78  best achievable"
    assert capture_label(Capture("PLAX", 0.5, None, 1.0, auto=False)) == "[b]PLAX[/b]  q 0.50  manual"
