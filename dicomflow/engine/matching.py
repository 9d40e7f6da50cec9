"""Route conditions against an event and the DICOM attributes (PS3.18 JSON model) it concerns."""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Any

from dicomflow.engine.events import Event, EventType
from dicomflow.engine.routes import Condition, Route, SourceMatch


def values_of(attrs: dict[str, Any], tag: str) -> list[str]:
    """Every value of an attribute as a string (PN: its alphabetic form); [] when absent or empty."""
    element = attrs.get(tag)
    if not isinstance(element, dict):
        return []
    out: list[str] = []
    for value in element.get("Value") or []:
        if isinstance(value, dict):
            if "Alphabetic" in value:
                out.append(str(value["Alphabetic"]))
            continue  # sequence items are not matched by value
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        out.append(str(value))
    return out


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _same(value: str, target: str | float) -> bool:
    if isinstance(target, int | float):
        number = _number(value)
        return number is not None and number == float(target)
    return value.strip() == target


def _in_range(value: str, low: str | float | None, high: str | float | None) -> bool:
    bounds = [b for b in (low, high) if b is not None]
    number = _number(value)
    if number is not None and all(_number(b) is not None for b in bounds):
        return (low is None or number >= float(low)) and (high is None or number <= float(high))
    text = value.strip()
    return (low is None or text >= str(low)) and (high is None or text <= str(high))


def condition_holds(condition: Condition, values: list[str]) -> bool:
    if condition.exists is not None:
        return bool(values) == condition.exists
    if condition.equals is not None:
        target = condition.equals
        return any(_same(v, target) for v in values)
    if condition.in_ is not None:
        targets = condition.in_
        return any(_same(v, t) for v in values for t in targets)
    if condition.wildcard is not None:
        pattern = condition.wildcard
        return any(fnmatchcase(v.strip(), pattern) for v in values)
    if condition.regex is not None:
        compiled = re.compile(condition.regex)
        return any(compiled.fullmatch(v.strip()) is not None for v in values)
    if condition.range is not None:
        bounds = condition.range
        return any(_in_range(v, bounds.min, bounds.max) for v in values)
    return False


def source_matches(spec: SourceMatch | None, source: dict[str, str]) -> bool:
    if spec is None:
        return True
    checks = (("protocol", spec.protocol), ("calling_ae", spec.calling_ae), ("subject", spec.subject))
    for key, patterns in checks:
        if patterns is None:
            continue
        value = source.get(key)
        if value is None or not any(fnmatchcase(value, p) for p in patterns):
            return False
    return True


def wants(route: Route, event: Event, quiet: float) -> bool:
    """Whether ``route`` listens to this event, before looking at DICOM attributes.

    ``quiet`` is the route's effective quiet time: a ``*.stable`` event only reaches the routes whose
    quiet time it was emitted for.
    """
    if not route.enabled or event.type not in route.events:
        return False
    if route.tenants is not None and event.tenant not in route.tenants:
        return False
    if event.type in (EventType.SERIES_STABLE, EventType.STUDY_STABLE) and event.quiet != quiet:
        return False
    return source_matches(route.source, event.source)


def attributes_match(route: Route, candidates: list[dict[str, Any]]) -> bool:
    """True when one of the attribute sets (e.g. one per series of a study) meets every condition."""
    conditions = route.conditions()
    if not conditions:
        return True
    return any(all(condition_holds(c, values_of(attrs, tag)) for tag, c in conditions) for attrs in candidates)
