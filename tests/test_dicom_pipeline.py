"""The DICOM pipeline on real files from pydicom-data and pydicom's own test files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from data_store import DataStore

from spine_fl.shared.imaging.dicom import DicomError, read_dicom_image

DATA_STORE = DataStore().data_path
PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"


def _image_files() -> list[Path]:
    """Every DICOM in pydicom-data (and pydicom's test set) that carries pixel data."""
    found = []
    for path in sorted(list(DATA_STORE.glob("*.dcm")) + list(PYDICOM_FILES.glob("*.dcm"))):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=False, force=True)
        except Exception:
            continue
        if "PixelData" in ds:
            found.append(path)
    return found


IMAGE_FILES = _image_files()


def test_enough_real_files_found() -> None:
    assert len(IMAGE_FILES) >= 60


@pytest.mark.parametrize("path", IMAGE_FILES, ids=lambda p: p.name)
def test_every_real_dicom_becomes_a_tensor_or_a_clear_refusal(path: Path) -> None:
    try:
        image = read_dicom_image(path, 32, 100.0)
    except DicomError as exc:
        message = str(exc)
        assert str(path) in message  # names the file
        assert any(w in message for w in ("not grayscale", "cannot decode", "no image pixels", "not a DICOM", "corrupt", "2-D",
                                          "truncated", "too small", "exceeds", "missing"))
        return
    assert image.pixels.shape == (32, 32)
    assert image.pixels.dtype == np.float32
    assert np.isfinite(image.pixels).all()
    assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "MR2_UNCR.dcm", "MR2_J2KR.dcm",
                                  "emri_small_jpeg_ls_lossless.dcm", "JPEG-LL.dcm", "emri_small_RLE.dcm"])
def test_compressed_and_uncompressed_radiographs_and_mri_decode(name: str) -> None:
    image = read_dicom_image(DATA_STORE / name, 64, 100.0)
    assert image.pixels.std() > 0.01  # real content, not a blank frame


def test_lossless_compression_gives_the_same_image() -> None:
    plain = read_dicom_image(DATA_STORE / "MR2_UNCR.dcm", 64, 100.0).pixels
    j2k = read_dicom_image(DATA_STORE / "MR2_J2KR.dcm", 64, 100.0).pixels
    assert np.allclose(plain, j2k, atol=1e-5)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    ds = pydicom.dcmread(DATA_STORE / "MR2_UNCR.dcm")
    normal = read_dicom_image(DATA_STORE / "MR2_UNCR.dcm", 64, 100.0).pixels
    ds.PhotometricInterpretation = "MONOCHROME1"
    flipped_path = tmp_path / "mono1.dcm"
    ds.save_as(flipped_path)
    inverted = read_dicom_image(flipped_path, 64, 100.0).pixels
    assert np.allclose(inverted, 1.0 - normal, atol=1e-5)


def test_pixel_spacing_sets_the_physical_field_of_view(tmp_path: Path) -> None:
    """Halving the stated spacing halves the area shown: the image must look zoomed out."""
    src = DATA_STORE / "MR2_UNCR.dcm"
    ds = pydicom.dcmread(src)
    full = read_dicom_image(src, 64, 40.0)
    ds.PixelSpacing = [str(float(v) * 2) for v in ds.PixelSpacing]
    coarse = tmp_path / "coarse.dcm"
    ds.save_as(coarse)
    zoomed_out = read_dicom_image(coarse, 64, 40.0)
    assert not full.warnings and not zoomed_out.warnings
    assert not np.allclose(full.pixels, zoomed_out.pixels, atol=0.05)


def test_missing_pixel_spacing_falls_back_with_a_warning(tmp_path: Path) -> None:
    ds = pydicom.dcmread(DATA_STORE / "MR2_UNCR.dcm")
    del ds.PixelSpacing
    path = tmp_path / "nospacing.dcm"
    ds.save_as(path)
    image = read_dicom_image(path, 32, 100.0)
    assert image.pixels.shape == (32, 32)
    assert any("pixel spacing missing" in w for w in image.warnings)


def test_corrupt_and_non_image_files_are_refused(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes((DATA_STORE / "MR2_UNCR.dcm").read_bytes()[:4000])
    with pytest.raises(DicomError, match="truncated.dcm"):
        read_dicom_image(truncated, 32, 100.0)
    text = tmp_path / "notes.dcm"
    text.write_text("patient notes")
    with pytest.raises(DicomError, match="not a DICOM file"):
        read_dicom_image(text, 32, 100.0)
    with pytest.raises(DicomError, match="no image pixels"):
        read_dicom_image(PYDICOM_FILES / "rtplan.dcm", 32, 100.0)


def test_multiframe_takes_the_middle_frame() -> None:
    image = read_dicom_image(DATA_STORE / "liver.dcm", 32, 100.0)
    assert any("middle frame" in w for w in image.warnings)
