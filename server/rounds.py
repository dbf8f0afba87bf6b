"""The round loop: Flower's DefaultWorkflow steps, with a failed round retried.

A SecAgg+ round tolerates a site that vanishes *after* the key shares were exchanged, and one that
is gone by the setup stage (it is left out: server/secure_aggregation.py), but one that vanishes
while the shares are being exchanged fails the round: Flower cannot reconstruct the masks of a site
whose shares were never handed out. Such a round changes nothing
(the global model stays as it was), so it is retried with the sites that remain, up to
`round_retries` times per run, while at least `min_sites` are left. Rounds are numbered by
attempt, so a retried round gets the next number and the failure stays on record.
"""

from __future__ import annotations

import timeit
from typing import Callable

from flwr.app import ConfigRecord
from flwr.server import LegacyContext
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.default_workflows import (
    default_evaluate_workflow,
    default_fit_workflow,
    default_init_params_workflow,
)
from flwr.serverapp import Grid

from spine_fl.server.strategy import RoundLog

FitWorkflow = Callable[[Grid, LegacyContext], None]


def run_rounds(grid: Grid, legacy: LegacyContext, fit_workflow: FitWorkflow | None, log: RoundLog,
               target: int, offset: int, retries: int,
               after: Callable[[Grid, LegacyContext, int], None] | None = None) -> None:
    """Train until `target` rounds (counted across restarts) have trained, or the run stops; then,
    unless it stopped, `after(grid, legacy, next Flower round)` while the sites are still connected
    (the recalibration round, server/calibration.py)."""
    fit = fit_workflow or default_fit_workflow
    thread, f_stop, c_done = start_update_client_manager_thread(grid, legacy.client_manager)
    c_done.wait()
    try:
        default_init_params_workflow(grid, legacy)
        cfg = ConfigRecord({Key.START_TIME: timeit.default_timer()})
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = cfg
        attempt, failed = 0, 0
        while len(log.trained_rounds) < target and not log.stopped:
            attempt += 1
            cfg[Key.CURRENT_ROUND] = attempt
            fit(grid, legacy)
            if attempt + offset in log.trained_rounds:
                default_evaluate_workflow(grid, legacy)
                continue
            if log.stopped:  # the pre-flight ended the run before anyone trained
                break
            failed += 1
            log.record_failed_round(attempt + offset)
            if not log.stopped and failed > retries:
                log.stop(f"round {attempt + offset} did not complete and the run's {retries} retr"
                         f"{'y' if retries == 1 else 'ies'} are used up; the run ends here")
        if after is not None and not log.stopped and len(log.trained_rounds) >= target:
            after(grid, legacy, attempt + 1)
    finally:
        f_stop.set()
        thread.join()
