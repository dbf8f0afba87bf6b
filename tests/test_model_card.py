"""The model card (`spine-fl report RUN_DIR`): its numbers checked against independent computations."""

from __future__ import annotations

import copy
import html
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from model_card_samples import DECISIVE, SECOND, SITES, planted_images, planted_tabular, sample_run
from scipy.special import expit
from sklearn.metrics import confusion_matrix, roc_auc_score
from typer.testing import CliRunner

from spine_fl.server.reporting.cli import report
from spine_fl.server.reporting.importance import (
    IMPORTANCE_FILE,
    REPEATS,
    ShuffledPredictors,
    compute_importance,
    predictors,
)
from spine_fl.server.reporting.importance_html import SALIENCY_PNG
from spine_fl.server.reporting.model_card import (
    BOOTSTRAP_RESAMPLES,
    CARD_HTML,
    CARD_JSON,
    PREDICTIONS_FILE,
    THRESHOLD,
    age_band,
    calibration,
    metrics_with_ci,
    outcome_text,
    write_model_card,
)
from spine_fl.server.reporting.saliency import mean_saliency
from spine_fl.shared.contract.data_contract import SiteData
from spine_fl.shared.contract.tasks import get_task
from spine_fl.shared.models.registry import build_model

MODELS = ("federated", "pooled", "local_only")


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    run_dir = sample_run(tmp_path_factory.mktemp("sample-run"))
    return write_model_card(run_dir), run_dir


def _brackets(metric: dict) -> bool:
    lo, hi = metric["ci"]
    return lo <= metric["value"] <= hi and hi - lo > 0


def test_card_files_are_written_and_hold_the_returned_card(sample: tuple[dict, Path]) -> None:
    card, run_dir = sample
    text = (run_dir / CARD_JSON).read_text()
    assert json.loads(text) == json.loads(json.dumps(card))
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: missing numbers are null
    page = (run_dir / CARD_HTML).read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    assert page.count('src="data:image/png;base64,') == 5  # per-site, subgroup, reliability, decision, comparison
    assert card["evidence"] == "predictions"


def test_metrics_overall_and_per_site_with_confidence_intervals(sample: tuple[dict, Path]) -> None:
    card, run_dir = sample
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for model in MODELS:
        section = card["comparison"][model]
        assert set(section["per_site"]) == set(SITES)
        for scope, m in [("overall", section["overall"]), *section["per_site"].items()]:
            for name in ("auroc", "brier", "sensitivity", "specificity"):
                assert _brackets(m[name]), (model, scope, name, m[name])
        # the same held-out patients as metrics.json: the same point estimates
        assert section["overall"]["auroc"]["value"] == pytest.approx(metrics[model]["auroc"], abs=1e-12)
        for site in SITES:
            expected = metrics[model]["per_site"][site]["auroc"]
            assert section["per_site"][site]["auroc"]["value"] == pytest.approx(expected)
            assert section["per_site"][site]["n"] == SITES[site]
    assert [s["site"] for s in card["data"]["sites"]] == list(SITES)


def _reference_bootstrap(y: np.ndarray, p: np.ndarray, seed: int) -> dict[str, tuple[float, float]]:
    """The stratified percentile bootstrap written out: a plain loop over resamples, pairwise AUROC."""
    rng = np.random.default_rng(seed)
    pos, neg = p[y == 1], p[y == 0]
    replicates = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        a, b = rng.choice(pos, len(pos)), rng.choice(neg, len(neg))
        auroc = np.mean((a[:, None] > b[None, :]) + 0.5 * (a[:, None] == b[None, :]))
        brier = (np.sum((1 - a) ** 2) + np.sum(b ** 2)) / (len(a) + len(b))
        replicates.append((auroc, brier, np.mean(a >= THRESHOLD), np.mean(b < THRESHOLD)))
    lo, hi = np.percentile(np.array(replicates), [2.5, 97.5], axis=0)
    return {name: (lo[i], hi[i]) for i, name in enumerate(("auroc", "brier", "sensitivity", "specificity"))}


