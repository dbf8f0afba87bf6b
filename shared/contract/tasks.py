"""Task registry: the tasks shipped as files in configs/tasks/, and the task a run brought.

Every task is a TOML file (task_file.py reads it, task_definition.py says what it holds); the
shipped ones are package data of `spine_fl.configs`, so an installed spine-fl finds them without a
source checkout. A run carries its task's canonical definition to the sites (RunSettings
`task_definition`); `use_task` makes that definition the one `get_task(name)` answers in this
process, so every part of a run (model, data, baselines, model card) reads the same task.
Whether a site accepts a definition is its policy's business (`allowed_tasks`: name and SHA-256).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from spine_fl.shared.contract.task_definition import (
    AllOfLabel,
    BinaryColumnLabel,
    Condition,
    Feature,
    ImageInput,
    LabelRule,
    ModelSpec,
    RelativeReductionLabel,
    Task,
)
from spine_fl.shared.contract.task_file import FROM_RUN, load_task_file, task_from_json, task_sha256
from spine_fl.shared.typed_table import ConfigError

__all__ = ["AllOfLabel", "BinaryColumnLabel", "Condition", "Feature", "ImageInput", "LabelRule", "ModelSpec",
           "RelativeReductionLabel", "TASKS", "SHIPPED_SHA256", "Task", "UnknownTaskError", "get_task",
           "is_task_file", "resolve_task", "run_task", "shipped_task_files", "use_task"]


class UnknownTaskError(ValueError):
    pass


def shipped_task_files() -> dict[str, Path]:
    """name -> file of every task shipped in configs/tasks/ (installed as package data)."""
    folder = resources.files("spine_fl.configs") / "tasks"
    return {entry.name[:-len(".toml")]: Path(str(entry)) for entry in sorted(folder.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(".toml")}


def _load_shipped() -> dict[str, Task]:
    tasks = {}
    for name, path in shipped_task_files().items():
        task = load_task_file(path)
        if task.name != name:  # a shipped file is found by its file name: the two must agree
            raise ConfigError(f"{path} name = {task.name!r}: a shipped task file is named after its task; "
                              f"rename the file to {task.name}.toml or set name = {name!r}")
        tasks[name] = task
    return tasks


TASKS: dict[str, Task] = _load_shipped()
SHIPPED_SHA256: dict[str, str] = {name: task_sha256(task) for name, task in TASKS.items()}
_RUN_TASKS: dict[str, Task] = {}  # definitions runs brought into this process, by name

# Derived from the shipped files for the synthetic data generators.
VERTEBRAL_FEATURES = TASKS["vertebral_column"].features
RADIOGRAPH_VIEWS = TASKS["tfesi_radiograph"].image.views  # type: ignore[union-attr]
MRI_VIEWS = TASKS["tfesi_mri"].image.views  # type: ignore[union-attr]


def use_task(task: Task) -> None:
    """This process runs `task` under its name (a run's own task, or its changed definition)."""
    if TASKS.get(task.name) == task:
        _RUN_TASKS.pop(task.name, None)
    else:
        _RUN_TASKS[task.name] = task


def get_task(name: str) -> Task:
    """The task of that name: the definition a run in this process brought, else the shipped one."""
    task = _RUN_TASKS.get(name) or TASKS.get(name)
    if task is None:
        raise _unknown(name)
    return task


def _unknown(name: str) -> UnknownTaskError:
    return UnknownTaskError(f"unknown task {name!r}; choose one of: {', '.join(sorted(TASKS))}, "
                            "or give a task file (.toml)")


def is_task_file(text: str) -> bool:
    """`task = "..."` names a file (not a shipped task) when it ends in .toml or holds a path separator."""
    return text.endswith(".toml") or "/" in text or "\\" in text


def resolve_task(name_or_file: str, relative_to: Path | None = None) -> Task:
    """A shipped task by name, or a task file (relative to `relative_to` when not absolute).

    UnknownTaskError for a name that is no shipped task; ConfigError for a file that is missing or wrong."""
    if not is_task_file(name_or_file):
        if name_or_file not in TASKS:
            raise _unknown(name_or_file)
        return TASKS[name_or_file]
    path = Path(name_or_file)
    return load_task_file(path if path.is_absolute() or relative_to is None else relative_to / path)


def run_task(name: str, definition: str) -> Task:
    """The task a run names: the definition it carries, or with none the shipped task of that name."""
    if not definition:
        if name not in TASKS:
            raise _unknown(name)
        return TASKS[name]
    task = task_from_json(definition)
    if task.name != name:
        raise ConfigError(f"{FROM_RUN}: it defines task {task.name!r}, but the run names task {name!r}; "
                          "the two must agree (write task = the file's name, or give the file)")
    return task
