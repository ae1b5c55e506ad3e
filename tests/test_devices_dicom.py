"""DicomCineSource on multi-frame ultrasound DICOMs written here in every photometric/syntax pair."""
from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from devices.base import CorruptData, InvalidFrame, SourceNotFound, UnsupportedFormat, create_source
from devices.bench import cine_frames, write_dicom
from devices.dicom import DicomCineSource, frame_times_s, pixel_spacing_mm

FRAMES = cine_frames(5, 48, 64, seed=3)

# (photometric, syntax, max abs error, max mean error) against the gray source frames.
CASES = [
    ("MONOCHROME2", "explicit", 0, 0), ("MONOCHROME2", "implicit", 0, 0), ("MONOCHROME2", "rle", 0, 0),
    ("MONOCHROME2", "jpeg", 12, 1.5), ("MONOCHROME2", "j2k", 0, 0), ("MONOCHROME2", "j2k_lossy", 12, 1.5),
    ("RGB", "explicit", 1, 0.5), ("RGB", "rle", 1, 0.5), ("RGB", "j2k", 1, 0.5), ("RGB", "j2k_lossy", 12, 1.5),
    ("YBR_FULL", "explicit", 1, 0.5), ("YBR_FULL", "rle", 1, 0.5), ("YBR_FULL", "j2k", 1, 0.5),
    ("YBR_FULL_422", "explicit", 3, 0.5), ("YBR_FULL_422", "jpeg", 12, 1.5),
]


def _read_all(path, **opts):
    with DicomCineSource(str(path), realtime=False, **opts) as src:
        return src, list(src)


@pytest.mark.parametrize("photometric,syntax,max_err,mean_err", CASES)
def test_photometric_and_syntax(tmp_path, photometric, syntax, max_err, mean_err):
    path = write_dicom(tmp_path / "x.dcm", FRAMES, photometric, syntax)
    src, frames = _read_all(path)
    assert len(frames) == len(FRAMES) and src.n_frames == len(FRAMES)
    err = np.abs(np.stack([f.image for f in frames]).astype(int) - FRAMES)
    assert err.max() <= max_err and err.mean() <= mean_err, (photometric, syntax, err.max(), err.mean())
    assert frames[0].spacing_mm == pytest.approx((0.3, 0.3))  # 0.03 cm regions
    assert src.fps == pytest.approx(25.0)


@pytest.mark.parametrize("lut_bits", [8, 16])
def test_palette_color(tmp_path, lut_bits):
    path = write_dicom(tmp_path / "pal.dcm", FRAMES, "PALETTE COLOR", "explicit", lut_bits=lut_bits)
    _, frames = _read_all(path)
    idx = FRAMES.astype(np.float64)  # LUT: red = green = index, blue = 0.8 * index
    expected = 0.299 * idx + 0.587 * idx + 0.114 * np.clip(np.rint(idx * 0.8), 0, 255)
    got = np.stack([f.image for f in frames]).astype(np.float64)
    assert np.abs(got - expected).max() <= 1.5


def test_frame_time_sources(tmp_path):
    vec = [0.0, 40.0, 20.0, 40.0, 20.0]
    path = write_dicom(tmp_path / "ftv.dcm", FRAMES, frame_time_ms=None, FrameTimeVector=vec)
    src, frames = _read_all(path)
    assert src.timing_source == "FrameTimeVector"
    assert [f.t for f in frames] == pytest.approx([0, 0.04, 0.06, 0.10, 0.12])
    src, _ = _read_all(write_dicom(tmp_path / "cr.dcm", FRAMES, frame_time_ms=None, CineRate=50))
    assert (src.timing_source, src.fps) == ("CineRate", pytest.approx(50.0))
    src, _ = _read_all(write_dicom(tmp_path / "rd.dcm", FRAMES, frame_time_ms=None, RecommendedDisplayFrameRate=20))
    assert (src.timing_source, src.fps) == ("RecommendedDisplayFrameRate", pytest.approx(20.0))
    src, _ = _read_all(write_dicom(tmp_path / "none.dcm", FRAMES, frame_time_ms=None))
    assert src.timing_source.startswith("default") and src.fps == pytest.approx(30.0)


