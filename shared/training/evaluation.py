"""Score a model on every site's held-out split and summarise with scikit-learn metrics.

`overall` pools the sites' held-out patients (one AUROC over all of them); `per_site` keeps each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spine_fl.shared.contract.data_contract import SiteData
from spine_fl.shared.metrics import binary_metrics
from spine_fl.shared.training.local import predict


@dataclass
class Scores:
    """Held-out labels and predicted probabilities per site."""

    per_site: dict[str, tuple[np.ndarray, np.ndarray]]

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.concatenate([v[0] for v in self.per_site.values()]),
                np.concatenate([v[1] for v in self.per_site.values()]))

    def summary(self) -> dict:
        return {**binary_metrics(*self.pooled()), "per_site": {s: binary_metrics(*v) for s, v in self.per_site.items()}}


def score_sites(model: torch.nn.Module, sites: dict[str, SiteData], split: str, device: torch.device) -> Scores:
    out = {}
    for name, data in sites.items():
        part = data.subset(split)
        if len(part):
            out[name] = (part.y, predict(model, part, device))
    return Scores(out)
