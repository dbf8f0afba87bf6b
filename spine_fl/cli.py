"""The `spine-fl` command: one entry point for sites, the coordinator, researchers and auditors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from spine_fl.client.audit.cli import audit
from spine_fl.server.reporting.cli import report as report_command
from spine_fl.simulations.benchmarks.cli import benchmark
from spine_fl.shared.contract.report import ValidationReport

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
    from spine_fl.simulations.synthetic.consortium import synthesize_consortium

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
    task: str = typer.Option(..., "--task", "-t", help="a shipped task (e.g. tfesi_radiograph) or a task file (.toml)"),
    image_size: int = typer.Option(64, help="model input size the images are prepared for (pixels; at least 8 "
                                   "for an image task, as the run's image_size)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Check a site's data against the task's contract; list every problem; exit 1 if unusable."""
    from spine_fl.shared.config import MIN_IMAGE_SIZE, ConfigError
    from spine_fl.shared.contract.data_contract import validate_and_load
    from spine_fl.shared.contract.task_file import task_sha256
    from spine_fl.shared.contract.tasks import UnknownTaskError, resolve_task

    try:
        task_def = resolve_task(task)
    except (UnknownTaskError, ConfigError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--task") from None
    task = task_def.name
    # the bounds the run's configuration enforces on image_size (shared/config.py)
    if image_size < 1 or (task_def.image is not None and image_size < MIN_IMAGE_SIZE):
        why = (f"the {task} model needs at least {MIN_IMAGE_SIZE} pixels (its CNN halves the image three times)"
               if task_def.image is not None else "an image size is a number of pixels, 1 or more")
        raise typer.BadParameter(f"{image_size} is too small: {why}; give the run's image_size, e.g. 64 (the "
                                 "default)", param_hint="--image-size")
    with console.status(f"validating {site_dir} for {task}..."):
        _, report = validate_and_load(site_dir, task_def, image_size)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report, site_dir, task)
        # what a site writes in its policy to approve exactly this definition
        console.print(f"task {task}@{task_sha256(task_def)}", highlight=False, soft_wrap=True)
    raise typer.Exit(0 if report.usable else 1)


def _print_report(report: ValidationReport, site_dir: Path, task: str) -> None:
    """The validator's findings, as `spine-fl validate` prints them."""
    for problem in report.problems:
        colour = "red" if problem.severity == "error" else "yellow"
        console.print(f"[{colour}]{problem.severity.upper()}[/] {escape(problem.where)}\n    "
                      f"{escape(problem.what)}\n    -> {escape(problem.action)}", highlight=False)
    verdict = "[green]usable[/]" if report.usable else "[red]NOT usable[/]"
    console.print(f"{escape(str(site_dir))}: {verdict} for {task} - {len(report.errors)} error(s), "
                  f"{len(report.warnings)} warning(s); counts {report.counts}", highlight=False)


