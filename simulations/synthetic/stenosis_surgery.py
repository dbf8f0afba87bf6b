"""Synthetic Zurich Claudication Questionnaire (ZCQ) outcomes of lumbar stenosis surgery.

For the Leiden stenosis-surgery task (configs/tasks/lss_surgery_zcq.toml): symptom duration and
the ZCQ at baseline and 26 weeks, for the same patients and T2 axial images as the TFESI columns.
Each ZCQ scale is the mean of its items (Stucki et al. 1996, Spine 21:796): symptom severity 7
items scored 1-5 (so multiples of 1/7 in [1, 5]), physical function 5 items scored 1-4 (multiples
of 1/5 in [1, 4]), satisfaction 6 items scored 1-4 (multiples of 1/6 in [1, 4]); written rounded to
3 decimals. The follow-up scores are drawn so the recorded values give the drawn outcome under the
task's rule (severity and function each improved by >= 0.5, satisfaction <= 2.5).

Surgical success is likelier with a more severe stenosis (the latent narrowing the T2 axial image
shows as a smaller thecal sac and narrower foramina: decompression helps most where the canal is
tightest), a shorter symptom duration, a lower BMI, a younger age and a worse baseline severity
(more room to improve). The columns come from their own random stream, appended after the others,
so every other column, image and manifest of a site is the same as without them for a seed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

IMAGE_SIGNAL = 2.4  # logit per SD of stenosis severity
SEVERITY_ITEMS, FUNCTION_ITEMS, SATISFACTION_ITEMS = 7, 5, 6  # items per ZCQ scale
MIN_IMPROVEMENT, MAX_SATISFACTION = 0.5, 2.5  # the task's success rule
LOST_TO_FOLLOW_UP = 0.03  # share of patients without a 26-week questionnaire
COLUMNS = ("symptom_duration_months", "zcq_severity_baseline", "zcq_function_baseline", "zcq_severity_26w",
           "zcq_function_26w", "zcq_satisfaction_26w")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _item_sums(rng: np.random.Generator, n: int, items: int, mean: float, sd: float, low: int) -> np.ndarray:
    """Baseline sums of `items` items (each 1..top): a scale mean times its item count, at least `low`."""
    top = {SEVERITY_ITEMS: 5, FUNCTION_ITEMS: 4}[items]
    return np.clip(np.round(rng.normal(mean * items, sd * items, n)), low, top * items).astype(int)


def _follow_up_sums(rng: np.random.Generator, base: np.ndarray, items: int, improved: np.ndarray) -> np.ndarray:
    """26-week item sums: improved by at least 0.5 points (as a mean of items) where `improved`, else by less."""
    top = {SEVERITY_ITEMS: 5, FUNCTION_ITEMS: 4}[items]
    need = int(np.ceil(MIN_IMPROVEMENT * items))  # the smallest sum drop that is a 0.5-point improvement
    low = np.where(improved, need, np.maximum(base - top * items, -need + 1))  # drop in the item sum
    high = np.where(improved, base - items, need - 1)
    return base - rng.integers(low, high + 1)


def stenosis_surgery_columns(rng: np.random.Generator, narrowing: np.ndarray, age: np.ndarray, bmi: np.ndarray,
                             intercept: float) -> pd.DataFrame:
    """The task's columns for patients with these latent stenosis severities, ages and BMIs."""
    n = narrowing.size
    duration = np.clip(np.round(np.exp(rng.normal(np.log(18), 0.8, n))), 1, 360).astype(int)
    sev_base = _item_sums(rng, n, SEVERITY_ITEMS, 3.3, 0.55, 2 * SEVERITY_ITEMS)  # room for a 0.5 improvement
    fun_base = _item_sums(rng, n, FUNCTION_ITEMS, 2.6, 0.5, 8)
    clinical = (-0.9 * np.log(duration / 18) / 0.8 - 0.7 * (bmi - 23) / 3.2 - 0.5 * (age - 63) / 12
                + 0.7 * (sev_base / SEVERITY_ITEMS - 3.3) / 0.55)
    success = rng.random(n) < _sigmoid(intercept + IMAGE_SIGNAL * narrowing + clinical)
    # a failure misses at least one of the three criteria: each with even odds, one drawn if none was
    misses = (rng.random((n, 3)) < 0.5) & ~success[:, None]
    none = np.flatnonzero(~success & ~misses.any(axis=1))
    misses[none, rng.integers(0, 3, none.size)] = True
    sev_follow = _follow_up_sums(rng, sev_base, SEVERITY_ITEMS, ~misses[:, 0])
    fun_follow = _follow_up_sums(rng, fun_base, FUNCTION_ITEMS, ~misses[:, 1])
    satisfied_top = int(MAX_SATISFACTION * SATISFACTION_ITEMS)  # 15 of 24: a mean of 2.5
    satisfaction = np.where(misses[:, 2], rng.integers(satisfied_top + 1, 4 * SATISFACTION_ITEMS + 1, n),
                            rng.integers(SATISFACTION_ITEMS, satisfied_top + 1, n))
    lost = rng.random(n) < LOST_TO_FOLLOW_UP

    def scale(sums: np.ndarray, items: int, follow_up: bool = False) -> np.ndarray:
        values = np.round(sums / items, 3)
        return np.where(lost, np.nan, values) if follow_up else values

    return pd.DataFrame({
        "symptom_duration_months": duration,
        "zcq_severity_baseline": scale(sev_base, SEVERITY_ITEMS),
        "zcq_function_baseline": scale(fun_base, FUNCTION_ITEMS),
        "zcq_severity_26w": scale(sev_follow, SEVERITY_ITEMS, True),
        "zcq_function_26w": scale(fun_follow, FUNCTION_ITEMS, True),
        "zcq_satisfaction_26w": scale(satisfaction, SATISFACTION_ITEMS, True),
    }, columns=list(COLUMNS))
