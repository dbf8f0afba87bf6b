"""The yardstick: a federated round written with nothing but PyTorch, Opacus and NumPy.

What spine-fl is compared against must not run spine-fl's code, or the comparison measures
nothing. This module uses only the *workload*: each site's arrays (saved once from the site folder
by `save_site_arrays`) and the registry's model, built from the same seed. Training is the loop
everyone writes: one local epoch, BCE-with-logits, SGD or Adam, and for DP Opacus' `make_private`
with Poisson sampling, per-sample clipping and Gaussian noise; then the held-out patients are
scored and the updates averaged by example count (FedAvg). On a CUDA GPU it trains there, image
networks under bf16 autocast where the GPU has bf16, as spine-fl does (the same device and precision).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@dataclass(frozen=True)
class Recipe:
    """The local training both spine-fl and the yardstick run (RunSettings' fields of the same name)."""

    epochs: int
    batch_size: int
    optimizer: str  # "sgd" or "adam"
    learning_rate: float
    dp: bool
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (n, views, px, px), or (n, 0) for a table task
    features: np.ndarray
    y: np.ndarray

    def tensors(self) -> TensorDataset:
        return TensorDataset(torch.from_numpy(self.images), torch.from_numpy(self.features), torch.from_numpy(self.y))


def save_site_arrays(path: Path, data: object) -> None:
    """A site's train and test arrays (from a loaded SiteData) in one .npz the yardstick reads."""
    out = {}
    for split in ("train", "test"):
        part = data.subset(split)  # type: ignore[attr-defined]
        images = part.images if part.images is not None else np.zeros((len(part), 0), np.float32)
        out |= {f"{split}_images": images, f"{split}_features": part.features, f"{split}_y": part.y}
    np.savez(path, **out)


_LOADED: dict[str, tuple[Split, Split]] = {}


def load_site_arrays(path: Path) -> tuple[Split, Split]:
    """(train, test), kept per process: a ClientApp is rebuilt for every message."""
    key = str(path)
    if key not in _LOADED:
        with np.load(path) as f:
            _LOADED[key] = tuple(Split(f[f"{s}_images"], f[f"{s}_features"], f[f"{s}_y"])  # type: ignore[assignment]
                                 for s in ("train", "test"))
    return _LOADED[key]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    model.load_state_dict({k: torch.as_tensor(w) for k, w in zip(model.state_dict(), weights)}, strict=True)


def get_weights(model: nn.Module) -> list[np.ndarray]:
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def train(template: nn.Module, weights: list[np.ndarray], split: Split, recipe: Recipe, seed: int) -> list[np.ndarray]:
    """One site's local training from the global weights; the new weights."""
    model = copy.deepcopy(template)  # Opacus hooks the module it wraps: a fresh one each round
    set_weights(model, weights)
    on = device()
    model.to(on).train()
    # image networks in bf16 where the GPU has it natively (spine-fl's rule, written out, not imported)
    amp = on.type == "cuda" and split.images.shape[1] > 0 and torch.cuda.is_bf16_supported(including_emulation=False)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(split.tensors(), batch_size=recipe.batch_size, shuffle=True, generator=generator)
    if recipe.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=recipe.learning_rate)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    trained = model
    if recipe.dp:
        from opacus import PrivacyEngine

        # the same two notices spine-fl silences (its CSPRNG-seeded generator; inputs need no grad)
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        trained, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=recipe.noise_multiplier,
            max_grad_norm=recipe.max_grad_norm, poisson_sampling=True,
            # torch draws noise for a CUDA tensor only from a CUDA generator
            noise_generator=generator if on.type == "cpu" else torch.Generator(device=on).manual_seed(seed))
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(recipe.epochs):
        for images, features, y in loader:
            optimizer.zero_grad()
            with torch.autocast(on.type, dtype=torch.bfloat16, enabled=amp):
                logits = trained(images.to(on), features.to(on))
                loss = loss_fn(logits, y.to(on)) if len(y) else logits.sum()  # Poisson sampling may draw no one
            loss.backward()
            optimizer.step()
    return get_weights(model)


@torch.no_grad()
def evaluate(template: nn.Module, weights: list[np.ndarray], split: Split) -> dict[str, float]:
    """Held-out log loss and AUROC, as a site reports them."""
    from sklearn.metrics import log_loss, roc_auc_score

    model = copy.deepcopy(template)
    set_weights(model, weights)
    on = device()
    model.to(on).eval()
    logits = model(torch.from_numpy(split.images).to(on), torch.from_numpy(split.features).to(on))
    p = torch.sigmoid(logits).cpu().numpy()
    p = np.clip(np.nan_to_num(p, nan=0.5), 1e-7, 1 - 1e-7)
    both = len(np.unique(split.y)) == 2
    return {"log_loss": float(log_loss(split.y, p, labels=[0, 1])),
            "auroc": float(roc_auc_score(split.y, p)) if both else float("nan")}


def fedavg(updates: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    total = sum(n for _, n in updates)
    return [sum(w[i] * (n / total) for w, n in updates) for i in range(len(updates[0][0]))]


class PlainFederation:
    """Rounds of the yardstick in this process: every site in turn, then FedAvg.

    `threads`: torch's CPU threads while a round runs (then restored). Flower's engine gives each
    site one CPU, so its sites train on one thread each; the yardstick does the same. (Several
    threads per process also degrade badly when other work oversubscribes the cores.)"""

    def __init__(self, template: nn.Module, sites: list[Path], recipe: Recipe, threads: int = 1):
        self.template, self.recipe, self.threads = template, recipe, threads
        self.sites = [load_site_arrays(p) for p in sites]
        self.weights = get_weights(template)
        self.round = 0

    def run_round(self) -> None:
        self.round += 1
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            updates = [(train(self.template, self.weights, tr, self.recipe, seed=1000 * self.round + i), len(tr.y))
                       for i, (tr, _) in enumerate(self.sites)]
            self.weights = fedavg(updates)
            for _, test in self.sites:
                evaluate(self.template, self.weights, test)
        finally:
            torch.set_num_threads(before)
