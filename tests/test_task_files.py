"""Tasks as files (issue 12): the shipped files behave as the Python literals they replaced, a
changed definition gets a new hash that sites refuse, bad files get clear messages, and a study on
a consortium's own folders runs from a task file and a scenario alone."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomlkit
from typer.testing import CliRunner

from spine_fl.cli import app
from spine_fl.client.privacy.policy import SitePolicy, rule_violations
from spine_fl.client.site_config import policy_from_table
from spine_fl.shared.config import ConfigError, RunSettings, load_scenario
from spine_fl.shared.contract.data_contract import validate_and_load
from spine_fl.shared.contract.task_definition import MODEL_NAMES
from spine_fl.shared.contract.task_file import canonical_json, load_task_file, task_from_table, task_sha256, task_table
from spine_fl.shared.contract.tasks import (
    SHIPPED_SHA256,
    TASKS,
    BinaryColumnLabel,
    Feature,
    ImageInput,
    RelativeReductionLabel,
    Task,
    get_task,
    shipped_task_files,
    use_task,
)
from spine_fl.shared.models.registry import ALIASES, MODELS, build_model
from spine_fl.simulations import runner
from spine_fl.simulations.synthetic.vertebral_column import write_sites

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "tasks"

# -- the literals of shared/contract/tasks.py before issue 12, as they were (title and model are new) ----------

_NRS = RelativeReductionLabel("nrs_baseline", "nrs_2months", 0.5, 0.0, 10.0, "NRS", "pain score", "2-month follow-up")
_AGE = Feature("age", center=60.0, scale=15.0, low=18, high=110, unit="years")
_SEX = Feature("sex", "category", categories=("F", "M"))
_MRI = ImageInput(("T2_AXIAL",), ("MR",), field_of_view_mm=100.0)
LEGACY = {
    "tfesi_radiograph": Task("tfesi_radiograph", "", "", _NRS,
                             image=ImageInput(("AP", "LAT", "LOBL", "ROBL"), ("CR", "DX"), field_of_view_mm=80.0)),
    "tfesi_mri": Task("tfesi_mri", "", "", _NRS, image=_MRI),
    "tfesi_fusion": Task("tfesi_fusion", "", "", _NRS, image=_MRI, features=(
        _AGE, _SEX,
        Feature("nrs_baseline", center=7.0, scale=1.5, low=0, high=10, unit="NRS 0-10"),
        Feature("symptom_duration_weeks", center=16.0, scale=12.0, low=0, high=1040, unit="weeks"))),
    "rbp_tabular": Task("rbp_tabular", "", "", BinaryColumnLabel("residual_pain"), features=(
        _AGE, _SEX,
        Feature("bmi", center=23.0, scale=3.5, low=10, high=60, unit="kg/m2"),
        Feature("bmd_t_score", center=-3.0, scale=0.8, low=-8, high=3, unit="SD"),
        Feature("hu_value", center=70.0, scale=25.0, low=-100, high=400, unit="HU"),
        Feature("sarcopenia", "binary"),
        Feature("intravertebral_cleft", "binary"),
        Feature("posterior_fascia_oedema", "binary"),
        Feature("interspinous_ligament_degeneration", "binary"),
        Feature("cobb_angle", center=12.0, scale=8.0, low=-10, high=90, unit="degrees"),
        Feature("anterior_vertebral_height_ratio", center=0.75, scale=0.12, low=0, high=1.2, unit="ratio"),
        Feature("cement_volume_ml", center=4.5, scale=1.5, low=0, high=15, unit="ml"),
        Feature("cement_distribution", "category", categories=("diffuse", "lumpy")),
        Feature("fractured_vertebrae", center=1.3, scale=0.6, low=1, high=10, unit="count"))),
    "vertebral_column": Task("vertebral_column", "", "", BinaryColumnLabel("class", positive="AB", negative="NO"),
                             subgroups=(), features=(
        Feature("pelvic_incidence", center=55.0, scale=15.0, unit="degrees"),
        Feature("pelvic_tilt", center=15.0, scale=10.0, unit="degrees"),
        Feature("lumbar_lordosis_angle", center=50.0, scale=17.0, unit="degrees"),
        Feature("sacral_slope", center=40.0, scale=12.0, unit="degrees"),
        Feature("pelvic_radius", center=118.0, scale=13.0, unit="mm"),
        Feature("degree_spondylolisthesis", center=10.0, scale=30.0, unit="mm"))),
}


@pytest.fixture(autouse=True)
def shipped_definitions():
    """A test that runs a changed definition leaves the shipped ones in force for the next test."""
    yield
    for task in TASKS.values():
        use_task(task)


@pytest.fixture(scope="module")
def vertebral_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_sites(tmp_path_factory.mktemp("vertebral"), 3, 7)


def test_every_shipped_task_is_a_file_and_the_names_keep_working() -> None:
    files = shipped_task_files()
    assert sorted(files) == sorted([*LEGACY, "lss_surgery_zcq"]) == sorted(p.stem for p in CONFIGS.glob("*.toml"))
    for name, path in files.items():
        task = load_task_file(path)
        assert get_task(name) == task == TASKS[name] and task.title and task.description
        assert task_from_table(task_table(task), "round trip") == task  # the canonical form says everything
        assert SHIPPED_SHA256[name] == task_sha256(task)
        build_model(task, 0)  # the [model] it names is one the registry builds
    assert set(MODEL_NAMES) == set(MODELS) | set(ALIASES)  # a task file may name exactly the registry's models


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_shipped_file_validates_a_site_exactly_as_the_old_literal(name: str, consortium: list[Path],
                                                                  vertebral_sites: list[Path]) -> None:
    old, new = LEGACY[name], get_task(name)
    assert (new.label, new.features, new.image, new.subgroups) == (old.label, old.features, old.image, old.subgroups)
    site = vertebral_sites[0] if name == "vertebral_column" else consortium[0]
    old_data, old_report = validate_and_load(site, old, 32)
    new_data, new_report = validate_and_load(site, new, 32)
    assert old_data is not None and new_data is not None and len(new_data) > 20
    for part in ("patient_ids", "split", "y", "features", "images"):
        a, b = getattr(old_data, part), getattr(new_data, part)
        assert (a is None and b is None) or np.array_equal(a, b), part
    assert new_data.subgroups.equals(old_data.subgroups)
    assert new_report.to_dict() == old_report.to_dict()


# -- a definition is approved by name and hash -----------------------------------------------------------------

def _changed_vertebral(tmp_path: Path) -> Task:
    path = tmp_path / "vertebral_column.toml"
    path.write_text((CONFIGS / "vertebral_column.toml").read_text().replace("scale = 30.0", "scale = 3.0"))
    return load_task_file(path)


def test_a_changed_file_gets_a_new_hash_and_a_site_refuses_it_naming_both(tmp_path: Path) -> None:
    shipped = SHIPPED_SHA256["vertebral_column"]
    changed = _changed_vertebral(tmp_path)
    assert changed.name == "vertebral_column" and task_sha256(changed) != shipped
    # comments and layout are not the definition: the same meaning keeps the hash
    relaid = tmp_path / "relaid.toml"
    relaid.write_text("# a comment\n" + (CONFIGS / "vertebral_column.toml").read_text().replace(" = ", "="))
    assert task_sha256(load_task_file(relaid)) == shipped

    run = RunSettings(task="vertebral_column", task_definition=canonical_json(changed), dp=False)
    assert run.task_sha256 == task_sha256(changed) and get_task("vertebral_column") == changed
    assert RunSettings.from_run_config(run.to_run_config()) == run  # the definition travels in the run config
    policy = policy_from_table({"allowed_tasks": ["vertebral_column"], "require_dp": False}, "site.toml [policy]")
    [refusal] = rule_violations(policy, run, secagg_in_use=True)
    assert refusal.rule == "allowed_tasks"
    assert task_sha256(changed) in refusal.message and shipped in refusal.message
    approved = dataclasses.replace(policy, allowed_tasks=(f"vertebral_column@{task_sha256(changed)}",))
    assert rule_violations(approved, run, secagg_in_use=True) == []
    # the shipped definition under its bare name is accepted, the approved changed one only is not
    assert rule_violations(policy, RunSettings(task="vertebral_column", dp=False), True) == []
    assert [r.rule for r in rule_violations(approved, RunSettings(task="vertebral_column", dp=False), True)] \
        == ["allowed_tasks"]


def test_an_unknown_task_is_refused_with_its_hash(tmp_path: Path) -> None:
    own = _study_task_file(tmp_path)
    run = RunSettings(task="abnormal_spine", task_definition=canonical_json(load_task_file(own)), dp=False)
    [refusal] = rule_violations(SitePolicy(require_dp=False), run, secagg_in_use=True)
    assert refusal.rule == "allowed_tasks" and "abnormal_spine" in refusal.message
    assert run.task_sha256 in refusal.message and "not in this site's allowed_tasks" in refusal.message


def test_allowed_tasks_entries_are_checked() -> None:
    with pytest.raises(ConfigError) as caught:
        policy_from_table({"allowed_tasks": ["tfesi_mir", "mine@abc", "@" + "a" * 64]}, "site.toml [policy]")
    text = str(caught.value)
    assert "unknown task(s) tfesi_mir" in text and "name@sha256" in text
    assert '"mine@abc" is not name@sha256' in text and f'"@{"a" * 64}" is not name@sha256' in text


def test_a_run_definition_must_match_its_name() -> None:
    with pytest.raises(ConfigError, match="defines task 'vertebral_column', but the run names task 'rbp_tabular'"):
        RunSettings(task="rbp_tabular", task_definition=canonical_json(TASKS["vertebral_column"]))


# -- a bad task file: every problem, with file, key, value and what to do -------------------------------------

def _task_problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_task_file(path)
    assert all(line.startswith(str(path)) for line in caught.value.problems), caught.value.problems
    return caught.value.problems


def test_a_bad_task_file_lists_every_problem(tmp_path: Path) -> None:
    top = _task_problems(tmp_path, 'name = "x"\ntitel = "X"\ndescription = "d"\nsubgroups = "age"\n')
    assert any("unknown setting(s) titel (did you mean title?)" in p for p in top)
    assert any("missing setting(s) title, label" in p for p in top)
    assert any('subgroups = "age": expected a list of text values' in p for p in top)

    nested = _task_problems(tmp_path, '''name = "x"
title = "X"
description = "d"
[label]
kind = "all_of"
conditions = [{column = "zcq_severity_change", op = "=>", value = 0.5}]
[[predictors]]
name = "age"
scale = "15"
units = "years"
''')
    assert any('[label] conditions item 1 op = "=>": unknown comparison; did you mean >=? choose one of' in p
               for p in nested), nested
    assert any('[[predictors]] 1 (age) scale = "15": expected a number' in p for p in nested)
    assert any("[[predictors]] 1 (age): unknown setting(s) units (did you mean unit?)" in p for p in nested)

    kind = _task_problems(tmp_path, 'name = "x"\ntitle = "X"\ndescription = "d"\n[label]\nkind = "binary"\n'
                                    'column = "y"\n[[predictors]]\nname = "y"\n')
    assert any('[label] kind = "binary": unknown label kind; did you mean binary_column?' in p for p in kind)

    # a name sites cannot approve (allowed_tasks entries are name@sha256): letters, digits, _ and - only
    for name, suggested in (("abnormal spine", "abnormal_spine"), ("spine@v2", "spine_v2")):
        (line,) = _task_problems(tmp_path, f'name = "{name}"\ntitle = "X"\ndescription = "d"\n[label]\n'
                                           'kind = "binary_column"\ncolumn = "y"\n[[predictors]]\nname = "a"\n')
        assert line == (f'{tmp_path / "bad.toml"} name = "{name}": a task name may hold only letters, digits, _ and - '
                        "(sites approve it as name@sha256 in allowed_tasks, which no other character can spell); "
                        f'rename the task, e.g. name = "{suggested}"')


def test_a_task_file_missing_a_key_reports_every_other_problem_too(tmp_path: Path) -> None:
    """One pass: a missing required key does not hide the problems in the tables that are there."""
    problems = _task_problems(tmp_path, 'name = "bad task"\n[label]\nkind = "binary_colum"\ncolumn = "c"\n'
                                        '[[predictors]]\nname = "a"\nscale = 0\ncenter = "x"\n'
                                        '[[predictors]]\nname = "c"\n[model]\nname = "densenet"\n')
    text = "\n".join(problems)
    assert "missing setting(s) title, description" in text
    assert 'name = "bad task": a task name may hold only letters' in text
    assert '[label] kind = "binary_colum": unknown label kind; did you mean binary_column?' in text
    assert "[[predictors]] 1 (a) scale = 0: must be above 0" in text and '(a) center = "x": expected a number' in text
    assert '[model] name = "densenet": unknown model; did you mean densenet121?' in text
    assert len(problems) == 6, problems
    # with the label right, what the pieces get wrong together is in the same pass (c is the outcome)
    together = _task_problems(tmp_path, 'name = "x"\n[label]\nkind = "binary_column"\ncolumn = "c"\n'
                                        '[[predictors]]\nname = "c"\n')
    assert any("missing setting(s) title, description" in p for p in together)
    assert any("predictors = [\"c\"]: c cannot be a predictor" in p for p in together), together


def test_all_of_label_needs_every_condition(tmp_path: Path) -> None:
    path = tmp_path / "zcq.toml"
    path.write_text('''name = "zcq"
title = "ZCQ success"
description = "all of three ZCQ conditions"
[label]
kind = "all_of"
conditions = [{column = "sev", op = ">=", value = 0.5}, {column = "sat", op = "<=", value = 2.5}]
[[predictors]]
name = "bmi"
''')
    task = load_task_file(path)
    site = tmp_path / "site"
    site.mkdir()
    pd.DataFrame({"patient_id": [f"P{i}" for i in range(8)], "split": ["train"] * 4 + ["test"] * 4,
                  "sev": [0.5, 0.4, 1.0, 2, 0.5, 0.1, 1.0, ""], "sat": [2.5, 1, 3, 2, 2, 1, 1, 1],
                  "bmi": [25] * 8}).to_csv(site / "clinical.csv", index=False)
    data, report = validate_and_load(site, task)
    assert data is not None and list(data.y) == [1, 0, 0, 1, 1, 0, 1]  # P7: sev missing, unlabelled
    assert any("sev missing" in w.what for w in report.warnings)


def _mri_task_file(folder: Path, model: str) -> Path:
    path = folder / f"mri_{model}.toml"
    path.write_text((CONFIGS / "tfesi_mri.toml").read_text().replace('name = "tfesi_mri"', f'name = "mri_{model}"')
                    .replace('name = "small_cnn"', f'name = "{model}"'))
    return path


@pytest.mark.parametrize("model, size", [("resnet18", 224), ("resnet34", 224), ("densenet121", 224),
                                         ("small_cnn", 64)])
def test_a_run_without_image_size_trains_at_its_models_own_size(tmp_path: Path, model: str, size: int) -> None:
    task_file = _mri_task_file(tmp_path, model)
    (tmp_path / "s.toml").write_text(f'[run]\ntask = "{task_file.name}"\n')
    run = load_scenario(tmp_path / "s.toml").run
    assert run.task_spec.model.name == model and run.image_size == size
    assert RunSettings.from_run_config(run.to_run_config()).image_size == size  # what the sites receive
    # an explicit image_size still wins; one too small for the model is still refused
    (tmp_path / "s.toml").write_text(f'[run]\ntask = "{task_file.name}"\nimage_size = 96\n')
    assert load_scenario(tmp_path / "s.toml").run.image_size == 96
    (tmp_path / "s.toml").write_text(f'[run]\ntask = "{task_file.name}"\nimage_size = 4\n')
    with pytest.raises(ConfigError, match="image_size = 4: too small"):
        load_scenario(tmp_path / "s.toml")


def test_the_default_demo_and_table_tasks_keep_64_px() -> None:
    assert RunSettings().image_size == 64 and RunSettings(task="tfesi_mri").image_size == 64
    assert RunSettings(task="vertebral_column").image_size == 64  # no images read: the value is unused


# -- a consortium's own study: three folders, one task file, one scenario --------------------------------------

def _study_task_file(folder: Path) -> Path:
    """A newcomer's task: a binary outcome column and numeric predictors, nothing else."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ['name = "abnormal_spine"', 'title = "Abnormal spine from pelvic measures"',
             'description = "Disc hernia or spondylolisthesis vs normal, from six pelvic and lumbar measures"',
             "", "[label]", 'kind = "binary_column"', 'column = "class"', 'positive = "AB"', 'negative = "NO"']
    for name, center, scale in (("pelvic_incidence", 55, 15), ("pelvic_tilt", 15, 10), ("lumbar_lordosis_angle", 50, 17),
                                ("sacral_slope", 40, 12), ("pelvic_radius", 118, 13),
                                ("degree_spondylolisthesis", 10, 30)):
        lines += ["", "[[predictors]]", f'name = "{name}"', f"center = {center}", f"scale = {scale}"]
    path = folder / "abnormal_spine.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _study(tmp_path: Path, run: dict, policy: dict | None = None) -> Path:
    """sites/boston, sites/leiden, sites/lyon from the shipped vertebral data, a task file and a scenario."""
    for site, name in zip(write_sites(tmp_path / "generated", 3, 7), ("boston", "leiden", "lyon")):
        shutil.copytree(site, tmp_path / "sites" / name)
    _study_task_file(tmp_path / "tasks")
    scenario = {"name": "own-study", "consortium": {"folders": ["sites/boston", "sites/leiden", "sites/lyon"]},
                "run": {"task": "tasks/abnormal_spine.toml", **run}, "policy": policy or {}}
    path = tmp_path / "study.toml"
    path.write_text(tomlkit.dumps(scenario))
    return path


