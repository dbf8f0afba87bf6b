"""The model registry: which network a task trains, by name, and the device it runs on.

Every model maps (images, features) -> one logit per patient and is Opacus-compatible (GroupNorm,
no BatchNorm; ModuleValidator strict passes). A task names its model (`[model] name`, settings
passed to the builder as keywords); tasks that name none train the fast default, the small CNN.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from spine_fl.shared.contract.tasks import Task
from spine_fl.shared.models.fusion import FusionModel
from spine_fl.shared.models.monai_nets import ImageModel
from spine_fl.shared.models.small_cnn import OutcomeModel, ViewEncoder
from spine_fl.shared.models.tabular import LogisticModel, MlpModel

__all__ = ["DEFAULT_MODEL", "MODELS", "OutcomeModel", "ViewEncoder", "build_model", "build_model_named",
           "image_size", "model_of_task", "pick_device"]

# name -> builder(n_views, n_features, **settings); one line per model.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": OutcomeModel,  # grouped-conv CNN per view (+ predictors), 64 px: the fast default
    "logistic": LogisticModel,  # logistic regression on the predictors
    "mlp": MlpModel,  # one hidden layer on the predictors
    "densenet121": partial(ImageModel, "densenet121"),  # MONAI DenseNet121, 2-D, GroupNorm, 224-256 px
    "resnet18": partial(ImageModel, "resnet18"),  # MONAI ResNet-18, 2-D, GroupNorm, 224-256 px
    "resnet34": partial(ImageModel, "resnet34"),  # MONAI ResNet-34, 2-D, GroupNorm, 224-256 px
    "fusion": FusionModel,  # an image encoder (setting `encoder`) + the predictors
}
DEFAULT_MODEL = "small_cnn"
SMALL_IMAGE_PX, LARGE_IMAGE_PX = 64, 224  # native input sizes: the small CNN, the MONAI networks
# Earlier names still accepted in task files: the shipped tasks call the small CNN "outcome_model".
ALIASES = {"outcome_model": "small_cnn"}


def model_of_task(task: Task) -> tuple[str, dict[str, Any]]:
    """The registry name and settings a task asks for: `task.model` as a name or as an object with
    `.name` and `.settings` (else `task.model_settings`); the default when it names none."""
    spec = getattr(task, "model", None)
    if spec is None:
        return DEFAULT_MODEL, {}
    if isinstance(spec, str):
        name, settings = spec, getattr(task, "model_settings", None)
    else:
        name, settings = getattr(spec, "name", None) or DEFAULT_MODEL, getattr(spec, "settings", None)
    return ALIASES.get(name, name), dict(settings or {})


def _settings_of(builder: Callable[..., nn.Module]) -> list[str]:
    """The keyword settings a builder takes (everything but the task's shape)."""
    params = inspect.signature(builder).parameters
    return [p for p in params if p not in ("n_views", "n_features")]


def build_model_named(name: str, task: Task, seed: int = 0, **settings: Any) -> nn.Module:
    """The registry's model `name` for the task's inputs; the same seed gives every party the same
    initial weights. ValueError for an unknown name or setting, or a model the task cannot feed."""
    name = ALIASES.get(name, name)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; the registry has: {', '.join(MODELS)}")
    builder = MODELS[name]
    unknown = sorted(set(settings) - set(_settings_of(builder)))
    if unknown:
        allowed = ", ".join(_settings_of(builder)) or "none"
        raise ValueError(f"model {name!r} has no setting {', '.join(unknown)}; its settings: {allowed}")
    n_views = len(task.image.views) if task.image else 0
    torch.manual_seed(seed)
    try:
        return builder(n_views, task.n_features, **settings)
    except ValueError as e:
        raise ValueError(f"task {task.name!r}, model {name!r}: {e}") from None


def build_model(task: Task, seed: int = 0) -> nn.Module:
    """The task's model (its `[model]`, else the small CNN); the same seed gives every party the
    same initial weights."""
    name, settings = model_of_task(task)
    return build_model_named(name, task, seed, **settings)


def image_size(name: str, settings: dict[str, Any] | None = None) -> int:
    """The image side (px) a model is made for: 64 for the small CNN (alone or as the fusion
    encoder), 224 for the MONAI networks (they accept any size from 32 px: their pooling is adaptive).
    Table models read no images; the value is unused for them."""
    name = ALIASES.get(name, name)
    encoder = (settings or {}).get("encoder", "resnet18") if name == "fusion" else name
    return SMALL_IMAGE_PX if encoder == "small_cnn" else LARGE_IMAGE_PX


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
