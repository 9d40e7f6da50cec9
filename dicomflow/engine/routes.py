"""Route files (routes/*.yaml): pydantic models that also publish the JSON Schema analysts edit against.

A route names the events it listens to, the conditions an event must meet (tenant, source, any DICOM
attribute by keyword or tag) and the actions to run, in order. Names are kebab-case IDs used in logs,
metrics and the deliveries table.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydicom.datadict import keyword_for_tag

from dicomflow.engine.events import COMMITMENT_REPORT, EventType
from dicomflow.engine.yamlfile import parse_duration
from dicomflow.model import attribute_tag

KEBAB_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _kebab(value: str) -> str:
    if not KEBAB_RE.match(value) or len(value) > 64:
        raise ValueError(f"{value!r} is not a kebab-case name (lowercase letters, digits, single '-')")
    return value


KebabName = Annotated[str, BeforeValidator(lambda v: _kebab(v) if isinstance(v, str) else v),
                      Field(max_length=64, pattern=KEBAB_RE.pattern)]
Duration = Annotated[float, BeforeValidator(parse_duration, json_schema_input_type=str | float)]


def attribute_label(tag: str) -> str:
    return keyword_for_tag(int(tag, 16)) or tag


class Range(_Strict):
    """Inclusive bounds; numbers compare as numbers, anything else (dates YYYYMMDD) as strings."""

    min: str | float | None = None
    max: str | float | None = None


class Condition(_Strict):
    """Exactly one test on an attribute; multi-valued attributes match when any value does."""

    equals: str | float | None = None
    in_: list[str | float] | None = Field(default=None, alias="in")
    wildcard: str | None = Field(default=None, description="* matches any run of characters, ? one character")
    regex: str | None = Field(default=None, description="Python regular expression matching the whole value")
    exists: bool | None = None
    range: Range | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Condition:
        given = [k for k in ("equals", "in_", "wildcard", "regex", "exists", "range") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of equals, in, wildcard, regex, exists, range")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return self


def _condition_shorthand(value: Any) -> Any:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return {"equals": value}
    if isinstance(value, list):
        return {"in": value}
    return value


ConditionSpec = Annotated[
    Condition,
    BeforeValidator(_condition_shorthand, json_schema_input_type=Condition | str | float | list[str | float]),
]


class SourceMatch(_Strict):
    """Who sent the data; each list holds alternatives (wildcards allowed)."""

    protocol: list[Literal["dicomweb", "dimse", "import"]] | None = None
    calling_ae: list[str] | None = None
    subject: list[str] | None = None


class OnDelete(StrEnum):
    """What a fhir action does when the study is gone."""

    ENTERED_IN_ERROR = "entered-in-error"
    DELETE = "delete"
    IGNORE = "ignore"


class DeidOption(StrEnum):
    """PS3.15 Table E.1-1 profile options (DCM CID 7050 codes in :mod:`dicomflow.connectors.deid`)."""

    RETAIN_UIDS = "retain-uids"
    RETAIN_DEVICE_IDENTITY = "retain-device-identity"
    RETAIN_INSTITUTION_IDENTITY = "retain-institution-identity"
    RETAIN_PATIENT_CHARACTERISTICS = "retain-patient-characteristics"
    RETAIN_LONGITUDINAL_FULL_DATES = "retain-longitudinal-full-dates"


class Deidentify(_Strict):
    """De-identify with the PS3.15 Annex E Basic Application Level Confidentiality Profile before sending."""

    profile: Literal["basic"] = "basic"
    options: list[DeidOption] = Field(default_factory=list)
    #: UIDs are replaced by ones derived from this salt, so a re-sent instance keeps its new UIDs
    uid_salt: str = "dicomflow"


class FhirAction(_Strict):
    """Upsert Patient, ImagingStudy (and Endpoint) on a FHIR R4 server, by conditional update on identifier."""

    type: Literal["fhir"]
    destination: KebabName
    mapping: KebabName = "imagingstudy-default"
    on_delete: OnDelete = OnDelete.ENTERED_IN_ERROR


class DicomwebAction(_Strict):
    """Forward the instance, series or study by STOW-RS."""

    type: Literal["dicomweb"]
    destination: KebabName
    deidentify: Deidentify | None = None


class DicomAction(_Strict):
    """Forward the instance, series or study by C-STORE."""

    type: Literal["dicom"]
    destination: KebabName
    deidentify: Deidentify | None = None


class WebhookAction(_Strict):
    """POST the event as JSON, signed with HMAC-SHA256."""

    type: Literal["webhook"]
    destination: KebabName


Action = Annotated[FhirAction | DicomwebAction | DicomAction | WebhookAction, Field(discriminator="type")]


class Route(_Strict):
    """One route file."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="dicomflow route",
                              json_schema_extra={"$id": "https://dicomflow.example/schema/route.json"})

    name: KebabName
    description: str | None = None
    enabled: bool = True
    #: tenants this route applies to; omitted: every tenant
    tenants: list[str] | None = None
    events: list[EventType] = Field(min_length=1)
    #: quiet time for series.stable / study.stable (e.g. 90s, 5m); default: the tenant's or the server's
    stable_after: Duration | None = None
    #: attribute (keyword or 8-hex tag) -> condition; all must hold
    match: dict[str, ConditionSpec] = Field(default_factory=dict)
    source: SourceMatch | None = None
    actions: list[Action] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value == COMMITMENT_REPORT:
            raise ValueError(f"{value!r} is reserved for storage commitment reports")
        return value

    @field_validator("events")
    @classmethod
    def _route_events(cls, value: list[EventType]) -> list[EventType]:
        internal = [e.value for e in value if not e.is_route_event]
        if internal:
            raise ValueError(f"{', '.join(internal)} is not an event routes can listen to")
        return value

    @field_validator("match")
    @classmethod
    def _known_attributes(cls, value: dict[str, Condition]) -> dict[str, Condition]:
        for name in value:
            attribute_tag(name)
        return value

    @model_validator(mode="after")
    def _stable(self) -> Route:
        if self.stable_after is not None and not any(e.value.endswith(".stable") for e in self.events):
            raise ValueError("stable_after only applies to series.stable or study.stable events")
        return self

    def conditions(self) -> list[tuple[str, Condition]]:
        return [(attribute_tag(k), v) for k, v in self.match.items()]


def route_json_schema() -> dict[str, Any]:
    schema = Route.model_json_schema(by_alias=True)
    events = schema.get("$defs", {}).get("EventType", {})
    if "enum" in events:  # internal events are not offered to route authors
        events["enum"] = [e.value for e in EventType if e.is_route_event]
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
