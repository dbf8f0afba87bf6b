"""The mean saliency map of an image model over held-out patients: where, on average, its
predictions come from (the model card's importance section, image tasks).

Each patient's attributions are Integrated Gradients on the logit (shared/models/explain.py:
the same attributions `spine-fl predict` draws for one patient). Their absolute values are scaled
to total 1 over all of the patient's views, so every patient counts equally and a view's share of
the mean map is its share of what moved the predictions; the maps are averaged per view.

Cost: Integrated Gradients runs the model `steps` times forward and backward per patient. The
card is built at the end of every simulation, so a fixed random sample of at most MAX_PATIENTS
held-out patients is explained, with STEPS points along the path; the card says how many.
The maps stored in the card are block-averaged to at most MAP_SIDE pixels a side (model_card.json
holds every number, and must stay small).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from spine_fl.shared.models.explain import BASELINE, METHOD, integrated_gradients
from spine_fl.shared.contract.tasks import Task

MAX_PATIENTS = 32
STEPS = 16
SAMPLE_SEED = 20250101
MAP_SIDE = 32
DIGITS = 3


def block_mean(image: np.ndarray, side: int = MAP_SIDE) -> np.ndarray:
    """`image` averaged over square blocks so that neither side exceeds `side` (edge rows that do not
    fill a block are dropped)."""
    factor = max(1, -(-max(image.shape) // side))
    h, w = image.shape[0] // factor, image.shape[1] // factor
    return image[:h * factor, :w * factor].reshape(h, factor, w, factor).mean(axis=(1, 3))


def sample_rows(n: int, limit: int = MAX_PATIENTS) -> np.ndarray:
    """All rows when there are at most `limit`, else a fixed random sample of `limit` (sorted)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(SAMPLE_SEED).choice(n, limit, replace=False))


def _rounded(values: np.ndarray) -> list[list[float]]:
    return np.round(values, DIGITS).tolist()


def mean_saliency(model: torch.nn.Module, task: Task, images: np.ndarray, features: np.ndarray,
                  device: torch.device, limit: int = MAX_PATIENTS, steps: int = STEPS) -> dict[str, Any]:
    """Per view: the share of the attribution, its peak pixel, and the mean map and mean image
    (block-averaged; the map relative to its largest value over all views, 0..1)."""
    assert task.image is not None
    rows = sample_rows(len(images), limit)
    attributions = integrated_gradients(model, images[rows], features[rows], device, steps=steps)
    maps = np.stack([np.abs(a.images) for a in attributions])  # (patients, views, size, size)
    totals = maps.reshape(len(maps), -1).sum(axis=1)
    used = totals > 0  # a patient whose logit equals the baseline's everywhere has nothing to share out
    mean = (maps[used] / totals[used, None, None, None]).mean(axis=0) if used.any() else np.zeros(maps.shape[1:])
    mean_images = images[rows].mean(axis=0)
    small = np.stack([block_mean(m) for m in mean])
    top = float(small.max()) or 1.0
    views = []
    for v, view in enumerate(task.image.views):
        peak = np.unravel_index(int(np.argmax(mean[v])), mean[v].shape)
        views.append({"view": view, "share": float(mean[v].sum()), "peak_row_col": [int(i) for i in peak],
                      "map": _rounded(small[v] / top), "image": _rounded(block_mean(mean_images[v]))})
    differences = np.array([abs(a.logit - a.baseline_logit) for a in attributions])
    deltas = np.array([abs(a.convergence_delta) for a in attributions])
    return {"method": METHOD, "steps": steps, "baseline": BASELINE, "patients": int(len(rows)),
            "held_out": int(len(images)), "sample_seed": SAMPLE_SEED if len(rows) < len(images) else None,
            "patients_without_attribution": int((~used).sum()), "image_side": int(images.shape[-1]),
            "map_side": int(small.shape[-1]), "views": views,
            "convergence": {"mean_abs_delta": float(deltas.mean()),
                            "mean_abs_logit_difference": float(differences.mean())}}
