"""`spine-fl predict`: score a site's own patients with a finished run's model, and explain some.

Everything happens at the site, on the site's folder: the model file is read, the folder is
validated against the model's task (the data contract's messages, as `spine-fl validate` gives
them; no outcome needed), every usable patient is scored and the results are written to the output
folder. Nothing is sent anywhere.

Outputs (each file written atomically):
  predictions.csv    patient_id, probability, decision, threshold, threshold_note (one row per patient)
  explanations.json  per explained patient: logit, baseline logit, attributions (the numbers)
  explanations/      per explained patient: <id>_<view>.png (+ .npy: the saliency map) for image
                     views, <id>_predictors.png for the predictors
  index.html         the page linking all of it (page.py); a previous run's page is removed before
                     anything is written and the new one is written last, so an index.html in OUT
                     always belongs to a run that finished
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spine_fl.client.prediction import plots
from spine_fl.shared.models.explain import (
    BASELINE,
    METHOD,
    STEPS,
    feature_contributions,
    integrated_gradients,
    saliency_peak,
)
from spine_fl.client.prediction.page import INDEX_HTML, index_html
from spine_fl.client.prediction.provenance import trained_privacy
from spine_fl.shared.config import ConfigError, RunSettings
from spine_fl.shared.contract.data_contract import SiteData, ValidationReport, validate_and_load
from spine_fl.shared.contract.tasks import AllOfLabel, BinaryColumnLabel, RelativeReductionLabel, Task
from spine_fl.shared.files import atomic_write_bytes, atomic_write_json
from spine_fl.shared.metrics import THRESHOLD
from spine_fl.shared.models.model_file import (
    MODEL_FILE,
    ModelFileError,
    model_from_bundle,
    read_model_bundle,
    usability_problem,
)

__all__ = ["DEFAULT_EXPLAIN", "ModelFileError", "Prediction", "Threshold", "UnknownPatientError",
           "UnusableSiteError", "find_threshold", "model_path", "outcome_words", "predict_site"]

PREDICTIONS_CSV = "predictions.csv"
EXPLANATIONS_JSON = "explanations.json"
EXPLANATIONS_DIR = "explanations"
DEFAULT_EXPLAIN = 5
NO_THRESHOLD_NOTE = "no recommended threshold recorded for this model: uncalibrated"
SHOWN_IDS = 5  # an unknown --patient: this many ids that do exist are named
THRESHOLD_FILES = ("model_card.json", "metrics.json")  # beside the model file, searched in this order


class UnusableSiteError(ValueError):
    """The folder cannot be scored for the model's task; carries the validator's report."""

    def __init__(self, report: ValidationReport):
        self.report = report
        super().__init__(f"{report.site_dir}: not usable for task {report.task} ({len(report.errors)} error(s))")


class UnknownPatientError(LookupError):
    def __init__(self, patient: str, known: list[str], excluded: bool):
        self.patient, self.known, self.excluded = patient, known, excluded
        shown = ", ".join(known[:SHOWN_IDS]) + (f", ... ({len(known)} in all)" if len(known) > SHOWN_IDS else "")
        why = (f"patient {patient} is in the folder but could not be scored (see the warnings above)" if excluded
               else f"no patient {patient} in the folder")
        super().__init__(f"{why}; patients that can be scored: {shown or 'none'}")


@dataclass(frozen=True)
class Threshold:
    value: float
    recommended: bool
    source: str  # the file that recorded it, or "" for the default
    rule: str = ""  # how the run chose it (e.g. "youden"), when it recorded that

    @property
    def note(self) -> str:
        if self.recommended:
            rule = f", chosen by the rule {self.rule}" if self.rule else ""
            return f"threshold {self.value:g} (the recommended threshold recorded in {self.source}{rule})"
        return f"threshold {self.value:g} ({NO_THRESHOLD_NOTE})"


@dataclass
class Prediction:
    """What one `predict_site` call did: where it wrote, for which task, at which threshold."""

    task: Task
    settings: RunSettings
    threshold: Threshold
    patient_ids: list[str]
    probabilities: np.ndarray
    report: ValidationReport
    out_dir: Path
    explained: list[str] = field(default_factory=list)
    device: str = "cpu"

    @property
    def positives(self) -> int:
        return int((self.probabilities >= self.threshold.value).sum())


def model_path(given: Path) -> Path:
    """The model file: `given` itself, or the model.pt in the run folder `given`."""
    given = Path(given)
    if given.is_dir():
        if not (given / MODEL_FILE).is_file():
            raise ModelFileError(f"{given}: a folder without {MODEL_FILE}; give the run's model file or its run folder")
        return given / MODEL_FILE
    return given


def _recorded(document: Any) -> tuple[Any, str]:
    """A recommended threshold as a run records it, and its rule: `recommended_threshold` (a number, or an
    object with `value` and `rule`), or `threshold: {recommended: ...}`; (None, "") when the document records none."""
    if not isinstance(document, dict):
        return None, ""
    found = document.get("recommended_threshold")
    if found is None and isinstance(document.get("threshold"), dict):
        found = document["threshold"].get("recommended")
    rule = ""
    if isinstance(found, dict):
        rule = str(found.get("rule_text") or found.get("rule") or "")
        found = found.get("value")
    return found, rule


def _valid(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) < 1.0):
        raise ModelFileError(f"{where}: recommended threshold {value!r} is not a probability between 0 and 1; "
                             "correct or remove it (without one, predict uses 0.5 and says so)")
    return float(value)


def find_threshold(model_file: Path, bundle: dict[str, Any]) -> Threshold:
    """The run's recommended threshold: in the model file, else model_card.json / metrics.json beside it;
    the default 0.5, flagged as uncalibrated, when the run recorded none."""
    value, rule = _recorded(bundle)
    if value is not None:
        return Threshold(_valid(value, str(model_file)), True, str(model_file), rule)
    for name in THRESHOLD_FILES:
        path = model_file.parent / name
        if not path.is_file():
            continue
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a card that cannot be read records nothing usable; the default is flagged
        value, rule = _recorded(document)
        if value is not None:
            return Threshold(_valid(value, str(path)), True, str(path), rule)
    return Threshold(THRESHOLD, False, "")


def outcome_words(task: Task) -> str:
    """What probability is predicted, in the task's words (the label's positive outcome)."""
    rule = task.label
    if isinstance(rule, RelativeReductionLabel):
        return f"{rule.score} reduced by >= {rule.threshold:.0%} at {rule.followup_name}"
    if isinstance(rule, AllOfLabel):
        return " and ".join(str(c) for c in rule.conditions)
    assert isinstance(rule, BinaryColumnLabel)
    return f"{rule.column} = {rule.positive}"


def _predictions_csv(ids: list[str], probabilities: np.ndarray, threshold: Threshold) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["patient_id", "probability", "decision", "threshold", "threshold_note"])
    for pid, p in zip(ids, probabilities.tolist()):
        writer.writerow([pid, repr(float(p)), int(p >= threshold.value), f"{threshold.value:g}", threshold.note])
    return buffer.getvalue().encode()


def _file_stem(patient: str, taken: set[str]) -> str:
    """A file name for a site-local patient id (any characters): safe, and distinct per patient."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", patient).strip(".") or "patient"
    base, i = stem, 2
    while stem in taken:
        stem, i = f"{base}_{i}", i + 1
    taken.add(stem)
    return stem


