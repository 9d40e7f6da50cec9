"""The set of routes and mappings in force: loaded from folders, cross-checked, swapped atomically.

A set is only ever replaced by a complete, valid one: when any file is broken, every problem is reported
with file and line, and the previous set stays in force (the running server keeps the last good set).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from collections.abc import Mapping as MappingType
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from dicomflow.engine.events import EventType
from dicomflow.engine.routes import Route
from dicomflow.engine.yamlfile import ConfigFileError, Loaded, Problem, load_model
from dicomflow.mapping.model import Mapping
from dicomflow.settings import Destination, Settings

logger = logging.getLogger(__name__)

_Named = TypeVar("_Named", Route, Mapping)

#: which destination type each action type needs
_ACTION_DESTINATION = {"fhir": "fhir", "dicomweb": "dicomweb", "dicom": "dicom", "webhook": "webhook"}


@dataclass(frozen=True, slots=True)
class RouteSet:
    """Routes by name and mappings by name, valid together against the settings."""

    routes: dict[str, Route] = field(default_factory=dict)
    mappings: dict[str, Mapping] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # route name -> file

    def quiet_for(self, route: Route, tenant: str, settings: Settings) -> float:
        """The effective quiet time of a route for a tenant (route > tenant > server default)."""
        if route.stable_after is not None:
            return route.stable_after
        tenant_settings = settings.tenants.get(tenant)
        if tenant_settings is not None and tenant_settings.stable_after is not None:
            return tenant_settings.stable_after
        return settings.routing.stable_after

    def stable_windows(self, tenant: str, settings: Settings) -> dict[str, set[float]]:
        """level -> quiet times that routes of this tenant wait for."""
        out: dict[str, set[float]] = {"series": set(), "study": set()}
        for route in self.routes.values():
            if not route.enabled or (route.tenants is not None and tenant not in route.tenants):
                continue
            for event in route.events:
                if event in (EventType.SERIES_STABLE, EventType.STUDY_STABLE):
                    out[event.level].add(self.quiet_for(route, tenant, settings))
        return out


def _yaml_files(folder: Path) -> list[Path]:
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])


def fingerprint(folders: list[Path]) -> tuple[tuple[str, float, int], ...]:
    """What changed on disk: (path, mtime, size) of every YAML file in the folders."""
    out: list[tuple[str, float, int]] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in _yaml_files(folder):
            try:
                st = path.stat()
            except OSError:
                continue
            out.append((str(path), st.st_mtime, st.st_size))
    return tuple(out)


def _load_named(folder: Path, model: type[_Named], kind: str,
                check: Callable[[Loaded[_Named]], list[Problem]] | None = None,
                ) -> tuple[dict[str, Loaded[_Named]], list[Problem]]:
    """Every YAML file of ``folder`` as a ``model`` (a route or a mapping), by name; the problems of each file
    (or of ``check`` on it), in file order. A name defined twice is a problem of the second file."""
    found: dict[str, Loaded[_Named]] = {}
    problems: list[Problem] = []
    for path in _yaml_files(folder):
        try:
            loaded = load_model(path, model)
        except ConfigFileError as exc:
            problems.extend(exc.problems)
            continue
        name = loaded.value.name
        if name in found:
            problems.append(loaded.problem(("name",), f"{kind} {name!r} is also defined in {found[name].file}"))
            continue
        found[name] = loaded
        if check is not None:
            problems.extend(check(loaded))
    return found, problems


def load_mappings(folder: Path) -> tuple[dict[str, Loaded[Mapping]], list[Problem]]:
    if not folder.is_dir():
        return {}, []
    return _load_named(folder, Mapping, "mapping")


def load_route_set(routes_dir: Path | None, mappings_dir: Path, settings: Settings,
                   destinations: MappingType[str, Destination] | None = None) -> RouteSet:
    """Load and cross-check every route and mapping; raise :class:`ConfigFileError` listing all problems."""
    dests = settings.routing.destinations if destinations is None else destinations
    mappings, problems = load_mappings(mappings_dir)
    routes: dict[str, Loaded[Route]] = {}
    if routes_dir is not None:
        if not routes_dir.is_dir():
            raise ConfigFileError([Problem(str(routes_dir), None, "routes folder not found")])
        routes, route_problems = _load_named(routes_dir, Route, "route",
                                             lambda loaded: _check_route(loaded, mappings, dests, settings))
        problems.extend(route_problems)
    if problems:
        raise ConfigFileError(problems)
    return RouteSet({n: r.value for n, r in routes.items()}, {n: m.value for n, m in mappings.items()},
                    {n: r.file for n, r in routes.items()})


def _check_route(loaded: Loaded[Route], mappings: dict[str, Loaded[Mapping]],
                 destinations: MappingType[str, Destination], settings: Settings) -> list[Problem]:
    route = loaded.value
    problems: list[Problem] = []
    for i, tenant in enumerate(route.tenants or []):
        if tenant not in settings.tenants:
            problems.append(loaded.problem(("tenants", i), f"unknown tenant {tenant!r}"))
    for i, action in enumerate(route.actions):
        dest = destinations.get(action.destination)
        if dest is None:
            known = ", ".join(sorted(destinations)) or "none configured (settings: routing.destinations)"
            problems.append(loaded.problem(("actions", i, "destination"),
                                           f"unknown destination {action.destination!r} (known: {known})"))
        elif dest.type != _ACTION_DESTINATION[action.type]:
            problems.append(loaded.problem(("actions", i, "destination"),
                                           f"destination {action.destination!r} is a {dest.type} destination; "
                                           f"a {action.type} action needs a {_ACTION_DESTINATION[action.type]} one"))
        if action.type == "fhir" and action.mapping not in mappings:
            known = ", ".join(sorted(mappings)) or "none"
            problems.append(loaded.problem(("actions", i, "mapping"),
                                           f"unknown mapping {action.mapping!r} (known: {known})"))
    return problems
