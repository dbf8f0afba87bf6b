"""Issue 11, part 2: every bad input a site can hand the validator is answered early and clearly.

One tiny site per class of problem, built in tmp_path: the validator must give a verdict (usable,
with a warning; or unusable, with an error), name the culprit (file, CSV line, column) and say
what to do, never raise, never read outside the site folder, and never decode a huge matrix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tracemalloc
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from typer.testing import CliRunner

from spine_fl.cli import app
from spine_fl.shared.contract.data_contract import ValidationReport, validate_and_load
from spine_fl.shared.contract.tasks import get_task

RUNNER = CliRunner()
SPINE_FL = Path(sys.executable).parent / "spine-fl"
N_PATIENTS = 10
VICTIM = "P03"  # clinical.csv line 4, manifest.csv line 4
HEADER = "patient_id,age,sex,nrs_baseline,nrs_2months,symptom_duration_weeks,split"
IMAGE_TASK = "tfesi_fusion"  # one MR view plus clinical features with plausible ranges


# ---------------------------------------------------------------- writing tiny sites


def write_mr(path: Path, *, rows: int = 64, cols: int = 64, frames: int = 1, modality: str = "MR",
             pixels: np.ndarray | None = None, rgb: bool = False, seed: int = 0) -> None:
    """A small, valid single- or multi-frame MR file (the tags a scanner export carries)."""
    meta = FileMetaDataset()
    sop_class = "1.2.840.10008.5.1.4.1.1.4" if modality == "MR" else "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = path.stem
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = ["1.5", "1.5"]
    if pixels is None:
        rng = np.random.default_rng(seed)
        shape = (frames, rows, cols) if frames > 1 else (rows, cols)
        pixels = (np.linspace(0, 3000, rows * cols).reshape(rows, cols) + rng.normal(0, 50, shape)).clip(0, 4095)
    if rgb:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        data = np.repeat((pixels / 16).astype(np.uint8)[..., None], 3, axis=-1)
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        data = pixels.astype(np.uint16)
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = data.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _clinical_rows() -> list[str]:
    rows = []
    for i in range(1, N_PATIENTS + 1):
        follow = 2 if i % 2 else 7  # odd patients favourable (8 -> 2), even ones not (8 -> 7)
        split = "train" if i <= 6 else "test"
        rows.append(f"P{i:02d},{40 + i},{'F' if i % 2 else 'M'},8,{follow},{10 + i},{split}")
    return rows


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean MR site of ten patients (6 train, 4 test, both outcomes in each)."""
    site = tmp_path_factory.mktemp("template") / "site"
    lines = ["patient_id,view,path"]
    for i in range(1, N_PATIENTS + 1):
        write_mr(site / "dicom" / f"P{i:02d}.dcm", seed=i)
        lines.append(f"P{i:02d},T2_AXIAL,dicom/P{i:02d}.dcm")
    (site / "manifest.csv").write_text("\n".join(lines) + "\n")
    (site / "clinical.csv").write_text("\n".join([HEADER, *_clinical_rows()]) + "\n")
    return site


def _edit_csv(site: Path, name: str, edit: Callable[[list[str]], list[str]]) -> None:
    path = site / name
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")


def _set(column: str, value: str, pid: str = VICTIM) -> Callable[[Path], None]:
    """Set one clinical value of one patient."""
    def edit(site: Path) -> None:
        def change(lines: list[str]) -> list[str]:
            header = lines[0].split(",")
            out = [lines[0]]
            for line in lines[1:]:
                fields = line.split(",")
                if fields[0] == pid:
                    fields[header.index(column)] = value
                out.append(",".join(fields))
            return out
        _edit_csv(site, "clinical.csv", change)
    return edit


def _drop_column(name: str, column: str) -> Callable[[Path], None]:
    def edit(site: Path) -> None:
        def change(lines: list[str]) -> list[str]:
            i = lines[0].split(",").index(column)
            return [",".join(f for j, f in enumerate(line.split(",")) if j != i) for line in lines]
        _edit_csv(site, name, change)
    return edit


