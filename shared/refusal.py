"""A site's machine-readable refusal: the site writes it, the coordinator reads it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from spine_fl.shared.protocol import REFUSAL_PREFIX


@dataclass(frozen=True)
class Refusal:
    """Why a site will not take part; sent to the coordinator as JSON in the error reason."""

    rule: str
    message: str
    site: str = ""
    epsilon_spent: float | None = None
    epsilon_after: float | None = None
    budget: float | None = None
    delta: float | None = None  # the δ of epsilon_spent / epsilon_after
    delta_asked: float | None = None  # rule max_delta: what the run asked for
    delta_allowed: float | None = None  # rule max_delta: the largest δ this site allows

    def to_reason(self) -> str:
        return REFUSAL_PREFIX + json.dumps({k: v for k, v in asdict(self).items() if v is not None})

    @staticmethod
    def parse(text: str) -> dict | None:
        """The refusal inside a Flower error text, or None when the error is something else."""
        start = text.find(REFUSAL_PREFIX)
        if start < 0:
            return None
        decoder = json.JSONDecoder()
        try:
            payload, _ = decoder.raw_decode(text[start + len(REFUSAL_PREFIX):])
        except json.JSONDecodeError:
            return None
        return payload if isinstance(payload, dict) else None
