"""Run configuration: TOML scenario files validated into typed settings.

The same settings travel to the ServerApp as Flower's flat run config (`to_run_config`), so a
scenario runs identically in the simulation engine and, later, the deployment engine.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
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
class Scenario:
    name: str
    consortium: ConsortiumSettings
    run: RunSettings
    cpus_per_site: float = 1.0
    # [policy]: every virtual site's policy rules; [policy.<site>]: one site's overrides
    policy: dict[str, Any] = field(default_factory=dict)
    state_dir: str | None = None  # sites' ledgers and keys; default <out>/site-state

    def site_policy(self, site: str) -> dict[str, Any]:
        common = {k: v for k, v in self.policy.items() if not isinstance(v, dict)}
        return {**common, **self.policy.get(site, {})}


def typed_from_table(cls: type, table: dict[str, Any], where: str) -> Any:
    """A TOML table as the dataclass `cls`; unknown keys and invalid values raise ConfigError naming `where`."""
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    try:
        return cls(**table)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
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
    unknown = sorted(set(raw) - {"name", "consortium", "run", "simulation", "policy"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}")
    simulation = raw.get("simulation", {})
    return Scenario(
        name=str(raw.get("name", path.stem)),
        consortium=typed_from_table(ConsortiumSettings, raw.get("consortium", {}), f"{path} [consortium]"),
        run=typed_from_table(RunSettings, raw.get("run", {}), f"{path} [run]"),
        cpus_per_site=float(simulation.get("cpus_per_site", 1.0)),
        policy=dict(raw.get("policy", {})),
        state_dir=simulation.get("state_dir"),
    )