def _victim_file(write: Callable[[Path], None]) -> Callable[[Path], None]:
    """Replace the victim's DICOM file (dicom/P03.dcm) with something else."""
    def edit(site: Path) -> None:
        path = site / "dicom" / f"{VICTIM}.dcm"
        path.unlink()
        write(path)
    return edit


def _copy_testdata(name: str) -> Callable[[Path], None]:
    source = get_testdata_file(name)
    assert source is not None and Path(source).is_file(), f"pydicom test file {name} not available offline"
    return _victim_file(lambda path: shutil.copyfile(source, path))


def _cut(keep: int) -> Callable[[Path], None]:
    """Truncate the victim's DICOM: keep the first `keep` bytes (negative: drop that many at the end)."""
    def edit(site: Path) -> None:
        path = site / "dicom" / f"{VICTIM}.dcm"
        data = path.read_bytes()
        path.write_bytes(data[:keep])
    return edit


def _tags(**changes: object) -> Callable[[Path], None]:
    """Change header tags (None deletes) of the victim's DICOM without touching anything else."""
    def edit(site: Path) -> None:
        path = site / "dicom" / f"{VICTIM}.dcm"
        ds = pydicom.dcmread(path)
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)
    return edit


def _outside_dicom(site: Path) -> Path:
    """A valid DICOM next to (not inside) the site folder."""
    outside = site.parent / "elsewhere" / "secret.dcm"
    write_mr(outside, seed=99)
    return outside


def _manifest_path(path: str, pid: str = VICTIM, view: str = "T2_AXIAL") -> Callable[[Path], None]:
    def edit(site: Path) -> None:
        _outside_dicom(site)
        _edit_csv(site, "manifest.csv", lambda lines: [
            f"{pid},{view},{path}" if line.startswith(f"{pid},{view},") else line for line in lines])
    return edit


def _symlink_file(site: Path) -> None:
    outside = _outside_dicom(site)
    victim = site / "dicom" / f"{VICTIM}.dcm"
    victim.unlink()
    victim.symlink_to(outside)


def _symlink_folder(site: Path) -> None:
    outside = _outside_dicom(site)
    (site / "dicom" / "linked").symlink_to(outside.parent, target_is_directory=True)
    _manifest_path("dicom/linked/secret.dcm")(site)


def _absolute(site: Path) -> None:
    _manifest_path(str(_outside_dicom(site)))(site)


def _fake_xlsx(site: Path) -> None:
    """An Excel workbook saved under the .csv name: a zip archive."""
    path = site / "clinical.csv"
    text = path.read_text()
    path.unlink()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("xl/worksheets/sheet1.xml", text)


def _latin1(site: Path) -> None:
    lines = (site / "clinical.csv").read_text().splitlines()
    lines = [lines[0] + ",surname"] + [line + ("," + ("Müller" if line.startswith(VICTIM) else "Smith")) for line in lines[1:]]
    (site / "clinical.csv").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))


def _semicolons(site: Path) -> None:
    lines = [HEADER.replace(",", ";")]
    for row in _clinical_rows():
        fields = row.split(",")
        fields[5] = fields[5] + ",5"  # symptom duration 11,5 weeks: a decimal comma
        lines.append(";".join(fields))
    (site / "clinical.csv").write_text("\n".join(lines) + "\n")


def _bom(site: Path) -> None:
    path = site / "clinical.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())


def _rows(edit: Callable[[list[str]], list[str]], name: str = "clinical.csv") -> Callable[[Path], None]:
    return lambda site: _edit_csv(site, name, edit)


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _undecodable(path: Path) -> None:
    """JPEG 2000 pixel data that no decoder can read (pydicom logs each decoder's traceback)."""
    write_mr(path)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 200])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)


def _clinical_folder(site: Path) -> None:
    (site / "clinical.csv").unlink()
    (site / "clinical.csv").mkdir()


