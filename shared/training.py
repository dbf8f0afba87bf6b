"""Local training and prediction, shared by the sites, the pooled and the local-only baselines."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .data_contract import SiteData


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    proximal_mu: float = 0.0  # FedProx: pull local weights towards the round's global weights
    seed: int = 0


def tensors(data: SiteData) -> TensorDataset:
    images = torch.from_numpy(data.images) if data.images is not None else torch.zeros(len(data), 0)
    return TensorDataset(images, torch.from_numpy(data.features), torch.from_numpy(data.y))


def get_weights(model: nn.Module) -> list[np.ndarray]:
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    keys = list(model.state_dict().keys())
    if len(keys) != len(weights):
        raise ValueError(f"model has {len(keys)} tensors, received {len(weights)}: task or model mismatch")
    model.load_state_dict(OrderedDict((k, torch.as_tensor(w)) for k, w in zip(keys, weights)), strict=True)


def train(model: nn.Module, data: SiteData, settings: TrainSettings, device: torch.device) -> float:
    """Train in place; returns the mean training loss of the last epoch."""
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(tensors(data), batch_size=settings.batch_size, shuffle=True, generator=generator)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if settings.proximal_mu > 0 else None
    loss_fn = nn.BCEWithLogitsLoss()
    epoch_loss = 0.0
    for _ in range(settings.epochs):
        total, count = 0.0, 0
        for images, features, y in loader:
            images, features, y = images.to(device), features.to(device), y.to(device)
            optimizer.zero_grad()
            loss = loss_fn(model(images, features), y)
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
                loss = loss + settings.proximal_mu / 2 * prox
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
        epoch_loss = total / max(count, 1)
    return epoch_loss


@torch.no_grad()
def predict(model: nn.Module, data: SiteData, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """Probability of the positive outcome for every patient in data."""
    model.to(device).eval()
    out = []
    for images, features, _ in DataLoader(tensors(data), batch_size=batch_size):
        out.append(torch.sigmoid(model(images.to(device), features.to(device))).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
