"""`spine-fl benchmark SUITE`: each suite writes its file (machine, load, commit, command, figures) and its
README row. Tiny runs only, nothing timed is asserted.

Real runs: `models` and `overhead` (its three arms, Flower's SecAgg+ included) and `scaling`, at their
smallest (--smoke). `privacy` and `deployment` are thin loops around `simulate` and the loopback
consortium, each covered by its own tests; here their run is replaced by a stand-in of the same
shape, so that the file and row they write are checked without minutes of federations (the
deployment engine's own runs are tests/test_deployment.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spine_fl.cli import app

ENVELOPE = {"suite", "command", "date", "commit", "machine", "headline"}
MACHINE = {"cpu", "cores", "gpu", "load_average_start", "load_average_end", "shared", "note"}


def run(tmp_path: Path, suite: str, *args: str) -> dict:
    out = tmp_path / f"{suite}.json"
    result = CliRunner().invoke(app, ["benchmark", suite, "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert ENVELOPE <= set(report) and MACHINE <= set(report["machine"]), sorted(report)
    assert report["suite"] == suite and report["command"].startswith(f"spine-fl benchmark {suite}")
    assert set(report["commit"]) == {"sha", "dirty"}
    row = next(line for line in (tmp_path / "README.md").read_text().splitlines() if line.startswith(f"| {suite} |"))
    assert f"`{suite}.json`" in row and report["headline"].split(";")[0][:30] in row.replace("\\|", "|")
    return report


def test_help_lists_the_suites_and_an_unknown_suite_is_refused() -> None:
    result = CliRunner().invoke(app, ["benchmark", "--help"])
    assert result.exit_code == 0 and all(s in result.output for s in ("overhead", "scaling", "deployment",
                                                                       "privacy", "models"))
    result = CliRunner().invoke(app, ["benchmark", "nope"])
    assert result.exit_code == 2 and "unknown suite" in result.output
    result = CliRunner().invoke(app, ["benchmark", "overhead", "--rounds", "1", "--out", "/nonexistent/x.json"])
    assert result.exit_code == 2 and "2 or more" in result.output


def test_models_suite_writes_rows_and_the_dp_mode_choice(tmp_path: Path) -> None:
    report = run(tmp_path, "models", "--smoke")
    assert [r["model"] for r in report["results"]] == ["logistic"] and "dp_round_seconds" in report["results"][0]
    modes = report["grad_sample_modes"]
    assert modes["rows"][0]["mode"] == "hooks" and modes["rows"][0]["relative_difference_to_hooks"] == 0.0
    assert modes["rows"][0]["empty_batch_ok"] is True  # spine-fl's Poisson batches may be empty
    assert modes["recommended"]["small_cnn"]["mode"] == "hooks"
    (federated,) = report["consortium"]  # the smoke federates the small CNN for one round at 32 px
    assert federated["model"] == "small_cnn" and federated["rounds"] == 1 and federated["image_px"] == 32
    assert 0.0 <= federated["auroc_final"] <= 1.0 and len(federated["round_seconds"]) == 1
    text = (tmp_path / "README.md").read_text()
    assert "## models" in text and "## per-sample-gradient modes" in text


def test_overhead_suite_runs_spine_fl_plain_opacus_and_plain_flower_secagg(tmp_path: Path) -> None:
    report = run(tmp_path, "overhead", "--smoke")
    config = report["configs"]["dp+secagg"]
    assert set(config["round_seconds"]) == {"spine-fl", "plain in-process", "plain Flower"}
    assert all(s["n"] >= 1 for s in config["round_seconds"].values())
    assert config["target"]["ratio"] == "spine-fl / plain Flower" and config["target"]["at_most"] == 1.25
    assert report["remaining_difference"] and "## overhead" in (tmp_path / "README.md").read_text()


def test_scaling_suite_records_seconds_per_round_and_peak_memory(tmp_path: Path) -> None:
    report = run(tmp_path, "scaling", "--smoke")
    (size,) = report["results"]
    assert size["sites"] == 2 and size["rounds_completed"] == 1 and "error" not in size
    assert size["peak_memory_mib_process_tree"] >= size["peak_memory_mib_this_process"] > 0
    assert size["secagg"]["shares_per_site"] >= 1


def test_privacy_suite_file_and_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spine_fl.simulations.benchmarks import privacy

    def simulate(scenario, out_dir):  # the shape of runner.simulate's metrics that the suite reads
        return {**{k: {"auroc": 0.7} for k in ("federated", "pooled", "local_only")},
                "privacy": {"per_site": {"a": {"epsilon": 1.0}}}, "timing": {"federated_seconds": 2.0},
                "status": "completed"}

    monkeypatch.setattr(privacy, "simulate", simulate)
    report = run(tmp_path, "privacy", "--rounds", "2")
    assert set(report["results"]) == set(privacy.SETTINGS)
    assert report["results"]["dp+secagg"]["seconds_per_round"] == 1.0
    assert report["results"]["dp+secagg"]["round_time_ratio_vs_neither"] == 1.0


def test_deployment_suite_alternates_the_engines_and_takes_the_ratio_of_medians(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spine_fl.simulations.benchmarks import deployment

    order: list[str] = []
    rounds = {"simulation": [[20.0, 2.0, 9.0, 2.2], [19.0, 2.4, 2.0, 2.1]],  # one stalled round (9.0 s)
              "deployment": [[10.0, 3.0, 3.3, 3.1], [11.0, 3.4, 3.2, 3.3]]}

    def engine(name: str):
        def one_run(scenario, folder):
            assert scenario.run.rounds == 4
            order.append(name)
            return {"round_seconds": rounds[name][sum(n == name for n in order) - 1], "wall_seconds": 1.0,
                    "auroc_final_round": 0.8}
        return one_run

    monkeypatch.setattr(deployment, "_simulation_run", engine("simulation"))
    monkeypatch.setattr(deployment, "_deployment_run", engine("deployment"))
    report = run(tmp_path, "deployment", "--rounds", "4")
    assert order == ["simulation", "deployment", "deployment", "simulation"]  # 2 runs each by default
    assert report["simulation"]["median_round_seconds_after_first"] == 2.15  # round 1 left out; 9.0 barely counts
    assert report["simulation"]["mean_round_seconds_after_first"] == 3.28
    assert report["deployment"]["median_round_seconds_after_first"] == 3.25
    assert report["ratio_deployment_to_simulation"] == 1.51
    assert report["scenario"]["repeats"] == 2 and len(report["deployment"]["runs"]) == 2
    assert "medians 3.25 s vs 2.15 s" in report["headline"]


def test_readme_row_is_replaced_not_added(tmp_path: Path) -> None:
    from spine_fl.simulations.benchmarks.readme_table import upsert_row, upsert_section

    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nintro\n\n## calibration\n\nkept\n")
    for headline in ("first", "second"):
        upsert_row(readme, "overhead", "today", "spine-fl benchmark overhead", headline, tmp_path / "overhead.json")
    upsert_row(readme, "models", "today", "spine-fl benchmark models", "m", tmp_path / "models.json")
    upsert_row(readme, "models", "today", "spine-fl benchmark models --out models_gpu.json", "on the GPU",
               tmp_path / "models_gpu.json")  # the same suite into another file: a row of its own
    upsert_section(readme, "## overhead", ["one"])
    upsert_section(readme, "## overhead", ["two"])
    text = readme.read_text()
    assert text.count("| overhead |") == 1 and "second" in text and "first" not in text
    assert text.count("| models |") == 2 and "`models.json`" in text and "`models_gpu.json`" in text
    assert text.index("## Latest results") < text.index("## calibration") and "## calibration\n\nkept" in text
    assert text.count("## overhead") == 1 and "two" in text and "\none\n" not in text


def test_a_suite_stopped_midway_leaves_its_finished_parts_marked_incomplete(tmp_path: Path, monkeypatch) -> None:
    """A GPU lease or a batch job's time limit can stop a long suite (the models suite was stopped
    twice so, losing everything): what finished is on disk, marked incomplete; no README row."""
    import json

    from spine_fl.simulations.benchmarks import suites

    def stopped(o: suites.Options) -> dict:
        o.keep({"results": ["first part"]})
        raise KeyboardInterrupt  # what a time limit's signal amounts to here

    monkeypatch.setitem(suites.SUITES, "models", suites.Suite(stopped, lambda report: "never"))
    out, readme = tmp_path / "models.json", tmp_path / "README.md"
    with pytest.raises(KeyboardInterrupt):
        suites.run_suite("models", suites.Options(), out, readme, "spine-fl benchmark models")
    written = json.loads(out.read_text())
    assert written["complete"] is False and written["results"] == ["first part"]
    assert written["machine"]["cores"] and written["command"] == "spine-fl benchmark models"
    assert not readme.exists()

    monkeypatch.setitem(suites.SUITES, "models", suites.Suite(lambda o: {"results": ["all"]}, lambda report: "done"))
    suites.run_suite("models", suites.Options(), out, readme, "spine-fl benchmark models")
    assert json.loads(out.read_text())["complete"] is True and "| models |" in readme.read_text()
