"""`spine-fl synth`: a deterministic synthetic consortium in the site data contract's format.

Every patient has a latent foraminal-narrowing severity that the images show (through noise)
and that lowers the chance of a favourable TFESI response; clinical variables add a smaller,
independent part of the risk. The outcome is drawn from that risk, so no model can be perfect:
the coefficients below put the best achievable AUROC near the published 0.80-0.93.

Sites differ in size, prevalence, disease severity and scanner (modality, pixel spacing,
response curve, noise, MONOCHROME1 storage, rescale and window tags, compression).

The same patients also carry the stenosis-surgery columns (symptom duration, ZCQ at baseline and
26 weeks: stenosis_surgery.py), drawn from their own random stream and appended after the others,
so adding them changed no other column, image or manifest of any seed.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spine_fl.shared.contract.data_contract import CLINICAL_FILE, MANIFEST_FILE
from spine_fl.shared.contract.tasks import MRI_VIEWS, RADIOGRAPH_VIEWS
from spine_fl.simulations.synthetic.dicom import Scanner, stored_pixels, write_dicom
from spine_fl.simulations.synthetic.images import MRI_CANVAS_MM, RADIOGRAPH_CANVAS_MM, mri_t2_axial, radiograph_view
from spine_fl.simulations.synthetic.stenosis_surgery import stenosis_surgery_columns

IMAGE_SIGNAL = 2.6  # logit per SD of narrowing: the image-borne part of the TFESI outcome
VIEW_NOISE = 0.35  # SD of each view's own measurement error of the narrowing
CLINICAL_SIGNAL = 0.5  # logit per SD of the clinical risk score


@dataclass(frozen=True)
class SiteProfile:
    name: str
    n_patients: int
    tfesi_intercept: float  # sets favourable-response prevalence
    rbp_intercept: float  # sets residual-back-pain prevalence (Zhang 2025: 29/179)
    severity_shift: float
    radiograph: Scanner
    mri: Scanner
    lss_intercept: float = 0.0  # sets stenosis-surgery success prevalence (ZCQ criteria at 26 weeks)


PROFILES = (
    SiteProfile("leiden", 240, 0.35, -3.3, 0.0,
                Scanner("Philips", "DX", 0.80, 0.95, 1.0, 0.03),
                Scanner("Philips", "MR", 0.80, 0.90, 1.0, 0.03), 0.1),
    SiteProfile("seoul", 180, 0.75, -3.0, -0.25,
                Scanner("Samsung", "CR", 0.70, 0.85, 1.2, 0.05, photometric="MONOCHROME1",
                        rescale_slope=2.0, rescale_intercept=-100.0, window=(2100.0, 4200.0)),
                Scanner("Siemens", "MR", 0.70, 1.00, 0.8, 0.05, rescale_slope=1.5, compression="rle"), 0.4),
    SiteProfile("zurich", 130, -0.05, -3.6, 0.35,
                Scanner("Agfa", "CR", 0.90, 0.80, 0.9, 0.07, compression="rle"),
                Scanner("GE", "MR", 0.90, 0.85, 1.1, 0.06, window=(2000.0, 4000.0)), -0.3),
    SiteProfile("porto", 110, 0.2, -3.2, 0.15,
                Scanner("Fujifilm", "DX", 0.75, 0.90, 1.1, 0.04, spacing_tag=False),
                Scanner("Canon", "MR", 0.75, 0.95, 0.9, 0.04, photometric="MONOCHROME2"), 0.0),
)


def site_profiles(n_sites: int) -> list[SiteProfile]:
    """The first n profiles; beyond four, profiles repeat under new names with fewer patients."""
    if n_sites < 1:
        raise ValueError("the consortium needs at least one site (--sites >= 1)")
    out = []
    for i in range(n_sites):
        base = PROFILES[i % len(PROFILES)]
        if i < len(PROFILES):
            out.append(base)
        else:
            out.append(SiteProfile(f"{base.name}{i // len(PROFILES) + 1}", max(100, base.n_patients - 30 * (i // len(PROFILES))),
                                   base.tfesi_intercept, base.rbp_intercept, base.severity_shift, base.radiograph,
                                   base.mri, base.lss_intercept))
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _nrs_pair(rng: np.random.Generator, favourable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Baseline and 2-month NRS consistent with the outcome under the >= 50% reduction rule."""
    baseline = rng.integers(5, 11, size=favourable.size)
    reduction = np.where(favourable, rng.uniform(0.5, 1.0, favourable.size), rng.uniform(-0.2, 0.49, favourable.size))
    follow = np.where(favourable, np.floor(baseline * (1 - reduction)), np.ceil(baseline * (1 - reduction)))
    follow = np.clip(follow, 0, 10)
    # rounding can cross the threshold: nudge so the recorded scores give the drawn outcome
    achieved = (baseline - follow) / baseline >= 0.5
    follow = np.where(achieved & ~favourable, follow + 1, follow)
    return baseline, follow