def test_a_scenario_names_its_folders_and_task_file_relative_to_itself(tmp_path: Path) -> None:
    scenario = runner.load(_study(tmp_path, {"min_sites": 3, "dp": False}, {"require_dp": False}))
    assert scenario.run.task == "abnormal_spine" and scenario.run.task_spec.n_features == 6
    assert [Path(f) for f in scenario.consortium.folders] == [tmp_path / "sites" / s for s in ("boston", "leiden", "lyon")]
    assert scenario.consortium.sites == 3 and runner.consortium_site_names(scenario.consortium) == ["boston", "leiden",
                                                                                                      "lyon"]
    # the virtual sites approve the scenario's own task file by its hash
    policy = policy_from_table(scenario.site_policy("boston"), "scenario [policy]")
    assert rule_violations(policy, scenario.run, secagg_in_use=True) == []
    # the written scenario (beside the results) loads as the same scenario
    runner.write_scenario(tmp_path / "out" / "scenario.toml", scenario)
    written = load_scenario(tmp_path / "out" / "scenario.toml")
    assert replace(written, policy={}) == replace(scenario, policy={})
    for site in ("boston", "leiden", "lyon"):  # the approval the sites got by default is written out: same policy
        assert written.site_policy(site) == scenario.site_policy(site)
    assert written.policy["allowed_tasks"][-1] == f"abnormal_spine@{scenario.run.task_sha256}"


