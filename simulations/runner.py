"""`spine-fl simulate`: one scenario through Flower's simulation engine, plus the baselines.

Steps: build the consortium's site folders -> run the ServerApp and one ClientApp per site as
virtual SuperNodes -> score the final shared model, the pooled and the local-only baselines on
the same held-out splits -> metrics.json and plots in the output folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import tomlkit
import torch
from flwr.clientapp.typing import Mod

from spine_fl.client.site_config import Site, policy_from_table
from spine_fl.server.app import build_server_app
from spine_fl.server.coordinator_record import RECORD_FILE
from spine_fl.server.reporting import plots
from spine_fl.server.reporting.federation_record import FEDERATION_FILE, MODEL_FILE, load_model
from spine_fl.server.reporting.importance import save_importance
from spine_fl.server.reporting.model_card import save_predictions, write_model_card
from spine_fl.server.reporting.run_result import RunResult, write_run_result, write_run_status
from spine_fl.shared.config import ConfigError, ConsortiumSettings, Scenario, load_scenario
from spine_fl.shared.contract.data_contract import load_site, validate_and_load
from spine_fl.shared.contract.tasks import SHIPPED_SHA256
from spine_fl.shared.files import atomic_write_bytes
from spine_fl.shared.models.registry import pick_device
from spine_fl.shared.training import calibration
from spine_fl.shared.training.evaluation import score_sites
from spine_fl.simulations import baselines
from spine_fl.simulations.synthetic.consortium import site_profiles, synthesize_consortium
from spine_fl.simulations.synthetic.vertebral_column import ATTRIBUTION, write_sites

SCENARIO_FILE = "scenario.toml"
VERTEBRAL_SITE = "vc_site{}"  # as write_sites names its folders (a test keeps them in step)


def packaged_scenario(name: str) -> Path:
    path = resources.files("spine_fl.simulations") / "scenarios" / f"{name}.toml"
    return Path(str(path))


def build_consortium(scenario: Scenario, data_dir: Path) -> list[Path]:
    """The site folders: the consortium's own (`load` validated them), or generated into `data_dir`."""
    c = scenario.consortium
    if c.folders:
        return [Path(f) for f in c.folders]
    if c.source == "vertebral_column":
        return write_sites(data_dir, c.sites, c.seed)
    task = scenario.run.task_spec
    modalities: tuple[str, ...] = ()
    if task.image is not None:
        modalities = ("mri",) if "MR" in task.image.modalities else ("radiograph",)
    return synthesize_consortium(data_dir, c.sites, c.seed, modalities)


def check_folders(scenario: Scenario) -> None:
    """Every site folder validated for the run's task before anything runs; one ConfigError with every
    error of every folder (warnings, such as unlabelled patients left out, do not stop a run)."""
    run = scenario.run
    problems = []
    for folder in map(Path, scenario.consortium.folders):
        _, report = validate_and_load(folder, run.task_spec, run.image_size)
        problems += [f"site {folder.name} ({folder}): {p.where}: {p.what}; {p.action}" for p in report.errors]
    if problems:
        raise ConfigError(f"scenario {scenario.name}: the site folders are not usable for task {run.task} "
                          f"({len(problems)} error(s)); `spine-fl validate FOLDER --task ...` shows each folder's report",
                          *problems)


def state_root(scenario: Scenario, out_dir: Path) -> Path:
    """Where the virtual sites' state folders live, and beside them the coordinator's record."""
    return Path(scenario.state_dir) if scenario.state_dir else out_dir / "site-state"


def virtual_sites(scenario: Scenario, site_dirs: list[Path], out_dir: Path) -> list[Site]:
    """Each virtual site with its own policy and its own state folder (ledgers and signing key)."""
    return [Site(p.name, p, state_root(scenario, out_dir) / p.name,
                 policy_from_table(scenario.site_policy(p.name), f"scenario {scenario.name} [policy]"))
            for p in site_dirs]


class _RunSimulationNotice(logging.Filter):
    """spine-fl calls `run_simulation` on purpose (`flwr run` would start a detached SuperLink that
    outlives the command); Flower's deprecation notice about it is nothing a user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


RUN_SIMULATION_NOTICE = _RunSimulationNotice()  # one instance: adding it again is a no-op
logger = logging.getLogger("spine_fl.simulations")


def ray_address(scenario: Scenario) -> str | None:
    """The existing Ray cluster to run on: [simulation] ray_address, else Ray's own RAY_ADDRESS
    variable; None starts a Ray instance of this process's own."""
    return scenario.ray_address or os.environ.get("RAY_ADDRESS") or None


