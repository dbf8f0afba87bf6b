"""Write synthetic pixels as realistic DICOM files: the tags a real CR/DX/MR export carries."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

SOP_CLASS = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
}
VIEW_POSITION = {"AP": "AP", "LAT": "LL", "LOBL": "LLO", "ROBL": "RLO", "T2_AXIAL": ""}
TRANSFER_SYNTAX = {"none": ExplicitVRLittleEndian, "rle": RLELossless, "jpeg2000": JPEG2000Lossless}


@dataclass(frozen=True)
class Scanner:
    """How one site's equipment stores pixels: the heterogeneity a federation must absorb."""

    manufacturer: str
    modality: str  # CR, DX or MR
    spacing_mm: float
    gain: float
    gamma: float
    noise: float
    photometric: str = "MONOCHROME2"
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    window: tuple[float, float] | None = None  # centre, width in output units
    compression: str = "none"
    spacing_tag: bool = True


def stored_pixels(signal: np.ndarray, scanner: Scanner, rng: np.random.Generator) -> np.ndarray:
    """Signal in [0, 1] -> 12-bit stored values after the scanner's response, noise and LUTs."""
    response = scanner.gain * np.power(np.clip(signal, 0, 1), scanner.gamma)
    response = response + rng.normal(0.0, scanner.noise, size=signal.shape)
    output = np.clip(response, 0, 1) * 4000.0 + 40.0  # output units (after the modality LUT)
    if scanner.photometric == "MONOCHROME1":
        output = 4095.0 - output
    stored = (output - scanner.rescale_intercept) / scanner.rescale_slope
    return np.clip(np.rint(stored), 0, 4095).astype(np.uint16)


def write_dicom(path: Path, pixels: np.ndarray, scanner: Scanner, *, site: str, patient_id: str,
                view: str, birth_date: dt.date, study_date: dt.date, sex: str, seed_key: str) -> None:
    """A single-frame grayscale image with patient, study and acquisition tags."""
    sop_class = SOP_CLASS[scanner.modality]
    sop_instance = generate_uid(entropy_srcs=[seed_key, "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[site, patient_id, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[seed_key, "series"])
    ds.PatientName = f"SYNTH^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date.strftime("%Y%m%d")
    ds.PatientSex = sex
    ds.StudyDate = ds.SeriesDate = study_date.strftime("%Y%m%d")
    ds.AccessionNumber = "A" + hashlib.sha256(seed_key.encode()).hexdigest()[:10].upper()
    ds.InstitutionName = f"{site} spine clinic (synthetic)"
    ds.Manufacturer = scanner.manufacturer
    ds.Modality = scanner.modality
    ds.BodyPartExamined = "LSPINE"
    if scanner.modality == "MR":
        ds.SeriesDescription = "T2 TSE AX"
        ds.ScanningSequence, ds.EchoTime, ds.RepetitionTime = "SE", 100.0, 4000.0
    else:
        ds.ViewPosition = VIEW_POSITION[view]
        ds.SeriesDescription = f"L-SPINE {view}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = scanner.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if scanner.spacing_tag:
        spacing = [f"{scanner.spacing_mm:.4f}"] * 2
        if scanner.modality == "MR":
            ds.PixelSpacing = spacing
        else:
            ds.ImagerPixelSpacing = spacing
    if scanner.rescale_slope != 1.0 or scanner.rescale_intercept != 0.0:
        ds.RescaleSlope = f"{scanner.rescale_slope:g}"
        ds.RescaleIntercept = f"{scanner.rescale_intercept:g}"
        ds.RescaleType = "US"
    if scanner.window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{scanner.window[0]:g}", f"{scanner.window[1]:g}"
    ds.PixelData = pixels.tobytes()
    if scanner.compression != "none":
        # keep the SOP Instance UID derived from seed_key: pydicom would draw a random one, and the
        # same seed would no longer give the same bytes
        ds.compress(TRANSFER_SYNTAX[scanner.compression], pixels, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
