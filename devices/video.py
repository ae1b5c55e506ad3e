"""OpenCV video source: cameras and capture cards, video files and network streams.

Specs: `video:0` (camera / capture card index), `video:/dev/video2` (a V4L2 device), `video:clip.mp4`
(a file), `video:rtsp://host/stream` (or http(s), udp, tcp, rtmp, srt: a network stream).

Live inputs (cameras, devices, URLs) run a grabber thread that keeps only the newest frame: `read`
returns it, or None when nothing newer arrived within the timeout, so a slow consumer never sees
stale frames (the number overwritten unread is in `dropped`). A live stream that stops delivering
is reopened with backoff (`state` says "connected" or "reconnecting").

Files are read on the caller's thread, paced at the file's frame rate (`realtime=True`, the
default) or as fast as they decode (`realtime=False`); `EndOfStream` at the end unless `loop=True`.
`live=True` plays a file through the grabber thread as if it were a camera (tests, demos).

Frames become uint8 gray (BGR is converted with OpenCV's luma weights, anything else through
`devices.base.to_gray_uint8`). `crop_sector=True` crops screen captures to the ultrasound fan
(`devices.sector.SectorCropper`).
"""
from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from devices.base import (CorruptData, EndOfStream, Frame, Pacer, Source, SourceError, SourceNotFound,
                          to_gray_uint8)

URL_PREFIXES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")
DEFAULT_FPS = 30.0


