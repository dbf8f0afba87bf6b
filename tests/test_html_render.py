"""The HTML reports in a real headless Chromium: they load without console errors, every plot
decodes, nothing overflows sideways, and the screenshot is not blank. The first tests check the
checker itself on pages that are broken on purpose, so these checks can fail."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import model_card_samples
import pytest
from browser import check_page, ink_fraction
from model_card_samples import sample_run

from spine_fl.client.audit.report import render_html
from spine_fl.server.reporting.model_card import CARD_HTML, THRESHOLDS, write_model_card
from spine_fl.server.reporting.model_card_html import render_card

BROKEN_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>broken</title></head><body>
<h1>Broken on purpose</h1><script>console.error("deliberate console error");</script>
<script>notDefinedAnywhere();</script><img alt="missing" src="missing-plot.png"></body></html>"""
BLANK_PAGE = ('<!DOCTYPE html><html><head><meta charset="utf-8"><link rel="icon" href="data:,"></head>'
              "<body></body></html>")
# the default task with DP-SGD and SecAgg+ (the defaults), small: 32-pixel images, three rounds
# the numbers of the plain-words sentence beside a recorded (epsilon, delta), as a reader finds them
PLAIN_WORDS = re.compile(r"\u03b5 = (?P<eps>[\d.]+), \u03b4 = (?P<delta>[\d.e-]+) means: whatever an attacker already "
                         r"knows, .*? e\^\u03b5 \u2248 (?P<odds>[\d,.]+) .*? wrongly accuses 1% of non-patients can "
                         r"correctly identify at most (?P<tpr>[\d.]+)% of patients\.")
CARD_SECTIONS = ("In short", "The task and the data", "How well it predicts", "Fairness", "Calibration",
                 "Decision curve", "Federated vs pooled vs local-only", "Privacy settings", "How this card was made")


