"""What a task is: the typed pieces one task file (configs/tasks/<name>.toml) declares.

Each piece checks itself (`problems`) so a task file gets the same messages as every other TOML
file spine-fl reads: the key, the value, what is wrong and what to write instead.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from spine_fl.shared.typed_table import choice, problem, raise_problems

FEATURE_KINDS = ("numeric", "binary", "category")
CONDITION_OPS = (">=", ">", "<=", "<", "==", "!=")
SUBGROUPS = ("age", "sex")  # the subgroup metrics the model card computes (age bands, sex)
# The names shared/models/registry.py builds, and its aliases (test_task_files keeps them in step;
# the registry imports this module, so it cannot be asked here).
MODEL_NAMES = ("small_cnn", "logistic", "mlp", "densenet121", "resnet18", "resnet34", "fusion", "outcome_model")


@dataclass(frozen=True)
class Feature:
    """One clinical input column, with the fixed reference scaling every site applies.

    A fixed (center, scale) taken from the clinical literature keeps sites' inputs on one scale
    without sharing any site's own statistics.
    """

    name: str
    kind: str = "numeric"
    center: float = 0.0
    scale: float = 1.0
    low: float | None = None
    high: float | None = None
    categories: tuple[str, ...] = ()
    unit: str = ""

    def __post_init__(self) -> None:
        raise_problems(self.problems())

    def problems(self) -> list[str]:
        out = choice("kind", self.kind, FEATURE_KINDS, "predictor kind")
        if self.kind == "numeric" and not (math.isfinite(self.scale) and self.scale > 0):
            out.append(problem("scale", self.scale, "must be above 0 (inputs are divided by it)",
                               "set scale to a typical spread of the variable, e.g. its standard deviation"))
        if (self.low is None) != (self.high is None):
            out.append(problem("low" if self.low is not None else "high", self.low if self.low is not None else self.high,
                               "a plausible range needs both ends", "set both low and high, or neither"))
        elif self.low is not None and self.high is not None and not self.low < self.high:
            out.append(problem("high", self.high, f"must be above low = {self.low:g}", "check the range"))
        if self.kind == "category" and len(set(self.categories)) < 2:
            out.append(problem("categories", list(self.categories), "a category predictor needs two or more "
                               "distinct values", 'list the values the column holds, e.g. ["F", "M"]'))
        return out


@dataclass(frozen=True)
class BinaryColumnLabel:
    """The label is recorded directly in one column, as one of two spellings."""

    column: str
    positive: str = "1"
    negative: str = "0"

    def __post_init__(self) -> None:
        if self.positive == self.negative:
            raise_problems([problem("negative", self.negative, "the same as positive",
                                    "give the two values the outcome column holds, e.g. positive = \"1\", "
                                    "negative = \"0\"")])

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)


@dataclass(frozen=True)
class RelativeReductionLabel:
    """Positive when a score fell by at least `threshold` of its baseline (exactly it counts).

    A missing follow-up leaves the patient unlabelled (excluded, reported as a warning); a baseline
    of 0 makes the relative reduction undefined (reported as an error). `score`, `score_meaning`
    and `followup_name` only word the messages a site reads.
    """

    baseline: str
    followup: str
    threshold: float = 0.5
    low: float = 0.0
    high: float = 10.0
    score: str = "score"  # e.g. "NRS"
    score_meaning: str = "score"  # e.g. "pain score"
    followup_name: str = "follow-up"  # e.g. "2-month follow-up"

    def __post_init__(self) -> None:
        out = []
        if not 0 < self.threshold <= 1:
            out.append(problem("threshold", self.threshold, "must be above 0 and at most 1 (a fraction of baseline)",
                               "write 0.5 for a reduction of at least 50%"))
        if not 0 <= self.low < self.high:
            out.append(problem("high", self.high, f"the score range [{self.low:g}, {self.high:g}] must start at 0 or "
                               "above and end above its start", "write the scale's range, e.g. low = 0, high = 10"))
        if self.baseline == self.followup:
            out.append(problem("followup", self.followup, "the same column as baseline",
                               "name the follow-up score's own column"))
        raise_problems(out)

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.baseline, self.followup)


@dataclass(frozen=True)
class Condition:
    """One numeric test on one column, or on its improvement from a baseline column.

    With `baseline` set, the condition tests the reduction `baseline - column` (a score that fell
    from baseline to follow-up, e.g. ZCQ symptom severity improved by >= 0.5 points at 26 weeks), so
    sites export the raw scores and nobody precomputes a difference. Naming the baseline also says
    which column is known before treatment (it may be a predictor; the follow-up may not). The
    difference is rounded to 9 decimals: scores written as decimals (3.3 - 2.8) meet 0.5 exactly.
    """

    column: str
    op: str
    value: float
    baseline: str | None = None

    def __post_init__(self) -> None:
        if self.op[::-1] in CONDITION_OPS and self.op not in CONDITION_OPS:  # "=>" for ">="
            raise_problems([problem("op", self.op, "unknown comparison", f"did you mean {self.op[::-1]}? "
                                    f"choose one of {', '.join(CONDITION_OPS)}")])
        raise_problems(choice("op", self.op, CONDITION_OPS, "comparison"))
        if self.baseline == self.column:
            raise_problems([problem("baseline", self.baseline, "the same column as column",
                                    "name the baseline score's own column (the condition tests baseline - column)")])

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,) if self.baseline is None else (self.baseline, self.column)

    def measured(self, values: dict[str, float]) -> float:
        """What the condition tests, from the row's values by column."""
        if self.baseline is None:
            return values[self.column]
        return round(values[self.baseline] - values[self.column], 9)

    def holds(self, x: float) -> bool:
        return {">=": x >= self.value, ">": x > self.value, "<=": x <= self.value, "<": x < self.value,
                "==": x == self.value, "!=": x != self.value}[self.op]

    def __str__(self) -> str:
        tested = self.column if self.baseline is None else f"{self.baseline} - {self.column}"
        return f"{tested} {self.op} {self.value:g}"


