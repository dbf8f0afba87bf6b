"""Task registry: what each prediction task reads from a site and how its label is defined.

The label rules follow the studies spine-fl builds on (see ENGINEERING.md):
TFESI tasks call a patient *favourable* when the NRS pain score fell by at least 50%
from baseline to the 2-month follow-up (Kim & Chang 2024; Wang et al. 2023).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FeatureKind = Literal["numeric", "binary", "category"]


@dataclass(frozen=True)
class Feature:
    """One clinical input column, with the fixed reference scaling every site applies.

    A fixed (center, scale) taken from the clinical literature keeps sites' inputs on one scale
    without sharing any site's own statistics.
    """

    name: str
    kind: FeatureKind = "numeric"
    center: float = 0.0
    scale: float = 1.0
    low: float | None = None
    high: float | None = None
    categories: tuple[str, ...] = ()
    unit: str = ""


@dataclass(frozen=True)
class NrsResponseLabel:
    """Favourable = NRS reduced by >= 50% at 2 months; exactly 50% counts as favourable.

    A missing follow-up leaves the patient unlabelled (excluded, reported as a warning);
    a baseline of 0 makes the relative reduction undefined (reported as an error).
    """

    baseline: str = "nrs_baseline"
    followup: str = "nrs_2months"
    threshold: float = 0.5

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.baseline, self.followup)


@dataclass(frozen=True)
class BinaryColumnLabel:
    """The label is recorded directly in one column, as one of two spellings."""

    column: str
    positive: str = "1"
    negative: str = "0"

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)


LabelRule = NrsResponseLabel | BinaryColumnLabel


@dataclass(frozen=True)
class ImageInput:
    """The DICOM views a task needs per patient, and the physical field of view to crop."""

    views: tuple[str, ...]
    modalities: tuple[str, ...]
    field_of_view_mm: float


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    label: LabelRule
    features: tuple[Feature, ...] = ()
    image: ImageInput | None = None
    subgroups: tuple[str, ...] = ("age", "sex")

    @property
    def required_columns(self) -> tuple[str, ...]:
        cols = ["patient_id", *self.label.columns, *(f.name for f in self.features), *self.subgroups]
        return tuple(dict.fromkeys(cols))

    @property
    def n_features(self) -> int:
        return sum(len(f.categories) if f.kind == "category" else 1 for f in self.features)


SEX = Feature("sex", "category", categories=("F", "M"))
AGE = Feature("age", center=60.0, scale=15.0, low=18, high=110, unit="years")

RADIOGRAPH_VIEWS = ("AP", "LAT", "LOBL", "ROBL")
MRI_VIEWS = ("T2_AXIAL",)

TFESI_CLINICAL = (
    AGE,
    SEX,
    Feature("nrs_baseline", center=7.0, scale=1.5, low=0, high=10, unit="NRS 0-10"),
    Feature("symptom_duration_weeks", center=16.0, scale=12.0, low=0, high=1040, unit="weeks"),
)

# Residual back pain after kyphoplasty: the variables Zhang et al. 2025 (Pain Physician 28:E337)
# report; centres/scales are typical values of osteoporotic-fracture cohorts.
RBP_FEATURES = (
    AGE,
    SEX,
    Feature("bmi", center=23.0, scale=3.5, low=10, high=60, unit="kg/m2"),
    Feature("bmd_t_score", center=-3.0, scale=0.8, low=-8, high=3, unit="SD"),
    Feature("hu_value", center=70.0, scale=25.0, low=-100, high=400, unit="HU"),
    Feature("sarcopenia", "binary"),
    Feature("intravertebral_cleft", "binary"),
    Feature("posterior_fascia_oedema", "binary"),
    Feature("interspinous_ligament_degeneration", "binary"),
    Feature("cobb_angle", center=12.0, scale=8.0, low=-10, high=90, unit="degrees"),
    Feature("anterior_vertebral_height_ratio", center=0.75, scale=0.12, low=0, high=1.2, unit="ratio"),
    Feature("cement_volume_ml", center=4.5, scale=1.5, low=0, high=15, unit="ml"),
    Feature("cement_distribution", "category", categories=("diffuse", "lumpy")),
    Feature("fractured_vertebrae", center=1.3, scale=0.6, low=1, high=10, unit="count"),
)

# UCI vertebral column (Berthonnaud et al. 2005 measures); scales typical of adult spines.
VERTEBRAL_FEATURES = (
    Feature("pelvic_incidence", center=55.0, scale=15.0, unit="degrees"),
    Feature("pelvic_tilt", center=15.0, scale=10.0, unit="degrees"),
    Feature("lumbar_lordosis_angle", center=50.0, scale=17.0, unit="degrees"),
    Feature("sacral_slope", center=40.0, scale=12.0, unit="degrees"),
    Feature("pelvic_radius", center=118.0, scale=13.0, unit="mm"),
    Feature("degree_spondylolisthesis", center=10.0, scale=30.0, unit="mm"),
)

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "tfesi_radiograph",
            "Favourable response to lumbar TFESI from four radiograph views (Kim & Chang 2024)",
            NrsResponseLabel(),
            image=ImageInput(RADIOGRAPH_VIEWS, ("CR", "DX"), field_of_view_mm=80.0),
        ),
        Task(
            "tfesi_mri",
            "Favourable response to TFESI from one T2 axial MRI slice (Wang et al. 2023)",
            NrsResponseLabel(),
            image=ImageInput(MRI_VIEWS, ("MR",), field_of_view_mm=100.0),
        ),
        Task(
            "tfesi_fusion",
            "Favourable response to TFESI from the T2 axial slice plus clinical variables",
            NrsResponseLabel(),
            features=TFESI_CLINICAL,
            image=ImageInput(MRI_VIEWS, ("MR",), field_of_view_mm=100.0),
        ),
        Task(
            "rbp_tabular",
            "Residual back pain after kyphoplasty from clinical variables (Zhang et al. 2025)",
            BinaryColumnLabel("residual_pain"),
            features=RBP_FEATURES,
        ),
        Task(
            "vertebral_column",
            "Abnormal (disc hernia or spondylolisthesis) vs normal spine, UCI vertebral column data",
            BinaryColumnLabel("class", positive="AB", negative="NO"),
            features=VERTEBRAL_FEATURES,
            subgroups=(),
        ),
    )
}


class UnknownTaskError(ValueError):
    pass


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(
            f"unknown task {name!r}; choose one of: {', '.join(sorted(TASKS))}"
        ) from None
