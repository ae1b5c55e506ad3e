"""VideoSource on real AVI/MP4 files written by OpenCV, plus bad input and live (grabber) mode."""
from __future__ import annotations

import time

import numpy as np
import pytest

from devices.base import CorruptData, EndOfStream, SourceNotFound, create_source
from devices.bench import scanner_screen, write_video
from devices.video import Mailbox, VideoSource, _parse_target
from helpers_devices import frame_number, numbered_frames

N = 12


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video")
    frames = numbered_frames(N, 48, 64)
    return frames, {ext: write_video(folder / f"clip.{ext}", frames, fps=25.0) for ext in ("avi", "mp4")}


@pytest.mark.parametrize("ext", ["avi", "mp4"])
def test_file_round_trip(clips, ext):
    frames, paths = clips
    with create_source(f"video:{paths[ext]}", realtime=False) as src:
        got = list(src)
    assert src.fps == pytest.approx(25.0)
    assert len(got) == N
    assert [f.index for f in got] == list(range(N))
    assert [f.t for f in got] == pytest.approx([i / 25.0 for i in range(N)])
    for f, ref in zip(got, frames):
        assert f.image.shape == (48, 64) and f.image.dtype == np.uint8
        assert np.abs(f.image.astype(int) - ref).mean() < 3.0  # lossy codecs, but close
    assert [frame_number(f.image) for f in got] == list(range(N))


def test_end_of_stream_then_loop(clips):
    _, paths = clips
    src = VideoSource(str(paths["avi"]), realtime=False).open()
    for _ in range(N):
        src.read()
    with pytest.raises(EndOfStream):
        src.read()
    src.close()
    with VideoSource(str(paths["avi"]), realtime=False, loop=True) as src:
        got = [src.read() for _ in range(2 * N + 3)]
    assert [frame_number(f.image) for f in got] == [i % N for i in range(2 * N + 3)]
    ts = [f.t for f in got]
    assert all(b > a for a, b in zip(ts, ts[1:])), "time keeps increasing across loops"


def test_realtime_pacing(clips):
    _, paths = clips
    t0 = time.monotonic()
    with VideoSource(str(paths["mp4"]), realtime=True) as src:
        for _ in range(6):
            src.read()
    paced = time.monotonic() - t0
    assert paced >= 5 / 25.0 * 0.9  # 6 frames at 25 fps: 5 periods


def test_missing_empty_junk_and_truncated(tmp_path, clips):
    _, paths = clips
    with pytest.raises(SourceNotFound, match="not found"):
        VideoSource(str(tmp_path / "nope.mp4")).open()
    empty = tmp_path / "empty.avi"
    empty.write_bytes(b"")
    with pytest.raises(CorruptData, match="empty"):
        VideoSource(str(empty)).open()
    junk = tmp_path / "junk.avi"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(CorruptData, match=str(junk)):
        VideoSource(str(junk)).open()
    cut_mp4 = tmp_path / "cut.mp4"
    cut_mp4.write_bytes(paths["mp4"].read_bytes()[:-200])  # the index (moov) is at the end
    with pytest.raises(CorruptData, match="cut.mp4"):
        VideoSource(str(cut_mp4)).open()
    cut_avi = tmp_path / "cut.avi"
    data = paths["avi"].read_bytes()
    cut_avi.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptData, match=r"cut.avi.*truncated"):
        with VideoSource(str(cut_avi), realtime=False) as src:
            for _ in range(N + 1):
                src.read()


def test_spec_kinds():
    assert _parse_target("0") == ("camera", 0)
    assert _parse_target("rtsp://10.0.0.2/live") == ("url", "rtsp://10.0.0.2/live")
    assert _parse_target("/dev/video2") == ("device", "/dev/video2")
    assert _parse_target("clip.mp4") == ("file", "clip.mp4")
    assert VideoSource("rtsp://x/y").live and not VideoSource("a.mp4").live


def test_absent_camera_is_not_found():
    with pytest.raises(SourceNotFound, match="camera 9"):
        VideoSource(9).open()


def test_live_mode_keeps_only_newest(tmp_path):
    frames = numbered_frames(30, 32, 32)
    path = write_video(tmp_path / "live.avi", frames, fps=100.0)
    with VideoSource(str(path), live=True, realtime=True) as src:
        first = src.read(timeout=2.0)
        time.sleep(0.25)  # ~25 frames arrive while we are "busy"
        newest = src.read(timeout=2.0)
        assert frame_number(newest.image) - frame_number(first.image) >= 6, "stale frames were queued"
        assert src.dropped >= 5
        got = []
        with pytest.raises(EndOfStream):
            for _ in range(100):
                f = src.read(timeout=2.0)
                if f is not None:
                    got.append(frame_number(f.image))
    assert got == sorted(got) and len(set(got)) == len(got), "never the same frame twice"


def test_mailbox_timeout_returns_none_quickly():
    box = Mailbox()
    t0 = time.monotonic()
    assert box.take(0.05) is None
    assert time.monotonic() - t0 < 0.5
    box.put(1)
    box.put(2)
    assert box.take(0) == 2 and box.dropped == 1
    assert box.take(0) is None


def test_crop_sector_on_screen_capture(tmp_path):
    screens, geo = [], None
    for i in range(20):
        img, geo = scanner_screen(i / 30.0)
        screens.append(img)
    path = write_video(tmp_path / "screen.avi", np.stack(screens), fps=30.0)
    with VideoSource(str(path), realtime=False, crop_sector=True) as src:
        out = [f.image for f in src]
    x0, y0, x1, y1 = geo.bbox
    final = out[-1]
    assert abs(final.shape[0] - (y1 - y0)) <= 6 and abs(final.shape[1] - (x1 - x0)) <= 6
    assert final[0, 0] == 0 and final[0, -1] == 0, "corners outside the fan are blanked"
    assert len({o.shape for o in out}) == 1, "files are cropped from the first frame on"
    assert len(out) == 20 and all(o[0, 0] == 0 for o in out)


def test_network_stream_reconnects_after_it_ends(tmp_path):
    import functools
    import http.server
    import threading
    write_video(tmp_path / "net.avi", numbered_frames(10, 32, 32), fps=25.0)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with VideoSource(f"http://127.0.0.1:{server.server_address[1]}/net.avi", reconnect_s=0.1) as src:
            assert src.live and src.kind == "url"
            before, after, deadline = [], [], time.monotonic() + 5.0
            while not after and time.monotonic() < deadline:
                frame = src.read(timeout=0.2)
                if frame is not None:
                    (after if src.reconnects else before).append(frame_number(frame.image))
            assert before and after, (before, after, src.reconnects, src.state)
            assert all(0 <= n < 10 for n in before + after)
    finally:
        server.shutdown()
        server.server_close()
