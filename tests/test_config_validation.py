"""One typed validation path for every settings table: [run], [consortium], [simulation], a site's
[policy] and the federation file. Each wrong value is a ConfigError naming the file and section,
the key, the value as written, the type expected and how to write it."""

from __future__ import annotations

import dataclasses
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from spine_fl.client.site_config import load_site_config, policy_from_table
from spine_fl.server.deployment.enrolment import enrol_public_key
from spine_fl.server.deployment.federation_config import load_federation
from spine_fl.shared.config import (
    ConfigError,
    RunSettings,
    Scenario,
    SimulationSettings,
    load_scenario,
    typed_from_table,
)
from spine_fl.shared.runtime.credentials import create_site_keys
from spine_fl.simulations.runner import load, packaged_scenario, write_scenario

ROOT = Path(__file__).resolve().parent.parent
BASE = 'name = "t"\n[consortium]\nsource = "synthetic"\nsites = 3\nseed = 7\n'


def _scenario(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(BASE + body)
    return path


def _error(tmp_path: Path, body: str) -> str:
    path = _scenario(tmp_path, body)
    with pytest.raises(ConfigError) as caught:
        load_scenario(path)
    return str(caught.value)


def test_a_quoted_boolean_is_refused_with_the_line_to_fix(tmp_path: Path) -> None:
    path = _scenario(tmp_path, '[run]\ndp = "false"\n')
    with pytest.raises(ConfigError) as caught:
        load_scenario(path)
    assert str(caught.value) == f'{path} [run] dp = "false": expected true or false (a TOML boolean, without quotes)'
    assert "expected true or false" in _error(tmp_path, "[run]\nsecagg = 1\n")


@pytest.mark.parametrize("value", ['"3"', "3.5", "3.0", "true"])
def test_a_count_must_be_a_whole_number(tmp_path: Path, value: str) -> None:
    message = _error(tmp_path, f"[run]\nrounds = {value}\n")
    assert message == (f"{tmp_path / 'scenario.toml'} [run] rounds = {value}: expected a whole number "
                       "(a TOML integer such as 3, without quotes or decimal point)")


@pytest.mark.parametrize("value", ['"0.3"', "true"])
def test_a_rate_must_be_a_number(tmp_path: Path, value: str) -> None:
    message = _error(tmp_path, f"[run]\nlearning_rate = {value}\n")
    assert message.endswith(f"[run] learning_rate = {value}: expected a number "
                            "(a TOML float or integer such as 0.5, without quotes)")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_number_must_be_finite(tmp_path: Path, value: str) -> None:
    message = _error(tmp_path, f"[run]\nnoise_multiplier = {value}\n")
    assert message.endswith(f"[run] noise_multiplier = {value}: expected a finite number "
                            "(nan and inf cannot be used here)")


def test_whole_numbers_are_accepted_where_a_number_is_expected(tmp_path: Path) -> None:
    scenario = load_scenario(_scenario(tmp_path, "[run]\nlearning_rate = 1\n[simulation]\ncpus_per_site = 2\n"))
    assert scenario.run.learning_rate == 1.0 and isinstance(scenario.run.learning_rate, float)
    assert scenario.cpus_per_site == 2.0 and isinstance(scenario.cpus_per_site, float)


def test_text_must_be_quoted_text(tmp_path: Path) -> None:
    message = _error(tmp_path, "[run]\nstrategy = 3\n")
    assert message.endswith('[run] strategy = 3: expected text (a TOML string in double quotes, such as "name")')
    path = tmp_path / "named.toml"
    path.write_text("name = 3\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path} name = 3: expected text")):
        load_scenario(path)


def test_unknown_keys_get_the_closest_allowed_one(tmp_path: Path) -> None:
    message = _error(tmp_path, "[run]\nepochs = 3\n")
    assert "[run]: unknown setting(s) epochs (did you mean local_epochs?); allowed: accountant," in message
    message = _error(tmp_path, "[run]\nnoise_multiplyer = 1.0\nfoo = 1\n")
    assert "unknown setting(s) noise_multiplyer (did you mean noise_multiplier?), foo; allowed:" in message
    path = tmp_path / "sections.toml"
    path.write_text(BASE + "[simulaton]\ncpus_per_site = 1\n")
    with pytest.raises(ConfigError, match=re.escape("unknown section(s) simulaton (did you mean simulation?)")):
        load_scenario(path)


