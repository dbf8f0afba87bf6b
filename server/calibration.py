"""Federated recalibration, the coordinator's part: two more fit-like rounds after the last training
round, through the run's fit workflow (Flower's SecAgg+ unless the run sets secagg = false).

Each round's "parameters" out are the final model; what comes back is each site's DP histogram of
that model's logits (client/calibration.py): first unlabelled on a coarse grid, from whose sum the
coordinator chooses the window of logits to look at (shared/training/calibration.py `locate`), then
over that window split by outcome. Every site replies with 1 example, so SecAgg+'s weighted mean is
the plain mean and, summed over the replies (each holds the same mean under SecAgg+; its own histogram
without), the sum of the sites' histograms: the coordinator never sees one site's. It then fits Platt
scaling and the recommended threshold on the sum.

A site whose own rules forbid the release (too few held-out patients for its min_eval_patients /
min_eval_per_class, its evaluation or privacy budget) withholds cleanly: it replies with zeros and 0
examples (client/calibration.py withheld_reply), which add nothing to the sum and keep a SecAgg+ round
whole. Such sites are counted as withheld, not as contributors; with fewer than min_sites contributors
the recalibration is skipped and the model is published uncalibrated, the summary saying why.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext
from flwr.server.client_manager import ClientManager
from flwr.server.strategy import Strategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid

from spine_fl.server.rounds import FitWorkflow
from spine_fl.server.strategy import _numeric, _site_name
from spine_fl.shared import protocol
from spine_fl.shared.config import RunSettings
from spine_fl.shared.training import calibration

logger = logging.getLogger("spine_fl.server")


class CalibrationStrategy(Strategy):
    """Sends the final model with CALIBRATION = stage to every connected site; sums what comes back."""

    def __init__(self, settings: RunSettings, sites: list[str], run_key: str, absolute_round: int,
                 final: list[np.ndarray], stage: int, window: tuple[float, float] | None = None):
        super().__init__()
        self.settings, self.sites, self.run_key = settings, sites, run_key
        self.absolute_round, self.stage, self.window = absolute_round, stage, window
        self.shape = protocol.CALIBRATION_LOCATE_SHAPE if stage == protocol.CALIBRATION_LOCATE else \
            protocol.CALIBRATION_HISTOGRAM_SHAPE
        self.final = ndarrays_to_parameters(final)
        self.histogram: np.ndarray | None = None
        self.contributors: list[str] = []
        self.privacy: dict[str, dict[str, float]] = {}
        self.withheld: list[str] = []  # sites whose rules forbade the release (0 examples, zeros)
        self.failures = 0
        self.aggregated = False  # the round reached aggregate_fit (a SecAgg+ round can halt before)

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[override]
        clients = client_manager.sample(num_clients=max(client_manager.num_available(), 1),
                                        min_num_clients=self.settings.min_sites)
        config = {**self.settings.to_run_config(), protocol.ROUND: self.absolute_round,
                  protocol.SITES: ",".join(self.sites), protocol.RUN_KEY: self.run_key, protocol.CALIBRATION: self.stage}
        if self.window is not None:
            config |= {protocol.CALIBRATION_WINDOW_LO: self.window[0], protocol.CALIBRATION_WINDOW_HI: self.window[1]}
        return [(client, FitIns(self.final, dict(config))) for client in clients]

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[override]
        self.aggregated, self.failures = True, len(failures)
        sent = []
        for _, res in results:
            site = _site_name(self.sites, res.metrics)
            if res.num_examples == 0:  # withheld: zeros weighted 0, in the sum as nothing
                self.withheld.append(site)
                continue
            sent.append((site, res))
        if not sent:
            return None, {}
        total = None
        for site, res in sent:
            array = parameters_to_ndarrays(res.parameters)
            if len(array) != 1 or tuple(array[0].shape) != self.shape:
                logger.warning("spine-fl: a recalibration reply of the wrong shape; the round is discarded")
                self.contributors, self.privacy = [], {}
                return None, {}
            # under SecAgg+ every reply holds the mean over the contributors (weight 1 each, withheld 0):
            # summed over the contributors it is their sum; without SecAgg+ each holds its own histogram
            total = array[0] if total is None else total + array[0]
            self.contributors.append(site)
            self.privacy[site] = {k: float(v) for k, v in res.metrics.items() if _numeric(v)}
        self.histogram = np.asarray(total, dtype=float) * calibration.HISTOGRAM_SCALE
        return None, {}  # the global model stays as it was

    def shortfall(self, what: str) -> str | None:
        """Why this round's sum cannot be used (too few contributors, with who withheld and who failed), or None."""
        if self.histogram is not None and len(self.contributors) >= self.settings.min_sites:
            return None
        if not self.aggregated:
            return (f"the round of {what}s did not complete (the secure aggregation halted: too few sites stayed "
                    "to the end; the coordinator's log says why)")
        said = f"{_sites(self.contributors)} sent {what}"
        if self.withheld:
            said += (f", {_sites(self.withheld)} withheld it by the site's own rules (too few held-out patients for "
                     "its min_eval_patients / min_eval_per_class, or its evaluation or privacy budget spent; each "
                     "site's log names its reason)")
        if self.failures:
            said += f", {self.failures} failed"
        return f"{said}; fewer than min_sites = {self.settings.min_sites}"

    def configure_evaluate(self, server_round, parameters, client_manager):  # type: ignore[override]
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # type: ignore[override]
        return None, {}

    def evaluate(self, server_round, parameters):  # type: ignore[override]
        return None


