"""Models for tables only (`logistic`, `mlp`): the baselines a clinical-variables study reports first."""

from __future__ import annotations

import torch
from torch import nn

from spine_fl.shared.models.small_cnn import logit_head


def _needs_features(name: str, n_views: int, n_features: int) -> None:
    if n_views:
        raise ValueError(f"{name} reads clinical predictors only, but the task has {n_views} image view(s); "
                         "choose 'fusion' (images + predictors) or an image network")
    if not n_features:
        raise ValueError(f"{name} needs clinical predictors, but the task has none")


class LogisticModel(nn.Module):
    """Logistic regression: one Linear on the (already reference-scaled) predictors."""

    def __init__(self, n_views: int, n_features: int):
        super().__init__()
        _needs_features("logistic", n_views, n_features)
        self.linear = nn.Linear(n_features, 1)

    def forward(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features).squeeze(1)


class MlpModel(nn.Module):
    """A small MLP: one hidden ReLU layer, then the same centred head as the small CNN."""

    def __init__(self, n_views: int, n_features: int, hidden: int = 32, dropout: float = 0.1):
        super().__init__()
        _needs_features("mlp", n_views, n_features)
        self.body = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU())
        self.head = logit_head(hidden, dropout)

    def forward(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(features)).squeeze(1)