def test_bootstrap_intervals_agree_with_a_reference_bootstrap() -> None:
    rng = np.random.default_rng(2024)
    y = (rng.random(200) < 0.3).astype(int)
    p = np.clip(0.35 + 0.2 * y + rng.normal(0, 0.2, y.size), 0.01, 0.99)
    p[:20] = np.round(p[:20], 1)  # some ties: they count one half in the AUROC
    card = metrics_with_ci(y, p)
    assert card == metrics_with_ci(y, p)  # a fixed seed: the same intervals every time
    assert card["auroc"]["value"] == pytest.approx(roc_auc_score(y, p))
    reference = _reference_bootstrap(y, p, seed=0)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    # Monte Carlo error of 2000 resamples: about 0.006 (AUROC) and 0.002 (Brier) here; sensitivity
    # and specificity move in steps of 1/n_pos and 1/n_neg
    tolerance = {"auroc": 0.02, "brier": 0.008, "sensitivity": 2 / n_pos + 1e-9, "specificity": 2 / n_neg + 1e-9}
    for name, (lo, hi) in reference.items():
        assert card[name]["ci"] == pytest.approx([lo, hi], abs=tolerance[name]), name
        assert _brackets(card[name])


def test_bootstrap_degenerate_classes() -> None:
    # one class only: no interval
    for y in ([1, 1, 1], [0, 0, 0]):
        card = metrics_with_ci(np.array(y), np.array([0.2, 0.6, 0.9]))
        assert all(card[name]["ci"] == [None, None] for name in ("auroc", "brier", "sensitivity", "specificity"))
    # one event: it resamples to itself, the non-events vary (scipy needs two per sample, so it is held fixed)
    card = metrics_with_ci(np.array([1, 0, 0, 0, 0]), np.array([0.7, 0.1, 0.8, 0.3, 0.6]))
    assert card["sensitivity"]["ci"] == [1.0, 1.0] and card["auroc"]["value"] == pytest.approx(0.75)
    lo, hi = card["auroc"]["ci"]
    assert 0 <= lo < 0.75 <= hi <= 1
    assert card["specificity"]["ci"][0] < card["specificity"]["ci"][1]
    # one patient in each class: every resample is the sample itself
    card = metrics_with_ci(np.array([1, 0]), np.array([0.7, 0.3]))
    assert card["auroc"] == {"value": 1.0, "ci": [1.0, 1.0]}
    assert card["brier"]["ci"] == [pytest.approx(0.09), pytest.approx(0.09)]


def test_subgroups_and_the_largest_gap(sample: tuple[dict, Path]) -> None:
    card, run_dir = sample
    fed = pd.read_csv(run_dir / PREDICTIONS_FILE).query("model == 'federated'")
    bands = fed.age.map(age_band)
    groups = card["subgroups"]["variables"]
    assert set(groups) == {"sex", "age band"}
    assert set(groups["sex"]["levels"]) == {"female", "male"}
    assert list(groups["age band"]["levels"]) == ["<50", "50-64", ">=65"]
    independent = {band: roc_auc_score(part.y, part.p) for band, part in fed.groupby(bands)}
    for band, value in independent.items():
        level = groups["age band"]["levels"][band]
        assert level["auroc"]["value"] == pytest.approx(value)
        assert level["n"] == int((bands == band).sum())
        assert _brackets(level["auroc"])
    # the sample blurs the over-65s' predictions: they are the worst group, and the gap is the largest
    gap = card["subgroups"]["largest_gap"]
    assert (gap["variable"], gap["worst"], gap["best"]) == ("age band", ">=65", max(independent, key=independent.get))
    assert gap["gap"] == pytest.approx(max(independent.values()) - min(independent.values()))
    assert gap["gap"] > groups["sex"]["gap"]
    assert "LARGEST GAP" in (run_dir / CARD_HTML).read_text()
    assert "age band" in card["findings"]["subgroups"] and ">=65" in card["findings"]["subgroups"]


