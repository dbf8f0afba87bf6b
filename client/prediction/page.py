"""`OUT/index.html`: one page a clinician opens to read `spine-fl predict`'s results.

Every scored patient with probability and decision, the threshold and its rule, the model's task,
task hash and privacy guarantee, and each explanation image (relative links into OUT, so the folder
can be moved or zipped whole). It says in plain words what one patient's probability means and that
an explanation shows what the model relied on, not a cause. Rendered with the shared HTML
environment (shared/html/page.py: jinja2, autoescape on), so a patient id such as `<script>` is text.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from spine_fl.client.prediction.provenance import TrainedPrivacy
from spine_fl.shared.html.page import render_page
from spine_fl.shared.models.registry import model_of_task

if TYPE_CHECKING:
    from spine_fl.client.prediction.predict import Prediction

INDEX_HTML = "index.html"
TEMPLATE = "predictions.html"  # in templates/, beside this module


def _href(out_dir: Path, relative: str) -> str | None:
    """A relative URL for a file this run wrote in OUT; None when the file is not there (never a dead link)."""
    path = Path(relative)
    if path.is_absolute() or ".." in path.parts or not (out_dir / path).is_file():
        return None
    return quote(path.as_posix())


def _decision(p: float, threshold: float) -> str:
    return "1 (at or above the threshold)" if p >= threshold else "0 (below the threshold)"


def _meaning(prediction: Prediction, outcome: str) -> dict[str, Any]:
    t = prediction.threshold
    example = ""
    if prediction.patient_ids:
        p = float(prediction.probabilities[0])
        example = (f" For example, patient {prediction.patient_ids[0]} has probability {p:.2f}: of 100 patients like "
                   f"this one, about {round(100 * p)} would be expected to have the outcome.")
    if t.recommended:
        summary = (f"A probability is the model's estimate of the chance of the outcome ({outcome}) for patients "
                   f"like this one (same inputs), not a certainty for this patient.{example}")
    else:
        summary = ("This model records no calibration: its probabilities put patients in order (a higher probability "
                   "means the outcome is more likely than for a patient with a lower one) but may not be read as "
                   f"risks. Do not read 0.30 as a 30% chance of {outcome}.")
    rule = f" (rule: {t.rule})" if t.rule else ""
    points = [
        f"Decision 1 means the probability is at or above the threshold {t.value:g}{rule}; 0 means below. The "
        "decision is the model's suggestion at that cut-off, not a diagnosis: the clinician decides.",
        "The estimate holds only as far as this site's patients resemble those the model was trained and "
        "calibrated on; it knows nothing that is not in its inputs.",
    ]
    return {"summary": summary, "points": points}


def _model(prediction: Prediction, model_file: Path, outcome: str, privacy: TrainedPrivacy,
           explanations: dict[str, Any]) -> dict[str, Any]:
    task, t = prediction.task, prediction.threshold
    rows = [
        ["task", f"{task.name}: {task.title}"],
        ["task definition SHA-256", prediction.settings.task_sha256],
        ["predicts the probability of", outcome],
        ["model file", str(model_file)],
        ["network", model_of_task(task)[0]],
        ["trained under (\u03b5, \u03b4)", privacy.pair],
        ["threshold", f"{t.value:g}"],
        ["threshold rule", t.rule or ("not recorded" if t.recommended else "none: the uncalibrated default 0.5")],
        ["threshold source", t.source or "default (the run recorded no recommended threshold)"],
        ["explanations", f"{explanations['method']} ({explanations['steps']} steps); baseline: "
                         f"{explanations['baseline']}"],
        ["scored on", prediction.device],
    ]
    return {"summary": f"The shared model of task {task.name}, read from {model_file}.", "rows": rows,
            "privacy": privacy.sentence}


def _figures(out_dir: Path, pid: str, entry: dict[str, Any]) -> list[dict[str, str]]:
    figures = []
    for view in entry.get("views", []):
        href = _href(out_dir, view["png"])
        if href:
            row, col = view["peak_row_col"]
            figures.append({"href": href, "alt": f"saliency map of patient {pid}, view {view['view']}",
                            "caption": f"{view['view']}: where the image moved the probability (red towards the "
                                       f"outcome, blue away); strongest at row {row}, column {col}"})
    href = _href(out_dir, entry["predictors_png"]) if "predictors_png" in entry else None
    if href:
        figures.append({"href": href, "alt": f"predictor contributions of patient {pid}",
                        "caption": "each predictor's contribution to the log-odds (red raises the probability, "
                                   "blue lowers it), largest first"})
    return figures


def _explanations(prediction: Prediction, entries: list[dict[str, Any]], outcome: str,
                  explanations: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The section, and the anchor of each explained patient (by id) for the patient table's links."""
    out_dir, threshold = prediction.out_dir, prediction.threshold.value
    anchors, patients = {}, []
    for i, entry in enumerate(entries):
        pid, p = entry["patient_id"], float(entry["probability"])
        anchors[pid] = f"patient-{i + 1}"
        patients.append({
            "anchor": anchors[pid], "patient_id": pid, "probability": f"{p:.3f}", "decision": _decision(p, threshold),
            "summary": f"Log-odds {entry['logit']:+.2f} against {entry['baseline_logit']:+.2f} for the reference "
                       f"input; the attributions add up to the difference (convergence delta "
                       f"{entry['convergence_delta']:.2g}).",
            "figures": _figures(out_dir, pid, entry)})
    reading = [
        "An explanation shows what the model relied on for this patient, not a cause: a highlighted area or a long "
        f"bar is not why the patient will or will not have {outcome}, and changing it in the patient need not "
        "change the outcome.",
        f"Each value is that input's share of the change from the reference input ({explanations['baseline']}) to "
        "this patient, in log-odds (Integrated Gradients): red raises the probability of the outcome, blue lowers it.",
        "The numbers behind every picture are in explanations.json (and the saliency maps as .npy files).",
    ]
    summary = (f"{len(entries)} patient(s) explained." if entries else "No patient was explained in this run.")
    return ({"summary": summary, "reading": reading, "patients": patients,
             "none": "Run spine-fl predict with --explain N or --patient ID to explain patients."}, anchors)


