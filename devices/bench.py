"""Sample inputs in real formats, and the `pocus bench sources` measurement.

The writers here make small but real files with the field's libraries (OpenCV's VideoWriter,
pydicom with the pylibjpeg/openjpeg encoders, cv2.imencode + DICOM encapsulation), plus a
synthetic scanner screen (fan of speckle, vendor text, depth ruler, icons, ECG sweep) for the
sector detector. The benchmark and the tests both use them; nothing here is imported by the
runtime path.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from devices.base import Frame

# Transfer syntaxes and photometric interpretations write_dicom can produce (see its docstring).
DICOM_SYNTAXES = ("explicit", "implicit", "rle", "jpeg", "j2k", "j2k_lossy")
PHOTOMETRICS = ("MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR")
US_MULTIFRAME_SOP = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage


# ----------------------------------------------------------------------------------------- images
def cine_frames(n: int = 8, height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A small fake B-mode loop: a fan of smooth 'tissue' that beats. uint8 [n, H, W].

    Smooth content (not white noise) so lossy codecs keep it within a few gray levels.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ax, r_max = width / 2, 0.95 * height
    r = np.hypot(xx - ax, yy)
    ang = np.degrees(np.arctan2(xx - ax, yy))
    fan = (r < r_max) & (np.abs(ang) < 40)
    base = _blur(rng.uniform(60, 200, (height, width)).astype(np.float32), 9)
    out = np.empty((n, height, width), np.uint8)
    for i in range(n):
        beat = 0.5 + 0.5 * math.sin(2 * math.pi * i / max(n, 2))
        cavity = ((xx - ax) / (0.18 * width)) ** 2 + ((yy - 0.55 * height) / ((0.2 + 0.05 * beat) * height)) ** 2 < 1
        img = base * (0.8 + 0.2 * beat)
        img = np.where(cavity, 15.0, img)
        out[i] = np.where(fan, np.clip(img, 0, 255), 0).astype(np.uint8)
    return out


def _blur(a: np.ndarray, k: int) -> np.ndarray:
    """Gaussian blur (OpenCV imported lazily)."""
    import cv2
    return cv2.GaussianBlur(a, (k, k), 0)


def to_rgb(gray: np.ndarray) -> np.ndarray:
    """Gray frames [..., H, W] -> a tinted RGB [..., H, W, 3] whose luma equals the gray (within 1)."""
    g = gray.astype(np.float32)
    r = np.clip(g * 1.10, 0, 255)
    b = np.clip(g * 0.90, 0, 255)
    gg = np.clip((g - 0.299 * r - 0.114 * b) / 0.587, 0, 255)
    return np.rint(np.stack([r, gg, b], axis=-1)).astype(np.uint8)


# ----------------------------------------------------------------------------------------- video
def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 25.0, fourcc: str | None = None) -> Path:
    """Write gray uint8 [n, H, W] frames with OpenCV: MJPG for .avi, mp4v for .mp4.

    Raises:
        RuntimeError: OpenCV has no writer for that container/codec here.
    """
    import cv2
    path = Path(path)
    fourcc = fourcc or {".avi": "MJPG", ".mp4": "mp4v", ".mkv": "FFV1"}.get(path.suffix.lower(), "MJPG")
    n, h, w = frames.shape[:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h), isColor=frames.ndim == 4)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {fourcc} into {path.name} here")
    for f in frames:
        writer.write(f)
    writer.release()
    return path


# ----------------------------------------------------------------------------------------- DICOM
def write_dicom(path: str | os.PathLike, frames: np.ndarray, photometric: str = "MONOCHROME2",
                syntax: str = "explicit", frame_time_ms: float | None = 40.0,
                region_spacing_cm: tuple[float, float] | None = (0.03, 0.03),
                pixel_spacing_mm: tuple[float, float] | None = None, **attrs: Any) -> Path:
    """Write a multi-frame ultrasound DICOM from gray uint8 frames [n, H, W].

    Args:
        path: output file.
        frames: gray uint8 [n, H, W]; converted to the photometric interpretation asked for.
        photometric: one of PHOTOMETRICS. PALETTE COLOR uses an 8-bit LUT unless attrs has
            lut_bits=16.
        syntax: one of DICOM_SYNTAXES: explicit / implicit little endian, rle (RLE Lossless,
            pydicom's encoder), jpeg (baseline 8-bit, cv2.imencode + encapsulation), j2k (JPEG 2000
            lossless) or j2k_lossy (JPEG 2000, ratio 3), both with pylibjpeg-openjpeg.
        frame_time_ms: FrameTime, or None to leave timing out (attrs may add FrameTimeVector,
            CineRate...).
        region_spacing_cm: (dy, dx) of one SequenceOfUltrasoundRegions item in cm, or None.
        pixel_spacing_mm: PixelSpacing (row, col) in mm, or None.
        **attrs: extra DICOM keywords set on the dataset (lut_bits is consumed here).

    Returns:
        The path written.
    """
    import cv2
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.pixels import convert_color_space
    from pydicom import uid

    frames = np.asarray(frames, dtype=np.uint8)
    lut_bits = int(attrs.pop("lut_bits", 8))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = US_MULTIFRAME_SOP
    ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = US_MULTIFRAME_SOP, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "US", "Test^Phantom", "0"
    if frame_time_ms is not None:
        ds.FrameTime = frame_time_ms
        ds.FrameIncrementPointer = 0x00181063
    if region_spacing_cm is not None:
        region = Dataset()
        region.RegionSpatialFormat, region.RegionDataType = 1, 1
        region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
        region.RegionLocationMaxX1, region.RegionLocationMaxY1 = frames.shape[2] - 1, frames.shape[1] - 1
        region.PhysicalUnitsXDirection, region.PhysicalUnitsYDirection = 3, 3  # cm
        region.PhysicalDeltaY, region.PhysicalDeltaX = region_spacing_cm
        ds.SequenceOfUltrasoundRegions = [region]
    if pixel_spacing_mm is not None:
        ds.PixelSpacing = list(pixel_spacing_mm)

    if photometric == "MONOCHROME2":
        data = frames
    elif photometric == "PALETTE COLOR":
        data = frames  # indices into a gray-ramp-ish LUT (red = index, so luma stays monotone)
    elif photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        data = to_rgb(frames)
    else:
        raise ValueError(f"write_dicom: unknown photometric {photometric!r}; choose one of {PHOTOMETRICS}")

    if syntax == "jpeg":
        # Baseline JPEG stores colour as YCbCr: DICOM calls that YBR_FULL_422.
        if photometric not in ("MONOCHROME2", "YBR_FULL_422", "RGB"):
            raise ValueError("write_dicom: JPEG baseline takes MONOCHROME2 or YBR_FULL_422")
        ds.set_pixel_data(data, "MONOCHROME2" if data.ndim == 3 else "RGB", 8)
        encoded = [cv2.imencode(".jpg", f if f.ndim == 2 else f[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
                   for f in data]
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
        if data.ndim == 4:
            ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.save_as(path, enforce_file_format=True)
        return Path(path)

    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        data = convert_color_space(data, "RGB", "YBR_FULL")
        if photometric == "YBR_FULL_422":
            if syntax != "explicit" and syntax != "implicit":
                raise ValueError("write_dicom: YBR_FULL_422 is only written uncompressed or as JPEG baseline")
            # Native 4:2:2: Y0 Y1 Cb Cr per pair of pixels (width must be even).
            y, cb, cr = data[..., 0], data[..., 1], data[..., 2]
            packed = np.empty(frames.shape[:2] + (frames.shape[2] * 2,), np.uint8)
            packed[..., 0::4], packed[..., 1::4] = y[..., 0::2], y[..., 1::2]
            packed[..., 2::4] = ((cb[..., 0::2].astype(np.uint16) + cb[..., 1::2]) // 2).astype(np.uint8)
            packed[..., 3::4] = ((cr[..., 0::2].astype(np.uint16) + cr[..., 1::2]) // 2).astype(np.uint8)
            ds.set_pixel_data(data, "YBR_FULL", 8)
            ds.PhotometricInterpretation = "YBR_FULL_422"
            ds.PixelData = packed.tobytes()
        else:
            ds.set_pixel_data(data, "YBR_FULL", 8)
    else:
        ds.set_pixel_data(data, photometric if photometric != "PALETTE COLOR" else "MONOCHROME2", 8)
    if photometric == "PALETTE COLOR":
        ds.PhotometricInterpretation = "PALETTE COLOR"
        ramp = np.arange(256, dtype=np.float64)
        luts = {"Red": ramp, "Green": ramp, "Blue": np.clip(ramp * 0.8, 0, 255)}
        for color, values in luts.items():
            setattr(ds, f"{color}PaletteColorLookupTableDescriptor", [256, 0, lut_bits])
            if lut_bits == 16:
                raw = np.rint(values * 257).astype("<u2").tobytes()
            else:
                raw = np.rint(values).astype(np.uint8).tobytes()
            setattr(ds, f"{color}PaletteColorLookupTableData", raw)
    for key, value in attrs.items():
        setattr(ds, key, value)

    if syntax == "implicit":
        ds.file_meta.TransferSyntaxUID = uid.ImplicitVRLittleEndian
    elif syntax == "rle":
        ds.compress(uid.RLELossless)
    elif syntax == "j2k":
        ds.compress(uid.JPEG2000Lossless)
    elif syntax == "j2k_lossy":
        ds.compress(uid.JPEG2000, j2k_cr=[3])
    elif syntax != "explicit":
        raise ValueError(f"write_dicom: unknown syntax {syntax!r}; choose one of {DICOM_SYNTAXES}")
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


# ------------------------------------------------------------------------------- scanner screen
def scanner_screen(t: float, seed: int = 0, shape: tuple[int, int] = (480, 640),
                   apex_xy: tuple[float, float] = (330.0, 58.0), radius_px: float = 330.0,
                   sector_deg: float = 80.0, inner_radius_px: float = 0.0):
    """One frame of a synthetic scanner screen capture (BGR uint8) and the true fan.

    The fan holds fresh speckle every frame over a beating 'heart' (bright walls, dark cavity);
    around it: vendor name, preset and MI/TI text, a depth ruler with labels, icons, a marker dot,
    a TGC curve and an ECG trace with a moving sweep bar at the bottom.

    Returns:
        (image BGR uint8 [H, W, 3], devices.sector.SectorGeometry of the true fan).
    """
    import cv2
    from devices.sector import SectorGeometry

    h, w = shape
    rng = np.random.default_rng((seed, int(round(t * 1000))))
    half = sector_deg / 2
    geo = SectorGeometry(apex_xy[0], apex_xy[1], radius_px, inner_radius_px, -half, half, shape)
    img = np.zeros((h, w, 3), np.uint8)
    # Fan: tissue echogenicity x fresh Rayleigh speckle.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = xx - apex_xy[0], yy - apex_xy[1]
    r = np.sqrt(dx * dx + dy * dy)
    beat = 0.5 + 0.5 * math.sin(2 * math.pi * 1.2 * t)
    # The cavity scales with the fan's width so tissue always borders it (as the LV walls do).
    cx, cy = apex_xy[0], apex_xy[1] + 0.6 * radius_px
    half_w = 0.25 * radius_px * math.sin(math.radians(half)) * (1 + 0.15 * beat)
    ell = ((xx - cx) / half_w) ** 2 + ((yy - cy) / (0.25 * radius_px)) ** 2
    tissue = 70 + 50 * np.exp(-((ell - 1.4) ** 2) / 0.08)          # bright ring = myocardium
    tissue = np.where(ell < 1.0, 6.0, tissue)                        # dark cavity (blood)
    tissue *= np.exp(-r / (2.5 * radius_px))                         # attenuation
    # Speckle: magnitude of a blurred complex Gaussian field (grains of a few pixels), fresh each frame.
    field = rng.standard_normal((2, h, w)).astype(np.float32)
    re, im = cv2.GaussianBlur(field[0], (0, 0), 1.2), cv2.GaussianBlur(field[1], (0, 0), 1.2)
    speckle = np.sqrt(re * re + im * im) * 3.2
    fan = geo.mask(shape)
    gray = np.where(fan, np.clip(tissue * speckle, 0, 255), 0).astype(np.uint8)
    img[:] = gray[:, :, None]
    white, cyan, green, yellow = (235, 235, 235), (220, 200, 60), (60, 220, 60), (40, 220, 230)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.rectangle(img, (0, 0), (w - 1, 22), (60, 45, 30), -1)
    cv2.putText(img, "ACME Sono 9  Adult Echo  FR 52Hz", (6, 16), font, 0.45, white, 1, cv2.LINE_AA)
    cv2.putText(img, "MI 1.1  TIS 0.6", (w - 130, 16), font, 0.45, white, 1, cv2.LINE_AA)
    for i, line in enumerate(("2D", "Gn 54", "DR 66", "P Low", "HGen", "C 3")):
        cv2.putText(img, line, (6, 50 + 18 * i), font, 0.42, cyan, 1, cv2.LINE_AA)
    cv2.rectangle(img, (8, 170), (40, 196), (30, 120, 200), -1)      # icon
    cv2.circle(img, (24, 220), 10, (200, 80, 80), -1)                # icon
    marker = (int(apex_xy[0] + 0.35 * radius_px * math.sin(math.radians(half)) + 18), int(apex_xy[1] + 8))
    cv2.circle(img, marker, 5, yellow, -1)                           # orientation marker dot
    # Depth ruler: ticks every 1/8 of the depth, labelled.
    rx = int(min(w - 30, apex_xy[0] + radius_px * math.sin(math.radians(half)) + 12))
    cv2.line(img, (rx, int(apex_xy[1])), (rx, int(apex_xy[1] + radius_px)), white, 1)
    for k in range(9):
        ty = int(apex_xy[1] + k * radius_px / 8)
        cv2.line(img, (rx, ty), (rx + (8 if k % 2 == 0 else 4), ty), white, 1)
        if k % 2 == 0:
            cv2.putText(img, str(2 * k), (rx + 10, ty + 4), font, 0.35, white, 1, cv2.LINE_AA)
    # TGC curve at the right edge (static).
    pts = np.array([[w - 18 + int(6 * math.sin(k / 3)), 40 + 12 * k] for k in range(25)], np.int32)
    cv2.polylines(img, [pts], False, (150, 150, 150), 1)
    # ECG at the bottom with a moving sweep gap (changes every frame).
    xs = np.arange(30, w - 30)
    phase = (xs / 140.0) % 1.0
    ecg = np.where(np.abs(phase - 0.3) < 0.02, -25 * (1 - np.abs(phase - 0.3) / 0.02), 0) + 4 * np.sin(2 * np.pi * phase)
    base_y = h - 30
    pts = np.stack([xs, base_y + ecg], axis=1).astype(np.int32)
    cv2.polylines(img, [pts], False, green, 1)
    sweep = int(30 + (t * 150) % (w - 60))
    cv2.rectangle(img, (sweep, base_y - 30), (sweep + 12, base_y + 10), (0, 0, 0), -1)
    cv2.putText(img, "HR 72", (w - 80, h - 8), font, 0.42, green, 1, cv2.LINE_AA)
    cv2.putText(img, "16 cm", (6, h - 50), font, 0.42, white, 1, cv2.LINE_AA)
    return img, geo


# ------------------------------------------------------------------------------------ recording
def write_recording(folder: str | os.PathLike, frames: np.ndarray, fps: float = 30.0,
                    with_pose: bool = True) -> Path:
    """Record gray frames [n, H, W] with SessionRecorder (pose = a translation by the index)."""
    from devices.recorder import SessionRecorder
    with SessionRecorder(folder, source_name="bench", meta={"kind": "sample"}, fps=fps) as rec:
        for i, img in enumerate(frames):
            pose = np.eye(4)
            pose[0, 3] = i
            rec.append(Frame(image=img, t=i / fps, index=i, pose=pose if with_pose else None),
                       extra={"i": i})
    return Path(folder)


# ------------------------------------------------------------------------------------ benchmark
def _time_source(source, n_expected: int) -> tuple[float, float, int]:
    """(open ms, frames/s over the reads, frames read) for one unpaced pass."""
    from devices.base import EndOfStream
    t0 = time.perf_counter()
    source.open()
    t1 = time.perf_counter()
    n = 0
    try:
        while n < n_expected:
            if source.read(timeout=5.0) is None:
                break
            n += 1
    except EndOfStream:
        pass
    t2 = time.perf_counter()
    source.close()
    return 1e3 * (t1 - t0), n / max(t2 - t1, 1e-9), n


def _bench_igtl(frames: np.ndarray) -> tuple[float, float, int]:
    """Lockstep over loopback: send one frame, wait until the client source returns it."""
    from devices.igtl import IGTLinkServer, IGTLinkSource
    with IGTLinkServer("127.0.0.1", 0) as server:
        source = IGTLinkSource("127.0.0.1", server.port, connect_timeout_s=5.0)
        t0 = time.perf_counter()
        source.open()
        while server.clients == 0 and time.perf_counter() - t0 < 5.0:
            time.sleep(0.001)
        t1 = time.perf_counter()
        n = 0
        for i, img in enumerate(frames):
            server.send(Frame(image=img, t=float(i), index=i, pose=np.eye(4)))
            if source.read(timeout=5.0) is None:
                break
            n += 1
        t2 = time.perf_counter()
        source.close()
    return 1e3 * (t1 - t0), n / max(t2 - t1, 1e-9), n


def run_source_bench(n_frames: int = 30, height: int = 480, width: int = 640, progress: bool = True) -> dict:
    """Write one sample per source kind to a temp folder and time an unpaced pass over each.

    Returns:
        {"config": {...}, "results": [{"kind", "format", "frames", "open_ms", "fps", "file_mb"}, ...]}
    """
    from devices.dicom import DicomCineSource
    from devices.recorder import RecordingSource
    from devices.video import VideoSource

    frames = cine_frames(n_frames, height, width)
    cases: list[tuple[str, str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pocus_bench_") as tmp:
        tmp = Path(tmp)

        def video(name: str, **opts: Any):
            return lambda: (VideoSource(str(tmp / name), realtime=False, **opts), tmp / name)

        def dicom(name: str, photometric: str, syntax: str):
            def make():
                path = write_dicom(tmp / name, frames, photometric, syntax)
                return DicomCineSource(str(path), realtime=False, cache=False), path
            return make

        cases = [
            ("video", "AVI MJPG", lambda: (write_video(tmp / "clip.avi", frames), video("clip.avi")())[1]),
            ("video", "MP4 mp4v", lambda: (write_video(tmp / "clip.mp4", frames), video("clip.mp4")())[1]),
            ("dicom", "uncompressed RGB", dicom("explicit.dcm", "RGB", "explicit")),
            ("dicom", "uncompressed MONOCHROME2", dicom("mono.dcm", "MONOCHROME2", "explicit")),
            ("dicom", "RLE Lossless RGB", dicom("rle.dcm", "RGB", "rle")),
            ("dicom", "JPEG Baseline YBR_FULL_422", dicom("jpeg.dcm", "YBR_FULL_422", "jpeg")),
            ("dicom", "JPEG 2000 lossless RGB", dicom("j2k.dcm", "RGB", "j2k")),
            ("dicom", "JPEG 2000 lossy RGB", dicom("j2k_lossy.dcm", "RGB", "j2k_lossy")),
            ("rec", "session folder", lambda: (RecordingSource(write_recording(tmp / "session", frames)),
                                              tmp / "session" / "frames.bin")),
        ]
        screen = np.stack([scanner_screen(i / 30.0)[0] for i in range(min(n_frames, 30))])
        cases.append(("video", "screen 640x480 + crop_sector",
                      lambda: (write_video(tmp / "screen.avi", screen), video("screen.avi", crop_sector=True)())[1]))
        results = []
        bar = None
        if progress:
            import sys

            from tqdm import tqdm
            bar = tqdm(total=len(cases) + 1, unit="kind", leave=False, disable=not sys.stderr.isatty())
        for kind, fmt, make in cases:
            source, path = make()
            open_ms, fps, n = _time_source(source, n_frames)
            results.append({"kind": kind, "format": fmt, "frames": n, "open_ms": round(open_ms, 2),
                            "fps": round(fps, 1), "file_mb": round(Path(path).stat().st_size / 2**20, 3)})
            if bar is not None:
                bar.update(1)
        open_ms, fps, n = _bench_igtl(frames)
        results.append({"kind": "igtl", "format": "loopback lockstep IMAGE+TRANSFORM", "frames": n,
                        "open_ms": round(open_ms, 2), "fps": round(fps, 1), "file_mb": None})
        if bar is not None:
            bar.update(1)
            bar.close()
    config = {"frames": n_frames, "height": height, "width": width, "cpu_count": os.cpu_count(),
              "realtime": False}
    return {"config": config, "results": results}


def format_table(bench: dict) -> str:
    """Plain-text table of run_source_bench's results."""
    cfg = bench["config"]
    lines = [f"source decoding, {cfg['frames']} frames of {cfg['height']}x{cfg['width']} (unpaced, one pass)",
             f"{'kind':<6} {'format':<36} {'frames':>6} {'open ms':>9} {'frames/s':>9} {'MB':>8}"]
    for r in bench["results"]:
        mb = "-" if r["file_mb"] is None else f"{r['file_mb']:.2f}"
        lines.append(f"{r['kind']:<6} {r['format']:<36} {r['frames']:>6} {r['open_ms']:>9.1f} {r['fps']:>9.1f} {mb:>8}")
    return "\n".join(lines)
