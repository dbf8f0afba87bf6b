"""The model card of a run: what the shared model predicts, for whom, how well, how reliably, how
useful its decisions would be, and at what privacy cost (`spine-fl report RUN_DIR`).

What a run folder can give:
- `metrics.json` (always): task, sites, patients, summary metrics of the federated model and of
  the pooled and local-only baselines, privacy spent, configuration.
- `predictions.csv` (a simulation run): every held-out patient's outcome and each model's
  predicted probability, with the subgroup columns. From these come the confidence intervals,
  the subgroup metrics, calibration and the decision curve.
- without `predictions.csv`, a simulation folder still holds the shared model (`model.pt`) and
  the virtual sites' data (`sites/`): the federated predictions are recomputed from them.
- `importance.json` (a simulation run; server/reporting/importance.py): permutation importance of
  the clinical predictors and the mean saliency map of the images, on the pooled held-out patients;
  recomputed from `model.pt` and `sites/` when missing.
- a coordinator in a real deployment never sees a patient-level prediction: its card has the
  sites' summary metrics only, and says so (importances included: simulation only).

Everything is computed on the held-out `test` split, the split `metrics.json` reports.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pandas as pd
from scipy.optimize import brentq
from scipy.special import expit, logit
from scipy.stats import bootstrap, rankdata
from sklearn.calibration import calibration_curve
from sklearn.linear_model import LogisticRegression

from spine_fl.server.reporting.importance import importance_of_run
from spine_fl.server.reporting.run_result import METRICS_FILE, RunResultError, read_run_result
from spine_fl.shared.config import RunSettings
from spine_fl.shared.contract.tasks import AllOfLabel, BinaryColumnLabel, RelativeReductionLabel, Task, get_task
from spine_fl.shared.metrics import THRESHOLD, binary_metrics
from spine_fl.shared.training.accounting import PLAIN_WORDS_FPR, dp_tpr_ceiling

if TYPE_CHECKING:
    from spine_fl.shared.contract.data_contract import SiteData
    from spine_fl.shared.training.evaluation import Scores

PREDICTIONS_FILE = "predictions.csv"
CARD_JSON = "model_card.json"
CARD_HTML = "model_card.html"
MODELS = ("federated", "pooled", "local_only")
SPLIT = "test"
PREDICTION_COLUMNS = ["model", "site", "patient_id", "age", "sex", "y", "p"]

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20250101
CONFIDENCE_LEVEL = 0.95
CI_METRICS = ("auroc", "brier", "sensitivity", "specificity")  # the order _class_statistics returns them in
AGE_BANDS = ((-math.inf, 50, "<50"), (50, 65, "50-64"), (65, math.inf, ">=65"))
SEX_LABELS = {"F": "female", "M": "male"}
MIN_SUBGROUP_CLASS = 5  # events and non-events a subgroup needs before its AUROC enters the gap
THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.01), 2)
TABLE_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CALIBRATION_BINS = 10
HISTOGRAM_EDGES = np.linspace(0, 1, 21)
# A recalibration fit this far from the ideal (slope 1, intercept 0) means the probabilities
# cannot be read as risks; a site would have to recalibrate locally before using them.
SLOPE_OK = (0.8, 1.25)
INTERCEPT_OK = 0.25


class ModelCardError(ValueError):
    """A run folder the card cannot be made from; the message names the file and what to do."""


# -- predictions -----------------------------------------------------------------------------

def predictions_frame(scores: Mapping[str, "Scores"], sites: Mapping[str, "SiteData"]) -> pd.DataFrame:
    """One row per (model, held-out patient): the outcome, the predicted probability, the subgroups."""
    frames = []
    for model, score in scores.items():
        for site, (y, p) in score.per_site.items():
            part = sites[site].subset(SPLIT)
            if len(part) != len(y):
                raise ValueError(f"{model} scores for {site} cover {len(y)} patients, its {SPLIT} split {len(part)}")
            frames.append(pd.DataFrame({
                "model": model, "site": site, "patient_id": part.patient_ids,
                "age": part.subgroups["age"].to_numpy() if "age" in part.subgroups else np.nan,
                "sex": part.subgroups["sex"].to_numpy() if "sex" in part.subgroups else None,
                "y": np.asarray(y).astype(int), "p": np.asarray(p, dtype=float)}))
    return pd.concat(frames, ignore_index=True)[PREDICTION_COLUMNS]


def save_predictions(out_dir: Path, scores: Mapping[str, "Scores"], sites: Mapping[str, "SiteData"]) -> Path:
    """Write predictions.csv: the held-out predictions the model card is computed from."""
    from spine_fl.shared.files import atomic_write_bytes

    path = Path(out_dir) / PREDICTIONS_FILE
    atomic_write_bytes(path, predictions_frame(scores, sites).to_csv(index=False).encode())
    return path


def _read_predictions(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype={"patient_id": str, "site": str, "model": str, "sex": str})
    except (OSError, ValueError) as exc:
        raise ModelCardError(f"{path}: cannot be read ({exc}); delete it to get a card from metrics.json alone"
                             ) from None
    missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
    if missing:
        raise ModelCardError(f"{path}: column(s) {', '.join(missing)} missing; it is written by `spine-fl simulate`: "
                             "run the scenario again, or delete the file to get a card from metrics.json alone")
    return frame


def _recompute_federated(run_dir: Path, metrics: dict) -> pd.DataFrame | None:
    """Federated predictions from model.pt and the simulation's site folders, if both are there."""
    site_dirs = [run_dir / "sites" / s for s in metrics["sites"]]
    if not (run_dir / "model.pt").is_file() or not all((d / "clinical.csv").is_file() for d in site_dirs):
        return None
    from spine_fl.server.reporting.federation_record import load_model
    from spine_fl.shared.contract.data_contract import load_site
    from spine_fl.shared.models.registry import pick_device
    from spine_fl.shared.training.evaluation import score_sites

    model, settings = load_model(run_dir / "model.pt")
    task = get_task(settings.task)
    sites = {d.name: load_site(d, task, settings.image_size) for d in site_dirs}
    return predictions_frame({"federated": score_sites(model, sites, SPLIT, pick_device())}, sites)


