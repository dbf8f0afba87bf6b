"""Issue 10, item 8: nothing is ever trained on placeholder zeros.

A patient without every required view (manifest row missing, file missing, file undecodable) is
excluded with a warning naming the patient and the file; a site left with no patient to train on
is unusable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from spine_fl.cli import app
from spine_fl.shared.contract.data_contract import SiteDataError, load_site, validate_and_load
from spine_fl.shared.contract.tasks import get_task

RUNNER = CliRunner()
TASK = "tfesi_radiograph"


def _copy(consortium: list[Path], tmp_path: Path, name: str) -> Path:
    site = tmp_path / name
    shutil.copytree(consortium[0], site)
    return site


def _trainable_ids(site: Path) -> list[str]:
    """Labelled patients of the clean site, in clinical order (the ones that would be loaded)."""
    data, report = validate_and_load(site, get_task(TASK), 16)
    assert report.usable and data is not None
    return list(data.patient_ids)


def test_all_dicoms_deleted_is_an_error_and_nothing_trains(consortium: list[Path], tmp_path: Path) -> None:
    site = _copy(consortium, tmp_path, "no_dicoms")
    n_patients = len(pd.read_csv(site / "clinical.csv"))
    manifest = pd.read_csv(site / "manifest.csv")
    for rel in manifest["path"]:
        (site / rel).unlink(missing_ok=True)

    data, report = validate_and_load(site, get_task(TASK), 16)
    assert data is None and not report.usable
    assert report.counts["images_missing"] == n_patients
    assert report.counts["train"] == 0 and report.counts["labelled"] == 0
    [error] = [p for p in report.errors if "no patient left" in p.what]
    assert error.what.startswith(f"no patient left to train or evaluate on: {n_patients} patient(s) excluded")
    assert "placeholder" in error.action
    with pytest.raises(SiteDataError, match="no patient left"):
        load_site(site, get_task(TASK), 16)

    result = RUNNER.invoke(app, ["validate", str(site), "--task", TASK, "--json"])
    assert result.exit_code == 1
    out = json.loads(result.output)
    assert out["usable"] is False
    # Count plus the first few: per-file warnings for 5 patients (4 views each), one summary.
    file_warnings = [p for p in out["problems"] if p["severity"] == "warning" and p["what"].startswith("file missing")]
    assert len(file_warnings) == 5 * 4
    [summary] = [p for p in out["problems"] if "patient(s) excluded: a required view" in p["what"]]
    assert summary["what"].startswith(f"{n_patients} patient(s) excluded")
    assert f"and {n_patients - 5} more patient(s)" in summary["what"]


def test_empty_manifest_is_an_error_not_zeros(consortium: list[Path], tmp_path: Path) -> None:
    """The old hole: a manifest with no rows gave every patient an all-zero image and no error."""
    site = _copy(consortium, tmp_path, "empty_manifest")
    (site / "manifest.csv").write_text("patient_id,view,path\n")
    result = RUNNER.invoke(app, ["validate", str(site), "--task", TASK])
    assert result.exit_code == 1
    flat = " ".join(result.output.split())
    assert "no patient left to train or evaluate on" in flat and "NOT usable" in flat


def test_two_patients_without_lat_are_excluded_by_name(consortium: list[Path], tmp_path: Path) -> None:
    site = _copy(consortium, tmp_path, "no_lat")
    before = _trainable_ids(site)
    manifest = pd.read_csv(site / "manifest.csv")
    victims = before[3:5]
    deleted = {}
    for pid in victims:
        rel = manifest[(manifest.patient_id == pid) & (manifest.view == "LAT")].iloc[0]["path"]
        (site / rel).unlink()
        deleted[pid] = rel

    data, report = validate_and_load(site, get_task(TASK), 16)
    assert report.usable and data is not None
    assert list(data.patient_ids) == [p for p in before if p not in victims]
    assert report.counts["images_missing"] == 2
    for pid, rel in deleted.items():
        [w] = [p for p in report.warnings if p.where == str(site / rel)]
        assert w.what.startswith(f"file missing (LAT image of patient {pid}, manifest.csv line ")
        assert w.action.startswith(f"patient {pid} excluded from training and evaluation (no placeholder image")
    [summary] = [p for p in report.warnings if "patient(s) excluded: a required view" in p.what]
    assert summary.what.startswith("2 patient(s) excluded")
    assert all(pid in summary.what and rel in summary.what for pid, rel in deleted.items())
    # Every loaded image is a decoded image: none is a placeholder.
    assert data.images.shape == (len(data), 4, 16, 16)
    assert all(data.images[i, v].max() > 0 for i in range(len(data)) for v in range(4))
    assert all(data.images[i, v].std() > 0 for i in range(len(data)) for v in range(4))


def test_missing_manifest_row_excludes_the_patient(consortium: list[Path], tmp_path: Path) -> None:
    site = _copy(consortium, tmp_path, "no_row")
    before = _trainable_ids(site)
    manifest = pd.read_csv(site / "manifest.csv")
    pid = before[0]
    manifest[~((manifest.patient_id == pid) & (manifest.view == "AP"))].to_csv(site / "manifest.csv", index=False)
    data, report = validate_and_load(site, get_task(TASK), 16)
    assert report.usable and pid not in data.patient_ids and len(data) == len(before) - 1
    [w] = [p for p in report.warnings if p.what.startswith(f"no AP image for patient {pid} (clinical.csv line ")]
    assert w.where == str(site / "manifest.csv") and "add the AP image to the manifest" in w.action


def test_corrupt_file_excludes_the_patient_and_names_the_file(consortium: list[Path], tmp_path: Path) -> None:
    site = _copy(consortium, tmp_path, "corrupt")
    before = _trainable_ids(site)
    manifest = pd.read_csv(site / "manifest.csv")
    pid = before[2]
    rel = manifest[(manifest.patient_id == pid) & (manifest.view == "ROBL")].iloc[0]["path"]
    (site / rel).write_bytes(b"\x00" * 300)

    data, report = validate_and_load(site, get_task(TASK), 16)
    assert report.usable and data is not None
    assert pid not in data.patient_ids and len(data) == len(before) - 1
    [w] = [p for p in report.warnings if p.where == str(site / rel)]
    assert f"(ROBL image of patient {pid})" in w.what
    assert w.action == (f"patient {pid} excluded from training and evaluation (no placeholder image is used); "
                        "re-export or replace this DICOM file")
    [summary] = [p for p in report.warnings if "patient(s) excluded: a required view" in p.what]
    assert f"{pid} (ROBL: {rel} unreadable)" in summary.what


def test_train_split_emptied_by_missing_images_is_an_error(consortium: list[Path], tmp_path: Path) -> None:
    site = _copy(consortium, tmp_path, "train_gone")
    table = pd.read_csv(site / "clinical.csv", dtype=str, keep_default_na=False)
    train_ids = set(table.loc[table["split"] == "train", "patient_id"])
    manifest = pd.read_csv(site / "manifest.csv")
    for rel in manifest.loc[manifest.patient_id.isin(train_ids) & (manifest.view == "LAT"), "path"]:
        (site / rel).unlink()
    data, report = validate_and_load(site, get_task(TASK), 16)
    assert data is None
    [error] = [p for p in report.errors if "no patient left" in p.what]
    assert error.what.startswith(f"no patient left in the train split: {len(train_ids)} patient(s) excluded")