def test_a_section_must_be_a_table(tmp_path: Path) -> None:
    path = tmp_path / "flat.toml"
    path.write_text("run = 3\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path} [run]: expected a table")):
        load_scenario(path)


def test_simulation_table_is_validated_like_the_others(tmp_path: Path) -> None:
    scenario = load_scenario(_scenario(tmp_path, '[simulation]\ncpus_per_site = 0.5\nstate_dir = "ledgers"\n'))
    assert scenario.simulation == SimulationSettings(0.5, "ledgers")
    assert (scenario.cpus_per_site, scenario.state_dir) == (0.5, "ledgers")
    assert load_scenario(_scenario(tmp_path, "")).simulation == SimulationSettings(1.0, None)
    assert _error(tmp_path, "[simulation]\ncpus_per_site = 0\n").endswith(
        "[simulation]: cpus_per_site must be > 0 (e.g. 1 or 0.5), got 0.0")
    assert _error(tmp_path, '[simulation]\ncpus_per_site = "2"\n').endswith(
        '[simulation] cpus_per_site = "2": expected a number (a TOML float or integer such as 0.5, without quotes)')
    assert _error(tmp_path, "[simulation]\nstate_dir = 5\n").endswith(
        '[simulation] state_dir = 5: expected text (a TOML string in double quotes, such as "name")')
    assert "did you mean cpus_per_site?" in _error(tmp_path, "[simulation]\ncpu_per_site = 2\n")
    with pytest.raises(ConfigError, match="cpus_per_site must be > 0"):
        Scenario("x", load("default").consortium, RunSettings(), cpus_per_site=-1.0)