def _victim_path(path: str) -> Callable[[Path], None]:
    """The victim's manifest row lists `path` (any characters) instead of its file."""
    return _rows(lambda ls: [f"{VICTIM},T2_AXIAL,{path}" if x.startswith(f"{VICTIM},") else x for x in ls],
                 "manifest.csv")


def _utf16(encoding: str) -> Callable[[Path], None]:
    def edit(site: Path) -> None:
        path = site / "clinical.csv"
        path.write_bytes(path.read_text().encode(encoding))
    return edit


def _site_is_file(site: Path) -> None:
    shutil.rmtree(site)
    site.write_text("not a folder")


def _table_linked(name: str, outside: bool) -> Callable[[Path], None]:
    """clinical.csv / manifest.csv as a symbolic link to a copy outside (or inside) the site folder."""
    def edit(site: Path) -> None:
        target = (site.parent if outside else site / "exports") / f"linked_{name}"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(site / name, target)
        (site / name).unlink()
        (site / name).symlink_to(target)
    return edit


# ---------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Case:
    id: str
    mutate: Callable[[Path], None]
    usable: bool
    needles: tuple[str, ...]  # all appear in one problem (where, what, action) of the expected severity
    excluded: str | None = None  # a patient the site must drop (usable cases)
    task: str = IMAGE_TASK
    absent: tuple[str, ...] = ()  # misleading words no finding may contain


