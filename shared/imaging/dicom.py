"""DICOM -> model-ready float image, honouring what the header says about the pixels.

Order of operations (DICOM PS3.3 C.11 / C.7.6.3): decode -> modality LUT (rescale slope and
intercept) -> VOI LUT or window centre/width -> MONOCHROME1 inversion -> physical crop of a fixed
field of view using the pixel spacing -> resize to the model's input size.

Fallback when pixel spacing is missing or zero: the largest centred square of the image is taken
as the field of view and resized; a warning says so, because anatomy then appears at a scale that
depends on the scanner.

Every file is judged by its header before any pixel is decoded, so a bad file costs neither time
nor memory: folders, pipes and empty files are refused unopened; the header is read with large
elements deferred; objects without pixels (RT plans, reports, DICOMDIR), colour images, a missing
photometric interpretation, the wrong modality (a missing Modality tag is read, with a warning,
only when the SOP class says an accepted modality), a BitsAllocated no uncompressed layout has,
matrices above 8192 x 8192 pixels (MAX_PIXELS) or
below 32 pixels a side (MIN_SIDE), pixel data above 1 GiB (MAX_PIXEL_BYTES) and pixel data shorter
than the header promises (a truncated file) are refused with a message naming the file and the fix.
A multi-frame file (a 3-D volume) is read one frame, the middle one, with a warning. Anything
else that goes wrong becomes a DicomError too: no reader exception reaches the user.
"""

from __future__ import annotations

import logging
import warnings as pywarnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import DeflatedExplicitVRLittleEndian

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
MAX_SIDE = 8192
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # per frame: decoding and windowing stay within a few GiB
MAX_PIXEL_BYTES = 1 << 30  # the whole pixel data element (all frames), read into memory to decode
MIN_SIDE = 32  # smaller is a thumbnail or an icon, not a diagnostic image
DEFER = "256 KB"  # header elements larger than this are left on disk until needed


class DicomError(ValueError):
    """A DICOM file that cannot become a model input; the message names the file and the fix."""


class DicomModalityError(DicomError):
    """The file is an image of another modality than the task's view: the wrong series was exported."""

    def __init__(self, message: str, modality: str):
        super().__init__(message)
        self.modality = modality


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


def _check_file(path: Path) -> None:
    """Refuse what is not a regular, non-empty file before opening it (a pipe would block)."""
    if path.is_dir():
        raise DicomError(f"{path}: is a folder, not a DICOM file; list the image file itself, not its folder")
    if not path.is_file():
        raise DicomError(f"{path}: not a regular file (a pipe, socket or device); list a DICOM image file")
    if path.stat().st_size == 0:
        raise DicomError(f"{path}: empty file (0 bytes): the export or copy did not finish; re-export it")


def _read_header(path: Path) -> pydicom.Dataset:
    """The dataset with large elements (the pixels) left on disk: refusals cost no memory."""
    try:
        return pydicom.dcmread(path, defer_size=DEFER)
    except InvalidDicomError as exc:
        raise DicomError(
            f"{path}: not a DICOM file (no 'DICM' prefix or file meta header); check the manifest path"
        ) from exc
    except Exception as exc:
        raise DicomError(f"{path}: corrupt or truncated DICOM ({exc}); re-export the file") from exc


def _sop_class_name(ds: pydicom.Dataset) -> str:
    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    return str(getattr(uid, "name", uid)) if uid else "unknown SOP class"


def _check_pixels_present(ds: pydicom.Dataset, path: Path) -> None:
    """No pixel data: a truncated image, or an object that is not an image at all."""
    if "PixelData" in ds:
        return
    kind = _sop_class_name(ds)
    if len(ds) == 0:
        raise DicomError(f"{path}: nothing after the file meta header (no pixel data): the file is truncated; "
                         "re-export or copy it again")
    if "Image" in kind or "Rows" in ds:
        raise DicomError(f"{path}: no pixel data although its SOP class is {kind}: the file is probably truncated "
                         "or was exported without pixels; re-export it")
    raise DicomError(f"{path}: holds no image pixels: its SOP class is {kind}, not an image (e.g. an RT plan, "
                     "a report or a DICOMDIR index); remove it from the manifest and list the image file")


def _check_photometric(ds: pydicom.Dataset, path: Path) -> None:
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if not photometric:
        raise DicomError(f"{path}: PhotometricInterpretation (0028,0004) missing: the header does not say how pixel "
                         "values map to grey levels; re-export the image with its full header")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric not in GRAYSCALE or samples != 1:
        raise DicomError(
            f"{path}: photometric interpretation {photometric} ({samples} sample(s) per pixel) is not grayscale; "
            "spine-fl reads MONOCHROME1/MONOCHROME2 radiographs and MRI only "
            "(colour images are often screenshots with burned-in text): export the original image"
        )