def test_range_checks_still_name_the_section(tmp_path: Path) -> None:
    assert _error(tmp_path, "[run]\nrounds = 0\n").endswith("[run]: rounds must be at least 1, got 0")
    path = tmp_path / "source.toml"
    path.write_text('[consortium]\nsource = "pooled"\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path} [consortium]: consortium.source 'pooled' unknown")):
        load_scenario(path)


def test_site_policy_values_are_typed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        policy_from_table({"require_dp": "yes"}, "leiden.toml [policy]")
    assert str(caught.value) == 'leiden.toml [policy] require_dp = "yes": expected true or false ' \
                                "(a TOML boolean, without quotes)"
    with pytest.raises(ConfigError, match=re.escape(
            'allowed_tasks = "rbp_tabular": expected a list of text values (a TOML array of strings such as')):
        policy_from_table({"allowed_tasks": "rbp_tabular"}, "leiden.toml [policy]")
    with pytest.raises(ConfigError, match=re.escape(
            'allowed_tasks = ["rbp_tabular", 3]: expected a list of text values '
            '(a TOML array of strings such as ["a", "b"]); item 2 is 3')):
        policy_from_table({"allowed_tasks": ["rbp_tabular", 3]}, "leiden.toml [policy]")
    with pytest.raises(ConfigError, match=re.escape("max_rounds = 1.5: expected a whole number")):
        policy_from_table({"max_rounds": 1.5}, "leiden.toml [policy]")
    policy = policy_from_table({"allowed_tasks": ["rbp_tabular"], "epsilon_per_run": 3}, "leiden.toml [policy]")
    assert policy.allowed_tasks == ("rbp_tabular",) and policy.epsilon_per_run == 3.0
    with pytest.raises(ConfigError, match=re.escape("unknown setting(s) epsilon_per_round (did you mean "
                                                    "epsilon_per_run?)")):
        policy_from_table({"epsilon_per_round": 3.0}, "leiden.toml [policy]")


def test_site_config_file_policy_goes_through_the_same_path(tmp_path: Path) -> None:
    shutil.copy(ROOT / "configs" / "sites" / "leiden.toml", tmp_path / "leiden.toml")
    assert load_site_config(tmp_path / "leiden.toml").policy.require_dp is True
    path = tmp_path / "leiden.toml"
    path.write_text(path.read_text().replace("require_dp = true", 'require_dp = "true"'))
    with pytest.raises(ConfigError, match=re.escape(f'{path} [policy] require_dp = "true": expected true or false')):
        load_site_config(path)


def _federation(tmp_path: Path, run: str = "min_sites = 1", federation: str | None = None,
                sites: str = '[sites.a]\npublic_key = "a.pub"\n') -> Path:
    path = tmp_path / "federation.toml"
    path.write_text((federation or '[federation]\naddress = "127.0.0.1:9092"\nstate_dir = "s"\nout_dir = "o"\n'
                                   'ca_certificate = "ca.crt"\ncertificate = "s.crt"\nprivate_key = "s.key"\n')
                    + f"[run]\n{run}\n" + sites)
    return path


def test_federation_file_tables_are_typed(tmp_path: Path) -> None:
    assert load_federation(_federation(tmp_path)).sites == {"a": tmp_path / "a.pub"}
    with pytest.raises(ConfigError, match=re.escape('[run] dp = "false": expected true or false')):
        load_federation(_federation(tmp_path, run='min_sites = 1\ndp = "false"'))
    with pytest.raises(ConfigError, match=re.escape("[federation] address = 9092: expected text")):
        load_federation(_federation(tmp_path, federation='[federation]\naddress = 9092\nstate_dir = "s"\n'
                                    'out_dir = "o"\nca_certificate = "c"\ncertificate = "c"\nprivate_key = "k"\n'))
    with pytest.raises(ConfigError, match=re.escape("[federation]: missing setting(s) out_dir, ca_certificate")):
        load_federation(_federation(tmp_path, federation='[federation]\naddress = "h:1"\nstate_dir = "s"\n'
                                    'certificate = "c"\nprivate_key = "k"\n'))
    with pytest.raises(ConfigError, match=re.escape("[federation]: unknown setting(s) adress (did you mean address?)")):
        load_federation(_federation(tmp_path, federation='[federation]\nadress = "h:1"\n'))
    with pytest.raises(ConfigError, match=re.escape("[sites.a] public_key = 3: expected text")):
        load_federation(_federation(tmp_path, sites="[sites.a]\npublic_key = 3\n"))
    with pytest.raises(ConfigError, match=re.escape("[sites.a]: unknown setting(s) public_kye (did you mean "
                                                    "public_key?)")):
        load_federation(_federation(tmp_path, sites='[sites.a]\npublic_kye = "a.pub"\n'))


def test_the_shipped_federation_file_validates_once_sites_are_enrolled(tmp_path: Path) -> None:
    fed = tmp_path / "configs" / "federation.toml"
    fed.parent.mkdir()
    shutil.copy(ROOT / "configs" / "federation.toml", fed)
    for site in ("leiden", "seoul", "zurich"):
        enrol_public_key(fed, site, create_site_keys(tmp_path / "credentials", site).public_key)
    config = load_federation(fed)
    assert set(config.sites) == {"leiden", "seoul", "zurich"} and config.run.min_sites == 3


@dataclass(frozen=True)
class _Shapes:
    names: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    label: str | None = None


def test_lists_tables_and_optional_values() -> None:
    shapes = typed_from_table(_Shapes, {"names": ["a", "b"], "extra": {"k": 1}, "label": "x"}, "f.toml [s]")
    assert shapes == _Shapes(["a", "b"], {"k": 1}, "x")
    with pytest.raises(ConfigError, match=re.escape("f.toml [s] names = [1]: expected a list of text values")):
        typed_from_table(_Shapes, {"names": [1]}, "f.toml [s]")
    with pytest.raises(ConfigError, match=re.escape('f.toml [s] extra = "k": expected a table')):
        typed_from_table(_Shapes, {"extra": "k"}, "f.toml [s]")
    with pytest.raises(ConfigError, match=re.escape("f.toml [s] label = false: expected text")):
        typed_from_table(_Shapes, {"label": False}, "f.toml [s]")


@pytest.mark.parametrize("name", ["default", "vertebral", "leaky"])
def test_packaged_scenarios_load_and_round_trip_through_write_scenario(name: str, tmp_path: Path) -> None:
    scenario = load(name)
    assert load_scenario(packaged_scenario(name)) == scenario
    write_scenario(tmp_path / "scenario.toml", scenario)
    text = (tmp_path / "scenario.toml").read_text()
    assert "state_dir" not in text  # unset: left out (TOML has no null)
    assert load_scenario(tmp_path / "scenario.toml") == scenario
    with_state = dataclasses.replace(scenario, state_dir=str(tmp_path / "ledgers"))
    write_scenario(tmp_path / "with_state.toml", with_state)
    assert load_scenario(tmp_path / "with_state.toml") == with_state
