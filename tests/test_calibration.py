"""Federated recalibration: the Platt fit, the recommended threshold, the DP histogram's ledger charge,
and (slow) a tiny consortium end to end: model.pt holds the map and threshold, the card shows
before/after, and `spine-fl predict` uses the threshold."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from spine_fl.cli import app
from spine_fl.client.privacy.policy import SitePolicy
from spine_fl.client.privacy.privacy_ledger import PrivacyLedger, SpendRecord, dataset_id
from spine_fl.shared import protocol
from spine_fl.shared.config import RunSettings
from spine_fl.shared.training import calibration
from spine_fl.shared.training.accounting import _rdp_per_step, epsilon


def test_platt_fit_recovers_a_known_map_from_a_histogram() -> None:
    x = calibration.centres()
    n = np.full(len(x), 2000.0)
    p = calibration.sigmoid(0.7 * x - 0.4)
    a, b = calibration.platt_fit(x, n * p, n * (1 - p))  # expected counts: the MLE is the truth
    assert a == pytest.approx(0.7, abs=1e-6) and b == pytest.approx(-0.4, abs=1e-6)


def test_platt_fit_survives_noise_and_needs_both_outcomes() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(0.5, 2.0, 40_000)
    y = (rng.random(len(x)) < calibration.sigmoid(1.5 * x + 0.3)).astype(int)
    h = calibration.noisy(calibration.logit_histogram(x, y), calibration.NOISE_STD * np.sqrt(3), rng)
    a, b = calibration.platt_fit(calibration.centres(), h[1], h[0])
    assert a == pytest.approx(1.5, rel=0.1) and b == pytest.approx(0.3, abs=0.1)
    with pytest.raises(ValueError, match="with and without"):
        calibration.platt_fit(calibration.centres(), np.zeros(calibration.BINS), np.ones(calibration.BINS))


def test_recommended_threshold_is_youdens_j_on_a_known_histogram() -> None:
    pos, neg = np.zeros(calibration.BINS), np.zeros(calibration.BINS)
    neg[8:12] = [10, 20, 20, 10]  # negatives: logits -2.0 .. 0.0
    pos[11:15] = [5, 15, 20, 10]  # positives: logits -0.5 .. 1.5; overlap in bin 11
    e = calibration.edges()
    t = calibration.youden_threshold(pos, neg, 1.0, 0.0, cuts=e[1:])
    # cutting at edge 11 keeps every positive (sens 1) and 50/60 negatives; at 12: 45/50 and 60/60
    assert t.logit == pytest.approx(e[12]) and t.rule == "youden"
    assert (t.sensitivity, t.specificity) == pytest.approx((45 / 50, 1.0))
    assert t.value == pytest.approx(calibration.sigmoid(e[12]))
    dc = calibration.net_benefit_range(calibration.centres(), pos, neg, 1.0, 0.0)
    assert dc["from"] is not None and dc["from"] <= t.value <= dc["to"]


def test_the_window_follows_bunched_logits_and_the_fit_recovers_their_slope() -> None:
    """The default run's DP model bunches its logits (mean +2.0, sd 0.35): on fixed half-logit bins
    they fill two or three bins and the fitted slope is mostly noise. The locate release finds them."""
    rng = np.random.default_rng(3)
    sites, n = 3, 3000
    x = rng.normal(2.0, 0.35, n)
    y = (rng.random(n) < calibration.sigmoid(4.0 * (x - 2.0))).astype(int)
    located = sum(calibration.noisy(calibration.locate_histogram(x[s::sites]), calibration.LOCATE_NOISE_STD, rng)
                  for s in range(sites))
    lo, hi = calibration.locate(located, sites)
    assert lo <= np.percentile(x, 1) and np.percentile(x, 99) <= hi and hi - lo <= 4.0
    fit = sum(calibration.noisy(calibration.fit_histogram(x[s::sites], y[s::sites], (lo, hi)), calibration.NOISE_STD, rng)
              for s in range(sites))
    assert fit.shape == protocol.CALIBRATION_HISTOGRAM_SHAPE
    summary = calibration.summarise(fit, sites, (lo, hi))
    assert summary["a"] == pytest.approx(4.0, rel=0.15) and summary["b"] == pytest.approx(-8.0, rel=0.15)
    assert 0.6 <= summary["threshold"]["sensitivity"] and 0.6 <= summary["threshold"]["specificity"]
    # the same patients on the fixed grid of the single release this replaced: the slope is lost
    old = sum(calibration.noisy(calibration.logit_histogram(x[s::sites], y[s::sites]), calibration.NOISE_STD, rng)
              for s in range(sites))
    keep = calibration.support(old, sites)
    a_old, _ = calibration.platt_fit(calibration.centres()[keep], old[1][keep], old[0][keep])
    assert abs(a_old - 4.0) > abs(summary["a"] - 4.0)


def test_nothing_is_released_for_an_unknown_stage_or_an_empty_window(tmp_path: Path) -> None:
    from spine_fl.client.calibration import CalibrationRefused, release
    from spine_fl.client.site_config import Site

    site = Site("leiden", tmp_path, tmp_path / "state", SitePolicy())
    run = RunSettings(task="rbp_tabular", rounds=2)
    for stage, window in ((3, None), (protocol.CALIBRATION_FIT, None), (protocol.CALIBRATION_FIT, (1.0, 1.0))):
        with pytest.raises(CalibrationRefused, match="nothing leaves"):
            release(site, run, torch.nn.Linear(1, 1), None, "k" * 32, 3, torch.device("cpu"), stage, window)  # type: ignore[arg-type]


def test_the_histogram_release_raises_epsilon_by_exactly_the_gaussian_mechanism(tmp_path: Path) -> None:
    from spine_fl.client.calibration import CalibrationRefused, charge, histogram_spend
    from spine_fl.client.site_config import Site

    data = tmp_path / "data"
    data.mkdir()
    (data / "clinical.csv").write_text("patient_id\np1\n")
    site = Site("leiden", data, tmp_path / "state", SitePolicy(epsilon_per_run=100.0, epsilon_lifetime=100.0))
    run = RunSettings(task="rbp_tabular", rounds=2, batch_size=16)
    ledger = PrivacyLedger(site.state_dir, dataset_id(data))
    key = "c" * 32
    for rnd in (1, 2):
        ledger.append(SpendRecord(key, rnd, 1.0, 0.25, 8, 1.0, 1e-3, "rdp"))
    before = [(1.0, 0.25, 16)]
    report = charge(site, run, key, 3, n_train=64)
    delta = report[protocol.DELTA]
    sigma, rate, steps = histogram_spend()
    assert (sigma, rate, steps) == (calibration.NOISE_STD / calibration.SENSITIVITY, 1.0, 1)
    # the record is one more mechanism in the site's ledger, under the run key and the next round
    last = ledger.records()[-1]
    assert (last.run_id, last.round, last.noise_multiplier, last.sample_rate, last.steps) == (key, 3, sigma, 1.0, 1)
    assert report[protocol.EPSILON_RUN] == epsilon([*before, (sigma, 1.0, 1)], delta, "rdp")
    assert report[protocol.EPSILON_RUN] == ledger.epsilon(delta, "rdp", key) > epsilon(before, delta, "rdp")
    # with sample rate 1 the accountant's RDP is the Gaussian mechanism's: alpha / (2 sigma^2)
    from opacus.accountants import RDPAccountant
    alphas = np.asarray(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    np.testing.assert_allclose(_rdp_per_step(sigma, 1.0), alphas / (2 * sigma ** 2), rtol=1e-12)
    with pytest.raises(CalibrationRefused, match="already charged"):
        charge(site, run, key, 3, n_train=64)
    tight = Site("leiden", data, site.state_dir, SitePolicy(epsilon_per_run=report[protocol.EPSILON_RUN],
                                                            epsilon_lifetime=100.0))
    with pytest.raises(CalibrationRefused, match="over the epsilon per run budget"):
        charge(tight, run, key, 4, n_train=64)


def test_a_folded_map_makes_the_model_output_the_calibrated_logit() -> None:
    from spine_fl.shared.contract.tasks import get_task
    from spine_fl.shared.models.registry import build_model
    from spine_fl.shared.training.local import fold_calibration

    model = build_model(get_task("rbp_tabular"), 0).eval()
    x = torch.randn(5, get_task("rbp_tabular").n_features)
    before = model(torch.zeros(5, 0), x).detach()
    assert fold_calibration(model, 0.5, -1.0)
    np.testing.assert_allclose(model(torch.zeros(5, 0), x).detach(), 0.5 * before - 1.0, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_tiny_consortium_is_recalibrated_end_to_end(tmp_path: Path) -> None:
    scenario = tmp_path / "tiny.toml"
    # real patients with a strong signal (UCI vertebral column, AUROC ~0.9 under DP): a model that ranks
    # at chance is rightly left uncalibrated (the fitted slope is not positive), which is not this test
    scenario.write_text('name = "tiny"\n[consortium]\nsource = "vertebral_column"\nsites = 3\nseed = 7\n'
                        '[run]\ntask = "vertebral_column"\nrounds = 5\nmin_sites = 3\nlearning_rate = 0.3\n'
                        '[policy]\nmin_eval_patients = 5\nmin_eval_per_class = 1\nepsilon_per_run = 20.0\nepsilon_lifetime = 40.0\n')
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["simulate", "--scenario", str(scenario), "--out", str(out)])
    assert result.exit_code == 0, result.output
    bundle = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert bundle["calibration"]["method"] == "platt" and bundle["calibration"]["folded"]
    threshold = bundle["recommended_threshold"]
    assert 0 < threshold["value"] < 1 and threshold["rule"] == "youden"
    metrics = json.loads((out / "metrics.json").read_text())
    spent = {site: p["epsilon_total"] for site, p in metrics["privacy"]["per_site"].items()}
    weakest = max(spent, key=spent.get)  # the model file carries the run's guarantee: the weakest site's
    assert bundle["privacy"]["site"] == weakest and bundle["privacy"]["epsilon"] == pytest.approx(spent[weakest])
    assert bundle["privacy"]["delta"] == metrics["privacy"]["per_site"][weakest]["delta"]
    cal = metrics["calibration"]
    assert cal["status"] == "fitted" and cal["secure_aggregation"] and len(cal["sites"]) == 3
    assert {"before", "after"} <= set(cal["held_out"]["test"])
    assert cal["rounds"] == [6, 7] and len(cal["window"]) == 2
    for site, report in cal["privacy"].items():  # both releases are charged at every site, past the last round
        ledger_rounds = [json.loads(line)["round"] for line in
                         next((out / "site-state" / site / "privacy").glob("*.jsonl")).read_text().splitlines()
                         if line.strip().startswith("{") and '"round"' in line]
        assert report[protocol.EPSILON_RUN] > 0 and max(ledger_rounds) == 7 == cal["round"]  # 5 rounds, locate, fit
    card = json.loads((out / "model_card.json").read_text())
    assert card["recalibration"]["status"] == "fitted"
    assert "before -> after" in card["findings"]["recalibration"]
    assert "Recalibration" in (out / "model_card.html").read_text()
    predicted = runner.invoke(app, ["predict", str(out / "model.pt"), "--site-dir", str(out / "sites" / "vc_site1"),
                                    "--out", str(tmp_path / "pred")])
    assert predicted.exit_code == 0, predicted.output
    csv = (tmp_path / "pred" / "predictions.csv").read_text()
    assert f"{threshold['value']:g}" in csv or f"{threshold['value']:.4f}"[:5] in csv


# -- a site whose own rules forbid the release withholds cleanly; too few left: recalibration skipped -------

def _calibration_reply(tmp_path: Path, name: str, site_dir: Path, policy: SitePolicy, run: RunSettings,
                       index: int, sites: str):
    """One site's answer to the locating round, as its ClientApp gives it (weights, examples, metrics)."""
    from flwr.app import Context, RecordDict

    from spine_fl.client.app import SiteClient
    from spine_fl.client.site_config import Site
    from spine_fl.shared.models.registry import build_model
    from spine_fl.shared.training.local import get_weights

    site = Site(name, site_dir, tmp_path / "state" / name, policy)
    client = SiteClient(site, Context(run_id=1, node_id=index + 1, node_config={}, state=RecordDict(), run_config={}))
    config = {**run.to_run_config(), protocol.ROUND: 4, protocol.SITES: sites, protocol.RUN_KEY: "a" * 32,
              protocol.CALIBRATION: protocol.CALIBRATION_LOCATE}
    return client.fit(get_weights(build_model(run.task_spec, run.seed)), config)


