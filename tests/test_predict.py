"""`spine-fl predict`: a site scores its own patients with a run's model, and sees why.

The runs are made here in a second: a model of the task built and saved as a run saves it
(shared/models/model_file.py save_model), on tiny synthetic site folders (12 patients, 16 px
images), so the file checks the command, not the training. That the explanations point at what
decides the outcome is tests/test_explanations_planted.py's business.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from spine_fl.cli import app
from spine_fl.client.prediction import predict as predict_module
from spine_fl.client.prediction.predict import predict_site
from spine_fl.shared.config import RunSettings
from spine_fl.shared.contract.data_contract import validate_and_load
from spine_fl.shared.models.model_file import save_model
from spine_fl.shared.models.registry import build_model
from spine_fl.shared.training.local import get_weights
from spine_fl.simulations.synthetic.consortium import PROFILES, synthesize_site

PATIENTS = 12
IMAGE_PX = 16
NOTE = "threshold 0.5 (no recommended threshold recorded for this model: uncalibrated)"
MARKUP_ID = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
NOT_CAUSES = "shows what the model relied on for this patient, not a cause"


def _run(folder: Path, task: str, image_size: int = 64) -> Path:
    settings = RunSettings(task=task, image_size=image_size, dp=False, rounds=1)
    save_model(folder / "model.pt", settings, get_weights(build_model(settings.task_spec, seed=3)))
    return folder


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    tiny = dataclasses.replace(PROFILES[0], name="tiny", n_patients=PATIENTS)
    synthesize_site(root / "site_images", tiny, 7, ("radiograph",))
    synthesize_site(root / "site_table", tiny, 7, ())
    return {"root": root, "site_images": root / "site_images", "site_table": root / "site_table",
            "run_images": _run(root / "run_images", "tfesi_radiograph", IMAGE_PX),
            "run_table": _run(root / "run_table", "rbp_tabular")}


def _predict(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["predict", *map(str, args)])
    return result.exit_code, " ".join(result.output.split())  # rich wraps long lines


def _check_predictions(out: Path, n: int) -> pd.DataFrame:
    table = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
    assert list(table.columns[:4]) == ["patient_id", "probability", "decision", "threshold"]
    assert len(table) == n and table.patient_id.is_unique
    assert table.probability.between(0, 1).all()
    assert (table.decision == (table.probability >= table.threshold).astype(int)).all()
    return table


def test_image_task_scores_every_patient_and_overlays_saliency_on_each_view(made: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    code, output = _predict(made["run_images"] / "model.pt", "--site-dir", made["site_images"], "--explain", "2",
                            "--out", tmp_path)
    assert code == 0, output
    table = _check_predictions(tmp_path, PATIENTS)
    assert (table.threshold == 0.5).all() and (table.threshold_note == NOTE).all() and NOTE in output
    explained = json.loads((tmp_path / "explanations.json").read_text())
    assert [p["patient_id"] for p in explained["patients"]] == list(table.patient_id[:2])
    views = ("AP", "LAT", "LOBL", "ROBL")
    for patient in explained["patients"]:
        assert [v["view"] for v in patient["views"]] == list(views)
        for view in patient["views"]:
            png = tmp_path / view["png"]
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            saliency = np.load(tmp_path / view["saliency"])
            assert saliency.shape == (IMAGE_PX, IMAGE_PX) and np.abs(saliency).max() > 0
    assert sorted(p.name for p in (tmp_path / "explanations").glob("*.png")) == sorted(
        f"{pid}_{view}.png" for pid in table.patient_id[:2] for view in views)


def test_tabular_task_explains_one_patient_with_contributions_that_add_up(made: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    patient = "TIN0007"
    code, output = _predict(made["run_table"], "--site-dir", made["site_table"], "--patient", patient,
                            "--out", tmp_path)
    assert code == 0, output
    _check_predictions(tmp_path, PATIENTS)
    (entry,) = json.loads((tmp_path / "explanations.json").read_text())["patients"]
    assert entry["patient_id"] == patient
    assert (tmp_path / entry["predictors_png"]).read_bytes()[:4] == b"\x89PNG"
    contributions = entry["contributions"]
    assert len(contributions) == 14  # every predictor of rbp_tabular, one-hot categories summed
    sizes = [abs(c["contribution"]) for c in contributions]
    assert sizes == sorted(sizes, reverse=True)
    assert {c["feature"]: c["unit"] for c in contributions}["hu_value"] == "HU"
    # Integrated Gradients' completeness: the contributions add up to logit - baseline logit
    difference = entry["logit"] - entry["baseline_logit"]
    assert sum(c["contribution"] for c in contributions) == pytest.approx(difference, abs=0.02 + 0.02 * abs(difference))
    assert entry["probability"] == pytest.approx(1 / (1 + np.exp(-entry["logit"])), abs=1e-5)


def test_an_unusable_folder_exits_1_with_the_validators_messages(made: dict[str, Path], tmp_path: Path) -> None:
    site = tmp_path / "broken"
    shutil.copytree(made["site_table"], site)
    clinical = pd.read_csv(site / "clinical.csv", dtype=str)
    clinical.loc[3, "bmi"] = "24,5"
    clinical.drop(columns=["hu_value"]).to_csv(site / "clinical.csv", index=False)
    code, output = _predict(made["run_table"], "--site-dir", site, "--out", tmp_path / "out")
    assert code == 1 and "Traceback" not in output
    _, report = validate_and_load(site, RunSettings(task="rbp_tabular").task_spec)
    assert len(report.errors) == 2
    squeezed = "".join(output.split())  # rich may break a long path anywhere
    for problem in report.errors:  # the messages `spine-fl validate` prints
        assert "".join(f"ERROR {problem.where} {problem.what} -> {problem.action}".split()) in squeezed
    assert "NOT usable" in output and not (tmp_path / "out" / "predictions.csv").exists()


def test_an_unknown_patient_exits_2_naming_it_and_patients_that_exist(made: dict[str, Path], tmp_path: Path) -> None:
    code, output = _predict(made["run_table"], "--site-dir", made["site_table"], "--patient", "NOPE42",
                            "--out", tmp_path)
    assert code == 2 and "Traceback" not in output
    assert "NOPE42" in output and "TIN0000" in output and "12 in all" in output


def test_a_folder_without_the_outcome_columns_is_still_scored(made: dict[str, Path], tmp_path: Path) -> None:
    site = tmp_path / "no_outcome"
    shutil.copytree(made["site_table"], site)
    clinical = pd.read_csv(site / "clinical.csv", dtype=str)
    clinical.drop(columns=["residual_pain", "split", "nrs_baseline", "nrs_2months"]).to_csv(
        site / "clinical.csv", index=False)
    task = RunSettings(task="rbp_tabular").task_spec
    assert validate_and_load(site, task)[0] is None  # training needs the outcome ...
    code, output = _predict(made["run_table"], "--site-dir", site, "--explain", "0", "--out", tmp_path / "out")
    assert code == 0, output  # ... scoring does not
    with_outcome = _check_predictions(tmp_path / "out", PATIENTS)
    code, _ = _predict(made["run_table"], "--site-dir", made["site_table"], "--explain", "0", "--out", tmp_path / "ref")
    assert code == 0
    assert with_outcome.probability.tolist() == pytest.approx(
        pd.read_csv(tmp_path / "ref" / "predictions.csv").probability.tolist())
    assert json.loads((tmp_path / "out" / "explanations.json").read_text())["patients"] == []


def test_a_recorded_recommended_threshold_is_used(made: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(made["run_table"], run)
    (run / "model_card.json").write_text(json.dumps({"recommended_threshold": {"value": 0.3, "rule": "Youden"}}))
    code, output = _predict(run, "--site-dir", made["site_table"], "--explain", "0", "--out", tmp_path / "out")
    assert code == 0, output
    table = _check_predictions(tmp_path / "out", PATIENTS)
    assert (table.threshold == 0.3).all() and "recommended" in table.threshold_note[0] and "uncalibrated" not in output


def test_a_missing_or_foreign_model_file_exits_2(made: dict[str, Path], tmp_path: Path) -> None:
    code, output = _predict(tmp_path / "nothing.pt", "--site-dir", made["site_table"], "--out", tmp_path / "out")
    assert code == 2 and "no such model file" in output
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    code, output = _predict(tmp_path / "junk.pt", "--site-dir", made["site_table"], "--out", tmp_path / "out")
    assert code == 2 and "not a readable spine-fl model file" in output and "Traceback" not in output


def test_the_model_file_is_read_from_shared_and_still_importable_from_the_federation_record() -> None:
    from spine_fl.server.reporting import federation_record
    from spine_fl.shared.models import model_file

    assert federation_record.load_model is model_file.load_model
    assert federation_record.save_model is model_file.save_model and federation_record.MODEL_FILE == "model.pt"


def test_help_says_nothing_leaves_the_site() -> None:
    result = CliRunner().invoke(app, ["predict", "--help"])
    assert result.exit_code == 0
    assert re.search(r"nothing is sent over\s+the\s+network", " ".join(result.output.replace("│", " ").split()))


class _Links(HTMLParser):
    """Every href / src of a page, every element id (the targets of #anchors), tag and event handler."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.tags: set[str] = set()
        self.handlers: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.handlers += [f"{tag}[{name}]" for name, _ in attrs if name.startswith("on")]
        for name, value in attrs:
            if name in ("href", "src") and value is not None and not value.startswith("data:"):
                self.links.append(value)
            if name == "id" and value:
                self.ids.add(value)


def _page(out: Path) -> tuple[str, _Links]:
    html = (out / "index.html").read_text(encoding="utf-8")
    links = _Links()
    links.feed(html)
    return html, links


def _check_links(out: Path, links: _Links) -> set[Path]:
    """Every link is relative, stays in OUT and names a file that exists (or an id on the page); the files."""
    files = set()
    for link in links.links:
        parts = urlsplit(link)
        assert not parts.scheme and not parts.netloc and not parts.path.startswith("/"), link
        if not parts.path:
            assert parts.fragment in links.ids, f"anchor {link} leads nowhere"
            continue
        target = (out / unquote(parts.path)).resolve()
        assert target.is_relative_to(out.resolve()) and target.is_file(), f"{link}: no such file in {out}"
        files.add(target)
    return files


def test_index_html_lists_every_patient_and_links_every_explanation(made: dict[str, Path], tmp_path: Path) -> None:
    code, output = _predict(made["run_images"] / "model.pt", "--site-dir", made["site_images"], "--explain", "2",
                            "--out", tmp_path)
    assert code == 0, output
    html, links = _page(tmp_path)
    linked = _check_links(tmp_path, links)
    pngs = {p.resolve() for p in (tmp_path / "explanations").glob("*.png")}
    assert len(pngs) == 8 and pngs <= linked  # 2 patients x 4 views, each shown
    assert {(tmp_path / name).resolve() for name in ("predictions.csv", "explanations.json")} <= linked
    table = _check_predictions(tmp_path, PATIENTS)
    rows = re.findall(r"<tr><td>([^<]+)</td><td class=\"num\">([\d.]+)</td><td>([01]) ", html)
    assert [r[0] for r in rows] == list(table.patient_id)
    assert [float(r[1]) for r in rows] == pytest.approx(table.probability.tolist(), abs=5e-4)
    assert [int(r[2]) for r in rows] == list(table.decision)
    settings = RunSettings(task="tfesi_radiograph", image_size=IMAGE_PX, dp=False)
    text = " ".join(html.split())
    assert settings.task_sha256 in text and "trained without differential privacy" in text
    assert "none: the uncalibrated default 0.5" in text and "may not be read as risks" in text
    assert NOT_CAUSES in text


def test_index_html_escapes_a_patient_id_that_is_markup(made: dict[str, Path], tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(made["site_table"], site)
    clinical = pd.read_csv(site / "clinical.csv", dtype=str)
    clinical.loc[4, "patient_id"] = MARKUP_ID
    clinical.to_csv(site / "clinical.csv", index=False)
    code, output = _predict(made["run_table"], "--site-dir", site, "--patient", MARKUP_ID, "--out", tmp_path / "out")
    assert code == 0, output
    html, links = _page(tmp_path / "out")
    assert "script" not in links.tags and links.handlers == []  # the id's markup made no element, no handler
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;&#34;&gt;&lt;img src=x onerror=alert(2)&gt;") >= 3
    assert "x" not in links.links and len(_check_links(tmp_path / "out", links)) == 3  # csv, json, bar chart


def test_index_html_renders_in_a_browser_with_the_markup_as_text(made: dict[str, Path], tmp_path: Path) -> None:
    from browser import check_page, ink_fraction

    site = tmp_path / "site"
    shutil.copytree(made["site_table"], site)
    clinical = pd.read_csv(site / "clinical.csv", dtype=str)
    clinical.loc[4, "patient_id"] = MARKUP_ID
    clinical.to_csv(site / "clinical.csv", index=False)
    predict_site(made["run_table"], site, tmp_path / "out", explain=PATIENTS)
    result = check_page(tmp_path / "out" / "index.html", tmp_path / "index.png")
    assert result.errors == [], result.errors  # an alert() that ran, or an image that failed to load
    assert "script" not in result.tags and result.handlers == [] and "x" not in result.image_sources
    assert len(result.image_widths) == PATIENTS and min(result.image_widths) > 0  # every bar chart decodes
    assert result.overflow_px <= 0 and ink_fraction(result.screenshot) > 0.02
    assert MARKUP_ID in result.text and NOT_CAUSES in " ".join(result.text.split())


def test_a_run_that_fails_leaves_no_index_html(made: dict[str, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    predict_site(made["run_table"], made["site_table"], out, explain=1)
    assert (out / "index.html").is_file()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("explanation failed")

    monkeypatch.setattr(predict_module, "integrated_gradients", broken)
    with pytest.raises(RuntimeError, match="explanation failed"):
        predict_site(made["run_table"], made["site_table"], out, explain=1)
    assert not (out / "index.html").exists()  # the old page would describe predictions this run replaced
    predict_site(made["run_table"], made["site_table"], out, explain=0)  # explaining no one: nothing to fail
    assert (out / "index.html").is_file() and not list(out.glob("*.tmp*"))


def test_index_html_states_the_threshold_rule_and_the_privacy_the_run_recorded(made: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(made["run_table"], run)
    (run / "model_card.json").write_text(json.dumps({"recommended_threshold": {"value": 0.3, "rule": "Youden"}}))
    (run / "metrics.json").write_text(json.dumps({"privacy": {"per_site": {
        "a": {"dp": True, "epsilon": 2.5, "delta": 1e-3}, "b": {"dp": True, "epsilon": 3.25, "delta": 5e-4}}}}))
    predict_site(run, made["site_table"], tmp_path / "out", explain=0)
    text = " ".join(_page(tmp_path / "out")[0].split())
    assert "threshold rule</td><td>Youden" in text and "decision at 0.3" in text
    assert "\u03b5 = 3.25, \u03b4 = 5e-4" in text and "the largest of 2 sites, b" in text
    assert "of 100 patients like this one" in text and "may not be read as risks" not in text
