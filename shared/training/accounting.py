"""Epsilon from a DP-SGD history, with Opacus' own accountants (RDP or PRV), and what an epsilon means.

A history is a list of (noise_multiplier, sample_rate, steps) entries, exactly what Opacus'
accountants keep in `.history`; composing a site's whole on-disk history is how spine-fl composes
privacy loss across rounds and runs.

A `Composition` is such a history composed so far, kept so that adding a round costs the same at any
length (issue 14): the RDP curve (RDP at each of Opacus' orders) composes by addition, so it is the
running sum of each entry's curve, in history order, exactly as Opacus' RDPAccountant sums its
`.history`; PRV does not compose by adding curves, so the composition also keeps each mechanism's
summed steps and composes them in one PRV accountant, once per distinct composition (cached): the
history the audit hands PRV, so the figure is the audit's. That is once per round, not constant time:
PRV's cost grows with the steps composed (measured on 2 loaded cores, a 1,000-line ledger: 10-20 s per
composition, two per round; RDP: well under a millisecond). A full recomputation (`compose`,
`epsilon`) is the same fold from the empty composition, so a running composition and a
recomputation of the same history give the same float, not merely a close one.

`dp_tpr_ceiling` and `epsilon_in_plain_words` say what an (epsilon, delta) guarantee allows an
attacker, in the hypothesis-testing reading of DP: both the site's audit and the coordinator's
model card print it beside the figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

History = list[tuple[float, float, int]]
Mechanisms = tuple[tuple[float, float, int], ...]  # (noise, sample rate, steps summed), first-seen order
ORDERS = RDPAccountant.DEFAULT_ALPHAS  # the RDP orders Opacus' RDPAccountant uses


@lru_cache(maxsize=256)
def _rdp_per_step(sigma: float, rate: float) -> np.ndarray:
    """Opacus' RDP of one step at each of its default orders (the costly part: ~0.1 s per mechanism)."""
    vector = rdp_analysis.compute_rdp(q=rate, noise_multiplier=sigma, steps=1, orders=ORDERS)
    vector.setflags(write=False)
    return vector


@lru_cache(maxsize=256)
def _prv_epsilon(mechanisms: Mechanisms, delta: float) -> float:
    """Opacus' PRV accountant on the merged history: seconds for a long one, so computed once per
    composition and delta (the pre-flight's and the training round's checks ask the same question)."""
    acc = PRVAccountant()
    acc.history = list(mechanisms)
    return float(acc.get_epsilon(delta=delta))


def _frozen(vector: np.ndarray) -> np.ndarray:
    vector.setflags(write=False)
    return vector


@dataclass(frozen=True, eq=False)  # eq=False: compare `rdp` curves with numpy, not ==
class Composition:
    """A history composed so far: its RDP curve (summed entry by entry), each mechanism's steps, the
    total steps. Immutable: `then` returns a new one, in time independent of the history's length."""

    rdp: np.ndarray
    mechanisms: Mechanisms = ()
    steps: int = 0

    def then(self, sigma: float, rate: float, steps: int) -> Composition:
        """This composition followed by `steps` steps of (sigma, rate); entries without steps spend nothing."""
        return compose([(sigma, rate, steps)], self)

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """Epsilon at `delta`: Opacus' RDP -> (epsilon, delta) conversion of the summed curve, or PRV."""
        if accountant not in ("rdp", "prv"):  # shared/config.py ACCOUNTANTS: never a silent fallback
            raise ValueError(f"unknown accountant {accountant!r}: rdp or prv")
        if not self.steps:
            return 0.0
        if accountant == "prv":
            return _prv_epsilon(self.mechanisms, float(delta))
        eps, _ = rdp_analysis.get_privacy_spent(orders=ORDERS, rdp=self.rdp, delta=delta)
        return float(eps)


EMPTY = Composition(_frozen(np.zeros(len(ORDERS))))


def compose(history: Iterable[tuple[float, float, int]], start: Composition = EMPTY) -> Composition:
    """`start` followed by every entry of `history`, in order: the full recomputation and the running
    composition are this one fold, so they agree to the last bit. For RDP the curve is exactly what
    Opacus' RDPAccountant(history).get_epsilon sums (compute_rdp(steps=k) is the one-step curve times k,
    added entry after entry). Entries without steps spend nothing."""
    rdp, total = start.rdp, start.steps
    merged = {(sigma, rate): steps for sigma, rate, steps in start.mechanisms}
    for sigma, rate, steps in history:
        if steps <= 0:
            continue
        key, steps = (float(sigma), float(rate)), int(steps)
        rdp = rdp + _rdp_per_step(*key) * steps
        merged[key] = merged.get(key, 0) + steps
        total += steps
    if total == start.steps:
        return start
    return Composition(_frozen(rdp), tuple((sigma, rate, n) for (sigma, rate), n in merged.items()), total)