def test_decision_curve_against_independent_net_benefit(sample: tuple[dict, Path]) -> None:
    card, run_dir = sample
    dca = card["decision_curve"]
    fed = pd.read_csv(run_dir / PREDICTIONS_FILE).query("model == 'federated'")
    prevalence = fed.y.mean()
    t = np.asarray(dca["thresholds"])
    assert t[0] == pytest.approx(0.05) and t[-1] == pytest.approx(0.95) and len(t) == 91
    assert dca["treat_none"] == [0.0] * len(t)
    assert np.allclose(dca["treat_all"], prevalence - (1 - prevalence) * t / (1 - t))
    for threshold in (0.2, 0.5):
        i = int(np.argmin(abs(t - threshold)))
        tn, fp, fn, tp = confusion_matrix(fed.y, fed.p >= threshold).ravel()
        n = tn + fp + fn + tp
        assert dca["models"]["federated"][i] == pytest.approx(tp / n - fp / n * threshold / (1 - threshold))
    assert set(dca["models"]) == set(MODELS)
    for lo, hi in dca["useful_ranges"]:
        inside = (t >= lo - 1e-9) & (t <= hi + 1e-9)
        model_nb, treat_all = np.asarray(dca["models"]["federated"]), np.asarray(dca["treat_all"])
        assert np.all(model_nb[inside] > np.maximum(treat_all[inside], 0))
    assert dca["useful_ranges"], "a model with AUROC ~0.8 beats both defaults somewhere"


def test_calibration_slope_and_intercept_recover_known_miscalibration() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, 4000)
    y = (rng.random(z.size) < expit(z)).astype(int)
    good = calibration(y, expit(z))
    assert good["slope"] == pytest.approx(1, abs=0.12) and good["intercept"] == pytest.approx(0, abs=0.1)
    assert good["well_calibrated"] and "can be read as risks" in good["reading"]
    extreme = calibration(y, expit(3 * z))
    assert extreme["slope"] == pytest.approx(1 / 3, abs=0.05) and not extreme["well_calibrated"]
    assert "too extreme" in extreme["reading"]
    high = calibration(y, expit(z + 2))
    assert high["intercept"] == pytest.approx(-2, abs=0.15) and "overestimates" in high["reading"]
    # what DP-SGD often gives: almost everyone near 0.97
    dp_like = calibration(y, expit(3.5 + 0.1 * z))
    assert not dp_like["well_calibrated"] and dp_like["share_predicted_positive"] == 1.0
    assert "NOT trustworthy" in dp_like["reading"]
    assert len(good["reliability"]["predicted"]) == 10
    assert np.all(np.diff(good["reliability"]["predicted"]) > 0)
    assert sum(good["histogram"]["events"]) == y.sum() and sum(good["histogram"]["non_events"]) == (1 - y).sum()


def test_calibration_numbers_in_the_card(sample: tuple[dict, Path]) -> None:
    card, run_dir = sample
    fed = pd.read_csv(run_dir / PREDICTIONS_FILE).query("model == 'federated'")
    cal = card["calibration"]["federated"]
    assert cal["brier"] == pytest.approx(np.mean((fed.p - fed.y) ** 2))
    assert cal["brier"] == pytest.approx(card["comparison"]["federated"]["overall"]["brier"]["value"])
    assert all(math.isfinite(cal[k]) for k in ("slope", "intercept"))
    # the sample blurs the risk of the over-65s: predictions too extreme for them, slope well below 1
    assert cal["slope"] < 0.8 and not cal["well_calibrated"] and "POOR" in card["findings"]["calibration"]
    assert card["calibration"]["pooled"]["slope"] == pytest.approx(1, abs=0.2)


def test_privacy_settings_are_reported(sample: tuple[dict, Path]) -> None:
    card, _ = sample
    privacy = card["privacy"]
    assert privacy["dp"] and privacy["secagg"] and privacy["max_epsilon"] == pytest.approx(4.7)
    assert set(privacy["per_site"]) == set(SITES)
    assert privacy["settings"]["noise-multiplier"] == 1.0
    assert "4.70" in card["findings"]["privacy"]


def test_without_predictions_the_card_says_what_it_cannot_show(tmp_path: Path) -> None:
    run_dir = sample_run(tmp_path / "coordinator", with_predictions=False)
    card = write_model_card(run_dir)
    assert card["evidence"] == "metrics_only"
    assert card["subgroups"] is None and card["calibration"] is None and card["decision_curve"] is None
    assert set(card["comparison"]["federated"]["per_site"]) == set(SITES)
    assert card["comparison"]["federated"]["per_site"]["seoul"]["auroc"]["ci"] == [None, None]
    page = (run_dir / CARD_HTML).read_text()
    assert "never sees patient-level predictions" in card["evidence_note"]
    assert page.count("Not available") == 3


def _invoke_report(run_dir: Path) -> tuple[int, str]:
    app = typer.Typer()
    app.command()(report)
    result = CliRunner().invoke(app, [str(run_dir)])
    return result.exit_code, " ".join(result.output.split())  # rich wraps long lines


