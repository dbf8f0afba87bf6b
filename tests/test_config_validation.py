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
        "[simulation] cpus_per_site = 0: must be a finite number above 0; set cpus_per_site to the CPU cores "
        "each virtual site may use, e.g. 1 or 0.5")
    assert _error(tmp_path, '[simulation]\ncpus_per_site = "2"\n').endswith(
        '[simulation] cpus_per_site = "2": expected a number (a TOML float or integer such as 0.5, without quotes)')
    assert _error(tmp_path, "[simulation]\nstate_dir = 5\n").endswith(
        '[simulation] state_dir = 5: expected text (a TOML string in double quotes, such as "name")')
    assert "did you mean cpus_per_site?" in _error(tmp_path, "[simulation]\ncpu_per_site = 2\n")
    with pytest.raises(ConfigError, match=re.escape("[simulation] cpus_per_site = -1.0: must be a finite number")):
        Scenario("x", load("default").consortium, RunSettings(), cpus_per_site=-1.0)


def test_range_checks_still_name_the_section(tmp_path: Path) -> None:
    assert _error(tmp_path, "[run]\nrounds = 0\n").endswith(
        "[run] rounds = 0: must be at least 1; set rounds to the number of federated rounds, e.g. 10")
    path = tmp_path / "source.toml"
    path.write_text('[consortium]\nsource = "pooled"\n')
    with pytest.raises(ConfigError, match=re.escape(f'{path} [consortium] source = "pooled": unknown consortium '
                                                    "source; choose one of synthetic, vertebral_column, folders")):
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


# -- every problem of a file, together, each with file, key, value and what to do -------------------------

def _problems(tmp_path: Path, body: str, base: str = BASE) -> list[str]:
    """The lines of the one ConfigError that `load` (the CLI's path: policies and site names too) raises."""
    path = tmp_path / "scenario.toml"
    path.write_text(base + body)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def _line(lines: list[str], start: str) -> str:
    found = [line for line in lines if line.startswith(start)]
    assert len(found) == 1, (start, lines)
    return found[0]


@pytest.mark.parametrize(("key", "advice"), [
    ("rounds", "set rounds to the number of federated rounds, e.g. 10"),
    ("local_epochs", "set local_epochs to the passes over its data each site makes per round, e.g. 1"),
    ("batch_size", "set batch_size to the patients per training step, e.g. 32"),
    ("min_sites", "set min_sites to the number of sites every round needs, e.g. 2"),
    ("image_size", "set image_size to the model's input size in pixels, e.g. 64"),
])
def test_a_count_below_one_names_file_key_value_and_advice(tmp_path: Path, key: str, advice: str) -> None:
    (line,) = _problems(tmp_path, f"[run]\n{key} = 0\n")
    assert line == f"{tmp_path / 'scenario.toml'} [run] {key} = 0: must be at least 1; {advice}"


def test_min_sites_above_the_consortium_is_an_error_naming_both_numbers(tmp_path: Path) -> None:
    (line,) = _problems(tmp_path, "[run]\nmin_sites = 5\n")  # the consortium of BASE has 3 sites
    assert line == (f"{tmp_path / 'scenario.toml'} [run] min_sites = 5: more than the consortium's 3 site(s) "
                    "([consortium] sites = 3), so no round could ever start; set min_sites to 3 or fewer, or "
                    "[consortium] sites to 5 or more")
    # also when the sections have other problems: every one is found in one pass
    lines = _problems(tmp_path, "[run]\nmin_sites = 5\nrounds = 0\n")
    assert len(lines) == 2 and "min_sites = 5: more than" in _line(lines, f"{tmp_path / 'scenario.toml'} [run] min")
    with pytest.raises(ConfigError, match=re.escape("[run] min_sites = 4: more than the consortium's 3 site(s)")):
        Scenario("x", load("default").consortium, RunSettings(min_sites=4))


