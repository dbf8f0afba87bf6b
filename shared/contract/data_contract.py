"""The site data contract: a folder with `clinical.csv` and, for image tasks, `manifest.csv`.

`clinical.csv`  one row per patient: `patient_id`, the task's label and feature columns, the
                subgroup columns (`age`, `sex`) and optionally `split` (train / test / external).
`manifest.csv`  one row per image: `patient_id`, `view`, `path` (relative to the site folder).

Validation reads everything (every row, every DICOM) and collects *all* problems, each naming the
file, line and column, what is wrong and what to do, so a site fixes its export in one pass.
Errors make the site unusable; warnings (unlabelled patients, missing subgroup values) are
reported and the affected patients are excluded only where stated.

Image tasks never train on placeholders: a patient whose required views are not all present and
decodable (manifest row missing, file missing, unreadable or blank DICOM) is excluded with a
warning naming the patient and file; when that leaves no patient in the train split, the site is
unusable (an error).

Without a `split` column, each patient is assigned by a hash of its id: 80% train, 20% test.

Scoring patients (`spine-fl predict`, `labels=False`) needs no outcome: the label's own columns and
the subgroup columns are then optional and not read, `y` is NaN, every split is kept, and the
checks that only training needs (labelled patients of both outcomes per split) are not made; the
model's inputs (predictors, images) are checked exactly as for training, with the same messages.

A site reads nothing outside its own folder: a manifest path that resolves elsewhere (`..`, an
absolute path, a symbolic link to a file or folder outside) is an error naming the manifest line,
and the file is never opened. How the CSV files are read, and which spreadsheet exports are refused
(semicolons and decimal commas: refused, with the fix), is in `csv_table.py`; DICOM refusals are in
`shared/imaging/dicom.py`. Warnings that repeat per patient or per file are grouped (`report.py`).
"""

from __future__ import annotations

import errno
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spine_fl.shared.contract.csv_table import read_csv_table
from spine_fl.shared.contract.report import NAMED, Problem, ValidationReport
from spine_fl.shared.contract.tasks import AllOfLabel, BinaryColumnLabel, Feature, RelativeReductionLabel, Task
from spine_fl.shared.imaging.dicom import DicomError, DicomModalityError, read_dicom_image

__all__ = ["Problem", "SiteData", "SiteDataError", "ValidationReport", "load_site", "validate_and_load"]

CLINICAL_FILE = "clinical.csv"
MANIFEST_FILE = "manifest.csv"
MANIFEST_COLUMNS = ("patient_id", "view", "path")
SPLITS = ("train", "test", "external")
SEX_VALUES = ("F", "M")
AGE_YEARS = (18.0, 110.0)  # plausible adult ages, for the age-band subgroup metrics


@dataclass
class SiteData:
    """A validated site, as arrays: what training and evaluation consume."""

    patient_ids: np.ndarray  # str
    split: np.ndarray  # str: train / test / external
    y: np.ndarray  # float32 0/1 (NaN when loaded without labels, for scoring)
    features: np.ndarray  # float32 (n, n_features)
    images: np.ndarray | None  # float32 (n, n_views, size, size)
    subgroups: pd.DataFrame  # age, sex (may hold NaN: excluded from subgroup metrics only)
    # Of the site (not of a subset): its patients in clinical.csv, and those of them an image task
    # excluded because a required image is missing or unreadable (the site policy's
    # max_missing_image_share is checked against their ratio before a round).
    patients_listed: int = 0
    images_missing: int = 0

    def subset(self, *splits: str) -> "SiteData":
        keep = np.isin(self.split, splits)
        return SiteData(
            self.patient_ids[keep],
            self.split[keep],
            self.y[keep],
            self.features[keep],
            None if self.images is None else self.images[keep],
            self.subgroups[keep].reset_index(drop=True),
            self.patients_listed,
            self.images_missing,
        )

    def __len__(self) -> int:
        return len(self.y)


class SiteDataError(ValueError):
    """Raised when a site's data are unusable; carries the full report."""

    def __init__(self, report: ValidationReport):
        self.report = report
        lines = "\n".join(f"  {p}" for p in report.errors)
        super().__init__(f"site data in {report.site_dir} unusable for task {report.task}:\n{lines}")


def _line(index: object) -> int:
    """CSV line number of a data row: the tables are indexed by line (line 1 is the header)."""
    return int(index)  # type: ignore[call-overload]


_DECIMAL_COMMA = re.compile(r"[+-]?\d+,\d+")


def _not_a_number(text: str) -> tuple[str, str]:
    """What and action for a value that should be a number; a decimal comma gets its own fix."""
    if _DECIMAL_COMMA.fullmatch(text):
        return (f"{text!r} uses a decimal comma",
                f"write {text.replace(',', '.')} (a decimal point): export numbers with decimal points")
    try:
        infinite = math.isinf(float(text))
    except ValueError:
        infinite = False
    return f"{text!r} is not a {'finite ' if infinite else ''}number", "write a plain number (decimal point, no units)"


def _parse_number(raw: object) -> float | None:
    """None for missing; NaN marks a value that is present but not a finite number."""
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return None
    text = str(raw).strip()
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return float("nan")
    return value if math.isfinite(value) else float("nan")


def _hash_split(patient_id: str) -> str:
    bucket = int(hashlib.sha256(patient_id.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 80 else "test"


def _encode_feature(feature: Feature, raw: object, where: str, report: ValidationReport) -> list[float] | None:
    text = "" if raw is None else str(raw).strip()
    if feature.kind == "category":
        if text not in feature.categories:
            shown = repr(text) if text else "missing value"
            report.error(where, f"{shown} is not one of {', '.join(feature.categories)}",
                         "correct the value or remove the patient")
            return None
        return [1.0 if text == c else 0.0 for c in feature.categories]
    value = _parse_number(raw)
    if value is None:
        report.error(where, "missing value", "fill it in or remove the patient from the table")
        return None
    if math.isnan(value):
        report.error(where, *_not_a_number(text))
        return None
    if feature.kind == "binary":
        if value not in (0.0, 1.0):
            report.error(where, f"{text!r} is not 0 or 1", "code the variable as 0 (absent) / 1 (present)")
            return None
        return [value]
    if (feature.low is not None and value < feature.low) or (feature.high is not None and value > feature.high):
        report.error(where, f"{value:g} {feature.unit} is outside the plausible range "
                     f"[{feature.low:g}, {feature.high:g}]", "check the unit and the value")
        return None
    return [(value - feature.center) / feature.scale]


def _warn_per_patient(report: ValidationReport, row: pd.Series, where: str, column: str, what: str, action: str,
                      summary: str) -> None:
    """A warning that recurs patient after patient: grouped with a count when there are many."""
    pid = str(row["patient_id"]).strip()
    report.warn_grouped(f"{column}: {summary}", f"{where}, column {column}", what, action,
                        culprit=f"{pid} (line {_line(row.name)})",
                        summary_where=f"{report.site_dir / CLINICAL_FILE}, column {column}", summary=summary)


def _label(task: Task, row: pd.Series, where: str, report: ValidationReport) -> float | None:
    """0/1, or None when the patient is unlabelled (a warning) or the row is wrong (an error)."""
    rule = task.label
    if isinstance(rule, RelativeReductionLabel):
        return _relative_reduction(rule, row, where, report)
    if isinstance(rule, AllOfLabel):
        return _all_of(rule, row, where, report)
    assert isinstance(rule, BinaryColumnLabel)
    text = str(row[rule.column]).strip()
    if text == "":
        _warn_per_patient(report, row, where, rule.column, "label missing", "patient excluded; add the outcome if known",
                          f"patients excluded: label missing ({rule.column})")
        return None
    if text not in (rule.positive, rule.negative):
        report.error(f"{where}, column {rule.column}", f"{text!r} is not {rule.positive!r} or {rule.negative!r}",
                     "correct the outcome value")
        return None
    return 1.0 if text == rule.positive else 0.0


def _relative_reduction(rule: RelativeReductionLabel, row: pd.Series, where: str,
                        report: ValidationReport) -> float | None:
    """Positive when (baseline - follow-up) / baseline >= threshold (e.g. NRS reduced by >= 50%)."""
    base, follow = _parse_number(row[rule.baseline]), _parse_number(row[rule.followup])
    for col, value in ((rule.baseline, base), (rule.followup, follow)):
        if value is not None and (math.isnan(value) or not rule.low <= value <= rule.high):
            text = str(row[col]).strip()
            what, action = (_not_a_number(text) if _DECIMAL_COMMA.fullmatch(text) else
                            (f"{text!r} is not an {rule.score} score {rule.low:g}-{rule.high:g}",
                             f"write the {rule.score_meaning} as a number from {rule.low:g} to {rule.high:g}"))
            report.error(f"{where}, column {col}", what, action)
            return None
    if base is None:
        report.error(f"{where}, column {rule.baseline}", f"missing baseline {rule.score}",
                     "fill it in or remove the patient")
        return None
    if follow is None:
        _warn_per_patient(report, row, where, rule.followup, f"no {rule.followup_name}: outcome unknown",
                          "patient excluded from training and evaluation; add the follow-up if it exists",
                          f"patients excluded: no {rule.followup_name}, outcome unknown")
        return None
    if base == 0:
        report.error(f"{where}, column {rule.baseline}",
                     f"baseline {rule.score} is 0: a relative reduction is undefined",
                     "check the score; patients without a baseline score above 0 do not belong in this cohort")
        return None
    return 1.0 if (base - follow) / base >= rule.threshold else 0.0


def _all_of(rule: AllOfLabel, row: pd.Series, where: str, report: ValidationReport) -> float | None:
    """Positive when every condition holds (on a column, or on baseline - column); a missing value
    leaves the patient unlabelled (a warning)."""
    values = {}
    for col in rule.columns:
        value = _parse_number(row[col])
        if value is None:
            _warn_per_patient(report, row, where, col, f"{col} missing: outcome unknown",
                              "patient excluded from training and evaluation; add the value if it exists",
                              f"patients excluded: {col} missing, outcome unknown")
            return None
        if math.isnan(value):
            report.error(f"{where}, column {col}", *_not_a_number(str(row[col]).strip()))
            return None
        values[col] = value
    return 1.0 if all(c.holds(c.measured(values)) for c in rule.conditions) else 0.0


def _check_subgroups(task: Task, row: pd.Series, where: str, report: ValidationReport,
                     missing: list[str]) -> tuple[float, str | None]:
    """Age and sex for subgroup metrics; a bad value only leaves the patient out of those (a warning).

    A column that is also a model input was already checked as a feature (an error): not reported twice.
    """
    features = {f.name for f in task.features}
    age, sex = float("nan"), None
    if "age" in task.subgroups and "age" not in missing:
        value = _parse_number(row["age"])
        text = str(row["age"]).strip()
        if value is None or math.isnan(value):
            what = f"{text!r} is not an age"
        elif not AGE_YEARS[0] <= value <= AGE_YEARS[1]:
            what = f"age {value:g} is outside the plausible range [{AGE_YEARS[0]:g}, {AGE_YEARS[1]:g}] years"
        else:
            what, age = "", value
        if what and "age" not in features:
            _warn_per_patient(report, row, where, "age", what,
                              "patient left out of the age-band metrics; correct the value",
                              "patients left out of the age-band metrics: age missing or implausible")
    if "sex" in task.subgroups and "sex" not in missing:
        text = str(row["sex"]).strip()
        if text in SEX_VALUES:
            sex = text
        elif "sex" not in features:
            _warn_per_patient(report, row, where, "sex", f"{text!r} is not F or M",
                              "patient left out of the sex subgroup metrics; correct the value",
                              "patients left out of the sex subgroup metrics: sex not F or M")
    return age, sex


def _manifest_paths(site_dir: Path, task: Task,
                    report: ValidationReport) -> dict[tuple[str, str], tuple[Path, int]] | None:
    """(patient, view) -> (file, manifest line); None when the manifest itself is unusable (an error)."""
    manifest_path = site_dir / MANIFEST_FILE
    if not _table_inside_site(site_dir, manifest_path, report):
        return None
    manifest = read_csv_table(manifest_path, report, "image manifest (patient_id, view, path)")
    if manifest is None:
        return None
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    for col in missing:
        report.error(f"{manifest_path}, column {col}", "column missing", "add it (patient_id, view, path)")
    if missing:
        return None
    assert task.image is not None
    root = site_dir.resolve()
    paths: dict[tuple[str, str], tuple[Path, int]] = {}
    for idx, row in manifest.iterrows():
        where = f"{manifest_path} line {_line(idx)}"
        pid, view, rel = row["patient_id"].strip(), row["view"].strip(), row["path"].strip()
        if not _inside_site(site_dir, root, rel, f"{where}, column path", report):
            continue  # every row is checked, whatever its view: the file is never opened
        if view not in task.image.views:
            continue  # other series may be listed for other tasks
        if (pid, view) in paths:
            report.error(where, f"second {view} image for patient {pid}", "keep one image per view in the manifest")
            continue
        paths[(pid, view)] = (site_dir / rel, _line(idx))
    return paths


def _table_inside_site(site_dir: Path, path: Path, report: ValidationReport) -> bool:
    """clinical.csv / manifest.csv themselves: a symbolic link leading out of the site folder is
    refused like a manifest path outside it (the file is never opened); a missing file is left to
    the reader, which names it."""
    if not path.is_symlink():
        return True
    root = site_dir.resolve()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError, ValueError):  # a symbolic-link loop
        report.error(str(path), "a symbolic link that cannot be resolved (a loop of symbolic links)",
                     f"put the real {path.name} into the site folder")
        return False
    if resolved.is_relative_to(root):
        return True
    report.error(str(path), f"a symbolic link to {resolved}, outside the site folder {root}",
                 f"a site reads only files inside its own folder: copy the real {path.name} into the site folder "
                 "instead of linking to it")
    return False


MAX_SHOWN_PATH = 80  # a manifest path longer than this is shown cut, with its length


def _shown(rel: str) -> str:
    """A manifest path as a finding quotes it: repr (NUL and backslashes visible), long ones cut."""
    if len(rel) <= MAX_SHOWN_PATH:
        return repr(rel)
    return f"{rel[:MAX_SHOWN_PATH]!r}... ({len(rel)} characters)"


def _inside_site(site_dir: Path, root: Path, rel: str, where: str, report: ValidationReport) -> bool:
    """True when the manifest path resolves (links followed) inside the site folder; else an error.

    A path the operating system cannot even look up (a NUL byte, a name longer than the file
    system allows) is an error naming the manifest line too: it can never be a real file."""
    if "\0" in rel:
        report.error(where, f"path {_shown(rel)} contains a NUL byte (\\x00), which no file name can hold",
                     "correct the path in the manifest (re-export it as plain text; the file is probably damaged)")
        return False
    target = site_dir / rel
    try:
        resolved = target.resolve()
        target.lstat()  # ENAMETOOLONG and the like surface here, not as a missing file
    except FileNotFoundError:
        pass  # a missing file: reported per patient (file missing)
    except OSError as exc:
        if exc.errno in (errno.ENAMETOOLONG,):
            report.error(where, f"path {_shown(rel)} is too long for the file system (a name in it, or the whole "
                         f"path, exceeds the limit: {exc.strerror})",
                         "correct the path in the manifest: list the image's real path relative to the site folder")
            return False
        if exc.errno == errno.ELOOP:
            report.error(where, f"path {_shown(rel)} cannot be resolved (a loop of symbolic links)",
                         "list a real file inside the site folder")
            return False
        if exc.errno != errno.ENOTDIR:  # ENOTDIR: a file used as a folder - simply missing
            report.error(where, f"path {_shown(rel)} cannot be looked up ({exc.strerror})",
                         "check the path and the folder's permissions")
            return False
    except RuntimeError:  # a symbolic-link loop (older Pythons)
        report.error(where, f"path {_shown(rel)} cannot be resolved (a loop of symbolic links)",
                     "list a real file inside the site folder")
        return False
    except ValueError as exc:  # anything else the OS refuses as a path
        report.error(where, f"path {_shown(rel)} is not a valid file path ({exc})", "correct the path in the manifest")
        return False
    if resolved == root or resolved.is_relative_to(root):
        return True
    if Path(rel).is_absolute():
        how = "an absolute path"
    elif ".." in Path(rel).parts:
        how = "'..' leads out of the folder"
    else:
        how = "a symbolic link leads out of the folder"
    report.error(where, f"path {rel!r} resolves to {resolved}, outside the site folder {root} ({how})",
                 "a site reads only files inside its own folder: copy the image into the site folder and list its "
                 "path relative to the folder (no '..', no absolute path, no link leading out)")
    return False


# A patient whose required views are not all readable is excluded; never trained on a placeholder.
NAMED_PATIENTS = NAMED  # per-file warnings and the summary name this many patients, then give a count


@dataclass(frozen=True)
class _ImageFailure:
    patient_id: str
    view: str
    where: str  # the file, or the manifest when the row is missing
    what: str
    action: str
    short: str  # for the summary: view and file (or "no manifest row")


def _read_images(site_dir: Path, task: Task, patient_ids: list[str], lines: list[int], size: int,
                 report: ValidationReport) -> tuple[dict[str, np.ndarray], dict[str, list[_ImageFailure]]]:
    """Decode every needed DICOM. Returns each fully readable patient's (n_views, size, size) stack
    and, per patient, the views that are missing or unreadable (that patient is excluded)."""
    assert task.image is not None
    paths = _manifest_paths(site_dir, task, report)
    if paths is None:  # the manifest is missing or malformed: already an error; no patient has images
        return {}, {}
    manifest_path = site_dir / MANIFEST_FILE
    views = task.image.views
    stacks: dict[str, np.ndarray] = {}
    failures: dict[str, list[_ImageFailure]] = {}
    for pid, line in zip(patient_ids, lines):
        decoded: list[np.ndarray] = []
        excluded = f"patient {pid} excluded from training and evaluation (no placeholder image is used)"
        for view in views:
            entry = paths.get((pid, view))
            if entry is None:
                failures.setdefault(pid, []).append(_ImageFailure(
                    pid, view, str(manifest_path), f"no {view} image for patient {pid} ({CLINICAL_FILE} line {line})",
                    f"{excluded}; add the {view} image to the manifest or remove the patient", f"{view}: no manifest row"))
                continue
            path, manifest_line = entry
            rel = path.relative_to(site_dir) if path.is_relative_to(site_dir) else path
            try:
                present, lookup = path.exists(), ""  # a dangling link too; a folder or a pipe is refused by the reader
            except OSError as exc:  # e.g. a folder on the way that cannot be searched
                present, lookup = False, f": cannot be looked up ({exc.strerror})"
            if not present:
                hint = ""
                if "\\" in str(rel):  # a Windows export: dicom\P01\T2.dcm is one odd file name here
                    hint = ("; the path uses backslashes ('\\'): write manifest paths with '/' (e.g. "
                            f"{str(rel).replace(chr(92), '/')})")
                failures.setdefault(pid, []).append(_ImageFailure(
                    pid, view, str(path), f"file missing{lookup} ({view} image of patient {pid}, {MANIFEST_FILE} line "
                    f"{manifest_line})",
                    f"{excluded}; copy the file into the site folder or correct the path in the manifest{hint}",
                    f"{view}: {rel} missing"))
                continue
            try:
                image = read_dicom_image(path, size, task.image.field_of_view_mm, task.image.modalities)
            except DicomModalityError as exc:  # the wrong series exported: an error for the site, not one patient
                # (a file without a Modality tag is judged per file by the reader: a DicomError below)
                report.error(str(path), f"modality {exc.modality}; task {task.name} needs "
                             f"{'/'.join(task.image.modalities)} ({view} image of patient {pid}, {MANIFEST_FILE} line "
                             f"{manifest_line})", "check that the right series was exported")
                continue
            except DicomError as exc:
                failures.setdefault(pid, []).append(_ImageFailure(
                    pid, view, str(path), f"{str(exc).removeprefix(f'{path}: ')} ({view} image of patient {pid})",
                    f"{excluded}; re-export or replace this DICOM file", f"{view}: {rel} unreadable"))
                continue
            if float(image.pixels.max()) == float(image.pixels.min()):
                failures.setdefault(pid, []).append(_ImageFailure(
                    pid, view, str(path), f"blank image: every pixel has the same value ({view} image of patient {pid})",
                    f"{excluded}; re-export the original image", f"{view}: {rel} blank"))
                continue
            for message in image.warnings:
                what = message.removeprefix(f"{path}: ")
                report.warn_grouped(f"dicom: {what}", str(path), what, "check the export settings", culprit=str(rel),
                                    summary_where=str(manifest_path), summary=f"files: {what}")
            decoded.append(image.pixels)
        if len(decoded) == len(views):
            stacks[pid] = np.stack(decoded).astype(np.float32, copy=False)
    _report_image_failures(manifest_path, views, failures, report)
    return stacks, failures


def _report_image_failures(manifest_path: Path, views: tuple[str, ...], failures: dict[str, list[_ImageFailure]],
                           report: ValidationReport) -> None:
    """One warning per problem file for the first patients, and one summary with the count."""
    if not failures:
        return
    named = list(failures)[:NAMED_PATIENTS]
    for pid in named:
        for f in failures[pid]:
            report.warn(f.where, f.what, f.action)
    listing = "; ".join(f"{pid} ({', '.join(f.short for f in failures[pid])})" for pid in named)
    more = len(failures) - len(named)
    if more:
        listing += f"; and {more} more patient(s)"
    report.warn(str(manifest_path),
                f"{len(failures)} patient(s) excluded: a required view ({', '.join(views)}) is missing or "
                f"unreadable: {listing}",
                "no placeholder image is used for a missing view: add or re-export these images (each of the first "
                f"{NAMED_PATIENTS} patients' files has its own warning) and validate again, or remove the patients "
                f"from {CLINICAL_FILE}")


def _check_split_trainable(split: str, y: np.ndarray, n_labelled: int, clinical_path: Path,
                           report: ValidationReport) -> None:
    """A model can be neither trained nor evaluated without patients of both outcomes (one patient, one class)."""
    action = "a site needs labelled patients of both outcomes in its train and test splits: check labels and split"
    if len(y) == 0:
        report.error(str(clinical_path), f"no labelled patient in the {split} split ({n_labelled} labelled in all)",
                     action)
    elif len(set(y.tolist())) < 2:
        outcome = "positive" if y[0] == 1 else "negative"
        report.error(str(clinical_path), f"all {len(y)} labelled patient(s) in the {split} split have the same outcome "
                     f"({outcome}): the model cannot be trained or evaluated on one class", action)


def _scoring_columns(task: Task) -> tuple[str, ...]:
    """What scoring a patient needs: the id and the model's predictors (images come from the manifest)."""
    return ("patient_id", *(f.name for f in task.features))


def validate_and_load(site_dir: Path | str, task: Task, image_size: int = 64,
                      labels: bool = True) -> tuple[SiteData | None, ValidationReport]:
    """Validate a site folder against the task's contract; return its arrays when usable.

    labels=False: for scoring only (see the module's docstring); training always loads with labels."""
    site_dir = Path(site_dir)
    report = ValidationReport(site_dir, task.name)
    if not site_dir.is_dir():
        if site_dir.exists():
            report.error(str(site_dir), "is a file, not a folder",
                         "pass the site folder that holds clinical.csv (and manifest.csv), not a file")
        else:
            report.error(str(site_dir), "site folder does not exist", "pass the folder that holds clinical.csv")
        return None, report
    clinical_path = site_dir / CLINICAL_FILE
    table = (read_csv_table(clinical_path, report, "clinical table (one row per patient)")
             if _table_inside_site(site_dir, clinical_path, report) else None)
    if table is None:
        return None, report
    if table.empty and report.usable:  # (rows refused as ragged already have their own errors)
        report.error(str(clinical_path), "no patient rows: the file holds only the header",
                     "export the clinical table with one row per patient")
    needed = task.required_columns if labels else _scoring_columns(task)
    missing = [c for c in needed if c not in table.columns]
    for col in missing:
        report.error(f"{clinical_path}, column {col}", "column missing", f"task {task.name} needs it: add it to the export")
    if "patient_id" in missing:
        return None, report
    # Rows are still checked for every column that is present, so one report lists everything.
    # Without labels, absent outcome and subgroup columns are simply not read (not errors).
    absent = missing + [c for c in task.required_columns if c not in needed and c not in table.columns]
    for col in absent:
        table[col] = None
    rows: list[tuple[str, str, float | None, list[float] | None, float, str | None, int]] = []
    seen: dict[str, int] = {}
    for idx, row in table.iterrows():
        where = f"{clinical_path} line {_line(idx)}"
        pid = str(row["patient_id"] or "").strip()
        if not pid:
            report.error(f"{where}, column patient_id", "empty patient id", "give every patient a site-local id")
            continue
        if pid in seen:
            report.error(f"{where}, column patient_id", f"patient {pid} already on line {seen[pid]}", "keep one row per patient")
            continue
        seen[pid] = _line(idx)
        where = f"{where} (patient {pid})"
        split = str(row["split"]).strip() if "split" in table.columns else _hash_split(pid)
        if split not in SPLITS:
            report.error(f"{where}, column split", f"{split!r} is not one of {', '.join(SPLITS)}", "correct the split value")
        encoded = [_encode_feature(f, row[f.name], f"{where}, column {f.name}", report)
                   for f in task.features if f.name not in missing]
        if labels:
            label = _label(task, row, where, report) if not set(task.label.columns) & set(missing) else None
        else:
            label = math.nan  # not read: scoring needs no outcome
        age, sex = _check_subgroups(task, row, where, report, absent)
        usable_row = split in SPLITS and label is not None and all(e is not None for e in encoded)
        features = [v for e in encoded for v in e] if usable_row else None  # type: ignore[union-attr]
        rows.append((pid, split, label, features, age, sex, _line(idx)))
    report.flush_groups()

    images = None
    stacks: dict[str, np.ndarray] = {}
    failures: dict[str, list[_ImageFailure]] = {}
    if task.image is not None:
        stacks, failures = _read_images(site_dir, task, [r[0] for r in rows], [r[6] for r in rows],
                                        image_size, report)
    n_listed = len(rows)
    labelled_rows = [r for r in rows if r[3] is not None]
    # An image task keeps only patients with every required view decoded: never a placeholder.
    rows = [r for r in labelled_rows if task.image is None or r[0] in stacks]
    if task.image is not None:
        images = (np.stack([stacks[r[0]] for r in rows]) if rows
                  else np.empty((0, len(task.image.views), image_size, image_size), dtype=np.float32))
    ids = [r[0] for r in rows]
    splits = [r[1] for r in rows]
    outcomes = [r[2] for r in rows]
    feats = [r[3] for r in rows]
    ages = [r[4] for r in rows]
    sexes = [r[5] for r in rows]
    y = np.asarray(outcomes, dtype=np.float32)
    split_arr = np.asarray(splits, dtype=str)
    report.counts = {
        "rows": int(len(table)),
        **({"labelled": int(len(y)), "positive": int(y.sum())} if labels else {"scorable": int(len(y))}),
        **{s: int((split_arr == s).sum()) for s in SPLITS},
    }
    if task.image is not None:
        report.counts["images_missing"] = len(failures)
    lost = [r for r in labelled_rows if r[0] in failures]
    if failures and not labels and not rows:
        report.error(str(site_dir / MANIFEST_FILE),
                     f"no patient left to score: {len(failures)} patient(s) excluded because a required image is "
                     "missing or unreadable",
                     "no placeholder image is used: add the missing DICOM files and manifest rows (see the warnings), "
                     "then try again")
    elif failures and labels and report.counts["train"] == 0:
        lost_train = sum(r[1] == "train" for r in lost)
        scope = "to train or evaluate on" if not rows else "in the train split"
        report.error(str(site_dir / MANIFEST_FILE),
                     f"no patient left {scope}: {len(failures)} patient(s) excluded because a required image "
                     f"is missing or unreadable ({lost_train} of them labelled train patients)",
                     "the site cannot train on placeholder images: add the missing DICOM files and manifest rows "
                     "(see the warnings), then validate again")
    report.flush_groups()
    for split in ("train", "test") if report.usable and labels else ():
        _check_split_trainable(split, y[split_arr == split], len(y), clinical_path, report)
    if not report.usable:
        return None, report
    data = SiteData(
        np.asarray(ids, dtype=str),
        split_arr,
        y,
        np.asarray(feats, dtype=np.float32).reshape(len(ids), task.n_features),
        images,
        pd.DataFrame({"age": ages, "sex": sexes}),
        n_listed,
        len(failures),
    )
    return data, report


def load_site(site_dir: Path | str, task: Task, image_size: int = 64, labels: bool = True) -> SiteData:
    """Validated site data, or SiteDataError listing every problem."""
    data, report = validate_and_load(site_dir, task, image_size, labels)
    if data is None:
        raise SiteDataError(report)
    return data
