"""The model registry: every model builds, passes Opacus' strict validation, gives one logit per
patient and trains one DP-SGD step; today's tasks keep today's exact initial weights."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from opacus.validators import ModuleValidator

from spine_fl.shared.contract.data_contract import SiteData
from spine_fl.shared.contract.tasks import get_task
from spine_fl.shared.models.registry import MODELS, OutcomeModel, build_model, build_model_named, image_size
from spine_fl.shared.training.local import DpSettings, TrainSettings, train

# model -> (a shipped task whose inputs it reads, image side in px for the test: small to stay fast)
CASES = {
    "small_cnn": ("tfesi_radiograph", 32),
    "logistic": ("vertebral_column", None),
    "mlp": ("rbp_tabular", None),
    "densenet121": ("tfesi_mri", 64),
    "resnet18": ("tfesi_mri", 64),
    "resnet34": ("tfesi_mri", 64),
    "fusion": ("tfesi_fusion", 64),
}
SLOW = {"densenet121"}  # about 25 s for one Opacus step at 64 px on a 2-core CPU

# state_dict SHA-256 of build_model(task, seed=0) for the shipped tasks, computed with the
# pre-registry shared/models/registry.py (OutcomeModel only; commit 78430ae, torch 2.13 CPU) before
# the registry was added: the default model must keep these exact initial weights.
TODAYS_WEIGHTS = {
    "rbp_tabular": "2ae0d7ae59ca36a36160bfa0c2c988478987c802ad6aa705fa3978f678ebb9a3",
    "tfesi_fusion": "2585f34e0893b85893281daede5109fa7c5ca3e3115c5ef493f730418d56c3f4",
    "tfesi_mri": "5e2514c95c104e3171752abb95255dd1066c007218574b046ffeb0c4bcd045db",
    "tfesi_radiograph": "4c721feeb406d77fba1622cc8456936437a463a166ca718a142ebadaf514794c",
    "vertebral_column": "d786343581effd96f978c9a955a6163ab040a4917fd1a378864e84528440fe8a",
}


def _checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _site(task, n: int, size: int | None) -> SiteData:
    rng = np.random.default_rng(0)
    n_views = len(task.image.views) if task.image else 0
    return SiteData(
        patient_ids=np.array([f"p{i}" for i in range(n)]), split=np.array(["train"] * n),
        y=np.array([0, 1] * (n // 2), dtype=np.float32),
        features=rng.normal(size=(n, task.n_features)).astype(np.float32),
        images=rng.random((n, n_views, size, size), dtype=np.float32) if n_views else None,
        subgroups=pd.DataFrame({"age": [60.0] * n, "sex": ["F"] * n}))


def test_the_registry_lists_the_issue_models() -> None:
    assert set(MODELS) == set(CASES)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_model_validates_gives_one_logit_and_takes_a_dp_step(name: str) -> None:
    task_name, size = CASES[name]
    task = get_task(task_name)
    model = build_model_named(name, task, seed=0)
    assert ModuleValidator.validate(model, strict=True) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())

    pair = _site(task, 2, size)
    images = torch.from_numpy(pair.images) if pair.images is not None else torch.zeros(2, 0)
    model.eval()
    assert model(images, torch.from_numpy(pair.features)).shape == (2,)

    # 4 patients, batch 4: Poisson sampling at rate 1, exactly one DP-SGD step
    before = [p.detach().clone() for p in model.parameters()]
    _, spend = train(model, _site(task, 4, size), TrainSettings(batch_size=4, learning_rate=0.1),
                     torch.device("cpu"), DpSettings(noise_multiplier=1.0, max_grad_norm=1.0))
    assert spend is not None and spend.steps == 1
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # noise reaches every weight


@pytest.mark.parametrize("name", [n for n in CASES if n not in SLOW])
def test_an_empty_poisson_batch_is_a_noise_only_dp_step(name: str) -> None:
    """Poisson sampling draws an empty batch now and then at a small site (MONAI's ResNet could not
    flatten one): the step still runs through every layer and adds noise to every weight."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    task_name, size = CASES[name]
    task = get_task(task_name)
    model = build_model_named(name, task, seed=0)
    pair = _site(task, 2, size)
    images = torch.from_numpy(pair.images) if pair.images is not None else torch.zeros(2, 0)
    features = torch.from_numpy(pair.features)
    loader = DataLoader(TensorDataset(images, features), batch_size=2)
    private, optimizer, _ = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True)
    before = [p.detach().clone() for p in model.parameters()]
    logits = private(images[:0], features[:0])
    assert logits.shape == (0,)
    logits.sum().backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", sorted(TODAYS_WEIGHTS))
