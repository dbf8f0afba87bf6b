"""The ClientApp: trains the shared model on this site's training split and evaluates it on the
site's held-out split. Only weights, example counts and numeric metrics leave the site."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import Scalar

from spine_fl.shared.config import RunSettings
from spine_fl.shared.metrics import binary_metrics
from spine_fl.shared.models import build_model, pick_device
from spine_fl.shared.tasks import get_task
from spine_fl.shared.training import TrainSettings, get_weights, predict, set_weights, train

from .site_data import Site, resolve_site, site_data


class SiteClient(NumPyClient):
    def __init__(self, site: Site):
        self.site = site
        self.device = pick_device()

    def _prepare(self, parameters: list[np.ndarray], config: dict[str, Scalar]):
        settings = RunSettings.from_run_config(config)
        task = get_task(settings.task)
        model = build_model(task, settings.seed)
        set_weights(model, parameters)
        return settings, model, site_data(self.site, settings.task, settings.image_size)

    def _site_index(self, config: dict[str, Scalar]) -> int:
        sites = str(config.get("sites", "")).split(",")
        return sites.index(self.site.name) if self.site.name in sites else -1

    def fit(self, parameters, config):
        settings, model, data = self._prepare(parameters, config)
        train_split = data.subset("train")
        local = TrainSettings(
            epochs=settings.local_epochs,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            proximal_mu=float(config.get("proximal_mu", settings.proximal_mu)),
            seed=settings.seed * 100_003 + int(config.get("round", 0)),
        )
        loss = train(model, train_split, local, self.device)
        return get_weights(model), len(train_split), {"train_loss": loss, "site_index": self._site_index(config)}

    def evaluate(self, parameters, config):
        _, model, data = self._prepare(parameters, config)
        held_out = data.subset("test")
        metrics = binary_metrics(held_out.y, predict(model, held_out, self.device))
        metrics.pop("n")
        return metrics["log_loss"], len(held_out), {**metrics, "site_index": self._site_index(config)}


def build_client_app(site_dirs: Sequence[Path] | None = None) -> ClientApp:
    """In simulation, site_dirs maps partition ids to site folders; in deployment it is None."""

    def client_fn(context: Context):
        return SiteClient(resolve_site(context, site_dirs)).to_client()

    return ClientApp(client_fn=client_fn)


app = build_client_app()
