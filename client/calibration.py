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
from spine_fl.client.privacy.privacy_ledger import PrivacyLedger, SpendRecord
from spine_fl.client.privacy.round_checks import over_budget
from spine_fl.client.privacy.round_privacy import assess_round
from spine_fl.client.site_config import Site
from spine_fl.shared import protocol
from spine_fl.shared.config import RunSettings
from spine_fl.shared.contract.data_contract import SiteData
from spine_fl.shared.training import calibration
from spine_fl.shared.training.local import predict_logits


class CalibrationRefused(RuntimeError):
    """The site will not release its histogram; nothing computed on its patients leaves."""


class CalibrationWithheld(CalibrationRefused):
    """Refused by the site's own rules (held-out rules or privacy budget), not by a malformed instruction:
    the site answers with `withheld_reply` instead (client/app.py), a clean refusal the coordinator counts."""

    def __init__(self, site: str, reason: str):
        super().__init__(f"{site}: no recalibration histogram: {reason}")
        self.site, self.reason = site, reason


def withheld_reply(stage: int) -> np.ndarray:
    """What a withholding site sends in place of its histogram: zeros of the stage's shape, with 0 examples
    (client/app.py). Under SecAgg+ a reply weighted 0 adds nothing to the sum and keeps the round whole (an
    error reply would be a dropout: too many and the round fails); the 0 tells the coordinator not to
    count the site (server/calibration.py)."""
    shape = protocol.CALIBRATION_LOCATE_SHAPE if stage == protocol.CALIBRATION_LOCATE else \
        protocol.CALIBRATION_HISTOGRAM_SHAPE
    return np.zeros(shape, dtype=np.float64)


@dataclass(frozen=True)
class Release:
    histogram: np.ndarray  # (2, bins), noised, divided by HISTOGRAM_SCALE
    metrics: dict[str, float | int | str]


def histogram_spend(noise_std: float = calibration.NOISE_STD) -> tuple[float, float, int]:
    """The release as the accountant sees it: (noise multiplier, sample rate, steps)."""
    return (noise_std / calibration.SENSITIVITY, 1.0, 1)


def calibration_patients(data: SiteData, dp: bool) -> SiteData:
    """Who the histograms count. Held-out patients always; with DP also the training patients: DP-SGD's
    noise keeps the model from fitting them more closely than new ones (measured on the default run:
    mean logit +2.04 / sd 0.34 on training patients, +2.02 / 0.35 held out), and three times the
    patients make the fitted slope far steadier. Without DP a model can fit its training patients
    closely, so only the held-out ones count."""
    return data.subset("train", "test") if dp else data.subset("test")


def release(site: Site, run: RunSettings, model: torch.nn.Module, data: SiteData, run_key: str,
            server_round: int, device: torch.device, stage: int, window: tuple[float, float] | None = None,
            rng: np.random.Generator | None = None) -> Release:
    """One of the two releases (protocol CALIBRATION_LOCATE, then CALIBRATION_FIT over `window`)."""
    if stage not in (protocol.CALIBRATION_LOCATE, protocol.CALIBRATION_FIT):
        raise CalibrationRefused(f"{site.name}: unknown recalibration stage {stage!r}; nothing leaves")
    if stage == protocol.CALIBRATION_FIT and (window is None or not window[0] < window[1]):
        raise CalibrationRefused(f"{site.name}: the recalibration window {window!r} is not an interval; nothing leaves")
    held_out = data.subset("test")
    withheld = withhold_reason(site, held_out.y, run_key, server_round)  # checked before computing anything
    if withheld is not None:
        raise CalibrationWithheld(site.name, withheld)
    std = calibration.LOCATE_NOISE_STD if stage == protocol.CALIBRATION_LOCATE else calibration.NOISE_STD
    metrics: dict[str, float | int | str] = {protocol.DP: int(run.dp), protocol.CALIBRATION_NOISE: std}
    if run.dp:
        metrics.update(charge(site, run, run_key, server_round, len(data.subset("train")), std))
    patients = calibration_patients(data, run.dp)
    logits = predict_logits(model, patients, device)
    counts = (calibration.locate_histogram(logits) if stage == protocol.CALIBRATION_LOCATE
              else calibration.fit_histogram(logits, patients.y, window))  # type: ignore[arg-type]
    noised = calibration.noisy(counts, std, rng)
    limit = calibration.HISTOGRAM_SCALE * run.secagg_clipping_range  # SecAgg+ clips beyond: clip first
    scaled = np.clip(noised, -limit, limit) / calibration.HISTOGRAM_SCALE
    return Release(scaled.astype(np.float64), metrics)


def charge(site: Site, run: RunSettings, run_key: str, server_round: int, n_train: int,
           noise_std: float = calibration.NOISE_STD) -> dict[str, float | int | str]:
    """Record the release (noised with `noise_std`) in the privacy ledger after the budget checks; the
    privacy report after it. Assessed and checked by the very functions a training round uses
    (round_privacy.assess_round, round_checks.over_budget), with the histogram's spend."""
    spend = histogram_spend(noise_std)
    assessed = assess_round(site, run, run_key, server_round, n_train, spend=spend)  # ledger verified, not deleted
    if not assessed.rounds_in_run:  # e.g. refused in the pre-flight, or a ledger deleted
        raise CalibrationWithheld(site.name, f"its privacy ledger holds no training round of run {run_key}; a site "
                                  "that did not train in this run sends no recalibration histogram")
    if assessed.replay:
        raise CalibrationWithheld(site.name, f"round {server_round} of run {run_key} is already charged; "
                                  "a second histogram would spend epsilon twice")
    over = over_budget(site, assessed)
    if over is not None:
        raise CalibrationWithheld(site.name, f"the recalibration histogram would raise epsilon to {over.after:.3f}, "
                                  f"over the {over.rule.replace('_', ' ')} budget {over.budget:g}")
    sigma, rate, steps = spend
    ledger = PrivacyLedger(site.state_dir, assessed.dataset)
    ledger.append(SpendRecord(run_key, server_round, sigma, rate, steps, calibration.SENSITIVITY, assessed.plan.delta,
                              run.accountant))
    lines, head = ledger.log.last()
    return {protocol.EPSILON_RUN: assessed.epsilon_run_after,
            protocol.EPSILON_LIFETIME: assessed.epsilon_lifetime_after,
            protocol.DELTA: assessed.plan.delta, protocol.NOISE_MULTIPLIER: sigma, protocol.SAMPLE_RATE: rate,
            protocol.STEPS_RUN: assessed.steps_run_after,
            protocol.LEDGER_DATASET: ledger.dataset, protocol.LEDGER_LINES: lines, protocol.LEDGER_SHA256: head}