def test_dp_without_noise_or_target_epsilon_is_refused(tmp_path: Path) -> None:
    (line,) = _problems(tmp_path, "[run]\ndp = true\nnoise_multiplier = 0.0\n")
    assert line.endswith("[run] noise_multiplier = 0.0: must be above 0 with dp = true and no target_epsilon; "
                         "set noise_multiplier, e.g. 1.0, or target_epsilon > 0 to let each site derive its own")
    load_scenario(_scenario(tmp_path, "[run]\ndp = true\nnoise_multiplier = 0.0\ntarget_epsilon = 8.0\n"))
    load_scenario(_scenario(tmp_path, "[run]\ndp = false\nnoise_multiplier = 0.0\n"))
    (line,) = _problems(tmp_path, "[run]\ntarget_epsilon = -1.0\n")
    assert "[run] target_epsilon = -1.0: must be 0 (unset) or above 0; set target_epsilon to" in line


@pytest.mark.parametrize("value", ["0", "-0.1", "nan", "inf"])
def test_a_learning_rate_must_be_finite_and_positive(tmp_path: Path, value: str) -> None:
    (line,) = _problems(tmp_path, f"[run]\nlearning_rate = {value}\n")
    assert line.startswith(f"{tmp_path / 'scenario.toml'} [run] learning_rate = {value}: ")
    if value in ("nan", "inf"):  # refused by the type check already: nan and inf are no numbers to train with
        assert line.endswith("expected a finite number (nan and inf cannot be used here)")
    else:
        assert line.endswith("must be a finite number above 0; set learning_rate to the local step size, "
                             "e.g. 0.3 with sgd or 0.003 with adam")
    with pytest.raises(ConfigError, match=re.escape("learning_rate = nan: must be a finite number above 0; set")):
        RunSettings(learning_rate=float("nan"))  # the run config a ServerApp receives is checked too


@pytest.mark.parametrize("value", ["1", "1.5", "-0.001"])
def test_delta_must_be_below_one_and_not_negative(tmp_path: Path, value: str) -> None:
    (line,) = _problems(tmp_path, f"[run]\ndelta = {value}\n")
    assert line == (f"{tmp_path / 'scenario.toml'} [run] delta = {value}: must be at least 0 and below 1; "
                    "set delta = 0 to let each site use 1 / (10 n), or a small value such as 1e-5")


@pytest.mark.parametrize("key", ["epsilon_per_run", "epsilon_lifetime"])
def test_an_epsilon_budget_must_be_positive(tmp_path: Path, key: str) -> None:
    (line,) = _problems(tmp_path, f"[policy]\n{key} = 0\n")
    assert line.startswith(f"{tmp_path / 'scenario.toml'} [policy] {key} = 0: must be a finite number above 0; "
                           f"set {key} to the privacy budget")
    with pytest.raises(ConfigError, match=re.escape(f"leiden.toml [policy] {key} = -2.0: must be a finite number")):
        policy_from_table({key: -2.0}, "leiden.toml [policy]")


@pytest.mark.parametrize("value", ["0.0", "1.0", "2", "-0.001"])
def test_max_delta_must_lie_between_zero_and_one(tmp_path: Path, value: str) -> None:
    (line,) = _problems(tmp_path, f"[policy]\nmax_delta = {value}\n")
    assert line == (f"{tmp_path / 'scenario.toml'} [policy] max_delta = {value}: must be above 0 and below 1; set "
                    "max_delta to the largest delta this site trains at, e.g. 1e-5, or leave it out to use 1 / (10 n)")


def test_min_image_size_is_what_the_image_model_needs() -> None:
    import torch

    from spine_fl.shared.config import MIN_IMAGE_SIZE
    from spine_fl.shared.contract.tasks import get_task
    from spine_fl.shared.models.registry import build_model

    task = get_task("tfesi_radiograph")
    model = build_model(task).eval()
    features = torch.zeros(2, task.n_features)
    assert model(torch.zeros(2, 4, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE), features).shape == (2,)
    with pytest.raises(RuntimeError):
        model(torch.zeros(2, 4, MIN_IMAGE_SIZE - 1, MIN_IMAGE_SIZE - 1), features)


