"""The ServerApp: one training path (Flower's DefaultWorkflow over a legacy strategy).

Flower's SecAgg+ runs as the fit workflow of the legacy round loop (server/rounds.py, Flower's
DefaultWorkflow steps plus retries of failed rounds); it is the fit workflow unless a run
explicitly sets secagg = false.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

from flwr.app import Context
from flwr.common import parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid, ServerApp

from spine_fl.server.calibration import recalibrate
from spine_fl.server.checkpoint import Checkpoint, load_checkpoint, retire_checkpoint, save_checkpoint
from spine_fl.server.coordinator_record import RECORD_FILE, CoordinatorRecord
from spine_fl.server.grid_watch import WatchingGrid
from spine_fl.server.reporting.federation_record import write_federation_results
from spine_fl.server.rounds import run_rounds
from spine_fl.server.secure_aggregation import secagg_fit_workflow
from spine_fl.server.strategy import RecordingStrategy, RoundLog, build_strategy
from spine_fl.shared import protocol
from spine_fl.shared.config import RunSettings
from spine_fl.shared.contract.tasks import get_task
from spine_fl.shared.models.registry import build_model
from spine_fl.shared.training.local import get_weights

logger = logging.getLogger("spine_fl.server")


class RunStopped(RuntimeError):
    """The run ended before its rounds were trained (too few sites, refusals, failed rounds): raised
    after the results are written, so whoever runs the ServerApp — Flower's `flwr run`, or spine-fl's
    own coordinator — marks the run failed instead of reporting success."""

def build_server_app(
    settings: RunSettings | None = None,
    sites: list[str] | None = None,
    out_dir: Path | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    node_sites: dict[int, str] | None = None,
    checkpoint_dir: Path | None = None,
    record_path: Path | None = None,
    enrolled_keys: Mapping[str, str] | None = None,
    fail_when_stopped: bool = False,
) -> ServerApp:
    """Settings given here win; otherwise they come from Flower's run config (`flwr run`).

    `record_path`: the coordinator's record of the sites' pinned keys and ledger heads, kept across
    runs (default: in the results folder). Deployment (`spine-fl server`) also gives `node_sites`
    (enrolled SuperNode id -> site; no other node is sent anything), `checkpoint_dir` (resume after
    the last completed round) and `enrolled_keys` (site -> ledger-key fingerprint pinned at enrolment).
    `fail_when_stopped`: raise RunStopped at the end of a stopped run (the Flower run then ends as
    failed); the simulation runner reads the status from the results instead."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run = settings or RunSettings.from_run_config(dict(context.run_config))
        site_names = sites or str(context.run_config.get(protocol.RUN_CONFIG_SITES, "")).split(",")
        results_dir = out_dir or Path(str(context.run_config.get(protocol.RUN_CONFIG_OUT_DIR, "spine-fl-results")))
        log = RoundLog(site_names, run.min_sites, on_round=on_round)
        record = CoordinatorRecord.load(record_path or results_dir / RECORD_FILE, enrolled_keys)
        resumed = load_checkpoint(checkpoint_dir, run) if checkpoint_dir else None
        done, run_key = (resumed.round, resumed.run_key) if resumed else (0, uuid.uuid4().hex)
        if resumed:
            log.restore(resumed.log)
            logger.info("spine-fl: resuming after round %d from checkpoint sha256 %s", done, resumed.sha256)
        final = resumed.weights if resumed else get_weights(build_model(get_task(run.task), run.seed))
        calibration_section: dict[str, Any] | None = None

        def on_round_done(server_round: int, parameters: Any) -> None:
            if checkpoint_dir:
                save_checkpoint(checkpoint_dir, run, Checkpoint(server_round, parameters_to_ndarrays(parameters),
                                                                log.state(), run_key))

        if len(log.trained_rounds) < run.rounds and not log.stopped:
            strategy = RecordingStrategy(build_strategy(run, final, site_names, done, run_key), log, record, done,
                                         on_round_done, run.site_wait_seconds)
            legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=run.rounds), strategy=strategy)
            watched = WatchingGrid(grid, log, node_sites, done, run.reply_wait_seconds)
            fit_workflow = secagg_fit_workflow(run)
            recalibrated: dict[str, Any] = {}

            def calibrate(grid: Grid, legacy: LegacyContext, flower_round: int) -> None:
                trained = parameters_to_ndarrays(
                    compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))
                recalibrated["weights"] = trained
                try:
                    recalibrated["section"] = recalibrate(grid, legacy, fit_workflow, run, site_names, run_key,
                                                          max(log.trained_rounds) + 1, trained, flower_round)
                except Exception as exc:  # noqa: BLE001 - the trained model stands, recorded as uncalibrated
                    logger.exception("spine-fl: the recalibration round failed")
                    recalibrated["section"] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}

            run_rounds(watched, legacy, fit_workflow, log, run.rounds, done, run.round_retries,  # type: ignore[arg-type]
                       after=calibrate)
            final = recalibrated.get("weights") or parameters_to_ndarrays(
                compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))
            calibration_section = recalibrated.get("section")
        if len(log.trained_rounds) < run.rounds:
            log.stop(f"only {len(log.trained_rounds)} of {run.rounds} rounds trained")
        write_federation_results(results_dir, run, site_names, final, log, record.summary(site_names),
                                 resumed_after=done, calibration=calibration_section)
        if checkpoint_dir and not log.stopped:
            retire_checkpoint(checkpoint_dir, run_key)
        if log.stopped and fail_when_stopped:
            raise RunStopped(f"the run stopped: {log.stopped} (results in {results_dir})")

    return app


app = build_server_app(fail_when_stopped=True)  # `flwr run`: a stopped run is a failed Flower run
