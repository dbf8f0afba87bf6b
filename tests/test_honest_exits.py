"""A job that was not done says so (issue 11, parts 3 and 4): a stopped run fails the Flower run
that carried it (what `flwr run .` and `flwr ls` report), a round that cannot gather min_sites ends
after a bounded wait with the reason, and a stopped simulation exits non-zero."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg

from spine_fl.client.app import build_client_app
from spine_fl.server.app import RunStopped, build_server_app
from spine_fl.server.coordinator_record import CoordinatorRecord
from spine_fl.server.strategy import RecordingStrategy, RoundLog
from spine_fl.shared.config import RunSettings
from spine_fl.simulations.runner import build_consortium, virtual_sites
from spine_fl.simulations.runner import load as load_scenario_by_name


def test_a_round_that_cannot_gather_min_sites_ends_after_the_bounded_wait() -> None:
    log = RoundLog(sites=["leiden", "seoul"], min_sites=2)
    strategy = RecordingStrategy(FedAvg(), log, CoordinatorRecord(None), site_wait_seconds=1)
    assert strategy.configure_fit(1, None, SimpleClientManager()) == []  # nobody connected: no hang
    assert "only 0 site(s) connected within site_wait_seconds = 1" in log.stopped
    assert "fewer than min_sites = 2" in log.stopped


@pytest.mark.slow
def test_a_stopped_run_fails_the_flower_run_after_writing_its_results(tmp_path: Path, caplog) -> None:
    """The ServerApp as `flwr run .` loads it raises RunStopped once the results say "stopped"."""
    from flwr.simulation import run_simulation

    scenario = load_scenario_by_name("default")
    run = RunSettings(task="rbp_tabular", rounds=1, batch_size=16, min_sites=2)
    site_dirs = build_consortium(scenario.__class__(**{**scenario.__dict__, "run": run}), tmp_path / "sites")
    sites = [s.__class__(s.name, s.data_dir, s.state_dir, s.policy.__class__(epsilon_per_run=0.01))
             for s in virtual_sites(scenario, site_dirs, tmp_path)]
    caplog.set_level(logging.CRITICAL)
    with pytest.raises(RunStopped, match="pre-flight"):
        run_simulation(server_app=build_server_app(run, [s.name for s in sites], tmp_path, fail_when_stopped=True),
                       client_app=build_client_app(sites), num_supernodes=len(sites),
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    federation = json.loads((tmp_path / "federation.json").read_text())
    assert federation["status"] == "stopped" and "pre-flight" in federation["stop_reason"]


def test_a_folder_whose_run_failed_or_never_finished_is_not_read_as_a_result(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from spine_fl.cli import app
    from spine_fl.server.reporting.run_result import RUN_STATUS_FILE, write_run_status

    runner = CliRunner()
    write_run_status(tmp_path, "running")
    (tmp_path / "metrics.json").write_text("{}")  # whatever a crashed run left
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "still running, or was killed" in result.output, result.output
    write_run_status(tmp_path, "failed", "RuntimeError: out of memory")
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "its run failed (RuntimeError: out of memory)" in result.output
    assert json.loads((tmp_path / RUN_STATUS_FILE).read_text())["status"] == "failed"
    assert not (tmp_path / "model_card.html").exists()


# ---------------------------------------------------------------- a stopped run's model scores no patient


def _model_file(path: Path, **run: object) -> Path:
    from spine_fl.shared.models.model_file import save_model
    from spine_fl.shared.models.registry import build_model
    from spine_fl.shared.training.local import get_weights

    settings = RunSettings(task="rbp_tabular", rounds=3, batch_size=16, min_sites=2)
    save_model(path, settings, get_weights(build_model(settings.task_spec, settings.seed)), **run)  # type: ignore[arg-type]
    return path


def test_the_model_file_records_how_its_run_ended(tmp_path: Path) -> None:
    from spine_fl.shared.models.model_file import read_model_bundle, run_record, usability_problem

    stopped = _model_file(tmp_path / "stopped.pt", run_status="stopped", rounds_trained=0, stop_reason="sites refused")
    bundle = read_model_bundle(stopped)
    assert run_record(bundle) == {"status": "stopped", "stop_reason": "sites refused", "rounds_trained": 0, "rounds": 3}
    problem = usability_problem(stopped, bundle)
    assert problem and str(stopped) in problem and "'stopped'" in problem and "sites refused" in problem
    assert "0 of 3 round(s) trained" in problem
    completed = _model_file(tmp_path / "completed.pt", run_status="completed", rounds_trained=3)
    assert run_record(read_model_bundle(completed))["status"] == "completed"
    assert usability_problem(completed, read_model_bundle(completed)) is None
    untrained = _model_file(tmp_path / "untrained.pt", run_status="completed", rounds_trained=0)
    assert "0 of 3 rounds trained" in (usability_problem(untrained, read_model_bundle(untrained)) or "")
    older = _model_file(tmp_path / "older.pt")  # a file written before the status was recorded: read as before
    assert run_record(read_model_bundle(older))["status"] is None
    assert usability_problem(older, read_model_bundle(older)) is None


@pytest.mark.parametrize("run", [{"run_status": "stopped", "rounds_trained": 0, "stop_reason": "pre-flight"},
                                 {"run_status": "completed", "rounds_trained": 0}], ids=["stopped", "no_round"])
def test_predict_refuses_the_model_of_a_run_that_did_not_complete(tmp_path: Path, run: dict) -> None:
    """What a stopped `spine-fl simulate` leaves (model.pt with the initial weights) never scores patients."""
    from typer.testing import CliRunner

    from spine_fl.cli import app

    model = _model_file(tmp_path / "run" / "model.pt", **run)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(model.parent), "--site-dir", str(tmp_path / "site"),
                                      "--out", str(out)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert str(model) in text and "must not score patients" in text and "run that completed" in text
    assert ("'stopped'" in text) if run["run_status"] == "stopped" else ("0 of 3 rounds trained" in text)
    assert not out.exists()  # nothing scored, nothing written


# ---------------------------------------------------------------- the server's run status


def test_the_server_keeps_run_status_true_around_its_run(tmp_path: Path) -> None:
    """`spine-fl server` writes run_status.json as simulate does: a crashed rerun into an old results
    folder marks it failed, so the old metrics.json is not reported as this run's result."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from spine_fl.cli import app
    from spine_fl.server.deployment.run_result import run_with_status
    from spine_fl.server.reporting.run_result import RUN_STATUS_FILE

    def status() -> dict:
        return json.loads((tmp_path / RUN_STATUS_FILE).read_text())

    seen = []
    done = run_with_status(tmp_path, lambda: seen.append(status()) or SimpleNamespace(status="completed", stop_reason=None))
    assert seen == [{"status": "running", "reason": None}] and done.status == "completed"
    assert status() == {"status": "completed", "reason": None}
    run_with_status(tmp_path, lambda: SimpleNamespace(status="stopped", stop_reason="only 1 of 3 rounds trained"))
    assert status() == {"status": "stopped", "reason": "only 1 of 3 rounds trained"}

    (tmp_path / "metrics.json").write_text("{}")  # the previous run's result
    def crash() -> None:
        raise RuntimeError("SuperLink died")
    with pytest.raises(RuntimeError):
        run_with_status(tmp_path, crash)
    assert status() == {"status": "failed", "reason": "RuntimeError: SuperLink died"}
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "its run failed (RuntimeError: SuperLink died)" in result.output

    def interrupted() -> None:
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_with_status(tmp_path, interrupted)
    assert status()["status"] == "failed" and "interrupted" in status()["reason"]