def _clinical_table(profile: SiteProfile, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    n = profile.n_patients
    age = np.clip(rng.normal(63, 12, n), 25, 92).round()
    sex = np.where(rng.random(n) < 0.55, "F", "M")
    duration = np.clip(np.exp(rng.normal(np.log(12), 0.7, n)), 1, 520).round()
    narrowing = rng.normal(profile.severity_shift, 1.0, n)
    clinical_risk = -(np.log(duration / 12) / 0.7) * 0.8 - (age - 63) / 12 * 0.6
    logit = profile.tfesi_intercept - IMAGE_SIGNAL * narrowing + CLINICAL_SIGNAL * clinical_risk
    favourable = rng.random(n) < _sigmoid(logit)
    nrs_base, nrs_follow = _nrs_pair(rng, favourable)
    nrs_follow = np.where(rng.random(n) < 0.03, np.nan, nrs_follow)  # lost to follow-up

    # Kyphoplasty cohort variables (Zhang et al. 2025): osteoporotic, older, mostly women.
    kypho_age = np.clip(rng.normal(72, 8, n), 50, 95).round()
    t_score = np.clip(rng.normal(-3.1, 0.7, n), -6, 0).round(1)
    hu = np.clip(rng.normal(68 + 12 * (t_score + 3.1), 18, n), 10, 200).round()
    sarcopenia = (rng.random(n) < 0.35).astype(int)
    cleft = (rng.random(n) < 0.2).astype(int)
    fascia = (rng.random(n) < 0.3).astype(int)
    ligament = (rng.random(n) < 0.25).astype(int)
    cobb = np.clip(rng.normal(12, 7, n), 0, 45).round(1)
    avh = np.clip(rng.normal(0.72, 0.12, n), 0.3, 1.0).round(2)
    cement = np.clip(rng.normal(4.5, 1.3, n), 1.5, 9).round(1)
    lumpy = rng.random(n) < 0.35
    rbp_logit = (profile.rbp_intercept + 1.3 * fascia + 1.1 * ligament + 0.9 * sarcopenia + 0.7 * cleft
                 + 0.9 * lumpy - 0.6 * (t_score + 3.1) / 0.7 + 0.4 * (cobb - 12) / 7 + rng.normal(0, 0.3, n))
    residual_pain = (rng.random(n) < _sigmoid(rbp_logit)).astype(int)

    split = rng.choice(["train", "test", "external"], size=n, p=[0.6, 0.3, 0.1])
    table = pd.DataFrame({
        "patient_id": [f"{profile.name[:3].upper()}{i:04d}" for i in range(n)],
        "split": split,
        "age": age.astype(int), "sex": sex,
        "nrs_baseline": nrs_base.astype(int), "nrs_2months": nrs_follow,
        "symptom_duration_weeks": duration.astype(int),
        "residual_pain": residual_pain, "kyphoplasty_age": kypho_age.astype(int),
        "bmi": np.clip(rng.normal(23, 3.2, n), 15, 40).round(1),
        "bmd_t_score": t_score, "hu_value": hu, "sarcopenia": sarcopenia,
        "intravertebral_cleft": cleft, "posterior_fascia_oedema": fascia,
        "interspinous_ligament_degeneration": ligament, "cobb_angle": cobb,
        "anterior_vertebral_height_ratio": avh, "cement_volume_ml": cement,
        "cement_distribution": np.where(lumpy, "lumpy", "diffuse"),
        "fractured_vertebrae": rng.choice([1, 2, 3], size=n, p=[0.78, 0.17, 0.05]),
    })
    return table, narrowing


def _write_images(site_dir: Path, profile: SiteProfile, table: pd.DataFrame, narrowing: np.ndarray,
                  rng: np.random.Generator, modalities: tuple[str, ...]) -> pd.DataFrame:
    rows = []
    study_day0 = dt.date(2023, 1, 9)
    for i, pid in enumerate(table["patient_id"]):
        scale = rng.normal(1.0, 0.04)
        shift = (rng.normal(0, 1.5), rng.normal(0, 1.5))
        birth = dt.date(2023 - int(table.at[i, "age"]), 1 + i % 12, 1 + i % 28)
        study = study_day0 + dt.timedelta(days=int(rng.integers(0, 700)))
        plans = []
        if "radiograph" in modalities:
            plans += [(v, profile.radiograph, RADIOGRAPH_CANVAS_MM) for v in RADIOGRAPH_VIEWS]
        if "mri" in modalities:
            plans += [(v, profile.mri, MRI_CANVAS_MM) for v in MRI_VIEWS]
        for view, scanner, canvas_mm in plans:
            seen = narrowing[i] + rng.normal(0, VIEW_NOISE)
            size = int(round(canvas_mm / scanner.spacing_mm))
            if view == "T2_AXIAL":
                signal = mri_t2_axial(seen, scale, shift, size, scanner.spacing_mm)
            else:
                signal = radiograph_view(view, seen, scale, shift, size, scanner.spacing_mm)
            rel = Path("dicom") / pid / f"{view}.dcm"
            (site_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            write_dicom(site_dir / rel, stored_pixels(signal, scanner, rng), scanner, site=profile.name,
                        patient_id=pid, view=view, birth_date=birth, study_date=study,
                        sex=str(table.at[i, "sex"]), seed_key=f"{profile.name}/{pid}/{view}")
            rows.append({"patient_id": pid, "view": view, "path": rel.as_posix()})
    return pd.DataFrame(rows, columns=["patient_id", "view", "path"])


def _name_key(name: str) -> int:
    """The site's own random stream: the sum of its name's character codes (the first profiles' data
    depend on it), plus a term for a repeated profile's number, whose digits alone would collide
    (leiden11 and leiden20 have the same sum: identical folders)."""
    digits = "".join(ch for ch in name if ch.isdigit())
    return sum(map(ord, name)) + 7919 * int(digits or 0)


def synthesize_site(site_dir: Path, profile: SiteProfile, seed: int, modalities: tuple[str, ...]) -> None:
    """Write one site atomically: built in a temporary folder, then renamed into place."""
    rng = np.random.default_rng([seed, _name_key(profile.name)])
    site_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{profile.name}-", dir=site_dir.parent))
    try:
        table, narrowing = _clinical_table(profile, rng)
        stenosis_rng = np.random.default_rng([seed, _name_key(profile.name), 26])  # its own stream
        table = table.join(stenosis_surgery_columns(stenosis_rng, narrowing, table["age"].to_numpy(float),
                                                    table["bmi"].to_numpy(float), profile.lss_intercept))
        table.to_csv(tmp / CLINICAL_FILE, index=False)
        if modalities:
            _write_images(tmp, profile, table, narrowing, rng, modalities).to_csv(tmp / MANIFEST_FILE, index=False)
        if site_dir.exists():
            shutil.rmtree(site_dir)
        os.replace(tmp, site_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def synthesize_consortium(out_dir: Path, n_sites: int = 3, seed: int = 7,
                          modalities: tuple[str, ...] = ("radiograph", "mri")) -> list[Path]:
    """N site folders under out_dir, identical for the same seed."""
    dirs = []
    for profile in site_profiles(n_sites):
        site_dir = Path(out_dir) / profile.name
        synthesize_site(site_dir, profile, seed, modalities)
        dirs.append(site_dir)
    return dirs