def test_pixel_spacing_fallback(tmp_path):
    path = write_dicom(tmp_path / "ps.dcm", FRAMES, region_spacing_cm=None, pixel_spacing_mm=(0.25, 0.5))
    _, frames = _read_all(path)
    assert frames[0].spacing_mm == pytest.approx((0.25, 0.5))
    _, frames = _read_all(write_dicom(tmp_path / "nops.dcm", FRAMES, region_spacing_cm=None))
    assert frames[0].spacing_mm is None


def test_realtime_pacing_and_loop(tmp_path):
    path = write_dicom(tmp_path / "fast.dcm", FRAMES, frame_time_ms=20.0)
    t0 = time.monotonic()
    with create_source(f"dicom:{path}", loop=True) as src:
        frames = [src.read() for _ in range(2 * len(FRAMES))]
    assert time.monotonic() - t0 >= 0.9 * 0.02 * (2 * len(FRAMES) - 1)
    assert [f.index for f in frames] == list(range(10))
    assert np.array_equal(frames[0].image, frames[5].image)
    assert frames[5].t == pytest.approx(0.1)  # a loop lasts 5 frames x 20 ms


def test_single_frame_and_monochrome1_and_16_bit(tmp_path):
    import pydicom
    path = write_dicom(tmp_path / "one.dcm", FRAMES[:1], "MONOCHROME2", "explicit")
    ds = pydicom.dcmread(path)
    del ds.NumberOfFrames
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(path)
    src, frames = _read_all(path)
    assert len(frames) == 1
    assert np.array_equal(frames[0].image, 255 - FRAMES[0])
    wide = FRAMES.astype(np.uint16) * 16  # 12-bit data stored in 16 bits
    ds = pydicom.dcmread(write_dicom(tmp_path / "w.dcm", FRAMES))
    ds.set_pixel_data(wide, "MONOCHROME2", 12)
    ds.save_as(tmp_path / "w.dcm")
    _, frames = _read_all(tmp_path / "w.dcm")
    assert np.abs(np.stack([f.image for f in frames]).astype(int) - FRAMES).max() <= 1


def test_errors_name_the_file_and_reason(tmp_path):
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    with pytest.raises(SourceNotFound, match="nope.dcm"):
        DicomCineSource(str(tmp_path / "nope.dcm")).open()
    text = tmp_path / "notes.dcm"
    text.write_text("this is not DICOM at all\n" * 20)
    with pytest.raises(UnsupportedFormat, match=r"notes.dcm.*not a DICOM"):
        DicomCineSource(str(text)).open()
    sr = Dataset()  # a structured-report-like object: DICOM, but no image
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.SOPClassUID, sr.Modality = "1.2.840.10008.5.1.4.1.1.88.11", "SR"
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    with pytest.raises(UnsupportedFormat, match=r"sr.dcm.*no pixel data.*Basic Text SR"):
        DicomCineSource(str(tmp_path / "sr.dcm")).open()
    path = write_dicom(tmp_path / "mpeg.dcm", FRAMES)
    ds = pydicom.dcmread(path)
    from pydicom.encaps import encapsulate
    ds.PixelData = encapsulate([f.tobytes() for f in FRAMES])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"  # MPEG-4 AVC/H.264: no decoder
    ds.save_as(path)
    with pytest.raises(UnsupportedFormat, match=r"1\.2\.840\.10008\.1\.2\.4\.102 \(MPEG-4"):
        DicomCineSource(str(path)).open()


