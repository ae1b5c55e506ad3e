"""Session recording that survives a crash, and its replay as a source (`rec:/path/session`).

Format (a folder; version 1):

    session/
      session.json   meta, written when recording starts and rewritten by close():
                     {"format": "pocus-session", "version": 1, "created": ISO-8601 UTC,
                      "created_unix": s, "source": "sim", "fps": 30.0, "pocus_version": "0.1.0",
                      "meta": {...caller's meta...},
                      "closed": ISO-8601 UTC, "frames": N, "duration_s": s}   <- only after close()
      frames.bin     the images, one record per frame, appended:
                     32-byte little-endian header  <4s q d I I I>
                       magic b"PFRM", index int64, t float64 (source seconds), height uint32,
                       width uint32, CRC-32 of the pixels uint32
                     then height*width uint8 pixels, row-major (gray B-mode).
      frames.jsonl   one JSON object per line and frame:
                     {"index": 0, "t": 12.345, "shape": [H, W], "offset": byte offset of the
                      record in frames.bin, "spacing_mm": [r, c] (when known), "pose": 4x4 list
                      (when known), "labels": {...} (simulator ground truth, when known),
                      "extra": {...} (free: model outputs, instruction shown, ...)}

Crash safety: appends go to buffered files; a background thread flushes them and calls
`os.fsync` every `flush_s` (0.5 s), frames.bin before frames.jsonl. A SIGKILL or power loss loses at
most the last second. No "closed" key in session.json means the session was interrupted. The
replay walks frames.bin's headers (the authority for images), stops at a truncated last record,
skips a record whose CRC fails (counted in `skipped`), and joins frames.jsonl by offset, ignoring
a cut last line.

Cost: `append` copies the pixels into the write buffer and formats one JSON line (tens of
microseconds for a 256x256 frame); fsync runs on the flusher thread.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from devices.base import CorruptData, EndOfStream, Frame, Pacer, Source, SourceNotFound

FORMAT = "pocus-session"
VERSION = 1
MAGIC = b"PFRM"
RECORD = struct.Struct("<4sqdIII")  # magic, index, t, height, width, crc32 -> 32 bytes
SESSION_FILE, FRAMES_FILE, INDEX_FILE = "session.json", "frames.bin", "frames.jsonl"


def _jsonable(obj: Any) -> Any:
    """json.dumps default: numpy arrays/scalars to lists/numbers, anything else to its str()."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def _pocus_version() -> str:
    try:
        from importlib.metadata import version
        return version("pocus-guide")
    except Exception:  # noqa: BLE001 - not installed as a package: still record
        return "unknown"


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=_jsonable)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class SessionRecorder:
    """Append frames (and per-frame JSON) to a session folder; crash-safe to within a second.

    Args:
        folder: the session folder (created; must not already hold a session).
        source_name: the source's name, stored in session.json.
        meta: free JSON-able meta data stored in session.json (model, target view, ...).
        fps: the source's frame rate, stored for the replay.
        flush_s: period of flush + fsync on the background thread (<= 1 s keeps the promise).

    Raises:
        FileExistsError: the folder already holds a recording.
    """

    def __init__(self, folder: str | os.PathLike, source_name: str = "", meta: Mapping[str, Any] | None = None,
                 fps: float = 0.0, flush_s: float = 0.5) -> None:
        self.folder = Path(folder).expanduser()
        if (self.folder / FRAMES_FILE).exists():
            raise FileExistsError(f"{self.folder} already holds a recording; choose a new folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.flush_s = float(flush_s)
        self.frames = 0               # appended
        self.durable_frames = 0       # flushed and fsynced
        self._t0: float | None = None
        self._t_last = 0.0
        self._offset = 0
        self._closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._session = {"format": FORMAT, "version": VERSION, "created": _utc_now(), "created_unix": time.time(),
                         "source": source_name, "fps": float(fps), "pocus_version": _pocus_version(),
                         "meta": dict(meta or {})}
        _write_json_atomic(self.folder / SESSION_FILE, self._session)
        self._bin = open(self.folder / FRAMES_FILE, "ab", buffering=1 << 20)
        self._jsonl = open(self.folder / INDEX_FILE, "a", encoding="utf-8", buffering=1 << 16)
        self._flusher = threading.Thread(target=self._flush_loop, name="recorder flush", daemon=True)
        self._flusher.start()

    def __enter__(self) -> "SessionRecorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(self, frame: Frame, extra: Mapping[str, Any] | None = None) -> int:
        """Record one frame and its per-frame data.

        Args:
            frame: the frame (its pose and labels are recorded when present).
            extra: free JSON-able data for this frame (numpy values are converted).

        Returns:
            The record's position in the session (0, 1, 2, ...).

        Raises:
            ValueError: the recorder is closed, or `extra` is not a mapping.
        """
        if extra is not None and not isinstance(extra, Mapping):
            raise ValueError(f"extra must be a dict or None, got {type(extra).__name__}")
        image = np.ascontiguousarray(frame.image)
        h, w = image.shape
        entry: dict[str, Any] = {"index": int(frame.index), "t": float(frame.t), "shape": [h, w]}
        if frame.spacing_mm is not None:
            entry["spacing_mm"] = [float(v) for v in frame.spacing_mm]
        if frame.pose is not None:
            entry["pose"] = frame.pose.tolist()
        if frame.labels is not None:
            entry["labels"] = dict(frame.labels)
        if extra:
            entry["extra"] = dict(extra)
        header = RECORD.pack(MAGIC, int(frame.index), float(frame.t), h, w, zlib.crc32(image))
        with self._lock:
            if self._closed:
                raise ValueError(f"recorder for {self.folder} is closed")
            entry["offset"] = self._offset
            line = json.dumps(entry, default=_jsonable, separators=(",", ":"))
            self._bin.write(header)
            self._bin.write(image.data)
            self._jsonl.write(line + "\n")
            self._offset += RECORD.size + image.nbytes
            if self._t0 is None:
                self._t0 = float(frame.t)
            self._t_last = float(frame.t)
            self.frames += 1
            return self.frames - 1

    def flush(self) -> None:
        """Write buffers out and fsync both files now (images first)."""
        with self._lock:
            if self._bin.closed:
                return
            n = self.frames
            self._bin.flush()
            self._jsonl.flush()
            fds = (self._bin.fileno(), self._jsonl.fileno())
        for fd in fds:
            try:
                os.fsync(fd)
            except OSError:
                pass  # closed meanwhile by close(), which fsyncs itself
        self.durable_frames = max(self.durable_frames, n)

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()

    def close(self) -> None:
        """Flush, fsync, close the files and mark the session complete in session.json."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._flusher.join(timeout=5.0)
        self.flush()
        with self._lock:
            self._bin.close()
            self._jsonl.close()
        self._session.update(closed=_utc_now(), frames=self.frames,
                             duration_s=(self._t_last - self._t0) if self._t0 is not None else 0.0)
        _write_json_atomic(self.folder / SESSION_FILE, self._session)


# ------------------------------------------------------------------------------------ replay
def from_spec(rest: str, **options: Any) -> "RecordingSource":
    """Registry entry for `rec:/path/session`."""
    return open_recording(rest, **options)


def open_recording(folder: str | os.PathLike, realtime: bool = False, loop: bool = False) -> "RecordingSource":
    """Replay a session folder as a source.

    Args:
        folder: the session folder.
        realtime: pace frames by their recorded times (False: as fast as they are read).
        loop: start again at the end instead of raising EndOfStream.

    Raises:
        SourceNotFound: no such folder, or no frames.bin in it.
        CorruptData: frames.bin does not start with a valid record.
    """
    return RecordingSource(folder, realtime=realtime, loop=loop).open()


def scan_records(path: Path) -> tuple[list[tuple[int, int, float, int, int]], int]:
    """Walk frames.bin's record headers.

    Returns:
        ([(offset, index, t, height, width), ...] for every complete record,
         number of trailing bytes that do not form a complete record).
    """
    records = []
    size = path.stat().st_size
    offset = 0
    with open(path, "rb") as f:
        while offset + RECORD.size <= size:
            f.seek(offset)
            magic, index, t, h, w, _ = RECORD.unpack(f.read(RECORD.size))
            end = offset + RECORD.size + h * w
            if magic != MAGIC or h == 0 or w == 0 or end > size:
                break
            records.append((offset, index, t, h, w))
            offset = end
    return records, size - offset


class RecordingSource(Source):
    """Frames of a recorded session (see the module docstring for the format).

    Attributes:
        session: the contents of session.json ({} if missing or unreadable).
        interrupted: True when the recording was not closed (crash, kill, power loss).
        truncated_bytes: bytes at the end of frames.bin that did not form a whole record.
        skipped: records skipped because their CRC did not match.
        entries: per-frame JSON (frames.jsonl) by record offset.
        last_entry: the JSON entry of the last frame read ({} if none was recorded).
    """

    def __init__(self, folder: str | os.PathLike, realtime: bool = False, loop: bool = False) -> None:
        self.folder = Path(str(folder)).expanduser()
        self.name = f"rec:{self.folder.name}"
        self.realtime, self.loop = bool(realtime), bool(loop)
        self.session: dict[str, Any] = {}
        self.interrupted = True
        self.truncated_bytes = 0
        self.skipped = 0
        self.entries: dict[int, dict[str, Any]] = {}
        self.last_entry: dict[str, Any] = {}
        self.fps = 0.0
        self._records: list[tuple[int, int, float, int, int]] = []
        self._file = None
        self._cursor = 0
        self._loops = 0
        self._index = 0
        self._pacer: Pacer | None = None

    @property
    def n_frames(self) -> int:
        """Complete records in the session."""
        return len(self._records)

    def open(self) -> "RecordingSource":
        """Index the session. Raises SourceNotFound / CorruptData (see open_recording)."""
        if self._file is not None:
            return self
        if not self.folder.is_dir():
            raise SourceNotFound(f"recording folder not found: {self.folder}")
        bin_path = self.folder / FRAMES_FILE
        if not bin_path.is_file():
            raise SourceNotFound(f"{self.folder} is not a recording: no {FRAMES_FILE} in it")
        try:
            self.session = json.loads((self.folder / SESSION_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.session = {}
        self.interrupted = "closed" not in self.session
        self._records, self.truncated_bytes = scan_records(bin_path)
        if not self._records and bin_path.stat().st_size >= RECORD.size:
            raise CorruptData(f"{bin_path}: does not start with a frame record (not a pocus recording?)")
        self.entries = self._read_index()
        ts = [r[2] for r in self._records]
        span = ts[-1] - ts[0] if len(ts) > 1 else 0.0
        recorded_fps = float(self.session.get("fps") or 0.0)
        self.fps = (len(ts) - 1) / span if span > 0 else (recorded_fps or 30.0)
        self._file = open(bin_path, "rb")
        self._pacer = Pacer(self.fps) if self.realtime else None
        return self

    def _read_index(self) -> dict[int, dict[str, Any]]:
        path = self.folder / INDEX_FILE
        entries: dict[int, dict[str, Any]] = {}
        if not path.is_file():
            return entries
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    entries[int(entry["offset"])] = entry
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a crash
        return entries

    def close(self) -> None:
        """Close frames.bin."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def read(self, timeout: float | None = None) -> Frame:
        """Next recorded frame. Raises EndOfStream at the end (unless looping)."""
        if self._file is None:
            self.open()
        while True:
            if self._cursor >= len(self._records):
                if not self.loop or not self._records:
                    raise EndOfStream(f"{self.name}: end of the recording after {len(self._records)} frames")
                self._cursor = 0
                self._loops += 1
            offset, _, t, h, w = self._records[self._cursor]
            self._file.seek(offset)
            raw = self._file.read(RECORD.size + h * w)
            crc = RECORD.unpack_from(raw)[5]
            pixels = raw[RECORD.size:]
            self._cursor += 1
            if zlib.crc32(pixels) == crc:
                break
            self.skipped += 1  # torn write (power loss) or bit rot: skip this record only
        i = self._cursor - 1
        if self._pacer is not None:
            nxt = self._records[i + 1][2] if i + 1 < len(self._records) else t + 1.0 / self.fps
            self._pacer.period_s = min(max(nxt - t, 0.0), 10.0)
            self._pacer.wait()
        t0, t_end = self._records[0][2], self._records[-1][2]
        rel_t = (t - t0) + self._loops * ((t_end - t0) + 1.0 / self.fps)
        entry = self.entries.get(offset, {})
        self.last_entry = entry
        image = np.frombuffer(pixels, dtype=np.uint8).reshape(h, w)
        spacing = tuple(entry["spacing_mm"]) if entry.get("spacing_mm") else None
        pose = np.asarray(entry["pose"], dtype=np.float64) if entry.get("pose") is not None else None
        frame = Frame(image=image, t=rel_t, index=self._index, spacing_mm=spacing, pose=pose,
                      labels=entry.get("labels"))
        self._index += 1
        return frame
