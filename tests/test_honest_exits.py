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