VICTIM_FILE = f"dicom/{VICTIM}.dcm"
CASES = [
    # DICOM: an unreadable file excludes its patient (warning); the site stays usable.
    Case("dicom_truncated_pixels", _cut(-3000), True, (VICTIM_FILE, "truncated"), VICTIM),
    Case("dicom_truncated_header", _cut(600), True, (VICTIM_FILE, "truncated"), VICTIM),
    Case("dicom_truncated_meta", _cut(200), True, (VICTIM_FILE, "truncated"), VICTIM),
    Case("dicom_pydicom_truncated", _copy_testdata("MR_truncated.dcm"), True, (VICTIM_FILE, "truncated"), VICTIM),
    Case("dicom_not_dicom", _victim_file(lambda p: p.write_text("scanned referral letter")), True,
         (VICTIM_FILE, "not a DICOM file"), VICTIM),
    Case("dicom_empty_file", _victim_file(lambda p: p.write_bytes(b"")), True, (VICTIM_FILE, "empty"), VICTIM),
    Case("dicom_no_pixel_data", _tags(PixelData=None), True, (VICTIM_FILE, "no pixel data"), VICTIM),
    Case("dicom_rt_plan", _copy_testdata("rtplan.dcm"), True, (VICTIM_FILE, "RT Plan", "not an image"), VICTIM),
    Case("dicom_dicomdir", _copy_testdata("DICOMDIR"), True, (VICTIM_FILE, "Directory", "not an image"), VICTIM),
    Case("dicom_rgb", _victim_file(lambda p: write_mr(p, rgb=True)), True, (VICTIM_FILE, "RGB", "not grayscale"), VICTIM),
    Case("dicom_no_photometric", _tags(PhotometricInterpretation=None), True,
         (VICTIM_FILE, "PhotometricInterpretation", "missing"), VICTIM),
    Case("dicom_huge_matrix", _tags(Rows=20000, Columns=20000), True, (VICTIM_FILE, "20000 x 20000", "8192"), VICTIM),
    Case("dicom_length_mismatch", _tags(PixelData=b"\x00\x01" * (64 * 60)), True,
         (VICTIM_FILE, "7680 bytes", "8192"), VICTIM),
    Case("dicom_blank", _victim_file(lambda p: write_mr(p, pixels=np.full((64, 64), 700.0))), True,
         (VICTIM_FILE, "blank"), VICTIM),
    Case("dicom_tiny", _victim_file(lambda p: write_mr(p, rows=16, cols=16)), True,
         (VICTIM_FILE, "16 x 16", "too small"), VICTIM),
    Case("dicom_folder", _victim_file(lambda p: p.mkdir()), True, (VICTIM_FILE, "is a folder"), VICTIM),
    Case("dicom_undecodable", _victim_file(_undecodable), True, (VICTIM_FILE, "cannot decode"), VICTIM),
    Case("dicom_implausible_spacing", _tags(PixelSpacing=["0.0001", "0.0001"]), True,
         (VICTIM_FILE, "pixel spacing 0.0001 mm is implausible"), VICTIM),
    Case("dicom_fifo", _victim_file(_fifo), True, (VICTIM_FILE, "not a regular file"), VICTIM),
    # No Modality tag: one file's problem, never the whole site's. Read when the SOP class says MR (a
    # warning); excluded, with the fix, when nothing in the header says the modality.
    Case("dicom_no_modality", _tags(Modality=None), True, (VICTIM_FILE, "Modality (0008,0060) missing", "read as MR"),
         absent=("right series",)),
    Case("dicom_no_modality_secondary_capture", _tags(Modality=None, SOPClassUID="1.2.840.10008.5.1.4.1.1.7"), True,
         (VICTIM_FILE, "Modality (0008,0060) missing", "full header"), VICTIM),
    # An uncompressed file whose header contradicts its pixels: no decoder would help.
    Case("dicom_bits_allocated_12", _tags(BitsAllocated=12), True, (VICTIM_FILE, "inconsistent header", "BitsAllocated"),
         VICTIM, absent=("decoder",)),
    # A multi-frame file or 3-D volume is read (middle frame) with a warning naming the file.
    Case("dicom_multiframe_real", _copy_testdata("emri_small.dcm"), True, (VICTIM_FILE, "10 frames", "middle frame")),
    Case("dicom_volume", _victim_file(lambda p: write_mr(p, frames=24)), True, (VICTIM_FILE, "24 frames", "middle frame")),
    # The wrong modality for the task's view: the wrong series was exported (an error).
    Case("dicom_wrong_modality", _copy_testdata("CT_small.dcm"), False, (VICTIM_FILE, "modality CT", "MR")),
    Case("dicom_wrong_modality_cr", _victim_file(lambda p: write_mr(p, modality="CR")), False,
         (VICTIM_FILE, "modality CR", f"patient {VICTIM}")),
    # manifest.csv
    Case("manifest_file_missing", _victim_file(lambda p: None), True, (VICTIM_FILE, "file missing"), VICTIM),
    Case("manifest_column_missing", _drop_column("manifest.csv", "view"), False, ("manifest.csv, column view", "column missing")),
    Case("manifest_view_twice", _rows(lambda ls: [*ls, f"{VICTIM},T2_AXIAL,dicom/P05.dcm"], "manifest.csv"), False,
         ("manifest.csv line 12", f"second T2_AXIAL image for patient {VICTIM}")),
    Case("manifest_view_missing", _rows(lambda ls: [x for x in ls if not x.startswith(VICTIM)], "manifest.csv"), True,
         ("manifest.csv", f"no T2_AXIAL image for patient {VICTIM}"), VICTIM),
    Case("manifest_missing", lambda site: (site / "manifest.csv").unlink(), False, ("manifest.csv", "file missing")),
    Case("manifest_semicolons", _rows(lambda ls: [x.replace(",", ";") for x in ls], "manifest.csv"), False,
         ("manifest.csv", "semicolon", "comma-separated")),
    Case("manifest_dotdot", _manifest_path("../elsewhere/secret.dcm"), False,
         ("manifest.csv line 4", "../elsewhere/secret.dcm", "outside the site folder")),
    Case("manifest_dotdot_other_view", _rows(lambda ls: [*ls, "P01,AP,../elsewhere/secret.dcm"], "manifest.csv"), False,
         ("manifest.csv line 12", "../elsewhere/secret.dcm", "outside the site folder")),
    Case("manifest_absolute", _absolute, False, ("manifest.csv line 4", "secret.dcm", "outside the site folder")),
    Case("manifest_symlink_file", _symlink_file, False, ("manifest.csv line 4", VICTIM_FILE, "outside the site folder")),
    Case("manifest_symlink_folder", _symlink_folder, False,
         ("manifest.csv line 4", "dicom/linked/secret.dcm", "outside the site folder")),
    Case("manifest_nul_in_path", _victim_path(f"dicom/{VICTIM}.dcm\x00x"), False,
         ("manifest.csv line 4, column path", "NUL byte")),
    Case("manifest_path_too_long", _victim_path("dicom/" + "a" * 5000 + ".dcm"), False,
         ("manifest.csv line 4, column path", "too long", "5010 characters")),
    Case("manifest_backslashes", _victim_path(f"dicom\\{VICTIM}.dcm"), True, ("file missing", "manifest paths with '/'",
                                                                          f"dicom/{VICTIM}.dcm"), VICTIM),
    Case("manifest_symlink_outside", _table_linked("manifest.csv", outside=True), False,
         ("manifest.csv", "symbolic link", "outside the site folder")),
    Case("manifest_symlink_inside", _table_linked("manifest.csv", outside=False), True, ()),
    # the site folder itself
    Case("site_is_a_file", _site_is_file, False, ("is a file, not a folder",), absent=("does not exist",)),
    # clinical.csv
    Case("clinical_symlink_outside", _table_linked("clinical.csv", outside=True), False,
         ("clinical.csv", "symbolic link", "outside the site folder")),
    Case("clinical_symlink_inside", _table_linked("clinical.csv", outside=False), True, ()),
    Case("clinical_utf16", _utf16("utf-16"), False, ("clinical.csv line 1", "UTF-16", "UTF-8"), absent=("Latin-1",)),
    Case("clinical_utf16_without_bom", _utf16("utf-16-le"), False, ("clinical.csv", "UTF-16", "UTF-8"),
         absent=("Latin-1",)),
    Case("clinical_duplicate_id", _rows(lambda ls: [*ls, ls[3]]), False, ("clinical.csv line 12", f"patient {VICTIM} already on line 4")),
    Case("clinical_blank_id", _set("patient_id", ""), False, ("clinical.csv line 4, column patient_id", "empty patient id")),
    Case("clinical_label_column_missing", _drop_column("clinical.csv", "nrs_2months"), False,
         ("clinical.csv, column nrs_2months", "column missing")),
    Case("clinical_nan", _set("symptom_duration_weeks", "NaN"), False,
         ("clinical.csv line 4", "column symptom_duration_weeks", "'NaN'")),
    Case("clinical_empty_value", _set("symptom_duration_weeks", ""), False,
         ("clinical.csv line 4", "column symptom_duration_weeks", "missing value")),
    Case("clinical_infinite", _set("symptom_duration_weeks", "inf"), False,
         ("clinical.csv line 4", "column symptom_duration_weeks", "'inf' is not a finite number")),
    Case("clinical_text_in_number", _set("symptom_duration_weeks", "twelve"), False,
         ("clinical.csv line 4", "column symptom_duration_weeks", "'twelve' is not a number")),
    Case("clinical_implausible_age", _set("age", "250"), False, ("clinical.csv line 4", "column age", "250", "plausible")),
    Case("clinical_implausible_age_subgroup", _set("age", "250"), True,
         ("clinical.csv line 4", "column age", "250", "plausible"), task="tfesi_mri"),
    Case("clinical_implausible_pain", _set("nrs_2months", "14"), False,
         ("clinical.csv line 4", "column nrs_2months", "not an NRS score 0-10")),
    Case("clinical_zero_baseline", _set("nrs_baseline", "0"), False,
         ("clinical.csv line 4", "column nrs_baseline", "baseline NRS is 0")),
    Case("clinical_is_folder", _clinical_folder, False, ("clinical.csv", "is a folder")),
    Case("clinical_empty_file", lambda site: (site / "clinical.csv").write_bytes(b""), False, ("clinical.csv", "empty")),
    Case("clinical_header_only", _rows(lambda ls: ls[:1]), False, ("clinical.csv", "no patient rows")),
    Case("clinical_semicolons_decimal_commas", _semicolons, False,
         ("clinical.csv", "semicolon", "comma-separated", "decimal point")),
    Case("clinical_decimal_comma", _set("symptom_duration_weeks", '"13,5"'), False,
         ("clinical.csv line 4", "column symptom_duration_weeks", "decimal comma", "13.5")),
    Case("clinical_xlsx_renamed", _fake_xlsx, False, ("clinical.csv", "Excel", "CSV UTF-8")),
    Case("clinical_latin1", _latin1, False, ("clinical.csv line 4", "UTF-8")),
    Case("clinical_ragged_long", _set("split", "train,extra"), False, ("clinical.csv line 4", "8 fields", "header has 7")),
    Case("clinical_ragged_short", _rows(lambda ls: [x.rsplit(",", 2)[0] if x.startswith(VICTIM) else x for x in ls]), False,
         ("clinical.csv line 4", "5 fields", "header has 7")),
    Case("clinical_single_patient", _rows(lambda ls: ls[:2]), False, ("clinical.csv", "test split", "no labelled patient")),
    Case("clinical_one_outcome_only",
         _rows(lambda ls: [ls[0]] + [",".join(x.split(",")[:4] + ["2"] + x.split(",")[5:]) for x in ls[1:]]), False,
         ("clinical.csv", "train split", "same outcome")),
    Case("clinical_unknown_split", _set("split", "validation"), False,
         ("clinical.csv line 4", "column split", "'validation'")),
    Case("clinical_bom", _bom, True, ()),
]


