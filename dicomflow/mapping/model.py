"""Mapping files (mappings/*.yaml): which FHIR resources to build from a study, as JSON templates.

A template is plain JSON/YAML; a mapping ``{"$op": arg, ...options}`` inside it is a transform from a
closed set (see :data:`OPERATIONS`). There is no expression language and nothing is ever evaluated as
code, so a mapping can be reviewed by an analyst and tested offline against golden FHIR JSON.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dicomflow.engine.routes import ConditionSpec, KebabName
from dicomflow.model import attribute_tag

#: operation -> the option keys it accepts besides its own
OPERATIONS: dict[str, frozenset[str]] = {
    "$attr": frozenset({"default", "all"}),   # value of an attribute (instance -> series -> study)
    "$var": frozenset(),                      # tenant, dicomweb_root, study_url
    "$concat": frozenset(),                   # join the parts; nothing if any part is missing
    "$int": frozenset(),                      # attribute as an integer
    "$date": frozenset(),                     # DA -> FHIR date
    "$datetime": frozenset(),                 # [DA, TM] -> FHIR dateTime (with the mapping's timezone)
    "$name": frozenset({"as"}),               # PN -> HumanName (or text with as: text)
    "$gender": frozenset(),                   # CS M/F/O -> FHIR administrative gender
    "$map": frozenset({"table", "default"}),  # attribute value -> template from a table
    "$issuer": frozenset({"default"}),        # IssuerOfPatientID -> identifier system URI
    "$ref": frozenset(),                      # reference to a resource built earlier in this mapping
    "$count": frozenset(),                    # series | instances
    "$each": frozenset({"do"}),               # series | instances: a list, one item per element
    "$codes": frozenset({"system", "over"}),  # distinct values of an attribute -> list of Coding
    "$codeseq": frozenset(),                  # code sequence (e.g. ProcedureCodeSequence) -> CodeableConcepts
    "$if": frozenset({"then"}),               # the template in then, only when the attribute has a value
}

_FHIR_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]+$")
_ID_RE = re.compile(r"^[a-z][a-z0-9-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IdentifierKey(_Strict):
    """The identifier a resource is upserted by (conditional update ``?identifier=system|value``)."""

    system: Any
    value: Any


class ResourceTemplate(_Strict):
    #: local name, used by {$ref: name}
    id: str = Field(pattern=_ID_RE.pattern)
    type: str = Field(pattern=_FHIR_TYPE_RE.pattern, description="FHIR R4 resource type, e.g. ImagingStudy")
    #: study-level conditions; the resource is built only when all hold
    when: dict[str, ConditionSpec] = Field(default_factory=dict)
    key: IdentifierKey
    body: dict[str, Any]


class Mapping(_Strict):
    """One mapping file."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="dicomflow mapping",
                              json_schema_extra={"$id": "https://dicomflow.example/schema/mapping.json"})

    name: KebabName
    description: str | None = None
    #: UTC offset (e.g. +01:00) for DICOM dates and times without TimezoneOffsetFromUTC; none: dates only
    timezone: str | None = Field(default=None, pattern=r"^[+-]\d{2}:\d{2}$|^Z$")
    resources: list[ResourceTemplate] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Mapping:
        seen: list[str] = []
        for i, res in enumerate(self.resources):
            if res.id in seen:
                raise ValueError(f"resources.{i}: duplicate resource id {res.id!r}")
            for name in res.when:
                attribute_tag(name)
            for where, template in (("key", res.key.model_dump()), ("body", res.body)):
                problem = check_template(template, seen)
                if problem is not None:
                    raise ValueError(f"resources.{i} ({res.id}).{where}: {problem}")
            seen.append(res.id)
        return self


def _operation(template: dict[str, Any]) -> str | None:
    ops = [k for k in template if isinstance(k, str) and k.startswith("$")]
    return ops[0] if len(ops) == 1 else ("$?" if ops else None)


def check_template(template: Any, earlier: list[str], path: str = "") -> str | None:
    """A plain message for the first problem in a template, or None."""
    if isinstance(template, list):
        for i, item in enumerate(template):
            problem = check_template(item, earlier, f"{path}[{i}]")
            if problem:
                return problem
        return None
    if not isinstance(template, dict):
        return None
    op = _operation(template)
    if op is None:
        for key, value in template.items():
            problem = check_template(value, earlier, f"{path}.{key}" if path else str(key))
            if problem:
                return problem
        return None
    where = path or "(top)"
    if op not in OPERATIONS:
        known = ", ".join(sorted(OPERATIONS))
        return f"{where}: unknown transform {op!r} (or more than one $ key); known: {known}"
    extra = set(template) - {op} - OPERATIONS[op]
    if extra:
        return f"{where}: {op} does not take {', '.join(sorted(extra))}"
    arg = template[op]
    try:
        if op in ("$attr", "$int", "$date", "$name", "$gender", "$issuer", "$codeseq", "$if"):
            attribute_tag(str(arg))
        elif op == "$map":
            attribute_tag(str(arg))
            if not isinstance(template.get("table"), dict):
                return f"{where}: $map needs a table"
        elif op == "$datetime":
            if not (isinstance(arg, list) and len(arg) == 2):
                return f"{where}: $datetime takes [DateAttribute, TimeAttribute]"
            for a in arg:
                attribute_tag(str(a))
        elif op == "$codes":
            attribute_tag(str(arg))
            if template.get("over", "series") not in ("series", "instances"):
                return f"{where}: $codes over must be series or instances"
        elif op == "$var" and arg not in ("tenant", "dicomweb_root", "study_url", "study_uid"):
            return f"{where}: unknown variable {arg!r} (tenant, dicomweb_root, study_url, study_uid)"
        elif op == "$ref" and arg not in earlier:
            return f"{where}: $ref {arg!r} is not a resource defined earlier in this mapping"
        elif op in ("$count", "$each") and arg not in ("series", "instances"):
            return f"{where}: {op} takes series or instances"
        elif op == "$concat" and not isinstance(arg, list):
            return f"{where}: $concat takes a list"
    except ValueError as exc:
        return f"{where}: {exc}"
    for key in ("do", "default", "table", "then"):
        if key in template:
            problem = check_template(template[key], earlier, f"{where}.{key}")
            if problem:
                return problem
    if op == "$concat":
        return check_template(arg, earlier, where)
    return None


def mapping_json_schema() -> dict[str, Any]:
    schema = Mapping.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
