"""Route files: validation with file:line messages, the published JSON Schema, matching, back-off."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from dicomflow.engine.config import load_route_set
from dicomflow.engine.events import Event, EventType
from dicomflow.engine.matching import attributes_match, condition_holds, values_of, wants
from dicomflow.engine.routes import Condition, Route, route_json_schema
from dicomflow.engine.store import backoff_delay
from dicomflow.engine.yamlfile import ConfigFileError, parse_duration
from dicomflow.settings import Settings
from tests.conftest import make_settings
from tests.routing_support import SHIPPED_MAPPINGS, SHIPPED_ROUTES

#: the destinations config/settings.example.yaml describes for the shipped routes
EXAMPLE_DESTINATIONS: dict[str, Any] = {
    "fhir-server": {"type": "fhir", "url": "https://emr.example.org/fhir/R4"},
    "research-archive": {"type": "dicomweb", "url": "https://research.example.org/dicomweb"},
    "pacs": {"type": "dicom", "ae_title": "PACS1", "host": "10.0.0.5", "port": 104},
    "ris-hook": {"type": "webhook", "url": "https://ris.example.org/hooks/dicomflow", "secret": "x"},
}


def settings_with(tmp_path: Path, destinations: dict[str, Any] | None = None) -> Settings:
    return make_settings(tmp_path, routing={"destinations": EXAMPLE_DESTINATIONS if destinations is None
                                            else destinations})


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    routes = tmp_path / "routes"
    write(routes, "r.yaml", text)
    with pytest.raises(ConfigFileError) as info:
        load_route_set(routes, SHIPPED_MAPPINGS, settings_with(tmp_path))
    return [str(p) for p in info.value.problems]


def test_shipped_routes_and_mappings_are_valid(tmp_path: Path) -> None:
    routes = load_route_set(SHIPPED_ROUTES, SHIPPED_MAPPINGS, settings_with(tmp_path))
    assert set(routes.routes) == {"imagingstudy-to-fhir", "research-copy", "forward-to-pacs", "notify-ris"}
    assert set(routes.mappings) == {"imagingstudy-default"}


def test_published_schemas_are_current() -> None:
    from dicomflow.mapping.model import mapping_json_schema

    assert json.loads((SHIPPED_ROUTES / "schema.json").read_text()) == route_json_schema()
    assert json.loads((SHIPPED_MAPPINGS / "schema.json").read_text()) == mapping_json_schema()


GOOD = """name: ct-to-emr
events: [study.stable]
actions:
  - type: fhir
    destination: fhir-server
