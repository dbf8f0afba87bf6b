"""What spine-fl adds to a round, against the same round written with plain PyTorch, Opacus and Flower.

Three configurations (no DP; DP-SGD; DP-SGD + SecAgg+), each with three arms on the same sites,
model, recipe and epochs, in one process:

- `spine-fl`: spine-fl's federation on Flower's simulation engine (spine_run);
- `plain in-process`: plain PyTorch (no DP) or plain Opacus, every site in turn, then FedAvg
  (plain_training): no framework at all;
- `plain Flower`: a minimal Flower app (plain_flower) training with the same plain code; with
  SecAgg+ it uses Flower's own SecAggPlusWorkflow + secaggplus_mod, with spine-fl's parameters.

The in-process arm runs inside each Flower run's round hook, so the rounds interleave (spine-fl
round, plain round, spine-fl round, ...); the two Flower runs alternate (their order flips every
repeat). Round 1 of every run is left out (Ray, imports, decoding). Besides the ratios of medians,
the file has the ratios of the fastest rounds and *paired* ratios (each Flower round over the
in-process round right after it, so both saw the same load; spine-fl / plain Flower is then the
ratio of the two paired medians): on a shared machine these move less with other people's work.
The in-process arm trains the sites one after another on one thread each, as Flower's engine
gives each site one CPU; but the engine runs as many sites at once as it has CPUs, so the
in-process round is the *sum* of the sites' work (recorded under "threads").
Then one more spine-fl run, profiled (profiling), says what the difference is made of.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from spine_fl.simulations.benchmarks import overhead_report, plain_flower, plain_training, profiling, spine_run
from spine_fl.simulations.benchmarks.measure import ratio, summary
from spine_fl.simulations.benchmarks.plain_training import Recipe

Say = Callable[[str], None]


@dataclass(frozen=True)
class Config:
    name: str
    dp: bool
    secagg: bool
    plain_name: str  # what the in-process arm is


CONFIGS = {c.name: c for c in (Config("no-dp", False, False, "plain PyTorch"),
                               Config("dp", True, False, "plain Opacus"),
                               Config("dp+secagg", True, True, "plain Opacus"))}
# Without DP's clipping, SGD at the DP learning rate diverges: both arms then use Adam 1e-3, as the
# privacy benchmark does; everything else (epochs, batch size, data, model) is the scenario's.
WITHOUT_DP = {"optimizer": "adam", "learning_rate": 1e-3}
TARGETS = {"no-dp": ("plain in-process", 1.1), "dp+secagg": ("plain Flower", 1.25)}


class Clock:
    """Seconds between round hooks, leaving out the time the hook itself spends on other arms."""

    def __init__(self) -> None:
        self.mark = time.perf_counter()
        self.rounds: list[float] = []

    def lap(self) -> None:
        self.rounds.append(time.perf_counter() - self.mark)

    def restart(self) -> None:
        self.mark = time.perf_counter()


@dataclass
class Workload:
    """The sites (folders for spine-fl, arrays for the yardstick), the model and the recipe."""

    task: str
    model: Any
    site_dirs: list[Path]
    arrays: list[Path]


def prepare(task: str, sites: int, data_dir: Path, say: Say) -> Workload:
    from spine_fl.shared.contract.data_contract import load_site
    from spine_fl.shared.models.registry import build_model

    scenario = spine_run.scenario_for(task, sites, rounds=2, dp=True, secagg=True)
    say(f"writing {sites} synthetic sites for {task} ...")
    site_dirs = spine_run.write_sites(scenario, data_dir / "sites")
    arrays = []
    for folder in site_dirs:
        path = data_dir / f"{folder.name}.npz"
        plain_training.save_site_arrays(path, load_site(folder, scenario.run.task_spec, scenario.run.image_size))
        arrays.append(path)
    model = build_model(scenario.run.task_spec, scenario.run.seed)
    return Workload(task, model, site_dirs, arrays)


def recipe_of(run: Any) -> Recipe:
    return Recipe(run.local_epochs, run.batch_size, run.optimizer, run.learning_rate, run.dp,
                  run.noise_multiplier, run.max_grad_norm)


def secagg_params(run: Any, sites: int) -> plain_flower.SecAggParams:
    """spine-fl's SecAgg+ parameters for a round of `sites` sites, read from its workflow, so the
    yardstick shares and unmasks exactly as spine-fl does."""
    from spine_fl.server.secure_aggregation import secagg_fit_workflow

    w = secagg_fit_workflow(run)
    shares, threshold = (w.num_shares, w.reconstruction_threshold)
    if hasattr(w, "shares_for"):  # spine-fl decides the share count per round from the sites selected
        count, threshold = w.shares_for(sites)
        shares = 1.0 if count >= sites else count
    return plain_flower.SecAggParams(shares, threshold, w.max_weight, w.clipping_range, w.quantization_range)


def _hook(clock: Clock, plain: plain_training.PlainFederation, plain_times: list[float], arm: str,
          say: Say) -> Callable[[int], None]:
    """The round hook of a Flower run: stop its clock, run one in-process round, restart the clock."""
    def on_round(server_round: int) -> None:
        clock.lap()
        started = time.perf_counter()
        plain.run_round()
        plain_times.append(time.perf_counter() - started)
        say(f"  round {server_round}: {arm} {clock.rounds[-1]:.2f} s, plain in-process {plain_times[-1]:.2f} s")
        clock.restart()

    return on_round


def measure_config(config: Config, work: Workload, rounds: int, repeats: int, tmp: Path, say: Say) -> dict[str, Any]:
    changes = {} if config.dp else WITHOUT_DP
    scenario = spine_run.scenario_for(work.task, len(work.site_dirs), rounds, config.dp, config.secagg, **changes)
    recipe = recipe_of(scenario.run)
    secagg = secagg_params(scenario.run, len(work.site_dirs)) if config.secagg else None
    threads = max(1, int(scenario.cpus_per_site))  # as many as Flower's engine gives one site
    times: dict[str, list[float]] = {"spine-fl": [], "plain in-process": [], "plain Flower": []}
    paired: dict[str, list[float]] = {"spine-fl": [], "plain Flower": []}  # round / the in-process round after it
    observed: dict[str, Any] = {}
    for rep in range(repeats):
        order = ("spine-fl", "plain Flower") if rep % 2 == 0 else ("plain Flower", "spine-fl")
        for arm in order:
            say(f"{config.name}: {arm} run {rep + 1}/{repeats} ({rounds} rounds; round 1 left out)")
            clock, plain_times = Clock(), []
            plain = plain_training.PlainFederation(work.model, work.arrays, recipe, threads)
            hook = _hook(clock, plain, plain_times, arm, say)
            if arm == "spine-fl":
                spine_run.run(scenario, work.site_dirs, tmp / f"{config.name}-{rep}", hook)
            else:
                observed = plain_flower.run(work.model, work.arrays, recipe, rounds, secagg, hook,
                                            scenario.cpus_per_site)
            times[arm] += clock.rounds[1:]
            times["plain in-process"] += plain_times[1:]
            paired[arm] += [a / b for a, b in zip(clock.rounds[1:], plain_times[1:])]
    arms = {arm: summary(values) for arm, values in times.items()}
    med = {arm: s["median"] for arm, s in arms.items()}
    low = {arm: s["min"] for arm, s in arms.items()}
    per = {arm: statistics.median(v) if v else None for arm, v in paired.items()}
    out = {"dp": config.dp, "secagg": config.secagg, "in_process_arm": config.plain_name,
           "recipe": vars(recipe), "round_seconds": arms,
           "ratios": {"spine-fl / plain in-process": ratio(med["spine-fl"], med["plain in-process"]),
                      "spine-fl / plain Flower": ratio(med["spine-fl"], med["plain Flower"]),
                      "plain Flower / plain in-process": ratio(med["plain Flower"], med["plain in-process"])},
           "ratios_of_fastest_rounds": {
               "spine-fl / plain in-process": ratio(low["spine-fl"], low["plain in-process"]),
               "spine-fl / plain Flower": ratio(low["spine-fl"], low["plain Flower"])},
           "ratios_paired": {
               "spine-fl / plain in-process": _round(per["spine-fl"]),
               "plain Flower / plain in-process": _round(per["plain Flower"]),
               "spine-fl / plain Flower": ratio(per["spine-fl"], per["plain Flower"])},
           "seconds_per_round_over_plain": {
               "flower_and_ray (plain Flower - plain in-process)": _diff(med["plain Flower"], med["plain in-process"]),
               "spine_fl (spine-fl - plain Flower)": _diff(med["spine-fl"], med["plain Flower"])},
           "threads": {"in_process_torch_threads": threads,
                       "flower_site_torch_threads": observed.get("site_torch_threads"),
                       "flower_sites_in_parallel": min(len(work.site_dirs), int((os.cpu_count() or 1)
                                                                                // max(scenario.cpus_per_site, 1e-9)))}}
    if config.name in TARGETS:
        against, target = TARGETS[config.name]
        key = f"spine-fl / {against}"
        got = out["ratios"][key]
        out["target"] = {"ratio": key, "at_most": target, "measured": got,
                         "met": None if got is None else got <= target,
                         "measured_paired": out["ratios_paired"][key],
                         "measured_fastest_rounds": out["ratios_of_fastest_rounds"][key]}
        out["target"]["verdict"] = overhead_report.verdict(out["target"])
    say(f"{config.name}: median s/round " + ", ".join(f"{a} {m}" for a, m in med.items()) + f"; {out['ratios']}; "
        f"paired {out['ratios_paired']}")
    return out


def _round(x: float | None) -> float | None:
    return round(x, 2) if x is not None else None


def _diff(a: float | None, b: float | None) -> float | None:
    return round(a - b, 3) if a is not None and b is not None else None


def profile_config(config: Config, work: Workload, rounds: int, tmp: Path, say: Say) -> dict[str, Any]:
    """One more spine-fl run of `config` under cProfile (slower than unprofiled: compare shares, not seconds)."""
    changes = {} if config.dp else WITHOUT_DP
    scenario = spine_run.scenario_for(work.task, len(work.site_dirs), rounds, config.dp, config.secagg, **changes)
    folder = tmp / "profiles"
    folder.mkdir(parents=True, exist_ok=True)
    server = profiling.ServerProfiler(folder)
    clock = Clock()

    def hook(server_round: int) -> None:
        clock.lap()
        say(f"  profiled round {server_round}: {clock.rounds[-1]:.2f} s")
        server.cut(server_round)
        clock.restart()

    say(f"{config.name}: profiling a spine-fl run ({rounds} rounds; rounds 2-{rounds} summarised)")
    with server.patched():
        spine_run.run(scenario, work.site_dirs, tmp / f"profiled-{config.name}", hook,
                      outer_mods=[profiling.profiling_mod(folder)])
    kept = range(2, rounds + 1)
    out: dict[str, Any] = {"config": config.name, "rounds_summarised": f"2-{rounds}",
                           "profiled_round_seconds": summary(clock.rounds[1:])}
    for side in ("site", "server"):
        stats = profiling.load(folder, side, kept)
        out["sites (all virtual sites together)" if side == "site" else "coordinator"] = \
            profiling.summarize(stats, len(kept)) if stats else None
    return out


def run(rounds: int, repeats: int, configs: list[str], task: str, sites: int, profile: bool,
        say: Say, keep: Callable[[dict[str, Any]], None] = lambda figures: None) -> dict[str, Any]:
    """`keep` gets the figures so far after each configuration (a stopped run keeps them)."""
    if rounds < 2:
        raise ValueError("the overhead suite needs --rounds 2 or more: round 1 (start-up) is left out")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        work = prepare(task, sites, tmp, say)
        out: dict[str, Any] = {
            "workload": {"task": task, "sites": sites, "rounds_per_run": rounds, "repeats": repeats,
                         "model": type(work.model).__name__,
                         "parameters": sum(p.numel() for p in work.model.parameters()),
                         "rounds_measured": f"2-{rounds} of every run",
                         "state": "every spine-fl run starts with empty site ledgers"},
            "configs": {}, "profile": None}
        for c in configs:
            out["configs"][c] = measure_config(CONFIGS[c], work, rounds, repeats, tmp, say)
            keep(out)
        if profile:
            chosen = "dp+secagg" if "dp+secagg" in configs else configs[-1]
            out["profile"] = profile_config(CONFIGS[chosen], work, rounds, tmp, say)
    return out
