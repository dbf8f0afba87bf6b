"""Audit: does every recorded payload hold only model arrays and declared numeric metrics?

The egress ledger records every array's name and shape and every config/metric value (byte
payloads by size and hash). The scan holds each line against what spine-fl declares it sends:
- arrays: only `fitres.parameters/<i>` with exactly the shapes of the run's model; anything else
  (and anything image-sized) is flagged as a possible raw image or undeclared data;
- values: numbers under declared keys; the only declared text is a reply's status message;
  every string anywhere (keys' values, error reasons) is searched for the site's identifiers:
  patient ids and text cells of clinical.csv, and DICOM header values (names, ids, dates,
  accession numbers, UIDs) read with pydicom without pixel data;
- SecAgg+ protocol payloads are opaque (keys, encrypted shares, masked vectors): their recorded
  sizes must fit what the protocol needs for the run's model, so no room is left to smuggle data.
Numbers equal to numeric identifiers of 6+ digits (e.g. an 8-digit date) are flagged; shorter
numeric ids would collide with counts and are not compared.
The check writes the report's "payload_scan" section.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd
import pydicom

from spine_fl.client.audit.inputs import AuditInputs, Level, Reason, reason
from spine_fl.shared import protocol
from spine_fl.shared.config import RunSettings
from spine_fl.shared.contract.data_contract import CLINICAL_FILE, MANIFEST_FILE
from spine_fl.shared.contract.tasks import TASKS, get_task
from spine_fl.shared.models.registry import build_model

SECTIONS = ("payload_scan",)
SHOWN_FINDINGS = 5  # per level, in the verdict's reasons (the report lists them all)
SMALLEST_IMAGE = 32  # when a run's image size is unknown: the smallest size spine-fl's tests use

DECLARED_NUMBERS = {
    *(protocol.fit_metric(k) for k in protocol.TRAIN_METRICS),
    *(protocol.evaluate_metric(k) for k in protocol.EVALUATE_REPLY_METRICS),
    protocol.FIT_NUM_EXAMPLES, "fitres.status/code",
    "evaluateres.loss/loss", protocol.EVALUATE_NUM_EXAMPLES, "evaluateres.status/code",
}
DECLARED_TEXT = {"fitres.status/message": ("", "Success"), "evaluateres.status/message": ("", "Success")}
# ledger evidence (key fingerprint, dataset id, line hash): hex digests, nothing else
PREFLIGHT_KEY = f"{protocol.PREFLIGHT_REPLY}/{{}}".format
DECLARED_HEX = {*(protocol.fit_metric(k) for k in protocol.LEDGER_TEXT), *(PREFLIGHT_KEY(k) for k in protocol.LEDGER_TEXT)}
HEX_DIGEST = re.compile(r"^(sha256:)?[0-9a-f]{32,64}$")
DECLARED_NUMBERS |= {PREFLIGHT_KEY(k) for k in (protocol.READY, protocol.LEDGER_LINES)}
PREFLIGHT_SITE = PREFLIGHT_KEY(protocol.SITE)  # the replying site's own name
# SecAgg+ replies (flwr secaggplus_mod): upper bounds on each opaque payload's recorded size
SECAGG_PREFIX = f"{protocol.SECAGG_CONFIGS}/"
SECAGG_BYTES_PER_ITEM = {"pk1": 512, "pk2": 512, "ctxts": 2048, "shares": 512}
SECAGG_ID_LISTS = ("dsts", "nids")
NPY_HEADER_BYTES = 256  # np.save header of one masked vector (128 in practice)
MASKED_BYTES_PER_WEIGHT = 8  # quantised, masked int64
PARAMETER_RECORD = "fitres.parameters"

DICOM_TAGS = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "PatientAddress",
              "ReferringPhysicianName", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
              "AccessionNumber", "StudyID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
IDENTIFYING_COLUMN = re.compile(r"(^|_)(id|name|date|dob|birth|accession|mrn|address|phone)(_|$)", re.I)
MIN_SUBSTRING = 4
MIN_NUMERIC_ID_DIGITS = 6


@dataclass
class Identifiers:
    """What must never leave the site, with where each value came from."""

    substrings: dict[str, str] = field(default_factory=dict)  # lower-case identifier -> source
    exact: dict[str, str] = field(default_factory=dict)  # any text cell -> source
    numbers: dict[int, str] = field(default_factory=dict)
    dicom_files: int = 0
    dicom_unreadable: int = 0
    _seen: dict[str, str | None] = field(default_factory=dict, repr=False)

    def add(self, value: Any, source: str, identifying: bool) -> None:
        text = str(value).strip()
        if not text or (_is_number(text) and not identifying):
            return
        self.exact.setdefault(text, source)
        if identifying and len(text) >= MIN_SUBSTRING:
            self.substrings.setdefault(text.lower(), source)
            if text.isdigit() and len(text) >= MIN_NUMERIC_ID_DIGITS:
                self.numbers.setdefault(int(text), source)
            if len(text) == 8 and text.isdigit():  # a DICOM date, also as ISO text
                self.substrings.setdefault(f"{text[:4]}-{text[4:6]}-{text[6:]}", source)

    def match(self, text: str) -> str | None:
        """Where `text` comes from if it is, or contains, an identifier."""
        stripped = text.strip()
        if stripped not in self._seen:
            lowered = stripped.lower()
            self._seen[stripped] = self.exact.get(stripped) or next(
                (src for ident, src in self.substrings.items() if ident in lowered), None)
        return self._seen[stripped]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def collect_identifiers(data_dir: Path) -> Identifiers:
    """Every patient id and text cell of clinical.csv, and the identifying DICOM header values."""
    ids = Identifiers()
    clinical = Path(data_dir) / CLINICAL_FILE
    if clinical.exists():
        table = pd.read_csv(clinical, dtype=str, keep_default_na=False)
        for column in table.columns:
            identifying = column == "patient_id" or bool(IDENTIFYING_COLUMN.search(column))
            for value in set(table[column]):
                ids.add(value, f"{CLINICAL_FILE} column {column}", identifying)
    manifest = Path(data_dir) / MANIFEST_FILE
    if manifest.exists():
        for rel in pd.read_csv(manifest, dtype=str, keep_default_na=False).get("path", []):
            _add_dicom(ids, Path(data_dir) / rel)
    return ids


def _add_dicom(ids: Identifiers, path: Path) -> None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(DICOM_TAGS))
    except Exception:  # pydicom raises many types for a bad file; the data contract reports those
        ids.dicom_unreadable += 1
        return
    ids.dicom_files += 1
    for tag in DICOM_TAGS:
        value = ds.get(tag)
        if value in (None, ""):
            continue
        values = list(value) if isinstance(value, pydicom.multival.MultiValue) else [value]
        for v in values:
            ids.add(v, f"DICOM header {tag}", True)
            if tag.endswith("Name"):
                for part in str(v).split("^"):
                    ids.add(part, f"DICOM header {tag}", len(part) >= MIN_SUBSTRING)


@dataclass(frozen=True)
class Finding:
    line: int
    severity: str  # "fail" or "attention"
    where: str
    what: str


@dataclass(frozen=True)
class DeclaredModel:
    """The shapes a run's model update may have (one per candidate task when the task is unknown)."""

    shapes: tuple[tuple[tuple[int, ...], ...], ...]
    image_pixels: int  # the smallest image (size x size) the site holds or the run used

    @property
    def max_masked_vectors(self) -> int:
        """SecAgg+ sends one vector per tensor plus one holding the example-count weight factor."""
        return max(len(shapes) for shapes in self.shapes) + 1

    @property
    def max_masked_weights(self) -> int:
        return max(sum(math.prod(s) for s in shapes) for shapes in self.shapes) + 1


