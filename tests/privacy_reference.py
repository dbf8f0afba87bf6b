"""An independent epsilon: Google's dp-accounting, not Opacus, on the same mechanism."""

from __future__ import annotations

import dp_accounting
from opacus.accountants.rdp import RDPAccountant


def independent_epsilon(noise: float, rate: float, steps: int, delta: float, accountant: str) -> float:
    """Google's dp-accounting on the same mechanism: Poisson-subsampled Gaussian, composed `steps` times."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)), steps)
    if accountant == "rdp":
        acc = dp_accounting.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)  # the same RDP orders
    else:
        acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(event)
    return acc.get_epsilon(delta)
