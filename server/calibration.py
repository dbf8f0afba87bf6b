"""Federated recalibration, the coordinator's part: two more fit-like rounds after the last training
round, through the run's fit workflow (Flower's SecAgg+ unless the run sets secagg = false).

Each round's "parameters" out are the final model; what comes back is each site's DP histogram of
that model's logits (client/calibration.py): first unlabelled on a coarse grid, from whose sum the
coordinator chooses the window of logits to look at (shared/training/calibration.py `locate`), then
over that window split by outcome. Every site replies with 1 example, so SecAgg+'s weighted mean is
the plain mean and, summed over the replies (each holds the same mean under SecAgg+; its own histogram
without), the sum of the sites' histograms: the coordinator never sees one site's. It then fits Platt
scaling and the recommended threshold on the sum.
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
        self.failures = 0

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
        self.failures = len(failures)
        if not results:
            return None, {}
        total = None
        for _, res in results:
            array = parameters_to_ndarrays(res.parameters)
            if len(array) != 1 or tuple(array[0].shape) != self.shape:
                logger.warning("spine-fl: a recalibration reply of the wrong shape; the round is discarded")
                return None, {}
            total = array[0] if total is None else total + array[0]
            site = _site_name(self.sites, res.metrics)
            self.contributors.append(site)
            self.privacy[site] = {k: float(v) for k, v in res.metrics.items() if _numeric(v)}
        self.histogram = np.asarray(total, dtype=float) * calibration.HISTOGRAM_SCALE
        return None, {}  # the global model stays as it was

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
        (fit_workflow or default_fit_workflow)(grid, legacy)
    finally:
        legacy.strategy = inner


def recalibrate(grid: Grid, legacy: LegacyContext, fit_workflow: FitWorkflow | None, settings: RunSettings,
                sites: list[str], run_key: str, absolute_round: int, final: list[np.ndarray],
                flower_round: int) -> dict[str, Any]:
    """Run the two recalibration rounds (absolute_round and the next); the calibration section for
    model.pt and federation.json ({"status": "failed", "reason": ...} when too few sites answered or
    the fit failed)."""
    base: dict[str, Any] = {"rounds": [absolute_round, absolute_round + 1], "round": absolute_round + 1,
                            "secure_aggregation": fit_workflow is not None,
                            "patients": "training and held-out (test)" if settings.dp else "held-out (test)"}
    locating = CalibrationStrategy(settings, sites, run_key, absolute_round, final, protocol.CALIBRATION_LOCATE)
    _round(grid, legacy, fit_workflow, locating, flower_round)
    if locating.histogram is None or len(locating.contributors) < settings.min_sites:
        return {**base, "sites": sorted(locating.contributors), "privacy": locating.privacy, "status": "failed",
                "reason": f"{len(locating.contributors)} site(s) sent a locating histogram, fewer than min_sites = "
                          f"{settings.min_sites} ({locating.failures} failure(s)); the model is uncalibrated"}
    window = calibration.locate(locating.histogram, len(locating.contributors))
    fitting = CalibrationStrategy(settings, sites, run_key, absolute_round + 1, final, protocol.CALIBRATION_FIT, window)
    _round(grid, legacy, fit_workflow, fitting, flower_round + 1)
    base |= {"sites": sorted(fitting.contributors), "privacy": fitting.privacy, "window": list(window)}
    if fitting.histogram is None or len(fitting.contributors) < settings.min_sites:
        return {**base, "status": "failed",
                "reason": f"{len(fitting.contributors)} site(s) sent a histogram, fewer than min_sites = "
                          f"{settings.min_sites} ({fitting.failures} failure(s)); the model is uncalibrated"}
    try:
        fitted = calibration.summarise(fitting.histogram, len(fitting.contributors), window)
    except (ValueError, np.linalg.LinAlgError) as exc:
        return {**base, "status": "failed", "reason": f"the calibration map could not be fitted: {exc}"}
    if fitted["a"] <= 0:
        return {**base, "status": "failed", "reason": f"the fitted slope {fitted['a']:.3f} is not positive: the "
                "model ranks the calibration patients no better than chance; left uncalibrated"}
    return {**base, "status": "fitted", **fitted}