def test_truncated_and_corrupt_pixel_data(tmp_path):
    import pydicom
    path = write_dicom(tmp_path / "short.dcm", FRAMES)
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(path)
    with pytest.raises(CorruptData, match=r"short.dcm.*truncated"):
        DicomCineSource(str(path)).open()
    cut = tmp_path / "cut.dcm"
    data = write_dicom(tmp_path / "full.dcm", FRAMES, "RGB", "j2k").read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(CorruptData, match="cut.dcm"):
        DicomCineSource(str(cut)).open()
    bad = tmp_path / "garbled.dcm"
    ds = pydicom.dcmread(write_dicom(tmp_path / "j.dcm", FRAMES, "MONOCHROME2", "j2k"))
    from pydicom.encaps import encapsulate, generate_frames
    frames = [bytes(f[:20]) + b"\x00" * (len(f) - 20) for f in generate_frames(ds.PixelData, number_of_frames=5)]
    ds.PixelData = encapsulate(frames)
    ds.save_as(bad)
    with pytest.raises(CorruptData, match=r"garbled.dcm frame 0.*JPEG 2000"):
        DicomCineSource(str(bad)).open()


def test_zero_size_and_nan_frames(tmp_path):
    import pydicom
    path = write_dicom(tmp_path / "zero.dcm", FRAMES)
    ds = pydicom.dcmread(path)
    ds.Rows = 0
    ds.save_as(path)
    with pytest.raises(InvalidFrame, match="zero.dcm.*Rows=0"):
        DicomCineSource(str(path)).open()
    ds = pydicom.dcmread(write_dicom(tmp_path / "f.dcm", FRAMES))
    floats = FRAMES.astype(np.float32) / 255.0
    floats[0, 3, 3] = np.nan
    del ds.PixelData
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.FloatPixelData = floats.tobytes()
    ds.save_as(tmp_path / "f.dcm")
    with pytest.raises(InvalidFrame, match=r"f.dcm frame 0.*NaN"):
        DicomCineSource(str(tmp_path / "f.dcm")).open()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(1.0, 200.0), min_size=1, max_size=20))
def test_frame_time_vector_property(increments):
    from pydicom.dataset import Dataset
    ds = Dataset()
    ds.FrameTimeVector = [0.0] + increments
    t, source = frame_times_s(ds, len(increments) + 1)
    assert source == "FrameTimeVector" and t[0] == 0.0
    assert np.allclose(np.diff(t), np.array(increments) / 1000.0, rtol=1e-6)
    ds.FrameTime = 25.0  # a vector of the wrong length falls back to FrameTime
    t, source = frame_times_s(ds, len(increments) + 3)
    assert source == "FrameTime" and np.allclose(np.diff(t), 0.025)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.sampled_from([3, 4]), st.floats(0.001, 1.0),
                          st.integers(10, 800), st.integers(10, 600)), min_size=0, max_size=4))
def test_region_spacing_property(regions):
    from pydicom.dataset import Dataset
    ds = Dataset()
    items = []
    for fmt, units, delta, w, h in regions:
        r = Dataset()
        r.RegionSpatialFormat, r.PhysicalUnitsXDirection, r.PhysicalUnitsYDirection = fmt, units, units
        r.PhysicalDeltaX, r.PhysicalDeltaY = delta, 2 * delta
        r.RegionLocationMinX0, r.RegionLocationMinY0, r.RegionLocationMaxX1, r.RegionLocationMaxY1 = 0, 0, w, h
        items.append(r)
    ds.SequenceOfUltrasoundRegions = items
    usable = [(w * h, d) for fmt, units, d, w, h in regions if fmt == 1 and units == 3]
    got = pixel_spacing_mm(ds)
    if not usable:
        assert got is None
    else:
        delta = max(usable, key=lambda a: a[0])[1]
        assert got == pytest.approx((20 * delta, 10 * delta))


def test_crop_sector_on_a_screen_export(tmp_path):
    import cv2
    from devices.bench import scanner_screen
    screens = [scanner_screen(i / 30.0) for i in range(8)]
    gray = np.stack([cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) for img, _ in screens])
    path = write_dicom(tmp_path / "screen.dcm", gray, "MONOCHROME2", "explicit")
    _, frames = _read_all(path, crop_sector=True)
    x0, y0, x1, y1 = screens[0][1].bbox
    assert len(frames) == 8 and len({f.image.shape for f in frames}) == 1
    assert abs(frames[0].image.shape[0] - (y1 - y0)) <= 6 and abs(frames[0].image.shape[1] - (x1 - x0)) <= 6
