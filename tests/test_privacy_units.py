"""Privacy building blocks: accounting vs Google's dp-accounting, ledgers, policy rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from privacy_reference import independent_epsilon
from typer.testing import CliRunner

from spine_fl.cli import app
from spine_fl.client.privacy.egress_ledger import KEY_FILE, EgressLedger, verify
from spine_fl.client.privacy.policy import SitePolicy, rule_violations
from spine_fl.client.privacy.privacy_ledger import PrivacyLedger, PrivacyLedgerError, SpendRecord
from spine_fl.shared.config import RunSettings
from spine_fl.shared.training.accounting import epsilon


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("noise,rate,steps", [(1.0, 0.2, 50), (0.8, 0.25, 40), (1.5, 0.1, 300)])
def test_epsilon_matches_dp_accounting_within_2_percent(accountant: str, noise: float, rate: float, steps: int) -> None:
    ours = epsilon([(noise, rate, steps)], 1e-3, accountant)
    theirs = independent_epsilon(noise, rate, steps, 1e-3, accountant)
    assert ours == pytest.approx(theirs, rel=0.02)


def test_rounds_compose_like_one_long_run() -> None:
    per_round = [(1.0, 0.2, 5)] * 12
    assert epsilon(per_round, 1e-3) == pytest.approx(epsilon([(1.0, 0.2, 60)], 1e-3), rel=1e-9)
    assert epsilon(per_round, 1e-3) > epsilon(per_round[:6], 1e-3)


def test_a_composition_is_immutable_and_refuses_an_unknown_accountant() -> None:
    """A running budget shares compositions between ledger heads: adding a round must never change the
    one it was added to, an entry without steps spends nothing, and no accountant name silently falls
    back to another accountant."""
    import numpy as np

    from spine_fl.shared.training.accounting import EMPTY, compose

    before = compose([(1.0, 0.2, 5)])
    curve = before.rdp.copy()
    after = before.then(1.0, 0.2, 5)
    assert (before.rdp == curve).all() and before.steps == 5 and after.steps == 10
    assert after.mechanisms == ((1.0, 0.2, 10),)
    with pytest.raises(ValueError):
        before.rdp[0] = 0.0  # read-only: shared, never edited in place
    assert before.then(3.0, 0.5, 0) is before and EMPTY.epsilon(1e-5) == 0.0
    assert np.isfinite(after.epsilon(1e-5))
    with pytest.raises(ValueError, match="unknown accountant 'gdp'"):
        after.epsilon(1e-5, "gdp")


def test_privacy_ledger_survives_new_processes_and_refuses_corruption(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, "abc")
    ledger.append(SpendRecord("run1", 1, 1.0, 0.2, 5, 1.0, 1e-3, "rdp"))
    ledger.append(SpendRecord("run2", 1, 1.0, 0.2, 5, 1.0, 1e-3, "rdp"))
    reopened = PrivacyLedger(tmp_path, "abc")  # what a restarted process sees
    assert reopened.history() == [(1.0, 0.2, 5), (1.0, 0.2, 5)]
    assert reopened.epsilon(1e-3, "rdp", "run2") < reopened.epsilon(1e-3, "rdp")
    with reopened.path.open("a") as handle:
        handle.write("{not json\n")
    with pytest.raises(PrivacyLedgerError, match="does not verify at line 3: not a signed ledger line"):
        reopened.epsilon(1e-3, "rdp")


def _ledger_with_lines(state: Path, n: int = 5) -> EgressLedger:
    ledger = EgressLedger(state)
    for i in range(n):
        ledger.append({"kind": "train", "round": i, "metrics": {"auroc": 0.5 + i / 100}, "arrays": []})
    return ledger


def test_site_key_is_private_and_ledger_verifies(tmp_path: Path) -> None:
    _ledger_with_lines(tmp_path)
    assert oct((tmp_path / KEY_FILE).stat().st_mode & 0o777) == "0o600"
    result = verify(tmp_path)
    assert result.ok and result.lines == 5


def _rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("tamper,line", [("edit", 3), ("delete", 3), ("swap", 2), ("insert", 3), ("truncate", 5)])
def test_any_tampering_is_detected_and_named(tmp_path: Path, tamper: str, line: int) -> None:
    ledger = _ledger_with_lines(tmp_path)
    lines = ledger.path.read_bytes().splitlines()
    if tamper == "edit":
        lines[2] = lines[2].replace(b'"auroc":0.52', b'"auroc":0.92')
    elif tamper == "delete":
        del lines[2]
    elif tamper == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    elif tamper == "insert":
        lines.insert(2, lines[0])
    elif tamper == "truncate":
        lines = lines[:4]
    _rewrite(ledger.path, lines)
    result = verify(tmp_path)
    assert not result.ok
    assert result.first_broken_line == line
    cli = CliRunner().invoke(app, ["ledger", "verify", "--site", "x", "--state-dir", str(tmp_path)])
    assert cli.exit_code == 1 and f"line {line}" in cli.output


def test_one_flipped_byte_is_caught(tmp_path: Path) -> None:
    ledger = _ledger_with_lines(tmp_path)
    data = bytearray(ledger.path.read_bytes())
    target = data.index(b'"round":3') + 8
    data[target] = ord("4")
    ledger.path.write_bytes(bytes(data))
    assert verify(tmp_path).first_broken_line == 4


def test_policy_rules_name_the_violated_rule() -> None:
    policy = SitePolicy(min_noise_multiplier=1.0, allowed_tasks=("tfesi_mri",), max_rounds=5)
    run = RunSettings(task="rbp_tabular", noise_multiplier=0.5, rounds=10)
    rules = {r.rule for r in rule_violations(policy, run, secagg_in_use=False)}
    assert rules == {"allowed_tasks", "min_noise_multiplier", "require_secagg", "max_rounds"}
    assert rule_violations(SitePolicy(), RunSettings(), secagg_in_use=True) == []
    assert [r.rule for r in rule_violations(SitePolicy(), RunSettings(dp=False), True)] == ["require_dp"]


def test_target_epsilon_sets_each_sites_noise_for_the_whole_run() -> None:
    from spine_fl.client.privacy.plan import plan_round

    run = RunSettings(task="rbp_tabular", target_epsilon=4.0, rounds=5, local_epochs=2, batch_size=16)
    small, large = plan_round(run, 60), plan_round(run, 200)
    assert small.noise_multiplier > large.noise_multiplier  # a smaller site needs more noise
    for plan in (small, large):
        spend = plan.round_spend
        whole_run = epsilon([(plan.noise_multiplier, spend.sample_rate, spend.steps * run.rounds)], plan.delta)
        assert whole_run == pytest.approx(4.0, abs=0.05)
        assert plan.delta < 1 / 60


def test_a_round_is_assessed_once_and_agrees_with_a_full_recomputation(tmp_path: Path) -> None:
    """The policy mod's assessment is what the train reply reports: it must equal epsilon recomputed
    from the whole ledger after the round; and it is handed to this round only, once."""
    from flwr.app import Context, RecordDict

    from spine_fl.client.privacy.privacy_ledger import dataset_id
    from spine_fl.client.privacy.round_checks import budget_refusal
    from spine_fl.client.privacy.round_privacy import assess_round, hand_over, take
    from spine_fl.client.site_config import Site

    data = tmp_path / "data"
    data.mkdir()
    (data / "clinical.csv").write_text("patient_id\np1\n")
    site = Site("leiden", data, tmp_path / "state", SitePolicy(epsilon_per_run=100.0, epsilon_lifetime=100.0))
    run = RunSettings(task="rbp_tabular", rounds=5, local_epochs=2, batch_size=16)
    ledger = PrivacyLedger(site.state_dir, dataset_id(data))
    for key, rnd in (("a" * 32, 1), ("b" * 32, 1), ("b" * 32, 2)):
        ledger.append(SpendRecord(key, rnd, 1.0, 0.25, 8, 1.0, 1e-3, "rdp"))

    assessed = assess_round(site, run, "b" * 32, 3, n_train=64)
    spend = assessed.plan.round_spend
    ledger.append(SpendRecord("b" * 32, 3, spend.noise_multiplier, spend.sample_rate, spend.steps, 1.0,
                              assessed.plan.delta, "rdp"))
    delta = assessed.plan.delta
    # recomputed from the ledger's records, not read from the running budget the assessment used
    assert assessed.epsilon_run_after == epsilon(ledger.history("b" * 32), delta, "rdp")
    assert assessed.epsilon_lifetime_after == epsilon(ledger.history(), delta, "rdp")
    assert assessed.steps_run_after == 16 + spend.steps

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    hand_over(context, assessed)
    assert take(context, "b" * 32, 4) is None  # another round's assessment is never used
    hand_over(context, assessed)
    assert take(context, "b" * 32, 3) == assessed and take(context, "b" * 32, 3) is None  # used once

    tight = Site(site.name, data, site.state_dir, SitePolicy(epsilon_per_run=100.0,
                                                              epsilon_lifetime=assessed.epsilon_lifetime_after - 0.01))
    refusal = budget_refusal(tight, run, assessed)
    assert refusal is not None and refusal.rule == "epsilon_lifetime"
    assert refusal.epsilon_after == pytest.approx(assessed.epsilon_lifetime_after, abs=1e-6)
    assert budget_refusal(site, run, assessed) is None


def test_max_missing_image_share_is_parsed_and_range_checked() -> None:
    from spine_fl.client.site_config import policy_from_table
    from spine_fl.shared.config import ConfigError

    assert SitePolicy().max_missing_image_share == 1.0  # default: exclude with a warning, whatever the share
    assert policy_from_table({"max_missing_image_share": 0.2}, "p").max_missing_image_share == 0.2
    assert policy_from_table({"max_missing_image_share": 0}, "p").max_missing_image_share == 0.0
    with pytest.raises(ConfigError, match=r"leiden.toml \[policy\] max_missing_image_share = 2: must be a number "
                                          r"from 0 to 1; set max_missing_image_share to"):
        policy_from_table({"max_missing_image_share": 2}, "leiden.toml [policy]")
    with pytest.raises(ConfigError, match=r'max_missing_image_share = "20%": expected a number'):
        policy_from_table({"max_missing_image_share": "20%"}, "leiden.toml [policy]")
    with pytest.raises(ConfigError, match="max_missing_image_share"):
        SitePolicy(max_missing_image_share=-0.5)
