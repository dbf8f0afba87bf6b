"""Every task has an Opacus-compatible model that runs forward/backward on its inputs."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from spine_fl.shared.config import ConfigError, RunSettings
from spine_fl.shared.contract.tasks import TASKS, UnknownTaskError, get_task
from spine_fl.shared.models.registry import build_model


@pytest.mark.parametrize("name", sorted(TASKS))
def test_model_is_opacus_compatible_and_trains(name: str) -> None:
    task = get_task(name)
    model = build_model(task, seed=0)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    n_views = len(task.image.views) if task.image else 0
    images = torch.rand(5, n_views, 32, 32) if n_views else torch.zeros(5, 0)
    logits = model(images, torch.randn(5, task.n_features))
    assert logits.shape == (5,)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_same_seed_same_initial_weights() -> None:
    task = get_task("tfesi_radiograph")
    a, b = build_model(task, 3).state_dict(), build_model(task, 3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_registry_has_the_four_kinds_and_the_real_data_task() -> None:
    assert get_task("tfesi_radiograph").image.views == ("AP", "LAT", "LOBL", "ROBL")
    assert get_task("tfesi_mri").image.views == ("T2_AXIAL",)
    assert get_task("tfesi_fusion").image is not None and get_task("tfesi_fusion").features
    assert get_task("rbp_tabular").image is None
    assert get_task("vertebral_column").n_features == 6
    with pytest.raises(UnknownTaskError, match="choose one of"):
        get_task("tfesi_ct")


def test_run_settings_round_trip_and_reject_nonsense() -> None:
    settings = RunSettings(task="rbp_tabular", strategy="fedprox", proximal_mu=0.1)
    assert RunSettings.from_run_config(settings.to_run_config()) == settings
    with pytest.raises(ConfigError, match="strategy"):
        RunSettings(strategy="fedmagic")
    with pytest.raises(ConfigError, match="rounds"):
        RunSettings(rounds=0)