def test_report_command_writes_the_card(tmp_path: Path) -> None:
    run_dir = sample_run(tmp_path / "run")
    code, output = _invoke_report(run_dir)
    assert code == 0, output
    assert (run_dir / CARD_HTML).is_file() and (run_dir / CARD_JSON).is_file()
    assert "AUROC" in output and "model_card.html" in output


def test_report_on_a_folder_without_metrics_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, output = _invoke_report(tmp_path / "empty")
    assert code == 2 and "metrics.json not found" in output and "spine-fl simulate" in output
    assert "Traceback" not in output and not (tmp_path / "empty" / CARD_HTML).exists()
    code, output = _invoke_report(tmp_path / "nowhere")
    assert code == 2 and "no such folder" in output
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    code, output = _invoke_report(tmp_path / "broken")
    assert code == 2 and "not a spine-fl metrics file" in output


def test_privacy_settings_say_what_epsilon_means_in_plain_words(sample: tuple[dict, Path], tmp_path: Path) -> None:
    """The weakest site's (epsilon, delta) read as a membership-attack bound, in the card and on its page."""
    card, run_dir = sample
    bound = card["privacy"]["attack_bound"]
    eps, delta = 4.7, 7e-4  # every sample site's
    ceiling = min(1.0, math.exp(eps) * 0.01 + delta, 1 - math.exp(-eps) * (1 - delta - 0.01))
    assert bound["site"] in SITES and bound["fpr"] == 0.01
    assert (bound["epsilon"], bound["delta"]) == (eps, delta) and bound["tpr_ceiling"] == pytest.approx(ceiling)
    page = (run_dir / CARD_HTML).read_text()
    privacy = page[page.index("Privacy settings"):page.index("How this card was made")]
    assert ("\u03b5 = 4.70, \u03b4 = 7e-4 means: whatever an attacker already knows, seeing the model can raise their "
            "odds of telling whether any one patient was in the training data by at most a factor e^\u03b5 \u2248 "
            f"{round(math.exp(eps), -1):,.0f}") in privacy
    assert f"can correctly identify at most {100 * ceiling:.1f}% of patients." in privacy

    # a run without DP has no bound to state
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for site in metrics["privacy"]["per_site"].values():
        site["dp"] = False
    metrics["config"]["run"]["dp"] = False
    (tmp_path / "no-dp").mkdir()
    (tmp_path / "no-dp" / "metrics.json").write_text(json.dumps(metrics))
    no_dp = write_model_card(tmp_path / "no-dp")
    assert no_dp["privacy"]["attack_bound"] is None
    assert "In plain words" not in (tmp_path / "no-dp" / CARD_HTML).read_text()


def test_an_interval_whose_ends_round_alike_gets_more_digits_and_equal_ends_say_so() -> None:
    from spine_fl.server.reporting.model_card import _with_ci, interval_text
    from spine_fl.server.reporting.model_card_html import NO_BREAK, _ci

    assert interval_text(0.73, 0.89) == "0.73-0.89"
    assert interval_text(0.9351, 0.9449) == "0.935-0.945"  # not "0.94-0.94"
    assert interval_text(0.93501, 0.93509) == "0.9350-0.9351"
    assert interval_text(1.0, 1.0) is None and interval_text(0.123451, 0.123452) is None
    assert _with_ci({"value": 0.94, "ci": [0.9351, 0.9449]}) == "0.94 (95% CI 0.935-0.945)"
    assert _with_ci({"value": 1.0, "ci": [1.0, 1.0]}) == "1.00 (no interval: every bootstrap resample gives this value)"
    assert _with_ci({"value": 0.8, "ci": [None, None]}) == "0.80"
    assert _ci({"value": 0.94, "ci": [0.9351, 0.9449]}) == "0.94 (0.935-0.945)".translate(NO_BREAK)
    assert _ci({"value": 1.0, "ci": [1.0, 1.0]}) == "1.00 (same in every resample)".translate(NO_BREAK)


SAME_ENDS = re.compile(r"(\d\.\d+)\s?[-\u2011\u2013]\s?\1(?!\d)")  # "0.94-0.94", "0.94 - 0.94", "0.94–0.94"


