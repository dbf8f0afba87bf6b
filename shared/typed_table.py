"""One typed validation path for every TOML table spine-fl reads (scenarios, federation files,
site policies, task files).

Kept apart from the settings themselves (config.py) so that the task files, which config.py
needs, can be validated the same way without an import cycle.
"""

from __future__ import annotations

import difflib
import json
import math
import tomllib
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Callable, Sequence


class ConfigError(ValueError):
    """A setting that cannot work; the message names the file and the setting.

    Every problem found in one file travels in one error, one per line (`problems`), so a user
    fixes them all in one pass instead of one per run."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def problem(key: str, value: Any, what: str, todo: str) -> str:
    """One problem line: `key = value: what is wrong; what to do` (the caller prefixes the file)."""
    return f"{key} = {toml_value(value)}: {what}; {todo}"


def raise_problems(problems: Sequence[str]) -> None:
    """Raise one ConfigError listing every problem, if there is any."""
    if problems:
        raise ConfigError(*problems)


def choice(key: str, value: str, allowed: Sequence[str], what: str) -> list[str]:
    """A value that must be one of a few names; the closest one suggested."""
    if value in allowed:
        return []
    close = difflib.get_close_matches(value, list(allowed), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return [problem(key, value, f"unknown {what}", f"{hint}choose one of {', '.join(allowed)}")]


def toml_value(value: Any) -> str:
    """A value as it would be written in a TOML file (strings quoted, booleans lower-case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


_EXPECTED = {
    bool: "expected true or false (a TOML boolean, without quotes)",
    int: "expected a whole number (a TOML integer such as 3, without quotes or decimal point)",
    float: "expected a number (a TOML float or integer such as 0.5, without quotes)",
    str: 'expected text (a TOML string in double quotes, such as "name")',
}
_EXPECTED_LIST = 'expected a list of text values (a TOML array of strings such as ["a", "b"])'
_EXPECTED_TABLE = "expected a table (a [section] of key = value lines, or an inline table such as {key = 1})"


def _typed_value(value: Any, annotation: Any) -> Any:
    """`value` as `annotation` (int -> float, list -> tuple); a ValueError saying what was expected."""
    if annotation is Any:
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        # TOML has no null: an optional setting is either its type or left out of the file
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _typed_value(value, options[0])
        for option in options:
            try:
                return _typed_value(value, option)
            except ValueError:
                continue
        raise ValueError("expected one of: " + "; ".join(_describe(a) for a in options))
    if origin in (tuple, list):  # tuple[X, ...] or list[X]: a TOML array of X
        item = args[0] if args else Any
        if not isinstance(value, (list, tuple)):
            raise ValueError(_describe(annotation))
        items = []
        for i, v in enumerate(value, 1):
            try:
                items.append(_typed_value(v, item))
            except ValueError:
                raise ValueError(f"{_describe(annotation)}; item {i} is {toml_value(v)}") from None
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ValueError(_EXPECTED_TABLE)
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(_EXPECTED[bool])
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(_EXPECTED[int])
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(_EXPECTED[float])
        if not math.isfinite(value):
            raise ValueError("expected a finite number (nan and inf cannot be used here)")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(_EXPECTED[str])
        return value
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ValueError(f"expected {annotation.__name__}")
    return value


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        return _EXPECTED_LIST if typing.get_args(annotation)[:1] == (str,) else "expected a list (a TOML array)"
    if origin is dict or annotation is dict:
        return _EXPECTED_TABLE
    return _EXPECTED.get(annotation, f"expected {getattr(annotation, '__name__', annotation)}")


def check_value(value: Any, annotation: Any, where: str, key: str) -> Any:
    """One setting checked against its type: ConfigError `<where> key = value: expected ...`."""
    try:
        return _typed_value(value, annotation)
    except ValueError as exc:
        raise ConfigError(f"{where} {key} = {toml_value(value)}: {exc}") from None


def unknown_key(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f"{key} (did you mean {close[0]}?)" if close else key


def typed_from_table(cls: type, table: Any, where: str) -> Any:
    """A TOML table as the dataclass `cls`, every value checked against the field's annotated type.

    ConfigError naming `where` (file and section), the key, the value and what was expected, for:
    a value of the wrong type (no quotes around booleans and numbers, whole numbers where counted,
    finite numbers), an unknown key (with the closest allowed one), a missing required key, and
    what the dataclass itself refuses (its __post_init__). Ints become floats where a float is
    expected, and lists tuples."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: {_EXPECTED_TABLE}, got {toml_value(table)}")
    settable = [f for f in fields(cls) if f.init]
    allowed = [f.name for f in settable]
    problems = []
    unknown = [k for k in table if k not in allowed]
    if unknown:
        problems.append(f"{where}: unknown setting(s) {', '.join(unknown_key(k, allowed) for k in unknown)}; "
                        f"allowed: {', '.join(sorted(allowed))}")
    missing = [f.name for f in settable
               if f.name not in table and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        problems.append(f"{where}: missing setting(s) {', '.join(missing)}; add a line key = value for each")
    values, mistyped = _typed_values(cls, {k: v for k, v in table.items() if k in allowed}, where, problems)
    required = {f.name for f in settable if f.default is MISSING and f.default_factory is MISSING}
    if missing or mistyped & required:  # a required value is unusable: nothing to build the rest with
        raise ConfigError(*problems)
    built = None
    try:
        built = cls(**values)  # mistyped keys keep their defaults: the others are still range-checked
    except ConfigError as exc:
        kept = [f"{where} {_as_written(line, table, values)}" for line in exc.problems
                if line.split(" = ", 1)[0] not in mistyped]
        problems += kept if kept or mistyped else [f"{where}: {exc}"]
    except (TypeError, ValueError) as exc:
        problems.append(f"{where}: {exc}")
    raise_problems(problems)
    return built


def _as_written(line: str, table: dict[str, Any], values: dict[str, Any]) -> str:
    """A problem line with its value as the file writes it (`0`, not the `0.0` it became)."""
    key, _, rest = line.partition(" = ")
    if key in table and key in values and rest.startswith(toml_value(values[key]) + ":"):
        return f"{key} = {toml_value(table[key])}{rest[len(toml_value(values[key])):]}"
    return line


def _typed_values(cls: type, table: dict[str, Any], where: str, problems: list[str]) -> tuple[dict[str, Any], set[str]]:
    """The values of the right type, and the keys of the others (each a line added to `problems`)."""
    hints = typing.get_type_hints(cls)
    values, mistyped = {}, set()
    for key, value in table.items():
        try:
            values[key] = check_value(value, hints.get(key, Any), where, key)
        except ConfigError as exc:
            problems.append(str(exc))
            mistyped.add(key)
    return values, mistyped


def read_toml(path: Path | str, what: str, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """A TOML file as a dict; a missing, unreadable or malformed file is a ConfigError naming it."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: a folder, not a {what}; give the path of the .toml file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror}); check the path and its permissions") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file (not UTF-8); a {what} is TOML text") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML ({exc})") from None




def collect(problems: list[str], check: Callable[..., Any], *args: Any) -> Any:
    """`check(*args)`, or None with its ConfigError's lines added to `problems`."""
    try:
        return check(*args)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return None