def test_the_server_command_writes_run_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command itself, with the coordinator replaced (no SuperLink is started)."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    import spine_fl.server.deployment.coordinator as coordinator
    import spine_fl.server.deployment.federation_config as federation_config
    from spine_fl.cli import app

    fed = SimpleNamespace(out_dir=tmp_path / "results", state_dir=tmp_path / "state")
    monkeypatch.setattr(federation_config, "load_federation", lambda path: fed)

    def fails(*args: object, **kwargs: object) -> None:
        assert json.loads((fed.out_dir / "run_status.json").read_text())["status"] == "running"
        raise ValueError("bad round")
    monkeypatch.setattr(coordinator, "run_coordinator", fails)
    result = CliRunner().invoke(app, ["server", "--config", str(tmp_path / "federation.toml")])
    assert isinstance(result.exception, ValueError)
    assert json.loads((fed.out_dir / "run_status.json").read_text()) == {"status": "failed",
                                                                           "reason": "ValueError: bad round"}
    monkeypatch.setattr(coordinator, "run_coordinator",
                        lambda *a, **k: SimpleNamespace(status="stopped", stop_reason="sites refused"))
    result = CliRunner().invoke(app, ["server", "--config", str(tmp_path / "federation.toml")])
    assert result.exit_code == 1, result.output
    assert json.loads((fed.out_dir / "run_status.json").read_text()) == {"status": "stopped", "reason": "sites refused"}


# ---------------------------------------------------------------- result plots are written atomically


def test_a_plot_that_fails_to_render_leaves_the_previous_png_whole(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    from spine_fl.server.reporting import plots

    rounds = [{"round": 1, "auroc": 0.6, "per_site": {"leiden": {"auroc": 0.6}}}]
    path = tmp_path / "auroc_per_round.png"
    plots.metric_per_round(path, rounds, {})
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    def half_written(self: Figure, target: object, *args: object, **kwargs: object) -> None:
        if hasattr(target, "write"):
            target.write(b"\x89PNG half")  # type: ignore[union-attr]
        else:
            Path(str(target)).write_bytes(b"\x89PNG half")
        raise OSError("No space left on device")
    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError):
        plots.metric_per_round(path, rounds, {})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auroc_per_round.png"]  # no temporary file left


# ---------------------------------------------------------------- the card of a run where no site trained


def test_the_card_of_a_run_where_no_site_trained_does_not_claim_dp_training() -> None:
    from spine_fl.server.reporting.model_card import _findings

    metric = {"value": 0.5, "ci": [0.4, 0.6]}
    card = {"comparison": {"federated": {"overall": {"auroc": metric, "n": 10}, "per_site": {}}},
            "data": {"sites": ["leiden", "seoul"]}, "task": {"outcome": "improve"},
            "privacy": {"dp": True, "secagg": False, "max_epsilon": None,
                        "per_site": {"leiden": {"dp": True, "trained": False}, "seoul": {"dp": True, "trained": False}}}}
    sentence = _findings(card)["privacy"]
    assert "no site trained" in sentence and "every site trained" not in sentence
    card["privacy"]["per_site"]["leiden"]["trained"] = True
    assert "every site that trained (1 of 2: leiden)" in _findings(card)["privacy"]
    card["privacy"]["per_site"]["seoul"]["trained"] = True
    assert _findings(card)["privacy"].startswith("Privacy: every site trained with differential privacy")
