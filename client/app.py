"""The ClientApp: trains the shared model with DP-SGD on this site's training split and evaluates
it on the site's held-out split. Only weights, example counts and numeric metrics leave the site,
each reply recorded in the site's egress ledger first (see mods.py for the order of concerns)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from flwr.app import Context
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.common import Scalar

from spine_fl.shared.config import RunSettings, run_key_of
from spine_fl.shared.metrics import binary_metrics
from spine_fl.shared.models import build_model, pick_device
from spine_fl.shared.privacy_accounting import epsilon
from spine_fl.shared.tasks import get_task
from spine_fl.shared.training import DpSettings, TrainSettings, get_weights, predict, set_weights, train

from .mods import site_mods
from .privacy_ledger import PrivacyLedger, SpendRecord, dataset_id
from .privacy_plan import plan_round
from .received_models import save_received
from .site_config import Site
from .site_data import resolve_site, site_data


class SiteClient(NumPyClient):
    def __init__(self, site: Site, run_id: str):
        self.site = site
        self.run_id = run_id
        self.device = pick_device()

    def _prepare(self, parameters: list[np.ndarray], config: dict[str, Scalar]):
        settings = RunSettings.from_run_config(config)
        model = build_model(get_task(settings.task), settings.seed)
        set_weights(model, parameters)
        return settings, model, site_data(self.site, settings.task, settings.image_size)

    def _site_index(self, config: dict[str, Scalar]) -> int:
        sites = str(config.get("sites", "")).split(",")
        return sites.index(self.site.name) if self.site.name in sites else -1

    def fit(self, parameters, config):
        settings, model, data = self._prepare(parameters, config)
        train_split = data.subset("train")
        server_round = int(config.get("round", 0))
        local = TrainSettings(
            epochs=settings.local_epochs,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            optimizer=settings.optimizer,
            proximal_mu=float(config.get("proximal_mu", settings.proximal_mu)),
            seed=settings.seed * 100_003 + server_round,
        )
        metrics: dict[str, Scalar] = {"site_index": self._site_index(config), "dp": int(settings.dp)}
        if settings.dp:
            run_key = run_key_of(config, self.run_id)  # the same run across coordinator restarts
            plan = plan_round(settings, len(train_split))
            loss, spend = train(model, train_split, local, self.device,
                                DpSettings(plan.noise_multiplier, plan.max_grad_norm))
            assert spend is not None
            ledger = PrivacyLedger(self.site.state_dir, dataset_id(self.site.data_dir))
            ledger.append(SpendRecord(run_key, server_round, spend.noise_multiplier, spend.sample_rate,
                                      spend.steps, plan.max_grad_norm, plan.delta, settings.accountant))
            run_history, lifetime = ledger.history(run_key), ledger.history()
            metrics.update(
                epsilon_run=epsilon(run_history, plan.delta, settings.accountant),
                epsilon_lifetime=epsilon(lifetime, plan.delta, settings.accountant),
                delta=plan.delta, noise_multiplier=spend.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                sample_rate=spend.sample_rate, steps_run=sum(n for _, _, n in run_history),
            )
        else:
            loss, _ = train(model, train_split, local, self.device)
        weights = get_weights(model)
        _check_secagg_range(weights, settings)
        return weights, len(train_split), {**metrics, "train_loss": loss}

    def evaluate(self, parameters, config):
        _, model, data = self._prepare(parameters, config)
        save_received(self.site.state_dir, self.run_id, parameters, config)  # for the site's privacy audit
        held_out = data.subset("test")
        metrics = binary_metrics(held_out.y, predict(model, held_out, self.device))
        metrics.pop("n")
        return metrics["log_loss"], len(held_out), {**metrics, "site_index": self._site_index(config)}


def _check_secagg_range(weights: list[np.ndarray], settings: RunSettings) -> None:
    """SecAgg+ clips every weight to +-clipping_range: refuse to send what it would distort."""
    if not settings.secagg:
        return
    largest = max(float(np.abs(w).max()) for w in weights if w.size)
    if largest > settings.secagg_clipping_range:
        raise ValueError(f"a model weight of magnitude {largest:.2f} exceeds secagg_clipping_range "
                         f"{settings.secagg_clipping_range:g}; raise the range in the run config")


def build_client_app(sites: Sequence[Site] | None = None, outer_mods: Sequence[Mod] = ()) -> ClientApp:
    """In simulation, `sites` maps partition ids to sites; in deployment the node config names the site.
    `outer_mods` wrap everything (e.g. a test's recorder of what leaves the site)."""

    def client_fn(context: Context):
        return SiteClient(resolve_site(context, sites), str(context.run_id)).to_client()

    return ClientApp(client_fn=client_fn, mods=[*outer_mods, *site_mods(sites)])


app = build_client_app()
