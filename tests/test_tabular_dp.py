"""The 5-site kyphoplasty scenario and its federated-vs-pooled DP benchmark (issue 13): settings and
privacy bookkeeping only; the AUROC figures are measured by the benchmark, not here."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spine_fl.client.privacy.plan import plan_round
from spine_fl.shared.config import load_scenario
from spine_fl.shared.contract.data_contract import SiteData
from spine_fl.shared.contract.tasks import TASKS, get_task, use_task
from spine_fl.shared.training.accounting import epsilon
from spine_fl.simulations import baselines
from spine_fl.simulations.benchmarks.tabular_dp import BEFORE, arm_scenario
from spine_fl.simulations.runner import load, packaged_scenario, write_scenario


def _sites(sizes: dict[str, int]) -> dict[str, SiteData]:
    """Sites with `n` training patients each (and as many held out): only sizes matter here."""
    out = {}
    for name, n in sizes.items():
        split = np.array(["train"] * n + ["test"] * n)
        out[name] = SiteData(np.array([f"{name}{i}" for i in range(2 * n)]), split, np.zeros(2 * n, np.float32),
                             np.zeros((2 * n, 16), np.float32), None, pd.DataFrame({"age": [70.0] * (2 * n)}))
    return out


SIZES = {"leiden": 139, "seoul": 107, "zurich": 77, "porto": 70, "leiden2": 127}  # consortium seed 7's training splits


def test_kyphoplasty_scenario_loads_round_trips_and_sets_epsilon_not_noise(tmp_path: Path) -> None:
    scenario = load("kyphoplasty")
    assert load_scenario(packaged_scenario("kyphoplasty")) == scenario
    write_scenario(tmp_path / "scenario.toml", scenario)
    assert load_scenario(tmp_path / "scenario.toml") == scenario
    run = scenario.run
    assert (run.task, scenario.consortium.sites, run.min_sites) == ("rbp_tabular", 5, 5)
    assert run.dp and run.secagg and run.target_epsilon > 0
    assert run.target_epsilon <= float(scenario.policy["epsilon_per_run"])


def test_at_a_target_epsilon_every_site_and_the_pooled_baseline_spend_the_same_epsilon() -> None:
    run = load("kyphoplasty").run
    pooled = baselines.pooled_privacy(run, _sites(SIZES))
    assert pooled is not None and pooled["patients"] == sum(SIZES.values())
    assert pooled["epsilon"] == pytest.approx(run.target_epsilon, abs=0.02)
    for n in SIZES.values():
        plan = plan_round(run, n)
        spent = epsilon([(plan.noise_multiplier, plan.round_spend.sample_rate, plan.round_spend.steps * run.rounds)],
                        plan.delta)
        assert spent == pytest.approx(run.target_epsilon, abs=0.02)
        assert plan.noise_multiplier > pooled["noise_multiplier"]  # a small site needs more noise for the same epsilon


def test_at_a_fixed_noise_multiplier_the_pooled_baseline_spends_less_than_any_site() -> None:
    run = replace(load("kyphoplasty").run, **BEFORE)
    pooled = baselines.pooled_privacy(run, _sites(SIZES))
    assert pooled is not None and pooled["noise_multiplier"] == 1.0
    for n in SIZES.values():
        plan = plan_round(run, n)
        site = epsilon([(1.0, plan.round_spend.sample_rate, plan.round_spend.steps * run.rounds)], plan.delta)
        assert pooled["epsilon"] < site
    assert baselines.pooled_privacy(replace(run, dp=False), _sites(SIZES)) is None


def test_benchmark_arms_change_only_what_they_say() -> None:
    base = load("kyphoplasty")
    after = arm_scenario(base, "after", 2)
    assert after.run == replace(base.run, seed=2)
    before = arm_scenario(base, "before", 0)
    assert (before.run.rounds, before.run.local_epochs, before.run.learning_rate, before.run.noise_multiplier,
            before.run.target_epsilon) == (10, 1, 0.3, 1.0, 0.0)
    try:
        logistic = arm_scenario(base, "logistic", 0)  # registers the changed definition in this process
        assert logistic.run.task == "rbp_tabular" and logistic.run.task_spec.model.name == "logistic"
        assert logistic.run.task_spec.features == base.run.task_spec.features
        assert logistic.site_policy("leiden")["allowed_tasks"][-1] == f"rbp_tabular@{logistic.run.task_sha256}"
    finally:
        use_task(TASKS["rbp_tabular"])  # later tests get the shipped definition back
    assert get_task("rbp_tabular") == TASKS["rbp_tabular"]
    with pytest.raises(ValueError, match="unknown arm"):
        arm_scenario(base, "nope", 0)
