"""The model card's importance section as plain data for its template, and its two figures: the
permutation importances (bars with their SD) and the mean saliency map per view.

Drawn from the card dict alone (model_card.json holds the maps), like the rest of the page; the
saliency figure is also written as a PNG beside the card (model_card.write_model_card).
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from spine_fl.shared.html.page import figure_data_uri  # noqa: E402

SALIENCY_PNG = "model_card_saliency.png"  # beside model_card.html
KIND_WORDS = {"numeric": "number", "binary": "yes / no", "category": "category"}
NAMED_IN_SUMMARY = 3
HEAT_COLOURS = "inferno"
HEAT_OPAQUE, MAX_ALPHA = 0.5, 0.8  # the overlay fades in up to half the largest mean attribution
WHERE = ("Computed on the held-out (test) patients of all sites together, which only a simulation holds in one "
         "place. A real federation's card cannot show this section: its sites send the coordinator only model "
         "weights and summary metrics (each site can explain its own patients with `spine-fl predict --explain`).")


def predictor_label(row: dict[str, Any]) -> str:
    unit = row.get("unit") or ""
    return f"{row['predictor']} ({unit})" if unit and row["kind"] == "numeric" else row["predictor"]


def _kind(row: dict[str, Any]) -> str:
    kind = KIND_WORDS.get(row["kind"], row["kind"])
    return f"{kind}, {row['inputs']} inputs shuffled together" if row["inputs"] > 1 else kind


def _plot_text(text: str) -> str:
    """Text from a task file as matplotlib draws it literally ("$" would start its math mode)."""
    return text.replace("$", r"\$")


def _three(value: float) -> float:
    """Three decimals, without the "-0.000" of a tiny negative drop (-0.0 + 0.0 is 0.0)."""
    return round(value, 3) + 0.0


def _bars(permutation: dict[str, Any]) -> plt.Figure:
    rows = permutation["rows"][::-1]  # barh draws bottom-up: the largest on top
    fig, ax = plt.subplots(figsize=(7.5, 0.36 * len(rows) + 1.4))
    means = [r["mean"] for r in rows]
    ax.barh(range(len(rows)), means, xerr=[r["sd"] for r in rows], color=["#1f5fa8" if m > 0 else "#9bb7d4"
                                                                        for m in means], capsize=3)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_plot_text(predictor_label(r)) for r in rows], fontsize=9)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"drop in AUROC when shuffled (mean and SD over {permutation['repeats']} shuffles)")
    ax.set_title("Permutation importance: what the model relies on", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def saliency_figure(saliency: dict[str, Any]) -> plt.Figure:
    """One panel per view: the mean image in grey, the mean |attribution| over it (one colour scale)."""
    views = saliency["views"]
    fig, axes = plt.subplots(1, len(views), figsize=(2.9 * len(views) + 1.2, 3.4), squeeze=False)
    colours = plt.get_cmap(HEAT_COLOURS)
    for ax, view in zip(axes[0], views):
        image, heat = np.asarray(view["image"], dtype=float), np.asarray(view["map"], dtype=float)
        ax.imshow(image, cmap="gray", interpolation="bilinear")
        overlay = colours(heat)
        overlay[..., 3] = np.clip(heat / HEAT_OPAQUE, 0, 1) * MAX_ALPHA  # weak attribution: the image shows through
        ax.imshow(overlay, interpolation="bilinear")
        ax.set_title(_plot_text(f"{view['view']}: {view['share']:.0%} of the attribution"), fontsize=9)
        ax.set_axis_off()
    bar = fig.colorbar(plt.cm.ScalarMappable(cmap=colours, norm=plt.Normalize(0, 1)), ax=list(axes[0]),
                       fraction=0.03, pad=0.02)
    bar.set_label("mean |attribution|, relative", fontsize=8)
    fig.suptitle(f"Mean saliency over {saliency['patients']} held-out patients (over their mean image)", fontsize=10)
    return fig


def saliency_png(card: dict[str, Any]) -> bytes | None:
    """The saliency figure as PNG bytes (to save beside the card), or None when the card has none."""
    saliency = (card.get("importance") or {}).get("saliency")
    if not saliency:
        return None
    buffer = io.BytesIO()
    fig = saliency_figure(saliency)
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _permutation_summary(p: dict[str, Any]) -> str:
    named = [f"{r['predictor']} (AUROC drops by {r['mean']:.3f} \u00b1 {r['sd']:.3f})"
             for r in p["rows"][:NAMED_IN_SUMMARY] if r["mean"] > 0]
    where = (f"On the {p['patients']} held-out patients of all sites (AUROC {p['baseline_auroc']:.2f} as they are), ")
    if not named:
        return where + "shuffling no single predictor lowers the AUROC: the model relies on none of them alone."
    return where + "the model relies most on " + ", then ".join(named) + "."


def _saliency_summary(s: dict[str, Any]) -> str:
    shares = ", ".join(f"{v['view']} {v['share']:.0%}" for v in sorted(s["views"], key=lambda v: -v["share"]))
    sample = (f"{s['patients']} of the {s['held_out']} held-out patients (a fixed random sample, to keep the card "
              "quick to build)" if s["patients"] < s["held_out"] else f"all {s['patients']} held-out patients")
    out = (f"Mean saliency map over {sample}, by Integrated Gradients ({s['steps']} steps along the path from a "
           "black image to the patient's image).")
    if len(s["views"]) > 1:
        out += f" Share of the attribution per view: {shares}."
    return out


def importance_section(card: dict[str, Any]) -> dict[str, Any]:
    """Sentences, table rows and figures for the template; only a reason when none was computed."""
    importance = card.get("importance") or {}
    if not importance.get("available"):
        return {"summary": importance.get("reason") or "No importances were computed for this run.",
                "permutation": None, "saliency": None}
    out: dict[str, Any] = {"summary": WHERE, "permutation": None, "saliency": None}
    permutation, saliency = importance.get("permutation"), importance.get("saliency")
    if permutation:
        out["permutation"] = {
            "summary": _permutation_summary(permutation), "reading": permutation["reading"],
            "rows": [[i + 1, predictor_label(r), _kind(r), _three(r["mean"]), _three(r["sd"])]
                     for i, r in enumerate(permutation["rows"])],
            "headers": ["rank", "predictor", "kind", "AUROC drop when shuffled (mean)",
                        f"SD over {permutation['repeats']} shuffles"],
            "plot": figure_data_uri(_bars(permutation)),
            "method": (f"{permutation['method']}, {permutation['repeats']} shuffles per predictor, random_state "
                       f"{permutation['random_state']}; {permutation['grouping']}. Predictors that carry the same "
                       "information share the credit: each may look unimportant alone.")}
    if saliency:
        out["saliency"] = {
            "summary": _saliency_summary(saliency),
            "reading": ("Brighter areas are where the pixels moved the model's predictions most, towards or away "
                        "from the outcome, on average over patients: it shows where the model looks, not why; a "
                        "bright area outside the anatomy (a marker, a label, the border) is a warning sign."),
            "plot": figure_data_uri(saliency_figure(saliency)),
            "file": SALIENCY_PNG}
    return out
