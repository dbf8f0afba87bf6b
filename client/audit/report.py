"""Audit: write the report as audit.json (every number) and audit.html (one self-contained page).

The page is for a data-protection officer: the verdict with its reasons first, then each part as a
plain-language sentence with the numbers and plots beside it. This module turns the report into plain
data (sentences, table rows, plots as PNG data URIs); templates/audit.html lays it out, autoescaped
(shared/html/page.py: no scripts, no network requests), so nothing read from a ledger becomes markup.
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

from spine_fl.client.audit.membership_inference import FPRS  # noqa: E402
from spine_fl.client.audit.verdict import headline  # noqa: E402
from spine_fl.shared.files import atomic_write_bytes  # noqa: E402
from spine_fl.shared.html.page import figure_data_uri, render_page  # noqa: E402
from spine_fl.shared.training import accounting  # noqa: E402

JSON_FILE = "audit.json"
HTML_FILE = "audit.html"
TEMPLATE = "audit.html"  # in templates/, beside this module
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


def _integrity(report: dict[str, Any]) -> dict[str, Any]:
    check = report["integrity"]
    done = check.get("activity") or {}
    if not check["ok"]:
        summary = (f"The egress ledger does NOT verify: the first broken line is {check['first_broken_line']}. "
                   f"{check['problem']}.")
    elif check["lines"] == 0 and (done.get("dp_rounds_recorded") or done.get("final_models_received")):
        summary = (f"The egress ledger is missing or empty, although the site took part in training "
                   f"({done.get('dp_rounds_recorded', 0)} DP round(s) in its privacy ledger, "
                   f"{done.get('final_models_received', 0)} final model(s) received): the record of what left the "
                   "site was deleted or never written.")
    else:
        summary = (f"The site's signed egress ledger has {check['lines']} lines and every signature and hash link "
                   "verifies.")
    return {"summary": summary, "rows": _rows([[check["ledger"], check["lines"], "yes" if check["ok"] else "NO",
                                                check["first_broken_line"], check["problem"] or None]])}


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
    return figure_data_uri(fig)


def _message_row(rnd: dict[str, Any], m: dict[str, Any]) -> list[Any]:
    arrays = (f"{len(m['arrays'])}: " + ", ".join(f"{a['name'].rpartition('/')[2]} {a['shape']}"
                                                  for a in m["arrays"])) if m["arrays"] else "-"
    metrics = "; ".join(f"{k.rpartition('/')[2]}={_short(v)}" for k, v in m["metrics"].items())
    error = json.dumps(m["error"]) if m["error"] else "-"
    return [m["line"], rnd["round"], m["kind"], arrays, metrics, m["num_examples"], m["bytes"], error]


def _egress(report: dict[str, Any]) -> dict[str, Any]:
    egress, scan = report["egress"], report["payload_scan"]
    total = sum(r["bytes"] for r in egress["runs"])
    summary = (f"{sum(r['messages'] for r in egress['runs'])} replies left this site in {len(egress['runs'])} run(s), "
               f"{total / 1024:.1f} KiB in all. "
               + ("The automated scan found only model weights and declared numeric metrics."
                  if scan["clean"] else f"The automated scan raised {len(scan['findings'])} finding(s), listed below."))
    runs = [{"run_id": run["run_id"],
             "flower": ", ".join(f for f in run["flower_run_ids"] if f != run["run_id"]),
             "rows": _rows([_message_row(rnd, m) for rnd in run["rounds"] for m in rnd["messages"]])}
            for run in egress["runs"]]
    return {"summary": summary, "plot": _egress_plot(egress) if egress["runs"] else None,
            "findings": _rows([[f["line"], f["severity"], f["where"], f["what"]] for f in scan["findings"]]),
            "checked": scan["identifiers_checked"], "runs": runs}


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
    return figure_data_uri(fig)


def _budget(report: dict[str, Any]) -> dict[str, Any]:
    """The budget section; `plot` and the tables only when DP rounds were recorded."""
    budget = report["privacy_budget"]
    if "error" in budget:
        return {"summary": budget["error"], "plot": None, "plain": None, "measured": None}
    life = budget["lifetime"]
    if not budget["rounds"]:
        return {"summary": "No DP-SGD round is recorded for this dataset: no privacy budget was spent (a run without "
                           "DP spends none, and guarantees none).", "plot": None, "plain": None, "measured": None}
    summary = (f"Over its lifetime this dataset has spent epsilon {life['epsilon']:.2f} of its budget "
               f"{life['budget']:g} ({life['used_fraction']:.0%}) at delta {life['delta']:.2g}. Every figure is "
               "recomputed from the site's privacy ledger with Opacus and, independently, with Google's dp-accounting "
               "(its privacy-loss-distribution accountant).")
    runs = _rows([[r["run_id"], r["rounds"], r["epsilon"], r["epsilon_dp_accounting"], r["reported_epsilon"],
                   r["budget"], f"{r['used_fraction']:.0%}", r["delta"], r["accountant"],
                   f"{r['noise_multiplier_min']:.3g}-{r['noise_multiplier_max']:.3g}", r["sample_rate"], r["steps"],
                   r["max_grad_norm"], "yes" if r["agree"] else "NO"] for r in budget["runs"]])
    rounds = _rows([[r["run_id"], r["round"], r["noise_multiplier"], r["sample_rate"], r["steps"], r["epsilon_run"],
                     r["epsilon_run_dp_accounting"], r["reported_epsilon_run"], r["epsilon_lifetime"],
                     r["epsilon_lifetime_dp_accounting"], r["reported_epsilon_lifetime"]] for r in budget["rounds"]])
    lifetime = _rows([[life["epsilon"], life["epsilon_dp_accounting"], life["budget"], f"{life['used_fraction']:.0%}",
                       life["delta"]]])
    plain = accounting.epsilon_in_plain_words(life["epsilon"], life["delta"], seen="the models trained on this dataset")
    return {"summary": summary, "plain": plain,
            "measured": _measured(report), "agreement": _agreement_note(budget),
            "plot": _budget_plot(budget), "runs": runs, "lifetime": lifetime, "rounds": rounds}


def _agreement_note(budget: dict[str, Any]) -> str:
    """How the three figures are compared, in words (the rules are client/audit/budget.py's)."""
    rule = budget.get("agreement") or {}
    ceilings = rule.get("ceiling_over_dp_accounting") or {}
    if "rdp" not in ceilings or "prv" not in ceilings:
        return f"The site's reports must match the recomputation within {budget.get('agreement_tolerance', 0.02):.0%}."
    rdp, prv = ceilings["rdp"], ceilings["prv"]
    return (f"How to read the columns: the site's reports must match the Opacus recomputation within "
            f"{rule['reported_within']:.0%}. Opacus' RDP accountant gives an upper bound on epsilon, while "
            "dp-accounting's PLD is (nearly) exact, so the PLD figure is lower, typically by 5-20%. The two agree "
            f"when Opacus is not below PLD (beyond {rule['dp_accounting_above_at_most']:.0%}) nor above "
            f"{rdp['factor']:g} x PLD + {rdp['plus']:g} (for Opacus' PRV accountant, also nearly exact: "
            f"{prv['factor']:g} x PLD + {prv['plus']:g}).")


def _measured(report: dict[str, Any]) -> str | None:
    """Beside the guarantee, what this audit's attack achieved at the same false-accusation rate: LiRA's
    true positive rate at 1% FPR (the loss-threshold attack's when no shadow models were trained)."""
    mia = report.get("membership_inference") or {}
    attacks = mia.get("attacks") or {}
    if "skipped" in mia or not attacks:
        return None
    pct, fpr = accounting.plain_percent, accounting.PLAIN_WORDS_FPR
    name = "lira" if "lira" in attacks else next(iter(attacks))
    point = attacks[name]["tpr_at_fpr"][FPRS.index(fpr)]
    low, high = point["ci"]
    text = (f"Measured: the {ATTACK_NAMES.get(name, name)} attack this audit ran on run {mia.get('run_id', '?')}'s "
            f"final model correctly identified {pct(point['tpr'])} (95% CI {pct(low)} to {pct(high)}) of this "
            f"site's training patients while wrongly accusing at most {pct(fpr)} of its held-out patients")
    if mia.get("epsilon") is None:
        return text + "; that run used no DP, so no guarantee caps it."
    ceiling = point.get("ceiling")
    if ceiling is None:
        ceiling = float(accounting.dp_tpr_ceiling(fpr, mia["epsilon"], mia.get("delta") or 0.0))
    return text + f"; that run's own guarantee (\u03b5 = {mia['epsilon']:.2f}) allows at most {pct(ceiling)}."


def _kept(ok: bool | None) -> str:
    return "-" if ok is None else "yes" if ok else "NO"


def _policy(report: dict[str, Any]) -> dict[str, Any]:
    policy = report["policy"]
    source = report["inputs"]["policy_source"]
    breaches = [r for r in policy["runs"] if r["status"] == "breach"]
    summary = (f"{len(policy['runs'])} run(s) checked against the site's policy ({source}); "
               + (f"{len(breaches)} broke it." if breaches else "none broke it.")
               + f" The site refused {len(policy['refusals'])} request(s).")
    return {"summary": summary,
            "rules": [[k, _cell(v)] for k, v in policy["policy"].items()],
            "runs": [{"run_id": run["run_id"], "status": run["status"],
                      "checks": _rows([[c["rule"], c["run"], c["policy"], _kept(c["ok"])] for c in run["checks"]])}
                     for run in policy["runs"]],
            "refusals": _rows([[r["line"], r["run_id"], r.get("round"), r.get("kind"), r.get("rule"), r.get("message")]
                               for r in policy["refusals"]])}


def _roc_plot(mia: dict[str, Any]) -> str:
    fig, ax = plt.subplots(figsize=(5, 4.5))
    floor = 1.0 / max(mia["non_members"], 1) / 2
    for name, attack in mia["attacks"].items():
        fpr, tpr = np.maximum(attack["roc"]["fpr"], floor), np.maximum(attack["roc"]["tpr"], floor)
        ax.plot(fpr, tpr, label=f"{ATTACK_NAMES.get(name, name)} (AUC {attack['auc']:.2f})")
    grid = np.logspace(math.log10(floor), 0, 200)
    if mia["epsilon"] is not None:
        ax.plot(grid, accounting.dp_tpr_ceiling(grid, mia["epsilon"], mia["delta"] or 0.0), "r--",
                label=f"DP ceiling (epsilon {mia['epsilon']:.2f})")
    ax.plot(grid, grid, "k:", lw=1, label="chance")
    for limit in FPRS:
        ax.axvline(limit, color="grey", lw=0.5)
    ax.set(xscale="log", yscale="log", xlabel="false positive rate", ylabel="true positive rate",
           title="Membership inference on the final model")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return figure_data_uri(fig)


def _membership(report: dict[str, Any]) -> dict[str, Any]:
    """The membership-inference section; `attacks` (table rows) and the plot only when it ran."""
    mia = report["membership_inference"]
    if "skipped" in mia:
        return {"summary": f"Not run: {mia['skipped']}.", "attacks": []}
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
    shadow = mia["shadow_training"]
    return {"summary": summary, "headers": headers, "attacks": _rows(rows), "plot": _roc_plot(mia),
            "shadow_models": mia["shadow_models"], "shadow_epochs": shadow["epochs"],
            "shadow_noise": f"{shadow['noise_multiplier']:.3g}" if shadow["dp"] else None,
            "non_members": mia["non_members"], "smallest_fpr": f"{mia['smallest_nonzero_fpr']:.3f}",
            "bootstrap": mia["bootstrap"]}


def render_html(report: dict[str, Any]) -> str:
    v = report["verdict"]
    subtitle = (f"Generated {report['generated_at']} at the site from its own files only: ledgers in "
                f"{report['inputs']['state_dir']}, data in {report['inputs']['data_dir']}.")
    return render_page(
        __package__, TEMPLATE, title=f"Privacy audit: site {report['site']}", subtitle=subtitle,
        verdict={"level": v["verdict"], "reasons": headline(v)},
        integrity=_integrity(report), egress=_egress(report), budget=_budget(report), policy=_policy(report),
        membership=_membership(report), checks=[[r["level"], r["topic"], r["text"]] for r in v["reasons"]])


def write_report(out_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    json_path, html_path = out_dir / JSON_FILE, out_dir / HTML_FILE
    atomic_write_bytes(json_path, json.dumps(report, indent=2, allow_nan=True, default=str).encode())
    atomic_write_bytes(html_path, render_html(report).encode())
    return json_path, html_path
