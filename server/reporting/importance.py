"""What the shared model relies on, for the model card: permutation importance of each clinical
predictor, and (image tasks) the mean saliency map (server/reporting/saliency.py).

Computed in simulation only, on the pooled held-out (`test`) patients of every site: the only place
where one process holds every held-out patient's inputs and outcome. A real federation's coordinator
receives model weights and summary metrics, never a patient's predictors or images, so its card says
so instead (`not_available`). The simulation writes the section to `importance.json` beside the card;
`spine-fl report` reads it from there (or recomputes it from model.pt and the site folders).

Permutation importance (scikit-learn's `permutation_importance`, score = AUROC): the drop in AUROC
when one predictor's values are shuffled among the patients. sklearn permutes one column at a time,
but a category predictor is several one-hot inputs; so sklearn is given one column per predictor
holding patient indices, and the estimator below reads predictor j's inputs from the patient that
column j names. Shuffling column j hands every patient another patient's whole predictor j.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
from sklearn.inspection import permutation_importance
from sklearn.metrics import roc_auc_score

from spine_fl.shared.contract.tasks import Task
from spine_fl.shared.files import atomic_write_json

if TYPE_CHECKING:
    from spine_fl.shared.contract.data_contract import SiteData

IMPORTANCE_FILE = "importance.json"
SPLIT = "test"
REPEATS = 10
RANDOM_STATE = 20250101
METRIC = "AUROC"
GROUPING = "the one-hot inputs of a category predictor are shuffled together, as one predictor"
READING = ("Permutation importance is the drop in AUROC when that predictor's values are shuffled among the "
           "patients (its link with the outcome broken, everything else kept): it says what the model relies on, "
           "not what causes the outcome.")
SIMULATION_ONLY = ("Importances are computed in simulation only. Permutation importance needs every held-out "
                   "patient's predictors and outcome in one place, and a mean saliency map needs their images; "
                   "in a real federation these stay at the sites, which send the coordinator only model weights "
                   "and summary metrics of their held-out patients. A site can explain its own patients' "
                   "predictions locally with `spine-fl predict --explain`.")


@dataclass(frozen=True)
class Predictor:
    """One task predictor and the model inputs it occupies (a category: one per value)."""

    name: str
    kind: str
    unit: str
    inputs: slice

    @property
    def width(self) -> int:
        return self.inputs.stop - self.inputs.start


def predictors(task: Task) -> list[Predictor]:
    """The task's predictors in model-input order (the data contract encodes them in this order)."""
    out, start = [], 0
    for feature in task.features:
        width = len(feature.categories) if feature.kind == "category" else 1
        out.append(Predictor(feature.name, feature.kind, feature.unit, slice(start, start + width)))
        start += width
    return out


