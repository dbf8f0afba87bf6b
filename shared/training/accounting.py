"""Epsilon from a DP-SGD history, with Opacus' own accountants (RDP or PRV).

A history is a list of (noise_multiplier, sample_rate, steps) entries, exactly what Opacus'
accountants keep in `.history`; composing a site's whole on-disk history in one accountant is
how spine-fl composes privacy loss across rounds and runs.
"""

from __future__ import annotations

from typing import Iterable

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

History = list[tuple[float, float, int]]


def epsilon(history: Iterable[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    # Rounds with the same mechanism compose exactly into one entry with their steps summed;
    # the accountants' cost grows with the number of entries (seconds for a long history).
    merged: dict[tuple[float, float], int] = {}
    for sigma, rate, steps in history:
        if steps > 0:
            key = (float(sigma), float(rate))
            merged[key] = merged.get(key, 0) + int(steps)
    if not merged:
        return 0.0
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(sigma, rate, steps) for (sigma, rate), steps in merged.items()]
    return float(acc.get_epsilon(delta=delta))


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """Smallest noise multiplier whose run (sample_rate, steps) stays within target_epsilon."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant=accountant))


def default_delta(n_train: int) -> float:
    """Below 1/n, as the standard DP guidance asks: 1 / (10 n)."""
    return 1.0 / (10.0 * max(n_train, 1))
