"""Run configuration: TOML scenario files validated into typed settings.

The same settings travel to the ServerApp as Flower's flat run config (`to_run_config`), so a
scenario runs identically in the simulation engine and, later, the deployment engine.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from spine_fl.shared import protocol
from spine_fl.shared.contract.data_contract import CLINICAL_FILE
from spine_fl.shared.contract.task_file import canonical_json, load_task_file
from spine_fl.shared.contract.tasks import (
    SHIPPED_SHA256,
    TASKS,
    Task,
    UnknownTaskError,
    is_task_file,
    run_task,
    use_task,
)
from spine_fl.shared.typed_table import (
    ConfigError,
    check_value,
    choice,
    collect,
    problem,
    raise_problems,
    read_toml,
    toml_value,
    typed_from_table,
    unknown_key,
)

__all__ = ["ConfigError", "ConsortiumSettings", "RunSettings", "Scenario", "SimulationSettings", "check_value",
           "load_scenario", "problem", "raise_problems", "read_toml", "run_key_of", "toml_value", "typed_from_table"]

STRATEGIES = ("fedavg", "fedprox", "fedadam")
ACCOUNTANTS = ("rdp", "prv")
OPTIMIZERS = ("sgd", "adam")
SOURCES = ("synthetic", "vertebral_column", "folders")


# SecAgg+ (server/secure_aggregation.py): weights quantised to 2**22 levels, masked sums taken modulo
# 2**32 (Flower's largest modulus), so one aggregation holds at most 1023 sites before the sum wraps.
SECAGG_QUANTIZATION_RANGE = 2**22
SECAGG_MODULUS_RANGE = 2**32
SECAGG_MAX_SITES = SECAGG_MODULUS_RANGE // SECAGG_QUANTIZATION_RANGE - 1

RUN_KEY = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: the coordinator's name for a run, used in file names


def run_key_of(config: dict[str, Any], fallback: str) -> str:
    """The run's key from a round's config; anything else than 32 hex digits falls back (never a path)."""
    key = str(config.get(protocol.RUN_KEY, ""))
    return key if RUN_KEY.fullmatch(key) else fallback


# The image models (shared/models/registry.py ViewEncoder) halve the image with three 2x2
# max-pools: below 8 pixels the last one has nothing left to pool and the forward pass fails.
# tests/test_config_validation.py checks this number against the model itself.
MIN_IMAGE_SIZE = 8


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
    # The task's canonical JSON (shared/contract/task_file.py), so every site gets the exact definition;
    # empty means the shipped file of `task`. A site approves it by name and SHA-256 (allowed_tasks).
    task_definition: str = ""
    # The image side in pixels; unset (None), the task model's own size (shared/models/registry.py
    # image_size: 64 for the small CNN, 224 for the MONAI networks). Always a number once built.
    image_size: int | None = None
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
    # How many sites hold shares of each site's SecAgg+ secrets (itself included): every site while a
    # round has at most this many, this many beyond (fewer shares: cheaper rounds, weaker against
    # collusion; README "Scale"). The fraction of those shares that unmasks a site (above 1/2).
    secagg_num_shares: int = 31
    secagg_reconstruction_threshold: float = 0.67
    # A round that fails (e.g. a site vanished before SecAgg+ shared its keys) is retried this many times.
    round_retries: int = 2
    # How long a round waits for min_sites sites to be connected before the run ends with the reason.
    site_wait_seconds: float = 3600.0
    # How long each request to the sites (a SecAgg+ stage, an evaluation) waits for their replies; a
    # site that has not answered by then is left out of that round as a dropout. Without a limit, one
    # site whose machine froze (or whose reply was lost) would hold the whole consortium forever. It
    # must cover a site's local training, which happens inside one SecAgg+ stage.
    reply_wait_seconds: float = 1800.0

    def __post_init__(self) -> None:
        if self.image_size is None:
            object.__setattr__(self, "image_size", _model_image_size(self))
        raise_problems(self.problems())
        task = self.task_spec
        object.__setattr__(self, "task_definition", canonical_json(task))
        use_task(task)  # every part of this process (model, data, model card) reads this definition

    @property
    def task_spec(self) -> Task:
        """The task this run trains: the definition it carries."""
        return run_task(self.task, self.task_definition)

    @property
    def task_sha256(self) -> str:
        """The SHA-256 a site's allowed_tasks must hold for this run's task (`name@<this>`)."""
        return hashlib.sha256(self.task_definition.encode("utf-8")).hexdigest()

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


def _model_image_size(run: RunSettings) -> int:
    """The image side the run's task model is made for; 64 (the small CNN's) for a task without images
    (no image is read) or an unknown task (a problem reported on its own)."""
    from spine_fl.shared.models.registry import SMALL_IMAGE_PX, image_size, model_of_task

    task = _task_or_problems(run)
    if not isinstance(task, Task) or task.image is None:
        return SMALL_IMAGE_PX
    return image_size(*model_of_task(task))


def _task_or_problems(run: RunSettings) -> Task | list[str]:
    try:
        return run.task_spec
    except UnknownTaskError:
        return [problem("task", run.task, "unknown task",
                        f"choose one of {', '.join(sorted(TASKS))}, or give a task file (.toml)")]
    except ConfigError as exc:
        return exc.problems


def _run_choices(run: RunSettings) -> list[str]:
    task = _task_or_problems(run)
    out = task if isinstance(task, list) else []
    return [*out, *choice("strategy", run.strategy, STRATEGIES, "strategy"),
            *choice("optimizer", run.optimizer, OPTIMIZERS, "optimizer"),
            *choice("accountant", run.accountant, ACCOUNTANTS, "privacy accountant")]


def _run_counts(run: RunSettings) -> list[str]:
    out = _at_least(run, 1, _RUN_COUNTS)
    if run.round_retries < 0:
        out.append(problem("round_retries", run.round_retries, "must be 0 or more",
                           "set round_retries to how often a failed round is tried again, e.g. 2"))
    if not run.site_wait_seconds > 0:
        out.append(problem("site_wait_seconds", run.site_wait_seconds, "must be more than 0",
                           "set site_wait_seconds to how long a round waits for min_sites sites, e.g. 3600"))
    if not run.reply_wait_seconds > 0:
        out.append(problem("reply_wait_seconds", run.reply_wait_seconds, "must be more than 0",
                           "set reply_wait_seconds to how long a request waits for the sites' replies (it must "
                           "cover their local training), e.g. 1800"))
    task = _task_or_problems(run)
    if isinstance(task, Task) and task.image is not None and 1 <= run.image_size < MIN_IMAGE_SIZE:
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
    return out + _secagg_shares(run)


def _secagg_shares(run: RunSettings) -> list[str]:
    """SecAgg+ neighbourhoods that Flower accepts and that a coordinator lying about dropouts cannot
    unmask from honest sites' shares alone (that needs a threshold above half a neighbourhood)."""
    out = []
    if not run.secagg:
        return out
    if not (run.secagg_num_shares >= 3 and run.secagg_num_shares % 2 == 1):
        out.append(problem("secagg_num_shares", run.secagg_num_shares, "must be an odd number, at least 3 "
                           "(each site's neighbourhood is itself and as many sites on either side)",
                           "set secagg_num_shares to the sites that hold shares of each site's secrets, e.g. 31"))
    if not (math.isfinite(run.secagg_reconstruction_threshold) and 0.5 < run.secagg_reconstruction_threshold <= 1):
        out.append(problem("secagg_reconstruction_threshold", run.secagg_reconstruction_threshold,
                           "must be above 0.5 and at most 1 (the fraction of a neighbourhood's shares that unmasks "
                           "a site; at 1/2 or below, a coordinator that lies about which sites dropped out can unmask "
                           "a site from honest sites' shares)",
                           "set secagg_reconstruction_threshold = 0.67 (two thirds; 1.0 tolerates no dropout)"))
    return out