def test_todays_tasks_keep_todays_initial_weights(name: str) -> None:
    model = build_model(get_task(name), seed=0)
    assert isinstance(model, OutcomeModel)
    assert _checksum(model) == TODAYS_WEIGHTS[name]


def test_a_task_picks_its_model_and_settings_by_name() -> None:
    table = get_task("vertebral_column")
    as_text = SimpleNamespace(name="t", image=None, n_features=table.n_features, model="mlp",
                              model_settings={"hidden": 8})
    as_spec = SimpleNamespace(name="t", image=None, n_features=table.n_features,
                              model=SimpleNamespace(name="logistic", settings={}))
    assert build_model(as_text).body[0].out_features == 8
    assert isinstance(build_model(as_spec).linear, torch.nn.Linear)
    old_name = SimpleNamespace(name="t", image=None, n_features=6, model=SimpleNamespace(name="outcome_model",
                                                                                         settings={}))
    assert isinstance(build_model(old_name), OutcomeModel)
    fused = build_model_named("fusion", get_task("tfesi_fusion"), 0, encoder="small_cnn")
    assert image_size("fusion", {"encoder": "small_cnn"}) == 64 and image_size("resnet18") == 224
    assert fused(torch.rand(2, 1, 64, 64), torch.randn(2, 5)).shape == (2,)


def test_unknown_model_setting_or_unfit_task_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown model 'vit'; the registry has: small_cnn, logistic, mlp"):
        build_model_named("vit", get_task("tfesi_mri"))
    with pytest.raises(ValueError, match="unknown model 'vit'"):
        build_model(SimpleNamespace(name="t", image=None, n_features=6, model="vit"))
    with pytest.raises(ValueError, match="no setting width; its settings: hidden, dropout"):
        build_model_named("mlp", get_task("vertebral_column"), width=3)
    with pytest.raises(ValueError, match="task 'tfesi_mri', model 'logistic': .* has 1 image view"):
        build_model_named("logistic", get_task("tfesi_mri"))
    with pytest.raises(ValueError, match="choose 'fusion' with encoder"):
        build_model_named("resnet18", get_task("tfesi_fusion"))
    with pytest.raises(ValueError, match="unknown encoder 'vit'"):
        build_model_named("fusion", get_task("tfesi_fusion"), encoder="vit")


def test_monai_nets_accept_32_px() -> None:
    for name in ("densenet121", "resnet18"):
        model = build_model_named(name, get_task("tfesi_mri")).eval()
        with torch.no_grad():
            assert model(torch.rand(2, 1, 32, 32), torch.zeros(2, 0)).shape == (2,)


def test_the_default_model_does_not_import_monai() -> None:
    """MONAI takes seconds to import: sites and the demo on the small CNN should not pay for it."""
    code = ("import sys; from spine_fl.shared.contract.tasks import get_task; "
            "from spine_fl.shared.models.registry import build_model; build_model(get_task('tfesi_mri')); "
            "print('monai' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_benchmark_refreshes_only_its_readme_section(tmp_path: Path) -> None:
    from spine_fl.simulations.benchmarks.models import write_readme

    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n## models\n\nold\n\n## privacy\n\nkept\n")
    report = {"command": "python -m spine_fl.simulations.benchmarks.models", "git_commit": "0" * 40,
              "git_dirty": False, "date": "today",
              "machine": {"cpu": "cpu", "cores": 2, "cuda": None, "torch": "t", "opacus": "o", "monai": "m",
                          "load_average_at_start": [1.0, 1.0, 1.0]},
              "results": [{"model": "mlp", "task": "rbp_tabular", "image_px": None, "parameters": 641,
                           "patients": 16, "dp_steps": 2, "dp_round_seconds": 1.0, "peak_rss_mib": 400,
                           "device": "cpu"}]}
    write_readme(readme, report)
    write_readme(readme, report)
    text = readme.read_text()
    assert "old" not in text and text.count("## models") == 1 and "## privacy\n\nkept" in text
    assert "| mlp | rbp_tabular | table | 641 | 16 / 2 | 1.0 | 400 | cpu: cpu, 2 cores |" in text
