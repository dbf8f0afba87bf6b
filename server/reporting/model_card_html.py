"""The model card as one self-contained HTML page: plain language first, numbers beside, plots embedded.

Rendered from the card dict alone (model_card.json), so the page can be rebuilt without the run's data.
This module turns the card into plain data (sentences, table rows, plots as PNG data URIs);
templates/model_card.html lays it out, autoescaped (shared/html/page.py), so no text from the run
(a site name, the task's description) becomes markup.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from spine_fl.server.reporting.importance_html import importance_section  # noqa: E402
from spine_fl.server.reporting.model_card import MIN_SUBGROUP_CLASS, interval_text, range_text  # noqa: E402
from spine_fl.shared.html.page import figure_data_uri, render_page  # noqa: E402
from spine_fl.shared.training.accounting import epsilon_in_plain_words  # noqa: E402

MODEL_NAMES = {"federated": "federated (the shared model)", "pooled": "pooled (all data in one place)",
               "local_only": "local-only (each site alone)"}
MODEL_STYLE = {"federated": ("#1f5fa8", "-", "o"), "pooled": ("#6b6b6b", "--", "s"),
               "local_only": ("#c26a00", ":", "^")}
FLAG = "#b00020"
TEMPLATE = "model_card.html"  # in templates/, beside this module


NO_BREAK = str.maketrans({" ": "\u00a0", "-": "\u2011"})  # keep "0.82 (0.73-0.89)" on one line in narrow cells
SAME_IN_EVERY_RESAMPLE = "same in every resample"  # a table cell's CI whose ends are equal (no interval)
NARROWER_THAN_SHOWN = "CI narrower than 0.0001"  # a table cell's CI whose ends differ beyond four digits

# A published study's decision curves for a task, cited under the decision curve of that task's card only.
DECISION_CURVE_LITERATURE = {
    "rbp_tabular": "Ge et al. 2025 report decision curves like this one for residual back pain after vertebral "
                   "augmentation.",
}


def _ci(metric: dict[str, Any]) -> str:
    value, (lo, hi) = metric["value"], metric["ci"]
    if value is None:
        return "n/a"
    if lo is None or hi is None:
        return f"{value:.2f}"
    # ends that round alike get more digits ("0.94 (0.935-0.945)"); ends equal to four digits are no interval
    no_interval = SAME_IN_EVERY_RESAMPLE if lo == hi else NARROWER_THAN_SHOWN
    return f"{value:.2f} ({interval_text(lo, hi) or no_interval})".translate(NO_BREAK)


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# -- plots -----------------------------------------------------------------------------------

def _forest(rows: list[tuple[str, str, dict[str, Any]]], title: str, flagged: set[str] = frozenset()) -> plt.Figure:
    """AUROC with its CI per row (label, model, metric); flagged labels are drawn in red."""
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(rows) + 1.2))
    labels = []
    for i, (label, model, metric) in enumerate(rows):
        y = len(rows) - 1 - i
        value, (lo, hi) = metric["value"], metric["ci"]
        colour, _, marker = MODEL_STYLE[model]
        colour = FLAG if label in flagged else colour
        if value is not None:
            if lo is not None and hi is not None:
                ax.plot([lo, hi], [y, y], color=colour, lw=2)
            ax.plot([value], [y], marker=marker, color=colour, ms=7)
        labels.append(label)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels[::-1])
    ax.axvline(0.5, color="black", lw=0.8, ls=":")
    ax.set_xlim(0.3, 1.0)
    ax.set_xlabel("AUROC with 95% CI (0.5 = coin toss, 1 = perfect ranking)")
    ax.set_title(title, fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def _reliability(calibration: dict[str, Any]) -> plt.Figure:
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(6.5, 7), height_ratios=[3, 1.2], sharex=True)
    for model, cal in calibration.items():
        colour, line, marker = MODEL_STYLE[model]
        points = cal["reliability"]
        ax.plot(points["predicted"], points["observed"], color=colour, ls=line, marker=marker,
                label=f"{MODEL_NAMES[model]}: slope {_num(cal['slope'])}, intercept {_num(cal['intercept'])}")
    ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls=":", label="perfect calibration")
    ax.set(ylabel="observed share with the outcome", xlim=(0, 1), ylim=(0, 1),
           title="Reliability: predicted probability vs what happened")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fed = calibration.get("federated") or next(iter(calibration.values()))
    edges = np.asarray(fed["histogram"]["edges"])
    width = edges[1] - edges[0]
    hist.bar(edges[:-1], fed["histogram"]["non_events"], width=width, align="edge", color="#9bb7d4",
             edgecolor="white", label="without the outcome")
    hist.bar(edges[:-1], fed["histogram"]["events"], width=width, align="edge", color="#1f5fa8",
             edgecolor="white", bottom=fed["histogram"]["non_events"], label="with the outcome")
    hist.set(xlabel="predicted probability (federated model)", ylabel="patients")
    hist.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _decision(dca: dict[str, Any]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 4.6))
    t = dca["thresholds"]
    # wide and pale: still visible where a model's curve lies on it (a model that treats everyone)
    ax.plot(t, dca["treat_all"], color="#2e8b57", lw=6, alpha=0.45, label="treat everyone")
    ax.plot(t, dca["treat_none"], color="black", lw=1.2, label="treat no one")
    for model, nb in dca["models"].items():
        colour, line, _ = MODEL_STYLE[model]
        ax.plot(t, nb, color=colour, ls=line, lw=2.2 if model == "federated" else 1.4, label=MODEL_NAMES[model])
    for lo, hi in dca["useful_ranges"]:
        ax.axvspan(lo, hi, color="#1f5fa8", alpha=0.07)
    top = max(dca["prevalence"], max(max(v) for v in dca["models"].values()))
    ax.set(xlim=(0, 1), ylim=(-0.05, top + 0.05), xlabel="threshold probability (the risk at which you would act)",
           ylabel="net benefit", title="Decision curve (shaded: the model beats both defaults)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# -- sections: plain data for the template ----------------------------------------------------

def _unavailable(what: str) -> dict[str, Any]:
    """A section the coordinator's card cannot fill: it never sees a patient-level prediction."""
    return {"summary": f"Not available: {what} patient-level predictions, which stay at the sites."}


