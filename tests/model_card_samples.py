"""A run folder as `spine-fl simulate` leaves it, built in a second from predictions of known properties:
the federated model is well calibrated and ranks the over-65s worst (the largest subgroup gap); and
held-out patients with models whose reliance is planted (for the importance section)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.special import expit

from spine_fl.server.reporting.model_card import save_predictions
from spine_fl.server.reporting.run_result import RunResult, write_run_result
from spine_fl.shared.contract.data_contract import SiteData
from spine_fl.shared.contract.tasks import Task, get_task
from spine_fl.shared.training.evaluation import Scores

SITES = {"leiden": 160, "seoul": 130, "zurich": 100}  # held-out patients per site


def sample_sites(seed: int = 3) -> tuple[dict[str, SiteData], dict[str, np.ndarray]]:
    """Held-out patients per site and each one's true risk (as a logit)."""
    rng = np.random.default_rng(seed)
    sites, risk = {}, {}
    for name, n in SITES.items():
        age = np.clip(rng.normal(63, 12, n), 25, 92).round()
        z = rng.normal(0, 2.5, n)
        y = (rng.random(n) < expit(z)).astype(np.float32)
        sites[name] = SiteData(np.array([f"{name}-{i:03d}" for i in range(n)]), np.full(n, "test"), y,
                               np.zeros((n, 0), np.float32), None,
                               pd.DataFrame({"age": age, "sex": np.where(rng.random(n) < 0.55, "F", "M")}))
        risk[name] = z
    return sites, risk


def sample_scores(sites: dict[str, SiteData], risk: dict[str, np.ndarray], seed: int = 4) -> dict[str, Scores]:
    """Federated: the true risk, blurred (much more for patients aged 65 or more); baselines blurred more."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {"federated": {}, "pooled": {}, "local_only": {}}
    for name, data in sites.items():
        z = risk[name]
        old = data.subgroups["age"].to_numpy() >= 65
        out["federated"][name] = (data.y, expit(z + rng.normal(0, np.where(old, 3.0, 0.3))))
        out["pooled"][name] = (data.y, expit(z + rng.normal(0, 0.6, len(z))))
        out["local_only"][name] = (data.y, expit(0.6 * z + rng.normal(0, 1.5, len(z))))
    return {model: Scores(per_site) for model, per_site in out.items()}


def sample_run(run_dir: Path, with_predictions: bool = True) -> Path:
    """metrics.json (the shape the runner writes) and, optionally, predictions.csv."""
    sites, risk = sample_sites()
    scores = sample_scores(sites, risk)
    run_dir.mkdir(parents=True, exist_ok=True)
    privacy_site = {"epsilon": 4.7, "epsilon_lifetime": 9.1, "delta": 7e-4, "noise_multiplier": 1.0,
                    "max_grad_norm": 1.0, "sample_rate": 0.2, "steps": 50, "accountant": "rdp", "dp": True,
                    "secagg": True, "trained": True}
    summaries = {model: {**s.summary(), **({"external": None} if model != "local_only" else {})}
                 for model, s in scores.items()}
    write_run_result(run_dir, RunResult(
        engine="simulation", task="tfesi_radiograph", scenario="sample", sites=list(SITES),
        patients={s: {"train": 2 * n, "test": n, "external": n // 3} for s, n in SITES.items()},
        **summaries,
        status="completed", stop_reason=None, rounds=[{"round": r} for r in (1, 2, 3)],
        privacy={"per_site": {s: privacy_site for s in SITES}, "refusals": [],
                 "secagg": {"enabled": True, "clipping_range": 8.0, "max_weight": 1000.0}},
        config={"run": {"task": "tfesi_radiograph", "strategy": "fedavg", "rounds": 3, "dp": True,
                        "noise-multiplier": 1.0, "max-grad-norm": 1.0, "accountant": "rdp", "secagg": True},
                "consortium": {"source": "synthetic", "sites": 3, "seed": 7}},
        timing={}))
    if with_predictions:
        save_predictions(run_dir, scores, sites)
    return run_dir


# -- importances: models whose reliance is known ----------------------------------------------

PLANTED_TASK = "rbp_tabular"  # numeric, binary and category (sex: two one-hot inputs) predictors
DECISIVE, SECOND = "bmd_t_score", "hu_value"  # the label is decided by the first, the second helps a little


class FeatureLogit(torch.nn.Module):
    """A fixed linear model on the predictors' inputs: logit = features @ weights (images unread)."""

    def __init__(self, weights: np.ndarray):
        super().__init__()
        self.weights = torch.nn.Parameter(torch.as_tensor(weights, dtype=torch.float32))

    def forward(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weights


class RegionLogit(torch.nn.Module):
    """A fixed image model: the logit is the mean brightness of one square of one view, minus 0.5."""

    def __init__(self, view: int, rows: slice, cols: slice):
        super().__init__()
        self.view, self.rows, self.cols = view, rows, cols
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.scale * images[:, self.view, self.rows, self.cols].mean(dim=(1, 2)) - 0.5


def planted_tabular(seed: int = 5, per_site: int = 120) -> tuple[Task, dict[str, SiteData], torch.nn.Module]:
    """Held-out patients of the kyphoplasty task at three sites whose outcome is decided by DECISIVE
    (with a little help from SECOND), and a model that reads exactly that."""
    task = get_task(PLANTED_TASK)
    rng = np.random.default_rng(seed)
    width = [len(f.categories) if f.kind == "category" else 1 for f in task.features]
    start = {f.name: int(np.sum(width[:i])) for i, f in enumerate(task.features)}
    weights = np.zeros(sum(width), np.float32)
    weights[start[DECISIVE]], weights[start[SECOND]] = 4.0, 1.0
    sites = {}
    for s, name in enumerate(("north", "south", "east")):
        columns = []
        for feature in task.features:
            if feature.kind == "category":
                columns.append(np.eye(len(feature.categories))[rng.integers(0, len(feature.categories), per_site)])
            elif feature.kind == "binary":
                columns.append(rng.integers(0, 2, (per_site, 1)))
            else:
                columns.append(rng.normal(0, 1, (per_site, 1)))
        features = np.concatenate(columns, axis=1).astype(np.float32)
        y = (features @ weights + rng.normal(0, 0.3, per_site) > 0).astype(np.float32)
        sites[name] = SiteData(np.array([f"{name}-{i}" for i in range(per_site)]), np.full(per_site, "test"), y,
                               features, None, pd.DataFrame({"age": np.full(per_site, 60.0),
                                                             "sex": np.full(per_site, "F")}))
    return task, sites, FeatureLogit(weights)


def planted_images(n: int = 12, size: int = 32, seed: int = 6) -> tuple[np.ndarray, RegionLogit]:
    """Two-view images of random brightness and a model that reads one square of the second view."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.2, 1.0, (n, 2, size, size)).astype(np.float32)
    return images, RegionLogit(1, slice(8, 16), slice(20, 28))