def test_no_card_prints_an_interval_with_equal_ends(sample: tuple[dict, Path]) -> None:
    from spine_fl.server.reporting.model_card import _findings
    from spine_fl.server.reporting.model_card_html import render_card

    card = copy.deepcopy(sample[0])
    overall = card["comparison"]["federated"]["overall"]
    overall["auroc"] = {"value": 0.94, "ci": [0.9351, 0.9449]}
    overall["sensitivity"] = {"value": 1.0, "ci": [1.0, 1.0]}
    card["decision_curve"]["useful_ranges"] = [[0.35, 0.35], *card["decision_curve"]["useful_ranges"]]
    card["findings"] = _findings(card)
    assert "AUROC 0.94 (95% CI 0.935-0.945)" in card["findings"]["overall"]
    page = html.unescape(render_card(card))
    text = " ".join([*card["findings"].values(), page])
    assert not SAME_ENDS.search(text), SAME_ENDS.search(text)
    assert "0.94\u00a0(0.935\u20110.945)" in page and "1.00\u00a0(same\u00a0in\u00a0every\u00a0resample)" in page


def test_a_studys_sentence_appears_only_on_the_card_of_its_own_task(sample: tuple[dict, Path]) -> None:
    from spine_fl.server.reporting.model_card_html import render_card

    card = copy.deepcopy(sample[0])
    assert card["task"]["name"] == "tfesi_radiograph"
    assert "Ge et al." not in render_card(card)  # residual back pain after vertebral augmentation: not this task
    card["task"]["name"] = "rbp_tabular"
    assert render_card(card).count("Ge et al. 2025") == 1


def test_the_card_states_recalibration_before_and_after_and_the_threshold_rule() -> None:
    from spine_fl.server.reporting.model_card import recalibration, recalibration_sentence

    section = {"status": "fitted", "a": 0.43, "b": -1.8, "secure_aggregation": True, "sites": ["a", "b", "c"],
               "histogram": {"noise_std_per_count": 2.0},
               "threshold": {"value": 0.43, "rule": "youden", "rule_text": "Youden's J", "sensitivity": 0.75,
                             "specificity": 0.64, "logit": 3.5},
               "decision_curve": {"from": 0.1, "to": 0.6}, "before": {}, "after": {},
               "held_out": {"test": {
                   "before": {"slope": 0.4, "intercept": -1.8, "brier": 0.47, "base_rate_brier": 0.24,
                              "sensitivity": 1.0, "specificity": 0.0},
                   "after": {"slope": 0.95, "intercept": 0.02, "brier": 0.21, "base_rate_brier": 0.24,
                             "sensitivity": 0.75, "specificity": 0.64}}}}
    text = recalibration_sentence(recalibration(section))
    assert "Youden's J" in text and "0.43" in text and "before -> after" in text and "0.10-0.60" in text
    assert "summed by secure aggregation" in text
    failed = recalibration_sentence(recalibration({"status": "failed", "reason": "2 site(s) sent a histogram"}))
    assert "not applied" in failed and "uncalibrated" in failed


# -- importances (server/reporting/importance.py, saliency.py) -------------------------------------------

@pytest.fixture(scope="module")
def planted() -> tuple[Any, dict, Any, dict]:
    """The kyphoplasty task's predictors at three sites, the outcome decided by one of them; its section."""
    task, sites, model = planted_tabular()
    return task, sites, model, compute_importance(model, task, sites, torch.device("cpu"))


def test_importance_has_one_row_per_predictor_and_ranks_the_decisive_column_first(planted: tuple) -> None:
    task, sites, model, section = planted
    permutation = section["permutation"]
    assert section["available"] and section["saliency"] is None  # a table task: no images to map
    assert permutation["metric"] == "AUROC" and permutation["repeats"] == REPEATS
    rows = permutation["rows"]
    assert sorted(r["predictor"] for r in rows) == sorted(f.name for f in task.features)  # one row per predictor
    assert {r["predictor"]: r["inputs"] for r in rows}["sex"] == 2  # its two one-hot inputs: one row
    assert [r["predictor"] for r in rows[:2]] == [DECISIVE, SECOND]
    assert rows[0]["mean"] > 0.2 and rows[0]["mean"] > 3 * rows[1]["mean"] > 0 and rows[0]["sd"] > 0
    assert all(r["mean"] == 0 and r["sd"] == 0 for r in rows[2:])  # the model does not read them
    y = np.concatenate([d.y for d in sites.values()])
    with torch.no_grad():
        p = torch.sigmoid(model(None, torch.from_numpy(np.concatenate([d.features for d in sites.values()]))))
    assert permutation["baseline_auroc"] == pytest.approx(roc_auc_score(y, p.numpy()))
    assert permutation["patients"] == len(y) and permutation["events"] == int(y.sum())