def _data(card: dict[str, Any]) -> dict[str, Any]:
    data = card["data"]
    splits = ("train", "test", "external")
    rows = [[s["site"], *("n/a" if s.get(k) is None else s[k] for k in splits), _num(s.get("test_prevalence"))]
            for s in data["sites"]]
    total = sum(s.get(k) or 0 for s in data["sites"] for k in splits)
    run = card["run"]
    return {"summary": f"The model predicts: {card['task']['description']} (task {card['task']['name']}). "
                       f"{len(data['sites'])} hospitals took part with {total} patients; each kept its data and "
                       "trained locally. All results below are on each site's held-out (test) patients, never used "
                       "in training.",
            "rows": rows, "attribution": data.get("attribution"),
            "run": f"Run: strategy {run.get('strategy')}, {run.get('rounds_completed')} of {run.get('rounds_planned')} "
                   f"rounds, status {run.get('status')}; data source: {data['source']}."}


def _performance(card: dict[str, Any]) -> dict[str, Any]:
    fed = card["comparison"]["federated"]
    rows = [[label, m["n"], m["events"], _ci(m["auroc"]), _ci(m["brier"]), _ci(m["sensitivity"]),
             _ci(m["specificity"])] for label, m in [("all sites", fed["overall"]), *fed["per_site"].items()]]
    forest = [("all sites", "federated", fed["overall"]["auroc"])] + [(s, "federated", m["auroc"])
                                                                        for s, m in fed["per_site"].items()]
    ext = card.get("external", {})
    external = None
    if ext.get("federated"):
        external = (f"On the external split ({ext['federated']['n']} patients set aside by design) the federated "
                    f"AUROC is {_num(ext['federated']['auroc'])}"
                    + (f" (pooled {_num(ext['pooled']['auroc'])})." if ext.get("pooled") else "."))
    return {"summary": " ".join(card["findings"][k] for k in ("overall", "sites") if k in card["findings"]),
            "ci": " (95% CI)" if fed["source"] == "predictions" else "", "rows": rows,
            "plot": figure_data_uri(_forest(forest, "Federated model: AUROC overall and per site")),
            "external": external}