def backend_config(scenario: Scenario, n_sites: int) -> dict[str, Any]:
    """Flower's Ray backend settings: each virtual site's share of a CPU (and GPU), and how Ray starts.

    On an existing cluster (`ray_address`) Ray takes the CPUs from the cluster's nodes (`ray start
    --num-cpus`): Ray refuses num_cpus when connecting, so only the address is passed. Without one,
    a private Ray instance with this machine's cores. Either way Flower runs as many sites at once
    as the cluster's CPUs hold `cpus_per_site` each; the rest wait in Flower's queue."""
    gpus = 1.0 / n_sites if torch.cuda.is_available() else 0.0
    address = ray_address(scenario)
    init_args: dict[str, Any] = {"include_dashboard": False}
    if address:
        init_args["address"] = address
    else:
        init_args["num_cpus"] = max(os.cpu_count() or 1, int(scenario.cpus_per_site))
    return {"client_resources": {"num_cpus": scenario.cpus_per_site, "num_gpus": gpus}, "init_args": init_args}


def run_federation(scenario: Scenario, sites: list[Site], out_dir: Path,
                   on_round: Callable[[dict[str, Any]], None] | None = None, outer_mods: Sequence[Mod] = ()) -> None:
    from flwr.simulation import run_simulation

    from spine_fl.client.app import build_client_app

    logging.getLogger("flwr").addFilter(RUN_SIMULATION_NOTICE)
    run_simulation(
        server_app=build_server_app(scenario.run, [s.name for s in sites], out_dir, on_round,
                                    record_path=state_root(scenario, out_dir) / RECORD_FILE),
        client_app=build_client_app(sites, outer_mods),
        num_supernodes=len(sites),
        backend_config=backend_config(scenario, len(sites)),
    )


def write_scenario(path: Path, scenario: Scenario) -> None:
    """The scenario as run, beside its results: the site audit reads the policy from it."""
    simulation = {k: v for k, v in asdict(scenario.simulation).items() if v is not None}  # TOML has no null
    consortium = {k: v for k, v in asdict(scenario.consortium).items() if v != ()}  # no folders: none written
    run = asdict(scenario.run)
    if SHIPPED_SHA256.get(run["task"]) == scenario.run.task_sha256:
        del run["task_definition"]  # the shipped definition: its name says it
    policy = dict(scenario.policy)
    defaulted = scenario.site_policy("").get("allowed_tasks")  # the task approval virtual sites got by default
    if "allowed_tasks" not in policy and defaulted is not None:
        policy["allowed_tasks"] = list(defaulted)  # written out, so the site audit judges by the same policy
    table = {"name": scenario.name, "consortium": consortium, "run": run,
             "simulation": simulation, "policy": policy}
    atomic_write_bytes(path, tomlkit.dumps(table).encode())


