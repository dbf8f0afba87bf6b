"""An independent epsilon: Google's dp-accounting, not Opacus, on the same mechanism."""

from __future__ import annotations

from typing import Iterable

import dp_accounting
from opacus.accountants.rdp import RDPAccountant


def _event(noise: float, rate: float, steps: int) -> dp_accounting.DpEvent:
    """The Poisson-subsampled Gaussian mechanism, composed `steps` times."""
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), steps)


def independent_epsilon(noise: float, rate: float, steps: int, delta: float, accountant: str) -> float:
    """Google's dp-accounting on the same mechanism: Poisson-subsampled Gaussian, composed `steps` times.
    'rdp': dp-accounting's RDP at Opacus' orders (like with like, for short histories: for long ones
    its low orders do not converge, see pld_epsilon); otherwise its PLD accountant."""
    if accountant == "rdp":
        acc = dp_accounting.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)  # the same RDP orders
    else:
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(_event(noise, rate, steps))
    return acc.get_epsilon(delta)


def independent_rdp_epsilon(history: Iterable[tuple[float, float, int]], delta: float) -> float:
    """dp-accounting's RDP at Opacus' orders on a whole history (e.g. training rounds and the
    recalibration histogram: a Gaussian mechanism, rate 1, one step)."""
    acc = dp_accounting.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    acc.compose(dp_accounting.ComposedDpEvent([_event(noise, rate, steps) for noise, rate, steps in history]))
    return acc.get_epsilon(delta)


def pld_epsilon(history: Iterable[tuple[float, float, int]], delta: float, grid: float = 1e-3) -> float:
    """dp-accounting's PLDAccountant on a whole history of (noise, rate, steps): the (nearly) exact epsilon,
    at any length. A 1e-3 grid is within 0.3% of a 1e-4 one and takes well under a second for 3,000 steps."""
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=grid)
    acc.compose(dp_accounting.ComposedDpEvent([_event(noise, rate, steps) for noise, rate, steps in history]))
    return acc.get_epsilon(delta)