def _subgroups(card: dict[str, Any]) -> dict[str, Any]:
    """The fairness section; `rows` and the plot only when subgroups were evaluated."""
    groups = card.get("subgroups")
    if card["evidence"] == "metrics_only":
        return _unavailable("subgroup metrics need")
    if not groups or not groups["variables"]:
        return {"summary": "Not available: this task records no age or sex."}
    gap = groups.get("largest_gap")
    rows, forest, flagged = [], [], set()
    for variable, entry in groups["variables"].items():
        for level, m in entry["levels"].items():
            note = "" if m["judged"] else f"too few to judge (< {MIN_SUBGROUP_CLASS} with or without the outcome)"
            if gap and variable == gap["variable"] and level in (gap["best"], gap["worst"]):
                note = "LARGEST GAP: " + ("lowest AUROC" if level == gap["worst"] else "highest AUROC")
                flagged.add(f"{variable}: {level}")
            rows.append([f"{variable}: {level}".translate(NO_BREAK), m["n"], m["events"], _ci(m["auroc"]),
                         _num(m["brier"]["value"]), _num(m["sensitivity"]["value"]), _num(m["specificity"]["value"]),
                         note])
            forest.append((f"{variable}: {level}", "federated", m["auroc"]))
        if entry["missing"]:
            rows.append([f"{variable}: not recorded", entry["missing"], "", "", "", "", "", "left out"])
    if gap:
        chance = ("Their confidence intervals overlap: with groups this small the gap may be chance."
                  if gap["cis_overlap"] else
                  "Their confidence intervals do not overlap: the gap is unlikely to be chance.")
        summary = (f"The model ranks patients least well for {gap['worst']} patients and best for {gap['best']} "
                   f"patients (by {gap['variable']}): an AUROC gap of {gap['gap']:.2f}, the largest between any two "
                   f"groups. {chance}")
    else:
        summary = "No two subgroups had enough patients with and without the outcome to compare."
    return {"summary": summary, "rows": rows,
            "plot": figure_data_uri(_forest(forest, "Federated model: AUROC per subgroup (red: largest gap)", flagged))}


def _calibration(card: dict[str, Any]) -> dict[str, Any]:
    calibration = card.get("calibration")
    if not calibration:
        return _unavailable("calibration needs")
    rows = [[MODEL_NAMES[m], _num(c["brier"], 3), _num(c["slope"]), _num(c["intercept"]), _num(c["mean_predicted"]),
             _num(c["observed_rate"]), _num(c["share_predicted_positive"]), "good" if c["well_calibrated"] else "POOR"]
            for m, c in calibration.items()]
    fed = calibration.get("federated") or next(iter(calibration.values()))
    summary = fed["reading"]
    if not fed["well_calibrated"] and card["privacy"]["dp"]:
        summary += (" Training with differential privacy often does this: the clipped, noised updates shift and "
                    "squeeze the probabilities even when the ranking survives.")
    return {"summary": summary, "rows": rows, "plot": figure_data_uri(_reliability(calibration))}


def _decision_curve(card: dict[str, Any]) -> dict[str, Any]:
    dca = card.get("decision_curve")
    if not dca:
        return _unavailable("decision curves need")
    rows = [[f"{r['threshold']:.1f}", _num(r["federated"], 3), _num(r["treat_all"], 3), _num(r["treat_none"], 3),
             "yes" if r["federated"] > max(r["treat_all"], r["treat_none"]) + 1e-12 else "no"] for r in dca["table"]]
    ranges = ", ".join(range_text(a, b, " to ") for a, b in dca["useful_ranges"])
    summary = ("Suppose you act (treat, refer, operate) when a patient's predicted probability of the outcome is above "
               "a threshold you choose. Net benefit counts the patients correctly acted on, minus the unnecessary ones "
               "weighted by how much you fear them at that threshold, per patient. "
               + (f"Acting on the federated model is better than treating everyone and than treating no one for "
                  f"thresholds {ranges}." if ranges else "At no threshold is acting on the model better than treating "
                  "everyone or no one."))
    if dca.get("treats_everyone_up_to") is not None:
        summary += (f" Up to a threshold of {dca['treats_everyone_up_to']:.2f} the model puts every patient above it, "
                    "so its curve is the 'treat everyone' curve there.")
    if not (card.get("calibration") or {}).get("federated", {}).get("well_calibrated", True):
        summary += (" Net benefit reads the probabilities at face value, and this model's are poorly calibrated "
                    "(see above): a locally recalibrated model could do better.")
    return {"summary": summary, "rows": rows, "plot": figure_data_uri(_decision(dca)),
            "prevalence": f"{dca['prevalence']:.2f}",
            "literature": DECISION_CURVE_LITERATURE.get(card["task"]["name"])}


