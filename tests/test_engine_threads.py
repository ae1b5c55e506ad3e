"""Threaded engine: latest-frame mailbox, drops, end of source, source errors, replay determinism."""
import threading
import time

import pytest

from devices.base import SourceError
from edge_app.engine import EngineConfig, GuidanceEngine, Mailbox
from helpers_engine import ListSource, ScriptedPredictor, frames, make_output


def test_mailbox_keeps_only_the_newest_and_counts_drops():
    box = Mailbox()
    assert box.get(timeout=0.01) is None
    box.put(1)
    box.put(2)
    box.put(3)
    assert box.dropped == 2 and box.get(0.01) == 3 and box.get(0.01) is None


def test_mailbox_wait_mode_never_drops():
    box = Mailbox()
    got = []

    def consumer():
        for _ in range(50):
            item = box.get(1.0)
            got.append(item)
            time.sleep(0.001)

    t = threading.Thread(target=consumer)
    t.start()
    for i in range(50):
        box.put(i, wait=True)
    t.join(5)
    assert got == list(range(50)) and box.dropped == 0


def test_live_mode_drops_stale_frames_when_inference_is_slow():
    source = ListSource(frames(60, fps=200.0), fps=200.0)      # 5 ms per frame
    predictor = ScriptedPredictor(sleep_s=0.02)                  # 20 ms per inference
    engine = GuidanceEngine(source, predictor, EngineConfig(latency_budget_ms=1000))
    engine.start()
    assert engine.wait(10)
    engine.stop()
    st = engine.stats
    assert st.received == 60
    assert engine.latest().dropped_frames > 20                    # most frames skipped, none queued
    assert st.processed + engine.latest().dropped_frames == 60
    assert st.wait_ms.values().max() < 30                                   # a processed frame never waited behind others


def test_replay_mode_processes_every_frame():
    source = ListSource(frames(40, fps=30.0))
    engine = GuidanceEngine(source, ScriptedPredictor(sleep_s=0.002),
                            EngineConfig(time_base="source", drop_stale=False))
    engine.start()
    assert engine.wait(10)
    engine.stop()
    assert engine.stats.processed == 40 and engine.latest().dropped_frames == 0


def test_end_of_source_is_reported():
    engine = GuidanceEngine(ListSource(frames(5)), ScriptedPredictor(), EngineConfig(drop_stale=False))
    engine.start()
    assert engine.wait(5)
    engine.stop()
    s = engine.latest()
    assert engine.source_ended and engine.error is None
    assert s.state == "NO_SIGNAL" and s.reasons == ("the source has no more frames",)


def test_source_error_is_reported_not_swallowed():
    engine = GuidanceEngine(ListSource(frames(10), error_at=3), ScriptedPredictor(), EngineConfig(drop_stale=False))
    engine.start()
    assert engine.wait(5)
    engine.stop()
    assert isinstance(engine.error, SourceError)
    assert engine.latest().reasons == ("source error: fake stream disconnected: check the cable",)


def test_predictor_crash_stops_the_engine_with_the_reason():
    def boom(image, call):
        raise RuntimeError("onnxruntime failed")

    engine = GuidanceEngine(ListSource(frames(10)), ScriptedPredictor(script=boom), EngineConfig(drop_stale=False))
    engine.start()
    assert engine.wait(5)
    engine.stop()
    assert isinstance(engine.error, RuntimeError)
    assert engine.latest().reasons == ("engine error: onnxruntime failed",)


def test_latest_never_blocks_while_a_step_holds_the_lock():
    engine = GuidanceEngine(None, ScriptedPredictor())
    held = threading.Event()
    release = threading.Event()

    def hog():
        with engine._lock:
            held.set()
            release.wait(2)

    t = threading.Thread(target=hog)
    t.start()
    held.wait(1)
    t0 = time.perf_counter()
    state = engine.latest()
    assert time.perf_counter() - t0 < 0.01 and state.state == "NO_SIGNAL"
    release.set()
    t.join()


def _script(image, call):
    # Outputs driven by the frame content so replays are reproducible whatever the thread timing.
    level = float(image.mean())
    return make_output("A4C", 0.9, quality=min(0.95, level / 60.0),
                       action="ROTATE_CW" if int(level) % 2 else "SLIDE_HEAD")


def _trace(states):
    return [(s.frame_index, s.state, s.action, s.instruction, round(s.quality, 6)) for s in states]


def test_replay_at_max_speed_matches_the_synchronous_run():
    clip = frames(90, fps=30.0)
    sync = GuidanceEngine(None, ScriptedPredictor(script=_script), EngineConfig())
    expected = _trace([sync.process(f) for f in clip])

    runs = []
    for _ in range(2):
        engine = GuidanceEngine(ListSource(clip), ScriptedPredictor(script=_script),
                                EngineConfig(time_base="source", drop_stale=False))
        q = engine.subscribe()
        engine.start()
        assert engine.wait(10)
        engine.stop()
        states = []
        while not q.empty():
            states.append(q.get())
        runs.append(_trace([s for s in states if s.frame_index >= 0 and s.reasons != ("the source has no more frames",)]))
    assert runs[0] == runs[1] == expected


def test_start_without_source_is_a_clear_error():
    with pytest.raises(ValueError, match="no source"):
        GuidanceEngine(None, ScriptedPredictor()).start()


def test_stats_history_is_fixed_size():
    from edge_app.engine import _Ring

    ring = _Ring(3)
    assert ring.values().size == 0
    for v in range(5):
        ring.append(v)
    assert ring.values().tolist() == [2, 3, 4] and len(ring) == 3