def _build(template: Path, tmp_path: Path, case: Case) -> Path:
    site = tmp_path / "site"
    shutil.copytree(template, site, symlinks=True)
    case.mutate(site)
    return site


def _find(report: ValidationReport, case: Case, site: Path) -> list[str]:
    severity = "warning" if case.usable else "error"
    texts = [str(p).replace(f"{site}/", "") for p in report.problems if p.severity == severity]
    return [t for t in texts if all(n in t for n in case.needles)]


def test_clean_template_is_usable(template: Path) -> None:
    data, report = validate_and_load(template, get_task(IMAGE_TASK), 32)
    assert report.usable and not report.problems, [str(p) for p in report.problems]
    assert data is not None and len(data) == N_PATIENTS


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_gets_a_verdict_naming_the_culprit(template: Path, tmp_path: Path, case: Case) -> None:
    site = _build(template, tmp_path, case)
    data, report = validate_and_load(site, get_task(case.task), 32)
    problems = "\n".join(map(str, report.problems))
    assert report.usable is case.usable, problems
    assert (data is not None) is case.usable
    if case.needles:
        assert _find(report, case, site), f"no {'warning' if case.usable else 'error'} with {case.needles}:\n{problems}"
    else:
        assert not report.errors and not report.warnings, problems
        assert data is not None and len(data) == N_PATIENTS
    if case.excluded is not None:
        assert data is not None and case.excluded not in set(data.patient_ids)
        assert len(data) == N_PATIENTS - 1
    assert all(p.action.strip() for p in report.problems)  # every finding says what to do
    misleading = [str(p) for p in report.problems if any(word in str(p) for word in case.absent)]
    assert not misleading, misleading
    # The CLI gives the same verdict, without a traceback.
    result = RUNNER.invoke(app, ["validate", str(site), "--task", case.task, "--image-size", "32"])
    assert result.exit_code == (0 if case.usable else 1), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def test_a_path_outside_the_site_is_never_opened(template: Path, tmp_path: Path) -> None:
    """The outside target is a FIFO: opening it would block, so the test would hang if it were read."""
    site = tmp_path / "site"
    shutil.copytree(template, site)
    outside = tmp_path / "pipe.dcm"
    os.mkfifo(outside)
    _edit_csv(site, "manifest.csv", lambda lines: [
        f"{VICTIM},T2_AXIAL,../pipe.dcm" if line.startswith(f"{VICTIM},") else line for line in lines])
    data, report = validate_and_load(site, get_task(IMAGE_TASK), 32)
    assert data is None
    [error] = [p for p in report.errors if "outside the site folder" in p.what]
    assert error.where == f"{site / 'manifest.csv'} line 4, column path"