def test_a_site_with_too_few_held_out_patients_withholds_cleanly_and_is_counted(tmp_path: Path, caplog,
                                                                                monkeypatch) -> None:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from spine_fl.server import calibration as server_calibration
    from spine_fl.simulations.synthetic.vertebral_column import write_sites

    names = ["boston", "leiden", "lyon"]
    dirs = write_sites(tmp_path / "sites", 3, 7)
    run = RunSettings(task="vertebral_column", rounds=3, min_sites=3, dp=False)
    lenient = SitePolicy(require_dp=False, min_eval_patients=5, min_eval_per_class=1)
    strict = SitePolicy(require_dp=False, min_eval_patients=10_000)  # more held-out patients than any site has
    replies = {}
    with caplog.at_level("WARNING", logger="spine_fl.client"):
        for i, name in enumerate(names):
            replies[name] = _calibration_reply(tmp_path, name, dirs[i], lenient if name == "boston" else strict, run,
                                               i, ",".join(names))
    # the withholding site: zeros of the stage's shape, 0 examples, no release metrics, one warning line
    arrays, examples, metrics = replies["leiden"]
    assert examples == 0 and len(arrays) == 1 and arrays[0].shape == protocol.CALIBRATION_LOCATE_SHAPE
    assert not arrays[0].any() and set(metrics) == {protocol.SITE_INDEX, protocol.LEDGER_KEY}
    withheld = [r for r in caplog.records if "recalibration histogram withheld" in r.getMessage()]
    assert [r.getMessage().split(":")[1].strip() for r in withheld] == ["leiden round 4", "lyon round 4"]
    assert all("fewer than min_eval_patients = 10000" in r.getMessage() and not r.exc_info for r in withheld)
    assert replies["boston"][1] == 1 and replies["boston"][0][0].any()  # a real histogram, counted once

    # the coordinator counts the refusals and, with fewer than min_sites histograms, skips the recalibration
    def fake_round(grid, legacy, fit_workflow, strategy, flower_round):  # the fit workflow, without Flower
        results = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(a), n, m)) for a, n, m in replies.values()]
        strategy.aggregate_fit(flower_round, results, [])

    monkeypatch.setattr(server_calibration, "_round", fake_round)
    section = server_calibration.recalibrate(None, None, None, run, names, "a" * 32, 4, [], 4)  # type: ignore[arg-type]
    assert section["status"] == "skipped" and section["sites"] == ["boston"]
    assert section["withheld"] == ["leiden", "lyon"] and set(section["privacy"]) == {"boston"}
    assert section["reason"].startswith("1 site (boston) sent a locating histogram, 2 sites (leiden, lyon) withheld "
                                        "it by the site's own rules (too few held-out patients")
    assert section["reason"].endswith("fewer than min_sites = 3: recalibration skipped")

    from spine_fl.server.reporting.model_card import recalibration, recalibration_sentence
    sentence = recalibration_sentence(recalibration(section))
    assert sentence.startswith("Recalibration: not applied (1 site (boston) sent a locating histogram, 2 sites")
    assert "the probabilities are uncalibrated" in sentence

    # with enough sites sending, the withheld zeros add nothing: the sum is the senders' histograms
    summed = server_calibration.CalibrationStrategy(dataclasses.replace(run, min_sites=1), names, "a" * 32, 4, [],
                                                    protocol.CALIBRATION_LOCATE)
    fake_round(None, None, None, summed, 4)
    assert summed.shortfall("a locating histogram") is None and summed.contributors == ["boston"]
    np.testing.assert_allclose(summed.histogram, replies["boston"][0][0] * calibration.HISTOGRAM_SCALE)