def test_checker_reports_console_errors_exceptions_and_failed_loads(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text(BROKEN_PAGE)
    result = check_page(page, tmp_path / "broken.png")
    joined = "\n".join(result.errors)
    assert "deliberate console error" in joined
    assert "notDefinedAnywhere" in joined  # the uncaught ReferenceError
    assert "missing-plot.png" in joined  # the image that failed to load
    assert result.image_widths == [0]
    assert "Broken on purpose" in result.text


def test_checker_tells_a_blank_page_from_a_written_one(tmp_path: Path) -> None:
    blank = tmp_path / "blank.html"
    blank.write_text(BLANK_PAGE)
    result = check_page(blank, tmp_path / "blank.png")
    assert result.errors == [] and ink_fraction(result.screenshot) < 0.001
    written = tmp_path / "written.html"
    written.write_text(BLANK_PAGE.replace("<body></body>", "<body><h1>A heading</h1><p>Some text.</p></body>"))
    assert ink_fraction(check_page(written, tmp_path / "written.png").screenshot) > 0.001


def test_checker_sees_injected_elements_and_dismisses_dialogs(tmp_path: Path) -> None:
    page = tmp_path / "injected.html"
    page.write_text(BLANK_PAGE.replace("<body></body>", '<body><p>text</p><b>bold</b><img src=x onerror=alert(1)>'
                                       "<script>document.title = 'ran'</script></body>"))
    result = check_page(page, tmp_path / "injected.png")
    assert "javascript dialog (alert): 1" in result.errors
    assert result.tags["script"] == 1 and result.tags["b"] == 1 and result.handlers == ["img[onerror]"]
    assert result.image_sources == ["x"]


def _assert_plain_words(text: str, eps: float, delta: float) -> str:
    """The sentence is there with (epsilon, delta), e^epsilon and the hypothesis-testing bound at 1% FPR,
    TPR <= min(1, e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR)), all recomputed here; returns the part of
    the text from the sentence on."""
    shown = PLAIN_WORDS.search(text)
    assert shown, "plain-words sentence missing"
    assert float(shown["eps"]) == pytest.approx(eps, abs=0.005)
    assert float(shown["delta"]) == pytest.approx(delta, rel=0.05)
    assert float(shown["odds"].replace(",", "")) == pytest.approx(math.exp(eps), rel=0.05)
    assert float(shown["tpr"]) / 100 == pytest.approx(_bound(eps, delta), abs=5e-4)
    return text[shown.start():]


def _bound(eps: float, delta: float) -> float:
    return min(1.0, math.exp(eps) * 0.01 + delta, 1 - math.exp(-eps) * (1 - delta - 0.01))


def _assert_renders(html: Path, screenshot: Path, min_images: int, fits_window: bool = True) -> str:
    result = check_page(html, screenshot)
    assert result.errors == [], result.errors
    assert ink_fraction(result.screenshot) > 0.02
    assert len(result.image_widths) >= min_images and min(result.image_widths, default=1) > 0
    if fits_window:
        assert result.overflow_px <= 0, f"page {result.overflow_px}px wider than the window"
    return result.text


def test_model_card_renders(tmp_path: Path) -> None:
    run_dir = sample_run(tmp_path / "run")
    write_model_card(run_dir)
    text = _assert_renders(run_dir / CARD_HTML, tmp_path / "card.png", min_images=5)
    for title in CARD_SECTIONS:
        assert title in text
    assert "LARGEST GAP" in text


def test_model_card_without_predictions_renders(tmp_path: Path) -> None:
    run_dir = sample_run(tmp_path / "run", with_predictions=False)
    write_model_card(run_dir)
    text = _assert_renders(run_dir / CARD_HTML, tmp_path / "card.png", min_images=2)
    assert text.count("Not available") == 3


@pytest.mark.slow
def test_model_card_of_a_simulated_run(default_run: tuple[dict, Path], tmp_path: Path) -> None:
    """A real run's card (the README's default run): its numbers agree with metrics.json, and its page renders."""
    metrics, run_dir = default_run
    card = write_model_card(run_dir)
    fed = card["comparison"]["federated"]
    assert card["evidence"] in ("predictions", "recomputed")  # saved by the run, or recomputed from model.pt
    assert fed["overall"]["auroc"]["value"] == pytest.approx(metrics["federated"]["auroc"], abs=1e-6)
    assert fed["overall"]["auroc"]["ci"][0] > 0.5  # DP rounds rank patients better than chance
    assert set(fed["per_site"]) == set(metrics["sites"])
    for site, m in fed["per_site"].items():
        assert m["auroc"]["value"] == pytest.approx(metrics["federated"]["per_site"][site]["auroc"], abs=1e-6)
        assert m["auroc"]["ci"][0] <= m["auroc"]["value"] <= m["auroc"]["ci"][1]
    assert {"sex", "age band"} == set(card["subgroups"]["variables"])
    assert sum(level["n"] for level in card["subgroups"]["variables"]["sex"]["levels"].values()) == fed["overall"]["n"]
    assert card["subgroups"]["largest_gap"] is not None
    cal = card["calibration"]["federated"]
    assert cal["brier"] == pytest.approx(metrics["federated"]["brier"], abs=1e-6)
    assert cal["intercept"] is not None and len(cal["reliability"]["observed"]) >= 2
    assert len(card["decision_curve"]["models"]["federated"]) == len(THRESHOLDS)
    assert card["privacy"]["per_site"].keys() == set(metrics["sites"])
    text = _assert_renders(run_dir / CARD_HTML, tmp_path / "card.png", min_images=5)
    for title in CARD_SECTIONS:
        assert title in text
    # the weakest site's (epsilon, delta) in plain words, in the privacy-settings section
    # (the run's whole spending: training and the recalibration histogram)
    weakest = max(metrics["sites"], key=lambda site: metrics["privacy"]["per_site"][site]["epsilon_total"])
    p = metrics["privacy"]["per_site"][weakest]
    assert p["epsilon_total"] > p["epsilon"] > 0  # the recalibration release is counted, not hidden
    for page in (text, (run_dir / CARD_HTML).read_text()):  # as the browser shows it, and in the HTML
        after = _assert_plain_words(page[page.index("Privacy settings"):], p["epsilon_total"], p["delta"])
        assert f"for {weakest} (the site with the weakest guarantee in this run)" in page
        assert "How this card was made" in after


@pytest.mark.slow
def test_audit_html_renders(default_run: tuple[dict, Path], tmp_path: Path) -> None:
    """The privacy audit's page (client/audit/report.py) for one site of the same run."""
    from spine_fl.client.audit.cli import locate_site
    from spine_fl.client.audit.run import run_audit

    _, run_dir = default_run
    site, _, _ = locate_site("leiden", None, run_dir, None, None, None)
    report = run_audit(site, tmp_path / "audit", shadow_models=0, bootstrap=200)
    # the privacy-budget tables (14 columns) are wider than a 1200 px window: they scroll in their own
    # box, the page itself does not
    text = _assert_renders(tmp_path / "audit" / "audit.html", tmp_path / "audit.png", min_images=1)
    assert f"Verdict: {report['verdict']['verdict'].upper()}" in text
    assert "Privacy audit: site leiden" in text
    # the lifetime (epsilon, delta) in plain words in the privacy-budget section, and the measured attack beside it
    # (no shadow models here: the loss-threshold attack's TPR at 1% FPR)
    life, mia = report["privacy_budget"]["lifetime"], report["membership_inference"]
    html = (tmp_path / "audit" / "audit.html").read_text()
    for page in (text, html):
        section = page[page.index("Privacy budget"):page.index("Policy compliance")]
        after = _assert_plain_words(section, life["epsilon"], life["delta"])
        point = mia["attacks"]["loss_threshold"]["tpr_at_fpr"][0]
        measured = re.search(r"Measured: the loss threshold attack .*? correctly identified ([\d.]+)% .*? wrongly "
                             r"accusing at most 1% .*? allows at most ([\d.]+)%\.", after)
        assert measured, after[:600]
        assert point["fpr"] == 0.01 and float(measured[1]) / 100 == pytest.approx(point["tpr"], abs=5e-3)
        assert float(measured[2]) / 100 == pytest.approx(_bound(mia["epsilon"], mia["delta"]), abs=5e-4)


# -- text from data stays text: markup in every field that comes from data shows as characters ----------

def markup(field: str) -> str:
    """What a hostile (or careless) ledger, site configuration or run could hold in `field`."""
    return f'<script>alert("{field}")</script><b>{field}</b>"><img src=x onerror=alert(1)>'


def _audit_report() -> dict[str, Any]:
    """An audit report (the dict client/audit/run.py builds) with markup in every text field from data."""
    run_id, flower = markup("run id"), markup("flower run id")
    reasons = [{"level": level, "topic": markup(f"{level} topic"), "text": markup(f"{level} reason")}
               for level in ("fail", "attention", "pass")]
    message = {"line": 1, "kind": markup("message kind"), "arrays": [{"name": "arrays/0", "shape": [8, 3]}],
               "metrics": {"fitres.metrics/train_loss": 0.25, "fitres.metrics/note": markup("metric value")},
               "num_examples": 40, "bytes": 2048, "error": {"reason": markup("error reason")}}
    budget_run = {"run_id": run_id, "rounds": 1, "epsilon": 1.5, "epsilon_dp_accounting": 1.5,
                  "reported_epsilon": 1.5, "budget": 8.0, "used_fraction": 0.19, "delta": 1e-5,
                  "accountant": markup("accountant"), "noise_multiplier_min": 1.1, "noise_multiplier_max": 1.1,
                  "sample_rate": 0.1, "steps": 10, "max_grad_norm": 1.0, "agree": True}
    budget_round = {"run_id": run_id, "round": 1, "noise_multiplier": 1.1, "sample_rate": 0.1, "steps": 10,
                    "epsilon_run": 1.5, "epsilon_run_dp_accounting": 1.5, "reported_epsilon_run": 1.5,
                    "epsilon_lifetime": 1.5, "epsilon_lifetime_dp_accounting": 1.5, "reported_epsilon_lifetime": 1.5}
    attack = {"auc": 0.52, "auc_ci": [0.45, 0.6], "auc_ceiling": 0.7, "proven_epsilon": 0.0,
              "tpr_at_fpr": [{"tpr": 0.02, "ci": [0.0, 0.05], "ceiling": 0.1},
                             {"tpr": 0.0, "ci": [0.0, 0.01], "ceiling": 0.01}],
              "roc": {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 0.55, 1.0]}}
    return {
        "site": markup("site"), "generated_at": markup("generated at"),
        "inputs": {"state_dir": markup("state dir"), "data_dir": markup("data dir"),
                   "policy_source": markup("policy source")},
        "integrity": {"ledger": markup("ledger"), "lines": 1, "ok": False, "first_broken_line": 1,
                      "problem": markup("integrity problem")},
        "egress": {"runs": [{"run_id": run_id, "flower_run_ids": [flower], "messages": 1, "bytes": 2048,
                             "rounds": [{"round": 1, "messages": [message]}]}]},
        "payload_scan": {"clean": False, "findings": [{"line": 1, "severity": "fail", "where": markup("finding where"),
                                                       "what": markup("finding what")}],
                         "identifiers_checked": {"identifiers": 5, "clinical_and_dicom_text_values": 7,
                                                 "dicom_files_read": 2}},
        "privacy_budget": {"lifetime": {"epsilon": 1.5, "epsilon_dp_accounting": 1.5, "budget": 20.0,
                                        "used_fraction": 0.075, "delta": 1e-5},
                           "runs": [budget_run], "rounds": [budget_round]},
        "policy": {"policy": {markup("policy rule"): markup("policy value")},
                   "runs": [{"run_id": run_id, "status": markup("run status"),
                             "checks": [{"rule": markup("check rule"), "run": markup("check run"),
                                         "policy": markup("check policy"), "ok": False}]}],
                   "refusals": [{"line": 2, "run_id": run_id, "round": 1, "kind": markup("refusal kind"),
                                 "rule": markup("refusal rule"), "message": markup("refusal message")}]},
        "membership_inference": {"members": 40, "non_members": 40, "epsilon": 1.5, "delta": 1e-5,
                                 "attacks": {markup("attack"): attack}, "shadow_models": 2,
                                 "shadow_training": {"epochs": 1, "dp": True, "noise_multiplier": 1.1},
                                 "smallest_nonzero_fpr": 0.025, "bootstrap": 50},
        "verdict": {"verdict": "fail", "reasons": reasons},
    }