@dataclass(frozen=True)
class ConsortiumSettings:
    source: str = "synthetic"
    sites: int = 3
    seed: int = 7
    # The consortium's own site folders instead of generated ones: each a site in the data contract's
    # format, named by its folder (load_scenario resolves them against the scenario file's folder).
    folders: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.folders:  # source and count follow from the folders
            object.__setattr__(self, "source", "folders")
            object.__setattr__(self, "sites", len(self.folders))
        raise_problems(self.problems())

    def problems(self) -> list[str]:
        """Every value that cannot work, each with what to write instead."""
        out = [*choice("source", self.source, SOURCES, "consortium source"),
               *_at_least(self, 1, {"sites": "set sites to the number of virtual hospitals, e.g. 3"})]
        if self.source == "folders" and not self.folders:
            out.append(problem("source", self.source, "needs the site folders",
                               'list them instead: folders = ["sites/boston", "sites/leiden", "sites/lyon"]'))
        names = [Path(f).name for f in self.folders]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            out.append(problem("folders", list(self.folders), f"two folders named {', '.join(twice)} (a site is "
                               "named by its folder)", "give every site folder its own name"))
        return out


@dataclass(frozen=True)
class SimulationSettings:
    """[simulation]: how Flower's simulation engine runs the virtual sites."""

    cpus_per_site: float = 1.0
    state_dir: str | None = None  # sites' ledgers and keys; default <out>/site-state
    # An existing Ray cluster's address (host:port of its head, as `ray start --head` prints it) to run
    # the virtual sites on, instead of a Ray instance of this process's own (README "Scale").
    ray_address: str | None = None

    def __post_init__(self) -> None:
        raise_problems(self.problems())

    def problems(self) -> list[str]:
        """Every value that cannot work."""
        return [*_cpus_problems(self.cpus_per_site), *ray_address_problems(self.ray_address)]