def _comparison(card: dict[str, Any]) -> dict[str, Any]:
    comparison = card["comparison"]
    sites = list(comparison["federated"]["per_site"])
    rows = [[MODEL_NAMES[m], _ci(c["overall"]["auroc"]), _ci(c["overall"]["brier"]),
             *(_ci(c["per_site"][s]["auroc"]) if s in c["per_site"] else "n/a" for s in sites)]
            for m, c in comparison.items()]
    forest = []
    for label in ["all sites", *sites]:
        for model, c in comparison.items():
            metric = c["overall"] if label == "all sites" else c["per_site"].get(label)
            if metric:
                forest.append((f"{label}: {model.replace('_', '-')}", model, metric["auroc"]))
    without_ci = [m.replace("_", "-") for m, c in comparison.items() if c["source"] != "predictions"]
    ci = " (95% CI where available)" if len(without_ci) < len(comparison) else ""
    return {"summary": card["findings"].get("comparison", "Only the federated model was evaluated in this run."),
            "headers": ["model", f"AUROC, all sites{ci}", f"Brier, all sites{ci}", *(f"AUROC {s}" for s in sites)],
            "rows": rows, "plot": figure_data_uri(_forest(forest, "AUROC: federated vs pooled vs local-only")),
            "without_ci": ", ".join(without_ci)}


def _privacy(card: dict[str, Any]) -> dict[str, Any]:
    privacy = card["privacy"]
    rows = [[site, "yes" if v.get("dp") else "no", _num(v.get("epsilon")), _num(v.get("epsilon_lifetime")),
             "n/a" if v.get("delta") is None else f"{v['delta']:.1e}".translate(NO_BREAK),
             _num(v.get("noise_multiplier")),
             _num(v.get("max_grad_norm")), "n/a" if v.get("steps") is None else v["steps"], v.get("accountant", "n/a"),
             "yes" if v.get("secagg") else "no"] for site, v in privacy["per_site"].items()]
    return {"summary": card["findings"]["privacy"] + " Epsilon bounds how much any one patient can change what leaves "
                       "a site (smaller is more private); delta is the small chance that bound fails.",
            "plain": _plain_words(privacy), "rows": rows,
            "settings": ", ".join(f"{k} = {v}" for k, v in privacy["settings"].items()),
            "refusals": len(privacy["refusals"])}


def _plain_words(privacy: dict[str, Any]) -> str | None:
    """The recorded (epsilon, delta) in one sentence a data-protection officer can read: the weakest site's."""
    bound = privacy.get("attack_bound")
    if not bound:
        return None
    several = sum(1 for v in privacy["per_site"].values() if v.get("dp")) > 1
    return ((f"In plain words, for {bound['site']} (the site with the weakest guarantee in this run): " if several
             else "In plain words: ") + epsilon_in_plain_words(bound["epsilon"], bound["delta"], fpr=bound["fpr"]))


def render_card(card: dict[str, Any]) -> str:
    source = card["data"]["source"]
    subtitle = (f"Task {card['task']['name']} - {len(card['data']['sites'])} sites - "
                f"{'SYNTHETIC patients' if source == 'synthetic' else source + ' data'} - generated {card['generated_at']}")
    return render_page(
        __package__, TEMPLATE, title=f"Model card: {card['task']['description']}", subtitle=subtitle,
        findings=list(card["findings"].values()), data=_data(card), performance=_performance(card),
        subgroups=_subgroups(card), calibration=_calibration(card), decision=_decision_curve(card),
        importance=importance_section(card), comparison=_comparison(card), privacy=_privacy(card),
        limitations=card["limitations"], evidence_note=card["evidence_note"], generated_at=card["generated_at"],
        run_dir=card["run_dir"])
