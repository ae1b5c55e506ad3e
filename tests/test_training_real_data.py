"""Real-data loaders on tiny fixture datasets in the exact EchoNet-Dynamic, CAMUS and generic layouts."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from devices.base import CorruptData, SourceNotFound
from devices.labels import VIEWS, view_index
from training.real_data import detect_layout, load_camus, load_echonet, load_generic, load_real


def write_avi(path: Path, n: int = 6, h: int = 30, w: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (w, h))
    for i in range(n):
        vw.write(np.full((h, w, 3), 30 * i, np.uint8))
    vw.release()


@pytest.fixture
def echonet(tmp_path):
    root = tmp_path / "EchoNet-Dynamic"
    rows = ["FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split"]
    for i, split in enumerate(["TRAIN", "TRAIN", "VAL", "TEST"]):
        name = f"0X{i:04d}"
        write_avi(root / "Videos" / f"{name}.avi")
        rows.append(f"{name},55.0,30.0,70.0,30,40,50,6,{split}")
    (root / "FileList.csv").write_text("\n".join(rows) + "\n")
    return root


def test_echonet(echonet):
    a = load_echonet(echonet, split="train", frames_per_clip=3)
    assert len(a) == 6 and set(a.view) == {view_index("A4C")}
    assert np.isnan(a.quality).all() and (a.action == -1).all() and np.isnan(a.pose).all()
    assert a.images[0].shape == (30, 40) and a.images[0].dtype == np.uint8
    assert len(load_echonet(echonet, frames_per_clip=2)) == 8
    assert detect_layout(echonet) == "echonet"


def test_echonet_missing_video_names_file(echonet):
    (echonet / "Videos" / "0X0002.avi").unlink()
    with pytest.raises(SourceNotFound, match="0X0002.avi"):
        load_echonet(echonet, split="val")


def test_echonet_corrupt_video_and_bad_csv(echonet):
    (echonet / "Videos" / "0X0003.avi").write_bytes(b"garbage")
    with pytest.raises(CorruptData, match="0X0003.avi"):
        load_echonet(echonet, split="test")
    (echonet / "FileList.csv").write_text("Name,Split\nx,TRAIN\n")
    with pytest.raises(ValueError, match="FileName"):
        load_echonet(echonet)


def write_nii(path: Path, data: np.ndarray) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.eye(4)), str(path))


@pytest.fixture
def camus(tmp_path):
    root = tmp_path / "CAMUS_public" / "database_nifti"
    for pid, grades in ((1, ("Good", "Poor")), (2, ("Medium", "Good"))):
        pdir = root / f"patient{pid:04d}"
        pdir.mkdir(parents=True)
        for chamber, grade in zip(("2CH", "4CH"), grades):
            (pdir / f"Info_{chamber}.cfg").write_text(f"ED: 1\nES: 5\nNbFrame: 5\nSex: F\nAge: 60\n"
                                                     f"ImageQuality: {grade}\nEF: 55.0\nFrameRate: 30.0\n")
            img = np.zeros((20, 30), np.uint8)  # stored (width, height)
            img[:, :3] = 255                     # -> after transpose: bright top rows
            for phase in ("ED", "ES"):
                write_nii(pdir / f"patient{pid:04d}_{chamber}_{phase}.nii.gz", img)
                write_nii(pdir / f"patient{pid:04d}_{chamber}_{phase}_gt.nii.gz", img * 0 + 1)
        write_nii(pdir / f"patient{pid:04d}_4CH_half_sequence.nii.gz", np.stack([img] * 7, axis=-1))
    return root.parent


def test_camus(camus):
    assert detect_layout(camus) == "camus"
    a = load_camus(camus, frames_per_clip=4)
    # per patient: 2CH from ED+ES (2 frames), 4CH from the half sequence (4 frames)
    assert len(a) == 12
    assert a.images[0].shape == (30, 20) and a.images[0][0].min() == 255 and a.images[0][-1].max() == 0
    a2c, a4c = view_index("A2C"), view_index("A4C")
    assert list(a.view[:6]) == [a2c] * 2 + [a4c] * 4
    q = a.quality
    assert q[0, a2c] == pytest.approx(0.9) and q[2, a4c] == pytest.approx(0.3) and q[6, a2c] == pytest.approx(0.65)
    assert np.isnan(q[0, [i for i in range(len(VIEWS)) if i != a2c]]).all()


def test_camus_bad_quality_and_missing_image(camus):
    cfg = camus / "database_nifti" / "patient0002" / "Info_2CH.cfg"
    cfg.write_text("ImageQuality: Excellent\n")
    with pytest.raises(ValueError, match="Info_2CH.cfg"):
        load_camus(camus)
    cfg.write_text("ImageQuality: Good\n")
    (camus / "database_nifti" / "patient0002" / "patient0002_2CH_ES.nii.gz").unlink()
    with pytest.raises(SourceNotFound, match="patient0002_2CH_ES.nii.gz"):
        load_camus(camus)


def write_dicom(path: Path, frames: np.ndarray) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.NumberOfFrames, (ds.Rows, ds.Columns) = len(frames), frames.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = frames.astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def generic(tmp_path):
    root = tmp_path / "mydata"
    write_avi(root / "clips" / "a.avi", n=4)
    write_dicom(root / "b.dcm", np.stack([np.full((16, 24), 10 * i, np.uint8) for i in range(5)]))
    root.mkdir(exist_ok=True)
    cv2.imwrite(str(root / "c.png"), np.full((10, 10), 99, np.uint8))
    (root / "labels.csv").write_text("file,view,quality\nclips/a.avi,A4C,0.8\nb.dcm,plax,\nc.png,,\n")
    return root


def test_generic(generic):
    assert detect_layout(generic) == "generic"
    a = load_real(generic, frames_per_clip=3)
    assert len(a) == 3 + 3 + 1
    assert list(a.view) == [view_index("A4C")] * 3 + [view_index("PLAX")] * 3 + [-1]
    assert a.quality[0, view_index("A4C")] == pytest.approx(0.8) and np.isnan(a.quality[3:]).all()
    assert a.images[3].shape == (16, 24) and a.images[5].mean() == 40  # DICOM frames 0, 2, 4
    assert list(a.meta["clip"][:1]) == ["clips/a.avi"]


@pytest.mark.parametrize("row, match", [("c.png,LUNG,", "line 2: unknown view 'LUNG'"),
                                        ("c.png,A4C,1.5", "line 2: quality must be in 0..1"),
                                        ("nothere.png,A4C,", "nothere.png")])
def test_generic_errors(generic, row, match):
    (generic / "labels.csv").write_text(f"file,view,quality\n{row}\n")
    with pytest.raises((ValueError, SourceNotFound), match=match):
        load_generic(generic)


def test_unknown_layout(tmp_path):
    with pytest.raises(SourceNotFound, match="not a known dataset layout"):
        detect_layout(tmp_path)
    with pytest.raises(SourceNotFound, match="does not exist"):
        detect_layout(tmp_path / "nope")
