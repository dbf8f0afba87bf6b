"""The running privacy budget (issue 14): each site composes its ledger once per line, and what it
enforces and reports is exactly what a full recomputation from the ledger (start-up, the audit) gives.

Attacks on the running budget through the ledger file are in tests/test_attacks_ledger.py.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from test_attacks_site import make_site, run_settings

from spine_fl.client.calibration import charge, histogram_spend
from spine_fl.client.privacy import privacy_ledger
from spine_fl.client.privacy.policy import SitePolicy
from spine_fl.client.privacy.privacy_ledger import PrivacyLedger, SpendRecord, as_history, dataset_id
from spine_fl.client.privacy.round_checks import decide_round
from spine_fl.client.site_config import Site
from spine_fl.shared import protocol
from spine_fl.shared.training import accounting
from spine_fl.shared.training import calibration as calibration_stats
from spine_fl.shared.training.accounting import compose, epsilon

# the recalibration releases: Gaussian mechanisms, sample rate 1, one step (client/calibration.py)
RELEASES = (histogram_spend(), histogram_spend(calibration_stats.LOCATE_NOISE_STD))


def _random_spend(rng: random.Random) -> tuple[float, float, int]:
    if rng.random() < 0.15:
        return rng.choice(RELEASES)
    return rng.choice((0.8, 1.1, 1.5, 2.5)), rng.choice((0.01, 0.05, 0.125)), rng.randint(1, 20)


def _recomputed(ledger: PrivacyLedger, run_key: str, delta: float, accountant: str) -> tuple[float, float]:
    """What the audit computes: epsilon from the ledger's records, composed from nothing."""
    records = ledger.records()
    return (epsilon(as_history(records, run_key), delta, accountant),
            epsilon(as_history(records), delta, accountant))


def test_the_running_budget_equals_a_full_recomputation_over_200_random_rounds(tmp_path: Path) -> None:
    rng = random.Random(14)  # test data, not DP noise
    ledger = PrivacyLedger(tmp_path, "d" * 32)
    runs = [f"{i:032x}" for i in range(6)]
    next_round = dict.fromkeys(runs, 1)
    for _ in range(200):
        run_key = rng.choice(runs)
        ledger.append(SpendRecord(run_key, next_round[run_key], *_random_spend(rng), 1.0, 1e-5, "rdp"))
        next_round[run_key] += 1
        spent = ledger.spent()  # the running budget: the new line added to what was composed before
        delta = 10 ** rng.uniform(-7, -3)
        running = (spent.run(run_key).epsilon(delta), spent.lifetime.epsilon(delta))
        full = _recomputed(ledger, run_key, delta, "rdp")
        assert running == pytest.approx(full, rel=1e-9, abs=0)
        assert running == full  # the same fold: not merely close
    history = as_history(ledger.records())
    assert spent.lines == 200 and spent.lifetime.steps == sum(steps for _, _, steps in history)
    opacus = RDPAccountant()  # Opacus' own accountant on the raw history: the same sum, the same epsilon
    opacus.history = list(history)
    assert spent.lifetime.epsilon(1e-5) == opacus.get_epsilon(1e-5)
    privacy_ledger._SPENT.clear()  # a new process: composed again from every line, to the same curve
    again = ledger.spent()
    assert again is not spent and (again.lifetime.rdp == spent.lifetime.rdp).all()
    assert {k: c.mechanisms for k, c in again.runs.items()} == {k: c.mechanisms for k, c in spent.runs.items()}