AUDIT_FIELDS = ("site", "generated at", "state dir", "data dir", "policy source", "ledger", "integrity problem",
                "run id", "flower run id", "message kind", "metric value", "error reason", "finding where",
                "finding what", "accountant", "policy rule", "policy value", "run status", "check rule", "check run",
                "check policy", "refusal kind", "refusal rule", "refusal message", "attack", "fail topic",
                "fail reason", "attention reason", "pass topic", "pass reason")
CARD_SITES = (markup("site one"), markup("site two"), "zurich")
CARD_FIELDS = ("site one", "site two", "task description", "task name", "stop reason", "attribution",
               "data source")


def _markup_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A model card whose site names, task, stop reason, data attribution and data source are markup (subgroup
    levels are the card's own words: female, male, age bands)."""
    monkeypatch.setattr(model_card_samples, "SITES", dict(zip(CARD_SITES, model_card_samples.SITES.values())))
    run_dir = sample_run(tmp_path / "run")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics |= {"status": "stopped", "stop_reason": markup("stop reason"), "data_attribution": markup("attribution")}
    metrics["config"]["consortium"]["source"] = markup("data source")
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    card = write_model_card(run_dir)
    card["task"] |= {"description": markup("task description"), "name": markup("task name")}
    return card


def _pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[Path, tuple[str, ...], int]]:
    """Both pages, written with markup in their data: (file, the fields that hold markup, how many plots)."""
    (tmp_path / "audit.html").write_text(render_html(_audit_report()))
    (tmp_path / "model_card.html").write_text(render_card(_markup_card(tmp_path, monkeypatch)))
    return {"audit": (tmp_path / "audit.html", AUDIT_FIELDS, 3),
            "model card": (tmp_path / "model_card.html", CARD_FIELDS, 5)}


