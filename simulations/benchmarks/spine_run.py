"""spine-fl's side of a benchmark: a scenario's federation on Flower's simulation engine, and nothing else.

`spine-fl simulate` also trains the pooled and local-only baselines, scores and plots; a round's
cost is the federation's, so only `run_federation` runs here, with fresh site state (empty
ledgers) in `work_dir`. `on_round(round)` is called in the ServerApp's thread after each
evaluated round, before the next one starts.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from flwr.clientapp.typing import Mod

from spine_fl.shared.config import Scenario
from spine_fl.simulations.runner import build_consortium, load, run_federation, virtual_sites

# Budgets large enough that no site refuses within a benchmark (refusals would end a run early);
# the privacy guarantees are not what is measured here.
BENCHMARK_POLICY = {"epsilon_per_run": 1000.0, "epsilon_lifetime": 10000.0, "max_rounds": 1000}


def scenario_for(task: str, sites: int, rounds: int, dp: bool, secagg: bool, base: str = "default",
                 **run_changes: Any) -> Scenario:
    """The shipped scenario `base` with the task, sites, rounds and switches of a benchmark."""
    scenario = load(base)
    run = scenario.run
    if task != run.task:
        run = replace(run, task=task, task_definition="")
    run = replace(run, rounds=rounds, dp=dp, secagg=secagg, min_sites=sites, **run_changes)
    policy = {**scenario.policy, **BENCHMARK_POLICY, "require_dp": dp, "require_secagg": secagg}
    return replace(scenario, consortium=replace(scenario.consortium, sites=sites), run=run, policy=policy)


def write_sites(scenario: Scenario, data_dir: Path) -> list[Path]:
    """The scenario's synthetic site folders (written once, read by every run)."""
    return build_consortium(scenario, data_dir)


def run(scenario: Scenario, site_dirs: list[Path], work_dir: Path, on_round: Callable[[int], None],
        outer_mods: Sequence[Mod] = ()) -> None:
    """One federation of `scenario.run.rounds` rounds (and the recalibration round spine-fl adds after them)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    run_federation(scenario, virtual_sites(scenario, site_dirs, work_dir), work_dir,
                   on_round=lambda entry: on_round(int(entry["round"])), outer_mods=outer_mods)