def _scan_arrays(entry: dict[str, Any], model: DeclaredModel) -> Iterable[Finding]:
    arrays = entry.get("arrays", [])
    line = entry["line"]
    for array in arrays:
        name, shape = str(array.get("name", "")), tuple(array.get("shape") or ())
        record, _, key = name.rpartition("/")
        declared = record == PARAMETER_RECORD and key.isdigit() and any(
            int(key) < len(shapes) and shapes[int(key)] == shape for shapes in model.shapes)
        # a recalibration reply (without SecAgg+): one DP histogram of a declared shape
        declared = declared or (record == PARAMETER_RECORD and key == "0" and len(arrays) == 1
                                and shape in protocol.CALIBRATION_SHAPES)
        if not declared:
            image_like = math.prod(shape) >= model.image_pixels or (len(shape) >= 2 and shape[-1] == shape[-2] >= 16)
            what = (f"array {name!r} of shape {list(shape)} is not a parameter of the run's model"
                    + (": its size fits a raw image" if image_like else ""))
            yield Finding(line, "fail", name, what)
    if arrays and not any(len(arrays) == len(shapes) for shapes in model.shapes) and not (
            len(arrays) == 1 and tuple(arrays[0].get("shape") or ()) in protocol.CALIBRATION_SHAPES):
        yield Finding(line, "fail", PARAMETER_RECORD, f"{len(arrays)} arrays sent; the model has "
                      f"{' or '.join(str(len(s)) for s in model.shapes)}")


def _scan_secagg(line: int, key: str, value: Any, model: DeclaredModel) -> Iterable[Finding]:
    name = key.removeprefix(SECAGG_PREFIX)
    if not isinstance(value, dict):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            yield Finding(line, "fail", key, f"SecAgg+ value of unexpected type {type(value).__name__}")
        return
    size, items = int(value.get("bytes", 0)), int(value.get("items", 1))
    if name == "masked_params":
        limit = model.max_masked_weights * MASKED_BYTES_PER_WEIGHT + items * NPY_HEADER_BYTES
        if items > model.max_masked_vectors or size > limit:
            yield Finding(line, "fail", key, f"masked update of {items} vectors, {size} bytes: more than the "
                          f"model's {model.max_masked_vectors} vectors / {limit} bytes need; room for other data")
    elif name in SECAGG_BYTES_PER_ITEM:
        if size > SECAGG_BYTES_PER_ITEM[name] * items:
            yield Finding(line, "fail", key, f"{size} bytes in {items} item(s): more than SecAgg+ needs "
                          f"({SECAGG_BYTES_PER_ITEM[name]} per item)")
    elif name not in SECAGG_ID_LISTS:
        yield Finding(line, "attention", key, "SecAgg+ field not declared by spine-fl")


