"""Every subcommand answers --help."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from spine_fl.cli import app


@pytest.mark.parametrize("args", [[], ["synth"], ["validate"], ["simulate"], ["server"], ["client"], ["certs"], ["enroll"], ["bundle", "hash"], ["ledger", "verify"], ["report"], ["audit"], ["predict"]])
def test_help_everywhere(args: list[str]) -> None:
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_bundle_hash_is_the_sha256_of_the_bundle_the_server_submits() -> None:
    from spine_fl.shared.runtime.bundle import build_bundle

    result = CliRunner().invoke(app, ["bundle", "hash"])
    assert result.exit_code == 0
    assert result.output.strip() == build_bundle().sha256 and len(result.output.strip()) == 64


def test_simulate_list_shows_every_shipped_scenario_in_one_line() -> None:
    from pathlib import Path

    from spine_fl.simulations.runner import load

    result = CliRunner().invoke(app, ["simulate", "--list"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    shipped = sorted(p.stem for p in (Path(__file__).parent.parent / "simulations" / "scenarios").glob("*.toml"))
    assert [line.split(":")[0] for line in lines] == shipped
    for name, line in zip(shipped, lines):
        s = load(name)
        on = {True: "on", False: "off"}
        assert line.startswith(f"{name}: task {s.run.task}, {s.consortium.sites} {s.consortium.source} site(s), "
                               f"{s.run.rounds} rounds, DP {on[s.run.dp]}, SecAgg+ {on[s.run.secagg]} - ")
    assert "never a template" in next(line for line in lines if line.startswith("leaky:"))


STOPPING = """name = "stopping"
[consortium]
source = "synthetic"
sites = 3
seed = 7
[run]
task = "rbp_tabular"
rounds = 1
min_sites = 3
[policy]
epsilon_per_run = 0.01
"""


@pytest.mark.slow
def test_simulate_exits_3_with_the_reason_when_the_run_stopped(tmp_path) -> None:
    """Every site refuses (one round costs more epsilon than the policy allows): the run stops."""
    import json

    (tmp_path / "s.toml").write_text(STOPPING)
    result = CliRunner().invoke(app, ["simulate", "--scenario", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 3, result.output
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["status"] == "stopped"
    assert f"run stopped: {metrics['stop_reason']}" in result.output
    assert "fewer than min_sites" in result.output and "Traceback" not in result.output
