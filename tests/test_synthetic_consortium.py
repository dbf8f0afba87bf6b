"""The synthetic consortium: deterministic, realistic tags, real heterogeneity between sites."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pydicom
from pydicom.uid import RLELossless
from typer.testing import CliRunner

from spine_fl.cli import app
from spine_fl.shared.contract.data_contract import validate_and_load
from spine_fl.shared.contract.tasks import get_task


def _digest(site: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(site.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(site).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    runner = CliRunner()
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        result = runner.invoke(app, ["synth", "--out", str(tmp_path / name), "--sites", "1", "--seed", str(seed),
                                     "--modality", "mri"])
        assert result.exit_code == 0, result.output
    assert _digest(tmp_path / "a" / "leiden") == _digest(tmp_path / "b" / "leiden")
    assert _digest(tmp_path / "a" / "leiden") != _digest(tmp_path / "c" / "leiden")


def test_dicom_tags_are_realistic_and_differ_by_scanner(consortium: list[Path]) -> None:
    seen = {}
    for site in consortium:
        manifest = pd.read_csv(site / "manifest.csv")
        ap = pydicom.dcmread(site / manifest[manifest.view == "AP"].iloc[0].path)
        mr = pydicom.dcmread(site / manifest[manifest.view == "T2_AXIAL"].iloc[0].path)
        assert ap.Modality in ("CR", "DX") and ap.ViewPosition == "AP" and ap.BodyPartExamined == "LSPINE"
        assert mr.Modality == "MR" and float(mr.PixelSpacing[0]) > 0
        assert float(ap.ImagerPixelSpacing[0]) > 0
        assert ap.PatientID == manifest.iloc[0].patient_id and str(ap.PatientName).startswith("SYNTH^")
        seen[site.name] = (ap.PhotometricInterpretation, ap.file_meta.TransferSyntaxUID, "RescaleSlope" in ap,
                           "WindowCenter" in ap, float(ap.ImagerPixelSpacing[0]))
    assert seen["seoul"][0] == "MONOCHROME1" and seen["seoul"][2] and seen["seoul"][3]
    assert seen["leiden"][0] == "MONOCHROME2"
    assert seen["zurich"][1] == RLELossless
    assert len({v[4] for v in seen.values()}) == 3  # three pixel spacings


def test_sites_differ_in_size_and_prevalence_like_the_cohorts(consortium: list[Path]) -> None:
    sizes, tfesi_prev = [], []
    for site in consortium:
        data, report = validate_and_load(site, get_task("rbp_tabular"))
        assert report.usable
        sizes.append(len(data))
        assert 0.08 <= data.y.mean() <= 0.30  # Zhang 2025: 29 of 179 (16%)
        assert set(data.split) == {"train", "test", "external"}
        tfesi = pd.read_csv(site / "clinical.csv")
        fav = ((tfesi.nrs_baseline - tfesi.nrs_2months) / tfesi.nrs_baseline >= 0.5)[tfesi.nrs_2months.notna()]
        tfesi_prev.append(fav.mean())
        assert 50 <= tfesi.age.mean() <= 75 and set(tfesi.sex) == {"F", "M"}
    assert all(100 <= n <= 300 for n in sizes) and len(set(sizes)) == 3
    assert max(tfesi_prev) - min(tfesi_prev) > 0.1


def test_monochrome1_site_looks_like_the_others_after_the_pipeline(consortium: list[Path]) -> None:
    """Stored inverted with rescale/window tags, the images come out with the same polarity."""
    means = {}
    for site in consortium:
        data, _ = validate_and_load(site, get_task("tfesi_radiograph"), 32)
        centre = data.images[:, 0, 12:20, 12:20].mean()  # vertebral body: bright on every site
        edge = data.images[:, 0, :, :3].mean()  # soft tissue at the border: dark
        means[site.name] = centre - edge
    assert all(v > 0.2 for v in means.values()), means
