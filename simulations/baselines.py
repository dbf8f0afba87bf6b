"""The two references every federated result is read against, on the same splits:
pooled (all sites' training data in one place: the upper reference) and local-only (each site
alone: what a hospital gets without the consortium). Both train for as many epochs as a site
trains in the whole federated run (rounds x local epochs), with the run's optimizer and, when the
run uses DP, DP-SGD with its noise multiplier and clipping norm: the comparison isolates what
federation costs, not what privacy costs (compare a dp = false run for that).

Under DP, "the same settings" means the same epsilon only when the run sets `target_epsilon`: the
pooled baseline then derives its own noise for that epsilon over its own (larger) training set, as
each site does over its own. With a fixed noise multiplier instead, the pooled baseline samples at a
lower rate (one batch out of all sites' patients) and so spends a smaller epsilon than any site
(on the 5-site kyphoplasty table: 4.8 against 8.5-10.4); `pooled_privacy` says what it spent.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from spine_fl.client.privacy.plan import plan_round
from spine_fl.shared.config import RunSettings
from spine_fl.shared.contract.data_contract import SiteData
from spine_fl.shared.contract.tasks import get_task
from spine_fl.shared.models.registry import build_model
from spine_fl.shared.training.accounting import epsilon
from spine_fl.shared.training.evaluation import Scores, score_sites
from spine_fl.shared.training.local import DpSettings, TrainSettings, train


def concatenate(parts: list[SiteData]) -> SiteData:
    return SiteData(
        np.concatenate([d.patient_ids for d in parts]),
        np.concatenate([d.split for d in parts]),
        np.concatenate([d.y for d in parts]),
        np.concatenate([d.features for d in parts]),
        None if parts[0].images is None else np.concatenate([d.images for d in parts]),
        pd.concat([d.subgroups for d in parts], ignore_index=True),
    )


def _train_settings(run: RunSettings) -> TrainSettings:
    return TrainSettings(epochs=run.rounds * run.local_epochs, batch_size=run.batch_size,
                         learning_rate=run.learning_rate, seed=run.seed, optimizer=run.optimizer)


def _dp(run: RunSettings, n_train: int) -> DpSettings | None:
    return DpSettings(plan_round(run, n_train).noise_multiplier, run.max_grad_norm) if run.dp else None


def pooled_privacy(run: RunSettings, sites: dict[str, SiteData]) -> dict[str, float | int] | None:
    """What the pooled baseline's DP-SGD spends (None without DP): epsilon at its delta (1 / (10 n) for its
    n pooled training patients), its noise multiplier, sampling rate and steps, from the same plan as
    `pooled` trains with and the run's accountant."""
    if not run.dp:
        return None
    n_train = sum(int((d.split == "train").sum()) for d in sites.values())
    plan = plan_round(run, n_train)
    steps = plan.round_spend.steps * run.rounds  # pooled trains rounds x local_epochs epochs in one go
    spent = epsilon([(plan.noise_multiplier, plan.round_spend.sample_rate, steps)], plan.delta, run.accountant)
    return {"epsilon": spent, "delta": plan.delta, "noise_multiplier": plan.noise_multiplier,
            "sample_rate": plan.round_spend.sample_rate, "steps": steps, "patients": n_train}


def pooled(run: RunSettings, sites: dict[str, SiteData], device: torch.device) -> tuple[Scores, Scores]:
    """Held-out and external scores of one model trained on all sites' training data."""
    model = build_model(get_task(run.task), run.seed)
    pooled_train = concatenate([d.subset("train") for d in sites.values()])
    train(model, pooled_train, _train_settings(run), device, _dp(run, len(pooled_train)))
    return score_sites(model, sites, "test", device), score_sites(model, sites, "external", device)


def local_only(run: RunSettings, sites: dict[str, SiteData], device: torch.device) -> Scores:
    """Each site's own model scored on that site's held-out split."""
    per_site = {}
    for name, data in sites.items():
        model = build_model(get_task(run.task), run.seed)
        own = data.subset("train")
        train(model, own, _train_settings(run), device, _dp(run, len(own)))
        per_site.update(score_sites(model, {name: data}, "test", device).per_site)
    return Scores(per_site)
