"""Result plots (matplotlib, headless): ROC per site, calibration, metric per round.

Each PNG is rendered into memory and written atomically (temporary file, then rename): a crash or
a full disk never leaves a half-written plot under its final name."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from spine_fl.shared.files import atomic_write_bytes  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    """Render the figure to PNG bytes, close it, and write the file atomically."""
    buffer = io.BytesIO()
    try:
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=110)
    finally:
        plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())


def roc_per_site(path: Path, scores: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for site, (y, p) in scores.items():
        if len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, label=site)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title)
    ax.legend(loc="lower right")
    _save(fig, path)


def calibration(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (y, p) in curves.items():
        frac, mean = calibration_curve(y, p, n_bins=8, strategy="quantile")
        ax.plot(mean, frac, "o-", label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title=title)
    ax.legend(loc="upper left")
    _save(fig, path)


def metric_per_round(path: Path, rounds: list[dict[str, Any]], references: dict[str, float], metric: str = "auroc") -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["round"] for r in rounds]
    ax.plot(xs, [r[metric] for r in rounds], "o-", label="federated (sites' held-out, weighted)")
    sites = sorted({s for r in rounds for s in r["per_site"]})
    for site in sites:
        ax.plot(xs, [r["per_site"].get(site, {}).get(metric, np.nan) for r in rounds], ":", alpha=0.7, label=site)
    for name, value in references.items():
        ax.axhline(value, ls="--", lw=1, color="grey" if name == "local_only" else "black", label=name)
    ax.set(xlabel="round", ylabel=metric.upper())
    ax.legend(fontsize=7)
    _save(fig, path)
