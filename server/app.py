"""The ServerApp: one training path (Flower's DefaultWorkflow over a legacy strategy).

Flower's SecAgg+ only runs through `DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`, so
the coordinator always runs DefaultWorkflow; secure aggregation is its fit workflow unless a run
explicitly sets secagg = false.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from flwr.app import Context
from flwr.common import parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid, ServerApp

from spine_fl.shared.config import RunSettings
from spine_fl.shared.models import build_model
from spine_fl.shared.tasks import get_task
from spine_fl.shared.training import get_weights

from .results import write_federation_results
from .refusal_watch import RefusalWatchingGrid
from .secure_aggregation import secagg_fit_workflow
from .strategy import RecordingStrategy, RoundLog, build_strategy


def build_server_app(
    settings: RunSettings | None = None,
    sites: list[str] | None = None,
    out_dir: Path | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> ServerApp:
    """Settings given here win; otherwise they come from Flower's run config (`flwr run`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run = settings or RunSettings.from_run_config(dict(context.run_config))
        site_names = sites or str(context.run_config.get("sites", "")).split(",")
        results_dir = out_dir or Path(str(context.run_config.get("out-dir", "spine-fl-results")))
        initial = get_weights(build_model(get_task(run.task), run.seed))
        log = RoundLog(site_names, run.min_sites, on_round=on_round)
        strategy = RecordingStrategy(build_strategy(run, initial, site_names), log)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=run.rounds), strategy=strategy)
        watched = RefusalWatchingGrid(grid, log.record_refusal)
        DefaultWorkflow(fit_workflow=secagg_fit_workflow(run))(watched, legacy)  # type: ignore[arg-type]
        if run.rounds not in log.trained_rounds:
            log.stop(f"round {run.rounds} did not complete")
        final = parameters_to_ndarrays(
            compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
        )
        write_federation_results(results_dir, run, site_names, final, log)

    return app


app = build_server_app()