def merge_history(history: Iterable[tuple[float, float, int]]) -> dict[tuple[float, float], int]:
    """Rounds with the same mechanism (noise, sample rate) compose exactly into one entry with their
    steps summed; an accountant's cost grows with the number of entries (seconds for a long history)."""
    merged: dict[tuple[float, float], int] = {}
    for sigma, rate, steps in history:
        if steps > 0:
            key = (float(sigma), float(rate))
            merged[key] = merged.get(key, 0) + int(steps)
    return merged


def epsilon(history: Iterable[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of a whole history, recomputed from scratch (what the audit and a site's start-up do)."""
    return compose(history).epsilon(delta, accountant)


@lru_cache(maxsize=64)
def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """Smallest noise multiplier whose run (sample_rate, steps) stays within target_epsilon."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant=accountant))


def default_delta(n_train: int) -> float:
    """Below 1/n, as the standard DP guidance asks: 1 / (10 n)."""
    return 1.0 / (10.0 * max(n_train, 1))


# -- what an (epsilon, delta) guarantee means --------------------------------------------------

PLAIN_WORDS_FPR = 0.01  # the false-accusation rate the plain-words sentence is read at


def dp_tpr_ceiling(fpr: np.ndarray | float, epsilon: float, delta: float) -> np.ndarray:
    """The largest TPR any attack can reach at this FPR against an (epsilon, delta)-DP mechanism:
    TPR <= min(e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR)) (Kairouz et al. 2015; the second
    term is the same bound read from the other side, non-members against members)."""
    fpr = np.asarray(fpr, dtype=float)
    with np.errstate(over="ignore"):  # e^eps overflows to inf for a huge epsilon: then the bound is 1
        bound = np.minimum(np.exp(epsilon) * fpr + delta, 1.0 - math.exp(-epsilon) * (1.0 - delta - fpr))
    return np.clip(bound, 0.0, 1.0)


def plain_number(value: float) -> str:
    """A factor for a lay reader, to two significant digits: 2.7, 45, 4,700, or 10^57 beyond a million."""
    if not math.isfinite(value):
        return "10^300 or more"
    if value >= 1e6:
        return f"10^{math.log10(value):.0f}"
    if value < 10:
        return f"{value:.2g}"
    return f"{float(f'{value:.2g}'):,.0f}"


def plain_percent(share: float) -> str:
    """A share as a percentage with enough digits that a bound just under 100% does not read as 100%."""
    if share >= 1.0:
        return "100%"
    if share < 0.995:
        return f"{100 * share:.3g}%"
    for digits in range(1, 7):
        text = f"{100 * share:.{digits}f}"
        if float(text) < 100:
            return f"{text}%"
    return "99.99999%"


def plain_delta(delta: float) -> str:
    """Delta as the literature writes it: 1e-4 rather than 0.0001, 2.5e-5 rather than 2.5e-05."""
    if delta <= 0:
        return "0"
    if delta >= 1e-3:
        return f"{delta:.2g}"
    mantissa, exponent = f"{delta:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def epsilon_in_plain_words(epsilon: float, delta: float, seen: str = "the model",
                           fpr: float = PLAIN_WORDS_FPR) -> str:
    """One sentence a data-protection officer can read: what (epsilon, delta)-DP allows an attacker who
    sees `seen`. The figure after 'at most' is dp_tpr_ceiling(fpr, epsilon, delta)."""
    ceiling = float(dp_tpr_ceiling(fpr, epsilon, delta))
    return (f"\u03b5 = {epsilon:.2f}, \u03b4 = {plain_delta(delta)} means: whatever an attacker already knows, seeing "
            f"{seen} can raise their odds of telling whether any one patient was in the training data by at "
            f"most a factor e^\u03b5 \u2248 {plain_number(math.exp(epsilon) if epsilon < 700 else math.inf)} (plus a "
            f"\u03b4 chance of anything); equivalently, a membership attack that wrongly accuses {plain_percent(fpr)} "
            f"of non-patients can correctly identify at most {plain_percent(ceiling)} of patients.")
