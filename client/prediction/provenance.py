"""Under which privacy guarantee the model was trained, as the page beside a site's predictions states it.

A clinician who scores patients with a shared model should see what that model cost the patients it
was trained on. Where the (epsilon, delta) comes from, best first:
  1. the model file's own `privacy` record ({"epsilon", "delta"}), when the run wrote one;
  2. the run's record beside the model file (metrics.json, then federation.json: `privacy.per_site`),
     the largest spending of any site (the weakest guarantee), with that site's delta;
  3. the run settings inside the model file: DP off, or the run's target epsilon and delta, or only
     the noise settings (then epsilon is said to be unknown, never guessed).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spine_fl.shared.config import RunSettings
from spine_fl.shared.training.accounting import epsilon_in_plain_words, plain_delta

RUN_RECORDS = ("metrics.json", "federation.json")  # beside the model file, searched in this order
DELTA_PER_SITE = "1 / (10 n) at each site, n its training patients"


@dataclass(frozen=True)
class TrainedPrivacy:
    dp: bool
    epsilon: float | None  # None: not recorded (or DP off)
    delta: float | None
    source: str  # where the figures were read
    detail: str = ""  # e.g. "the largest of 3 sites (zurich)" or the noise settings

    @property
    def pair(self) -> str:
        """(epsilon, delta) as a table cell."""
        if not self.dp:
            return "none: trained without differential privacy"
        eps = "not recorded" if self.epsilon is None else f"{self.epsilon:.2f}"
        delta = DELTA_PER_SITE if self.delta is None else plain_delta(self.delta)
        return f"\u03b5 = {eps}, \u03b4 = {delta}"

    @property
    def sentence(self) -> str:
        """Plain words: what the guarantee means, or why there is none to state; then where it was read."""
        source = f" Source: {self.source}" + (f" ({self.detail})" if self.detail else "") + "."
        if not self.dp:
            return ("The model was trained without differential privacy: nothing bounds what it reveals about the "
                    "patients it was trained on." + source)
        if self.epsilon is None:
            return "The model was trained with differential privacy (DP-SGD), but its \u03b5 is not recorded." + source
        if self.delta is None:
            return (f"The model was trained with differential privacy at \u03b5 = {self.epsilon:.2f}, \u03b4 = "
                    f"{DELTA_PER_SITE}." + source)
        return epsilon_in_plain_words(self.epsilon, self.delta, "the model") + source


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _from_bundle(model_file: Path, bundle: dict[str, Any]) -> TrainedPrivacy | None:
    record = bundle.get("privacy")
    if not isinstance(record, dict):
        return None
    if record.get("dp") is False:
        return TrainedPrivacy(False, None, None, str(model_file))
    epsilon, delta = _number(record.get("epsilon")), _number(record.get("delta"))
    return TrainedPrivacy(True, epsilon, delta, str(model_file)) if epsilon is not None else None


def _from_run_record(path: Path) -> TrainedPrivacy | None:
    """The weakest site guarantee of the run's privacy section; None when the file records none."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # an unreadable record states nothing; the settings still do
    per_site = ((document.get("privacy") or {}).get("per_site") if isinstance(document, dict) else None) or {}
    if not isinstance(per_site, dict) or not per_site:
        return None
    sites = {name: s for name, s in per_site.items() if isinstance(s, dict)}
    if sites and not any(s.get("dp") for s in sites.values()):
        return TrainedPrivacy(False, None, None, str(path))
    spent = {name: _number(s.get("epsilon_total", s.get("epsilon"))) for name, s in sites.items() if s.get("dp")}
    spent = {name: eps for name, eps in spent.items() if eps is not None}
    if not spent:
        return None
    weakest = max(spent, key=lambda name: spent[name])
    detail = f"the largest of {len(spent)} sites, {weakest}" if len(spent) > 1 else f"site {weakest}"
    return TrainedPrivacy(True, spent[weakest], _number(sites[weakest].get("delta")), str(path), detail)


def _from_settings(model_file: Path, settings: RunSettings) -> TrainedPrivacy:
    if not settings.dp:
        return TrainedPrivacy(False, None, None, f"the run settings in {model_file}")
    delta = settings.delta if settings.delta > 0 else None
    if settings.target_epsilon > 0:
        return TrainedPrivacy(True, settings.target_epsilon, delta, f"the run settings in {model_file}",
                              "the run's target; what each site spent is in the run's metrics.json")
    return TrainedPrivacy(True, None, delta, f"the run settings in {model_file}",
                          f"noise multiplier {settings.noise_multiplier:g}, clipping norm {settings.max_grad_norm:g}")


def trained_privacy(model_file: Path, bundle: dict[str, Any], settings: RunSettings) -> TrainedPrivacy:
    """The guarantee the model was trained under (see the module docstring for the order)."""
    found = _from_bundle(model_file, bundle)
    for name in RUN_RECORDS:
        if found is None and (model_file.parent / name).is_file():
            found = _from_run_record(model_file.parent / name)
    return found or _from_settings(model_file, settings)