# -- statistics ------------------------------------------------------------------------------

def _num(value: Any) -> float | None:
    """JSON-safe number: NaN and infinities become null."""
    value = float(value)
    return value if math.isfinite(value) else None


def _class_statistics(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUROC, Brier score, sensitivity and specificity (CI_METRICS) from the events' (`pos`) and the
    non-events' (`neg`) predicted probabilities along `axis`; leading axes (scipy's resamples)
    broadcast. AUROC is the Mann-Whitney U of the events over n_pos * n_neg (ties count one half)."""
    pos = np.moveaxis(np.asarray(pos, dtype=float), axis, -1)
    neg = np.moveaxis(np.asarray(neg, dtype=float), axis, -1)
    n_pos, n_neg = pos.shape[-1], neg.shape[-1]
    lead = np.broadcast_shapes(pos.shape[:-1], neg.shape[:-1])
    pos, neg = np.broadcast_to(pos, lead + (n_pos,)), np.broadcast_to(neg, lead + (n_neg,))
    ranks = rankdata(np.concatenate([pos, neg], axis=-1), axis=-1)  # mid-ranks for ties
    u = ranks[..., :n_pos].sum(-1) - n_pos * (n_pos + 1) / 2
    return np.stack([u / (n_pos * n_neg),
                     (((1 - pos) ** 2).sum(-1) + (neg ** 2).sum(-1)) / (n_pos + n_neg),
                     (pos >= THRESHOLD).mean(-1),
                     (neg < THRESHOLD).mean(-1)])


def _resample(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper percentile-bootstrap bounds of CI_METRICS (scipy.stats.bootstrap).

    Events and non-events are two independent samples, each resampled with replacement to its own
    size (paired=False): the stratified bootstrap, in which every resample keeps both classes.
    scipy needs two observations per sample; a class of one patient resamples to itself every
    time, so it is held fixed and only the other class is resampled (the same distribution); with
    one patient in each class every resample is the sample, and the interval is its value."""
    samples = [np.asarray(pos, dtype=float), np.asarray(neg, dtype=float)]
    varying = [i for i, sample in enumerate(samples) if len(sample) > 1]
    if not varying:
        value = _class_statistics(*samples)
        return value, value

    def statistic(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
        full = list(samples)
        for i, sample in zip(varying, resampled):
            full[i] = np.moveaxis(sample, axis, -1)
        return _class_statistics(*full)

    result = bootstrap([samples[i] for i in varying], statistic, n_resamples=BOOTSTRAP_RESAMPLES,
                       vectorized=True, paired=False, confidence_level=CONFIDENCE_LEVEL, method="percentile",
                       random_state=BOOTSTRAP_SEED)
    return np.asarray(result.confidence_interval.low), np.asarray(result.confidence_interval.high)


def metrics_with_ci(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """Point estimates (scikit-learn, as metrics.json) with stratified percentile-bootstrap 95% CIs.

    Stratified: events and non-events are resampled separately, so every resample keeps both
    classes and the AUROC is always defined (the default of pROC's `ci.auc`). With one class only
    there is no interval: the CIs are null."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    point = binary_metrics(y, p)
    out: dict[str, Any] = {"n": len(y), "events": int(y.sum()), "prevalence": _num(point["prevalence"])}
    pos, neg = p[y == 1], p[y == 0]
    if len(pos) and len(neg):
        low, high = _resample(pos, neg)
    else:
        low = high = np.full(len(CI_METRICS), math.nan)
    for i, name in enumerate(CI_METRICS):
        out[name] = {"value": _num(point[name]), "ci": [_num(low[i]), _num(high[i])]}
    return out


def _from_summary(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics.json summary in the card's shape, without CIs (no predictions to resample)."""
    out: dict[str, Any] = {"n": summary.get("n"), "prevalence": _num(summary.get("prevalence", math.nan)),
                           "events": None}
    if out["n"] is not None and out["prevalence"] is not None:
        out["events"] = int(round(out["n"] * out["prevalence"]))
    for name in ("auroc", "brier", "sensitivity", "specificity"):
        out[name] = {"value": _num(summary.get(name, math.nan)), "ci": [None, None]}
    return out


def _per_site(frame: pd.DataFrame) -> dict[str, Any]:
    return {site: metrics_with_ci(part.y.to_numpy(), part.p.to_numpy())
            for site, part in frame.groupby("site", sort=False)}


def calibration(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """Reliability curve, Brier score, and the logistic recalibration of logit(p).

    slope: the coefficient of logit(p) in a logistic regression of the outcome on it (1 = ideal;
    below 1: predictions too extreme; above 1: too timid). intercept: calibration-in-the-large,
    the intercept with the slope fixed at 1 (0 = ideal; above 0: risk underestimated)."""
    y = np.asarray(y).astype(int)
    p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
    lp = logit(p)
    slope = intercept = math.nan
    if 0 < y.sum() < len(y):
        if np.ptp(lp) > 1e-6:
            slope = float(LogisticRegression(C=np.inf).fit(lp.reshape(-1, 1), y).coef_[0, 0])
        intercept = brentq(lambda a: float((y - expit(a + lp)).sum()), -30, 30)
    observed, predicted = calibration_curve(y, p, n_bins=CALIBRATION_BINS, strategy="quantile")
    ok = SLOPE_OK[0] <= slope <= SLOPE_OK[1] and abs(intercept) <= INTERCEPT_OK
    return {
        "brier": _num(binary_metrics(y, p)["brier"]),
        "slope": _num(slope), "intercept": _num(intercept),
        "mean_predicted": _num(p.mean()), "observed_rate": _num(y.mean()),
        "share_predicted_positive": _num((p >= THRESHOLD).mean()),
        "reliability": {"predicted": [_num(v) for v in predicted], "observed": [_num(v) for v in observed]},
        "histogram": {"edges": [float(e) for e in HISTOGRAM_EDGES],
                      "events": np.histogram(p[y == 1], HISTOGRAM_EDGES)[0].tolist(),
                      "non_events": np.histogram(p[y == 0], HISTOGRAM_EDGES)[0].tolist()},
        "well_calibrated": bool(ok),
        "reading": _calibration_reading(slope, intercept, p, y),
    }


def _calibration_reading(slope: float, intercept: float, p: np.ndarray, y: np.ndarray) -> str:
    said = (f"On average the model predicts {p.mean():.0%} where {y.mean():.0%} of patients had the outcome; "
            f"it calls {(p >= THRESHOLD).mean():.0%} of patients positive at the {THRESHOLD:g} cut-off.")
    if not math.isfinite(slope):
        return said + " It gives (almost) every patient the same probability, so its calibration slope is undefined."
    if SLOPE_OK[0] <= slope <= SLOPE_OK[1] and abs(intercept) <= INTERCEPT_OK:
        return said + " Its probabilities are close to the observed rates: they can be read as risks."
    problems = []
    if slope < SLOPE_OK[0]:
        problems.append(f"its predictions are too extreme (slope {slope:.2f}, ideal 1): high risks too high, "
                        "low risks too low")
    elif slope > SLOPE_OK[1]:
        problems.append(f"its predictions are spread too little (slope {slope:.2f}, ideal 1): patients' risks "
                        "differ more than its probabilities say")
    if intercept > INTERCEPT_OK:
        problems.append(f"it underestimates the risk overall (intercept {intercept:.2f}, ideal 0)")
    elif intercept < -INTERCEPT_OK:
        problems.append(f"it overestimates the risk overall (intercept {intercept:.2f}, ideal 0)")
    return (said + " The probabilities are NOT trustworthy as risks: " + "; ".join(problems) + ". Use the model to "
            "rank patients, or recalibrate it on local data, before reading a probability as a patient's risk or "
            "relying on the 0.5 cut-off.")


def net_benefit(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> np.ndarray:
    """Net benefit of acting on p >= t (Vickers & Elkin 2006): TP/n - FP/n * t / (1 - t)."""
    y = np.asarray(y).astype(bool)
    act = np.asarray(p, dtype=float)[None, :] >= thresholds[:, None]
    n = len(y)
    return (act & y).sum(1) / n - (act & ~y).sum(1) / n * thresholds / (1 - thresholds)


def decision_curve(curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Net benefit over thresholds for each model, for treating everyone and for treating no one.

    All curves are on the same patients (the federated model's held-out set)."""
    y = curves["federated"][0]
    prevalence = float(np.mean(y))
    treat_all = prevalence - (1 - prevalence) * THRESHOLDS / (1 - THRESHOLDS)
    models = {name: net_benefit(yy, pp) for name, (yy, pp) in curves.items()}
    fed = models["federated"]
    useful = fed > np.maximum(treat_all, 0.0) + 1e-12
    treats_all = THRESHOLDS[THRESHOLDS <= np.min(curves["federated"][1])]
    return {
        "thresholds": [float(t) for t in THRESHOLDS],
        "treat_all": [float(v) for v in treat_all],
        "treat_none": [0.0] * len(THRESHOLDS),
        "models": {name: [float(v) for v in nb] for name, nb in models.items()},
        "prevalence": prevalence,
        "useful_ranges": _ranges(THRESHOLDS, useful),
        # up to this threshold the model recommends acting for every patient: its curve is "treat everyone"
        "treats_everyone_up_to": float(treats_all.max()) if len(treats_all) else None,
        "table": [{"threshold": t, "federated": float(fed[i]), "treat_all": float(treat_all[i]), "treat_none": 0.0}
                  for t in TABLE_THRESHOLDS for i in [int(np.argmin(np.abs(THRESHOLDS - t)))]],
    }


def _ranges(thresholds: np.ndarray, mask: np.ndarray) -> list[list[float]]:
    """Contiguous runs of True as [first, last] thresholds."""
    out: list[list[float]] = []
    for t, on in zip(thresholds, mask):
        if on and out and math.isclose(out[-1][1] + 0.01, t, abs_tol=1e-9):
            out[-1][1] = float(t)
        elif on:
            out.append([float(t), float(t)])
    return out


def age_band(age: float) -> str | None:
    if not math.isfinite(age):
        return None
    return next(label for low, high, label in AGE_BANDS if low <= age < high)


def subgroups(frame: pd.DataFrame) -> dict[str, Any]:
    """Federated metrics per sex and per age band; per variable the AUROC gap, and the largest gap."""
    columns = {"sex": frame.sex.map(SEX_LABELS), "age band": frame.age.astype(float).map(age_band)}
    order = {"sex": list(SEX_LABELS.values()), "age band": [label for *_, label in AGE_BANDS]}
    out: dict[str, Any] = {"variables": {}, "largest_gap": None}
    for variable, column in columns.items():
        levels = {}
        for level in order[variable]:
            part = frame[column == level]
            if len(part):
                levels[level] = metrics_with_ci(part.y.to_numpy(), part.p.to_numpy())
                levels[level]["judged"] = bool(min(levels[level]["events"], len(part) - levels[level]["events"])
                                               >= MIN_SUBGROUP_CLASS)
        if not levels:
            continue
        judged = {k: v for k, v in levels.items() if v["judged"] and v["auroc"]["value"] is not None}
        entry: dict[str, Any] = {"levels": levels, "missing": int(column.isna().sum()), "gap": None}
        if len(judged) >= 2:
            best = max(judged, key=lambda k: judged[k]["auroc"]["value"])
            worst = min(judged, key=lambda k: judged[k]["auroc"]["value"])
            entry.update(gap=judged[best]["auroc"]["value"] - judged[worst]["auroc"]["value"], best=best, worst=worst,
                         cis_overlap=bool(judged[worst]["auroc"]["ci"][1] >= judged[best]["auroc"]["ci"][0]))
        out["variables"][variable] = entry
    gaps = {k: v for k, v in out["variables"].items() if v["gap"] is not None}
    if gaps:
        variable = max(gaps, key=lambda k: gaps[k]["gap"])
        g = gaps[variable]
        out["largest_gap"] = {"variable": variable, "metric": "auroc", "gap": g["gap"], "best": g["best"],
                              "worst": g["worst"], "cis_overlap": g["cis_overlap"]}
    return out


# -- the card --------------------------------------------------------------------------------

def _load_metrics(run_dir: Path) -> dict:
    path = run_dir / METRICS_FILE
    if not run_dir.is_dir():
        raise ModelCardError(f"{run_dir}: no such folder; pass the results folder of a run "
                             "(the --out of `spine-fl simulate`, or the out_dir of a federation file)")
    if not path.is_file():
        raise ModelCardError(f"{path} not found: the model card is made from a finished run's {METRICS_FILE}; "
                             "pass the folder `spine-fl simulate --out` wrote, or run the simulation first")
    try:
        return read_run_result(run_dir).to_json()
    except RunResultError as exc:
        raise ModelCardError(f"not a spine-fl metrics file: {exc}") from None


def _evidence(run_dir: Path, metrics: dict) -> tuple[pd.DataFrame | None, str, str]:
    path = run_dir / PREDICTIONS_FILE
    if path.is_file():
        frame = _read_predictions(path)
        if "federated" in set(frame.model):
            return frame, "predictions", (f"Computed from every held-out patient's prediction ({PREDICTIONS_FILE}); "
                                          f"95% confidence intervals from {BOOTSTRAP_RESAMPLES} stratified bootstrap "
                                          "resamples (events and non-events resampled separately).")
    frame = _recompute_federated(run_dir, metrics)
    if frame is not None:
        return frame, "recomputed", ("Federated model: computed from held-out predictions recomputed from model.pt and "
                                     "the simulation's site folders, with 95% bootstrap confidence intervals. Pooled "
                                     f"and local-only baselines: summary numbers from {METRICS_FILE} only (this run "
                                     f"saved no {PREDICTIONS_FILE}), without confidence intervals.")
    return None, "metrics_only", (f"Only the sites' summary metrics are available ({METRICS_FILE}): the coordinator "
                                  "never sees patient-level predictions. Confidence intervals, subgroup metrics, "
                                  "calibration curves and decision curves need predictions, which stay at the sites; "
                                  "each site can compute them locally.")


def _comparison(frame: pd.DataFrame | None, metrics: dict) -> dict[str, Any]:
    out = {}
    for model in MODELS:
        part = frame[frame.model == model] if frame is not None else None
        if part is not None and len(part):
            out[model] = {"overall": metrics_with_ci(part.y.to_numpy(), part.p.to_numpy()), "per_site": _per_site(part),
                          "source": "predictions"}
        elif metrics.get(model):
            summary = metrics[model]
            out[model] = {"overall": _from_summary(summary),
                          "per_site": {s: _from_summary(m) for s, m in summary.get("per_site", {}).items()},
                          "source": METRICS_FILE}
    return out


def _spent(site: dict) -> float | None:
    """The run's whole spending at a site: training and the recalibration histogram (epsilon_total)."""
    total = site.get("epsilon_total")
    return total if total is not None else site.get("epsilon")


def _privacy(metrics: dict) -> dict[str, Any]:
    privacy = metrics.get("privacy") or {}
    run = (metrics.get("config") or {}).get("run", {})
    per_site = {site: {**v, "epsilon": _spent(v)} for site, v in privacy.get("per_site", {}).items()}
    epsilons = [v["epsilon"] for v in per_site.values() if v.get("dp") and v.get("epsilon") is not None]
    guaranteed = {site: v for site, v in per_site.items()
                  if v.get("dp") and v.get("epsilon") is not None and v.get("delta") is not None}
    weakest = max(guaranteed, key=lambda site: guaranteed[site]["epsilon"]) if guaranteed else None
    return {
        "dp": bool(run.get("dp", any(v.get("dp") for v in per_site.values()))),
        "secagg": bool((privacy.get("secagg") or {}).get("enabled", run.get("secagg", False))),
        "settings": {k: run[k] for k in ("noise-multiplier", "max-grad-norm", "target-epsilon", "delta", "accountant",
                                         "secagg-clipping-range") if k in run},
        "per_site": per_site,
        "max_epsilon": max(epsilons) if epsilons else None,
        "refusals": privacy.get("refusals", []),
        # the weakest site's guarantee read as an attack bound: the most any membership attack can catch
        # of that site's training patients while wrongly accusing `fpr` of others (dp_tpr_ceiling)
        "attack_bound": None if weakest is None else {
            "site": weakest, "epsilon": guaranteed[weakest]["epsilon"], "delta": guaranteed[weakest]["delta"],
            "fpr": PLAIN_WORDS_FPR, "tpr_ceiling": float(dp_tpr_ceiling(
                PLAIN_WORDS_FPR, guaranteed[weakest]["epsilon"], guaranteed[weakest]["delta"]))},
    }


def _findings(card: dict) -> dict[str, str]:
    """The card's plain-language summary, one sentence per topic, most important first."""
    out = {}
    fed = card["comparison"]["federated"]["overall"]
    out["overall"] = (f"Given one patient with the outcome and one without, the shared (federated) model gives the "
                      f"higher probability to the right one {_pct(fed['auroc']['value'])} of the time (AUROC "
                      f"{_with_ci(fed['auroc'])}; {fed['n']} held-out patients from {len(card['data']['sites'])} "
                      "sites).")
    other = {m: card["comparison"][m]["overall"]["auroc"]["value"]
             for m in ("pooled", "local_only") if m in card["comparison"]}
    if other:
        parts = [f"{'all data pooled in one place' if m == 'pooled' else 'each site training alone'} {v:.2f}"
                 for m, v in other.items() if v is not None]
        out["comparison"] = "For comparison, AUROC with " + " and with ".join(parts) + "."
    per_site = card["comparison"]["federated"]["per_site"]
    site_auc = {s: m["auroc"]["value"] for s, m in per_site.items() if m["auroc"]["value"] is not None}
    if len(site_auc) > 1:
        lo, hi = min(site_auc, key=site_auc.get), max(site_auc, key=site_auc.get)
        out["sites"] = f"Across sites the AUROC ranges from {site_auc[lo]:.2f} ({lo}) to {site_auc[hi]:.2f} ({hi})."
    gap = (card.get("subgroups") or {}).get("largest_gap")
    if gap:
        chance = ("the confidence intervals overlap, so this may be chance" if gap["cis_overlap"]
                  else "the confidence intervals do not overlap")
        out["subgroups"] = (f"Largest subgroup gap: by {gap['variable']}, AUROC {gap['gap']:.2f} lower for "
                            f"{gap['worst']} than for {gap['best']} patients; {chance}.")
    cal = (card.get("calibration") or {}).get("federated")
    if cal:
        out["calibration"] = (("Calibration: good - the predicted probabilities match observed rates "
                               if cal["well_calibrated"] else "Calibration: POOR - the predicted probabilities should "
                               "not be read as risks ")
                              + f"(slope {_f(cal['slope'])}, intercept {_f(cal['intercept'])}, "
                                f"Brier {_f(cal['brier'])}).")
    out["probability"] = probability_sentence(card)
    recal = card.get("recalibration")
    if recal:
        out["recalibration"] = recalibration_sentence(recal)
    relied = importance_sentence(card.get("importance") or {})
    if relied:
        out["importance"] = relied
    dca = card.get("decision_curve")
    if dca:
        ranges = ", ".join(range_text(a, b) for a, b in dca["useful_ranges"])
        out["decision"] = (f"Decision curve: acting on the model beats both treating everyone and treating no one for "
                           f"threshold probabilities {ranges}." if ranges else "Decision curve: at no threshold does "
                           "acting on the model beat treating everyone or no one.")
    privacy = card["privacy"]
    # per site "trained" (federation record): whether it trained in this run at all; absent in older records
    sites = privacy.get("per_site") or {}
    trained = [s for s, v in sites.items() if v.get("trained", True)]
    if sites and not trained:
        out["privacy"] = ("Privacy: no site trained in this run (it stopped before any site trained): the model "
                          "learned nothing from patients, its weights are the initial ones, and no differential-privacy "
                          "training took place.")
    elif privacy["dp"]:
        eps = ("DP-SGD" if privacy["max_epsilon"] is None
               else f"at most epsilon = {privacy['max_epsilon']:.2f} per site")
        who = ("every site" if len(trained) == len(sites)
               else f"every site that trained ({len(trained)} of {len(sites)}: {', '.join(sorted(trained))})")
        out["privacy"] = (f"Privacy: {who} trained with differential privacy ({eps} in this run)"
                          + ("; updates were combined by secure aggregation." if privacy["secagg"] else "."))
    else:
        out["privacy"] = ("Privacy: this run trained WITHOUT differential privacy"
                          + (" (secure aggregation on)." if privacy["secagg"] else "."))
    return out


EXAMPLE_PROBABILITY = 0.70


def outcome_text(task: Task) -> str:
    """What "the outcome" is for this task, in the label's own terms, to finish "expected to ..."."""
    rule = task.label
    if isinstance(rule, RelativeReductionLabel):
        return (f"have a favourable outcome: their {rule.score_meaning} ({rule.score}) reduced by at least "
                f"{rule.threshold:.0%} at the {rule.followup_name}")
    if isinstance(rule, AllOfLabel):
        return f'meet every condition of "{task.title}": ' + " and ".join(str(c) for c in rule.conditions)
    assert isinstance(rule, BinaryColumnLabel)
    return f'have the outcome "{task.title}" ({rule.column} = {rule.positive})'


def probability_sentence(card: dict) -> str:
    """What one patient's probability means, in the task's outcome words, and whether this run's
    held-out patients bear it out (the calibration section)."""
    p = EXAMPLE_PROBABILITY
    text = (f"What a probability means for one patient: a probability of {p:.2f} means that among 100 patients like "
            f"this one, about {p * 100:.0f} would be expected to {card['task']['outcome']} - if the model is "
            "calibrated for your population; see the calibration section.")
    cal = (card.get("calibration") or {}).get("federated")
    if cal is None:
        return text + " This card has no patient-level predictions to check that: check it on your own patients."
    if cal["well_calibrated"]:
        return text + " On this run's held-out patients the probabilities were close to the observed rates."
    return text + (" On this run's held-out patients they were NOT: read the probabilities as a ranking, not as "
                   "risks, until the model is recalibrated.")


def importance_sentence(importance: dict) -> str | None:
    """The predictors the model relies on most (permutation importance), else its images' leading view."""
    if not importance.get("available"):
        return None
    permutation, saliency = importance.get("permutation"), importance.get("saliency")
    if permutation:
        top = [r for r in permutation["rows"][:2] if r["mean"] > 0]
        if not top:
            return "What the model relies on: shuffling no single predictor lowers its AUROC (permutation importance)."
        return ("What the model relies on most: " + ", then ".join(f"{r['predictor']} (AUROC drops by "
                                                                  f"{r['mean']:.2f} when it is shuffled)" for r in top)
                + "; this is what the model uses, not what causes the outcome.")
    if saliency and len(saliency["views"]) > 1:
        view = max(saliency["views"], key=lambda v: v["share"])
        return (f"Where the model looks: the {view['view']} view carries the largest share of the mean saliency map "
                f"({view['share']:.0%}).")
    return None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


INTERVAL_DIGITS = (2, 3, 4)  # an interval is printed with the fewest of these digits that tell its ends apart
NO_SPREAD = "no interval: every bootstrap resample gives this value"
TOO_NARROW = f"no interval: its ends differ by less than {10 ** -INTERVAL_DIGITS[-1]:g}"


def interval_text(lo: float, hi: float) -> str | None:
    """The interval's ends with enough digits to tell them apart ("0.935-0.945", never "0.94-0.94");
    None when they are equal to four digits: there is no interval to print (say `no_interval_reason`)."""
    for digits in INTERVAL_DIGITS:
        low, high = f"{lo:.{digits}f}", f"{hi:.{digits}f}"
        if low != high:
            return f"{low}-{high}"
    return None


def no_interval_reason(lo: float, hi: float) -> str:
    """Why an interval is printed as one number: equal ends, or ends closer than four digits tell apart."""
    return NO_SPREAD if lo == hi else TOO_NARROW


def range_text(lo: float, hi: float, joiner: str = "-") -> str:
    """A range of threshold probabilities; a range of one threshold is that number."""
    return f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}{joiner}{hi:.2f}"


def _with_ci(metric: dict) -> str:
    lo, hi = metric["ci"]
    if lo is None or hi is None:
        return _f(metric["value"])
    interval = interval_text(lo, hi)
    return f"{_f(metric['value'])} ({f'95% CI {interval}' if interval else no_interval_reason(lo, hi)})"


def build_card(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    metrics = _load_metrics(run_dir)
    frame, evidence, evidence_note = _evidence(run_dir, metrics)
    fed = frame[frame.model == "federated"] if frame is not None else None
    config = metrics.get("config") or {}
    run_config = config.get("run") or {}  # carries the task's definition: a task file need not be shipped
    task = RunSettings.from_run_config(run_config).task_spec if run_config else get_task(metrics["task"])
    consortium = config.get("consortium", {})
    comparison = _comparison(frame, metrics)
    card: dict[str, Any] = {
        "card_version": 1,
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
        "task": {"name": task.name, "title": task.title, "description": task.description, "split": SPLIT,
                 "outcome": outcome_text(task)},
        "run": {k: metrics.get(k) for k in ("scenario", "status", "stop_reason")}
               | {"strategy": config.get("run", {}).get("strategy"), "rounds_completed": len(metrics.get("rounds", [])),
                  "rounds_planned": config.get("run", {}).get("rounds")},
        "data": {
            "source": consortium.get("source", "unknown"),
            "attribution": metrics.get("data_attribution"),
            "sites": [{"site": s, **metrics["patients"].get(s, {}),
                       "test_prevalence": comparison["federated"]["per_site"].get(s, {}).get("prevalence")}
                      for s in metrics["sites"]],
        },
        "evidence": evidence,
        "evidence_note": evidence_note,
        "comparison": comparison,
        "external": {m: {"auroc": _num(metrics[m]["external"]["auroc"]), "n": metrics[m]["external"]["n"]}
                     for m in ("federated", "pooled") if (metrics.get(m) or {}).get("external")},
        "subgroups": subgroups(fed) if fed is not None and task.subgroups else None,
        "calibration": ({m: calibration(part.y.to_numpy(), part.p.to_numpy())
                         for m, part in frame.groupby("model", sort=False)} if frame is not None else None),
        "decision_curve": (decision_curve({m: (part.y.to_numpy(), part.p.to_numpy())
                                           for m, part in frame.groupby("model", sort=False)})
                           if frame is not None else None),
        "privacy": _privacy(metrics),
        "importance": importance_of_run(run_dir, metrics),
    }
    recal = recalibration(metrics.get("calibration"))
    if recal is not None:
        card["recalibration"] = recal
        if recal.get("status") == "fitted":
            card["recommended_threshold"] = recal["threshold"]
    card["findings"] = _findings(card)
    card["limitations"] = _limitations(card)
    return card


def recalibration(section: dict | None) -> dict[str, Any] | None:
    """The card's view of the federated recalibration (server/calibration.py, run result `calibration`)."""
    if not section:
        return None
    if section.get("status") != "fitted":
        return {"status": section.get("status", "failed"), "reason": section.get("reason")}
    t = section["threshold"]
    return {"status": "fitted", "method": "Platt scaling", "a": section["a"], "b": section["b"],
            "secure_aggregation": section.get("secure_aggregation"), "sites": section.get("sites"),
            "patients": section.get("patients", "held-out (test)"),
            "noise_std_per_count": section["histogram"]["noise_std_per_count"],
            "threshold": {"value": t["value"], "rule": t["rule"], "rule_text": t["rule_text"],
                          "sensitivity": t["sensitivity"], "specificity": t["specificity"]},
            "decision_curve": section["decision_curve"], "histogram_before": section["before"],
            "histogram_after": section["after"], "held_out": section.get("held_out") or {}}


def recalibration_sentence(recal: dict[str, Any]) -> str:
    if recal["status"] != "fitted":
        return f"Recalibration: not applied ({recal.get('reason')}); the probabilities are uncalibrated."
    t, dc = recal["threshold"], recal["decision_curve"]
    how = "summed by secure aggregation" if recal["secure_aggregation"] else "summed WITHOUT secure aggregation"
    text = (f"Recalibration: after training, the sites' noised histograms of the model's scores on their "
            f"{recal['patients']} patients ({how}, noise {recal['noise_std_per_count']:g} per count) fitted Platt scaling "
            f"(slope {_f(recal['a'])}, intercept {_f(recal['b'])}); the model file's probabilities are the "
            f"recalibrated ones. Recommended threshold {t['value']:.2f}, by {t['rule_text']}: sensitivity "
            f"{_f(t['sensitivity'])}, specificity {_f(t['specificity'])} on that histogram.")
    test = recal["held_out"].get("test")
    if test:
        b, a = test["before"], test["after"]
        text += (f" On the held-out patients, before -> after: calibration slope {_f(b['slope'])} -> {_f(a['slope'])}, "
                 f"intercept {_f(b['intercept'])} -> {_f(a['intercept'])}, Brier {_f(b['brier'])} -> {_f(a['brier'])} "
                 f"(base rate {_f(a['base_rate_brier'])}); at the recommended threshold sensitivity "
                 f"{_f(a['sensitivity'])}, specificity {_f(a['specificity'])}.")
    external = recal["held_out"].get("external")
    if external:  # patients no recalibration release counted: the out-of-sample check
        b, a = external["before"], external["after"]
        text += (f" On the external patients, which no release counted: slope {_f(b['slope'])} -> {_f(a['slope'])}, "
                 f"Brier {_f(b['brier'])} -> {_f(a['brier'])} (base rate {_f(a['base_rate_brier'])}), sensitivity "
                 f"{_f(a['sensitivity'])}, specificity {_f(a['specificity'])}.")
    text += (f" The model beats treat-all and treat-none for thresholds {range_text(dc['from'], dc['to'])} on the "
             "summed histogram." if dc.get("from") is not None else
             " On the summed histogram the model beats treat-all and treat-none at no threshold.")
    return text


def _limitations(card: dict) -> list[str]:
    out = []
    if card["data"]["source"] == "synthetic":
        out.append("The patients are synthetic (generated by spine-fl): these numbers show what the method does, "
                   "not how a clinical model would perform.")
    if card["run"]["status"] not in (None, "completed"):
        out.append(f"The federation stopped early ({card['run']['stop_reason']}): the model is the last one "
                   "aggregated.")
    if card["evidence"] == "metrics_only":
        out.append("No patient-level predictions: no confidence intervals, subgroup, calibration or decision-curve "
                   "results in this card.")
    if card["subgroups"] is None and card["evidence"] != "metrics_only":
        out.append(f"Task {card['task']['name']} records no age or sex: no subgroup metrics.")
    out.append("Thresholded metrics (sensitivity, specificity) use the fixed cut-off "
               f"{THRESHOLD:g}; a poorly calibrated model can look much better or worse at another cut-off.")
    out.append("All results are on each site's held-out split; the decision curve and calibration pool the "
               "sites' held-out patients, so the larger sites weigh more.")
    return out


def write_model_card(run_dir: Path) -> dict[str, Any]:
    """Build the card of a run and write model_card.json and model_card.html into it (atomically), with
    the mean saliency map beside them (model_card_saliency.png) when the card has one."""
    from spine_fl.server.reporting.importance_html import SALIENCY_PNG, saliency_png
    from spine_fl.server.reporting.model_card_html import render_card
    from spine_fl.shared.files import atomic_write_bytes, atomic_write_json

    run_dir = Path(run_dir)
    card = build_card(run_dir)
    page = render_card(card)  # before writing anything: no card.json without its page
    figure = saliency_png(card)
    if figure is not None:
        atomic_write_bytes(run_dir / SALIENCY_PNG, figure)
    atomic_write_json(run_dir / CARD_JSON, card)
    atomic_write_bytes(run_dir / CARD_HTML, page.encode())
    return card
