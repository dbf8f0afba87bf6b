"""Explanations are not decoration: on data whose deciding signal is planted, they point at it.

Data: simulations/synthetic/planted_signal.py. Images: three identical bright squares per patient;
a patient is positive exactly when one lies in the image's top-left quadrant. Table: one numeric
column decides the label, the others are noise. Models are trained with the project's own
`train` (no DP: the test is about the explanations) and explained with the code `spine-fl
predict` runs (shared/models/explain.py), once directly on the held-out split and once
end to end through `predict_site` on another site's folder.

Each check can fail, and the contrasts show it would: the model must first rank held-out patients
well (AUROC), an untrained network of the same architecture explained by the same code must point
at the marker clearly less often (Adebayo et al. 2018's model-randomisation check), the trained
model must rarely point at a decoy square that is just as bright, and moving the decisive column
moves the top-ranked column with it. Budget: well under a minute on two CPU cores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from spine_fl.shared.models.explain import feature_contributions, integrated_gradients, saliency_peak
from spine_fl.client.prediction.predict import predict_site
from spine_fl.shared.config import RunSettings
from spine_fl.shared.contract.data_contract import SiteData, load_site
from spine_fl.shared.contract.task_file import canonical_json
from spine_fl.shared.models.model_file import save_model
from spine_fl.shared.models.registry import build_model
from spine_fl.shared.training.local import TrainSettings, get_weights, predict, train
from spine_fl.simulations.synthetic.planted_signal import (
    TABLE_COLUMNS,
    Box,
    PlantedImages,
    write_planted_images,
    write_planted_table,
)

CPU = torch.device("cpu")
IMAGE_PX = 32
POINTING_GAME = 0.8  # the bar: the saliency peak on the marker for >= 80% of patients
TOLERANCE_PX = 1  # a peak on the marker's edge counts (the pointing game's usual tolerance, scaled to 32 px)
CLEARLY_LOWER = 0.3  # how far below the trained model the contrasts must fall
MIN_AUROC = 0.9
IMAGE_TRAINING = TrainSettings(epochs=6, batch_size=32, learning_rate=3e-3, optimizer="adam")
TABLE_TRAINING = TrainSettings(epochs=20, batch_size=32, learning_rate=1e-2, optimizer="adam")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors on shared cores: one intra-op thread, or spinning threads cost ten times the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class TrainedOnMarker:
    planted: PlantedImages
    held_out: SiteData
    model: nn.Module


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> TrainedOnMarker:
    planted = write_planted_images(tmp_path_factory.mktemp("planted") / "hospital", n_patients=240, seed=0,
                                   size=IMAGE_PX)
    data = load_site(planted.site_dir, planted.task, planted.image_size)
    model = build_model(planted.task, seed=0)
    train(model, data.subset("train"), IMAGE_TRAINING, CPU)
    return TrainedOnMarker(planted, data.subset("test"), model.eval())


def _inside(peak: tuple[int, int], box: Box) -> bool:
    (row, col), (r0, c0, r1, c1) = peak, box
    return r0 - TOLERANCE_PX <= row < r1 + TOLERANCE_PX and c0 - TOLERANCE_PX <= col < c1 + TOLERANCE_PX


def _peaks(model: nn.Module, data: SiteData, patients: list[str]) -> list[tuple[int, int]]:
    """Where the explanation of each patient's (only) view points, as `spine-fl predict` reports it."""
    rows = [list(data.patient_ids).index(p) for p in patients]
    attributions = integrated_gradients(model, data.images[rows], data.features[rows], CPU)
    return [saliency_peak(a.images[0]) for a in attributions]


def _pointing_game(peaks: list[tuple[int, int]], boxes: list[Box]) -> float:
    return float(np.mean([_inside(peak, box) for peak, box in zip(peaks, boxes)]))


