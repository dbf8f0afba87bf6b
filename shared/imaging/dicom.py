"""DICOM -> model-ready float image, honouring what the header says about the pixels.

Order of operations (DICOM PS3.3 C.11 / C.7.6.3): decode -> modality LUT (rescale slope and
intercept) -> VOI LUT or window centre/width -> MONOCHROME1 inversion -> physical crop of a fixed
field of view using the pixel spacing -> resize to the model's input size.

Fallback when pixel spacing is missing or zero: the largest centred square of the image is taken
as the field of view and resized; a warning says so, because anatomy then appears at a scale that
depends on the scanner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


class DicomError(ValueError):
    """A DICOM file that cannot become a model input; the message names the file and the fix."""


@dataclass
class DicomImage:
    pixels: np.ndarray  # float32, (size, size), values in [0, 1]
    modality: str
    warnings: list[str] = field(default_factory=list)


def _pixel_spacing_mm(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """Row and column spacing; PixelSpacing (patient plane) wins over ImagerPixelSpacing (detector)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is None:
            continue
        try:
            dy, dx = float(value[0]), float(value[1])
        except (TypeError, ValueError, IndexError):
            continue
        if dy > 0 and dx > 0 and np.isfinite(dy) and np.isfinite(dx):
            return dy, dx
    return None


def _decode(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        return ds.pixel_array
    except Exception as exc:  # pydicom raises RuntimeError/NotImplementedError/ValueError by codec
        name = getattr(syntax, "name", str(syntax))
        raise DicomError(
            f"{path}: cannot decode pixel data (transfer syntax {name}): {exc}. "
            "Install the matching decoder (pylibjpeg-openjpeg for JPEG 2000, pylibjpeg-libjpeg "
            "for JPEG/JPEG-LS) or re-export the image uncompressed."
        ) from exc


def _select_frame(ds: pydicom.Dataset, arr: np.ndarray, warnings: list[str], path: Path) -> np.ndarray:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        warnings.append(f"{path}: {frames} frames; the middle frame ({frames // 2}) is used")
        return arr[frames // 2]
    return arr


def _to_unit_range(ds: pydicom.Dataset, arr: np.ndarray, frame: np.ndarray) -> np.ndarray:
    values = apply_modality_lut(frame, ds).astype(np.float64)
    has_voi = "VOILUTSequence" in ds or "WindowCenter" in ds
    if has_voi:
        if "VOILUTSequence" in ds and np.array_equal(values, np.rint(values)):
            values = values.astype(np.int64)  # a table VOI LUT is indexed by integer values
        values = apply_voi_lut(values, ds, index=0).astype(np.float64)
        low, high = float(values.min()), float(values.max())
    else:
        # No display window given: a robust window over the image's own intensities.
        low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    unit = np.clip((values - low) / (high - low), 0.0, 1.0)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        unit = 1.0 - unit  # MONOCHROME1: low values are white
    return unit.astype(np.float32)


def _crop_field_of_view(
    image: np.ndarray, spacing: tuple[float, float] | None, fov_mm: float
) -> np.ndarray:
    rows, cols = image.shape
    if spacing is None:
        side = min(rows, cols)
        want_r, want_c = side, side
    else:
        want_r = max(1, int(round(fov_mm / spacing[0])))
        want_c = max(1, int(round(fov_mm / spacing[1])))
    out = np.zeros((want_r, want_c), dtype=np.float32)  # zero padding when the image is smaller
    src_r0, dst_r0 = max(0, (rows - want_r) // 2), max(0, (want_r - rows) // 2)
    src_c0, dst_c0 = max(0, (cols - want_c) // 2), max(0, (want_c - cols) // 2)
    n_r, n_c = min(rows, want_r), min(cols, want_c)
    out[dst_r0 : dst_r0 + n_r, dst_c0 : dst_c0 + n_c] = image[src_r0 : src_r0 + n_r, src_c0 : src_c0 + n_c]
    return out


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    tensor = torch.from_numpy(image)[None, None]
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized[0, 0].clamp(0, 1).numpy()


def read_dicom_image(path: Path | str, size: int, field_of_view_mm: float) -> DicomImage:
    """Read one DICOM file into a (size, size) float32 image in [0, 1], or raise DicomError."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise DicomError(
            f"{path}: not a DICOM file (no 'DICM' prefix or file meta header); check the manifest path"
        ) from exc
    except Exception as exc:
        raise DicomError(f"{path}: corrupt or truncated DICOM ({exc}); re-export the file") from exc
    if "PixelData" not in ds:
        kind = ds.get("SOPClassUID", "unknown SOP class")
        kind = getattr(kind, "name", kind)
        raise DicomError(f"{path}: holds no image pixels ({kind}); remove it from the manifest")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in GRAYSCALE:
        raise DicomError(
            f"{path}: photometric interpretation {photometric or 'missing'} is not grayscale; "
            "spine-fl reads MONOCHROME1/MONOCHROME2 radiographs and MRI only "
            "(colour images are often screenshots with burned-in text): export the original image"
        )
    warnings: list[str] = []
    arr = _decode(ds, path)
    frame = _select_frame(ds, arr, warnings, path)
    if frame.ndim != 2:
        raise DicomError(f"{path}: expected a 2-D image per frame, got shape {frame.shape}")
    unit = _to_unit_range(ds, arr, frame)
    spacing = _pixel_spacing_mm(ds)
    if spacing is None:
        warnings.append(
            f"{path}: pixel spacing missing or zero; the centred square is resized without "
            "physical resampling, so anatomy scale depends on the scanner"
        )
    cropped = _crop_field_of_view(unit, spacing, field_of_view_mm)
    return DicomImage(_resize(cropped, size), str(ds.get("Modality", "")), warnings)
