"""A task file (TOML) as a Task, and back as canonical JSON with its SHA-256.

The canonical JSON (every setting written out, keys sorted) is what travels to the sites in the
run config and what a site's `allowed_tasks` hash covers: comments, order and spelling of the
file do not change it, any change of meaning does.
"""

from __future__ import annotations

import hashlib
import json
import re
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
    problem,
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
    """A task file's table as a Task; one ConfigError with every problem, each naming `where` and the key.

    A missing or mistyped top-level key does not hide the rest: the tables it does have ([label],
    [[predictors]], [image], [model]) and the name are checked in the same pass."""
    problems: list[str] = []
    top = collect(problems, typed_from_table, _TaskTable, raw, where)
    if top is None and not isinstance(raw, dict):
        raise_problems(problems)
    parts = _parts(top, raw)
    problems += _name_problems(parts["name"], where)
    label = None if parts["label"] is None else _label(parts["label"], f"{where} [label]", problems)
    features = tuple(collect(problems, typed_from_table, Feature, table,
                             f"{where} [[predictors]] {i} ({table.get('name', '?')})")
                     for i, table in enumerate(parts["predictors"], 1))
    image = None if parts["image"] is None else collect(problems, typed_from_table, ImageInput, parts["image"],
                                                        f"{where} [image]")
    model = collect(problems, typed_from_table, ModelSpec, parts["model"], f"{where} [model]")
    whole = (parts["shaped"] and label is not None and None not in features
             and (parts["image"] is None or image is not None))
    if whole:  # what the pieces get wrong together, reported with the rest
        task = Task(parts["name"] or "", top.title if top else "", top.description if top else "", label, features,
                    image, parts["subgroups"], model or ModelSpec())
        problems += [f"{where} {line}" for line in task.problems()]
    raise_problems(problems)
    return task


# A task's name: letters, digits, _ and -; a site approves it as `name@sha256` in allowed_tasks, and
# runs, ledgers and model cards name it, so a space, "@" or "/" would make it unapprovable or unsafe.
TASK_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _name_problems(name: Any, where: str) -> list[str]:
    if not isinstance(name, str) or TASK_NAME.fullmatch(name):
        return []  # a missing or mistyped name is reported by typed_from_table
    return [f"{where} " + problem("name", name, "a task name may hold only letters, digits, _ and - (sites approve "
                                  "it as name@sha256 in allowed_tasks, which no other character can spell)",
                                  f"rename the task, e.g. name = {toml_value(_suggested_name(name))}")]


def _suggested_name(name: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_-]", "_", name)).strip("_") or "my_task"


def _parts(top: _TaskTable | None, raw: Any) -> dict[str, Any]:
    """The pieces to check: the typed table's, or (when a top-level key is missing or mistyped) the raw
    table's that have the right shape (the others are reported by typed_from_table already)."""
    if top is not None:
        return {"name": top.name, "label": top.label, "predictors": top.predictors, "image": top.image,
                "model": top.model, "subgroups": top.subgroups, "shaped": True}

    def table(key: str) -> dict | None:
        return raw[key] if isinstance(raw.get(key), dict) else None

    predictors, subgroups = raw.get("predictors", []), raw.get("subgroups", [])
    listed = isinstance(predictors, list) and all(isinstance(p, dict) for p in predictors)
    grouped = isinstance(subgroups, list) and all(isinstance(g, str) for g in subgroups)
    return {"shaped": listed and grouped and isinstance(raw.get("image", {}), dict),
            "name": raw.get("name") if isinstance(raw.get("name"), str) else None, "label": table("label"),
            "predictors": tuple(predictors) if listed else (),
            "image": table("image"), "model": table("model") or {},
            "subgroups": tuple(subgroups) if grouped else ()}


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
