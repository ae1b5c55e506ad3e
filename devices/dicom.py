"""DICOM cine loops (single- and multi-frame ultrasound) as a frame source.

Spec: `dicom:/path/loop.dcm`. Decoding uses pydicom >= 3 with the installed pylibjpeg plugins, so
the transfer syntaxes are: explicit/implicit VR little endian (and big endian, deflated), RLE
Lossless, JPEG Baseline / Extended / Lossless, JPEG-LS and JPEG 2000 (lossless and lossy).
Photometric interpretations: MONOCHROME1/2, RGB, YBR_FULL, YBR_FULL_422 (and the JPEG/J2K YBR
variants), PALETTE COLOR with 8- or 16-bit LUTs. Colour becomes gray by luma.

Timing comes from, in order: FrameTimeVector (ms between frames), FrameTime (ms), CineRate (fps),
RecommendedDisplayFrameRate (fps); otherwise 30 fps is assumed (`timing_source` says which).
Pixel spacing (mm, row then column) comes from the 2D region of SequenceOfUltrasoundRegions
(PhysicalDeltaY/X in cm) when present, else PixelSpacing.

`open()` reads the header, checks the pixel data's length (native) or frame items (encapsulated)
and decodes the first frame, so a bad file fails there with a `SourceError` naming the file and
the reason. Later frames decode on first use and are kept as gray images (`cache=True`), so a
looping cine decodes once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from devices.base import (CorruptData, EndOfStream, Frame, InvalidFrame, Pacer, Source, SourceNotFound,
                          UnsupportedFormat, to_gray_uint8)

DEFAULT_FPS = 30.0
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def from_spec(rest: str, **options: Any) -> "DicomCineSource":
    """Registry entry for `dicom:/path/file.dcm`."""
    return DicomCineSource(rest, **options)


def frame_times_s(ds: Any, n_frames: int) -> tuple[np.ndarray, str]:
    """Time of each frame from the start of the loop, in seconds, and which attribute gave it.

    Args:
        ds: a pydicom Dataset.
        n_frames: number of frames.

    Returns:
        (float64 [n_frames] starting at 0, name of the attribute used or "default 30 fps").
    """
    vector = ds.get("FrameTimeVector")
    if vector is not None:
        ms = np.atleast_1d(np.asarray(vector, dtype=np.float64))
        if ms.size == n_frames and np.isfinite(ms).all() and (ms[1:] > 0).all():
            ms = ms.copy()
            ms[0] = 0.0  # the standard's first entry is the time before frame 0: 0
            return np.cumsum(ms) / 1000.0, "FrameTimeVector"
    for keyword, to_period_s in (("FrameTime", lambda v: v / 1000.0),
                                 ("CineRate", lambda v: 1.0 / v),
                                 ("RecommendedDisplayFrameRate", lambda v: 1.0 / v)):
        value = ds.get(keyword)
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if np.isfinite(value) and value > 0:
            return np.arange(n_frames) * to_period_s(value), keyword
    return np.arange(n_frames) / DEFAULT_FPS, f"default {DEFAULT_FPS:g} fps"


def pixel_spacing_mm(ds: Any) -> tuple[float, float] | None:
    """(row, col) spacing in mm from SequenceOfUltrasoundRegions (largest 2D region in cm) or PixelSpacing."""
    best, best_area = None, -1.0
    for region in ds.get("SequenceOfUltrasoundRegions") or []:
        try:
            if int(region.get("RegionSpatialFormat", 0)) != 1:  # 1 = 2D tissue image
                continue
            if int(region.PhysicalUnitsXDirection) != 3 or int(region.PhysicalUnitsYDirection) != 3:  # 3 = cm
                continue
            dx, dy = float(region.PhysicalDeltaX), float(region.PhysicalDeltaY)
            area = float((region.RegionLocationMaxX1 - region.RegionLocationMinX0)
                         * (region.RegionLocationMaxY1 - region.RegionLocationMinY0))
        except (AttributeError, TypeError, ValueError):
            continue
        if dx > 0 and dy > 0 and area > best_area:
            best, best_area = (abs(dy) * 10.0, abs(dx) * 10.0), area
    if best is not None:
        return best
    spacing = ds.get("PixelSpacing")
    try:
        row, col = (float(v) for v in spacing)
    except (TypeError, ValueError):
        return None
    return (row, col) if row > 0 and col > 0 else None


class DicomCineSource(Source):
    """Frames of a DICOM file (single- or multi-frame), paced at the file's frame times.

    Args:
        path: the .dcm file.
        realtime: pace at the frame times (False: as fast as frames decode).
        loop: restart at the end instead of raising EndOfStream.
        cache: keep decoded gray frames so a loop decodes each frame once.
        decoding_plugin: force one of pydicom's decoder plugins ("pylibjpeg", "pillow", ...);
            default: pydicom's choice.
        crop_sector: crop to the ultrasound fan and blank burned-in text, rulers and ECG
            (devices.sector.SectorCropper), for exports that carry the scanner's screen.
    """

    def __init__(self, path: str, *, realtime: bool = True, loop: bool = False, cache: bool = True,
                 decoding_plugin: str = "", crop_sector: bool = False) -> None:
        if not str(path).strip():
            raise SourceNotFound("dicom source needs a file, e.g. dicom:/data/loop.dcm")
        self.path = Path(str(path)).expanduser()
        self.name = f"dicom:{self.path.name}"
        self.realtime, self.loop, self.cache = bool(realtime), bool(loop), bool(cache)
        self.decoding_plugin = str(decoding_plugin or "")
        self._cropper = None
        if crop_sector:
            from devices.sector import SectorCropper
            self._cropper = SectorCropper()
        self.fps = 0.0
        self.n_frames = 0
        self.spacing_mm: tuple[float, float] | None = None
        self.times_s = np.zeros(0)
        self.timing_source = ""
        self.transfer_syntax = ""
        self.photometric = ""
        self._ds = None
        self._frames: list[np.ndarray | None] = []
        self._cursor = 0
        self._loops = 0
        self._index = 0
        self._pacer: Pacer | None = None

    def _fail(self, cls: type, reason: str) -> Exception:
        return cls(f"{self.path}: {reason}")

    def open(self) -> "DicomCineSource":
        """Read and check the file and decode its first frame.

        Raises:
            SourceNotFound: no such file.
            UnsupportedFormat: not DICOM, no pixel data, or a transfer syntax without a decoder.
            CorruptData: damaged header, truncated pixel data, undecodable frame.
            InvalidFrame: empty image (zero rows/columns) or NaN pixels.
        """
        if self._ds is not None:
            return self
        if not self.path.is_file():
            raise self._fail(SourceNotFound, "DICOM file not found" if not self.path.exists() else "not a file")
        ds = self._read_dataset()
        self._check_pixels(ds)
        self._ds = ds
        self.n_frames = int(ds.get("NumberOfFrames") or 1)
        self.times_s, self.timing_source = frame_times_s(ds, self.n_frames)
        if self.n_frames > 1:
            self.fps = (self.n_frames - 1) / float(self.times_s[-1])
        else:  # one frame: the rate still matters for looping a still image
            self.fps = 1.0 / float(frame_times_s(ds, 2)[0][1])
        self.spacing_mm = pixel_spacing_mm(ds)
        self._frames = [None] * self.n_frames
        try:
            self._frames[0] = self._decode(0)
            if self._cropper is not None:  # find the fan before the first read: one output size throughout
                for i in range(min(self._cropper.history, self.n_frames)):
                    self._frames[i] = self._frames[i] if self._frames[i] is not None else self._decode(i)
                    self._cropper(self._frames[i])
        except Exception:
            self.close()  # a failed open leaves nothing half-open
            raise
        self._pacer = Pacer(self.fps) if self.realtime else None
        return self

    def _read_dataset(self):
        import warnings

        import pydicom
        from pydicom.errors import InvalidDicomError
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ds = pydicom.dcmread(self.path)
            # pydicom drops an element cut short by the end of the file and only warns.
            cut = [str(w.message) for w in caught if "End of file" in str(w.message)]
            if cut:
                raise self._fail(CorruptData, f"file truncated ({cut[0]})")
        except InvalidDicomError:
            # Old files may lack the 128-byte preamble; accept them only if they look like an image.
            try:
                ds = pydicom.dcmread(self.path, force=True)
                ok = "Rows" in ds and any(k in ds for k in _PIXEL_KEYWORDS)
            except Exception:  # noqa: BLE001 - any parser failure means "not DICOM" here
                ok = False
            if not ok:
                raise self._fail(UnsupportedFormat, "not a DICOM file (no 'DICM' marker and no image attributes)") from None
        except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
            raise self._fail(CorruptData, f"cannot parse the DICOM header ({type(e).__name__}: {e})") from e
        return ds

    def _check_pixels(self, ds: Any) -> None:
        from pydicom.pixels import get_decoder
        from pydicom.pixels.utils import get_expected_length
        from pydicom.uid import UID, ImplicitVRLittleEndian

        keyword = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
        if keyword is None:
            sop = ds.get("SOPClassUID")
            kind = f" (SOP class {getattr(sop, 'name', sop)})" if sop else ""
            raise self._fail(UnsupportedFormat, f"no pixel data in this DICOM{kind}: it is not an image")
        meta = getattr(ds, "file_meta", None)
        tsyntax = UID(meta.get("TransferSyntaxUID") or ImplicitVRLittleEndian) if meta else ImplicitVRLittleEndian
        self.transfer_syntax = f"{tsyntax} ({tsyntax.name})"
        self.photometric = str(ds.get("PhotometricInterpretation", ""))
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        if rows <= 0 or cols <= 0:
            raise self._fail(InvalidFrame, f"empty image: Rows={rows}, Columns={cols}")
        n = int(ds.get("NumberOfFrames") or 1)
        if n <= 0:
            raise self._fail(InvalidFrame, f"NumberOfFrames is {n}")
        try:
            decoder = get_decoder(tsyntax)
        except NotImplementedError:
            raise self._fail(UnsupportedFormat, f"transfer syntax {self.transfer_syntax} is not supported: no "
                             "decoder exists for it (convert the file, e.g. with `gdcmconv --raw`)") from None
        if not decoder.is_available:
            missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
            raise self._fail(UnsupportedFormat, f"transfer syntax {self.transfer_syntax} needs {missing}")
        if tsyntax.is_encapsulated:
            self._check_fragments(ds, n)
            return
        try:
            expected = get_expected_length(ds, unit="bytes")
        except (AttributeError, ValueError, TypeError, KeyError) as e:
            raise self._fail(CorruptData, f"inconsistent image attributes ({e})") from e
        got = len(ds[keyword].value or b"")
        if got < expected:
            raise self._fail(CorruptData, f"pixel data truncated: {got} bytes, {expected} expected for "
                             f"{n} frame(s) of {rows}x{cols} ({self.photometric})")

    def _check_fragments(self, ds: Any, n: int) -> None:
        from pydicom.encaps import generate_frames
        try:
            count = sum(1 for _ in generate_frames(ds.PixelData, number_of_frames=n))
        except (ValueError, EOFError, OSError, TypeError) as e:
            raise self._fail(CorruptData, f"encapsulated pixel data is damaged or truncated ({e})") from e
        if count < n:
            raise self._fail(CorruptData, f"pixel data truncated: {count} of {n} compressed frames present")

    def close(self) -> None:
        """Forget the dataset and the cached frames."""
        self._ds = None
        self._frames = []

    def _decode(self, i: int) -> np.ndarray:
        """Frame i as gray uint8, with errors naming the file and the frame."""
        import cv2
        from pydicom.pixels import apply_color_lut, pixel_array
        ds = self._ds
        what = f"{self.path} frame {i}"
        # For YBR the Y channel is the luma we want: skip pydicom's YBR -> RGB conversion (slow).
        ybr = self.photometric in ("YBR_FULL", "YBR_FULL_422")
        try:
            arr = pixel_array(ds, index=i, as_rgb=not ybr, decoding_plugin=self.decoding_plugin)
            if ybr and arr.ndim == 3:
                arr = arr[..., 0]
            elif self.photometric == "PALETTE COLOR":
                arr = apply_color_lut(arr, ds)
                if arr.dtype != np.uint8:  # 16-bit LUT entries span 0..65535
                    arr = (arr.astype(np.uint32) // 257).astype(np.uint8)
        except (ValueError, RuntimeError, EOFError, IndexError, KeyError, TypeError, AttributeError) as e:
            reason = " ".join(str(e).split())  # plugin reports come on several lines
            raise CorruptData(f"{what}: cannot decode ({type(e).__name__}: {reason}; transfer syntax "
                              f"{self.transfer_syntax})") from e
        if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3:
            return cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY)  # same luma weights as to_gray_uint8, 10x faster
        if np.issubdtype(arr.dtype, np.integer) and arr.ndim == 2 and arr.dtype != np.uint8:
            # Scale by the stored bit depth, not the frame's range, so brightness does not flicker.
            bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
            signed = int(ds.get("PixelRepresentation") or 0) == 1
            a = arr.astype(np.float32) + (2 ** (bits - 1) if signed else 0)
            arr = np.clip(a * (255.0 / (2 ** bits - 1)), 0, 255).astype(np.uint8)
        gray = to_gray_uint8(arr, what)
        if self.photometric == "MONOCHROME1":
            gray = 255 - gray
        return gray

    def read(self, timeout: float | None = None) -> Frame:
        """Next frame (paced when realtime). Raises EndOfStream at the end unless looping."""
        if self._ds is None:
            self.open()
        if self._cursor >= self.n_frames:
            if not self.loop:
                raise EndOfStream(f"{self.name}: end of the loop after {self.n_frames} frames")
            self._cursor = 0
            self._loops += 1
        i = self._cursor
        image = self._frames[i]
        if image is None:
            image = self._decode(i)
            if self.cache:
                self._frames[i] = image
        if self._pacer is not None:
            nxt = self.times_s[i + 1] if i + 1 < self.n_frames else self.times_s[i] + 1.0 / self.fps
            self._pacer.period_s = max(float(nxt - self.times_s[i]), 0.0)
            self._pacer.wait()
        if self._cropper is not None:
            image = self._cropper(image)
        t = self._loops * self._loop_duration() + float(self.times_s[i])
        frame = Frame(image=image, t=t, index=self._index, spacing_mm=self.spacing_mm)
        self._cursor += 1
        self._index += 1
        return frame

    def _loop_duration(self) -> float:
        return float(self.times_s[-1]) + 1.0 / self.fps
