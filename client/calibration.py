"""The site's part of federated recalibration: a DP histogram of the final model's logits on its
held-out patients, split by outcome (shared/training/calibration.py), charged before it leaves.

The release is held-out data leaving the site, so it follows the held-out rules first: the split is
large enough (policy min_eval_patients / min_eval_per_class) and the dataset's evaluation budget
(max_evaluations) has a release left, which it uses. With DP on, the Gaussian noise makes it a DP
mechanism: it is charged in the site's privacy ledger as one more spend, SpendRecord(noise_multiplier
= noise std / sensitivity, sample_rate = 1, steps = 1), under the run's key and the recalibration
round (the last training round + 1), after the same budget checks as a training round (per run and
lifetime, the ledger's head, never the same run and round twice). Without DP the histogram is still
noised (the coordinator sees no exact count) but nothing is charged: such a run spends no epsilon.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spine_fl.client.privacy.evaluation_budget import withhold_reason
from spine_fl.client.privacy.plan import plan_round
from spine_fl.client.privacy.privacy_ledger import PrivacyLedger, SpendRecord, as_history, dataset_id
from spine_fl.client.privacy.round_privacy import check_ledger_not_deleted
from spine_fl.client.site_config import Site
from spine_fl.shared import protocol
from spine_fl.shared.config import RunSettings
from spine_fl.shared.contract.data_contract import SiteData
from spine_fl.shared.training import calibration
from spine_fl.shared.training.accounting import epsilon
from spine_fl.shared.training.local import predict_logits


class CalibrationRefused(RuntimeError):
    """The site will not release its histogram (held-out rules or privacy budget); nothing leaves."""


@dataclass(frozen=True)
class Release:
    histogram: np.ndarray  # (2, bins), noised, divided by HISTOGRAM_SCALE
    metrics: dict[str, float | int | str]


def histogram_spend(noise_std: float = calibration.NOISE_STD) -> tuple[float, float, int]:
    """The release as the accountant sees it: (noise multiplier, sample rate, steps)."""
    return (noise_std / calibration.SENSITIVITY, 1.0, 1)


def release(site: Site, run: RunSettings, model: torch.nn.Module, data: SiteData, run_key: str,
            server_round: int, device: torch.device, rng: np.random.Generator | None = None) -> Release:
    held_out = data.subset("test")
    withheld = withhold_reason(site, held_out.y, run_key, server_round)  # checked before computing anything
    if withheld is not None:
        raise CalibrationRefused(f"{site.name}: no recalibration histogram: {withheld}")
    metrics: dict[str, float | int | str] = {protocol.DP: int(run.dp), protocol.CALIBRATION_NOISE: calibration.NOISE_STD}
    if run.dp:
        metrics.update(charge(site, run, run_key, server_round, len(data.subset("train"))))
    counts = calibration.logit_histogram(predict_logits(model, held_out, device), held_out.y)
    noised = calibration.noisy(counts, calibration.NOISE_STD, rng)
    limit = calibration.HISTOGRAM_SCALE * run.secagg_clipping_range  # SecAgg+ clips beyond: clip first
    scaled = np.clip(noised, -limit, limit) / calibration.HISTOGRAM_SCALE
    return Release(scaled.astype(np.float64), metrics)


def charge(site: Site, run: RunSettings, run_key: str, server_round: int, n_train: int) -> dict[str, float | int | str]:
    """Record the release in the privacy ledger after the budget checks; the privacy report after it."""
    plan = plan_round(run, n_train, site.policy.max_delta)
    ledger = PrivacyLedger(site.state_dir, dataset_id(site.data_dir))
    records = ledger.records()
    if not records:
        check_ledger_not_deleted(ledger)
    if not any(r.run_id == run_key for r in records):  # e.g. refused in the pre-flight, or a ledger deleted
        raise CalibrationRefused(f"{site.name}: its privacy ledger holds no training round of run {run_key}; a site "
                                 "that did not train in this run sends no recalibration histogram")
    if any((r.run_id, r.round) == (run_key, server_round) for r in records):
        raise CalibrationRefused(f"{site.name}: round {server_round} of run {run_key} is already charged; "
                                 "a second histogram would spend epsilon twice")
    step = [histogram_spend()]
    this_run = [*as_history(records, run_key), *step]
    lifetime = [*as_history(records), *step]
    eps_run, eps_life = epsilon(this_run, plan.delta, run.accountant), epsilon(lifetime, plan.delta, run.accountant)
    for rule, after, budget in (("epsilon_lifetime", eps_life, site.policy.epsilon_lifetime),
                                ("epsilon_per_run", eps_run, site.policy.epsilon_per_run)):
        if after > budget:
            raise CalibrationRefused(f"{site.name}: the recalibration histogram would raise epsilon to {after:.3f}, "
                                     f"over the {rule.replace('_', ' ')} budget {budget:g}")
    sigma, rate, steps = step[0]
    ledger.append(SpendRecord(run_key, server_round, sigma, rate, steps, calibration.SENSITIVITY, plan.delta,
                              run.accountant))
    lines, head = ledger.log.last()
    return {protocol.EPSILON_RUN: eps_run, protocol.EPSILON_LIFETIME: eps_life, protocol.DELTA: plan.delta,
            protocol.NOISE_MULTIPLIER: sigma, protocol.SAMPLE_RATE: rate,
            protocol.STEPS_RUN: int(sum(n for _, _, n in this_run)),
            protocol.LEDGER_DATASET: ledger.dataset, protocol.LEDGER_LINES: lines, protocol.LEDGER_SHA256: head}
