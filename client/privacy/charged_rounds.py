"""The last DP reply of each run, kept so that a round is charged exactly once.

A coordinator killed mid-round resumes from its last checkpoint and asks for the same round again
(same run key, same round, same global model). Training again would be a second release of the
patients' data and would have to be charged again; re-sending the update already charged for is
free (the same DP output, post-processed). So after a DP round is charged, the site keeps the
reply it sent (`<state>/privacy/replies/<run key>.npz` and `.json`, one per run, replaced by the
next round); asked again for that round with the same global model, it re-sends it. Asked with
another model, it refuses: that would be a second, uncharged release.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spine_fl.shared.files import atomic_write_bytes, atomic_write_json


class ReplayRefused(RuntimeError):
    """The round was charged already and the site cannot re-send what it paid for."""


def model_sha256(weights: list[np.ndarray]) -> str:
    """Identity of a global model as the site received it (shapes, dtypes and values)."""
    h = hashlib.sha256()
    for array in weights:
        array = np.ascontiguousarray(array)
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ChargedReply:
    round: int
    received_sha256: str
    weights: list[np.ndarray]
    num_examples: int
    metrics: dict[str, Any]


def _paths(state_dir: Path, run_key: str) -> tuple[Path, Path]:
    folder = Path(state_dir) / "privacy" / "replies"
    return folder / f"{run_key}.npz", folder / f"{run_key}.json"


def keep_reply(state_dir: Path, run_key: str, reply: ChargedReply) -> None:
    """Written after the ledger line and before the reply leaves; the arrays first, so the JSON that
    names them never points at a half-written file."""
    arrays, meta = _paths(state_dir, run_key)
    buffer = io.BytesIO()
    np.savez(buffer, *reply.weights)
    atomic_write_bytes(arrays, buffer.getvalue())
    atomic_write_json(meta, {"round": reply.round, "received_sha256": reply.received_sha256,
                             "weights_sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
                             "num_examples": reply.num_examples, "metrics": reply.metrics})


def keeps_reply(state_dir: Path, run_key: str, server_round: int) -> bool:
    """Is the reply of this very round kept (checked before the round, without the model)?"""
    arrays, meta = _paths(state_dir, run_key)
    try:
        return arrays.is_file() and json.loads(meta.read_text()).get("round") == server_round
    except (OSError, ValueError, AttributeError):
        return False


def replay(state_dir: Path, run_key: str, server_round: int, received: list[np.ndarray]) -> ChargedReply:
    """The reply already charged for this round, to re-send; ReplayRefused when it is not kept or the
    coordinator now sends another model."""
    arrays, meta = _paths(state_dir, run_key)
    refusal = (f"round {server_round} of run {run_key} is already charged in this site's privacy ledger; "
               "training it again would spend epsilon twice")
    try:
        kept = json.loads(meta.read_text())
        raw = arrays.read_bytes()
    except (OSError, ValueError):
        raise ReplayRefused(f"{refusal}, and the reply it sent is not kept, so it is not trained again") from None
    if kept.get("round") != server_round or hashlib.sha256(raw).hexdigest() != kept.get("weights_sha256"):
        raise ReplayRefused(f"{refusal}, and the kept reply is of another round or damaged, so it is not trained again")
    if kept["received_sha256"] != model_sha256(received):
        raise ReplayRefused(f"{refusal}; the coordinator now sends another global model for it, which the site "
                            "will not train on without charging (a second release)")
    with np.load(io.BytesIO(raw)) as loaded:
        weights = [loaded[f"arr_{i}"] for i in range(len(loaded.files))]
    return ChargedReply(server_round, kept["received_sha256"], weights, int(kept["num_examples"]), kept["metrics"])