@dataclass(frozen=True)
class AllOfLabel:
    """Positive when every condition holds; a patient missing any of the columns is unlabelled."""

    conditions: tuple[Condition, ...]

    def __post_init__(self) -> None:
        if not self.conditions:
            raise_problems([problem("conditions", [], "an all_of label needs at least one condition",
                                    'add e.g. {column = "score_change", op = ">=", value = 0.5}')])

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(col for c in self.conditions for col in c.columns))

    @property
    def baselines(self) -> tuple[str, ...]:
        """Columns only ever read as a condition's baseline: known before treatment."""
        tested = {c.column for c in self.conditions}
        return tuple(dict.fromkeys(c.baseline for c in self.conditions if c.baseline and c.baseline not in tested))


LabelRule = BinaryColumnLabel | RelativeReductionLabel | AllOfLabel
LABEL_KINDS: dict[str, type] = {"binary_column": BinaryColumnLabel, "relative_reduction": RelativeReductionLabel,
                                "all_of": AllOfLabel}


@dataclass(frozen=True)
class ImageInput:
    """The DICOM views a task needs per patient, and the physical field of view to crop."""

    views: tuple[str, ...]
    modalities: tuple[str, ...]
    field_of_view_mm: float

    def __post_init__(self) -> None:
        out = []
        if not self.views or len(set(self.views)) != len(self.views):
            out.append(problem("views", list(self.views), "needs one or more distinct view names",
                               'list the views the manifest names, e.g. ["T2_AXIAL"]'))
        if not self.modalities:
            out.append(problem("modalities", [], "needs one or more DICOM modalities", 'e.g. ["MR"] or ["CR", "DX"]'))
        if not self.field_of_view_mm > 0:
            out.append(problem("field_of_view_mm", self.field_of_view_mm, "must be above 0",
                               "set the physical width to crop around the level, e.g. 100.0"))
        raise_problems(out)


@dataclass(frozen=True)
class ModelSpec:
    """Which registry model the task trains, and its settings (passed to the model as given)."""

    name: str = "small_cnn"
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        raise_problems(choice("name", self.name, MODEL_NAMES, "model"))

    def __hash__(self) -> int:  # settings is a dict: hash its canonical text
        return hash((self.name, json.dumps(self.settings, sort_keys=True)))


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    description: str
    label: LabelRule
    features: tuple[Feature, ...] = ()
    image: ImageInput | None = None
    subgroups: tuple[str, ...] = ("age", "sex")
    model: ModelSpec = ModelSpec()

    @property
    def required_columns(self) -> tuple[str, ...]:
        cols = ["patient_id", *self.label.columns, *(f.name for f in self.features), *self.subgroups]
        return tuple(dict.fromkeys(cols))

    @property
    def n_features(self) -> int:
        return sum(len(f.categories) if f.kind == "category" else 1 for f in self.features)

    def problems(self) -> list[str]:
        """What the pieces get wrong together (each piece checked itself already)."""
        out = []
        names = [f.name for f in self.features]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            out.append(problem("predictors", names, f"{', '.join(twice)} listed more than once", "list each once"))
        # a baseline score is known before treatment (a fair predictor); the outcome columns are not
        known_before = {getattr(self.label, "baseline", None), *getattr(self.label, "baselines", ())}
        outcome = set(self.label.columns) - known_before
        leaked = sorted(set(names) & {*outcome, "patient_id"})
        if leaked:
            out.append(problem("predictors", names, f"{', '.join(leaked)} cannot be a predictor (the outcome or the "
                               "patient id: the model would read the answer)", "remove it from [[predictors]]"))
        for name in self.subgroups:
            out += choice("subgroups", name, SUBGROUPS, "subgroup column")
        if not self.features and self.image is None:
            out.append(problem("predictors", [], "the task has neither predictors nor an [image] table",
                               "add [[predictors]] entries or an [image] table"))
        return out