def test_huge_matrix_is_refused_before_decoding(template: Path, tmp_path: Path) -> None:
    """A header promising 30000 x 30000 pixels, with that many bytes behind it (sparse file): refused
    by the header alone, so memory stays bounded (decoding would allocate gigabytes)."""
    site = tmp_path / "site"
    shutil.copytree(template, site)
    path = site / "dicom" / f"{VICTIM}.dcm"
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 30000
    ds.PixelData = b"\x00\x00"
    ds.save_as(path)
    with path.open("r+b") as handle:  # grow the pixel data element to the promised length, sparsely
        raw = handle.read()
        at = raw.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data
        assert at > 0
        length = 30000 * 30000 * 2
        handle.seek(at + 8)
        handle.write(length.to_bytes(4, "little"))
        handle.truncate(at + 12 + length)
    tracemalloc.start()
    data, report = validate_and_load(site, get_task(IMAGE_TASK), 32)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert report.usable and data is not None and VICTIM not in set(data.patient_ids)
    assert any("30000 x 30000" in p.what for p in report.warnings if p.where == str(path))


def _vertebral_site(tmp_path: Path, n: int, unlabelled: int) -> Path:
    site = tmp_path / "vertebral"
    site.mkdir()
    lines = ["patient_id,pelvic_incidence,pelvic_tilt,lumbar_lordosis_angle,sacral_slope,pelvic_radius,"
             "degree_spondylolisthesis,class,split"]
    for i in range(n):
        label = "" if i < unlabelled else ("AB" if i % 2 else "NO")
        lines.append(f"v{i:03d},50,15,45,35,120,{i % 7},{label},{'test' if i % 5 == 0 else 'train'}")
    (site / "clinical.csv").write_text("\n".join(lines) + "\n")
    return site


