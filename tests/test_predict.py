"""`spine-fl predict`: a site scores its own patients with a run's model, and sees why.

The runs are made here in a second: a model of the task built and saved as a run saves it
(shared/models/model_file.py save_model), on tiny synthetic site folders (12 patients, 16 px
images), so the file checks the command, not the training.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from spine_fl.cli import app
from spine_fl.shared.config import RunSettings
from spine_fl.shared.contract.data_contract import validate_and_load
from spine_fl.shared.models.model_file import save_model
from spine_fl.shared.models.registry import build_model
from spine_fl.shared.training.local import get_weights
from spine_fl.simulations.synthetic.consortium import PROFILES, synthesize_site

PATIENTS = 12
IMAGE_PX = 16
NOTE = "threshold 0.5 (no recommended threshold recorded for this model: uncalibrated)"


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
