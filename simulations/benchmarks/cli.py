"""`spine-fl benchmark SUITE`: one command for every benchmark (registered in spine_fl/cli.py).

Imports only typer and rich here: the suites, with torch and Flower, load when one runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
SUITE_NAMES = ("overhead", "scaling", "deployment", "privacy", "models")


def _ints(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give whole numbers separated by commas, e.g. 10,30", param_hint=option) \
            from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{text!r}: give at least one number, each 1 or more", param_hint=option)
    return values


def _names(text: str | None) -> list[str] | None:
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


def _command(suite: str, given: dict[str, object]) -> str:
    """The command with every option that was given: what to type to run it again."""
    parts = ["spine-fl", "benchmark", suite]
    for name, value in given.items():
        if value is True:
            parts.append(f"--{name}")
        elif value is False:
            parts.append(f"--no-{name}")
        elif value is not None:
            parts += [f"--{name}", str(value)]
    return " ".join(parts)


def benchmark(
    suite: str = typer.Argument(..., help="overhead | scaling | deployment | privacy | models"),
    rounds: Optional[int] = typer.Option(None, min=1, help="rounds per run (default: overhead 6, scaling 3, "
                                         "deployment 5, privacy the scenario's; models: the federation of each image network, 3)"),
    out: Optional[Path] = typer.Option(None, help="results file (default benchmarks/<suite>.json)"),
    readme: Optional[Path] = typer.Option(None, help="README whose results table gets the suite's row "
                                          "(default: README.md beside --out)"),
    sites: Optional[str] = typer.Option(None, help="scaling: virtual site counts, comma-separated (default 10,30,100)"),
    models: Optional[str] = typer.Option(None, help="models: registry models, comma-separated (default all)"),
    configs: Optional[str] = typer.Option(None, help="overhead: no-dp,dp,dp+secagg (default all three)"),
    image_size: Optional[int] = typer.Option(None, min=32, max=512, help="models: input size of the image networks' "
                                             "federation (default: each network's own, 224 px for MONAI's)"),
    repeats: Optional[int] = typer.Option(None, min=1, help="runs per arm, their order alternating: overhead, per "
                                          "configuration (default 1); deployment, per engine (default 2)"),
    profile: bool = typer.Option(True, "--profile/--no-profile", help="overhead: one more spine-fl run under "
                                 "cProfile, to say what the difference is made of"),
    smoke: bool = typer.Option(False, "--smoke", help="the smallest run of the suite (CI: checks that it works; "
                               "its figures mean nothing)"),
) -> None:
    """Run a benchmark suite: its JSON (machine, load, commit, command, figures), its README row.

    overhead: spine-fl vs plain PyTorch / Opacus / Flower SecAgg+. scaling: 10 / 30 / 100 sites.

    deployment: deployment engine vs simulation. privacy: DP and SecAgg+ on and off.

    models: the model registry and Opacus' per-sample-gradient modes.

    Exit 0: written. Exit 1: the suite failed (nothing written). Exit 2: bad arguments."""
    from spine_fl.simulations.benchmarks.suites import BadOption, Options, run_suite

    if suite not in SUITE_NAMES:
        raise typer.BadParameter(f"unknown suite {suite!r}; use one of {', '.join(SUITE_NAMES)}", param_hint="SUITE")
    out = out or Path("benchmarks") / f"{suite}.json"
    readme = readme or out.parent / "README.md"
    options = Options(rounds=rounds, smoke=smoke, sites=_ints(sites, "--sites"), models=_names(models),
                      configs=_names(configs), repeats=repeats, profile=profile, image_size=image_size,
                      say=lambda line: console.print(escape(line), highlight=False, soft_wrap=True))
    command = _command(suite, {"rounds": rounds, "sites": sites, "models": models, "configs": configs,
                               "image-size": image_size, "repeats": repeats,
                               "profile": None if profile else False, "smoke": smoke or None, "out": out})
    console.print(f"benchmark {suite}: {command}", highlight=False, soft_wrap=True)
    try:
        report = run_suite(suite, options, out, readme, command)
    except BadOption as exc:
        console.print(f"[red]{escape(str(exc))}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # noqa: BLE001 - a failed suite writes nothing; say why
        console.print(f"[red]benchmark {suite} failed:[/] {escape(f'{type(exc).__name__}: {exc}')}", highlight=False,
                      soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"{escape(report['headline'])}\nwrote {escape(str(out))} and its row in {escape(str(readme))}",
                  highlight=False, soft_wrap=True)
