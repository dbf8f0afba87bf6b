"""The suites `spine-fl benchmark SUITE` runs, each as: run (the figures), headline, README sections.

`run_suite` wraps every suite the same way: the file's head (machine, load, commit, command), the
suite's figures, the load at the end, the JSON written atomically, the suite's README sections and
its row in the results table. `--smoke` runs each suite at its smallest (CI checks that it works;
its figures mean nothing).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from spine_fl.simulations.benchmarks import readme_table, record
from spine_fl.simulations.benchmarks.record import section_heading

Say = Callable[[str], None]


class BadOption(ValueError):
    """An option the suite cannot run with (the command exits 2; nothing is run)."""


@dataclass(frozen=True)
class Options:
    rounds: int | None = None
    smoke: bool = False
    sites: list[int] | None = None
    models: list[str] | None = None
    configs: list[str] | None = None
    repeats: int | None = None  # runs per arm; each suite has its own default
    profile: bool = True
    image_size: int | None = None
    say: Say = print
    # the figures so far, written as incomplete (models, overhead and scaling: after each part)
    keep: Callable[[dict[str, Any]], None] = lambda figures: None


@dataclass(frozen=True)
class Suite:
    run: Callable[[Options], dict[str, Any]]
    headline: Callable[[dict[str, Any]], str]
    write_sections: Callable[[dict[str, Any], Path, str], None] = field(default=lambda report, readme, file: None)
    about: str = ""


def _overhead(o: Options) -> dict[str, Any]:
    from spine_fl.simulations.benchmarks import overhead, overhead_report

    configs = o.configs or (["dp+secagg"] if o.smoke else list(overhead.CONFIGS))
    unknown = sorted(set(configs) - set(overhead.CONFIGS))
    if unknown:
        raise BadOption(f"unknown configuration {', '.join(unknown)}; use {', '.join(overhead.CONFIGS)}")
    rounds = o.rounds or (2 if o.smoke else 6)
    if rounds < 2:
        raise BadOption("the overhead suite needs --rounds 2 or more: round 1 (start-up) is left out")
    figures = overhead.run(rounds=rounds, repeats=o.repeats or 1, configs=configs,
                           task="rbp_tabular" if o.smoke else "tfesi_radiograph", sites=3,
                           profile=o.profile and not o.smoke, say=o.say, keep=o.keep)
    figures["remaining_difference"] = overhead_report.remaining(figures)
    return figures


def _overhead_sections(report: dict[str, Any], readme: Path, results_file: str) -> None:
    from spine_fl.simulations.benchmarks import overhead_report

    readme_table.upsert_section(readme, section_heading("## overhead", report),
                                overhead_report.readme_section(report))


def _overhead_headline(report: dict[str, Any]) -> str:
    from spine_fl.simulations.benchmarks import overhead_report

    return overhead_report.headline(report)


def _scaling(o: Options) -> dict[str, Any]:
    from spine_fl.simulations.benchmarks import scaling

    return scaling.run(o.sites or ([2] if o.smoke else list(scaling.SIZES)), o.rounds or (1 if o.smoke else 3), o.say,
                       o.keep)


def _scaling_headline(report: dict[str, Any]) -> str:
    from spine_fl.simulations.benchmarks import scaling

    return scaling.headline(report)


def _deployment(o: Options) -> dict[str, Any]:
    from spine_fl.simulations.benchmarks import deployment

    rounds = o.rounds or (2 if o.smoke else 5)
    if not 2 <= rounds <= 100:
        raise BadOption("the deployment suite needs --rounds 2 to 100: round 1 is left out of the medians")
    return deployment.run(rounds, o.repeats or (1 if o.smoke else 2), o.say)


def _deployment_headline(report: dict[str, Any]) -> str:
    from spine_fl.simulations.benchmarks import deployment

    return deployment.headline(report)


def _privacy(o: Options) -> dict[str, Any]:
    from spine_fl.simulations.benchmarks import privacy, spine_run

    if o.smoke:  # one setting, one round of the tabular task: no DICOMs to write or decode
        scenario = spine_run.scenario_for("rbp_tabular", 3, 1, dp=True, secagg=True)
        return privacy.run(o.rounds or 1, scenario, ["dp+secagg"], o.say)
    return privacy.run(o.rounds, None, None, o.say)


def _privacy_headline(report: dict[str, Any]) -> str:
    from spine_fl.simulations.benchmarks import privacy

    return privacy.headline(report)


def _models(o: Options) -> dict[str, Any]:
    from spine_fl.simulations.benchmarks import dp_modes, models

    names = o.models or (["logistic"] if o.smoke else list(models.PLAN))
    unknown = sorted(set(names) - set(models.PLAN))
    if unknown:
        raise BadOption(f"unknown model {', '.join(unknown)}; the suite has {', '.join(models.PLAN)}")
    out: dict[str, Any] = {"results": models.run(names, o.say), "consortium": []}
    o.keep(out)
    federated = [n for n in names if n in models.CONSORTIUM_MODELS]
    with tempfile.TemporaryDirectory() as tmp:  # smoke: the small CNN, one round at 32 px
        for n in ["small_cnn"] if o.smoke else federated:
            out["consortium"].append(models.consortium_run(n, 1 if o.smoke else o.rounds or 3,
                                                           32 if o.smoke else o.image_size, Path(tmp) / n, o.say))
            o.keep(out)
    mode_models = [m for m in dp_modes.PLAN if not o.models or m in o.models] or list(dp_modes.PLAN)
    with tempfile.TemporaryDirectory() as tmp:
        if o.smoke:
            out["grad_sample_modes"] = dp_modes.run(["small_cnn"], ["hooks"], 1, o.say, Path(tmp))
        else:
            out["grad_sample_modes"] = dp_modes.run(mode_models, list(dp_modes.MODES), None, o.say, Path(tmp))
    return out


def _models_sections(report: dict[str, Any], readme: Path, results_file: str) -> None:
    from spine_fl.simulations.benchmarks import dp_modes, models

    models.write_readme(readme, {**report, **models.legacy_fields(report)},
                        section_heading(models.README_SECTION, report), results_file)
    readme_table.upsert_section(readme, section_heading("## per-sample-gradient modes", report),
                                dp_modes.readme_section(report["grad_sample_modes"]))


def _models_headline(report: dict[str, Any]) -> str:
    from spine_fl.simulations.benchmarks import models

    chosen = report["grad_sample_modes"]["recommended"]
    modes = ", ".join(f"{m} -> {c['mode']}" for m, c in chosen.items())
    return f"{models.headline(report)}; DP mode: {modes}"


SUITES: dict[str, Suite] = {
    "overhead": Suite(_overhead, _overhead_headline, _overhead_sections,
                      "spine-fl's round vs plain PyTorch / Opacus / Flower SecAgg+ (no DP, DP, DP + SecAgg+)"),
    "scaling": Suite(_scaling, _scaling_headline, about="10 / 30 / 100 virtual sites, tabular task, DP + SecAgg+"),
    "deployment": Suite(_deployment, _deployment_headline,
                        about="deployment engine (TLS, SuperNode auth) vs simulation, same scenario"),
    "privacy": Suite(_privacy, _privacy_headline, about="the default scenario with DP and SecAgg+ on and off"),
    "models": Suite(_models, _models_headline, _models_sections,
                    about="one DP round per registry model, and Opacus' per-sample-gradient modes"),
}


def run_suite(name: str, options: Options, out: Path, readme: Path, command: str) -> dict[str, Any]:
    """Run suite `name`; write `out` and its sections and row in `readme`; the report."""
    suite = SUITES[name]
    report = record.envelope(name, command)
    report.update(suite.run(replace(options, keep=lambda figures: record.keep_partial({**report, **figures}, out))))
    report["headline"] = suite.headline(report)
    record.finish(report, out)
    suite.write_sections(report, readme, out.name)
    readme_table.upsert_row(readme, name, report["date"], command, report["headline"], out)
    return report
