"""Load a YAML file into a pydantic model, reporting problems with file, line and a plain message."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem in a route or mapping file."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}"


class ConfigFileError(Exception):
    """A route or mapping file (or a set of them) is invalid."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The 1-based line of the YAML node at ``loc`` (or of its deepest existing parent)."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in loc:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    child = value
                    line = key.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


def _plain(error: Any) -> str:
    loc = ".".join(str(p) for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged-"))))
    msg = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling; see the JSON Schema)"
    elif error["type"] == "missing":
        msg = "required field is missing"
    return f"{loc}: {msg}" if loc else msg


@dataclass(frozen=True, slots=True)
class Loaded(Generic[M]):
    """A validated file, with what is needed to point at a line of it later."""

    value: M
    file: str
    node: yaml.Node | None

    def problem(self, loc: tuple[int | str, ...], message: str) -> Problem:
        return Problem(self.file, _line_of(self.node, loc), message)


def load_model(path: Path, model: type[M], display: str | None = None) -> Loaded[M]:
    """Parse and validate ``path``; raise :class:`ConfigFileError` with file:line problems."""
    name = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError([Problem(name, None, f"cannot read: {exc}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else None
        raise ConfigFileError([Problem(name, line, f"not valid YAML: {exc.problem}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigFileError([Problem(name, None, f"not valid YAML: {exc}")]) from None
    if not isinstance(data, dict):
        raise ConfigFileError([Problem(name, 1, "expected a mapping (key: value) at the top level")])
    try:
        return Loaded(model.model_validate(data), name, node)
    except ValidationError as exc:
        problems = [Problem(name, _line_of(node, tuple(err["loc"])), _plain(err)) for err in exc.errors()]
        raise ConfigFileError(problems) from None


def parse_duration(value: Any) -> float:
    """Seconds from ``90``, ``90s``, ``5m``, ``1h`` or ``1d``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s, 5m or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip().lower()
        units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
        unit = next((u for u in ("ms", "s", "m", "h", "d") if text.endswith(u)), "")
        number = text[: len(text) - len(unit)] if unit else text
        try:
            seconds = float(number) * units.get(unit, 1.0)
        except ValueError:
            raise ValueError(f"not a duration: {value!r} (use e.g. 90s, 5m or 1h)") from None
    else:
        raise ValueError("expected a duration such as 90s, 5m or 1h")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds
