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
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from spine_fl.shared.contract.tasks import BinaryColumnLabel, Feature, NrsResponseLabel, Task
from spine_fl.shared.imaging.dicom import DicomError, read_dicom_image

CLINICAL_FILE = "clinical.csv"
MANIFEST_FILE = "manifest.csv"
MANIFEST_COLUMNS = ("patient_id", "view", "path")
SPLITS = ("train", "test", "external")
SEX_VALUES = ("F", "M")


@dataclass(frozen=True)
class Problem:
    severity: Literal["error", "warning"]
    where: str
    what: str
    action: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.where}: {self.what} -> {self.action}"


@dataclass
class ValidationReport:
    site_dir: Path
    task: str
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def usable(self) -> bool:
        return not self.errors

    def error(self, where: str, what: str, action: str) -> None:
        self.problems.append(Problem("error", where, what, action))

    def warn(self, where: str, what: str, action: str) -> None:
        self.problems.append(Problem("warning", where, what, action))

    def to_dict(self) -> dict:
        return {
            "site_dir": str(self.site_dir),
            "task": self.task,
            "usable": self.usable,
            "counts": self.counts,
            "problems": [p.__dict__ for p in self.problems],
        }


@dataclass
class SiteData:
    """A validated site, as arrays: what training and evaluation consume."""

    patient_ids: np.ndarray  # str
    split: np.ndarray  # str: train / test / external
    y: np.ndarray  # float32 0/1
    features: np.ndarray  # float32 (n, n_features)
    images: np.ndarray | None  # float32 (n, n_views, size, size)
    subgroups: pd.DataFrame  # age, sex (may hold NaN: excluded from subgroup metrics only)

    def subset(self, split: str) -> "SiteData":
        keep = self.split == split
        return SiteData(
            self.patient_ids[keep],
            self.split[keep],
            self.y[keep],
            self.features[keep],
            None if self.images is None else self.images[keep],
            self.subgroups[keep].reset_index(drop=True),
        )

    def __len__(self) -> int:
        return len(self.y)


class SiteDataError(ValueError):
    """Raised when a site's data are unusable; carries the full report."""

    def __init__(self, report: ValidationReport):
        self.report = report
        lines = "\n".join(f"  {p}" for p in report.errors)
        super().__init__(f"site data in {report.site_dir} unusable for task {report.task}:\n{lines}")


def _line(index: int) -> int:
    """CSV line number of a data row (line 1 is the header)."""
    return int(index) + 2


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


def _read_csv(path: Path, report: ValidationReport, purpose: str) -> pd.DataFrame | None:
    if not path.is_file():
        report.error(str(path), "file missing", f"export the {purpose} as {path.name} into the site folder")
        return None
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as exc:  # pandas raises several parser errors
        report.error(str(path), f"not a readable CSV ({exc})", "save it as comma-separated UTF-8 text with a header row")
        return None


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
        report.error(where, f"{text!r} is not a number", "write a plain number (decimal point, no units)")
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


def _label(task: Task, row: pd.Series, where: str, report: ValidationReport) -> float | None:
    """0/1, or None when the patient is unlabelled (a warning) or the row is wrong (an error)."""
    rule = task.label
    if isinstance(rule, NrsResponseLabel):
        base, follow = _parse_number(row[rule.baseline]), _parse_number(row[rule.followup])
        for col, value in ((rule.baseline, base), (rule.followup, follow)):
            if value is not None and (math.isnan(value) or not 0 <= value <= 10):
                report.error(f"{where}, column {col}", f"{row[col]!r} is not an NRS score 0-10",
                             "write the pain score as a number from 0 to 10")
                return None
        if base is None:
            report.error(f"{where}, column {rule.baseline}", "missing baseline NRS",
                         "fill it in or remove the patient")
            return None
        if follow is None:
            report.warn(f"{where}, column {rule.followup}", "no 2-month follow-up: outcome unknown",
                        "patient excluded from training and evaluation; add the follow-up if it exists")
            return None
        if base == 0:
            report.error(f"{where}, column {rule.baseline}", "baseline NRS is 0: a relative reduction is undefined",
                         "check the score; patients without baseline pain do not belong in this cohort")
            return None
        return 1.0 if (base - follow) / base >= rule.threshold else 0.0
    assert isinstance(rule, BinaryColumnLabel)
    text = str(row[rule.column]).strip()
    if text == "":
        report.warn(f"{where}, column {rule.column}", "label missing", "patient excluded; add the outcome if known")
        return None
    if text not in (rule.positive, rule.negative):
        report.error(f"{where}, column {rule.column}", f"{text!r} is not {rule.positive!r} or {rule.negative!r}",
                     "correct the outcome value")
        return None
    return 1.0 if text == rule.positive else 0.0


def _check_subgroups(task: Task, row: pd.Series, where: str, report: ValidationReport,
                     missing: list[str]) -> tuple[float, str | None]:
    age, sex = float("nan"), None
    if "age" in task.subgroups and "age" not in missing:
        value = _parse_number(row["age"])
        if value is None or math.isnan(value):
            report.warn(f"{where}, column age", f"{row['age']!r} is not an age",
                        "patient left out of the age-band metrics; correct the value")
        else:
            age = value
    if "sex" in task.subgroups and "sex" not in missing:
        text = str(row["sex"]).strip()
        if text in SEX_VALUES:
            sex = text
        else:
            report.warn(f"{where}, column sex", f"{text!r} is not F or M",
                        "patient left out of the sex subgroup metrics; correct the value")
    return age, sex


def _manifest_paths(site_dir: Path, task: Task,
                    report: ValidationReport) -> dict[tuple[str, str], tuple[Path, int]] | None:
    """(patient, view) -> (file, manifest line); None when the manifest itself is unusable (an error)."""
    manifest_path = site_dir / MANIFEST_FILE
    manifest = _read_csv(manifest_path, report, "image manifest (patient_id, view, path)")
    if manifest is None:
        return None
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    for col in missing:
        report.error(f"{manifest_path}, column {col}", "column missing", "add it (patient_id, view, path)")
    if missing:
        return None
    assert task.image is not None
    paths: dict[tuple[str, str], tuple[Path, int]] = {}
    for idx, row in manifest.iterrows():
        where = f"{manifest_path} line {_line(idx)}"
        pid, view, rel = row["patient_id"].strip(), row["view"].strip(), row["path"].strip()
        if view not in task.image.views:
            continue  # other series may be listed for other tasks
        if (pid, view) in paths:
            report.error(where, f"second {view} image for patient {pid}", "keep one image per view in the manifest")
            continue
        paths[(pid, view)] = (site_dir / rel, _line(idx))
    return paths


# A patient whose required views are not all readable is excluded; never trained on a placeholder.
NAMED_PATIENTS = 5  # per-file warnings and the summary name this many patients, then give a count


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
            if not path.is_file():
                failures.setdefault(pid, []).append(_ImageFailure(
                    pid, view, str(path), f"file missing ({view} image of patient {pid}, {MANIFEST_FILE} line {manifest_line})",
                    f"{excluded}; copy the file into the site folder or correct the path in the manifest",
                    f"{view}: {rel} missing"))
                continue
            try:
                image = read_dicom_image(path, size, task.image.field_of_view_mm)
            except DicomError as exc:
                failures.setdefault(pid, []).append(_ImageFailure(
                    pid, view, str(path), f"{str(exc).removeprefix(f'{path}: ')} ({view} image of patient {pid})",
                    f"{excluded}; re-export or replace this DICOM file", f"{view}: {rel} unreadable"))
                continue
            if image.modality not in task.image.modalities:
                report.error(str(path), f"modality {image.modality or 'missing'}; task {task.name} needs "
                             f"{'/'.join(task.image.modalities)}", "check that the right series was exported")
                continue
            if float(image.pixels.max()) == float(image.pixels.min()):
                failures.setdefault(pid, []).append(_ImageFailure(
                    pid, view, str(path), f"blank image: every pixel has the same value ({view} image of patient {pid})",
                    f"{excluded}; re-export the original image", f"{view}: {rel} blank"))
                continue
            for message in image.warnings:
                report.warn(str(path), message.removeprefix(f"{path}: "), "check the export settings")
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


def validate_and_load(site_dir: Path | str, task: Task, image_size: int = 64) -> tuple[SiteData | None, ValidationReport]:
    """Validate a site folder against the task's contract; return its arrays when usable."""
    site_dir = Path(site_dir)
    report = ValidationReport(site_dir, task.name)
    if not site_dir.is_dir():
        report.error(str(site_dir), "site folder does not exist", "pass the folder that holds clinical.csv")
        return None, report
    clinical_path = site_dir / CLINICAL_FILE
    table = _read_csv(clinical_path, report, "clinical table (one row per patient)")
    if table is None:
        return None, report
    missing = [c for c in task.required_columns if c not in table.columns]
    for col in missing:
        report.error(f"{clinical_path}, column {col}", "column missing", f"task {task.name} needs it: add it to the export")
    if "patient_id" in missing:
        return None, report
    # Rows are still checked for every column that is present, so one report lists everything.
    for col in missing:
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
        label = _label(task, row, where, report) if not set(task.label.columns) & set(missing) else None
        age, sex = _check_subgroups(task, row, where, report, missing)
        usable_row = split in SPLITS and label is not None and all(e is not None for e in encoded)
        features = [v for e in encoded for v in e] if usable_row else None  # type: ignore[union-attr]
        rows.append((pid, split, label, features, age, sex, _line(idx)))

    images = None
    stacks: dict[str, np.ndarray] = {}
    failures: dict[str, list[_ImageFailure]] = {}
    if task.image is not None:
        stacks, failures = _read_images(site_dir, task, [r[0] for r in rows], [r[6] for r in rows],
                                        image_size, report)
    labelled_rows = [r for r in rows if r[3] is not None]
    # An image task keeps only patients with every required view decoded: never a placeholder.
    rows = [r for r in labelled_rows if task.image is None or r[0] in stacks]
    if task.image is not None:
        images = (np.stack([stacks[r[0]] for r in rows]) if rows
                  else np.empty((0, len(task.image.views), image_size, image_size), dtype=np.float32))
    ids = [r[0] for r in rows]
    splits = [r[1] for r in rows]
    labels = [r[2] for r in rows]
    feats = [r[3] for r in rows]
    ages = [r[4] for r in rows]
    sexes = [r[5] for r in rows]
    y = np.asarray(labels, dtype=np.float32)
    split_arr = np.asarray(splits, dtype=str)
    report.counts = {
        "rows": int(len(table)),
        "labelled": int(len(y)),
        "positive": int(y.sum()),
        **{s: int((split_arr == s).sum()) for s in SPLITS},
    }
    if task.image is not None:
        report.counts["images_missing"] = len(failures)
    lost = [r for r in labelled_rows if r[0] in failures]
    if failures and report.counts["train"] == 0:
        lost_train = sum(r[1] == "train" for r in lost)
        scope = "to train or evaluate on" if not rows else "in the train split"
        report.error(str(site_dir / MANIFEST_FILE),
                     f"no patient left {scope}: {len(failures)} patient(s) excluded because a required image "
                     f"is missing or unreadable ({lost_train} of them labelled train patients)",
                     "the site cannot train on placeholder images: add the missing DICOM files and manifest rows "
                     "(see the warnings), then validate again")
    for split in ("train", "test") if report.usable else ():
        if report.counts[split] == 0 or len(set(y[split_arr == split])) < 2:
            report.error(str(clinical_path), f"the {split} split has no patients of one outcome class",
                         "a site needs both outcomes in its train and test splits; check labels and split")
    if not report.usable:
        return None, report
    data = SiteData(
        np.asarray(ids, dtype=str),
        split_arr,
        y,
        np.asarray(feats, dtype=np.float32).reshape(len(ids), task.n_features),
        images,
        pd.DataFrame({"age": ages, "sex": sexes}),
    )
    return data, report


def load_site(site_dir: Path | str, task: Task, image_size: int = 64) -> SiteData:
    """Validated site data, or SiteDataError listing every problem."""
    data, report = validate_and_load(site_dir, task, image_size)
    if data is None:
        raise SiteDataError(report)
    return data
