"""The shared models this site received: the weights and run config of each run's last evaluate message.

The privacy audit attacks the final shared model with the site's own patients (membership
inference), and it must do so with the model the site actually received, not one the
coordinator claims it published. Evaluate comes after every aggregation, so the last evaluate
message of a run holds the run's final model. A run is named by its `run_key` (the same across
coordinator restarts, as in the privacy ledger), else by Flower's run id; the Flower run ids it
arrived under are kept too, with the last round seen in each, so that the audit can join the
egress ledger (which records Flower's run id) to the run. Kept as
`<state_dir>/received/<run>.npz` plus `<run>.json`, each written atomically; the JSON is written
last, so a model without its JSON is an interrupted write and is ignored.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from spine_fl.shared import protocol
from spine_fl.shared.config import run_key_of
from spine_fl.shared.files import atomic_write_bytes

RECEIVED_DIR = "received"


@dataclass(frozen=True)
class ReceivedModel:
    run_id: str  # the run's key (see the module docstring)
    round: int
    task: str
    image_size: int
    run_config: dict[str, Any]
    received_at: float
    weights: list[np.ndarray]
    flower_runs: dict[str, int]  # Flower run id -> last round received under it


def save_received(state_dir: Path, flower_run_id: str, weights: Sequence[np.ndarray],
                  config: Mapping[str, Any]) -> Path:
    """Keep (overwrite) this run's latest received global model; returns the .npz path."""
    folder = Path(state_dir) / RECEIVED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    run = run_key_of(config, str(int(flower_run_id)))
    npz, meta_path = folder / f"{run}.npz", folder / f"{run}.json"
    arrays = {f"w{i:04d}": np.asarray(w) for i, w in enumerate(weights)}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(npz, buffer.getvalue())
    seen = json.loads(meta_path.read_text()).get("flower_runs", {}) if meta_path.exists() else {}
    meta = {"run_id": run, "round": int(config.get(protocol.ROUND, 0)), "task": str(config.get("task", "")),
            "image_size": int(config.get("image-size", 0)), "run_config": dict(config),
            "received_at": time.time(), "arrays": len(arrays),
            "flower_runs": {**seen, flower_run_id: int(config.get(protocol.ROUND, 0))}}
    atomic_write_bytes(meta_path, json.dumps(meta, sort_keys=True).encode())
    return npz


def load_received(state_dir: Path) -> list[ReceivedModel]:
    """Every run's last received model, oldest first."""
    folder = Path(state_dir) / RECEIVED_DIR
    out = []
    for meta_path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        npz = meta_path.with_suffix(".npz")
        if not npz.exists():
            continue
        meta = json.loads(meta_path.read_text())
        with np.load(npz, allow_pickle=False) as bundle:
            weights = [bundle[f"w{i:04d}"] for i in range(int(meta["arrays"]))]
        out.append(ReceivedModel(meta["run_id"], int(meta["round"]), meta["task"], int(meta["image_size"]),
                                 dict(meta["run_config"]), float(meta["received_at"]), weights,
                                 {str(k): int(v) for k, v in meta.get("flower_runs", {}).items()}))
    return sorted(out, key=lambda m: m.received_at)