RAY_ADDRESS = re.compile(r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})")


def ray_address_problems(address: str | None) -> list[str]:
    """A Ray cluster address must be host:port (the GCS address of its head node)."""
    match = RAY_ADDRESS.fullmatch(address) if address is not None else None
    if address is None or (match and 1 <= int(match["port"]) <= 65535):
        return []
    return [problem("ray_address", address, "not a Ray cluster address (host:port of the head node)",
                    'write the address `ray start --head` printed, e.g. "10.0.0.5:6379", or remove ray_address '
                    "to let the simulation start its own Ray")]


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
    ray_address: str | None = None  # an existing Ray cluster to run on ([simulation] ray_address)

    def __post_init__(self) -> None:
        raise_problems([*(f"[simulation] {p}" for p in [*_cpus_problems(self.cpus_per_site),
                                                        *ray_address_problems(self.ray_address)]),
                        *scenario_problems(self.consortium, self.run, self.policy)])

    @property
    def simulation(self) -> SimulationSettings:
        """The [simulation] table."""
        return SimulationSettings(self.cpus_per_site, self.state_dir, self.ray_address)

    def site_policy(self, site: str) -> dict[str, Any]:
        common = {k: v for k, v in self.policy.items() if not isinstance(v, dict)}
        merged = {**common, **self.policy.get(site, {})}
        if "allowed_tasks" not in merged and SHIPPED_SHA256.get(self.run.task) != self.run.task_sha256:
            # the scenario's author plays every virtual site: unless [policy] says otherwise, they
            # approve the scenario's own task file (by name and hash) besides the shipped tasks
            merged["allowed_tasks"] = [*TASKS, f"{self.run.task}@{self.run.task_sha256}"]
        return merged


def scenario_problems(consortium: ConsortiumSettings, run: RunSettings, policy: dict[str, Any]) -> list[str]:
    """What the sections get wrong together, each line naming its section."""
    return [*min_sites_problems(run.min_sites, consortium.sites), *secagg_sites_problems(run, consortium.sites),
            *(f"{policy_table(name)}: {why}" for name in site_tables(policy) if (why := unsafe_site_name(name)))]


def secagg_sites_problems(run: RunSettings, sites: int) -> list[str]:
    """More sites than one SecAgg+ sum can hold: the masked sum would wrap around and the model be garbage."""
    if not run.secagg or sites <= SECAGG_MAX_SITES:
        return []
    return [f"[consortium] sites = {sites}: more than the {SECAGG_MAX_SITES} sites one SecAgg+ aggregation can sum "
            f"(weights quantised to 2**22 levels, sums modulo 2**32); run at most {SECAGG_MAX_SITES} sites per "
            "federation, or set [run] secagg = false for a simulation without secure aggregation"]


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
        problems.append(f"{path}: unknown section(s) {', '.join(unknown_key(k, sections) for k in unknown)}; "
                        f"allowed: {', '.join(sections)}")
    name = collect(problems, check_value, raw.get("name", path.stem), str, str(path), "name")
    simulation = collect(problems, typed_from_table, SimulationSettings, raw.get("simulation", {}),
                          f"{path} [simulation]")
    consortium = collect(problems, typed_from_table, ConsortiumSettings,
                         _consortium_table(raw.get("consortium", {}), path, problems), f"{path} [consortium]")
    run = collect(problems, run_from_table, raw.get("run", {}), f"{path} [run]", path.parent)
    policy = collect(problems, check_value, raw.get("policy", {}), dict[str, Any], str(path), "policy")
    n_sites = consortium.sites if consortium else _written(ConsortiumSettings, raw.get("consortium"), "sites")
    problems += [f"{path} {line}" for line in min_sites_problems(_written(RunSettings, raw.get("run"), "min_sites"),
                                                                 n_sites)]
    if policy is not None:
        problems += _policy_problems(path, policy, consortium, site_names, check_policy)
    raise_problems(problems)
    return Scenario(name=name, consortium=consortium, run=run, cpus_per_site=simulation.cpus_per_site,
                    policy=policy, state_dir=simulation.state_dir, ray_address=simulation.ray_address)