def _check_matrix(ds: pydicom.Dataset, path: Path) -> tuple[int, int, int]:
    """Rows, columns and frames from the header, refused outside the limits before any decoding."""
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise DicomError(f"{path}: Rows or Columns missing from the header; re-export the image with its full header")
    rows, cols = int(rows), int(cols)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows * cols > MAX_PIXELS:
        raise DicomError(f"{path}: matrix of {rows} x {cols} pixels exceeds the limit of {MAX_SIDE} x {MAX_SIDE} "
                         "(refused before decoding, to bound memory); export the original image, not a stitched "
                         "or upsampled one")
    if min(rows, cols) < MIN_SIDE:
        raise DicomError(f"{path}: {rows} x {cols} pixels is too small for a diagnostic image (at least {MIN_SIDE} "
                         "a side): probably a thumbnail or icon; export the original image")
    return rows, cols, max(frames, 1)


# The image storage SOP classes that say the modality by themselves (DICOM PS3.4 B.5); a file
# without its Modality tag whose SOP class names an accepted modality is read, with a warning.
SOP_CLASS_MODALITY = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1": "DX",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.2": "CT",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1": "CT",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4": "MR",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1": "MR",  # Enhanced MR Image Storage
}


def _check_modality(ds: pydicom.Dataset, path: Path, modalities: tuple[str, ...]) -> str | None:
    """Another modality than the view's: DicomModalityError (the wrong series). No Modality tag: read
    when the SOP class says an accepted modality (a warning, returned), else a DicomError for this file."""
    modality = str(ds.get("Modality", "")).strip()
    if not modalities or modality in modalities:
        return None
    if modality:
        raise DicomModalityError(f"{path}: modality {modality}; expected {'/'.join(modalities)}", modality)
    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID")
    implied = SOP_CLASS_MODALITY.get(str(uid or "").strip())
    if implied in modalities:
        return (f"{path}: Modality (0008,0060) missing from the header; its SOP class ({_sop_class_name(ds)}) "
                f"says {implied}, which the view accepts, so it is read as {implied}")
    said = f"its SOP class ({_sop_class_name(ds)}) says {implied}" if implied else \
        f"its SOP class ({_sop_class_name(ds)}) does not say the modality either"
    raise DicomError(f"{path}: Modality (0008,0060) missing from the header and {said}; the view needs "
                     f"{'/'.join(modalities)}: re-export the image with its full header (anonymisation tools "
                     "sometimes strip the Modality tag), or check that it is the right series")


def _encapsulated(ds: pydicom.Dataset) -> bool:
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    return bool(getattr(syntax, "is_encapsulated", False))


def _check_bits(ds: pydicom.Dataset, path: Path) -> None:
    """Uncompressed pixels are laid out as BitsAllocated says: a value that no layout has (e.g. 12)
    is a header that contradicts its own pixel data, not a missing decoder."""
    if _encapsulated(ds) or "BitsAllocated" not in ds:
        return
    try:
        bits = int(ds.BitsAllocated)
    except (TypeError, ValueError):
        bits = -1
    stored = ds.get("BitsStored")
    if bits == 1 or (bits > 0 and bits % 8 == 0 and bits <= 64):
        return
    also = f" (BitsStored {stored})" if stored is not None else ""
    raise DicomError(f"{path}: inconsistent header: BitsAllocated (0028,0100) is {ds.BitsAllocated}{also}, but "
                     "uncompressed pixel data are stored in 1, 8, 16, 32 or 64 bits per sample; the header does not "
                     "describe its own pixels (often a tool that rewrote BitsStored into BitsAllocated): re-export "
                     "the image from the original study")


def _check_length(ds: pydicom.Dataset, path: Path, rows: int, cols: int, frames: int) -> None:
    """Pixel data as long as the header promises (uncompressed), and small enough to read."""
    element = ds.get_item("PixelData", keep_deferred=True)
    declared = int(getattr(element, "length", 0) or 0)
    value = getattr(element, "value", None)
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    encapsulated = bool(getattr(syntax, "is_encapsulated", False)) or declared == 0xFFFFFFFF
    if encapsulated:
        if path.stat().st_size > MAX_PIXEL_BYTES:
            raise DicomError(f"{path}: {path.stat().st_size / 2**20:.0f} MiB exceeds the {MAX_PIXEL_BYTES >> 20} MiB "
                             "limit; export the single image (or slice) the task needs")
        return
    bits = int(ds.get("BitsAllocated", 16) or 16)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    expected = (rows * cols * frames * samples * bits + 7) // 8
    if expected > MAX_PIXEL_BYTES:
        raise DicomError(f"{path}: pixel data of {expected / 2**20:.0f} MiB ({frames} frames of {rows} x {cols}) exceed "
                         f"the {MAX_PIXEL_BYTES >> 20} MiB limit; export the single image (or slice) the task needs")
    if value is not None:
        available = len(value)
    elif hasattr(element, "value_tell") and syntax != DeflatedExplicitVRLittleEndian:  # inflated in memory
        available = min(declared, path.stat().st_size - int(element.value_tell))
    else:
        available = declared
    if available < expected:
        raise DicomError(f"{path}: pixel data hold {available} bytes but the header ({rows} x {cols} pixels, "
                         f"{frames} frame(s), {bits} bits) needs {expected} bytes: the file is truncated or its header "
                         "is wrong; re-export it")


