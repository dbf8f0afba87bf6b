"""The small CNN (`small_cnn`): the fast default, one grouped-convolution encoder per view at 64 px.

Opacus-compatible: GroupNorm instead of BatchNorm, no weight sharing across views (each view has
its own filters via grouped convolutions), so per-sample gradients are well defined.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_block(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, groups=groups),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class ViewEncoder(nn.Module):
    """One small CNN per view, run side by side as grouped convolutions."""

    def __init__(self, n_views: int, width: int = 16, grid: int = 4):
        super().__init__()
        self.blocks = nn.Sequential(
            _conv_block(n_views, n_views * 8, n_views),
            _conv_block(n_views * 8, n_views * width, n_views),
            _conv_block(n_views * width, n_views * width, n_views),
        )
        # a coarse grid keeps where things are (foramen vs canal), which global pooling loses
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.out_features = n_views * width * grid * grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(images)).flatten(1)


def logit_head(width: int, dropout: float) -> nn.Sequential:
    """Features -> one logit.

    LayerNorm centres the (non-negative, post-ReLU) features: without it DP-SGD's noise on the
    head weights adds up to one large common shift of every patient's logit (all-positive output).
    """
    return nn.Sequential(nn.LayerNorm(width), nn.Dropout(dropout), nn.Linear(width, 1))


class OutcomeModel(nn.Module):
    """Images and/or clinical features -> one logit for the favourable / positive outcome."""

    def __init__(self, n_views: int, n_features: int, hidden: int = 32, dropout: float = 0.2):
        super().__init__()
        self.encoder = ViewEncoder(n_views) if n_views else None
        self.tabular = (
            nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU()) if n_features else None
        )
        width = (self.encoder.out_features if self.encoder else 0) + (hidden if n_features else 0)
        self.head = logit_head(width, dropout)

    def forward(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.encoder is not None:
            parts.append(self.encoder(images))
        if self.tabular is not None:
            parts.append(self.tabular(features))
        return self.head(torch.cat(parts, dim=1)).squeeze(1)