@app.command()
def predict(
    model: Path = typer.Argument(..., help="the run's model.pt, or the run folder holding it"),
    site_dir: Path = typer.Option(..., "--site-dir", help="this site's folder (clinical.csv, manifest.csv, DICOM "
                                  "files); outcome columns are not needed"),
    out: Path = typer.Option(..., "--out", help="folder for predictions.csv, explanations.json and the images"),
    patient: Optional[str] = typer.Option(None, "--patient", help="explain only this patient (every patient is "
                                          "still scored)"),
    explain: int = typer.Option(5, "--explain", min=0, help="explain the first N patients (ignored with --patient)"),
) -> None:
    """Score this site's patients with a finished run's model, and explain the first few.

    Everything stays at the site: the model file and the folder are read locally, the results are
    written to --out, and nothing is sent over the network. The folder is validated against the
    model's task first, with the messages of `spine-fl validate`.

    Writes OUT/predictions.csv (patient_id, probability, decision, threshold, one row per patient;
    decision 1 when probability >= threshold; the threshold is the run's recommended one, or 0.5
    marked uncalibrated when the run recorded none), OUT/explanations.json and per explained
    patient a saliency overlay per image view and/or a bar chart of the predictors' contributions
    (Integrated Gradients) in OUT/explanations/. Uses CUDA when present, else the CPU.

    Exit 0: scored. Exit 1: the folder is not usable for the model's task (the validator's report).
    Exit 2: the model file cannot be read, its run did not complete (stopped, or trained no round:
    such weights score no patient), or --patient names no patient that can be scored.

    The image size is the one the run trained at, read from the model file."""
    from spine_fl.client.prediction.predict import (
        ModelFileError,
        UnknownPatientError,
        UnusableSiteError,
        outcome_words,
        predict_site,
    )

    try:
        with console.status(f"scoring {site_dir}..."):
            result = predict_site(model, site_dir, out, patient=patient, explain=explain)
    except ModelFileError as exc:
        console.print(f"[red]cannot use the model:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except UnusableSiteError as exc:
        _print_report(exc.report, site_dir, exc.report.task)
        console.print("[red]nothing was scored[/]: fix the errors above (`spine-fl validate` shows the same report)",
                      highlight=False)
        raise typer.Exit(1) from None
    except UnknownPatientError as exc:
        console.print(f"[red]--patient {escape(exc.patient)}:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if result.report.problems:
        _print_report(result.report, site_dir, result.task.name)
    console.print(f"task {result.task.name}: probability of {escape(outcome_words(result.task))}; "
                  f"{escape(result.threshold.note)}", highlight=False, soft_wrap=True)
    console.print(f"scored {len(result.patient_ids)} patient(s) on {result.device} ({result.positives} at or above "
                  f"the threshold) -> {escape(str(out / 'predictions.csv'))}", highlight=False, soft_wrap=True)
    if result.explained:
        console.print(f"explained {', '.join(map(escape, result.explained))} -> {escape(str(out / 'explanations'))}"
                      f" and {escape(str(out / 'explanations.json'))}", highlight=False, soft_wrap=True)


def _round_line(entry: dict) -> None:
    sites = "  ".join(f"{s} {m.get('auroc', math.nan):.3f}" for s, m in sorted(entry["per_site"].items()))
    console.print(f"round {entry['round']:>3}  held-out AUROC {entry['auroc']:.3f}  ({sites})", highlight=False)


SIMULATE_STOPPED = 3  # the federation stopped before its last round: its metrics are no result


@app.command()
def simulate(
    scenario: Optional[str] = typer.Option(None, help="scenario TOML file or shipped name (see --list)"),
    out: Path = typer.Option(Path("results/default"), help="results folder"),
    list_scenarios: bool = typer.Option(False, "--list", help="list the shipped scenarios, one line each, and exit"),
) -> None:
    """Run a scenario on Flower's simulation engine, with pooled and local-only baselines.

    Exit 0: the run completed.

    Exit 2: the scenario is invalid; every problem is listed and nothing is run.

    Exit 3: the federation stopped early (too few sites, sites refused); the reason is printed, and the
    metrics are those of an unfinished model, not a result."""
    from spine_fl.shared.config import ConfigError
    from spine_fl.shared.contract.data_contract import SiteDataError
    from spine_fl.simulations.runner import load
    from spine_fl.simulations.runner import simulate as run_scenario

    if list_scenarios:
        _list_scenarios()
        return
    try:
        chosen = load(scenario)
    except ConfigError as exc:
        console.print(f"[red]configuration error[/] (nothing was run):\n{escape(str(exc))}", highlight=False,
                      soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(f"scenario {chosen.name}: task {chosen.run.task}, {chosen.consortium.sites} sites, "
                  f"{chosen.run.rounds} rounds of {chosen.run.strategy} -> {out}")
    try:
        metrics = run_scenario(chosen, out, on_round=_round_line)
    except SiteDataError as exc:  # a site folder the run cannot use (the validator's report)
        console.print(f"[red]a site's data are unusable[/] (nothing was trained; {escape(str(out))}/run_status.json "
                      f"says failed):\n{escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    _metrics_table(metrics)
    console.print(f"results in {out} ({metrics['timing']['total_seconds']} s)")
    if metrics.get("status") == "stopped":
        console.print(f"[red]run stopped: {escape(str(metrics.get('stop_reason')))}[/]\nthe metrics above are "
                      "those of an unfinished model, not a result", highlight=False, soft_wrap=True)
        raise typer.Exit(SIMULATE_STOPPED)


def _list_scenarios() -> None:
    """`simulate --list`: one line per shipped scenario (simulations/scenarios/*.toml)."""
    from spine_fl.simulations.runner import scenario_line, shipped_scenarios

    for name in shipped_scenarios():
        console.print(escape(scenario_line(name)), highlight=False, soft_wrap=True)


def _metrics_table(metrics: dict) -> None:
    """The held-out metrics of the federated model and both baselines."""
    table = Table(title=f"{metrics['task']} - held-out patients")
    for col in ("", "AUROC", "accuracy", "sensitivity", "specificity", "Brier"):
        table.add_column(col)
    for name in ("federated", "pooled", "local_only"):
        m = metrics[name]
        table.add_row(name, *(f"{m[k]:.3f}" for k in ("auroc", "accuracy", "sensitivity", "specificity", "brier")))
    console.print(table)


app.command("report")(report_command)
app.command()(audit)
app.command()(benchmark)

ledger_app = typer.Typer(help="The site's signed egress ledger.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")


@ledger_app.command("verify")
def ledger_verify(
    site: str = typer.Option(..., help="site name; its config is configs/sites/<site>.toml unless --config"),
    config: Optional[Path] = typer.Option(None, help="the site's TOML config (gives state_dir)"),
    state_dir: Optional[Path] = typer.Option(None, help="the site's state folder (e.g. /var/lib/spine-fl/leiden), "
                                             "or a folder of sites' state folders (a simulation's "
                                             "results/default/site-state): then <state-dir>/<site>"),
) -> None:
    """Check every signature and hash link of the site's egress ledger; name the first broken line.

    Exit 0: intact; 1: broken; 2: the ledger is not the site's (its lines name another site), or
    no state folder for the site was found."""
    from spine_fl.client.privacy.egress_ledger import KEY_FILE, LEDGER_FILE, PUBLIC_KEY_FILE, sites_named, verify
    from spine_fl.client.site_config import load_site_config
    from spine_fl.shared.config import ConfigError

    def own_folder(folder: Path) -> bool:
        return any((folder / name).exists() for name in (LEDGER_FILE, PUBLIC_KEY_FILE, KEY_FILE))

    if state_dir is None:
        path = config or Path("configs/sites") / f"{site}.toml"
        try:
            site_def = load_site_config(path)
        except ConfigError as exc:  # the file, or a rule in its [policy]
            console.print(f"[red]{escape(str(exc))}[/] (or pass --state-dir)")
            raise typer.Exit(2) from None
        if site_def.name != site:
            console.print(f"[red]{escape(str(path))} is for site {escape(site_def.name)!r}, not {escape(site)!r}[/]")
            raise typer.Exit(2)
        state_dir = site_def.state_dir
    elif (state_dir / site).is_dir():  # a folder of sites' state folders, as a simulation writes
        state_dir = state_dir / site
    elif not own_folder(state_dir):
        holds = sorted(d.name for d in state_dir.iterdir() if d.is_dir() and own_folder(d)) if state_dir.is_dir() else []
        found = f"; it holds the state folders of {', '.join(holds)}" if holds else ""
        console.print(f"[red]no egress ledger for site {escape(site)}[/]: {escape(str(state_dir))} is neither "
                      f"{escape(site)}'s state folder nor holds {escape(site)}/{escape(found)}", highlight=False)
        raise typer.Exit(2)
    result = verify(state_dir)
    where = state_dir / LEDGER_FILE
    named = sites_named(state_dir)
    if named - {site}:
        console.print(f"[red]not {escape(site)}'s ledger[/]: {escape(str(where))} records replies of site(s) "
                      f"{escape(', '.join(sorted(named)))}; nothing was verified for {escape(site)}", highlight=False)
        raise typer.Exit(2)
    if named:
        whose = f"site {site} (every line that names a site names {site})"
    elif state_dir.name == site:
        whose = f"site {site} (the folder's name; its lines do not name their site)"
    else:
        whose = (f"the folder given; NOT confirmed to be {site}'s: neither its lines nor its name say which "
                 "site wrote it")
    if result.ok:
        console.print(f"[green]ledger intact[/]: {escape(str(where))}, {result.lines} line(s), every signature "
                      f"and link valid; {escape(whose)}", highlight=False)
        raise typer.Exit(0)
    line = f" at line {result.first_broken_line}" if result.first_broken_line else ""
    console.print(f"[red]ledger BROKEN{line}[/]: {escape(str(where))}: {escape(result.problem)}; {escape(whose)}",
                  highlight=False)
    raise typer.Exit(1)


@app.command()
def server(
    config: Path = typer.Option(Path("configs/federation.toml"), help="the federation file"),
    insecure: bool = typer.Option(False, "--insecure", help="no TLS and no SuperNode authentication: "
                                  "local experiments only"),
    bundle: Optional[Path] = typer.Option(None, help="submit this app bundle (.fab) instead of building one "
                                          "from this checkout"),
) -> None:
    """Coordinate a real federation: start a SuperLink, wait for the enrolled sites, run, write results.

    The results folder's run_status.json says "running" during the run, then "completed", "stopped"
    or "failed" with the reason: a folder left by a failed run is never reported as a result."""
    import ssl

    import httpx

    from spine_fl.server.deployment.coordinator import run_coordinator
    from spine_fl.server.deployment.federation_config import load_federation
    from spine_fl.server.deployment.run_result import run_with_status
    from spine_fl.server.deployment.serverapp_worker import ServerAppTaskError
    from spine_fl.shared.config import ConfigError
    from spine_fl.shared.runtime.bundle import BundleError
    from spine_fl.shared.runtime.credentials import CredentialsError
    from spine_fl.shared.runtime.processes import ProcessStartError

    if insecure:
        console.print("[bold red]WARNING: --insecure: no TLS, any SuperNode may connect. Never use this with "
                      "patient data.[/]")
    try:
        fed = load_federation(config)
        # out_dir/run_status.json: running, then completed/stopped, or failed with the reason (as simulate writes it)
        result = run_with_status(fed.out_dir, lambda: run_coordinator(
            fed, insecure, on_round=_round_line, say=lambda m: console.print(m, highlight=False), bundle_file=bundle))
    except (ConfigError, CredentialsError, BundleError, FileNotFoundError, ProcessStartError) as exc:
        console.print(f"[red]cannot start:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    except (ServerAppTaskError, httpx.HTTPError, ssl.SSLError) as exc:
        console.print(f"[red]the run failed:[/] {escape(str(exc))} (the SuperLink's log is in {fed.state_dir})", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("interrupted; the SuperLink is stopped. Start again to resume after the last completed round.")
        raise typer.Exit(130) from None
    status = "[green]completed[/]" if result.status == "completed" else f"[red]stopped[/]: {result.stop_reason}"
    console.print(f"run {status}; results in {fed.out_dir}", highlight=False)
    raise typer.Exit(0 if result.status == "completed" else 1)


@app.command()
def client(
    site: str = typer.Option(..., help="this hospital's site name"),
    config: Optional[Path] = typer.Option(None, help="the site's TOML config (default configs/sites/<site>.toml)"),
    insecure: bool = typer.Option(False, "--insecure", help="no TLS, no site key: local experiments only"),
    runtime_port: int = typer.Option(9094, help="loopback port between the SuperNode and this process"),
    attempts: int = typer.Option(5, min=1, help="tries to reach the coordinator before giving up"),
    retry_seconds: float = typer.Option(3.0, help="pause between tries"),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for training (default: torch's)"),
) -> None:
    """Join a federation as one hospital: validate the data, connect out to the coordinator, serve."""
    from spine_fl.client.deployment.site_node import SiteCannotJoin, run_site
    from spine_fl.client.site_config import load_site_config, load_site_connection
    from spine_fl.shared.config import ConfigError
    from spine_fl.shared.runtime.processes import ProcessStartError

    path = config or Path("configs/sites") / f"{site}.toml"
    try:
        site_def, connection = load_site_config(path), load_site_connection(path)
        if site_def.name != site:
            raise ConfigError(f"{path} is for site {site_def.name!r}, not {site!r}")
        if insecure and site_def.policy.require_tls:
            raise ConfigError(f"--insecure refused: this site's policy requires TLS (require_tls = true, the "
                              f"default). Only for a local experiment without patient data, set require_tls = "
                              f"false in the [policy] section of {path}")
        if insecure:
            console.print("[bold red]WARNING: --insecure: no TLS and no site authentication (the site's policy "
                          "sets require_tls = false). Never use this with patient data.[/]")
        if threads:
            import torch

            torch.set_num_threads(threads)
        run_site(path, site_def, connection, insecure=insecure, runtime_port=runtime_port, attempts=attempts,
                 pause=retry_seconds, say=lambda m: console.print(m, highlight=False))
    except (ConfigError, SiteCannotJoin, ProcessStartError) as exc:
        console.print(f"[red]{site} is not joining:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print(f"{site}: interrupted; the SuperNode is stopped.")
        raise typer.Exit(130) from None


@app.command()
def certs(
    out: Path = typer.Option(Path("credentials"), help="folder for ca.crt, ca.key, server.crt, server.key"),
    host: list[str] = typer.Option([], help="name/IP sites use to reach the coordinator (repeat); "
                                   "localhost and 127.0.0.1 are always included"),
) -> None:
    """Coordinator: create the consortium CA and the coordinator's TLS certificate."""
    from spine_fl.shared.runtime.credentials import CredentialsError, create_server_credentials

    try:
        made = create_server_credentials(out, host)
    except CredentialsError as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(1) from None
    console.print(f"wrote {made.ca_cert} (give to every site), {made.cert}, {made.key} and {out / 'ca.key'} "
                  "(keep offline)", highlight=False)


@app.command()
def enroll(
    site: str = typer.Option(..., help="site name"),
    keys_dir: Path = typer.Option(Path("credentials"), help="where the site's key pair is written (at the site)"),
    federation: Optional[Path] = typer.Option(None, help="coordinator: add this site's public key to the "
                                              "federation file's enrolled sites"),
    public_key: Optional[Path] = typer.Option(None, help="coordinator: the SuperNode .pub file the site sent"),
    state_dir: Optional[Path] = typer.Option(None, help="site: its state folder; its ledger-signing key is created "
                                             "there and the public half copied to --keys-dir"),
    ledger_key: Optional[Path] = typer.Option(None, help="coordinator: the site's <site>_ledger_key.pub (pins "
                                              "the key that signs its ledgers; default: beside --public-key)"),
    replace: bool = typer.Option(False, help="coordinator: replace an enrolled site's keys (the site sent new ones)"),
) -> None:
    """Site: create the SuperNode key pair (and, with --state-dir, the ledger key). Coordinator: enrol
    a site's public keys (--federation)."""
    from spine_fl.client.privacy.signed_log import PUBLIC_KEY_FILE, load_or_create_key
    from spine_fl.server.deployment.enrolment import enrol_public_key
    from spine_fl.shared.config import ConfigError
    from spine_fl.shared.runtime.credentials import CredentialsError, create_site_keys

    ledger_name = f"{site}_ledger_key.pub"
    try:
        if federation is None:
            keys = create_site_keys(keys_dir, site)
            sent = f"{keys.public_key}"
            if state_dir is not None:
                load_or_create_key(state_dir)
                (keys_dir / ledger_name).write_bytes((state_dir / PUBLIC_KEY_FILE).read_bytes())
                sent += f" and {keys_dir / ledger_name}"
            console.print(f"wrote {keys.private_key} (stays at the site, mode 0600) and {sent} (send to the "
                          "coordinator)", highlight=False)
            return
        key_file = public_key or keys_dir / f"{site}_supernode_key.pub"
        ledger = ledger_key or key_file.with_name(ledger_name)
        replaced = enrol_public_key(federation, site, key_file, replace,
                                    ledger if ledger_key is not None or ledger.exists() else None)
        pinned = f" and its ledger key ({ledger})" if ledger_key is not None or ledger.exists() else \
            " (no ledger key: it is pinned on the site's first reply)"
        console.print(f"{'replaced the keys of' if replaced else 'enrolled'} {site} ({key_file}){pinned} in "
                      f"{federation}", highlight=False)
    except (CredentialsError, ConfigError) as exc:
        console.print(f"[red]{escape(str(exc))}[/]", highlight=False)
        raise typer.Exit(1) from None


bundle_app = typer.Typer(help="The app bundle (FAB) sites allow by hash.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")


@bundle_app.command("hash")
def bundle_hash() -> None:
    """Print the SHA-256 of the app bundle this checkout builds (what sites put in allowed_bundles)."""
    from spine_fl.shared.runtime.bundle import BundleError, build_bundle

    try:
        print(build_bundle().sha256)
    except BundleError as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(1) from None


if __name__ == "__main__":
    app()
