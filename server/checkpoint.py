"""The coordinator's checkpoint after every completed round: the global model, the round, what
the sites reported so far and the run's key. `spine-fl server` restarted with the same federation
file resumes from here at the next round instead of starting over."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spine_fl.shared.config import ConfigError, RunSettings
from spine_fl.shared.files import atomic_write_bytes, atomic_write_json

STATE_FILE = "checkpoint.json"


def settings_digest(settings: RunSettings) -> str:
    return hashlib.sha256(json.dumps(settings.to_run_config(), sort_keys=True).encode()).hexdigest()


@dataclass
class Checkpoint:
    round: int
    weights: list[np.ndarray]
    log: dict[str, Any]
    run_key: str
    sha256: str = ""  # of the weights file, for the log line that says what a restart resumed from


def save_checkpoint(directory: Path, settings: RunSettings, checkpoint: Checkpoint) -> None:
    """The round's weights under a new name, then the state that points at them, then the old
    weights go: a crash at any point leaves a consistent checkpoint (the old or the new round)."""
    buffer = io.BytesIO()
    np.savez(buffer, *checkpoint.weights)
    weights = f"weights-round-{checkpoint.round}.npz"
    atomic_write_bytes(directory / weights, buffer.getvalue())
    atomic_write_json(directory / STATE_FILE, {
        "round": checkpoint.round, "settings_sha256": settings_digest(settings), "run_key": checkpoint.run_key,
        "weights_file": weights, "weights_sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
        "log": checkpoint.log})
    for old in directory.glob("weights-round-*.npz"):
        if old.name != weights:
            old.unlink()


def retire_checkpoint(directory: Path, run_key: str) -> Path | None:
    """A finished run is not resumed: its checkpoint moves aside (kept for the record)."""
    if not (directory / STATE_FILE).exists():
        return None
    done = directory.with_name(f"{directory.name}-finished-{run_key}")
    directory.rename(done)
    return done


def load_checkpoint(directory: Path, settings: RunSettings) -> Checkpoint | None:
    state_path = directory / STATE_FILE
    if not state_path.exists():
        return None
    state = json.loads(state_path.read_text())
    if state["settings_sha256"] != settings_digest(settings):
        raise ConfigError(f"{state_path}: the checkpoint was made with different [run] settings; restore them "
                          f"to resume, or move {directory} away to start a new run")
    raw = (directory / state["weights_file"]).read_bytes()
    if hashlib.sha256(raw).hexdigest() != state["weights_sha256"]:
        raise ConfigError(f"{directory / state['weights_file']} does not match {state_path}; the checkpoint is "
                          "damaged")
    with np.load(io.BytesIO(raw)) as arrays:
        weights = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    return Checkpoint(int(state["round"]), weights, state["log"], str(state["run_key"]), state["weights_sha256"])
