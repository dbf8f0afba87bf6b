"""Flower's SecAgg+ as the fit workflow: the coordinator only ever sees the sum of the updates.

Ranges (Flower's SecAggPlusWorkflow quantises *full weights*, not DP-clipped gradients):
- DP clipping (per-sample gradients, max_grad_norm) and SecAgg+ clipping are unrelated bounds.
  SecAgg+ clips every weight to +-clipping_range before quantising; spine-fl's models keep
  weights well under 1 (GroupNorm scales near 1), so the default 8 never clips, and each site
  refuses to send a model with a weight beyond the range instead of letting it be distorted.
- Each site's weights are scaled by num_examples / max_weight before quantising to
  quantization_range levels over [-clipping_range, clipping_range], so one site's rounding
  error is at most clipping_range / quantization_range * max_weight / num_examples per weight
  (8 / 2**22 * 1000 / 100 ~ 2e-5 for a 100-patient site): far below DP-SGD's noise. max_weight
  must be at least the largest site's training-set size (1000 covers the consortium's cohorts).
- Every selected site holds a share of every other's key (num_shares = all) and 2/3 of them are
  needed to unmask: with 3 sites, one may drop out mid-round and the round still completes.
"""

from __future__ import annotations

from flwr.server.workflow import SecAggPlusWorkflow

from spine_fl.shared.config import RunSettings

QUANTIZATION_RANGE = 2**22
RECONSTRUCTION_FRACTION = 0.67


def secagg_fit_workflow(run: RunSettings) -> SecAggPlusWorkflow | None:
    """None means Flower's plain fit workflow: only when the run explicitly sets secagg = false."""
    if not run.secagg:
        return None
    return SecAggPlusWorkflow(
        num_shares=1.0,
        reconstruction_threshold=RECONSTRUCTION_FRACTION,
        max_weight=run.secagg_max_weight,
        clipping_range=run.secagg_clipping_range,
        quantization_range=QUANTIZATION_RANGE,
    )


def quantization_error_bound(run: RunSettings, min_site_examples: int) -> float:
    """Largest per-weight deviation of the SecAgg+ aggregate from plain FedAvg (one site's rounding)."""
    return run.secagg_clipping_range / QUANTIZATION_RANGE * run.secagg_max_weight / max(min_site_examples, 1)
