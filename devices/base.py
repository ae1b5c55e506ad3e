"""The one contract every frame source honours: `Frame`, `Source`, `SourceError`, registry.

Sources are created by spec (`create_source("dicom:loop.dcm")`); the registry maps a scheme to a
"module:factory" string so that importing `devices` never imports pydicom, pyigtl or the simulator.
"""
from __future__ import annotations

import abc
import importlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np


class SourceError(RuntimeError):
    """Base of every error a source raises; the message tells the user what to do."""


class SourceNotFound(SourceError):
    """File, device or host does not exist / cannot be opened."""


class UnsupportedFormat(SourceError):
    """The input exists but is of a kind we cannot decode (e.g. a transfer syntax)."""


class CorruptData(SourceError):
    """The input is damaged: truncated file, undecodable frame, malformed message."""


class Disconnected(SourceError):
    """A live stream went away and did not come back in time."""


class InvalidFrame(SourceError):
    """A decoded frame is unusable: empty, wrong shape, NaN."""


class EndOfStream(SourceError):
    """A finite source (file, recording) has no more frames. Not a failure."""


@dataclass(frozen=True)
class Frame:
    """One grayscale B-mode image, already scan-converted.

    Attributes:
        image: uint8 [H, W], read-only.
        t: monotonic time in seconds (source clock; for files, the frame's time in the loop).
        index: frame counter from the source, starting at 0.
        spacing_mm: (row, col) pixel spacing when known.
        pose: 4x4 probe pose (tracker or simulator) when known.
        labels: ground truth (simulator) when known.
    """

    image: np.ndarray
    t: float
    index: int
    spacing_mm: tuple[float, float] | None = None
    pose: np.ndarray | None = None
    labels: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        img = self.image
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 2:
            raise InvalidFrame(f"a Frame needs a uint8 [H, W] image, got {describe_array(img)}")
        if img.size == 0:
            raise InvalidFrame(f"a Frame needs a non-empty image, got shape {img.shape}")
        img.flags.writeable = False
        if self.pose is not None:
            pose = np.asarray(self.pose, dtype=np.float64)
            if pose.shape != (4, 4) or not np.isfinite(pose).all():
                raise InvalidFrame(f"pose must be a finite 4x4 matrix, got {describe_array(self.pose)}")
            pose.flags.writeable = False
            object.__setattr__(self, "pose", pose)


def describe_array(a: Any) -> str:
    """Short description for error messages."""
    if isinstance(a, np.ndarray):
        return f"array of shape {a.shape} and dtype {a.dtype}"
    return type(a).__name__


