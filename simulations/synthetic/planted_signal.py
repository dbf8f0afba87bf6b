"""Site folders with a planted signal: the ground truth that tells a real explanation from decoration.

Two kinds, both in the site data contract's format (clinical.csv with a `split` column; for images
a manifest and DICOM files written like any other synthetic site's), each with its own task:

* images (`planted_marker`, one DX view): every patient carries three identical bright squares.
  A patient is positive exactly when one of them lies in the decisive region (the image's top-left
  quadrant); the others always lie elsewhere. Brightness and count are the same for every patient,
  so only *where* a square is decides the label, and an explanation that merely finds bright
  things points at a decoy two times in three. Every square's box is returned (a positive
  patient's decisive one first), in the pixels of the image the model reads: the DICOM is written
  at that size over exactly the task's field of view, so the pipeline's crop and resize leave
  coordinates unchanged.
* table (`planted_table`): five numeric predictors on one scale, one binary and one category; the
  label is decided by one chosen numeric column (plus a little noise), the rest is noise.

Both are deterministic for a seed. Used by tests/test_explanations_planted.py.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from spine_fl.shared.contract.data_contract import CLINICAL_FILE, MANIFEST_FILE
from spine_fl.shared.contract.task_file import task_from_table
from spine_fl.shared.contract.tasks import Task
from spine_fl.simulations.synthetic.dicom import Scanner, stored_pixels, write_dicom

__all__ = ["Box", "MARKER_PX", "PlantedImages", "PlantedTable", "TABLE_COLUMNS", "planted_image_task",
           "planted_table_task", "write_planted_images", "write_planted_table"]

IMAGE_TASK, TABLE_TASK = "planted_marker", "planted_table"
VIEW = "AP"
MARKER_PX = 4  # side of every bright square, in model pixels
SQUARES = 3  # per patient: the decisive one (positives) or decoys only (negatives)
SPACING_MM = 1.0  # one model pixel per millimetre
SCANNER = Scanner("Planted", "DX", SPACING_MM, 1.0, 1.0, 0.02, window=(2040.0, 4000.0))
TABLE_COLUMNS = ("x1", "x2", "x3", "x4", "x5")  # numeric predictors, N(0, 1) after the task's scaling
LABEL_NOISE = 0.25  # SD of the noise added to the decisive column before thresholding at 0

Box = tuple[int, int, int, int]  # row0, col0, row1, col1 (ends exclusive), in model pixels


@dataclass(frozen=True)
class PlantedImages:
    site_dir: Path
    task: Task
    image_size: int
    squares: dict[str, list[Box]]  # every patient's squares; a positive patient's decisive one first
    positive: frozenset[str]

    def decisive(self, patient: str) -> Box:
        """The square that made `patient` positive (KeyError for a negative patient: it has none)."""
        if patient not in self.positive:
            raise KeyError(f"patient {patient} is negative: no square lies in the decisive region")
        return self.squares[patient][0]


@dataclass(frozen=True)
class PlantedTable:
    site_dir: Path
    task: Task
    decisive: str


def planted_image_task(size: int) -> Task:
    """Image-only task: one AP view over a `size` mm field of view, label column `marker`."""
    return task_from_table({
        "name": IMAGE_TASK, "title": "Planted marker (test data)",
        "description": "A bright square in the top-left quadrant decides the label (explanation tests)",
        "label": {"kind": "binary_column", "column": "marker"}, "subgroups": [],
        "image": {"views": [VIEW], "modalities": ["DX"], "field_of_view_mm": size * SPACING_MM},
        "model": {"name": "small_cnn"}}, f"{IMAGE_TASK} (simulations/synthetic/planted_signal.py)")


def planted_table_task() -> Task:
    """Table-only task: TABLE_COLUMNS plus a binary and a category predictor, label column `outcome`."""
    numeric = [{"name": c, "unit": "units", "center": 0.0, "scale": 1.0} for c in TABLE_COLUMNS]
    return task_from_table({
        "name": TABLE_TASK, "title": "Planted decisive column (test data)",
        "description": "One column decides the label (explanation tests)",
        "label": {"kind": "binary_column", "column": "outcome"}, "subgroups": [],
        "predictors": [*numeric, {"name": "flag", "kind": "binary"},
                       {"name": "colour", "kind": "category", "categories": ["red", "green", "blue"]}],
        "model": {"name": "mlp"}}, f"{TABLE_TASK} (simulations/synthetic/planted_signal.py)")


def _splits(rng: np.random.Generator, n: int, test_share: float) -> np.ndarray:
    n_test = int(round(n * test_share))
    return rng.permutation(np.array(["test"] * n_test + ["train"] * (n - n_test)))


def _place(rng: np.random.Generator, size: int, decisive: bool, taken: list[Box]) -> Box:
    """A square inside the top-left quadrant (decisive) or wholly outside it, not touching `taken`."""
    half, last = size // 2, size - MARKER_PX
    while True:
        if decisive:
            r, c = (int(v) for v in rng.integers(1, half - MARKER_PX, size=2))
        else:
            r, c = (int(v) for v in rng.integers(1, last, size=2))
            if r < half and c < half:  # any overlap with the quadrant is decisive: not a decoy
                continue
        box = (r, c, r + MARKER_PX, c + MARKER_PX)
        if all(r >= t[2] + 1 or t[0] >= box[2] + 1 or c >= t[3] + 1 or t[1] >= box[3] + 1 for t in taken):
            return box


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dim, smooth texture, so the squares are not the only structure in the image."""
    coarse = rng.uniform(0.15, 0.45, size=(size // 8 + 1, size // 8 + 1))
    smooth = np.kron(coarse, np.ones((8, 8)))[:size, :size]
    return np.clip(smooth + rng.normal(0.0, 0.03, (size, size)), 0.0, 1.0)


def _write_atomically(site_dir: Path, fill: Callable[[Path], None]) -> None:
    """`fill(tmp)` writes the folder's files into a temporary folder, renamed into place when done
    (as synthesize_site does): a folder that exists is complete."""
    site_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{site_dir.name}-", dir=site_dir.parent))
    try:
        fill(tmp)
        if site_dir.exists():
            shutil.rmtree(site_dir)
        os.replace(tmp, site_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_planted_images(site_dir: Path, n_patients: int = 320, seed: int = 0, size: int = 32,
                         test_share: float = 0.25) -> PlantedImages:
    """One site folder of `n_patients` (half positive), `size` px DICOM images; see the module docstring."""
    if size < 4 * MARKER_PX or size % 2:
        raise ValueError(f"image size {size}: needs an even size of at least {4 * MARKER_PX} px")
    rng = np.random.default_rng([seed, 314])
    positive = rng.permutation(np.arange(n_patients) % 2 == 0)
    split = _splits(rng, n_patients, test_share)
    ids = [f"PLM{i:04d}" for i in range(n_patients)]
    squares: dict[str, list[Box]] = {}

    def fill(tmp: Path) -> None:
        rows = []
        for i, pid in enumerate(ids):
            signal = _background(rng, size)
            taken: list[Box] = []
            for k in range(SQUARES):
                taken.append(_place(rng, size, bool(positive[i]) and k == 0, taken))
                r0, c0, r1, c1 = taken[-1]
                signal[r0:r1, c0:c1] = 0.95
            squares[pid] = taken
            rel = Path("dicom") / pid / f"{VIEW}.dcm"
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            write_dicom(tmp / rel, stored_pixels(signal, SCANNER, rng), SCANNER, site="planted", patient_id=pid,
                        view=VIEW, birth_date=dt.date(1960, 1, 1), study_date=dt.date(2024, 1, 1), sex="F",
                        seed_key=f"planted/{seed}/{pid}")
            rows.append({"patient_id": pid, "view": VIEW, "path": rel.as_posix()})
        pd.DataFrame(rows).to_csv(tmp / MANIFEST_FILE, index=False)
        pd.DataFrame({"patient_id": ids, "split": split, "marker": positive.astype(int)}).to_csv(
            tmp / CLINICAL_FILE, index=False)

    _write_atomically(Path(site_dir), fill)
    return PlantedImages(Path(site_dir), planted_image_task(size), size, squares,
                         frozenset(pid for pid, p in zip(ids, positive) if p))


def write_planted_table(site_dir: Path, decisive: str = "x2", n_patients: int = 400, seed: int = 0,
                        test_share: float = 0.25) -> PlantedTable:
    """One site folder whose label is `decisive` > 0 (with LABEL_NOISE); every other predictor is noise."""
    if decisive not in TABLE_COLUMNS:
        raise ValueError(f"decisive column {decisive!r}: choose one of {', '.join(TABLE_COLUMNS)}")
    rng = np.random.default_rng([seed, 2718])
    table = pd.DataFrame({c: rng.normal(0.0, 1.0, n_patients).round(3) for c in TABLE_COLUMNS})
    table["flag"] = (rng.random(n_patients) < 0.5).astype(int)
    table["colour"] = rng.choice(["red", "green", "blue"], size=n_patients)
    table["outcome"] = (table[decisive] + rng.normal(0.0, LABEL_NOISE, n_patients) > 0).astype(int)
    table.insert(0, "split", _splits(rng, n_patients, test_share))
    table.insert(0, "patient_id", [f"PLT{i:04d}" for i in range(n_patients)])
    _write_atomically(Path(site_dir), lambda tmp: table.to_csv(tmp / CLINICAL_FILE, index=False))
    return PlantedTable(Path(site_dir), planted_table_task(), decisive)
