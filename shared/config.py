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
from typing import Any

from spine_fl.shared import protocol
from spine_fl.shared.contract.tasks import get_task

STRATEGIES = ("fedavg", "fedprox", "fedadam")
ACCOUNTANTS = ("rdp", "prv")
OPTIMIZERS = ("sgd", "adam")
SOURCES = ("synthetic", "vertebral_column")


RUN_KEY = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: the coordinator's name for a run, used in file names


def run_key_of(config: dict[str, Any], fallback: str) -> str:
    """The run's key from a round's config; anything else than 32 hex digits falls back (never a path)."""
    key = str(config.get(protocol.RUN_KEY, ""))
    return key if RUN_KEY.fullmatch(key) else fallback


class ConfigError(ValueError):
    """A setting that cannot work; the message names the file and the setting."""


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
        get_task(self.task)
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy {self.strategy!r} unknown; choose one of {', '.join(STRATEGIES)}")
        for name in ("image_size", "rounds", "local_epochs", "batch_size", "min_sites"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.round_retries < 0:
            raise ConfigError(f"round_retries must be 0 or more, got {self.round_retries}")
        if self.learning_rate <= 0 or self.server_learning_rate <= 0 or self.proximal_mu < 0:
            raise ConfigError("learning rates must be > 0 and proximal_mu >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r} unknown; choose one of {', '.join(OPTIMIZERS)}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"accountant {self.accountant!r} unknown; choose one of {', '.join(ACCOUNTANTS)}")
        if self.dp and (self.max_grad_norm <= 0 or (self.target_epsilon <= 0 and self.noise_multiplier <= 0)):
            raise ConfigError("with dp = true, max_grad_norm must be > 0 and noise_multiplier or target_epsilon > 0")
        if not 0 <= self.delta < 1:
            raise ConfigError("delta must be in [0, 1)")
        if self.secagg and (self.secagg_clipping_range <= 0 or self.secagg_max_weight < 1):
            raise ConfigError("secagg_clipping_range must be > 0 and secagg_max_weight >= 1")

    def to_run_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> "RunSettings":
        known = {f.name: f.type for f in fields(cls)}
        values = {k.replace("-", "_"): v for k, v in config.items() if k.replace("-", "_") in known}
        return cls(**values)


@dataclass(frozen=True)
class ConsortiumSettings:
    source: str = "synthetic"
    sites: int = 3
    seed: int = 7

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"consortium.source {self.source!r} unknown; choose {', '.join(SOURCES)}")
        if self.sites < 1:
            raise ConfigError("consortium.sites must be at least 1")


@dataclass(frozen=True)
class SimulationSettings:
    """[simulation]: how Flower's simulation engine runs the virtual sites."""

    cpus_per_site: float = 1.0
    state_dir: str | None = None  # sites' ledgers and keys; default <out>/site-state

    def __post_init__(self) -> None:
        if not (math.isfinite(self.cpus_per_site) and self.cpus_per_site > 0):
            raise ConfigError(f"cpus_per_site must be > 0 (e.g. 1 or 0.5), got {self.cpus_per_site}")


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
        SimulationSettings(self.cpus_per_site, self.state_dir)  # the same checks as a [simulation] table

    @property
    def simulation(self) -> SimulationSettings:
        """The [simulation] table."""
        return SimulationSettings(self.cpus_per_site, self.state_dir)

    def site_policy(self, site: str) -> dict[str, Any]:
        common = {k: v for k, v in self.policy.items() if not isinstance(v, dict)}
        return {**common, **self.policy.get(site, {})}


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
    unknown = [k for k in table if k not in allowed]
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(_unknown(k, allowed) for k in unknown)}; "
                          f"allowed: {', '.join(sorted(allowed))}")
    missing = [f.name for f in settable
               if f.name not in table and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise ConfigError(f"{where}: missing setting(s) {', '.join(missing)}; add a line key = value for each")
    hints = typing.get_type_hints(cls)
    values = {key: check_value(value, hints.get(key, Any), where, key) for key, value in table.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:  # ConfigError too: the dataclass's own range checks
        raise ConfigError(f"{where}: {exc}") from None


def read_toml(path: Path | str, what: str, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a ConfigError naming it."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML ({exc})") from None


def load_scenario(path: Path | str) -> Scenario:
    path = Path(path)
    raw = read_toml(path, "scenario file")
    sections = ["name", "consortium", "run", "simulation", "policy"]
    unknown = [k for k in raw if k not in sections]
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(_unknown(k, sections) for k in unknown)}; "
                          f"allowed: {', '.join(sections)}")
    simulation = typed_from_table(SimulationSettings, raw.get("simulation", {}), f"{path} [simulation]")
    return Scenario(
        name=check_value(raw.get("name", path.stem), str, str(path), "name"),
        consortium=typed_from_table(ConsortiumSettings, raw.get("consortium", {}), f"{path} [consortium]"),
        run=typed_from_table(RunSettings, raw.get("run", {}), f"{path} [run]"),
        cpus_per_site=simulation.cpus_per_site,
        policy=check_value(raw.get("policy", {}), dict[str, Any], str(path), "policy"),
        state_dir=simulation.state_dir,
    )
