"""The `spine-fl` command: one entry point for sites, the coordinator, researchers and auditors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="spine-fl: federated outcome prediction for spine clinics.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()


@app.command()
def synth(
    out: Path = typer.Option(Path("consortium"), help="folder to write the site folders into"),
    sites: int = typer.Option(3, min=1, help="number of hospitals"),
    seed: int = typer.Option(7, help="same seed, same consortium"),
    modality: list[str] = typer.Option(["radiograph", "mri"], help="image sets to write: radiograph, mri (repeat)"),
) -> None:
    """Write a deterministic synthetic consortium in the site data contract's format."""
    from spine_fl.shared.synthetic_consortium import synthesize_consortium

    bad = sorted(set(modality) - {"radiograph", "mri"})
    if bad:
        raise typer.BadParameter(f"unknown modality {', '.join(bad)}; use radiograph and/or mri", param_hint="--modality")
    with console.status("synthesising sites..."):
        dirs = synthesize_consortium(out, sites, seed, tuple(modality))
    for d in dirs:
        console.print(f"wrote {d}")


@app.command()
def validate(
    site_dir: Path = typer.Argument(..., help="the site folder (clinical.csv, manifest.csv, DICOM files)"),
    task: str = typer.Option(..., "--task", "-t", help="task to validate for, e.g. tfesi_radiograph"),
    image_size: int = typer.Option(64, help="model input size the images are prepared for"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Check a site's data against the task's contract; list every problem; exit 1 if unusable."""
    from spine_fl.shared.data_contract import validate_and_load
    from spine_fl.shared.tasks import UnknownTaskError, get_task

    try:
        task_def = get_task(task)
    except UnknownTaskError as exc:
        raise typer.BadParameter(str(exc), param_hint="--task") from None
    with console.status(f"validating {site_dir} for {task}..."):
        _, report = validate_and_load(site_dir, task_def, image_size)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for problem in report.problems:
            colour = "red" if problem.severity == "error" else "yellow"
            console.print(f"[{colour}]{problem.severity.upper()}[/] {problem.where}\n    {problem.what}\n    -> {problem.action}",
                          highlight=False)
        verdict = "[green]usable[/]" if report.usable else "[red]NOT usable[/]"
        console.print(f"{site_dir}: {verdict} for {task} - {len(report.errors)} error(s), "
                      f"{len(report.warnings)} warning(s); counts {report.counts}", highlight=False)
    raise typer.Exit(0 if report.usable else 1)


def _round_line(entry: dict) -> None:
    sites = "  ".join(f"{s} {m.get('auroc', math.nan):.3f}" for s, m in sorted(entry["per_site"].items()))
    console.print(f"round {entry['round']:>3}  held-out AUROC {entry['auroc']:.3f}  ({sites})", highlight=False)


@app.command()
def simulate(
    scenario: Optional[str] = typer.Option(None, help="scenario TOML file or packaged name (default, vertebral)"),
    out: Path = typer.Option(Path("results/default"), help="results folder"),
) -> None:
    """Run a scenario on Flower's simulation engine, with pooled and local-only baselines."""
    from spine_fl.shared.config import ConfigError
    from spine_fl.simulations.runner import load, simulate as run_scenario

    try:
        chosen = load(scenario)
    except ConfigError as exc:
        console.print(f"[red]configuration error:[/] {exc}")
        raise typer.Exit(2) from None
    console.print(f"scenario {chosen.name}: task {chosen.run.task}, {chosen.consortium.sites} sites, "
                  f"{chosen.run.rounds} rounds of {chosen.run.strategy} -> {out}")
    metrics = run_scenario(chosen, out, on_round=_round_line)
    table = Table(title=f"{metrics['task']} - held-out patients")
    for col in ("", "AUROC", "accuracy", "sensitivity", "specificity", "Brier"):
        table.add_column(col)
    for name in ("federated", "pooled", "local_only"):
        m = metrics[name]
        table.add_row(name, *(f"{m[k]:.3f}" for k in ("auroc", "accuracy", "sensitivity", "specificity", "brier")))
    console.print(table)
    console.print(f"results in {out} ({metrics['timing']['total_seconds']} s)")


ledger_app = typer.Typer(help="The site's signed egress ledger.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")


@ledger_app.command("verify")
def ledger_verify(
    site: str = typer.Option(..., help="site name; its config is configs/sites/<site>.toml unless --config"),
    config: Optional[Path] = typer.Option(None, help="the site's TOML config (gives state_dir)"),
    state_dir: Optional[Path] = typer.Option(None, help="the site's state folder directly (e.g. a simulation's "
                                             "results/default/site-state/<site>)"),
) -> None:
    """Check every signature and hash link of the site's egress ledger; name the first broken line."""
    from spine_fl.client.egress_ledger import LEDGER_FILE, verify
    from spine_fl.client.site_config import load_site_config
    from spine_fl.shared.config import ConfigError

    if state_dir is None:
        try:
            state_dir = load_site_config(config or Path("configs/sites") / f"{site}.toml").state_dir
        except ConfigError as exc:  # the file, or a rule in its [policy]
            console.print(f"[red]{exc}[/] (or pass --state-dir)")
            raise typer.Exit(2) from None
    result = verify(state_dir)
    where = state_dir / LEDGER_FILE
    if result.ok:
        console.print(f"[green]ledger intact[/]: {where}, {result.lines} line(s), every signature and link valid")
        raise typer.Exit(0)
    line = f" at line {result.first_broken_line}" if result.first_broken_line else ""
    console.print(f"[red]ledger BROKEN{line}[/]: {where}: {result.problem}", highlight=False)
    raise typer.Exit(1)


if __name__ == "__main__":
    app()
