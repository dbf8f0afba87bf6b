"""Mixed precision (bf16 autocast), which image networks train with on a CUDA GPU: DP-SGD still clips
every patient's gradient to max_grad_norm exactly, and a round trains and spends as planned.

CI has no GPU; CPU autocast runs the same code path (Opacus' hooks see bf16 activations and
gradients either way), so these tests force `amp=True` on the CPU. Where torch sees a CUDA GPU the
same tests run there too, with the precision training picks by itself."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from spine_fl.shared.contract.data_contract import SiteData
from spine_fl.shared.contract.tasks import get_task
from spine_fl.shared.models.registry import build_model_named
from spine_fl.shared.training.local import (
    DpSettings,
    TrainSettings,
    grad_samples_to_fp32,
    mixed_precision,
    planned_spend,
    train,
)

TASK = get_task("tfesi_radiograph")
PX = 32
CLIP = 1e-3  # far below any patient's gradient norm: every gradient is clipped
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


def _site(n: int) -> SiteData:
    rng = np.random.default_rng(0)
    return SiteData(patient_ids=np.array([f"p{i}" for i in range(n)]), split=np.array(["train"] * n),
                    y=np.array([0, 1] * (n // 2), dtype=np.float32),
                    features=rng.normal(size=(n, TASK.n_features)).astype(np.float32),
                    images=rng.random((n, len(TASK.image.views), PX, PX), dtype=np.float32),
                    subgroups=pd.DataFrame({"age": [60.0] * n, "sex": ["F"] * n}))


def _clipped_gradient_norms(to_fp32: bool, device: str = "cpu") -> list[float]:
    """Each patient alone in a noise-free DP-SGD step under bf16 autocast: the norm of what Opacus
    sums for that patient (its clipped gradient; expected batch size 1, so nothing is rescaled)."""
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    data = _site(32)  # whether bf16 rounds a norm down is a coin flip per patient: 32 of them
    model = build_model_named("small_cnn", TASK, seed=0).to(device)
    loader = DataLoader(TensorDataset(torch.from_numpy(data.images), torch.from_numpy(data.features),
                                      torch.from_numpy(data.y)), batch_size=1)
    private, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=CLIP, poisson_sampling=False)
    norms = []
    for images, features, y in loader:
        optimizer.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = nn.BCEWithLogitsLoss()(private(images.to(device), features.to(device)), y.to(device))
        loss.backward()
        if to_fp32:
            grad_samples_to_fp32(list(model.parameters()))
        optimizer.step()
        norms.append(float(torch.cat([p.grad.flatten().double() for p in model.parameters()]).norm()))
    return norms


@pytest.mark.parametrize("device", DEVICES)
def test_every_clipped_gradient_stays_within_max_grad_norm_under_bf16(device: str) -> None:
    norms = _clipped_gradient_norms(to_fp32=True, device=device)
    assert max(norms) <= CLIP * (1 + 1e-5), norms
    assert min(norms) >= CLIP * (1 - 1e-3)  # clipping was active: each gradient was cut down to the bound


def test_without_fp32_norms_a_clipped_gradient_can_exceed_the_bound() -> None:
    """What grad_samples_to_fp32 prevents: Opacus computes bf16 gradients' norms in bf16, and the
    'clipped' gradient misses max_grad_norm by up to 0.4%, above it for some patients; the noise,
    calibrated to max_grad_norm, then under-protects them."""
    norms = _clipped_gradient_norms(to_fp32=False)
    assert max(norms) > CLIP * (1 + 1e-4), norms


@pytest.mark.parametrize("device", DEVICES)
def test_a_dp_round_under_bf16_trains_and_spends_as_planned(device: str) -> None:
    """On a GPU, training picks bf16 by itself and draws DP's noise from a CUDA generator."""
    data = _site(16)
    model = build_model_named("small_cnn", TASK, seed=0)
    before = [p.detach().clone().to(device) for p in model.parameters()]
    settings = TrainSettings(batch_size=4, learning_rate=0.1)
    on = torch.device(device)
    assert mixed_precision(on, data) == (device == "cuda")
    loss, spend = train(model, data, settings, on, DpSettings(1.0, 1.0), amp=True if device == "cpu" else None)
    assert np.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay in fp32
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    planned = planned_spend(len(data), settings.batch_size, settings.epochs, 1.0)
    assert (spend.noise_multiplier, spend.sample_rate, spend.steps) == (1.0, planned.sample_rate, planned.steps)


def test_mixed_precision_is_for_images_on_a_cuda_gpu_only() -> None:
    images = _site(4)
    table = SiteData(images.patient_ids, images.split, images.y, images.features, None, images.subgroups)
    assert not mixed_precision(torch.device("cpu"), images)
    assert not mixed_precision(torch.device("cuda"), table)