def _decode(ds: pydicom.Dataset, path: Path, frames: int) -> np.ndarray:
    """One 2-D frame: the middle one of a multi-frame file, decoded alone."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        if frames > 1:
            ds.pixel_array_options(index=frames // 2)
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises RuntimeError/NotImplementedError/ValueError by codec
        name = getattr(syntax, "name", str(syntax))
        if not _encapsulated(ds):  # uncompressed: no decoder is involved; the header and the pixels disagree
            raise DicomError(
                f"{path}: cannot read the uncompressed pixel data (transfer syntax {name}): {exc}. The header is "
                "inconsistent with its pixel data: re-export the image from the original study."
            ) from exc
        raise DicomError(
            f"{path}: cannot decode pixel data (transfer syntax {name}): {exc}. "
            "Install the matching decoder (pylibjpeg-openjpeg for JPEG 2000, pylibjpeg-libjpeg "
            "for JPEG/JPEG-LS) or re-export the image uncompressed."
        ) from exc
    if arr.ndim == 3 and frames > 1 and arr.shape[0] == frames:  # a decoder that ignored the index
        arr = arr[frames // 2]
    return arr


def _to_unit_range(ds: pydicom.Dataset, frame: np.ndarray) -> np.ndarray:
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


def _fov_pixels(spacing: tuple[float, float] | None, fov_mm: float, path: Path) -> None:
    """The crop is allocated at the header's spacing: refuse a spacing that would make it huge."""
    if spacing is None:
        return
    want = max(fov_mm / spacing[0], fov_mm / spacing[1])
    if want > MAX_SIDE:
        raise DicomError(f"{path}: pixel spacing {min(spacing):g} mm is implausible: a {fov_mm:g} mm field of view "
                         f"would need {want:.0f} pixels a side (limit {MAX_SIDE}); check PixelSpacing / "
                         "ImagerPixelSpacing in the export")


def _read(path: Path, size: int, field_of_view_mm: float, modalities: tuple[str, ...]) -> DicomImage:
    _check_file(path)
    ds = _read_header(path)
    _check_pixels_present(ds, path)
    _check_photometric(ds, path)
    rows, cols, frames = _check_matrix(ds, path)
    modality_warning = _check_modality(ds, path, modalities)
    _check_bits(ds, path)
    _check_length(ds, path, rows, cols, frames)
    spacing = _pixel_spacing_mm(ds)
    _fov_pixels(spacing, field_of_view_mm, path)
    warnings: list[str] = [modality_warning] if modality_warning else []
    if frames > 1:
        warnings.append(f"{path}: {frames} frames (a multi-frame file or 3-D volume); the middle frame "
                        f"({frames // 2}) is used: export the one slice the task needs if that is not it")
    frame = _decode(ds, path, frames)
    if frame.ndim != 2:
        raise DicomError(f"{path}: expected a 2-D image per frame, got shape {frame.shape}")
    if frame.dtype.kind == "f" and not np.isfinite(frame).all():
        raise DicomError(f"{path}: pixel values are not all finite numbers; re-export the image")
    unit = _to_unit_range(ds, frame)
    if spacing is None:
        warnings.append(
            f"{path}: pixel spacing missing or zero; the centred square is resized without "
            "physical resampling, so anatomy scale depends on the scanner"
        )
    cropped = _crop_field_of_view(unit, spacing, field_of_view_mm)
    return DicomImage(_resize(cropped, size), str(ds.get("Modality", "")).strip(), warnings)


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom warns, and logs decoder failures with their traceback; here each becomes one message."""
    logger = logging.getLogger("pydicom")  # the level also holds its child loggers (pydicom.pixels...)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with pywarnings.catch_warnings():
            pywarnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def read_dicom_image(path: Path | str, size: int, field_of_view_mm: float,
                     modalities: tuple[str, ...] = ()) -> DicomImage:
    """Read one DICOM file into a (size, size) float32 image in [0, 1], or raise DicomError.

    `modalities`, when given, are the ones the task's view accepts: another raises DicomModalityError
    before decoding. pydicom's warnings and log records are silenced: what matters becomes the message.
    """
    path = Path(path)
    try:
        with _quiet_pydicom():
            return _read(path, size, field_of_view_mm, modalities)
    except DicomError:
        raise
    except MemoryError as exc:
        raise DicomError(f"{path}: too large to decode in the memory available; export a smaller image") from exc
    except Exception as exc:  # a malformed tag value, a codec failure deep in a plugin: never a traceback
        raise DicomError(f"{path}: corrupt or inconsistent DICOM ({type(exc).__name__}: {exc}); re-export the file") from exc