def test_a_shuffled_category_keeps_every_patients_one_hot_inputs_together(planted: tuple) -> None:
    task, sites, model, _ = planted
    features = np.concatenate([d.features for d in sites.values()])
    groups = predictors(task)
    sex = next(j for j, g in enumerate(groups) if g.name == "sex")
    estimator = ShuffledPredictors(model, features, None, groups, torch.device("cpu"))
    index = np.repeat(np.arange(len(features))[:, None], len(groups), axis=1)
    donors = np.random.default_rng(0).permutation(len(features))
    index[:, sex] = donors
    shuffled = estimator.inputs(index)
    inputs = groups[sex].inputs
    assert np.array_equal(shuffled[:, inputs], features[donors][:, inputs])  # the donor's whole category
    assert np.all(shuffled[:, inputs].sum(axis=1) == 1)  # still one category per patient
    others = np.ones(features.shape[1], bool)
    others[inputs] = False
    assert np.array_equal(shuffled[:, others], features[:, others])  # every other predictor the patient's own


def test_mean_saliency_peaks_on_the_region_the_model_reads() -> None:
    images, model = planted_images()
    task = SimpleNamespace(image=SimpleNamespace(views=("FRONT", "SIDE")))
    saliency = mean_saliency(model, task, images, np.zeros((len(images), 0), np.float32), torch.device("cpu"))
    front, side = saliency["views"]
    assert side["share"] == pytest.approx(1.0) and front["share"] == pytest.approx(0.0)
    row, col = side["peak_row_col"]
    assert 8 <= row < 16 and 20 <= col < 28
    assert saliency["patients"] == len(images) and saliency["map_side"] == 32
    assert max(map(max, side["map"])) == 1.0 and max(map(max, front["map"])) == 0.0


def _with_importance(run_dir: Path, section: dict) -> dict:
    (run_dir / IMPORTANCE_FILE).write_text(json.dumps(section))
    return write_model_card(run_dir)


def test_the_card_shows_the_importance_table_and_escapes_predictor_names(planted: tuple, tmp_path: Path) -> None:
    _, _, _, section = planted
    section = copy.deepcopy(section)
    hostile = '<b>bmd</b><img src=x onerror=alert(1)> $^$'  # "$...$" must not start matplotlib's math mode
    section["permutation"]["rows"][0]["predictor"] = hostile
    run_dir = sample_run(tmp_path / "run")
    card = _with_importance(run_dir, section)
    assert card["importance"]["permutation"]["rows"][0]["predictor"] == hostile
    page = (run_dir / CARD_HTML).read_text()
    part = page[page.index("What the model relies on"):page.index("Federated vs pooled vs local-only")]
    assert html.escape(hostile, quote=False) in part and "<b>" not in page and "<img src=x" not in page
    assert "drop in AUROC when that predictor&#39;s values are shuffled among the patients" in part
    assert "not what causes the outcome" in part and "shuffled together" in part
    assert page.count('src="data:image/png;base64,') == 6  # the five plots and the importance bars
    assert f"What the model relies on most: {hostile}" in card["findings"]["importance"]


def test_the_card_shows_the_mean_saliency_map_and_saves_it_beside_the_card(tmp_path: Path) -> None:
    images, model = planted_images()
    task = SimpleNamespace(image=SimpleNamespace(views=("AP", "LAT")))
    saliency = mean_saliency(model, task, images, np.zeros((len(images), 0), np.float32), torch.device("cpu"))
    run_dir = sample_run(tmp_path / "run")
    card = _with_importance(run_dir, {"available": True, "permutation": None, "saliency": saliency,
                                      "deployment": "simulation only"})
    page = (run_dir / CARD_HTML).read_text()
    assert page.count('src="data:image/png;base64,') == 6
    assert (run_dir / SALIENCY_PNG).read_bytes().startswith(b"\x89PNG")
    assert "LAT 100%, AP 0%" in page and "LAT view carries the largest share" in card["findings"]["importance"]