def index_html(prediction: Prediction, entries: list[dict[str, Any]], explanations: dict[str, Any],
               model_file: Path, site_dir: Path, privacy: TrainedPrivacy) -> str:
    """The page, from what the run wrote: `entries` and `explanations` as in explanations.json."""
    task, t, out_dir = prediction.task, prediction.threshold, prediction.out_dir
    outcome = explanations["outcome"]
    n, positives = len(prediction.patient_ids), prediction.positives
    section, anchors = _explanations(prediction, entries, outcome, explanations)
    rows = [{"patient_id": pid, "probability": f"{float(p):.3f}", "decision": _decision(float(p), t.value),
             "anchor": anchors.get(pid)} for pid, p in zip(prediction.patient_ids, prediction.probabilities.tolist())]
    files = [{"name": name, "href": href} for name in ("predictions.csv", "explanations.json")
             if (href := _href(out_dir, name))]
    findings = [
        f"{n} patient(s) in {site_dir} scored for {task.title}: the probability of {outcome}.",
        f"{positives} at or above the threshold {t.value:g} (decision 1), {n - positives} below (decision 0); "
        f"{t.note}.",
        f"Trained under {privacy.pair}.",
        "Computed at this site, offline: nothing was sent anywhere.",
    ]
    return render_page(
        __package__, TEMPLATE, title=f"Predictions: {task.title}",
        subtitle=f"{site_dir} scored with {model_file} (spine-fl predict)", findings=findings,
        meaning=_meaning(prediction, outcome), model=_model(prediction, model_file, outcome, privacy, explanations),
        patients={"summary": f"One row per scored patient ({n}), in the order of the site's clinical table.",
                  "threshold": f"{t.value:g}", "rows": rows, "files": files,
                  "files_note": "The same numbers, one row per patient, are in predictions.csv."},
        explanations=section)
