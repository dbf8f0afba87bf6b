"""What the coordinator writes: the shared model with the task and settings it belongs to."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spine_fl.shared.config import RunSettings
from spine_fl.shared.models import build_model
from spine_fl.shared.tasks import get_task
from spine_fl.shared.training import set_weights

MODEL_FILE = "model.pt"
FEDERATION_FILE = "federation.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, json.dumps(payload, indent=2, allow_nan=True).encode())


def save_model(path: Path, settings: RunSettings, weights: list[np.ndarray]) -> None:
    model = build_model(get_task(settings.task), settings.seed)
    set_weights(model, weights)
    buffer = io.BytesIO()
    torch.save({"task": settings.task, "settings": settings.to_run_config(), "state_dict": model.state_dict()}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_model(path: Path) -> tuple[torch.nn.Module, RunSettings]:
    bundle = torch.load(path, map_location="cpu", weights_only=True)
    settings = RunSettings.from_run_config(bundle["settings"])
    model = build_model(get_task(settings.task), settings.seed)
    model.load_state_dict(bundle["state_dict"])
    return model, settings


def write_federation_results(out_dir: Path, settings: RunSettings, sites: list[str],
                             weights: list[np.ndarray], rounds: list[dict[str, Any]]) -> None:
    save_model(out_dir / MODEL_FILE, settings, weights)
    atomic_write_json(out_dir / FEDERATION_FILE, {"task": settings.task, "sites": sites,
                                                  "config": settings.to_run_config(), "rounds": rounds})
