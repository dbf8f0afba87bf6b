"""The explanation images: a saliency overlay per image view, a bar chart of predictor contributions.

PNG files, written atomically; matplotlib's Agg backend (no display, no network).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from spine_fl.shared.models.explain import Contribution  # noqa: E402
from spine_fl.shared.files import atomic_write_bytes  # noqa: E402

TOWARDS, AWAY = "#b2182b", "#2166ac"  # red: raises the probability of the outcome; blue: lowers it
OVERLAY_ALPHA = 0.55


def _save(fig: plt.Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def saliency_png(path: Path, image: np.ndarray, attribution: np.ndarray, title: str, limit: float,
                 outcome: str) -> None:
    """The image in grey with the signed attribution as a semi-transparent heat map over it.

    `limit`: the colour scale's end (the same for every view of a patient, so views compare)."""
    limit = limit if limit > 0 else 1.0
    heat = np.ma.masked_where(np.abs(attribution) < 0.1 * limit, attribution)  # weak attributions: the image shows
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.imshow(image, cmap="gray", vmin=0.0, vmax=max(float(image.max()), 1e-6), interpolation="nearest")
    shown = ax.imshow(heat, cmap="bwr", vmin=-limit, vmax=limit, alpha=OVERLAY_ALPHA, interpolation="nearest")
    bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label(f"red: towards {outcome}; blue: away from it", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()
    fig.tight_layout()
    _save(fig, path)


def contributions_png(path: Path, contributions: Sequence[Contribution], title: str, outcome: str) -> None:
    """A horizontal bar per predictor (named with the patient's value and unit), largest |contribution| on top."""
    rows = list(contributions)[::-1]  # barh draws bottom-up
    fig, ax = plt.subplots(figsize=(8.5, 0.38 * len(rows) + 1.6))
    values = [c.contribution for c in rows]
    ax.barh(range(len(rows)), values, color=[TOWARDS if v > 0 else AWAY for v in values])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([c.label for c in rows], fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"contribution to the log-odds of {outcome}\n(red raises the probability, blue lowers it)",
                  fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