def test_repeated_warnings_are_grouped_with_a_count_and_the_first_culprits(tmp_path: Path) -> None:
    site = _vertebral_site(tmp_path, 60, unlabelled=37)
    data, report = validate_and_load(site, get_task("vertebral_column"))
    assert report.usable and data is not None and len(data) == 23
    label_warnings = [p for p in report.warnings if "label missing" in p.what]
    assert len(label_warnings) == 1, [str(p) for p in report.warnings]
    [summary] = label_warnings
    assert summary.what.startswith("37 patients")
    assert "v000 (line 2)" in summary.what and "v004 (line 6)" in summary.what and "v005" not in summary.what
    assert "32 more" in summary.what


def test_warnings_of_one_kind_with_different_values_are_grouped(template: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(template, site)
    for i in range(1, 8):
        _set("sex", f"X{i}", f"P{i:02d}")(site)  # seven different unusable values, one kind of problem
    data, report = validate_and_load(site, get_task("tfesi_mri"), 32)
    assert report.usable and data is not None and len(data) == N_PATIENTS  # subgroup metrics only
    [summary] = [p for p in report.warnings if "sex" in p.where]
    assert summary.what.startswith("7 patients left out of the sex subgroup metrics")
    assert "P01 (line 2)" in summary.what and "2 more" in summary.what


def test_a_few_repeated_warnings_are_each_named(tmp_path: Path) -> None:
    site = _vertebral_site(tmp_path, 40, unlabelled=3)
    _, report = validate_and_load(site, get_task("vertebral_column"))
    named = [p for p in report.warnings if "label missing" in p.what]
    assert [p.where.split("line ")[1][:2] for p in named] == ["2 ", "3 ", "4 "]


def test_repeated_dicom_warnings_are_grouped(template: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(template, site)
    for path in (site / "dicom").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        del ds.PixelSpacing
        ds.save_as(path)
    data, report = validate_and_load(site, get_task(IMAGE_TASK), 32)
    assert report.usable and data is not None and len(data) == N_PATIENTS
    spacing = [p for p in report.warnings if "pixel spacing missing" in p.what]
    assert len(spacing) == 1 and spacing[0].what.startswith(f"{N_PATIENTS} files")
    assert "dicom/P01.dcm" in spacing[0].what


CLI_CASES = ["manifest_dotdot", "clinical_xlsx_renamed", "clinical_latin1", "dicom_undecodable"]


def test_cli_exits_1_without_a_traceback(template: Path, tmp_path: Path) -> None:
    """The installed `spine-fl validate`, in real processes (run side by side to keep the test fast).

    The undecodable JPEG 2000 file is usable (its patient excluded: exit 0) but makes pydicom log
    its decoders' tracebacks: none of that may reach the site's terminal."""
    by_id = {c.id: c for c in CASES}
    runs = {}
    for case_id in CLI_CASES:
        case = by_id[case_id]
        site = _build(template, tmp_path / case_id, case)
        runs[case_id] = subprocess.Popen([str(SPINE_FL), "validate", str(site), "--task", case.task],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for case_id, proc in runs.items():
        out, err = proc.communicate(timeout=120)
        case = by_id[case_id]
        assert proc.returncode == (0 if case.usable else 1), (case_id, out, err)
        assert "Traceback" not in out + err, (case_id, out, err)
        assert ("usable" if case.usable else "NOT usable") in out
        needle = by_id[case_id].needles[-1]
        assert needle in " ".join(out.split()), (case_id, out)


def test_a_value_that_looks_like_markup_is_printed_not_raised(template: Path, tmp_path: Path) -> None:
    site = _build(template, tmp_path, Case("markup", _set("split", "[/bold]"), False, ()))
    result = RUNNER.invoke(app, ["validate", str(site), "--task", IMAGE_TASK])
    assert result.exit_code == 1 and "[/bold]" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


@pytest.mark.parametrize("size", ["-3", "0", "7"])
def test_an_image_size_below_the_models_minimum_is_a_usage_error(template: Path, size: str) -> None:
    """`--image-size` gets the bounds the run's configuration enforces (shared/config.py MIN_IMAGE_SIZE):
    never a traceback (-3), never every DICOM blamed as corrupt (0)."""
    from spine_fl.shared.config import MIN_IMAGE_SIZE

    result = RUNNER.invoke(app, ["validate", str(template), "--task", IMAGE_TASK, "--image-size", size])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "--image-size" in text and f"at least {MIN_IMAGE_SIZE} pixels" in text, text
    assert "corrupt" not in text and "Traceback" not in text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def test_the_smallest_allowed_image_size_validates(template: Path) -> None:
    from spine_fl.shared.config import MIN_IMAGE_SIZE

    result = RUNNER.invoke(app, ["validate", str(template), "--task", IMAGE_TASK, "--image-size", str(MIN_IMAGE_SIZE)])
    assert result.exit_code == 0, result.output


def test_predict_refuses_a_model_file_with_an_image_size_below_the_minimum(template: Path, tmp_path: Path) -> None:
    """predict has no --image-size: it takes the run's from the model file, whose settings are checked on
    reading with the same bound (a model-file error, exit 2)."""
    from spine_fl.shared.config import RunSettings
    from spine_fl.shared.models.model_file import save_model
    from spine_fl.shared.models.registry import build_model
    from spine_fl.shared.training.local import get_weights

    settings = RunSettings(task=IMAGE_TASK, image_size=32)
    save_model(tmp_path / "model.pt", settings, get_weights(build_model(settings.task_spec, settings.seed)))
    import torch

    bundle = torch.load(tmp_path / "model.pt", weights_only=True)
    bundle["settings"]["image-size" if "image-size" in bundle["settings"] else "image_size"] = 4
    torch.save(bundle, tmp_path / "model.pt")
    result = RUNNER.invoke(app, ["predict", str(tmp_path / "model.pt"), "--site-dir", str(template),
                                 "--out", str(tmp_path / "out")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "image_size" in text and "4" in text and "Traceback" not in text, result.output
