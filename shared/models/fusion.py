"""Fusion (`fusion`): an image encoder from the registry and the clinical predictors, one logit.

The multimodal studies (e.g. Leiden's stenosis-surgery task: T2 MRI + demographics + ZCQ) need
both inputs; the encoder is a setting so a consortium can trade accuracy for round time.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from spine_fl.shared.models.monai_nets import ENCODERS as MONAI_ENCODERS
from spine_fl.shared.models.small_cnn import ViewEncoder, logit_head

ENCODERS: dict[str, Callable[[int], nn.Module]] = {"small_cnn": ViewEncoder, **MONAI_ENCODERS}


class FusionModel(nn.Module):
    """encoder(images) and a hidden layer over the predictors, concatenated -> centred head -> logit."""

    def __init__(self, n_views: int, n_features: int, encoder: str = "resnet18", hidden: int = 32,
                 dropout: float = 0.2):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"fusion: unknown encoder {encoder!r}; choose one of: {', '.join(ENCODERS)}")
        if not (n_views and n_features):
            raise ValueError(f"fusion needs image views and clinical predictors; the task has {n_views} view(s) "
                             f"and {n_features} predictor input(s): choose an image network or 'logistic'/'mlp'")
        self.encoder = ENCODERS[encoder](n_views)
        self.tabular = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU())
        self.head = logit_head(self.encoder.out_features + hidden, dropout)

    def forward(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.encoder(images), self.tabular(features)], dim=1)).squeeze(1)
