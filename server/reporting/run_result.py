"""The run result: one typed record of a finished (or stopped) federated run, and its one writer.

Both engines produce it — the simulation runner with pooled and local-only baselines beside the
federated model, the deployment coordinator from the sites' own reports (patient-level
predictions never reach a coordinator, so `pooled` and `local_only` stay empty there) — and
`metrics.json` is always this record, so the model card and every other reader take one shape.
A reader refuses a file of another schema version instead of guessing at it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from spine_fl.shared.files import atomic_write_json

METRICS_FILE = "metrics.json"
# "running" while a run writes its folder, then "completed", "stopped" or "failed" (with the reason):
# a folder left by a crash says so, and is never read as a result
RUN_STATUS_FILE = "run_status.json"
SCHEMA_VERSION = 3  # 2: `ledgers` (pinned ledger keys and the last privacy-ledger heads); 3: `calibration`
Engine = Literal["simulation", "deployment"]


class RunResultError(ValueError):
    """A metrics.json that is not a spine-fl run result of this schema; the message names the file."""


@dataclass
class RunResult:
    """What a run produced. Metric summaries hold scikit-learn's metrics (shared/metrics.py) over the
    held-out split, `n`, `prevalence` and `per_site`; `external` where sites have an external split."""

    engine: Engine
    task: str
    sites: list[str]
    # per site: patients in each split (train / test / external); a deployment knows what the
    # sites reported (train from their updates' example counts, test from their evaluations)
    patients: dict[str, dict[str, int | None]]
    federated: dict[str, Any]
    status: str  # "completed" or "stopped"
    stop_reason: str | None
    rounds: list[dict[str, Any]]
    privacy: dict[str, Any]
    config: dict[str, Any]
    timing: dict[str, Any]
    # per site: the fingerprint of the key that signs its ledgers, as the coordinator pinned it
    # ("ledger_key", "key_pinned_by": enrolment or first reply), and the last privacy-ledger head its
    # replies carried (ledger_dataset, ledger_lines, ledger_sha256, epsilon_lifetime at delta)
    ledgers: dict[str, dict[str, Any]] = field(default_factory=dict)
    dropouts: list[dict[str, Any]] = field(default_factory=list)
    failed_rounds: list[int] = field(default_factory=list)
    resumed_after_round: int | None = None
    scenario: str | None = None  # simulation: the scenario's name
    pooled: dict[str, Any] | None = None  # simulation only: all training data in one place
    local_only: dict[str, Any] | None = None  # simulation only: each site alone
    bundle_sha256: str | None = None  # deployment: the app bundle the sites allowed
    data_attribution: str | None = None  # real data that require attribution wherever results are shown
    # federated recalibration (server/calibration.py): the map, threshold, decision-curve range, and in
    # simulation the held-out figures before/after; None when the run stopped before it
    calibration: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Any, where: str) -> "RunResult":
        if not isinstance(raw, dict):
            raise RunResultError(f"{where}: not a spine-fl run result (a JSON object is expected)")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise RunResultError(f"{where}: schema_version {version!r}, this spine-fl reads {SCHEMA_VERSION}; "
                                 "re-run the scenario (or the federation) with this version")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise RunResultError(f"{where}: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise RunResultError(f"{where}: {exc}") from None


def write_run_result(out_dir: Path, result: RunResult) -> Path:
    """metrics.json, written atomically: a reader sees the old file or the whole new one."""
    path = Path(out_dir) / METRICS_FILE
    atomic_write_json(path, result.to_json())
    return path


def read_run_result(run_dir: Path) -> RunResult:
    path = Path(run_dir) / METRICS_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunResultError(f"{path} not found: pass the folder of a finished run (the --out of "
                             "`spine-fl simulate`, or the out_dir of the federation file)") from None
    except (OSError, ValueError) as exc:
        raise RunResultError(f"{path}: cannot be read as JSON ({exc})") from None
    return RunResult.from_json(raw, str(path))


def write_run_status(out_dir: Path, status: str, reason: str | None = None) -> None:
    atomic_write_json(Path(out_dir) / RUN_STATUS_FILE, {"status": status, "reason": reason})


def unfinished_reason(run_dir: Path) -> str | None:
    """Why the folder holds no result (its run is still running or failed), or None."""
    try:
        status = json.loads((Path(run_dir) / RUN_STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict) or status.get("status") not in ("running", "failed"):
        return None
    if status["status"] == "running":
        return "its run is still running, or was killed before it finished"
    return f"its run failed ({status.get('reason')})"