class Mailbox:
    """Holds only the newest item; a reader waits for one newer than the last it took.

    Attributes:
        dropped: items overwritten before anyone took them (stale frames never delivered).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._seq = 0
        self._taken = 0
        self._closed = False
        self.dropped = 0

    def put(self, item: Any) -> None:
        """Replace the held item (counting the old one as dropped if nobody took it)."""
        with self._cond:
            if self._seq > self._taken:
                self.dropped += 1
            self._item = item
            self._seq += 1
            self._cond.notify_all()

    def take(self, timeout: float | None) -> Any:
        """The newest item not taken yet, or None after `timeout` seconds (None: wait forever)."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq > self._taken or self._closed, timeout)
            if self._seq <= self._taken:
                return None
            self._taken = self._seq
            return self._item

    def close(self) -> None:
        """Wake every waiting reader (they get None)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def from_spec(rest: str, **options: Any) -> "VideoSource":
    """Registry entry for `video:...` specs (see the module docstring)."""
    return VideoSource(rest, **options)


def _parse_target(target: str | int) -> tuple[str, str | int]:
    """-> (kind, target) with kind "camera", "device", "url" or "file"."""
    if isinstance(target, int):
        return "camera", target
    text = str(target).strip()
    if not text:
        raise SourceError("video source needs a camera index, a file or a URL, e.g. video:0 or video:clip.mp4")
    if text.isdigit():
        return "camera", int(text)
    if text.lower().startswith(URL_PREFIXES):
        return "url", text
    if text.startswith("/dev/"):
        return "device", text
    return "file", text


class VideoSource(Source):
    """Frames from OpenCV's VideoCapture (camera index, capture device, file or URL).

    Args:
        target: camera index, "/dev/videoN", a file path or a stream URL.
        realtime: pace files at their frame rate (False: as fast as they decode).
        loop: restart a file at its end instead of raising EndOfStream.
        live: run a file through the newest-frame grabber thread like a camera (default: only
            cameras, devices and URLs are live).
        crop_sector: crop screen captures to the ultrasound fan and blank the rest.
        width, height, fps: capture properties requested from a camera (ignored for files).
        fourcc: camera pixel format, e.g. "MJPG" (many USB capture cards need it for 1080p).
        backend: OpenCV backend id (e.g. cv2.CAP_V4L2); default lets OpenCV choose.
        reconnect_s: a live stream silent for this long is reopened (with growing backoff).
    """

    def __init__(self, target: str | int, *, realtime: bool = True, loop: bool = False,
                 live: bool | None = None, crop_sector: bool = False, width: int | None = None,
                 height: int | None = None, fps: float | None = None, fourcc: str | None = None,
                 backend: int | None = None, reconnect_s: float = 2.0) -> None:
        self.kind, self.target = _parse_target(target)
        self.name = f"video:{self.target}"
        self.live = self.kind != "file" if live is None else bool(live)
        self.realtime, self.loop = bool(realtime), bool(loop)
        self._props = {"width": width, "height": height, "fps": fps, "fourcc": fourcc}
        self._backend = backend
        self.reconnect_s = float(reconnect_s)
        self._cropper = None
        if crop_sector:
            from devices.sector import SectorCropper
            self._cropper = SectorCropper()
        self.fps = 0.0
        self.frame_count = 0       # frames in the file per its header (0 when unknown)
        self.state = "closed"
        self.reconnects = 0        # live stream reopened after going silent
        self._cap = None
        self._pending: np.ndarray | None = None
        self._pos = 0              # next frame's position in the file
        self._loops = 0
        self._index = 0
        self._pacer: Pacer | None = None
        self._mailbox = Mailbox()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._eos = False
        self._error: SourceError | None = None

    # ------------------------------------------------------------------ opening
    @property
    def dropped(self) -> int:
        """Live frames overwritten before `read` took them."""
        return self._mailbox.dropped

    def open(self) -> "VideoSource":
        """Open the input; files decode their first frame now so a bad file fails here."""
        if self._cap is not None:
            return self
        if self.kind == "file":
            self._open_file()
        else:
            self._cap = self._open_capture()
            self.fps = self._cap_fps(self._cap)
        self.state = "connected"
        if self.live:
            self._stop.clear()
            self._mailbox, self._eos, self._error = Mailbox(), False, None
            self._thread = threading.Thread(target=self._grab_loop, name=f"grab {self.name}", daemon=True)
            self._thread.start()
        return self

    def _open_file(self) -> None:
        import cv2
        path = Path(str(self.target)).expanduser()
        if not path.exists():
            raise SourceNotFound(f"video file not found: {path}")
        if not path.is_file():
            raise SourceNotFound(f"{path} is not a file")
        if path.stat().st_size == 0:
            raise CorruptData(f"{path}: empty file (0 bytes)")
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            raise CorruptData(f"{path}: OpenCV/FFmpeg cannot read it: not a video, an unknown codec, or a damaged "
                              "or truncated file (an MP4 cut short loses its index)")
        ok, image = cap.read()
        if not ok or image is None:
            cap.release()
            raise CorruptData(f"{path}: the file opens but no frame decodes (damaged or truncated)")
        self._cap, self.target = cap, str(path)
        self.fps = self._cap_fps(cap)
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.frame_count = int(count) if math.isfinite(count) and count > 0 else 0
        self._pending, self._pos = image, 0
        if self._cropper is not None:
            self._prime_cropper(cap, image)
        self._pacer = Pacer(self.fps) if self.realtime else None

    def _prime_cropper(self, cap, first: np.ndarray) -> None:
        """Find the fan on the first frames, then rewind: every output frame has the crop's size."""
        import cv2
        images = [first]
        while len(images) < self._cropper.history:
            ok, image = cap.read()
            if not ok or image is None:
                break
            images.append(image)
        for image in images:
            self._cropper(self._gray(image, "priming frame"))
        if len(images) > 1:  # reopen rather than seek: exact for every container
            self._cap.release()
            self._cap = cv2.VideoCapture(str(self.target))
            ok, _ = self._cap.read()
            if not ok:
                raise CorruptData(f"{self.target}: cannot reopen the file after finding the fan")

    def _open_capture(self):
        import cv2
        backend = cv2.CAP_ANY if self._backend is None else self._backend
        if self.kind == "url":  # bound FFmpeg's waits so a dead stream is noticed and reopened
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 5000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 2000]
            cap = cv2.VideoCapture(self.target, backend, params)
        else:
            cap = cv2.VideoCapture(self.target, backend)
        if not cap.isOpened():
            what = {"camera": f"camera {self.target}", "device": f"capture device {self.target}"}.get(
                self.kind, f"stream {self.target}")
            hint = ("is it connected and not used by another program? `v4l2-ctl --list-devices` lists them"
                    if self.kind != "url" else "check the URL, the network and that the sender is running")
            raise SourceNotFound(f"cannot open {what}: {hint}")
        p = self._props
        if p["fourcc"]:
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*str(p["fourcc"])[:4].ljust(4)))
        if p["width"]:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, int(p["width"]))
        if p["height"]:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, int(p["height"]))
        if p["fps"]:
            cap.set(cv2.CAP_PROP_FPS, float(p["fps"]))
        if self.kind == "url":
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # ask the backend not to queue either
        return cap

    @staticmethod
    def _cap_fps(cap) -> float:
        import cv2
        fps = cap.get(cv2.CAP_PROP_FPS)
        return float(fps) if math.isfinite(fps) and 0 < fps <= 1000 else DEFAULT_FPS

    def close(self) -> None:
        """Stop the grabber thread and release the capture."""
        self._stop.set()
        self._mailbox.close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        self.state = "closed"

    # ------------------------------------------------------------------ reading
    def read(self, timeout: float | None = None) -> Frame | None:
        """Next frame (files) or the newest frame (live); None when nothing new within `timeout`.

        Raises:
            EndOfStream: a file (not looping) is exhausted.
            CorruptData: a file stops decoding before its announced end.
            InvalidFrame: a decoded frame is empty or not an image.
        """
        if self._cap is None and self._thread is None:
            self.open()
        if not self.live:
            image = self._next_file_image()
            if self._pacer is not None:
                self._pacer.wait()
            t = self._loops * self._loop_duration() + (self._pos - 1) / self.fps
            return self._make_frame(image, t)
        item = self._mailbox.take(timeout)
        if item is None:
            if self._error is not None:
                raise self._error
            if self._eos:
                raise EndOfStream(f"{self.name}: end of file")
            return None
        image, t = item
        return self._make_frame(image, t)

    def _loop_duration(self) -> float:
        return (self.frame_count or max(self._pos, 1)) / self.fps

    def _next_file_image(self) -> np.ndarray:
        if self._pending is not None:
            image, self._pending = self._pending, None
            self._pos += 1
            return image
        ok, image = self._cap.read()
        if ok and image is not None:
            self._pos += 1
            return image
        # Trust the header's frame count, with a little slack for containers that estimate it.
        if self.frame_count and self._pos < 0.98 * self.frame_count - 1:
            raise CorruptData(f"{self.target}: cannot decode frame {self._pos} of {self.frame_count} "
                              "(file truncated or damaged)")
        if not self.loop or self._pos == 0:
            raise EndOfStream(f"{self.name}: end of file after {self._pos} frames")
        if not self.frame_count:
            self.frame_count = self._pos
        self._rewind()
        ok, image = self._cap.read()
        if not ok or image is None:
            raise CorruptData(f"{self.target}: cannot decode the first frame after rewinding")
        self._loops += 1
        self._pos = 1
        return image

    def _rewind(self) -> None:
        import cv2
        if not self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0):  # some containers cannot seek: reopen
            self._cap.release()
            self._cap = cv2.VideoCapture(str(self.target))

    @staticmethod
    def _gray(image: np.ndarray, what: str) -> np.ndarray:
        import cv2
        if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] in (3, 4) and image.size:
            return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY if image.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
        return to_gray_uint8(image, what)

    def _make_frame(self, image: np.ndarray, t: float) -> Frame:
        gray = self._gray(image, f"{self.name} frame {self._index}")
        if self._cropper is not None:
            gray = self._cropper(gray)
        frame = Frame(image=gray, t=float(t), index=self._index)
        self._index += 1
        return frame

    # ------------------------------------------------------------------ live grabber
    def _grab_loop(self) -> None:
        """Grabber thread: read as frames come, keep only the newest, reopen a silent stream."""
        pacer = Pacer(self.fps) if self.kind == "file" and self.realtime else None
        last_ok = time.monotonic()
        backoff = 0.1
        while not self._stop.is_set():
            if self.kind == "file":
                try:
                    image = self._next_file_image()
                except EndOfStream:
                    self._eos = True
                    self._mailbox.close()
                    return
                except SourceError as e:
                    self._error = e
                    self._mailbox.close()
                    return
                if pacer is not None:
                    pacer.wait()
                self._mailbox.put((image, time.monotonic()))
                continue
            ok, image = self._cap.read() if self._cap is not None else (False, None)
            if ok and image is not None:
                self._mailbox.put((image, time.monotonic()))
                last_ok, backoff, self.state = time.monotonic(), 0.1, "connected"
                continue
            if time.monotonic() - last_ok < self.reconnect_s:
                self._stop.wait(0.01)
                continue
            self.state = "reconnecting"
            if self._cap is not None:
                self._cap.release()
                self._cap = None
            self._stop.wait(backoff)
            backoff = min(2 * backoff, 5.0)
            try:
                self._cap = self._open_capture()
                self.reconnects += 1
                last_ok = time.monotonic()
            except SourceNotFound:
                pass
