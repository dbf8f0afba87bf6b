"""Audit: what every check reads, read once from the site's own files, and how a check words a reason.

`AuditInputs` is handed to each check in `checks.CHECKS`. Its parts are read on first use and then
kept, so checks share them and a part no check asks for is never read: the received final models,
the egress ledger's lines, each run's settings, the privacy ledger's records and the dataset's id.
A part that more than one check needs belongs here; what only one check needs stays in that check.

`reason(level, topic, text)` is one plain-language line of the verdict; `LEVELS` orders the levels
from best to worst.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, TypedDict

from spine_fl.client.privacy.egress_ledger import EgressLedger
from spine_fl.client.privacy.privacy_ledger import PrivacyLedger, PrivacyLedgerError, SpendRecord, dataset_id
from spine_fl.client.privacy.received_models import ReceivedModel, load_received
from spine_fl.client.site_config import Site
from spine_fl.shared.config import ConfigError, RunSettings

Level = Literal["pass", "attention", "fail"]
LEVELS: tuple[Level, ...] = ("pass", "attention", "fail")  # best to worst
UNSIGNED_FIELDS = ("signature", "prev_sha256", "seq")


class Reason(TypedDict):
    """One line of the verdict: how bad (`level`), which check (`topic`), and what a reader is told."""

    level: Level
    topic: str
    text: str


def reason(level: Level, topic: str, text: str) -> Reason:
    if level not in LEVELS:
        raise ValueError(f"reason level {level!r} is not one of {', '.join(LEVELS)}")
    return {"level": level, "topic": topic, "text": text}


def read_lines(state_dir: Path, run_keys: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The egress ledger's lines as dicts with their 1-based `line` number and `run` (the run key where
    known, else Flower's run id); unreadable lines are kept as such. Nothing is verified here: that is
    the ledger-integrity check's job."""
    out = []
    for number, entry in enumerate(EgressLedger(state_dir).log.readable_lines(), start=1):
        if entry is None:
            entry = {"unreadable": True}
        flower_run = str(entry.get("run_id", "?"))
        out.append({**{k: v for k, v in entry.items() if k not in UNSIGNED_FIELDS}, "line": number,
                    "run": (run_keys or {}).get(flower_run, flower_run)})
    return out


def run_settings(received: list[ReceivedModel]) -> dict[str, RunSettings]:
    """Each run's settings, from the config that came with its final model; runs whose config cannot be
    read are left out (the policy check reports them as 'settings unknown')."""
    out = {}
    for model in received:
        try:
            out[model.run_id] = RunSettings.from_run_config(model.run_config)
        except (ConfigError, TypeError, ValueError):
            continue
    return out


@dataclass
class AuditInputs:
    """One site's audit: where its files are, the audit's options, and the parts of the files that
    checks read (each a cached property: read on first use, then shared)."""

    site: Site
    policy_found: bool = True
    policy_source: str = "site config"
    shadow_models: int = 8
    bootstrap: int = 1000
    seed: int = 0
    progress: Callable[[str], None] = field(default=lambda _: None, repr=False)
    # the coordinator's record of this site from a run result (metrics.json "ledgers"), and its file
    coordinator_record: dict[str, Any] | None = None
    coordinator_record_source: str | None = None

    @cached_property
    def dataset_id(self) -> str:
        return dataset_id(self.site.data_dir)

    @cached_property
    def received(self) -> list[ReceivedModel]:
        """The final shared models the site received (<state_dir>/received), oldest first."""
        return load_received(self.site.state_dir)

    @cached_property
    def lines(self) -> list[dict[str, Any]]:
        """The egress ledger's lines, grouped by run key where the received models name it."""
        keys = {flower: model.run_id for model in self.received for flower in model.flower_runs}
        return read_lines(self.site.state_dir, keys)

    @cached_property
    def settings(self) -> dict[str, RunSettings]:
        """Run key -> the run's settings, for the runs whose final model the site holds."""
        return run_settings(self.received)

    @cached_property
    def _privacy_ledger(self) -> tuple[list[SpendRecord], str | None]:
        try:
            return PrivacyLedger(self.site.state_dir, self.dataset_id).records(), None
        except PrivacyLedgerError as exc:
            return [], str(exc)

    @property
    def privacy_records(self) -> list[SpendRecord]:
        """The privacy ledger's spending records for this dataset (empty when it cannot be read)."""
        return self._privacy_ledger[0]

    @property
    def privacy_ledger_error(self) -> str | None:
        """Why the privacy ledger could not be read, or None."""
        return self._privacy_ledger[1]

    def describe(self) -> dict[str, Any]:
        """The report's "inputs" section: what was audited, and against which policy."""
        return {"state_dir": str(self.site.state_dir), "data_dir": str(self.site.data_dir),
                "policy_source": self.policy_source, "policy_found": self.policy_found,
                "dataset_id": self.dataset_id,
                "received_models": [{"run_id": m.run_id, "round": m.round, "task": m.task} for m in self.received]}