@torch.no_grad()
def _score(model: torch.nn.Module, data: SiteData, device: torch.device, batch: int = 256) -> np.ndarray:
    model.to(device).eval()
    out = []
    for start in range(0, len(data), batch):
        images = (torch.from_numpy(data.images[start:start + batch]).to(device) if data.images is not None
                  else torch.zeros(min(batch, len(data) - start), 0, device=device))
        features = torch.from_numpy(data.features[start:start + batch]).to(device)
        out.append(torch.sigmoid(model(images, features).double()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _explain(model: torch.nn.Module, task: Task, data: SiteData, rows: list[int], probabilities: np.ndarray,
             out_dir: Path, device: torch.device) -> list[dict[str, Any]]:
    """Attributions, PNGs and the numbers for the patients at `rows`."""
    images = data.images[rows] if data.images is not None else None
    attributions = integrated_gradients(model, images, data.features[rows], device)
    outcome = outcome_words(task)
    folder = out_dir / EXPLANATIONS_DIR
    taken: set[str] = set()
    entries = []
    for row, attr in zip(rows, attributions):
        pid, p = str(data.patient_ids[row]), float(probabilities[row])
        stem = _file_stem(pid, taken)
        entry: dict[str, Any] = {
            "patient_id": pid, "probability": p, "logit": attr.logit, "baseline_logit": attr.baseline_logit,
            "sum_of_attributions": attr.total, "convergence_delta": attr.convergence_delta}
        if attr.images is not None:
            assert task.image is not None
            limit = float(np.abs(attr.images).max())
            views = []
            for v, view in enumerate(task.image.views):
                png, npy = folder / f"{stem}_{view}.png", folder / f"{stem}_{view}.npy"
                plots.saliency_png(png, data.images[row, v], attr.images[v],
                                   f"patient {pid} - {view} - probability {p:.2f}", limit, outcome)
                buffer = io.BytesIO()
                np.save(buffer, attr.images[v].astype(np.float32))
                atomic_write_bytes(npy, buffer.getvalue())
                peak = saliency_peak(attr.images[v])
                views.append({"view": view, "png": str(png.relative_to(out_dir)),
                              "saliency": str(npy.relative_to(out_dir)), "shape": list(attr.images[v].shape),
                              "sum": float(attr.images[v].sum()), "peak_row_col": list(peak)})
            entry["views"] = views
        if task.features:
            contributions = feature_contributions(task, data.features[row], attr.features)
            png = folder / f"{stem}_predictors.png"
            title = (f"patient {pid} - probability {p:.2f}: what moved it "
                     f"(baseline probability {1 / (1 + math.exp(-attr.baseline_logit)):.2f})")
            if attr.images is not None:  # a fusion model: the bars are the predictors' share only
                title += f"\nthe images together: {attr.images.sum():+.2f} (see the saliency maps)"
            plots.contributions_png(png, contributions, title, outcome)
            entry["predictors_png"] = str(png.relative_to(out_dir))
            entry["contributions"] = [{"feature": c.feature, "unit": c.unit, "value": c.value,
                                       "contribution": c.contribution} for c in contributions]
        entries.append(entry)
    return entries


def predict_site(model_given: Path, site_dir: Path, out_dir: Path, patient: str | None = None,
                 explain: int = DEFAULT_EXPLAIN, device: torch.device | None = None) -> Prediction:
    """Score every usable patient in `site_dir`; explain the first `explain` of them, or only `patient`.

    ModelFileError: the model cannot be read, or its run did not complete (stopped, or no round
    trained: see model_file.usability_problem). UnusableSiteError: the folder fails validation (its
    report). UnknownPatientError: `patient` is not among the scored patients."""
    from spine_fl.shared.models.registry import pick_device

    device = device or pick_device()
    path = model_path(model_given)
    bundle = read_model_bundle(path)
    unfinished = usability_problem(path, bundle)  # a stopped run's (or untrained) weights score no patient
    if unfinished:
        raise ModelFileError(unfinished)
    try:
        model, settings = model_from_bundle(bundle)
    except (ConfigError, RuntimeError, KeyError, TypeError, ValueError) as exc:  # settings or weights that do not fit
        raise ModelFileError(f"{path}: the model file's settings or weights cannot be used: {exc}") from None
    task = settings.task_spec  # (the settings were checked on reading: an image_size below the minimum is refused)
    threshold = find_threshold(path, bundle)
    data, report = validate_and_load(site_dir, task, settings.image_size, labels=False)
    if data is None:
        raise UnusableSiteError(report)
    ids = [str(i) for i in data.patient_ids]
    if patient is not None and patient not in ids:
        named = re.compile(rf"(?<![\w-]){re.escape(patient)}(?![\w-])")
        mentioned = any(named.search(f"{p.where} {p.what}") for p in report.warnings)
        raise UnknownPatientError(patient, ids, mentioned)
    probabilities = _score(model, data, device)
    out_dir = Path(out_dir)
    (out_dir / INDEX_HTML).unlink(missing_ok=True)  # a page in OUT describes a finished run, never this one half-done
    atomic_write_bytes(out_dir / PREDICTIONS_CSV, _predictions_csv(ids, probabilities, threshold))
    rows = [ids.index(patient)] if patient is not None else list(range(min(max(explain, 0), len(ids))))
    entries = _explain(model, task, data, rows, probabilities, out_dir, device) if rows else []
    explanations = {
        "model": str(path), "task": task.name, "task_sha256": settings.task_sha256, "site_dir": str(site_dir),
        "outcome": outcome_words(task), "threshold": threshold.value, "threshold_note": threshold.note,
        "method": METHOD, "steps": STEPS, "baseline": BASELINE, "device": device.type,
        "reading": "each attribution is that input's share of (logit - baseline_logit); they add up to it up to "
                   "convergence_delta. Positive values raise the probability of the outcome, negative lower it.",
        "patients": entries}
    atomic_write_json(out_dir / EXPLANATIONS_JSON, explanations)
    result = Prediction(task, settings, threshold, ids, probabilities, report, out_dir,
                        [e["patient_id"] for e in entries], device.type)
    page = index_html(result, entries, explanations, path, Path(site_dir), trained_privacy(path, bundle, settings))
    atomic_write_bytes(out_dir / INDEX_HTML, page.encode("utf-8"))
    return result