def test_importances_are_computed_in_simulation_only_and_the_card_says_why(tmp_path: Path) -> None:
    run_dir = sample_run(tmp_path / "deployed", with_predictions=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "engine": "deployment"}))
    card = write_model_card(run_dir)
    assert card["importance"]["available"] is False and "importance" not in card["findings"]
    assert "computed in simulation only" in card["importance"]["reason"]
    page = (run_dir / CARD_HTML).read_text()
    part = page[page.index("What the model relies on"):page.index("Federated vs pooled vs local-only")]
    assert "only model weights" in part and "<table>" not in part and "<img" not in part
    # a simulation folder without importance.json, model.pt or site folders: says what is missing
    card = write_model_card(sample_run(tmp_path / "simulated"))
    assert not card["importance"]["available"] and "importance.json" in card["importance"]["reason"]


def test_the_card_says_what_a_probability_means_for_one_patient(sample: tuple[dict, Path]) -> None:
    from spine_fl.server.reporting.model_card import _findings

    card, run_dir = sample
    sentence = card["findings"]["probability"]
    assert sentence.startswith("What a probability means for one patient: a probability of 0.70 means that among "
                               "100 patients like this one, about 70 would be expected to have a favourable outcome: "
                               "their pain score (NRS) reduced by at least 50% at the 2-month follow-up - if the "
                               "model is calibrated for your population; see the calibration section.")
    assert "they were NOT" in sentence  # the sample's federated model is poorly calibrated
    assert sentence in html.unescape((run_dir / CARD_HTML).read_text())  # in "In short"
    other = copy.deepcopy(card)
    other["task"]["outcome"] = outcome_text(get_task("rbp_tabular"))
    other["calibration"]["federated"]["well_calibrated"] = True
    sentence = _findings(other)["probability"]
    assert 'expected to have the outcome "Residual back pain after kyphoplasty" (residual_pain = 1)' in sentence
    assert "close to the observed rates" in sentence
    assert outcome_text(get_task("lss_surgery_zcq")) == (
        'meet every condition of "Success of lumbar stenosis surgery (ZCQ, 26 weeks)": zcq_severity_baseline - '
        "zcq_severity_26w >= 0.5 and zcq_function_baseline - zcq_function_26w >= 0.5 and zcq_satisfaction_26w <= 2.5")


def test_an_interval_narrower_than_four_digits_says_so_not_that_every_resample_agreed() -> None:
    from spine_fl.server.reporting.model_card import _with_ci
    from spine_fl.server.reporting.model_card_html import NO_BREAK, _ci

    assert _with_ci({"value": 0.1235, "ci": [0.123451, 0.123452]}) == (
        "0.12 (no interval: its ends differ by less than 0.0001)")
    assert _ci({"value": 0.1235, "ci": [0.123451, 0.123452]}) == "0.12 (CI narrower than 0.0001)".translate(NO_BREAK)
    assert _with_ci({"value": 1.0, "ci": [1.0, 1.0]}).endswith("every bootstrap resample gives this value)")


def test_a_fusion_task_gets_both_the_predictor_table_and_the_mean_map() -> None:
    """The predictors are shuffled while each patient keeps their own image; the image gets its map."""
    task = get_task("lss_surgery_zcq")
    rng = np.random.default_rng(1)
    sites = {}
    for name in ("a", "b"):
        n = 16
        y = (np.arange(n) % 2).astype(np.float32)
        sites[name] = SiteData(np.array([f"{name}{i}" for i in range(n)]), np.full(n, "test"), y,
                               rng.normal(0, 1, (n, task.n_features)).astype(np.float32),
                               rng.random((n, 1, 32, 32)).astype(np.float32), pd.DataFrame({"age": np.full(n, 60.0)}))
    section = compute_importance(build_model(task), task, sites, torch.device("cpu"))
    assert [r["predictor"] for r in sorted(section["permutation"]["rows"], key=lambda r: r["predictor"])] == sorted(
        f.name for f in task.features)
    saliency = section["saliency"]
    assert [v["view"] for v in saliency["views"]] == ["T2_AXIAL"] and saliency["patients"] == 32
    assert np.asarray(saliency["views"][0]["map"]).shape == (32, 32)