def to_gray_uint8(image: np.ndarray, what: str = "frame") -> np.ndarray:
    """Convert a decoded image (gray/RGB/RGBA, uint8/uint16/float) to uint8 [H, W].

    Floats are assumed in [0, 1] when their max is <= 1, else in [0, 255]. Integer types wider
    than 8 bits are scaled by their actual range.

    Raises:
        InvalidFrame: empty image, unsupported shape, or NaN/inf values.
    """
    a = np.asarray(image)
    if a.size == 0 or 0 in a.shape:
        raise InvalidFrame(f"{what}: empty image (shape {a.shape})")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 3 and a.shape[2] in (3, 4):
        a = a[:, :, :3]
        if a.dtype != np.uint8:
            a = a.astype(np.float32)
        a = (0.299 * a[:, :, 0] + 0.587 * a[:, :, 1] + 0.114 * a[:, :, 2])
    if a.ndim != 2:
        raise InvalidFrame(f"{what}: expected a 2D gray or RGB image, got shape {a.shape}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise InvalidFrame(f"{what}: image contains NaN or infinite values")
        peak = float(a.max()) if a.size else 0.0
        scale = 255.0 if peak <= 1.0 else 1.0
        return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
        a = a.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        if hi <= 255 and lo >= 0:
            return a.astype(np.uint8)
        return np.clip(np.rint((a - lo) * (255.0 / max(hi - lo, 1.0))), 0, 255).astype(np.uint8)
    raise InvalidFrame(f"{what}: unsupported pixel type {a.dtype}")


class Source(abc.ABC):
    """A stream of `Frame`s. Use as a context manager.

    `read(timeout)` returns the next frame, or None if none arrived within `timeout` seconds
    (live streams), and raises `EndOfStream` when a finite source is exhausted. Live sources
    never queue stale frames: `read` gives the newest one.
    """

    name: str = "source"
    fps: float = 0.0

    def open(self) -> "Source":
        return self

    def close(self) -> None:
        pass

    def __enter__(self) -> "Source":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abc.abstractmethod
    def read(self, timeout: float | None = None) -> Frame | None:
        """Next frame, None when nothing new within `timeout`; raises EndOfStream at the end."""

    def __iter__(self) -> Iterator[Frame]:
        """Frames until the end of a finite source (live sources iterate forever)."""
        while True:
            try:
                frame = self.read(timeout=1.0)
            except EndOfStream:
                return
            if frame is not None:
                yield frame


# scheme -> "module:callable"; the callable takes (rest_of_spec: str, **options) -> Source.
_REGISTRY: dict[str, str | Callable[..., Source]] = {
    "video": "devices.video:from_spec",
    "dicom": "devices.dicom:from_spec",
    "igtl": "devices.igtl:from_spec",
    "rec": "devices.recorder:from_spec",
    "sim": "devices.sim:from_spec",
}


def register_source(scheme: str, factory: str | Callable[..., Source]) -> None:
    """Add or replace a source kind: `factory` is a callable or a lazy "module:attr" string."""
    _REGISTRY[scheme] = factory


def source_schemes() -> list[str]:
    return sorted(_REGISTRY)


def split_spec(spec: str) -> tuple[str, str]:
    """`"dicom:/a/b.dcm"` -> ("dicom", "/a/b.dcm"); `"igtl://h:1"` -> ("igtl", "h:1"); `"sim"` -> ("sim", "")."""
    if not isinstance(spec, str) or not spec.strip():
        raise SourceError("empty source spec; try 'sim', 'video:0', 'dicom:loop.dcm' or 'igtl://127.0.0.1:18944'")
    spec = spec.strip()
    scheme, sep, rest = spec.partition(":")
    if not sep:
        return spec, ""
    if rest.startswith("//"):
        rest = rest[2:]
    return scheme, rest


def create_source(spec: str, **options: Any) -> Source:
    """Create a source from a spec such as `sim`, `video:0`, `dicom:loop.dcm`, `igtl://127.0.0.1:18944`.

    Raises:
        SourceError: unknown scheme (the message lists the known ones) or the source's own error.
    """
    scheme, rest = split_spec(spec)
    factory = _REGISTRY.get(scheme)
    if factory is None:
        raise SourceError(f"unknown source '{spec}': known kinds are {', '.join(source_schemes())} "
                          "(e.g. sim, video:0, video:clip.mp4, dicom:loop.dcm, igtl://127.0.0.1:18944, rec:session_dir)")
    if isinstance(factory, str):
        module_name, _, attr = factory.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise SourceError(f"source kind '{scheme}' is not available: {e}") from e
        factory = getattr(module, attr)
    return factory(rest, **options)


class Pacer:
    """Sleeps so that frames are released at `fps` (file playback at real speed)."""

    def __init__(self, fps: float) -> None:
        self.period_s = 1.0 / fps if fps and fps > 0 else 0.0
        self._next = None

    def wait(self) -> None:
        if self.period_s <= 0:
            return
        now = time.monotonic()
        if self._next is None:
            self._next = now
        delay = self._next - now
        if delay > 0:
            time.sleep(delay)
        # Do not accumulate debt after a stall: never schedule in the past.
        self._next = max(self._next, time.monotonic() - self.period_s) + self.period_s