def test_the_marker_is_where_the_model_reads_it(marker: TrainedOnMarker) -> None:
    """The ground truth survives DICOM writing, decoding, cropping and resizing, and only location decides."""
    planted, data = marker.planted, marker.held_out
    assert data.images.shape[1:] == (1, IMAGE_PX, IMAGE_PX) and 20 <= data.y.sum() <= len(data.y) - 20
    for pid, image, y in zip(data.patient_ids, data.images[:, 0], data.y):
        squares = planted.squares[pid]
        assert len(squares) == 3 and all(image[r0:r1, c0:c1].mean() > 0.8 for r0, c0, r1, c1 in squares)
        in_quadrant = [r1 <= IMAGE_PX // 2 and c1 <= IMAGE_PX // 2 for r0, c0, r1, c1 in squares]
        assert sum(in_quadrant) == int(y) and (pid in planted.positive) == bool(y)
        background = np.ones_like(image, dtype=bool)
        for r0, c0, r1, c1 in squares:
            background[r0:r1, c0:c1] = False
        assert image[background].max() < 0.8  # no other structure is as bright as a square
    # the marker moves within its region, so a peak at one fixed spot could not win the pointing game
    assert len({planted.decisive(p)[:2] for p in planted.positive}) >= 30


def test_image_saliency_peaks_on_the_planted_marker(marker: TrainedOnMarker) -> None:
    planted, data = marker.planted, marker.held_out
    auroc = roc_auc_score(data.y, predict(marker.model, data, CPU))
    assert auroc >= MIN_AUROC, f"the model did not learn the marker (held-out AUROC {auroc:.2f}): nothing to explain"
    positives = [p for p in data.patient_ids if p in planted.positive]
    peaks = _peaks(marker.model, data, positives)
    on_marker = _pointing_game(peaks, [planted.decisive(p) for p in positives])
    assert on_marker >= POINTING_GAME, f"saliency peak on the marker for {on_marker:.0%} of {len(positives)} patients"
    # contrast 1: a decoy is just as bright and as large; a peak that only found bright squares would hit it often
    on_decoy = _pointing_game(peaks, [planted.squares[p][1] for p in positives])
    assert on_decoy <= on_marker - CLEARLY_LOWER and on_decoy <= 0.2, f"peak on a decoy for {on_decoy:.0%}"
    # contrast 2: the same network untrained, explained by the same code, does not point at the marker
    untrained = build_model(planted.task, seed=0).eval()
    by_chance = _pointing_game(_peaks(untrained, data, positives), [planted.decisive(p) for p in positives])
    assert by_chance <= on_marker - CLEARLY_LOWER, (
        f"an untrained model points at the marker for {by_chance:.0%}, the trained one for {on_marker:.0%}")


def test_spine_fl_predict_points_at_the_marker_at_another_site(marker: TrainedOnMarker, tmp_path: Path) -> None:
    """End to end: the model file a run writes, another hospital's folder, and the peaks the command reports."""
    other = write_planted_images(tmp_path / "other_hospital", n_patients=16, seed=1, size=IMAGE_PX)
    task = marker.planted.task
    settings = RunSettings(task=task.name, task_definition=canonical_json(task), image_size=IMAGE_PX, dp=False)
    save_model(tmp_path / "run" / "model.pt", settings, get_weights(marker.model))
    predict_site(tmp_path / "run", other.site_dir, tmp_path / "out", explain=16, device=CPU)
    scored = pd.read_csv(tmp_path / "out" / "predictions.csv", dtype={"patient_id": str})
    truth = scored.patient_id.isin(other.positive).astype(int)
    assert roc_auc_score(truth, scored.probability) >= MIN_AUROC
    explained = json.loads((tmp_path / "out" / "explanations.json").read_text())["patients"]
    positives = [e for e in explained if e["patient_id"] in other.positive]
    assert len(positives) >= 5 and len(explained) == 16
    hits = [_inside(tuple(e["views"][0]["peak_row_col"]), other.decisive(e["patient_id"])) for e in positives]
    assert np.mean(hits) >= POINTING_GAME, f"reported peaks on the marker: {hits}"
    assert (tmp_path / "out" / "index.html").is_file()


def _mean_contributions(tmp: Path, decisive: str) -> tuple[float, dict[str, float], float]:
    """Held-out AUROC, each predictor's mean |contribution|, and how often the decisive column ranks first."""
    planted = write_planted_table(tmp / f"table_{decisive}", decisive=decisive, n_patients=400, seed=0)
    data = load_site(planted.site_dir, planted.task)
    model = build_model(planted.task, seed=0)
    train(model, data.subset("train"), TABLE_TRAINING, CPU)
    held_out = data.subset("test")
    auroc = roc_auc_score(held_out.y, predict(model, held_out, CPU))
    totals: dict[str, float] = {}
    first = []
    for x, attribution in zip(held_out.features, integrated_gradients(model.eval(), None, held_out.features, CPU)):
        contributions = feature_contributions(planted.task, x, attribution.features)
        first.append(contributions[0].feature == decisive)
        for c in contributions:
            totals[c.feature] = totals.get(c.feature, 0.0) + abs(c.contribution) / len(held_out.y)
    return auroc, totals, float(np.mean(first))


@pytest.mark.parametrize("decisive", ["x2", "x4"])
def test_the_decisive_column_ranks_first(decisive: str, tmp_path: Path) -> None:
    """Two sites whose labels hang on different columns: the ranking follows the signal, not a column's place."""
    auroc, mean_abs, share_first = _mean_contributions(tmp_path, decisive)
    assert auroc >= MIN_AUROC, f"the model did not learn {decisive} (held-out AUROC {auroc:.2f})"
    ranking = sorted(mean_abs, key=lambda name: -mean_abs[name])
    assert len(ranking) == len(TABLE_COLUMNS) + 2  # every predictor, the category's one-hot inputs summed
    assert ranking[0] == decisive, f"mean |contribution|: {mean_abs}"
    assert mean_abs[decisive] >= 3 * mean_abs[ranking[1]], f"the decisive column barely leads: {mean_abs}"
    # per patient too, except near the boundary (decisive value close to its reference, 0), where noise may lead
    assert share_first >= 0.7, f"{decisive} ranks first for only {share_first:.0%} of held-out patients"