def test_an_image_size_too_small_for_the_model_is_refused(tmp_path: Path) -> None:
    (line,) = _problems(tmp_path, '[run]\ntask = "tfesi_mri"\nimage_size = 7\n')
    assert line == (f"{tmp_path / 'scenario.toml'} [run] image_size = 7: too small for the tfesi_mri model (its CNN "
                    "halves the image three times and needs at least 8 pixels); set image_size to 8 or more, e.g. 64")
    load(_scenario(tmp_path, '[run]\ntask = "tfesi_mri"\nimage_size = 8\n'))
    load(_scenario(tmp_path, '[run]\ntask = "rbp_tabular"\nimage_size = 4\n'))  # no images: no minimum


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_cpus_per_site_must_be_positive_and_finite(tmp_path: Path, value: str) -> None:
    (line,) = _problems(tmp_path, f"[simulation]\ncpus_per_site = {value}\n")
    assert line.startswith(f"{tmp_path / 'scenario.toml'} [simulation] cpus_per_site = {value}: ")
    assert line.endswith("expected a finite number (nan and inf cannot be used here)" if value == "nan" else
                         "must be a finite number above 0; set cpus_per_site to the CPU cores each virtual site "
                         "may use, e.g. 1 or 0.5")


def test_a_policy_for_a_site_not_in_the_consortium_is_refused(tmp_path: Path) -> None:
    (line,) = _problems(tmp_path, "[policy.lieden]\nmax_rounds = 3\n")
    assert line == (f"{tmp_path / 'scenario.toml'} [policy.lieden]: no site lieden in this consortium (its sites: "
                    "leiden, seoul, zurich); rename the table to one of them or remove it")
    vertebral = 'name = "v"\n[consortium]\nsource = "vertebral_column"\nsites = 2\n[run]\ntask = "vertebral_column"\n'
    (line,) = _problems(tmp_path, "[policy.leiden]\nmax_rounds = 3\n", base=vertebral)
    assert "no site leiden in this consortium (its sites: vc_site1, vc_site2)" in line
    scenario = load(_scenario(tmp_path, "[policy.seoul]\nmax_rounds = 3\n"))
    assert scenario.site_policy("seoul")["max_rounds"] == 3


def test_the_site_names_checked_are_the_names_the_consortium_gets(tmp_path: Path) -> None:
    from spine_fl.shared.config import ConsortiumSettings
    from spine_fl.simulations.runner import consortium_site_names
    from spine_fl.simulations.synthetic.vertebral_column import write_sites

    written = [p.name for p in write_sites(tmp_path, 4, 7)]
    assert consortium_site_names(ConsortiumSettings("vertebral_column", 4)) == written
    assert consortium_site_names(ConsortiumSettings("synthetic", 5))[:3] == ["leiden", "seoul", "zurich"]


@pytest.mark.parametrize("name", ["../etc", "a/b", "a\\\\b", ".hidden", ""])
def test_a_policy_table_named_like_a_path_is_refused(tmp_path: Path, name: str) -> None:
    (line,) = _problems(tmp_path, f'[policy."{name}"]\nmax_rounds = 3\n')
    assert line.startswith(f"{tmp_path / 'scenario.toml'} [policy.\"")
    assert line.endswith("a site name, not a path: it cannot be empty, start with a dot or contain /, \\ or ..; "
                         "name the table after one of the consortium's sites, e.g. [policy.leiden]")


def test_a_policy_rule_of_one_site_is_checked_before_the_run(tmp_path: Path) -> None:
    (line,) = _problems(tmp_path, "[policy.zurich]\nmax_rounds = -1\n")
    assert line == (f"{tmp_path / 'scenario.toml'} [policy.zurich] max_rounds = -1: must be 0 or more; set "
                    "max_rounds to the most rounds a run may have, e.g. 100")


