"""The UCI vertebral column data (310 real patients, CC BY 4.0), as site folders.

Source: UCI Machine Learning Repository, "Vertebral Column", DOI 10.24432/C5K89B; donated by
G. de Alencar Barreto and A. Rego da Rocha Neto; data by Dr. Henrique da Mota (GARO, Lyon).
See data/vertebral_column/SOURCE.md. Attribution is required wherever results on it are shown.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spine_fl.shared.contract.data_contract import CLINICAL_FILE
from spine_fl.shared.contract.tasks import VERTEBRAL_FEATURES

DATA_FILE = Path(__file__).parent / "data" / "vertebral_column" / "column_2C.dat"
ATTRIBUTION = ("UCI Vertebral Column data (DOI 10.24432/C5K89B), G. de Alencar Barreto, "
               "A. Rego da Rocha Neto, H. da Mota (GARO, Lyon); CC BY 4.0")


def load_table() -> pd.DataFrame:
    names = [f.name for f in VERTEBRAL_FEATURES] + ["class"]
    table = pd.read_csv(DATA_FILE, sep=r"\s+", header=None, names=names)
    table.insert(0, "patient_id", [f"VC{i:04d}" for i in range(len(table))])
    return table


def write_sites(out_dir: Path, n_sites: int = 3, seed: int = 7, test_fraction: float = 0.3) -> list[Path]:
    """Patients shuffled into n sites of unequal size; each site splits train/test stratified."""
    rng = np.random.default_rng(seed)
    table = load_table().iloc[rng.permutation(310)].reset_index(drop=True)
    weights = np.linspace(1.4, 0.7, n_sites)
    bounds = np.round(np.cumsum(weights / weights.sum()) * len(table)).astype(int)
    dirs = []
    for i, (start, stop) in enumerate(zip([0, *bounds[:-1]], bounds)):
        site = table.iloc[start:stop].copy()
        split = np.full(len(site), "train", dtype=object)
        for label in ("AB", "NO"):
            idx = np.flatnonzero(site["class"].to_numpy() == label)
            split[idx[: int(round(len(idx) * test_fraction))]] = "test"
        site.insert(1, "split", split)
        site_dir = Path(out_dir) / f"vc_site{i + 1}"
        site_dir.mkdir(parents=True, exist_ok=True)
        site.to_csv(site_dir / CLINICAL_FILE, index=False)
        dirs.append(site_dir)
    return dirs