def simulate(scenario: Scenario, out_dir: Path, on_round: Callable[[dict[str, Any]], None] | None = None,
             outer_mods: Sequence[Mod] = ()) -> dict[str, Any]:
    """Run the scenario into `out_dir`; returns the run result as metrics.json holds it. The folder's
    run_status.json says "running" until the end, and "failed" with the reason if the run raised."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_run_status(out_dir, "running")
    try:
        metrics = _simulate(scenario, out_dir, on_round, outer_mods)
    except BaseException as exc:
        write_run_status(out_dir, "failed", f"{type(exc).__name__}: {exc}")
        raise
    write_run_status(out_dir, metrics["status"], metrics["stop_reason"])
    return metrics


def _simulate(scenario: Scenario, out_dir: Path, on_round: Callable[[dict[str, Any]], None] | None,
              outer_mods: Sequence[Mod]) -> dict[str, Any]:
    write_scenario(out_dir / SCENARIO_FILE, scenario)
    started = time.perf_counter()
    site_dirs = build_consortium(scenario, out_dir / "sites")
    run = scenario.run
    sites = {p.name: load_site(p, run.task_spec, run.image_size) for p in site_dirs}

    fed_started = time.perf_counter()
    run_federation(scenario, virtual_sites(scenario, site_dirs, out_dir), out_dir, timed_rounds(on_round, len(sites)),
                   outer_mods)
    fed_seconds = time.perf_counter() - fed_started
    federation = json.loads((out_dir / FEDERATION_FILE).read_text())

    device = pick_device()
    model, _ = load_model(out_dir / MODEL_FILE)
    fed_test = score_sites(model, sites, "test", device)
    fed_external = score_sites(model, sites, "external", device)
    pooled_test, pooled_external = baselines.pooled(run, sites, device)
    local_test = baselines.local_only(run, sites, device)

    result = RunResult(
        engine="simulation",
        task=run.task,
        scenario=scenario.name,
        sites=list(sites),
        patients={s: {k: int((d.split == k).sum()) for k in ("train", "test", "external")} for s, d in sites.items()},
        federated={**fed_test.summary(), "external": fed_external.summary() if fed_external.per_site else None},
        pooled={**pooled_test.summary(), "external": pooled_external.summary() if pooled_external.per_site else None},
        local_only=local_test.summary(),
        status=federation["status"],
        stop_reason=federation["stop_reason"],
        rounds=federation["rounds"],
        dropouts=federation["dropouts"],
        failed_rounds=federation["failed_rounds"],
        privacy=federation["privacy"],
        ledgers=federation["ledgers"],
        config={"run": run.to_run_config(), "consortium": asdict(scenario.consortium),
                "cpus_per_site": scenario.cpus_per_site},
        timing={"federated_seconds": round(fed_seconds, 1),
                "total_seconds": round(time.perf_counter() - started, 1), "device": str(device)},
        data_attribution=ATTRIBUTION if scenario.consortium.source == "vertebral_column" else None,
        calibration=calibration_result(federation.get("calibration"), fed_test, fed_external),
    )
    write_run_result(out_dir, result)
    metrics = result.to_json()
    plots.roc_per_site(out_dir / "roc_per_site.png", fed_test.per_site, f"{run.task}: federated model, held-out")
    plots.calibration(out_dir / "calibration.png",
                      {"federated": fed_test.pooled(), "pooled": pooled_test.pooled(),
                       "local-only": local_test.pooled()}, "calibration on held-out patients")
    plots.metric_per_round(out_dir / "auroc_per_round.png", federation["rounds"],
                           {"pooled": metrics["pooled"]["auroc"], "local_only": metrics["local_only"]["auroc"]})
    save_predictions(out_dir, {"federated": fed_test, "pooled": pooled_test, "local_only": local_test}, sites)
    save_importance(out_dir, model, run.task_spec, sites, device)  # the card's importance section (simulation only)
    write_model_card(out_dir)
    return metrics


def timed_rounds(on_round: Callable[[dict[str, Any]], None] | None,
                 n_sites: int) -> Callable[[dict[str, Any]], None]:
    """`on_round`, after a log line with the round's seconds as it ends (a 100-site run takes minutes:
    progress shows as it goes)."""

    def report(entry: dict[str, Any]) -> None:
        withheld = len(entry.get("withheld", ()))
        logger.info("spine-fl: round %s took %.1f s (%d sites; %d reported held-out metrics%s)", entry["round"],
                    entry.get("seconds", float("nan")), n_sites, len(entry.get("per_site", {})),
                    f", {withheld} withheld them" if withheld else "")
        if on_round is not None:
            on_round(entry)

    return report


def calibration_result(section: dict[str, Any] | None, test: Any, external: Any) -> dict[str, Any] | None:
    """The recalibration section with, in simulation, the held-out figures before and after it (the
    model file's probabilities are calibrated; `before` undoes the folded map), at 0.5 before and at
    the recommended threshold after. `test` is the split the sites' histograms came from (in-sample
    for the map, noised); `external` is out of sample."""
    if not section or section.get("status") != "fitted":
        return section
    a, b, t = section["a"], section["b"], section["threshold"]["value"]
    held_out = {}
    for name, scores in (("test", test), ("external", external)):
        if not scores.per_site:
            continue
        y, p = scores.pooled()
        held_out[name] = {"before": calibration.held_out_figures(y, calibration.uncalibrate(p, a, b), 0.5),
                          "after": calibration.held_out_figures(y, p, t)}
    return {**section, "held_out": held_out}


def consortium_site_names(consortium: ConsortiumSettings) -> list[str]:
    """The site names a consortium will have, without writing it (for [policy.<site>] tables)."""
    if consortium.folders:
        return [Path(f).name for f in consortium.folders]
    if consortium.source == "vertebral_column":
        return [VERTEBRAL_SITE.format(i + 1) for i in range(consortium.sites)]
    return [profile.name for profile in site_profiles(consortium.sites)]


def shipped_scenarios() -> list[str]:
    """The names of the scenarios shipped in simulations/scenarios/."""
    folder = resources.files("spine_fl.simulations") / "scenarios"
    return sorted(entry.name[:-len(".toml")] for entry in folder.iterdir() if entry.name.endswith(".toml"))


def load(scenario: str | Path | None) -> Scenario:
    """A scenario file or shipped name, every problem in it (policies and site folders too) found before any work."""
    path = packaged_scenario("default") if scenario is None else Path(scenario)
    if not path.exists() and not path.suffix:
        if str(scenario) not in shipped_scenarios():
            raise ConfigError(f"{scenario}: no such file and no shipped scenario of that name; give a scenario "
                              f".toml file or one of {', '.join(shipped_scenarios())} (spine-fl simulate --list)")
        path = packaged_scenario(str(scenario))
    loaded = load_scenario(path, site_names=consortium_site_names, check_policy=policy_from_table)
    check_folders(loaded)
    return loaded


def describe(path: Path) -> str:
    """A scenario's description: its first line when that is a comment (the shipped files have one)."""
    first = (path.read_text(encoding="utf-8").splitlines() or [""])[0]
    return first.lstrip("#").strip() if first.startswith("#") else ""


def scenario_line(name: str) -> str:
    """One shipped scenario in a line: name, task, sites, rounds, DP and SecAgg+, description."""
    path = packaged_scenario(name)
    try:
        s = load(path)
    except ConfigError as exc:
        return f"{name}: INVALID ({exc.problems[0] if exc.problems else exc})"
    on = {True: "on", False: "off"}
    return (f"{name}: task {s.run.task}, {s.consortium.sites} {s.consortium.source} site(s), {s.run.rounds} rounds, "
            f"DP {on[s.run.dp]}, SecAgg+ {on[s.run.secagg]}" + (f" - {d}" if (d := describe(path)) else ""))
