"""Run configuration: TOML scenario files validated into typed settings.

The same settings travel to the ServerApp as Flower's flat run config (`to_run_config`), so a
scenario runs identically in the simulation engine and, later, the deployment engine.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from spine_fl.shared import protocol
from spine_fl.shared.contract.tasks import TASKS, get_task

STRATEGIES = ("fedavg", "fedprox", "fedadam")
ACCOUNTANTS = ("rdp", "prv")
OPTIMIZERS = ("sgd", "adam")
SOURCES = ("synthetic", "vertebral_column")


RUN_KEY = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: the coordinator's name for a run, used in file names


def run_key_of(config: dict[str, Any], fallback: str) -> str:
    """The run's key from a round's config; anything else than 32 hex digits falls back (never a path)."""
    key = str(config.get(protocol.RUN_KEY, ""))
    return key if RUN_KEY.fullmatch(key) else fallback


# The image models (shared/models/registry.py ViewEncoder) halve the image with three 2x2
# max-pools: below 8 pixels the last one has nothing left to pool and the forward pass fails.
# tests/test_config_validation.py checks this number against the model itself.
MIN_IMAGE_SIZE = 8


class ConfigError(ValueError):
    """A setting that cannot work; the message names the file and the setting.

    Every problem found in one file travels in one error, one per line (`problems`), so a user
    fixes them all in one pass instead of one per run."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def problem(key: str, value: Any, what: str, todo: str) -> str:
    """One problem line: `key = value: what is wrong; what to do` (the caller prefixes the file)."""
    return f"{key} = {toml_value(value)}: {what}; {todo}"


def raise_problems(problems: Sequence[str]) -> None:
    """Raise one ConfigError listing every problem, if there is any."""
    if problems:
        raise ConfigError(*problems)