def run_from_table(table: Any, where: str, base: Path) -> RunSettings:
    """A [run] table (scenario or federation file): `task` names a shipped task or a task file,
    relative to `base` (the file's folder); the file's definition travels in `task_definition`."""
    problems: list[str] = []
    if isinstance(table, dict) and isinstance(table.get("task"), str) and is_task_file(table["task"]):
        written = table["task"]
        file = Path(written) if Path(written).is_absolute() else base / written
        task = collect(problems, load_task_file, file)
        if task is not None and table.get("task_definition", canonical_json(task)) != canonical_json(task):
            problems.append(f"{where} task_definition: differs from the task file {written}; remove task_definition "
                            "(spine-fl fills it in from the file)")
        table = ({**table, "task": task.name, "task_definition": canonical_json(task)} if task is not None
                 else {k: v for k, v in table.items() if k != "task"})  # the other settings are still checked
    run = collect(problems, typed_from_table, RunSettings, table, where)
    raise_problems(problems)
    return run


def _consortium_table(table: Any, path: Path, problems: list[str]) -> Any:
    """[consortium] with its folders resolved against the scenario file's folder. A folder that is
    missing or holds no clinical.csv, or a source or site count besides the folders, is a problem."""
    if not isinstance(table, dict) or not isinstance(table.get("folders"), list) or not table["folders"] \
            or not all(isinstance(f, str) for f in table["folders"]):
        return table  # nothing to resolve; typed_from_table reports wrong types
    where, folders = f"{path} [consortium]", table["folders"]
    if table.get("source", "folders") != "folders":
        problems.append(f"{where} " + problem("source", table["source"], "a consortium of folders is not generated",
                                             "remove source (folders replaces it)"))
    if table.get("sites", len(folders)) != len(folders):
        problems.append(f"{where} " + problem("sites", table["sites"], f"{len(folders)} folder(s) are listed",
                                             "remove sites (each folder is one site)"))
    resolved = []
    for written in folders:
        folder = Path(written) if Path(written).is_absolute() else path.parent / written
        if not folder.is_dir():
            problems.append(f"{where} folders: {toml_value(written)} ({folder}) is not a folder; give each site's "
                            "folder relative to the scenario file")
        elif not (folder / CLINICAL_FILE).is_file():
            problems.append(f"{where} folders: {toml_value(written)} ({folder}) holds no {CLINICAL_FILE}; a site "
                            "folder holds the data contract's files (README, \"A site's data\")")
        resolved.append(str(folder.resolve()))
    return {**{k: v for k, v in table.items() if k not in ("source", "sites")}, "folders": resolved}


def _written(cls: type, table: Any, key: str) -> int:
    """A count as the file writes it when it is a whole number, else its default: sections with
    other problems are still checked against each other."""
    value = table.get(key) if isinstance(table, dict) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return next(f.default for f in fields(cls) if f.name == key)


def _policy_problems(path: Path, policy: dict[str, Any], consortium: ConsortiumSettings | None,
                     site_names: SiteNames | None, check_policy: PolicyCheck | None) -> list[str]:
    """[policy] and every [policy.<site>]: a safe name, a site of this consortium, valid rules."""
    problems: list[str] = []
    names = list(site_names(consortium)) if site_names is not None and consortium is not None else None
    if check_policy is not None:
        common = {k: v for k, v in policy.items() if not isinstance(v, dict)}
        collect(problems, check_policy, common, f"{path} [policy]")
    for table in site_tables(policy):
        why = unsafe_site_name(table)
        if why is None and names is not None and table not in names:
            why = (f"no site {table} in this consortium (its sites: {', '.join(names)}); rename the table to one "
                   f"of them or remove it")
        if why is not None:
            problems.append(f"{path} {policy_table(table)}: {why}")
        elif check_policy is not None:
            collect(problems, check_policy, policy[table], f"{path} {policy_table(table)}")
    return problems
