"""Audit: write the report as audit.json (every number) and audit.html (one self-contained page).

The page is for a data-protection officer: the verdict with its reasons first, then each part as a
plain-language sentence with the numbers and plots beside it. Plots are embedded PNGs, so the page
opens offline in any browser (shared/html_report.py: no scripts, no network requests).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from spine_fl.client.audit.membership_inference import FPRS, dp_tpr_ceiling  # noqa: E402
from spine_fl.client.audit.verdict import headline  # noqa: E402
from spine_fl.shared.files import atomic_write_bytes  # noqa: E402
from spine_fl.shared.html.page import Section, figure_to_img, render_page, table, verdict_banner  # noqa: E402

JSON_FILE = "audit.json"
HTML_FILE = "audit.html"
ATTACK_NAMES = {"loss_threshold": "loss threshold", "lira": "LiRA (shadow models)"}


def _cell(value: Any) -> Any:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(str(_cell(v)) for v in value)
    return value


def _rows(rows: list[list[Any]]) -> list[list[Any]]:
    return [[_cell(c) for c in row] for row in rows]


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return f"[{value.get('bytes', '?')} bytes]" if "bytes" in value else f"[{value.get('items', '?')} ids]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return repr(value) if isinstance(value, str) else str(value)


def _verdict_section(report: dict[str, Any]) -> Section:
    reasons = report["verdict"]["reasons"]
    return Section("All checks", "Every check the audit made, worst first.",
                   [table(["result", "topic", "reason"], [[r["level"], r["topic"], r["text"]] for r in reasons])])


def _integrity_section(report: dict[str, Any]) -> Section:
    check = report["integrity"]
    summary = (f"The site's signed egress ledger has {check['lines']} lines and every signature and hash link "
               "verifies." if check["ok"] else
               f"The egress ledger does NOT verify: the first broken line is {check['first_broken_line']}. "
               f"{check['problem']}.")
    return Section("Ledger integrity", summary, [table(
        ["ledger", "lines", "intact", "first broken line", "problem"],
        _rows([[check["ledger"], check["lines"], "yes" if check["ok"] else "NO", check["first_broken_line"],
                check["problem"] or None]]))])


def _egress_plot(egress: dict[str, Any]) -> str:
    fig, ax = plt.subplots(figsize=(7, 3))
    labels, sizes = [], []
    for run in egress["runs"]:
        for rnd in run["rounds"]:
            labels.append(f"{run['run_id'][-4:]}/r{rnd['round']}")
            sizes.append(sum(int(m["bytes"] or 0) for m in rnd["messages"]) / 1024)
    ax.bar(range(len(sizes)), sizes, color="#4a78b5")
    ax.set_xticks(range(len(sizes)), labels, rotation=90, fontsize=7)
    ax.set(ylabel="KiB sent", title="Bytes that left the site per run (last digits of its id) and round")
    fig.tight_layout()
    return figure_to_img(fig, "bytes that left the site per round")


def _egress_section(report: dict[str, Any]) -> Section:
    egress, scan = report["egress"], report["payload_scan"]
    total = sum(r["bytes"] for r in egress["runs"])
    summary = (f"{sum(r['messages'] for r in egress['runs'])} replies left this site in {len(egress['runs'])} run(s), "
               f"{total / 1024:.1f} KiB in all. "
               + ("The automated scan found only model weights and declared numeric metrics."
                  if scan["clean"] else f"The automated scan raised {len(scan['findings'])} finding(s), listed below."))
    parts = [_egress_plot(egress)] if egress["runs"] else []
    if scan["findings"]:
        parts.append(table(["ledger line", "severity", "where", "what"],
                           [[f["line"], f["severity"], f["where"], f["what"]] for f in scan["findings"]]))
    ids = scan["identifiers_checked"]
    parts.append(f'<p class="note">Checked against {ids["identifiers"]} identifiers and '
                 f'{ids["clinical_and_dicom_text_values"]} text values from clinical.csv and {ids["dicom_files_read"]} '
                 'DICOM headers.</p>')
    for run in egress["runs"]:
        rows = []
        for rnd in run["rounds"]:
            for m in rnd["messages"]:
                arrays = (f"{len(m['arrays'])}: " + ", ".join(f"{a['name'].rpartition('/')[2]} {a['shape']}"
                                                              for a in m["arrays"])) if m["arrays"] else "-"
                metrics = "; ".join(f"{k.rpartition('/')[2]}={_short(v)}" for k, v in m["metrics"].items())
                error = json.dumps(m["error"]) if m["error"] else "-"
                rows.append([m["line"], rnd["round"], m["kind"], arrays, metrics, m["num_examples"], m["bytes"], error])
        flower = ", ".join(f for f in run["flower_run_ids"] if f != run["run_id"])
        parts.append(f"<h3>Run {run['run_id']}" + (f" (Flower run {flower})" if flower else "") + "</h3>" + table(
            ["line", "round", "message", "arrays (index shape)", "metrics and values", "examples", "bytes", "error"],
            _rows(rows)))
    return Section("What left the site", summary, parts)


def _budget_plot(budget: dict[str, Any]) -> str:
    rows = budget["rounds"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = np.arange(1, len(rows) + 1)
    ax.plot(xs, [r["epsilon_lifetime"] for r in rows], "o-", label="lifetime (Opacus)")
    ax.plot(xs, [r["epsilon_lifetime_dp_accounting"] for r in rows], "x", ms=9, label="lifetime (dp-accounting)")
    ax.plot(xs, [r["epsilon_run"] for r in rows], "s--", label="this run (Opacus)")
    reported = [(x, r["reported_epsilon_run"]) for x, r in zip(xs, rows) if r["reported_epsilon_run"] is not None]
    if reported:
        ax.plot(*zip(*reported), "+", ms=11, color="black", label="this run (reported by the site)")
    ax.axhline(budget["lifetime"]["budget"], color="#b00020", lw=1, label="lifetime budget")
    if budget["runs"]:
        ax.axhline(budget["runs"][0]["budget"], color="#b26a00", lw=1, ls=":", label="per-run budget")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="DP round at this site (all runs, in order)", ylabel="epsilon", title="Privacy spent")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return figure_to_img(fig, "epsilon per round against the budgets")


def _budget_section(report: dict[str, Any]) -> Section:
    budget = report["privacy_budget"]
    if "error" in budget:
        return Section("Privacy budget", budget["error"])
    life = budget["lifetime"]
    if not budget["rounds"]:
        return Section("Privacy budget", "No DP-SGD round is recorded for this dataset: no privacy budget was spent "
                       "(a run without DP spends none, and guarantees none).")
    summary = (f"Over its lifetime this dataset has spent epsilon {life['epsilon']:.2f} of its budget "
               f"{life['budget']:g} ({life['used_fraction']:.0%}) at delta {life['delta']:.2g}. Every figure is "
               "recomputed from the site's privacy ledger with Opacus and, independently, with Google's dp-accounting.")
    runs = _rows([[r["run_id"], r["rounds"], r["epsilon"], r["epsilon_dp_accounting"], r["reported_epsilon"],
                   r["budget"], f"{r['used_fraction']:.0%}", r["delta"], r["accountant"],
                   f"{r['noise_multiplier_min']:.3g}-{r['noise_multiplier_max']:.3g}", r["sample_rate"], r["steps"],
                   r["max_grad_norm"], "yes" if r["agree"] else "NO"] for r in budget["runs"]])
    rounds = _rows([[r["run_id"], r["round"], r["noise_multiplier"], r["sample_rate"], r["steps"], r["epsilon_run"],
                     r["epsilon_run_dp_accounting"], r["reported_epsilon_run"], r["epsilon_lifetime"],
                     r["epsilon_lifetime_dp_accounting"], r["reported_epsilon_lifetime"]] for r in budget["rounds"]])
    return Section("Privacy budget", summary, [
        _budget_plot(budget),
        table(["run", "rounds", "epsilon (Opacus)", "epsilon (dp-accounting)", "epsilon reported", "budget", "used",
               "delta", "accountant", "noise multiplier", "sample rate", "steps", "clipping norm", "agree"], runs),
        table(["lifetime epsilon (Opacus)", "lifetime epsilon (dp-accounting)", "lifetime budget", "used", "delta"],
              _rows([[life["epsilon"], life["epsilon_dp_accounting"], life["budget"], f"{life['used_fraction']:.0%}",
                      life["delta"]]])),
        "<h3>Per round (cumulative)</h3>",
        table(["run", "round", "noise multiplier", "sample rate", "steps", "run epsilon (Opacus)",
               "run epsilon (dp-accounting)", "run epsilon reported", "lifetime epsilon (Opacus)",
               "lifetime epsilon (dp-accounting)", "lifetime epsilon reported"], rounds)])


def _policy_section(report: dict[str, Any]) -> Section:
    policy = report["policy"]
    source = report["inputs"]["policy_source"]
    breaches = [r for r in policy["runs"] if r["status"] == "breach"]
    summary = (f"{len(policy['runs'])} run(s) checked against the site's policy ({source}); "
               + (f"{len(breaches)} broke it." if breaches else "none broke it.")
               + f" The site refused {len(policy['refusals'])} request(s).")
    parts = [table(["rule", "policy"], [[k, _cell(v)] for k, v in policy["policy"].items()])]
    for run in policy["runs"]:
        parts.append(f"<h3>Run {run['run_id']}: {run['status']}</h3>" + table(
            ["rule", "run", "policy", "kept"],
            _rows([[c["rule"], c["run"], c["policy"], "-" if c["ok"] is None else "yes" if c["ok"] else "NO"]
                   for c in run["checks"]])))
    if policy["refusals"]:
        parts.append("<h3>Refusals</h3>" + table(
            ["ledger line", "run", "round", "message", "rule", "why"],
            _rows([[r["line"], r["run_id"], r.get("round"), r.get("kind"), r.get("rule"), r.get("message")]
                   for r in policy["refusals"]])))
    return Section("Policy compliance", summary, parts)


def _roc_plot(mia: dict[str, Any]) -> str:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    floor = 1.0 / max(mia["non_members"], 1) / 2
    for name, attack in mia["attacks"].items():
        fpr, tpr = np.maximum(attack["roc"]["fpr"], floor), np.maximum(attack["roc"]["tpr"], floor)
        ax.plot(fpr, tpr, label=f"{ATTACK_NAMES.get(name, name)} (AUC {attack['auc']:.2f})")
    grid = np.logspace(math.log10(floor), 0, 200)
    if mia["epsilon"] is not None:
        ax.plot(grid, dp_tpr_ceiling(grid, mia["epsilon"], mia["delta"] or 0.0), "r--",
                label=f"DP ceiling (epsilon {mia['epsilon']:.2f})")
    ax.plot(grid, grid, "k:", lw=1, label="chance")
    for limit in FPRS:
        ax.axvline(limit, color="grey", lw=0.5)
    ax.set(xscale="log", yscale="log", xlabel="false positive rate", ylabel="true positive rate",
           title="Membership inference on the final model")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return figure_to_img(fig, "membership inference ROC curves, log-log, with the DP ceiling")


def _membership_section(report: dict[str, Any]) -> Section:
    mia = report["membership_inference"]
    title = "Empirical privacy: membership inference"
    if "skipped" in mia:
        return Section(title, f"Not run: {mia['skipped']}.")
    best = max(mia["attacks"].values(), key=lambda a: a["auc"])
    summary = (f"An attacker who holds the final shared model and a patient's record tries to tell whether that "
               f"patient was used in training. Using this site's {mia['members']} training patients (members) and "
               f"{mia['non_members']} held-out patients (non-members), the strongest attack reaches AUC "
               f"{best['auc']:.2f} (0.5 = guessing, 1 = always right)."
               + (f" The run's DP guarantee (epsilon {mia['epsilon']:.2f}, delta {mia['delta']:.2g}) caps what any "
                  "attack can reach; the caps are shown beside the measurements." if mia["epsilon"] is not None else
                  " The run used no DP, so no guarantee caps what an attack can reach."))
    rows = []
    for name, a in mia["attacks"].items():
        row: list[Any] = [ATTACK_NAMES.get(name, name), f"{a['auc']:.3f} ({a['auc_ci'][0]:.3f}-{a['auc_ci'][1]:.3f})",
                          a["auc_ceiling"]]
        for point in a["tpr_at_fpr"]:
            row += [f"{point['tpr']:.3f} ({point['ci'][0]:.3f}-{point['ci'][1]:.3f})", point.get("ceiling")]
        rows.append([*row, a["proven_epsilon"]])
    headers = ["attack", "AUC (95% CI)", "DP ceiling AUC"]
    for limit in FPRS:
        headers += [f"TPR at {limit:.1%} FPR (95% CI)", "DP ceiling"]
    headers.append("epsilon the attack proves (95%)")
    note = (f'<p class="note">Shadow models: {mia["shadow_models"]}, trained here on random halves of the site\'s '
            f'labelled patients for {mia["shadow_training"]["epochs"]} epochs'
            + (f' with DP-SGD (noise multiplier {mia["shadow_training"]["noise_multiplier"]:.3g})'
               if mia["shadow_training"]["dp"] else '') +
            f'. With {mia["non_members"]} non-members the smallest non-zero FPR is {mia["smallest_nonzero_fpr"]:.3f}; '
            f'lower targets are read at FPR 0. Intervals: {mia["bootstrap"]} bootstrap resamples. The epsilon an '
            'attack proves uses Clopper-Pearson bounds on its TPR and FPR at these thresholds; it beats the DP '
            'guarantee only if it exceeds the accounted epsilon.</p>')
    return Section(title, summary, [table(headers, _rows(rows)), _roc_plot(mia), note])


def render_html(report: dict[str, Any]) -> str:
    v = report["verdict"]
    sections = [_integrity_section(report), _egress_section(report), _budget_section(report),
                _policy_section(report), _membership_section(report), _verdict_section(report)]
    subtitle = (f"Generated {report['generated_at']} at the site from its own files only: ledgers in "
                f"{report['inputs']['state_dir']}, data in {report['inputs']['data_dir']}.")
    return render_page(f"Privacy audit: site {report['site']}", subtitle, sections,
                       verdict_banner(v["verdict"], headline(v)))


def write_report(out_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    json_path, html_path = out_dir / JSON_FILE, out_dir / HTML_FILE
    atomic_write_bytes(json_path, json.dumps(report, indent=2, allow_nan=True, default=str).encode())
    atomic_write_bytes(html_path, render_html(report).encode())
    return json_path, html_path
