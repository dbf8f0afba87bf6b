"""Issue 10, item 8: nothing is ever trained on placeholder zeros.

A patient without every required view (manifest row missing, file missing, file undecodable) is
excluded with a warning naming the patient and the file; a site left with no patient to train on
is unusable. A site whose policy sets max_missing_image_share refuses to take part (before training)
when a larger share of its patients is excluded so.
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


# -- site policy max_missing_image_share: too many patients lost to missing images -> the site refuses ---------

def _ten_patients_three_without_images(consortium: list[Path], tmp_path: Path, name: str) -> Path:
    """A 10-patient copy of a site (both outcomes in train and test among the 7 left) whose 3 other
    patients each lost their LAT image file."""
    site = _copy(consortium, tmp_path, name)
    data, report = validate_and_load(site, get_task(TASK), 16)
    assert report.usable and data is not None
    picked: list[str] = []
    for split, outcome, n in (("train", 1, 2), ("train", 0, 2), ("test", 1, 2), ("test", 0, 1), ("train", 1, 3)):
        ids = [p for p, s, y in zip(data.patient_ids, data.split, data.y) if s == split and y == outcome]
        picked += [p for p in ids if p not in picked][:n]
    victims = picked[7:]
    table = pd.read_csv(site / "clinical.csv", dtype=str, keep_default_na=False)
    table[table.patient_id.isin(picked)].to_csv(site / "clinical.csv", index=False)
    manifest = pd.read_csv(site / "manifest.csv", dtype=str, keep_default_na=False)
    manifest[manifest.patient_id.isin(picked)].to_csv(site / "manifest.csv", index=False)
    for rel in manifest.loc[manifest.patient_id.isin(victims) & (manifest.view == "LAT"), "path"]:
        (site / rel).unlink()
    return site


def _decide(site_dir: Path, tmp_path: Path, **policy: object):
    from spine_fl.client.privacy.round_checks import decide_round
    from spine_fl.client.site_config import Site, policy_from_table
    from spine_fl.shared.config import RunSettings

    site = Site("leiden", site_dir, tmp_path / "state",
                policy_from_table({"require_dp": False, "require_secagg": False, **policy}, "test [policy]"))
    run = RunSettings(task=TASK, image_size=16, dp=False)
    return decide_round(site, run, "run-1", 1, secagg_in_use=True, training=True)


def test_more_missing_images_than_the_policy_allows_is_refused_before_training(consortium: list[Path],
                                                                               tmp_path: Path) -> None:
    site = _ten_patients_three_without_images(consortium, tmp_path, "missing30")
    data, report = validate_and_load(site, get_task(TASK), 16)
    assert report.usable and data is not None and len(data) == 7  # excluded by name, the rest usable
    assert (data.patients_listed, data.images_missing) == (10, 3)
    assert (data.subset("train").patients_listed, data.subset("train").images_missing) == (10, 3)

    refusal = _decide(site, tmp_path, max_missing_image_share=0.2).refusal
    assert refusal is not None and refusal.rule == "max_missing_image_share"
    assert "3 of this site's 10 patients (30 %) are excluded because a required image is missing or " \
           "unreadable" in refusal.message
    assert "max_missing_image_share 0.2 (20 %)" in refusal.message
    assert "restore the missing images" in refusal.message and "raise max_missing_image_share" in refusal.message
    # As the coordinator reads it: machine-readable, the rule named.
    from spine_fl.shared.refusal import Refusal
    assert Refusal.parse(refusal.to_reason())["rule"] == "max_missing_image_share"
    # Evaluation is refused alike: the site does not take part at all.
    from spine_fl.client.privacy.policy import SitePolicy
    from spine_fl.client.privacy.round_checks import decide_round
    from spine_fl.client.site_config import Site
    from spine_fl.shared.config import RunSettings
    evaluation = decide_round(Site("leiden", site, tmp_path / "state", SitePolicy(max_missing_image_share=0.2)),
                              RunSettings(task=TASK, image_size=16), "run-1", 1, True, training=False)
    assert evaluation.refusal is not None and evaluation.refusal.rule == "max_missing_image_share"


def test_missing_images_within_the_policy_share_pass(consortium: list[Path], tmp_path: Path) -> None:
    site = _ten_patients_three_without_images(consortium, tmp_path, "missing30_ok")
    assert _decide(site, tmp_path, max_missing_image_share=0.5).refusal is None
    assert _decide(site, tmp_path, max_missing_image_share=0.3).refusal is None  # at the limit: not above it
    # The default keeps today's behaviour: excluded with a warning, whatever the share.
    assert _decide(site, tmp_path).refusal is None


def test_the_share_rule_counts_and_the_default_never_refuses() -> None:
    from spine_fl.client.privacy.policy import SitePolicy, missing_images_refusal

    assert SitePolicy().max_missing_image_share == 1.0
    assert missing_images_refusal(SitePolicy(), 9, 10) is None
    assert missing_images_refusal(SitePolicy(max_missing_image_share=0.0), 0, 10) is None
    assert missing_images_refusal(SitePolicy(max_missing_image_share=0.0), 1, 10).rule == "max_missing_image_share"
    refusal = missing_images_refusal(SitePolicy(max_missing_image_share=0.25), 1, 3)
    assert refusal is not None and "1 of this site's 3 patients (33.3 %)" in refusal.message


@pytest.mark.parametrize(("bad", "why"), [
    (1.5, "1.5: must be a number from 0 to 1; set max_missing_image_share to the largest share"),
    (-0.1, "-0.1: must be a number from 0 to 1; set max_missing_image_share to the largest share"),
    ("x", '"x": expected a number'),
    (True, "true: expected a number"),
    (float("nan"), "nan: expected a finite number"),
])
def test_a_bad_max_missing_image_share_is_a_policy_error(bad: object, why: str) -> None:
    from spine_fl.client.site_config import policy_from_table
    from spine_fl.shared.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        policy_from_table({"max_missing_image_share": bad}, "test [policy]")
    assert str(caught.value).startswith(f"test [policy] max_missing_image_share = {why}")