MANY = """[run]
rounds = 0
batch_size = 0
learning_rate = -1
delta = 1.0
dp = "false"
min_sites = 4
[simulation]
cpus_per_site = -2
[policy]
epsilon_per_run = 0
max_delta = 3.0
[policy.nowhere]
max_rounds = 1
"""


def test_every_problem_of_a_file_is_reported_in_one_error(tmp_path: Path) -> None:
    lines = _problems(tmp_path, MANY)
    path = tmp_path / "scenario.toml"
    expected = [f"{path} [run] rounds = 0: must be at least 1",
                f"{path} [run] batch_size = 0: must be at least 1",
                f"{path} [run] learning_rate = -1: must be a finite number above 0",
                f"{path} [run] delta = 1.0: must be at least 0 and below 1",
                f'{path} [run] dp = "false": expected true or false',
                f"{path} [run] min_sites = 4: more than the consortium's 3 site(s)",
                f"{path} [simulation] cpus_per_site = -2: must be a finite number above 0",
                f"{path} [policy] epsilon_per_run = 0: must be a finite number above 0",
                f"{path} [policy] max_delta = 3.0: must be above 0 and below 1",
                f"{path} [policy.nowhere]: no site nowhere in this consortium"]
    for start in expected:
        _line(lines, start)
    assert len(lines) == len(expected), lines


def test_several_problems_of_one_settings_object_come_together() -> None:
    from spine_fl.client.privacy.policy import SitePolicy

    with pytest.raises(ConfigError) as caught:
        RunSettings(rounds=0, strategy="fedavgg", delta=-1.0)
    assert [line.split(":")[0] for line in caught.value.problems] == ['strategy = "fedavgg"', "rounds = 0",
                                                                     "delta = -1.0"]
    assert "did you mean fedavg? choose one of fedavg, fedprox, fedadam" in caught.value.problems[0]
    with pytest.raises(ConfigError) as caught:
        SitePolicy(epsilon_lifetime=0.0, epsilon_per_run=-1.0, max_delta=1.0, allowed_tasks=("nope",))
    assert len(caught.value.problems) == 4


# -- through the command line: exit 2, every problem listed, no traceback -----------------------------------

def _simulate(*args: str) -> Any:
    from typer.testing import CliRunner

    from spine_fl.cli import app

    return CliRunner().invoke(app, ["simulate", *args])


def test_the_cli_lists_every_problem_and_exits_2_without_a_traceback(tmp_path: Path) -> None:
    path = _scenario(tmp_path, MANY)
    result = _simulate("--scenario", str(path), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "configuration error (nothing was run)" in result.output
    for line in _problems(tmp_path, MANY):
        assert line in result.output
    assert not (tmp_path / "out").exists()  # nothing was started


@pytest.mark.parametrize(("body", "culprit"), [
    ("[run]\nmin_sites = 9\n", "[run] min_sites = 9: more than the consortium's 3 site(s)"),
    ("[simulation]\ncpus_per_site = -1\n", "[simulation] cpus_per_site = -1: must be a finite number above 0"),
    ('[policy."../x"]\nmax_rounds = 1\n', '[policy."../x"]: a site name, not a path'),
])
def test_the_cli_answers_the_inputs_that_used_to_hang_or_escape(tmp_path: Path, body: str, culprit: str) -> None:
    result = _simulate("--scenario", str(_scenario(tmp_path, body)), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert culprit in result.output


@pytest.mark.parametrize("scenario", ["no_such_scenario", "{tmp}", "{tmp}/missing.toml"])
def test_the_cli_answers_a_scenario_that_is_not_there(tmp_path: Path, scenario: str) -> None:
    result = _simulate("--scenario", scenario.format(tmp=tmp_path))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert scenario.format(tmp=tmp_path) in result.output