def test_markup_from_data_is_escaped_in_the_html(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, (page, fields, plots) in _pages(tmp_path, monkeypatch).items():
        html = page.read_text().replace("\u00a0", " ").replace("\u2011", "-")  # see NO_BREAK in model_card_html
        assert "&lt;script&gt;alert(" in html and "<script" not in html and "<b>" not in html, name
        assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html, name
        assert html.count("<img ") == html.count('src="data:image/png;base64,') == plots, name
        for field in fields:
            assert f"&lt;b&gt;{field}&lt;/b&gt;" in html, (name, field)


@pytest.mark.parametrize("name", ["audit", "model card"])
def test_markup_from_data_shows_as_text_in_the_browser(name: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """In a real browser: the markup is visible characters, and no element or handler came from data."""
    page, fields, plots = _pages(tmp_path, monkeypatch)[name]
    result = check_page(page, tmp_path / f"{name.replace(' ', '_')}_markup.png")
    assert result.errors == [], result.errors  # an alert() that ran would be listed here
    assert "script" not in result.tags and "b" not in result.tags and result.handlers == []
    assert len(result.image_sources) == plots
    assert all(src.startswith("data:image/png;base64,") for src in result.image_sources)
    text = result.text.replace("\u00a0", " ").replace("\u2011", "-")
    for field in fields:
        # as written, or as it stands inside a JSON value (a ledger message's error) or metric (repr)
        assert any(form in text for form in (markup(field), json.dumps(markup(field))[1:-1],
                                             repr(markup(field)))), field
    assert "<script>" in text and '"><img src=x onerror=alert(1)>' in text