def _choice(key: str, value: str, allowed: Sequence[str], what: str) -> list[str]:
    """A value that must be one of a few names; the closest one suggested."""
    if value in allowed:
        return []
    close = difflib.get_close_matches(value, list(allowed), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return [problem(key, value, f"unknown {what}", f"{hint}choose one of {', '.join(allowed)}")]


def _at_least(obj: Any, minimum: int, advice: dict[str, str]) -> list[str]:
    """Counts that must be `minimum` or more; `advice` maps each key to what it is for."""
    return [problem(key, getattr(obj, key), f"must be at least {minimum}", todo)
            for key, todo in advice.items() if getattr(obj, key) < minimum]


def _non_finite(obj: Any) -> list[str]:
    """Every float setting of a settings object that is nan or infinite (set in code, not TOML)."""
    return [problem(f.name, getattr(obj, f.name), "must be a finite number", "write a plain number such as 1.0")
            for f in fields(obj) if isinstance(getattr(obj, f.name), float) and not math.isfinite(getattr(obj, f.name))]


@dataclass(frozen=True)
class RunSettings:
    """What the coordinator decides for a run; sites receive it with every round."""

    task: str = "tfesi_radiograph"
    image_size: int = 64
    strategy: str = "fedavg"
    rounds: int = 10
    local_epochs: int = 2
    batch_size: int = 32
    optimizer: str = "sgd"  # plain SGD, or adam; under DP noise, Adam's per-weight scaling amplifies the noise
    learning_rate: float = 0.3
    proximal_mu: float = 0.0
    server_learning_rate: float = 0.1  # FedAdam's eta (Flower's default)
    min_sites: int = 2
    seed: int = 0
    # Differential privacy at every site (Opacus DP-SGD). Either a noise multiplier, or a target
    # epsilon for the whole run (> 0) from which each site derives its own noise multiplier.
    dp: bool = True
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    target_epsilon: float = 0.0
    delta: float = 0.0  # 0: each site uses 1 / (10 n) for its n training patients
    accountant: str = "rdp"
    # Secure aggregation (Flower SecAgg+). See server/secure_aggregation.py for the ranges.
    secagg: bool = True
    secagg_clipping_range: float = 8.0
    secagg_max_weight: float = 1000.0
    # A round that fails (e.g. a site vanished before SecAgg+ shared its keys) is retried this many times.
    round_retries: int = 2

    def __post_init__(self) -> None:
        raise_problems(self.problems())

    def problems(self) -> list[str]:
        """Every value that cannot work, each with what to write instead."""
        found = [*_run_choices(self), *_run_counts(self), *_run_rates(self), *_run_privacy(self)]
        named = {line.split(" = ", 1)[0] for line in found}
        return found + [line for line in _non_finite(self) if line.split(" = ", 1)[0] not in named]

    def to_run_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> "RunSettings":
        known = {f.name: f.type for f in fields(cls)}
        values = {k.replace("-", "_"): v for k, v in config.items() if k.replace("-", "_") in known}
        return cls(**values)


_RUN_COUNTS = {
    "rounds": "set rounds to the number of federated rounds, e.g. 10",
    "local_epochs": "set local_epochs to the passes over its data each site makes per round, e.g. 1",
    "batch_size": "set batch_size to the patients per training step, e.g. 32",
    "min_sites": "set min_sites to the number of sites every round needs, e.g. 2",
    "image_size": "set image_size to the model's input size in pixels, e.g. 64",
}


def _run_choices(run: RunSettings) -> list[str]:
    out = [problem("task", run.task, "unknown task", f"choose one of {', '.join(sorted(TASKS))}")] \
        if run.task not in TASKS else []
    return [*out, *_choice("strategy", run.strategy, STRATEGIES, "strategy"),
            *_choice("optimizer", run.optimizer, OPTIMIZERS, "optimizer"),
            *_choice("accountant", run.accountant, ACCOUNTANTS, "privacy accountant")]


def _run_counts(run: RunSettings) -> list[str]:
    out = _at_least(run, 1, _RUN_COUNTS)
    if run.round_retries < 0:
        out.append(problem("round_retries", run.round_retries, "must be 0 or more",
                           "set round_retries to how often a failed round is tried again, e.g. 2"))
    if run.task in TASKS and get_task(run.task).image is not None and 1 <= run.image_size < MIN_IMAGE_SIZE:
        out.append(problem("image_size", run.image_size, f"too small for the {run.task} model (its CNN halves "
                           f"the image three times and needs at least {MIN_IMAGE_SIZE} pixels)",
                           f"set image_size to {MIN_IMAGE_SIZE} or more, e.g. 64"))
    return out


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _run_rates(run: RunSettings) -> list[str]:
    out = []
    if not _positive(run.learning_rate):
        out.append(problem("learning_rate", run.learning_rate, "must be a finite number above 0",
                           "set learning_rate to the local step size, e.g. 0.3 with sgd or 0.003 with adam"))
    if not _positive(run.server_learning_rate):
        out.append(problem("server_learning_rate", run.server_learning_rate, "must be a finite number above 0",
                           "set server_learning_rate to FedAdam's server step size, e.g. 0.1"))
    if not (math.isfinite(run.proximal_mu) and run.proximal_mu >= 0):
        out.append(problem("proximal_mu", run.proximal_mu, "must be 0 or more",
                           "set proximal_mu = 0 (no proximal term) or a small weight for FedProx, e.g. 0.01"))
    return out


def _run_privacy(run: RunSettings) -> list[str]:
    out = []
    if not 0 <= run.delta < 1:
        out.append(problem("delta", run.delta, "must be at least 0 and below 1",
                           "set delta = 0 to let each site use 1 / (10 n), or a small value such as 1e-5"))
    if run.target_epsilon < 0:
        out.append(problem("target_epsilon", run.target_epsilon, "must be 0 (unset) or above 0",
                           "set target_epsilon to the run's privacy budget, e.g. 8.0, or 0 to use noise_multiplier"))
    if run.dp and not _positive(run.max_grad_norm):
        out.append(problem("max_grad_norm", run.max_grad_norm, "must be above 0 with dp = true",
                           "set max_grad_norm to the per-patient clipping bound, e.g. 1.0"))
    if run.dp and run.target_epsilon <= 0 and not _positive(run.noise_multiplier):
        out.append(problem("noise_multiplier", run.noise_multiplier,
                           "must be above 0 with dp = true and no target_epsilon",
                           "set noise_multiplier, e.g. 1.0, or target_epsilon > 0 to let each site derive its own"))
    if run.secagg and not _positive(run.secagg_clipping_range):
        out.append(problem("secagg_clipping_range", run.secagg_clipping_range, "must be above 0 with secagg = true",
                           "set secagg_clipping_range to the largest update value SecAgg+ encodes, e.g. 8.0"))
    if run.secagg and not run.secagg_max_weight >= 1:
        out.append(problem("secagg_max_weight", run.secagg_max_weight, "must be at least 1 with secagg = true",
                           "set secagg_max_weight to the largest example count a site reports, e.g. 1000.0"))
    return out


@dataclass(frozen=True)
class ConsortiumSettings:
    source: str = "synthetic"
    sites: int = 3
    seed: int = 7

    def __post_init__(self) -> None:
        raise_problems(self.problems())

    def problems(self) -> list[str]:
        """Every value that cannot work, each with what to write instead."""
        return [*_choice("source", self.source, SOURCES, "consortium source"),
                *_at_least(self, 1, {"sites": "set sites to the number of virtual hospitals, e.g. 3"})]


@dataclass(frozen=True)
class SimulationSettings:
    """[simulation]: how Flower's simulation engine runs the virtual sites."""

    cpus_per_site: float = 1.0
    state_dir: str | None = None  # sites' ledgers and keys; default <out>/site-state

    def __post_init__(self) -> None:
        raise_problems(self.problems())

    def problems(self) -> list[str]:
        """Every value that cannot work."""
        return _cpus_problems(self.cpus_per_site)


def _cpus_problems(cpus_per_site: float) -> list[str]:
    """A CPU count of 0 or less (or nan) used to hang the simulation engine: refused here."""
    if _positive(cpus_per_site):
        return []
    return [problem("cpus_per_site", cpus_per_site, "must be a finite number above 0",
                    "set cpus_per_site to the CPU cores each virtual site may use, e.g. 1 or 0.5")]


@dataclass(frozen=True)
class Scenario:
    name: str
    consortium: ConsortiumSettings
    run: RunSettings
    cpus_per_site: float = 1.0
    # [policy]: every virtual site's policy rules; [policy.<site>]: one site's overrides
    policy: dict[str, Any] = field(default_factory=dict)
    state_dir: str | None = None  # sites' ledgers and keys; default <out>/site-state

    def __post_init__(self) -> None:
        raise_problems([*(f"[simulation] {p}" for p in _cpus_problems(self.cpus_per_site)),
                        *scenario_problems(self.consortium, self.run, self.policy)])

    @property
    def simulation(self) -> SimulationSettings:
        """The [simulation] table."""
        return SimulationSettings(self.cpus_per_site, self.state_dir)

    def site_policy(self, site: str) -> dict[str, Any]:
        common = {k: v for k, v in self.policy.items() if not isinstance(v, dict)}
        return {**common, **self.policy.get(site, {})}


def scenario_problems(consortium: ConsortiumSettings, run: RunSettings, policy: dict[str, Any]) -> list[str]:
    """What the sections get wrong together, each line naming its section."""
    return [*min_sites_problems(run.min_sites, consortium.sites),
            *(f"{policy_table(name)}: {why}" for name in site_tables(policy) if (why := unsafe_site_name(name)))]


def min_sites_problems(min_sites: int, sites: int) -> list[str]:
    """More sites needed than the consortium has: no round could start (the simulation used to wait for ever)."""
    if not 1 <= sites < min_sites:
        return []
    return ["[run] " + problem("min_sites", min_sites, f"more than the consortium's {sites} site(s) "
                               f"([consortium] sites = {sites}), so no round could ever start",
                               f"set min_sites to {sites} or fewer, or [consortium] sites to {min_sites} or more")]


def site_tables(policy: dict[str, Any]) -> list[str]:
    """The names of the [policy.<site>] tables (one site's overrides) in a [policy] table."""
    return [name for name, value in policy.items() if isinstance(value, dict)]


def policy_table(name: str) -> str:
    """`[policy.<name>]` as written in TOML (a name that is not a bare key in quotes)."""
    return f"[policy.{name}]" if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f"[policy.{json.dumps(name)}]"


def unsafe_site_name(name: str) -> str | None:
    """Why a site name cannot be used (it names a folder under the state folder), or None."""
    if not name.strip() or "/" in name or "\\" in name or ".." in name or name.startswith("."):
        return ("a site name, not a path: it cannot be empty, start with a dot or contain /, \\ or ..; "
                "name the table after one of the consortium's sites, e.g. [policy.leiden]")
    return None


# -- one typed validation path for every settings table ----------------------------------------

def toml_value(value: Any) -> str:
    """A value as it would be written in a TOML file (strings quoted, booleans lower-case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


_EXPECTED = {
    bool: "expected true or false (a TOML boolean, without quotes)",
    int: "expected a whole number (a TOML integer such as 3, without quotes or decimal point)",
    float: "expected a number (a TOML float or integer such as 0.5, without quotes)",
    str: 'expected text (a TOML string in double quotes, such as "name")',
}
_EXPECTED_LIST = 'expected a list of text values (a TOML array of strings such as ["a", "b"])'
_EXPECTED_TABLE = "expected a table (a [section] of key = value lines, or an inline table such as {key = 1})"


def _typed_value(value: Any, annotation: Any) -> Any:
    """`value` as `annotation` (int -> float, list -> tuple); a ValueError saying what was expected."""
    if annotation is Any:
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        # TOML has no null: an optional setting is either its type or left out of the file
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _typed_value(value, options[0])
        for option in options:
            try:
                return _typed_value(value, option)
            except ValueError:
                continue
        raise ValueError("expected one of: " + "; ".join(_describe(a) for a in options))
    if origin in (tuple, list):  # tuple[X, ...] or list[X]: a TOML array of X
        item = args[0] if args else Any
        if not isinstance(value, (list, tuple)):
            raise ValueError(_describe(annotation))
        items = []
        for i, v in enumerate(value, 1):
            try:
                items.append(_typed_value(v, item))
            except ValueError:
                raise ValueError(f"{_describe(annotation)}; item {i} is {toml_value(v)}") from None
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ValueError(_EXPECTED_TABLE)
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(_EXPECTED[bool])
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(_EXPECTED[int])
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(_EXPECTED[float])
        if not math.isfinite(value):
            raise ValueError("expected a finite number (nan and inf cannot be used here)")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(_EXPECTED[str])
        return value
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ValueError(f"expected {annotation.__name__}")
    return value


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        return _EXPECTED_LIST if typing.get_args(annotation)[:1] == (str,) else "expected a list (a TOML array)"
    if origin is dict or annotation is dict:
        return _EXPECTED_TABLE
    return _EXPECTED.get(annotation, f"expected {getattr(annotation, '__name__', annotation)}")


def check_value(value: Any, annotation: Any, where: str, key: str) -> Any:
    """One setting checked against its type: ConfigError `<where> key = value: expected ...`."""
    try:
        return _typed_value(value, annotation)
    except ValueError as exc:
        raise ConfigError(f"{where} {key} = {toml_value(value)}: {exc}") from None


def _unknown(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f"{key} (did you mean {close[0]}?)" if close else key


def typed_from_table(cls: type, table: Any, where: str) -> Any:
    """A TOML table as the dataclass `cls`, every value checked against the field's annotated type.

    ConfigError naming `where` (file and section), the key, the value and what was expected, for:
    a value of the wrong type (no quotes around booleans and numbers, whole numbers where counted,
    finite numbers), an unknown key (with the closest allowed one), a missing required key, and
    what the dataclass itself refuses (its __post_init__). Ints become floats where a float is
    expected, and lists tuples."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: {_EXPECTED_TABLE}, got {toml_value(table)}")
    settable = [f for f in fields(cls) if f.init]
    allowed = [f.name for f in settable]
    problems = []
    unknown = [k for k in table if k not in allowed]
    if unknown:
        problems.append(f"{where}: unknown setting(s) {', '.join(_unknown(k, allowed) for k in unknown)}; "
                        f"allowed: {', '.join(sorted(allowed))}")
    missing = [f.name for f in settable
               if f.name not in table and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        problems.append(f"{where}: missing setting(s) {', '.join(missing)}; add a line key = value for each")
    values, mistyped = _typed_values(cls, {k: v for k, v in table.items() if k in allowed}, where, problems)
    if missing:
        raise ConfigError(*problems)
    built = None
    try:
        built = cls(**values)  # mistyped keys keep their defaults: the others are still range-checked
    except ConfigError as exc:
        kept = [f"{where} {_as_written(line, table, values)}" for line in exc.problems
                if line.split(" = ", 1)[0] not in mistyped]
        problems += kept if kept or mistyped else [f"{where}: {exc}"]
    except (TypeError, ValueError) as exc:
        problems.append(f"{where}: {exc}")
    raise_problems(problems)
    return built


def _as_written(line: str, table: dict[str, Any], values: dict[str, Any]) -> str:
    """A problem line with its value as the file writes it (`0`, not the `0.0` it became)."""
    key, _, rest = line.partition(" = ")
    if key in table and key in values and rest.startswith(toml_value(values[key]) + ":"):
        return f"{key} = {toml_value(table[key])}{rest[len(toml_value(values[key])):]}"
    return line


def _typed_values(cls: type, table: dict[str, Any], where: str, problems: list[str]) -> tuple[dict[str, Any], set[str]]:
    """The values of the right type, and the keys of the others (each a line added to `problems`)."""
    hints = typing.get_type_hints(cls)
    values, mistyped = {}, set()
    for key, value in table.items():
        try:
            values[key] = check_value(value, hints.get(key, Any), where, key)
        except ConfigError as exc:
            problems.append(str(exc))
            mistyped.add(key)
    return values, mistyped


def read_toml(path: Path | str, what: str, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """A TOML file as a dict; a missing, unreadable or malformed file is a ConfigError naming it."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: a folder, not a {what}; give the path of the .toml file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror}); check the path and its permissions") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file (not UTF-8); a {what} is TOML text") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML ({exc})") from None


SiteNames = Callable[[ConsortiumSettings], Sequence[str]]
PolicyCheck = Callable[[dict[str, Any], str], Any]


def load_scenario(path: Path | str, site_names: SiteNames | None = None,
                  check_policy: PolicyCheck | None = None) -> Scenario:
    """The scenario file, every problem in it reported together in one ConfigError.

    `site_names` (the consortium's site names) and `check_policy` (a site policy table's own
    validator) come from the caller: shared/ knows neither the consortia nor the site policy."""
    path = Path(path)
    raw = read_toml(path, "scenario file")
    problems: list[str] = []
    sections = ["name", "consortium", "run", "simulation", "policy"]
    unknown = [k for k in raw if k not in sections]
    if unknown:
        problems.append(f"{path}: unknown section(s) {', '.join(_unknown(k, sections) for k in unknown)}; "
                        f"allowed: {', '.join(sections)}")
    name = _collect(problems, check_value, raw.get("name", path.stem), str, str(path), "name")
    simulation = _collect(problems, typed_from_table, SimulationSettings, raw.get("simulation", {}),
                          f"{path} [simulation]")
    consortium = _collect(problems, typed_from_table, ConsortiumSettings, raw.get("consortium", {}),
                          f"{path} [consortium]")
    run = _collect(problems, typed_from_table, RunSettings, raw.get("run", {}), f"{path} [run]")
    policy = _collect(problems, check_value, raw.get("policy", {}), dict[str, Any], str(path), "policy")
    problems += [f"{path} {line}" for line in min_sites_problems(_written(RunSettings, raw.get("run"), "min_sites"),
                                                                 _written(ConsortiumSettings, raw.get("consortium"),
                                                                          "sites"))]
    if policy is not None:
        problems += _policy_problems(path, policy, consortium, site_names, check_policy)
    raise_problems(problems)
    return Scenario(name=name, consortium=consortium, run=run, cpus_per_site=simulation.cpus_per_site,
                    policy=policy, state_dir=simulation.state_dir)


def _written(cls: type, table: Any, key: str) -> int:
    """A count as the file writes it when it is a whole number, else its default: sections with
    other problems are still checked against each other."""
    value = table.get(key) if isinstance(table, dict) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return next(f.default for f in fields(cls) if f.name == key)


def _collect(problems: list[str], check: Callable[..., Any], *args: Any) -> Any:
    """`check(*args)`, or None with its ConfigError's lines added to `problems`."""
    try:
        return check(*args)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return None


def _policy_problems(path: Path, policy: dict[str, Any], consortium: ConsortiumSettings | None,
                     site_names: SiteNames | None, check_policy: PolicyCheck | None) -> list[str]:
    """[policy] and every [policy.<site>]: a safe name, a site of this consortium, valid rules."""
    problems: list[str] = []
    names = list(site_names(consortium)) if site_names is not None and consortium is not None else None
    if check_policy is not None:
        common = {k: v for k, v in policy.items() if not isinstance(v, dict)}
        _collect(problems, check_policy, common, f"{path} [policy]")
    for table in site_tables(policy):
        why = unsafe_site_name(table)
        if why is None and names is not None and table not in names:
            why = (f"no site {table} in this consortium (its sites: {', '.join(names)}); rename the table to one "
                   f"of them or remove it")
        if why is not None:
            problems.append(f"{path} {policy_table(table)}: {why}")
        elif check_policy is not None:
            _collect(problems, check_policy, policy[table], f"{path} {policy_table(table)}")
    return problems
