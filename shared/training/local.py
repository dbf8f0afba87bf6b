"""Local training and prediction, shared by the sites, the pooled and the local-only baselines."""

from __future__ import annotations

import math
import secrets
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from spine_fl.shared.contract.data_contract import SiteData


@dataclass(frozen=True)
class DpSettings:
    """DP-SGD for one round: Poisson sampling, per-sample clipping to max_grad_norm, Gaussian noise."""

    noise_multiplier: float
    max_grad_norm: float


@dataclass(frozen=True)
class DpSpend:
    """What one round of DP-SGD cost: the accountant's (noise_multiplier, sample_rate, steps)."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def planned_spend(n_examples: int, batch_size: int, epochs: int, noise_multiplier: float) -> DpSpend:
    """Known before training: Opacus samples each example with rate 1 / (batches per epoch)."""
    batches = max(1, math.ceil(n_examples / batch_size))
    return DpSpend(noise_multiplier, 1.0 / batches, epochs * batches)


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    proximal_mu: float = 0.0  # FedProx: pull local weights towards the round's global weights
    seed: int = 0
    optimizer: str = "sgd"  # or "adam"; see RunSettings.optimizer


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


def noise_source(device: torch.device, sampling: torch.Generator) -> torch.Generator:
    """The generator of DP's Gaussian noise: torch draws noise for a CUDA tensor only from a CUDA
    generator, so on a GPU it is one of its own, seeded from the OS's CSPRNG like the sampling's."""
    if device.type == "cpu":
        return sampling
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def native_bf16() -> bool:
    """A CUDA GPU that computes in bf16 itself (Ampere and later). torch's default answer also says
    yes for older GPUs (a T4, a V100) that only emulate bf16, slower than fp32."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def mixed_precision(device: torch.device, data: SiteData) -> bool:
    """bf16 autocast for image networks on a GPU with native bf16: their convolutions run on tensor
    cores. Tables gain nothing, and a CPU runs bf16 slower than fp32."""
    return device.type == "cuda" and data.images is not None and native_bf16()


def grad_samples_to_fp32(params: list[torch.Tensor]) -> None:
    """Under autocast Opacus' per-sample gradients come out in bf16, and it would compute their norms
    in bf16 (about 3 significant digits): a clipped gradient could exceed max_grad_norm by up to
    0.4%, and the noise is calibrated to max_grad_norm. In fp32 the clipping bound holds exactly for
    the gradient that is summed."""
    for p in params:
        sample = getattr(p, "grad_sample", None)
        if isinstance(sample, torch.Tensor) and sample.dtype != torch.float32:
            p.grad_sample = sample.float()


def train(model: nn.Module, data: SiteData, settings: TrainSettings, device: torch.device,
          dp: DpSettings | None = None, amp: bool | None = None) -> tuple[float, DpSpend | None]:
    """Train in place; returns the last epoch's mean loss and, with DP, what the round spent.

    FedProx's proximal term is applied as a decoupled step towards the round's starting weights
    after each optimizer step: it only reads public weights, so it composes with DP-SGD.
    `amp`: bf16 autocast for the forward pass; by default where `mixed_precision` says it pays
    (the weights, the optimizer, clipping and noise stay in fp32).
    """
    amp = mixed_precision(device, data) if amp is None else amp
    # DP's guarantee needs sampling and noise the coordinator cannot predict: never the run's
    # public seed, but a fresh seed from the OS's CSPRNG (Opacus' secure_mode needs torchcsprng).
    seed = settings.seed if dp is None else secrets.randbits(63)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(tensors(data), batch_size=settings.batch_size, shuffle=True, generator=generator)
    model.to(device).train()
    if settings.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if settings.proximal_mu > 0 else None
    trained, spend = model, None
    if dp is not None:
        from opacus import PrivacyEngine

        # Opacus' secure_mode needs torchcsprng; the CSPRNG-seeded generator above stands in for it.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")  # inputs need no grad

        engine = PrivacyEngine(secure_mode=False)
        trained, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm, poisson_sampling=True, noise_generator=noise_source(device, generator))
        spend = DpSpend(dp.noise_multiplier, float(loader.sample_rate), 0)
    loss_fn = nn.BCEWithLogitsLoss()
    epoch_loss, steps = 0.0, 0
    for _ in range(settings.epochs):
        total, count = 0.0, 0
        for images, features, y in loader:
            optimizer.zero_grad()
            images, features, y = images.to(device), features.to(device), y.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = trained(images, features)
                # Poisson sampling can draw an empty batch: it is still a (noise-only) DP step
                loss = loss_fn(logits, y) if len(y) else logits.sum()
            loss.backward()
            if amp and dp is not None:
                grad_samples_to_fp32(list(model.parameters()))
            optimizer.step()
            steps += 1
            if anchor is not None:
                with torch.no_grad():
                    for p, a in zip(model.parameters(), anchor):
                        p.sub_(settings.learning_rate * settings.proximal_mu * (p - a))
            total += float(loss.detach()) * len(y)
            count += len(y)
        epoch_loss = total / max(count, 1)
    if spend is not None:
        spend = DpSpend(spend.noise_multiplier, spend.sample_rate, steps)
    return epoch_loss, spend


@torch.no_grad()
def predict(model: nn.Module, data: SiteData, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """Probability of the positive outcome for every patient in data."""
    model.to(device).eval()
    out = []
    for images, features, _ in DataLoader(tensors(data), batch_size=batch_size):
        out.append(torch.sigmoid(model(images.to(device), features.to(device))).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


@torch.no_grad()
def predict_logits(model: nn.Module, data: SiteData, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """The model's logit for every patient in data (recalibration bins these)."""
    model.to(device).eval()
    out = []
    for images, features, _ in DataLoader(tensors(data), batch_size=batch_size):
        out.append(model(images.to(device), features.to(device)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def output_layer(model: nn.Module) -> nn.Linear | None:
    """The last Linear with one output (every registry model ends in one: the logit), or None."""
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.out_features == 1:
            last = module
    return last


@torch.no_grad()
def fold_calibration(model: nn.Module, a: float, b: float) -> bool:
    """Make the model output a * logit + b (Platt scaling folded into its output layer); False when
    the model has no single-output Linear layer to fold it into."""
    layer = output_layer(model)
    if layer is None:
        return False
    layer.weight.mul_(a)
    if layer.bias is not None:
        layer.bias.mul_(a).add_(b)
    else:
        return False
    return True