"""


@pytest.mark.parametrize(("text", "expected"), [
    (GOOD.replace("events:", "evnts:"), ["r.yaml:2: evnts: unknown field", "r.yaml:1: events: required field"]),
    (GOOD.replace("ct-to-emr", "CT_to_EMR"), ["r.yaml:1: name: 'CT_to_EMR' is not a kebab-case name"]),
    (GOOD.replace("study.stable", "study.done"), ["r.yaml:2: events.0: Input should be"]),
    (GOOD + "match:\n  Modalty: CT\n", ["r.yaml:6: match: 'Modalty' is neither a DICOM keyword"]),
    (GOOD + "match:\n  Modality: {regex: '(['}\n", ["r.yaml:7: match.Modality: invalid regular expression"]),
    (GOOD + "match:\n  Modality: {equals: CT, in: [MR]}\n", ["r.yaml:7: match.Modality: give exactly one"]),
    (GOOD.replace("fhir-server", "emr"), ["r.yaml:5: unknown destination 'emr' (known: fhir-server, pacs,"]),
    (GOOD.replace("fhir-server", "pacs"), ["r.yaml:5: destination 'pacs' is a dicom destination; a fhir action"]),
    (GOOD + "    mapping: nope\n", ["r.yaml:6: unknown mapping 'nope' (known: imagingstudy-default)"]),
    (GOOD + "tenants: [nobody]\n", ["r.yaml:6: unknown tenant 'nobody'"]),
    (GOOD.replace("study.stable", "instance.stored") + "stable_after: 5m\n",
     ["r.yaml:1: stable_after only applies to series.stable or study.stable"]),
    (GOOD + "stable_after: soon\n", ["r.yaml:6: stable_after: not a duration: 'soon'"]),
    ("name: x\nevents: [study.stable\n", ["r.yaml:3: not valid YAML"]),
    ("- just a list\n", ["r.yaml:1: expected a mapping"]),
])
def test_invalid_route_files_report_file_line_and_a_plain_message(tmp_path: Path, text: str,
                                                                  expected: list[str]) -> None:
    problems = problems_of(tmp_path, text)
    for want in expected:
        line, message = want.removeprefix("r.yaml:").split(":", 1)
        prefix = f"{tmp_path / 'routes' / 'r.yaml'}:{line}: "
        assert any(p.startswith(prefix) and message.strip() in p for p in problems), (want, problems)


def test_every_problem_of_every_file_is_reported_and_names_must_be_unique(tmp_path: Path) -> None:
    routes = tmp_path / "routes"
    write(routes, "a.yaml", GOOD)
    write(routes, "b.yaml", GOOD)
    write(routes, "c.yaml", GOOD.replace("ct-to-emr", "other").replace("fhir-server", "nowhere"))
    with pytest.raises(ConfigFileError) as info:
        load_route_set(routes, SHIPPED_MAPPINGS, settings_with(tmp_path))
    text = str(info.value)
    assert "b.yaml:1: route 'ct-to-emr' is also defined in" in text and "a.yaml" in text
    assert "c.yaml:5: unknown destination 'nowhere'" in text


def test_mapping_names_must_be_unique(tmp_path: Path) -> None:
    mappings = tmp_path / "mappings"
    shipped = (SHIPPED_MAPPINGS / "imagingstudy-default.yaml").read_text()
    write(mappings, "a.yaml", shipped)
    write(mappings, "b.yaml", shipped)
    with pytest.raises(ConfigFileError) as info:
        load_route_set(None, mappings, settings_with(tmp_path))
    [problem] = info.value.problems
    assert str(problem).startswith(f"{mappings / 'b.yaml'}:")
    assert "mapping 'imagingstudy-default' is also defined in" in str(problem) and "a.yaml" in str(problem)


def test_durations() -> None:
    assert parse_duration("90s") == 90 and parse_duration("5m") == 300 and parse_duration("1h") == 3600
    assert parse_duration(2.5) == 2.5 and parse_duration("250ms") == 0.25
    for bad in ("-1s", "soon", "", True):
        with pytest.raises(ValueError):
            parse_duration(bad)


def element(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)}


ATTRS = {
    "00080060": element("CS", "CT"),
    "00080008": element("CS", "ORIGINAL", "PRIMARY", "AXIAL"),
    "00080080": element("LO", "ACME North "),
    "00100010": element("PN", {"Alphabetic": "Doe^Jane"}),
    "00080020": element("DA", "20240115"),
    "00200013": element("IS", 7),
    "00181030": element("LO"),
}


@pytest.mark.parametrize(("tag", "condition", "holds"), [
    ("00080060", {"equals": "CT"}, True),
    ("00080060", {"equals": "ct"}, False),
    ("00080060", {"in": ["MR", "CT"]}, True),
    ("00080008", {"equals": "AXIAL"}, True),  # any value of a multi-valued attribute
    ("00080080", {"wildcard": "ACME*"}, True),  # trailing padding ignored
    ("00080080", {"wildcard": "ACME?North"}, True),
    ("00080080", {"regex": "ACME (North|South)"}, True),
    ("00080080", {"regex": "North"}, False),  # the whole value must match
    ("00100010", {"wildcard": "Doe^*"}, True),  # PN: its alphabetic form
    ("00080020", {"range": {"min": "20240101", "max": "20241231"}}, True),
    ("00080020", {"range": {"min": "20240116"}}, False),
    ("00200013", {"range": {"min": 5, "max": 10}}, True),
    ("00200013", {"equals": 7}, True),
    ("00200013", {"range": {"max": 6}}, False),
    ("00181030", {"exists": False}, True),  # present but empty counts as absent
    ("00181030", {"exists": True}, False),
    ("00080060", {"exists": True}, True),
    ("00321060", {"equals": "x"}, False),
])
def test_conditions(tag: str, condition: dict[str, Any], holds: bool) -> None:
    assert condition_holds(Condition.model_validate(condition), values_of(ATTRS, tag)) is holds


def route(**fields: Any) -> Route:
    base: dict[str, Any] = {"name": "r", "events": ["instance.stored"],
                            "actions": [{"type": "webhook", "destination": "d"}]}
    return Route.model_validate({**base, **fields})


def test_shorthand_conditions_and_attribute_sets() -> None:
    r = route(match={"Modality": "CT", "ImageType": ["AXIAL", "LOCALIZER"], "00080080": {"wildcard": "ACME*"}})
    assert attributes_match(r, [ATTRS])
    assert not attributes_match(r, [{**ATTRS, "00080060": element("CS", "MR")}])
    # a study matches when one of its series does
    assert attributes_match(r, [{**ATTRS, "00080060": element("CS", "MR")}, ATTRS])
    assert not attributes_match(r, [])


def test_event_tenant_source_and_quiet_time_filters() -> None:
    stored = Event(1, EventType.INSTANCE_STORED, "acme", "1.2", "1.2.3", "1.2.3.4",
                   source={"protocol": "dimse", "calling_ae": "CT_SCANNER_1"})
    assert wants(route(), stored, 90)
    assert not wants(route(enabled=False), stored, 90)
    assert not wants(route(tenants=["globex"]), stored, 90)
    assert wants(route(source={"calling_ae": ["CT*"]}), stored, 90)
    assert not wants(route(source={"protocol": ["dicomweb"]}), stored, 90)
    assert not wants(route(source={"subject": ["*"]}), stored, 90)  # no subject on a DIMSE event
    stable = Event(2, EventType.STUDY_STABLE, "acme", "1.2", quiet=30.0)
    assert wants(route(events=["study.stable"]), stable, 30.0)
    assert not wants(route(events=["study.stable"]), stable, 90.0)  # emitted for another quiet time


def test_event_round_trip() -> None:
    event = Event(7, EventType.SERIES_STABLE, "default", "1.2", "1.2.3", None, 12.5, {"protocol": "dimse"}, 60.0,
                  {"instances": 3})
    assert Event.from_dict(json.loads(json.dumps(event.as_dict()))) == event


def test_backoff_grows_exponentially_with_jitter_and_a_ceiling() -> None:
    rng = random.Random(1)
    for attempts, low, high in ((1, 1.0, 2.0), (2, 2.0, 4.0), (5, 16.0, 32.0), (20, 30.0, 60.0)):
        delays = [backoff_delay(attempts, 2.0, 60.0, rng) for _ in range(50)]
        assert all(low <= d <= high for d in delays)
        assert len({round(d, 6) for d in delays}) > 1  # jittered