def _round(grid: Grid, legacy: LegacyContext, fit_workflow: FitWorkflow | None, strategy: CalibrationStrategy,
           flower_round: int) -> None:
    inner, legacy.strategy = legacy.strategy, strategy
    try:
        legacy.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND] = flower_round
        # every site withholding (weight 0 each) makes SecAgg+'s total weight 0: Flower divides by it and
        # warns; the result is unused then (no contributor), so the warning is noise in the coordinator's log
        with np.errstate(divide="ignore", invalid="ignore"):
            (fit_workflow or default_fit_workflow)(grid, legacy)
    finally:
        legacy.strategy = inner


def recalibrate(grid: Grid, legacy: LegacyContext, fit_workflow: FitWorkflow | None, settings: RunSettings,
                sites: list[str], run_key: str, absolute_round: int, final: list[np.ndarray],
                flower_round: int) -> dict[str, Any]:
    """Run the two recalibration rounds (absolute_round and the next); the calibration section for
    model.pt and federation.json: "fitted"; "skipped" (with the reason) when fewer than min_sites sites
    sent their histogram because the others withheld it; "failed" when a site failed, the round halted
    or the fit failed. "withheld" lists the sites that withheld."""
    base: dict[str, Any] = {"rounds": [absolute_round, absolute_round + 1], "round": absolute_round + 1,
                            "secure_aggregation": fit_workflow is not None,
                            "patients": "training and held-out (test)" if settings.dp else "held-out (test)"}
    locating = CalibrationStrategy(settings, sites, run_key, absolute_round, final, protocol.CALIBRATION_LOCATE)
    _round(grid, legacy, fit_workflow, locating, flower_round)
    short = locating.shortfall("a locating histogram")
    if short is not None:
        return {**base, "sites": sorted(locating.contributors), "withheld": sorted(locating.withheld),
                "privacy": locating.privacy, **_skipped(locating, short)}
    window = calibration.locate(locating.histogram, len(locating.contributors))
    fitting = CalibrationStrategy(settings, sites, run_key, absolute_round + 1, final, protocol.CALIBRATION_FIT, window)
    _round(grid, legacy, fit_workflow, fitting, flower_round + 1)
    base |= {"sites": sorted(fitting.contributors), "withheld": sorted(fitting.withheld), "privacy": fitting.privacy,
             "window": list(window)}
    short = fitting.shortfall("a histogram")
    if short is not None:
        return {**base, **_skipped(fitting, short)}
    try:
        fitted = calibration.summarise(fitting.histogram, len(fitting.contributors), window)
    except (ValueError, np.linalg.LinAlgError) as exc:
        return {**base, "status": "failed", "reason": f"the calibration map could not be fitted: {exc}"}
    if fitted["a"] <= 0:
        return {**base, "status": "failed", "reason": f"the fitted slope {fitted['a']:.3f} is not positive: the "
                "model ranks the calibration patients no better than chance; left uncalibrated"}
    return {**base, "status": "fitted", **fitted}


def _sites(names: list[str]) -> str:
    return f"{len(names)} site{'' if len(names) == 1 else 's'}" + (f" ({', '.join(sorted(names))})" if names else "")


def _skipped(strategy: CalibrationStrategy, short: str) -> dict[str, Any]:
    """Too few contributors: "skipped" when the sites withheld by their own rules, "failed" when a site
    failed or the round halted; either way the model is published as trained."""
    status = "skipped" if strategy.aggregated and not strategy.failures else "failed"
    logger.warning("spine-fl: recalibration %s, the model is published uncalibrated: %s", status, short)
    return {"status": status, "reason": f"{short}: recalibration {status}"}