def _scan_values(entry: dict[str, Any], ids: Identifiers, model: DeclaredModel) -> Iterable[Finding]:
    line = entry["line"]
    for key, value in entry.get("metrics", {}).items():
        if key.startswith(SECAGG_PREFIX):
            yield from _scan_secagg(line, key, value, model)
            continue
        if isinstance(value, str):
            source = ids.match(value) if value.strip() else None
            if source:
                yield Finding(line, "fail", key, f"text {value!r} is an identifier from the site's data ({source})")
            elif key in DECLARED_HEX and HEX_DIGEST.match(value):
                continue
            elif key == PREFLIGHT_SITE and value == entry.get("site"):
                continue
            elif value not in DECLARED_TEXT.get(key, ()):
                yield Finding(line, "attention", key, f"undeclared text value {value!r} left the site")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value) and float(value).is_integer() and int(value) in ids.numbers:
                yield Finding(line, "fail", key, f"number {value!r} equals an identifier ({ids.numbers[int(value)]})")
            elif key not in DECLARED_NUMBERS:
                yield Finding(line, "attention", key, "numeric metric not declared by spine-fl")
        else:
            yield Finding(line, "fail", key, f"undeclared payload of type {type(value).__name__} left the site")
    error = entry.get("error")
    if isinstance(error, dict):
        reason = str(error.get("reason", ""))
        source = ids.match(reason) if reason else None
        if source:
            yield Finding(line, "fail", "error.reason", f"error text contains an identifier ({source})")


def scan_payloads(lines: list[dict[str, Any]], ids: Identifiers,
                  models: dict[str, DeclaredModel], fallback: DeclaredModel) -> list[Finding]:
    """Findings for every ledger line; `models` maps run id to the run's declared model."""
    findings: list[Finding] = []
    for entry in lines:
        if entry.get("unreadable"):
            findings.append(Finding(entry["line"], "fail", "line", "not readable JSON: its payload cannot be checked"))
            continue
        model = models.get(entry["run"], fallback)
        findings += [*_scan_arrays(entry, model), *_scan_values(entry, ids, model)]
    return findings


def scan_report(findings: list[Finding], lines: int, ids: Identifiers) -> dict[str, Any]:
    return {
        "lines_scanned": lines,
        "identifiers_checked": {"clinical_and_dicom_text_values": len(ids.exact), "identifiers": len(ids.substrings),
                                "numeric_identifiers": len(ids.numbers), "dicom_files_read": ids.dicom_files,
                                "dicom_files_unreadable": ids.dicom_unreadable},
        "findings": [asdict(f) for f in findings],
        "clean": not findings,
    }


def model_shapes(task: str) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(v.shape) for v in build_model(get_task(task)).state_dict().values())


def declared_models(settings: Mapping[str, RunSettings]) -> tuple[dict[str, DeclaredModel], DeclaredModel]:
    """Each known run's declared model, and the fallback for runs of unknown settings (any task's model)."""
    sizes = [s.image_size for s in settings.values() if get_task(s.task).image is not None] or [SMALLEST_IMAGE]
    pixels = min(sizes) ** 2
    per_run = {run: DeclaredModel((model_shapes(s.task),), pixels) for run, s in settings.items()}
    return per_run, DeclaredModel(tuple(model_shapes(t) for t in TASKS), pixels)


def run(audit: AuditInputs, report: Mapping[str, Any]) -> dict[str, Any]:
    lines = audit.lines
    audit.progress("reading identifiers from clinical.csv and DICOM headers")
    ids = collect_identifiers(audit.site.data_dir)
    per_run, fallback = declared_models(audit.settings)
    return {"payload_scan": scan_report(scan_payloads(lines, ids, per_run, fallback), len(lines), ids)}


def reasons(report: Mapping[str, Any]) -> list[Reason]:
    out = []
    findings = report["payload_scan"]["findings"]
    problems: tuple[Level, ...] = ("fail", "attention")
    for level in problems:
        mine = [f for f in findings if f["severity"] == level]
        for f in mine[:SHOWN_FINDINGS]:
            out.append(reason(level, "payload", f"Ledger line {f['line']}, {f['where']}: {f['what']}."))
        if len(mine) > SHOWN_FINDINGS:
            out.append(reason(level, "payload", f"... and {len(mine) - SHOWN_FINDINGS} more such findings."))
    if not findings:
        out.append(reason("pass", "payload", f"All {report['payload_scan']['lines_scanned']} recorded messages "
                          "held only model weights (or SecAgg+-masked weights) and declared numeric metrics; no "
                          "identifier from the clinical table or DICOM headers, no image-sized data."))
    return out
