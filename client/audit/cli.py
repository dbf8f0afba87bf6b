"""`spine-fl audit --site S`: where a site's files are, and the command that audits them.

A deployed site is found through its config (`configs/sites/<site>.toml` or `--config`). A
simulation's virtual site has no config file: `--run-dir results/default` finds its ledgers in
`site-state/<site>` and its data in `sites/<site>`, and its policy in the run's `scenario.toml`. `--state-dir`, `--data-dir`
and `--policy-file` name the parts directly. Without a policy the audit checks spine-fl's default
policy and says so (verdict at least 'attention').
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from spine_fl.client.privacy.policy import SitePolicy
from spine_fl.client.site_config import Site, load_site_config, policy_from_table
from spine_fl.shared.config import ConfigError, read_toml

console = Console()
EXIT_FAIL = 1
EXIT_USAGE = 2


def policy_from_file(path: Path, site: str) -> SitePolicy:
    """[policy] of a site config or of a scenario (common rules plus [policy.<site>])."""
    raw = read_toml(path, "policy file")
    table = raw.get("policy", {})
    merged = {k: v for k, v in table.items() if not isinstance(v, dict)} | dict(table.get(site, {}))
    return policy_from_table(merged, f"{path} [policy]")


def _run_dir_policy(run_dir: Path, site: str) -> tuple[SitePolicy, str] | None:
    """A simulation writes the scenario as run (policy included) beside its results."""
    stored = run_dir / "scenario.toml"
    return (policy_from_file(stored, site), str(stored)) if stored.exists() else None


def locate_site(site: str, config: Path | None, run_dir: Path | None, state_dir: Path | None,
                data_dir: Path | None, policy_file: Path | None) -> tuple[Site, bool, str]:
    """The site to audit, whether its policy was found, and where the policy came from."""
    policy: SitePolicy | None = None
    source = "none found"
    if run_dir is None and state_dir is None:
        path = config or Path("configs/sites") / f"{site}.toml"
        found = load_site_config(path)
        state_dir, data_dir, policy, source = found.state_dir, found.data_dir, found.policy, str(path)
    if run_dir is not None:
        state_dir = state_dir or run_dir / "site-state" / site
        data_dir = data_dir or run_dir / "sites" / site
        if policy_file is None:
            located = _run_dir_policy(run_dir, site)
            if located is not None:
                policy, source = located
    if policy_file is not None:
        policy, source = policy_from_file(policy_file, site), str(policy_file)
    if data_dir is None or state_dir is None:
        raise ConfigError("pass --data-dir with --state-dir (the site's data folder: clinical.csv, manifest.csv)")
    for name, folder in (("state", state_dir), ("data", data_dir)):
        if not Path(folder).is_dir():
            raise ConfigError(f"{folder}: the site's {name} folder does not exist")
    return Site(site, Path(data_dir), Path(state_dir), policy or SitePolicy()), policy is not None, source


def coordinator_record_of(site: str, run_result: Path | None,
                          run_dir: Path | None) -> tuple[dict[str, Any] | None, str | None]:
    """The coordinator's record of `site` (metrics.json "ledgers"), read as plain JSON: the audit is the
    site's own check and takes nothing else from the coordinator's file."""
    path = run_result or (run_dir / "metrics.json" if run_dir is not None else None)
    if path is None or (run_result is None and not path.exists()):
        return None, None
    try:
        ledgers = json.loads(Path(path).read_text()).get("ledgers")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{path}: not a readable run result ({exc})") from None
    if not isinstance(ledgers, dict) or not isinstance(ledgers.get(site), dict):
        raise ConfigError(f"{path} holds no coordinator record for site {site} (no ledgers.{site}); pass the "
                          "metrics.json of a run this site took part in, made by this spine-fl version")
    return ledgers[site], str(path)


def audit(
    site: str = typer.Option(..., help="site name; its config is configs/sites/<site>.toml unless --config"),
    config: Optional[Path] = typer.Option(None, help="the site's TOML config (data_dir, state_dir, policy)"),
    run_dir: Optional[Path] = typer.Option(None, help="a simulation's results folder (e.g. results/default): "
                                           "uses its site-state/<site> and sites/<site>"),
    state_dir: Optional[Path] = typer.Option(None, help="the site's state folder (ledgers, key, received models)"),
    data_dir: Optional[Path] = typer.Option(None, help="the site's data folder (clinical.csv, manifest.csv, DICOM)"),
    policy_file: Optional[Path] = typer.Option(None, help="TOML with the site's policy table: a site config, or a "
                                               "scenario (common rules plus the site's own overrides)"),
    out: Optional[Path] = typer.Option(None, help="folder for audit.json and audit.html (default <state-dir>/audit)"),
    shadow_models: int = typer.Option(8, min=0, help="shadow models for the LiRA attack, trained at the site "
                                      "(0: loss-threshold attack only)"),
    bootstrap: int = typer.Option(1000, min=100, help="bootstrap resamples for the confidence intervals"),
    run_result: Optional[Path] = typer.Option(None, help="the run's metrics.json from the coordinator (default: "
                                              "<run-dir>/metrics.json): its pinned ledger key and last ledger head "
                                              "for this site are compared with the site's files"),
) -> None:
    """Privacy audit of one site from its own files: ledger integrity, what left the site, privacy
    budget, policy compliance, membership inference; writes audit.json and audit.html. Exit 1 on 'fail'."""
    from spine_fl.client.audit.run import run_audit
    from spine_fl.client.audit.verdict import headline

    try:
        located, policy_found, source = locate_site(site, config, run_dir, state_dir, data_dir, policy_file)
    except ConfigError as exc:
        console.print(f"[red]{escape(str(exc))}[/]", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    try:
        record, record_source = coordinator_record_of(site, run_result, run_dir)
    except ConfigError as exc:
        console.print(f"[red]{escape(str(exc))}[/]", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    out_dir = out or located.state_dir / "audit"
    with console.status(f"auditing site {site}...") as status:
        report = run_audit(located, out_dir, policy_found=policy_found, policy_source=source,
                           shadow_models=shadow_models, bootstrap=bootstrap, coordinator_record=record,
                           coordinator_record_source=record_source, progress=lambda text: status.update(f"auditing site {site}: {text}"))
    colour = {"pass": "green", "attention": "yellow", "fail": "red"}[report["verdict"]["verdict"]]
    console.print(f"[{colour}]verdict: {report['verdict']['verdict'].upper()}[/]")
    for text in headline(report["verdict"]):
        console.print(f"  - {text}", highlight=False)
    console.print(f"wrote {out_dir / 'audit.json'} and {out_dir / 'audit.html'}", highlight=False)
    raise typer.Exit(EXIT_FAIL if report["verdict"]["verdict"] == "fail" else 0)
