"""Why the model gave one patient its probability: Integrated Gradients (Captum) on the logit.

Integrated Gradients (Sundararajan et al. 2017) attributes the difference between the patient's
logit and the logit of a reference input (the baseline) to each input value; the attributions add
up to that difference (completeness), up to the integral's numerical error, reported per patient
as `convergence_delta`.

The baseline: every image black (pixel value 0 after the contract's scaling to [0, 1]); every
numeric predictor at the task's reference value (its `center`: 0 after scaling), binary predictors
absent (0), and no category chosen (all one-hot inputs 0). A category predictor's contribution is
the sum over its one-hot inputs, so each predictor the task names gets one number.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from spine_fl.shared.contract.tasks import Feature, Task

METHOD = "integrated_gradients"
BASELINE = ("images black (0), numeric predictors at the task's reference value (center), binary predictors "
            "absent (0), no category chosen")
STEPS = 64  # points along the path (Gauss-Legendre); convergence_delta reports what is left


@dataclass
class Attribution:
    """One patient's explanation: logits, and the attribution per image pixel and per predictor input."""

    logit: float
    baseline_logit: float
    images: np.ndarray | None  # (n_views, size, size), the images' own shape
    features: np.ndarray  # (n_inputs,) one per model input (one-hot categories separately)
    convergence_delta: float  # sum of attributions - (logit - baseline_logit)

    @property
    def probability(self) -> float:
        return float(1 / (1 + np.exp(-self.logit)))

    @property
    def total(self) -> float:
        return float((0.0 if self.images is None else self.images.sum()) + self.features.sum())


def integrated_gradients(model: nn.Module, images: np.ndarray | None, features: np.ndarray, device: torch.device,
                         steps: int = STEPS) -> list[Attribution]:
    """Attributions for each patient (rows of `images` / `features`), on `device`.

    Only the inputs the model reads are attributed: images when the task has views, predictors when
    it has any (an image-only model gets an empty feature attribution)."""
    from captum.attr import IntegratedGradients

    model = model.to(device).eval()
    n = len(features)
    img = torch.from_numpy(images).to(device) if images is not None else torch.zeros(n, 0, device=device)
    feat = torch.from_numpy(features).to(device)
    use_images, use_features = images is not None, features.shape[1] > 0
    inputs = tuple(t for t, used in ((img, use_images), (feat, use_features)) if used)

    def forward(*attributed: torch.Tensor) -> torch.Tensor:
        it, batch = iter(attributed), len(attributed[0])
        empty = torch.zeros(batch, 0, device=device)  # an input this model does not read
        x_img = next(it) if use_images else empty
        x_feat = next(it) if use_features else empty
        return model(x_img, x_feat)

    baselines = tuple(torch.zeros_like(t) for t in inputs)
    ig = IntegratedGradients(forward)
    out: list[Attribution] = []
    for i in range(n):  # one patient at a time: the path's steps form the batch
        one = tuple(t[i:i + 1] for t in inputs)
        zero = tuple(b[i:i + 1] for b in baselines)
        attributions, delta = ig.attribute(one, baselines=zero, n_steps=steps, return_convergence_delta=True,
                                           internal_batch_size=min(steps, 32))
        with torch.no_grad():
            logit = float(forward(*one)[0])
            baseline_logit = float(forward(*zero)[0])
        it = iter(a.detach().cpu().numpy()[0].astype(np.float64) for a in attributions)
        image_attr = next(it) if use_images else None
        feature_attr = next(it) if use_features else np.zeros(0)
        out.append(Attribution(logit, baseline_logit, image_attr, feature_attr, float(delta.detach().cpu()[0])))
    return out


def saliency_peak(saliency: np.ndarray) -> tuple[int, int]:
    """(row, column) of the largest |attribution| in one view's map: where the explanation points
    (what the page and explanations.json report, and what the pointing game scores)."""
    row, col = np.unravel_index(int(np.argmax(np.abs(saliency))), saliency.shape)
    return int(row), int(col)


@dataclass(frozen=True)
class Contribution:
    """One predictor's share of the logit difference, with the patient's value in the task's units."""

    feature: str
    unit: str
    value: str  # as the clinical table holds it, e.g. "55" or "lumpy"
    contribution: float

    @property
    def label(self) -> str:
        unit = f" {self.unit}" if self.unit and self.unit not in ("count", "ratio") else ""
        return f"{self.feature} = {self.value}{unit}"


def _value_of(feature: Feature, inputs: np.ndarray) -> str:
    """The predictor's value from its scaled model inputs (the contract's reference scaling undone)."""
    if feature.kind == "category":
        return feature.categories[int(np.argmax(inputs))] if inputs.max() > 0 else "none"
    if feature.kind == "binary":
        return "1 (present)" if inputs[0] >= 0.5 else "0 (absent)"
    return f"{inputs[0] * feature.scale + feature.center:.4g}"


def feature_contributions(task: Task, feature_inputs: np.ndarray, attribution: np.ndarray) -> list[Contribution]:
    """Per task predictor (one-hot inputs summed), sorted by |contribution|, largest first."""
    out, start = [], 0
    for feature in task.features:
        width = len(feature.categories) if feature.kind == "category" else 1
        part = slice(start, start + width)
        out.append(Contribution(feature.name, feature.unit, _value_of(feature, feature_inputs[part]),
                                float(attribution[part].sum())))
        start += width
    return sorted(out, key=lambda c: -abs(c.contribution))