def test_with_prv_the_composition_is_the_recomputations_and_is_computed_once_per_question(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PRV does not compose by adding curves: the running budget keeps each mechanism's summed steps,
    the very history a recomputation hands Opacus' PRV accountant, and asks PRV once per composition."""
    ledger = PrivacyLedger(tmp_path, "p" * 32)
    lines = [("a" * 32, 1, 1.1, 0.125, 8), ("b" * 32, 1, 1.5, 0.05, 20), ("a" * 32, 2, 1.1, 0.125, 8),
             ("a" * 32, 3, *RELEASES[0]), ("b" * 32, 2, 1.5, 0.05, 20)]
    for run_key, rnd, sigma, rate, steps in lines:
        ledger.append(SpendRecord(run_key, rnd, sigma, rate, steps, 1.0, 1e-5, "prv"))
        spent = ledger.spent()
        assert spent.lifetime.mechanisms == compose(as_history(ledger.records())).mechanisms
        assert spent.run(run_key).mechanisms == compose(as_history(ledger.records(), run_key)).mechanisms

    calls = 0
    original = PRVAccountant.get_epsilon

    def counted(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PRVAccountant, "get_epsilon", counted)
    step = (1.1, 0.125, 8)
    asked = [ledger.spent().figures("a" * 32, step, 1e-5, "prv") for _ in range(2)]  # pre-flight, then the mod
    assert asked[0] == asked[1] and calls == 2  # the run's and the lifetime's, once each
    accounting._prv_epsilon.cache_clear()  # the audit's recomputation, from nothing
    records = ledger.records()
    assert asked[0].epsilon_run_after == epsilon([*as_history(records, "a" * 32), step], 1e-5, "prv")
    assert asked[0].epsilon_lifetime_after == epsilon([*as_history(records), step], 1e-5, "prv")
    assert calls == 4


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count entries folded into a composition (one RDP curve added each) and RDP -> epsilon conversions."""
    counts = {"folded": 0, "epsilon": 0}
    per_step, spent = accounting._rdp_per_step, rdp_analysis.get_privacy_spent

    def counted_step(*args):
        counts["folded"] += 1
        return per_step(*args)

    def counted_spent(*args, **kwargs):
        counts["epsilon"] += 1
        return spent(*args, **kwargs)

    monkeypatch.setattr(accounting, "_rdp_per_step", counted_step)
    monkeypatch.setattr(rdp_analysis, "get_privacy_spent", counted_spent)
    return counts


@pytest.mark.parametrize("earlier_lines", [20, 200])
def test_a_rounds_privacy_work_does_not_grow_with_the_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            earlier_lines: int) -> None:
    """One round: the pre-flight (with the coordinator's head), the site-policy mod's check, the charge.
    Whatever the ledger's length, the round composes its one new line and converts two epsilons
    (run, lifetime) once; a new process composes the whole ledger once, at its first check."""
    site = make_site(tmp_path, epsilon_per_run=1e6, epsilon_lifetime=1e9, max_rounds=10_000)
    run = run_settings(rounds=1_000)
    ledger = PrivacyLedger(site.state_dir, dataset_id(site.data_dir))
    for i in range(earlier_lines):
        ledger.append(SpendRecord(f"{i // 10:032x}", i % 10 + 1, 1.0 + i % 3 / 10, 0.125, 8, 1.0, 1e-4, "rdp"))
    run_key = "f" * 32

    def one_round(server_round: int) -> None:
        lines, sha = ledger.log.last()
        head = {protocol.LEDGER_DATASET: ledger.dataset, protocol.LEDGER_LINES: lines, protocol.LEDGER_SHA256: sha}
        for coordinator_head in (head, None):  # the pre-flight, then the site-policy mod before training
            decision = decide_round(site, run, run_key, server_round, True, True, coordinator_head)
            assert decision.refusal is None and decision.assessed is not None
        spend = decision.assessed.plan.round_spend
        ledger.append(SpendRecord(run_key, server_round, spend.noise_multiplier, spend.sample_rate, spend.steps,
                                  1.0, decision.assessed.plan.delta, run.accountant))

    privacy_ledger._SPENT.clear()  # a new process
    counts = _counting(monkeypatch)
    one_round(1)
    # start-up: every line into the lifetime and its run's composition, once; the planned round onto both
    assert counts == {"folded": 2 * earlier_lines + 2, "epsilon": 2}
    for server_round in (2, 3):
        counts.update(folded=0, epsilon=0)
        one_round(server_round)
        # the new line into the lifetime and the run (2), the planned round onto both (2); two conversions
        assert counts == {"folded": 4, "epsilon": 2}


def test_the_recalibration_charge_reports_what_the_ledger_recomputes(tmp_path: Path) -> None:
    """client/calibration.charge is assessed by the training round's own functions: its report is the
    full recomputation after its line; over budget it refuses with its own message; the DP-SGD-only
    rule min_noise_multiplier does not apply to the histogram (as before)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "clinical.csv").write_text("patient_id\np1\n")
    site = Site("leiden", data, tmp_path / "state", SitePolicy(epsilon_per_run=100.0, epsilon_lifetime=100.0,
                                                                min_noise_multiplier=50.0))
    run = run_settings()
    ledger = PrivacyLedger(site.state_dir, dataset_id(data))
    for rnd in (1, 2):
        ledger.append(SpendRecord("c" * 32, rnd, 1.0, 0.25, 8, 1.0, 1e-3, "rdp"))
    ledger.spent()  # the running budget is warm
    report = charge(site, run, "c" * 32, 3, n_train=64, noise_std=calibration_stats.LOCATE_NOISE_STD)
    run_eps, life_eps = _recomputed(ledger, "c" * 32, report[protocol.DELTA], "rdp")
    assert (report[protocol.EPSILON_RUN], report[protocol.EPSILON_LIFETIME]) == (run_eps, life_eps)
    assert report[protocol.STEPS_RUN] == 17 and ledger.records()[-1].noise_multiplier == RELEASES[1][0]
    tight = Site("leiden", data, site.state_dir, SitePolicy(epsilon_per_run=100.0, epsilon_lifetime=life_eps))
    from spine_fl.client.calibration import CalibrationRefused

    with pytest.raises(CalibrationRefused, match=r"would raise epsilon to \d+\.\d{3}, over the epsilon lifetime "
                                                 r"budget"):
        charge(tight, run, "c" * 32, 4, n_train=64)