class ShuffledPredictors:
    """A scikit-learn estimator over patient indices: column j of X names the patient whose predictor j
    the model reads (see the module docstring). `fit` does nothing: the model is trained already."""

    def __init__(self, model: torch.nn.Module, features: np.ndarray, images: np.ndarray | None,
                 groups: list[Predictor], device: torch.device, batch: int = 256):
        self.model, self.features, self.images = model.to(device).eval(), features, images
        self.groups, self.device, self.batch = groups, device, batch

    def fit(self, X: np.ndarray, y: np.ndarray) -> "ShuffledPredictors":  # noqa: N803 (sklearn's names)
        return self

    def inputs(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        """The feature matrix the model sees: predictor j of row i from patient X[i, j]."""
        rows = np.asarray(X, dtype=np.int64)
        out = np.empty_like(self.features)
        for j, group in enumerate(self.groups):
            out[:, group.inputs] = self.features[rows[:, j], group.inputs]
        return out

    @torch.no_grad()
    def predict_proba(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        """Probability of the outcome per row (the images stay each patient's own)."""
        features = self.inputs(X)
        out = []
        for start in range(0, len(features), self.batch):
            part = slice(start, start + self.batch)
            feats = torch.from_numpy(features[part]).to(self.device)
            images = (torch.from_numpy(self.images[part]).to(self.device) if self.images is not None
                      else torch.zeros(len(feats), 0, device=self.device))
            out.append(torch.sigmoid(self.model(images, feats).double()).cpu().numpy())
        return np.concatenate(out).reshape(-1)


def auroc_score(estimator: ShuffledPredictors, X: np.ndarray, y: np.ndarray) -> float:  # noqa: N803
    return float(roc_auc_score(y, estimator.predict_proba(X)))


def permutation_section(model: torch.nn.Module, task: Task, features: np.ndarray, images: np.ndarray | None,
                        y: np.ndarray, device: torch.device, repeats: int = REPEATS) -> dict[str, Any]:
    """Per predictor the mean and SD (over `repeats` shuffles) of the AUROC drop, largest first."""
    groups = predictors(task)
    estimator = ShuffledPredictors(model, np.asarray(features, dtype=np.float32), images, groups, device)
    index = np.repeat(np.arange(len(y))[:, None], len(groups), axis=1)
    y = np.asarray(y).astype(int)
    result = permutation_importance(estimator, index, y, scoring=auroc_score, n_repeats=repeats,
                                    random_state=RANDOM_STATE)
    rows = [{"predictor": g.name, "kind": g.kind, "unit": g.unit, "inputs": g.width,
             "mean": float(result.importances_mean[j]), "sd": float(result.importances_std[j])}
            for j, g in enumerate(groups)]
    rows.sort(key=lambda r: -r["mean"])
    return {"method": "permutation importance (sklearn.inspection.permutation_importance)", "metric": METRIC,
            "repeats": repeats, "random_state": RANDOM_STATE, "patients": int(len(y)), "events": int(y.sum()),
            "baseline_auroc": auroc_score(estimator, index, y), "grouping": GROUPING, "reading": READING,
            "rows": rows}


def _pooled(sites: Mapping[str, "SiteData"]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    parts = [data.subset(SPLIT) for data in sites.values()]
    parts = [p for p in parts if len(p)]
    features = np.concatenate([p.features for p in parts]) if parts else np.zeros((0, 0), np.float32)
    images = np.concatenate([p.images for p in parts]) if parts and parts[0].images is not None else None
    y = np.concatenate([p.y for p in parts]) if parts else np.zeros(0)
    return features, images, y


def compute_importance(model: torch.nn.Module, task: Task, sites: Mapping[str, "SiteData"],
                       device: torch.device) -> dict[str, Any]:
    """The card's `importance` section from the pooled held-out patients of `sites`."""
    from spine_fl.server.reporting.saliency import mean_saliency

    started = time.perf_counter()
    features, images, y = _pooled(sites)
    if len(y) == 0 or len(np.unique(y)) < 2:
        return not_available(f"the pooled held-out patients ({len(y)}) do not include patients both with and "
                             "without the outcome: AUROC, and so its drop, is undefined")
    section: dict[str, Any] = {"available": True, "computed_in": "simulation", "split": SPLIT,
                               "sites": list(sites), "permutation": None, "saliency": None}
    if task.features:
        section["permutation"] = permutation_section(model, task, features, images, y, device)
    if task.image is not None and images is not None:
        section["saliency"] = mean_saliency(model, task, images, features, device)
    section["seconds"] = round(time.perf_counter() - started, 2)
    section["deployment"] = SIMULATION_ONLY
    return section


def not_available(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason}


def save_importance(run_dir: Path, model: torch.nn.Module, task: Task, sites: Mapping[str, "SiteData"],
                    device: torch.device) -> dict[str, Any]:
    """Compute the section and write importance.json into the run folder (read by the model card)."""
    section = compute_importance(model, task, sites, device)
    atomic_write_json(Path(run_dir) / IMPORTANCE_FILE, section)
    return section


def _recompute(run_dir: Path, metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """From model.pt and the simulation's own site folders, when both are there (a run before this file)."""
    site_dirs = [run_dir / "sites" / s for s in metrics["sites"]]
    if not (run_dir / "model.pt").is_file() or not all((d / "clinical.csv").is_file() for d in site_dirs):
        return None
    from spine_fl.server.reporting.federation_record import load_model
    from spine_fl.shared.contract.data_contract import load_site
    from spine_fl.shared.models.registry import pick_device

    model, settings = load_model(run_dir / "model.pt")
    sites = {d.name: load_site(d, settings.task_spec, settings.image_size) for d in site_dirs}
    return save_importance(run_dir, model, settings.task_spec, sites, pick_device())


def importance_of_run(run_dir: Path, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The section for a run folder: importance.json, else recomputed, else why there is none."""
    run_dir = Path(run_dir)
    if metrics.get("engine") == "deployment":
        return not_available(SIMULATION_ONLY)
    path = run_dir / IMPORTANCE_FILE
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            return not_available(f"{path} cannot be read ({exc}); delete it and run `spine-fl report` again")
    recomputed = _recompute(run_dir, metrics)
    if recomputed is not None:
        return recomputed
    return not_available(f"this run folder has neither {IMPORTANCE_FILE} nor the shared model (model.pt) with the "
                         "simulation's site folders to compute it from. " + SIMULATION_ONLY)
