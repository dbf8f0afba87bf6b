"""The wire contract and the run result: one name per key, one shape of metrics.json for both engines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from spine_fl.server.deployment.run_result import final_round_summary
from spine_fl.server.reporting.run_result import (
    METRICS_FILE,
    SCHEMA_VERSION,
    RunResult,
    RunResultError,
    read_run_result,
    write_run_result,
)
from spine_fl.shared import protocol
from spine_fl.shared.config import RunSettings
from spine_fl.shared.metrics import binary_metrics


def test_evaluation_metrics_are_what_a_site_computes() -> None:
    computed = binary_metrics(np.array([0, 1, 1, 0]), np.array([0.2, 0.8, 0.4, 0.6]))
    assert tuple(k for k in computed if k != "n") == protocol.EVALUATION_METRICS
    assert set(protocol.ROUND_METRICS) <= set(protocol.EVALUATION_METRICS)


def test_instruction_keys_do_not_collide_with_run_settings() -> None:
    settings = RunSettings().to_run_config()
    for key in (protocol.ROUND, protocol.SITES, protocol.RUN_KEY, protocol.PROXIMAL_MU):
        assert key not in settings


def test_deployment_summary_weights_sites_by_their_patients() -> None:
    rounds = [{"round": 3, "auroc": 0.7, "per_site": {"a": {"n": 10, "prevalence": 0.5, "auroc": 0.6},
                                                      "b": {"n": 30, "prevalence": 0.1, "auroc": 0.8}}}]
    summary = final_round_summary(rounds)
    assert summary["n"] == 40 and summary["prevalence"] == pytest.approx((5 + 3) / 40)
    assert summary["round"] == 3 and summary["auroc"] == 0.7


def _result(**changes) -> RunResult:
    base = dict(engine="deployment", task="vertebral_column", sites=["a"], patients={"a": {"train": 5}},
                federated={"auroc": 0.5, "per_site": {}}, status="completed", stop_reason=None, rounds=[],
                privacy={}, config={}, timing={})
    return RunResult(**{**base, **changes})


def test_run_result_round_trips_and_refuses_other_schemas(tmp_path: Path) -> None:
    write_run_result(tmp_path, _result())
    assert read_run_result(tmp_path) == _result()
    raw = json.loads((tmp_path / METRICS_FILE).read_text())
    assert raw["schema_version"] == SCHEMA_VERSION and raw["pooled"] is None
    for broken, says in (({**raw, "schema_version": 0}, "schema_version 0"),
                         ({**raw, "surprise": 1}, "unknown field(s) surprise"),
                         ({k: v for k, v in raw.items() if k != "task"}, "task"),
                         ([1, 2], "JSON object")):
        (tmp_path / METRICS_FILE).write_text(json.dumps(broken))
        with pytest.raises(RunResultError, match=re.escape(says)):
            read_run_result(tmp_path)