def test_missing_folders_and_task_file_are_reported_together(tmp_path: Path) -> None:
    path = tmp_path / "study.toml"
    path.write_text('[consortium]\nfolders = ["sites/a", "sites/b"]\nsource = "synthetic"\n'
                    '[run]\ntask = "tasks/none.toml"\nrounds = 0\nmin_sites = 2\n')
    with pytest.raises(ConfigError) as caught:
        runner.load(path)
    text = "\n".join(caught.value.problems)
    assert text.count("is not a folder") == 2 and f"{tmp_path / 'sites' / 'a'}" in text
    assert 'source = "synthetic": a consortium of folders is not generated' in text
    assert "none.toml: task file (see configs/tasks/) not found" in text and "rounds = 0" in text


def test_every_folder_is_validated_before_anything_runs(tmp_path: Path) -> None:
    path = _study(tmp_path, {"min_sites": 3, "dp": False}, {"require_dp": False})
    for site, value in (("boston", "maybe"), ("lyon", "x")):
        table = pd.read_csv(tmp_path / "sites" / site / "clinical.csv", dtype=str)
        table.loc[0, "class"] = value
        table.to_csv(tmp_path / "sites" / site / "clinical.csv", index=False)
    result = CliRunner().invoke(app, ["simulate", "--scenario", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output  # the scenario is invalid: nothing runs
    text = " ".join(result.output.split())
    assert "site boston" in text and "'maybe' is not 'AB' or 'NO'" in text and "site lyon" in text
    assert not (tmp_path / "out").exists()


def test_validate_takes_a_task_file_and_prints_its_hash(tmp_path: Path, vertebral_sites: list[Path]) -> None:
    task_file = _study_task_file(tmp_path)
    result = CliRunner().invoke(app, ["validate", str(vertebral_sites[0]), "--task", str(task_file)])
    assert result.exit_code == 0, result.output
    assert f"abnormal_spine@{task_sha256(load_task_file(task_file))}" in result.output


@pytest.mark.slow
def test_own_folders_and_task_file_federate_close_to_pooled(tmp_path: Path) -> None:
    path = _study(tmp_path, {"rounds": 8, "local_epochs": 5, "batch_size": 16, "optimizer": "adam",
                             "learning_rate": 0.003, "min_sites": 3, "dp": False, "secagg": True},
                  {"require_dp": False})
    metrics = runner.simulate(runner.load(path), tmp_path / "out")
    assert metrics["status"] == "completed" and metrics["task"] == "abnormal_spine"
    assert sorted(metrics["sites"]) == ["boston", "leiden", "lyon"]
    assert abs(metrics["federated"]["auroc"] - metrics["pooled"]["auroc"]) <= 0.05, metrics
    assert "Disc hernia or spondylolisthesis vs normal" in (tmp_path / "out" / "model_card.html").read_text()
