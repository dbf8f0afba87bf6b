"""A task file (TOML) as a Task, and back as canonical JSON with its SHA-256.

The canonical JSON (every setting written out, keys sorted) is what travels to the sites in the
run config and what a site's `allowed_tasks` hash covers: comments, order and spelling of the
file do not change it, any change of meaning does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from spine_fl.shared.contract.task_definition import (
    LABEL_KINDS,
    AllOfLabel,
    Condition,
    Feature,
    ImageInput,
    ModelSpec,
    Task,
)
from spine_fl.shared.typed_table import (
    ConfigError,
    choice,
    collect,
    raise_problems,
    read_toml,
    toml_value,
    typed_from_table,
)

FROM_RUN = "the task definition in the run config"


@dataclass(frozen=True)
class _TaskTable:
    """The top level of a task file; the tables inside are checked by their own classes."""

    name: str
    title: str
    description: str
    label: dict[str, Any]
    predictors: tuple[dict, ...] = ()
    image: dict | None = None
    subgroups: tuple[str, ...] = ()
    model: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _AllOfTable:
    conditions: tuple[dict, ...]


def task_from_table(raw: Any, where: str) -> Task:
    """A task file's table as a Task; one ConfigError with every problem, each naming `where` and the key."""
    top = typed_from_table(_TaskTable, raw, where)
    problems: list[str] = []
    label = _label(top.label, f"{where} [label]", problems)
    features = tuple(collect(problems, typed_from_table, Feature, table,
                             f"{where} [[predictors]] {i} ({table.get('name', '?')})")
                     for i, table in enumerate(top.predictors, 1))
    image = None if top.image is None else collect(problems, typed_from_table, ImageInput, top.image,
                                                   f"{where} [image]")
    model = collect(problems, typed_from_table, ModelSpec, top.model, f"{where} [model]")
    raise_problems(problems)
    task = Task(top.name, top.title, top.description, label, features, image, top.subgroups, model)
    raise_problems([f"{where} {line}" for line in task.problems()])
    return task


def _label(raw: dict[str, Any], where: str, problems: list[str]) -> Any:
    kinds = list(LABEL_KINDS)
    kind = raw.get("kind")
    if not isinstance(kind, str):
        problems.append(f"{where}: kind = {toml_value(kind) if kind is not None else '(missing)'}: say how the label "
                        f"is made; write kind = one of {', '.join(kinds)}")
        return None
    wrong = choice("kind", kind, kinds, "label kind")
    if wrong:
        problems += [f"{where} {line}" for line in wrong]
        return None
    rest = {k: v for k, v in raw.items() if k != "kind"}
    if LABEL_KINDS[kind] is not AllOfLabel:
        return collect(problems, typed_from_table, LABEL_KINDS[kind], rest, where)
    table = collect(problems, typed_from_table, _AllOfTable, rest, where)
    if table is None:
        return None
    conditions = [collect(problems, typed_from_table, Condition, c, f"{where} conditions item {i}")
                  for i, c in enumerate(table.conditions, 1)]
    if None in conditions:
        return None
    try:
        return AllOfLabel(tuple(conditions))
    except ConfigError as exc:
        problems += [f"{where} {line}" for line in exc.problems]
        return None


def task_table(task: Task) -> dict[str, Any]:
    """The task as a task file's table, every setting written out (None left out: TOML has no null)."""
    label = {"kind": next(k for k, cls in LABEL_KINDS.items() if isinstance(task.label, cls)), **asdict(task.label)}
    if isinstance(task.label, AllOfLabel):  # a condition without a baseline is written (and hashed) as before
        label["conditions"] = [_without_none(c) for c in label["conditions"]]
    out = {"name": task.name, "title": task.title, "description": task.description, "label": label,
           "predictors": [_without_none(asdict(f)) for f in task.features], "subgroups": list(task.subgroups),
           "model": asdict(task.model)}
    if task.image is not None:
        out["image"] = asdict(task.image)
    return out


def _without_none(table: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in table.items() if v is not None}


def canonical_json(task: Task) -> str:
    return json.dumps(task_table(task), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def task_sha256(task: Task) -> str:
    """What a site approves in `allowed_tasks` (`name@<this>`)."""
    return hashlib.sha256(canonical_json(task).encode("utf-8")).hexdigest()


def load_task_file(path: Path | str) -> Task:
    """A task file; every problem in it reported together, each line starting with the file."""
    return task_from_table(read_toml(path, "task file (see configs/tasks/)"), str(path))


@lru_cache(maxsize=64)
def task_from_json(definition: str) -> Task:
    """The task a run config carries (parsed once per process and definition)."""
    try:
        raw = json.loads(definition)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{FROM_RUN}: not valid JSON ({exc})") from None
    return task_from_table(raw, FROM_RUN)
