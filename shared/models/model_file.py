"""The shared model as a file (`model.pt`): the weights with the run settings they belong to.

The settings carry the task's definition (`RunSettings.task_definition`), so whoever reads the
file (the coordinator's model card, a site scoring its own patients with `spine-fl predict`)
rebuilds exactly the network the run trained, for exactly its task, without the task file.
The coordinator writes it (server/reporting/federation_record.py); anyone may read it.

The file records how its run ended (`run_status`: "completed" or "stopped", with `stop_reason`)
and how many rounds trained the weights (`rounds_trained`): a stopped run still writes its
model.pt (the results say why it stopped), and whoever scores patients must be able to tell that
those weights are unfinished, or the initial random ones (`usability_problem`). Files written
before these fields existed carry neither and are read as before.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spine_fl.shared.config import RunSettings
from spine_fl.shared.contract.tasks import get_task
from spine_fl.shared.files import atomic_write_bytes
from spine_fl.shared.models.registry import build_model
from spine_fl.shared.training.local import fold_calibration, set_weights

__all__ = ["MODEL_FILE", "ModelFileError", "load_model", "model_from_bundle", "privacy_record", "read_model_bundle",
           "run_record", "save_model", "usability_problem"]

MODEL_FILE = "model.pt"


class ModelFileError(ValueError):
    """A model file that cannot be read; the message names the file and what to do."""


def save_model(path: Path, settings: RunSettings, weights: list[np.ndarray],
               calibration: dict[str, Any] | None = None, privacy: dict[str, Any] | None = None, *,
               run_status: str | None = None, rounds_trained: int | None = None,
               stop_reason: str | None = None) -> None:
    """With a fitted calibration (server/calibration.py, status "fitted"), Platt's map is folded into
    the output layer (the file's model outputs a * logit + b: its probabilities are calibrated) and
    recorded beside the weights as `calibration` {method, a, b, folded}, with `recommended_threshold`
    {value, rule, sensitivity, specificity} on the calibrated probability. `privacy` (`privacy_record`)
    travels with the weights, so whoever scores patients with the file knows its guarantee.
    `run_status` ("completed" / "stopped"), `stop_reason` and `rounds_trained` record how the run
    ended, so a stopped run's weights are never mistaken for a result (`usability_problem`)."""
    model = build_model(get_task(settings.task), settings.seed)
    set_weights(model, weights)
    bundle: dict[str, Any] = {"task": settings.task, "settings": settings.to_run_config()}
    if privacy is not None:
        bundle["privacy"] = privacy
    if run_status is not None:
        bundle["run_status"] = str(run_status)
        bundle["stop_reason"] = None if stop_reason is None else str(stop_reason)
    if rounds_trained is not None:
        bundle["rounds_trained"] = int(rounds_trained)
    if calibration and calibration.get("status") == "fitted":
        a, b = float(calibration["a"]), float(calibration["b"])
        folded = fold_calibration(model, a, b)
        bundle["calibration"] = {"method": "platt", "a": a, "b": b, "folded": folded}
        if folded:
            t = calibration["threshold"]
            bundle["recommended_threshold"] = {"value": float(t["value"]), "rule": str(t["rule"]),
                                               "sensitivity": float(t["sensitivity"]),
                                               "specificity": float(t["specificity"])}
    bundle["state_dict"] = model.state_dict()
    buffer = io.BytesIO()
    torch.save(bundle, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def privacy_record(per_site: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run's guarantee for the model file: the weakest site's whole spending in this run
    (training and recalibration: `epsilon_total`) with its delta, and every site's; epsilon None
    when no site reported a DP spend."""
    spent = {site: {"epsilon": p.get("epsilon_total"), "delta": p.get("delta")} for site, p in per_site.items()
             if p.get("dp") and p.get("epsilon_total") is not None}
    if not spent:
        return {"dp": any(p.get("dp") for p in per_site.values()), "epsilon": None, "delta": None, "site": None,
                "per_site": {}}
    weakest = max(spent, key=lambda site: spent[site]["epsilon"])
    return {"dp": True, "epsilon": float(spent[weakest]["epsilon"]), "delta": float(spent[weakest]["delta"]), "site": weakest,
            "per_site": {site: {k: float(v) for k, v in p.items()} for site, p in spent.items()}}


def read_model_bundle(path: Path) -> dict[str, Any]:
    """The file's contents (task, settings, state_dict); ModelFileError when it is no spine-fl model file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file; give the run's {MODEL_FILE} (or the run folder holding it)")
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise ModelFileError(f"{path}: not a readable spine-fl model file ({exc.__class__.__name__}); give the "
                             f"{MODEL_FILE} a run wrote") from None
    if not isinstance(bundle, dict) or not {"settings", "state_dict"} <= set(bundle):
        raise ModelFileError(f"{path}: not a spine-fl model file (no run settings and weights); give the "
                             f"{MODEL_FILE} a run wrote")
    return bundle


def run_record(bundle: dict[str, Any]) -> dict[str, Any]:
    """How the file's run ended: {"status", "stop_reason", "rounds_trained", "rounds"}; status and
    rounds_trained are None in a file written before they were recorded."""
    settings = bundle.get("settings") if isinstance(bundle.get("settings"), dict) else {}
    rounds = settings.get("rounds")
    trained = bundle.get("rounds_trained")
    return {"status": bundle.get("run_status"), "stop_reason": bundle.get("stop_reason"),
            "rounds_trained": trained if isinstance(trained, int) and not isinstance(trained, bool) else None,
            "rounds": rounds if isinstance(rounds, int) and not isinstance(rounds, bool) else None}


def usability_problem(path: Path, bundle: dict[str, Any]) -> str | None:
    """Why the file's weights must not score patients (its run did not complete, or trained no
    round), naming the file and what to do; None when the file records a completed run, or records
    nothing (a file written before the run's status was recorded)."""
    record = run_record(bundle)
    status, trained = record["status"], record["rounds_trained"]
    if status is None and trained is None:
        return None
    of = f" of {record['rounds']}" if record["rounds"] is not None else ""
    reason = f" ({record['stop_reason']})" if record["stop_reason"] else ""
    if status is not None and status != "completed":
        what = f"run status {status!r}{reason}" + ("" if trained is None else f", {trained}{of} round(s) trained")
    elif trained == 0:
        what = f"run status {status or 'not recorded'}, but 0{of} rounds trained: the weights are the untrained initial ones"
    else:
        return None
    return (f"{path}: {what}; a model whose run did not complete is not a result and must not score patients. "
            "Use the model.pt of a run that completed (its run_status.json says \"completed\"), or fix the "
            "reason above and run the federation again")


def model_from_bundle(bundle: dict[str, Any]) -> tuple[torch.nn.Module, RunSettings]:
    """The network with the run's weights, and the run's settings (whose task definition this process now uses)."""
    settings = RunSettings.from_run_config(bundle["settings"])
    model = build_model(get_task(settings.task), settings.seed)
    model.load_state_dict(bundle["state_dict"])
    return model, settings


def load_model(path: Path) -> tuple[torch.nn.Module, RunSettings]:
    """The model file's network and run settings (see model_from_bundle)."""
    return model_from_bundle(read_model_bundle(path))
