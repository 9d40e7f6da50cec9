"""Evaluate a mapping against a study: build FHIR resources and validate them with fhir.resources (R4B)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from dicomflow.engine.matching import condition_holds, values_of
from dicomflow.mapping.model import Mapping, ResourceTemplate
from dicomflow.mapping.view import InstanceView, SeriesView, StudyView
from dicomflow.model import attribute_tag

#: DICOM Coding Scheme Designators -> FHIR code system URIs (PS3.16 Table 8-1 / FHIR terminology)
CODE_SYSTEMS = {
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "SCT": "http://snomed.info/sct",
    "SRT": "http://snomed.info/sct",
    "LN": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
    "RADLEX": "http://radlex.org",
    "ICD10": "http://hl7.org/fhir/sid/icd-10",
}
_OID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")


class MappingError(Exception):
    """A mapping could not produce a valid resource from this study (a dead letter, not a retry)."""


@dataclass(frozen=True, slots=True)
class BuiltResource:
    """One resource ready to upsert: its local id, type, identifier key and validated JSON body."""

    id: str
    type: str
    key_system: str
    key_value: str
    body: dict[str, Any]

    @property
    def search_identifier(self) -> str:
        """The ``identifier`` search value, escaped (FHIR R4 3.1.1.5.7: ``\\``, ``,``, ``|``, ``$``)."""
        return f"{escape_search(self.key_system)}|{escape_search(self.key_value)}"


def escape_search(value: str) -> str:
    """Escape a token for a FHIR search parameter, so that a comma is not read as OR (FHIR R4 3.1.1.5.7)."""
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("|", "\\|").replace("$", "\\$")


class _Context:
    def __init__(self, study: StudyView, timezone: str | None, refs: dict[str, str | None],
                 series: SeriesView | None = None, instance: InstanceView | None = None) -> None:
        self.study = study
        self.timezone = timezone
        self.refs = refs
        self.series = series
        self.instance = instance

    def child(self, series: SeriesView | None = None, instance: InstanceView | None = None) -> _Context:
        return _Context(self.study, self.timezone, self.refs, series or self.series, instance)

    def layers(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.instance is not None:
            out.append(self.instance.attrs())
        if self.series is not None:
            out.append(self.series.attrs)
        out.append(self.study.attrs)
        if self.series is None and self.study.series:  # series-level attributes seen from the study
            out.append(self.study.series[0].attrs)
        return out

    def element(self, name: str) -> dict[str, Any] | None:
        tag = attribute_tag(name)
        for layer in self.layers():
            element = layer.get(tag)
            if isinstance(element, dict):
                return element
        return None

    def values(self, name: str) -> list[str]:
        tag = attribute_tag(name)
        for layer in self.layers():
            found = values_of(layer, tag)
            if found:
                return found
        return []

    def instances(self) -> list[InstanceView]:
        if self.series is not None:
            return list(self.series.instances)
        return [i for s in self.study.series for i in s.instances]


def _fhir_date(value: str) -> str | None:
    v = value.strip()
    if re.fullmatch(r"\d{8}", v):
        return f"{v[:4]}-{v[4:6]}-{v[6:]}"
    if re.fullmatch(r"\d{6}", v):
        return f"{v[:4]}-{v[4:6]}"
    if re.fullmatch(r"\d{4}", v):
        return v
    return None


def _fhir_time(value: str) -> str | None:
    v = value.strip()
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?", v)
    if not match:
        return None
    hh, mm, ss, frac = match.group(1), match.group(2) or "00", match.group(3) or "00", match.group(4) or ""
    return f"{hh}:{mm}:{ss}{frac}"


def _tz(ctx: _Context) -> str | None:
    offset = ctx.values("TimezoneOffsetFromUTC")
    if offset and re.fullmatch(r"[+-]\d{4}", offset[0].strip()):
        o = offset[0].strip()
        return f"{o[:3]}:{o[3:]}"
    return ctx.timezone


def _human_name(element: dict[str, Any] | None) -> dict[str, Any] | None:
    values = (element or {}).get("Value") or []
    if not values or not isinstance(values[0], dict):
        return None
    alphabetic = str(values[0].get("Alphabetic") or "")
    if not alphabetic:
        return None
    # PS3.5 6.2.1: family^given^middle^prefix^suffix
    parts = [*alphabetic.split("^"), "", "", "", ""][:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    name: dict[str, Any] = {"family": family or None, "given": [g for g in (given, middle) if g] or None,
                            "prefix": [prefix] if prefix else None, "suffix": [suffix] if suffix else None}
    text = " ".join(p for p in (prefix, given, middle, family, suffix) if p)
    name["text"] = text or None
    return name


def _coding_from_item(item: dict[str, Any]) -> dict[str, Any] | None:
    code = values_of(item, "00080100") or values_of(item, "00080119") or values_of(item, "00080120")
    scheme = values_of(item, "00080102")
    meaning = values_of(item, "00080104")
    if not code and not meaning:
        return None
    system = CODE_SYSTEMS.get(scheme[0].upper()) if scheme else None
    if system is None and scheme:
        system = f"urn:dicom:coding-scheme:{scheme[0]}"
    return {"system": system, "code": code[0] if code else None, "display": meaning[0] if meaning else None}


def evaluate(template: Any, ctx: _Context) -> Any:
    """Evaluate a template: plain values are copied, ``{"$op": ...}`` mappings are transforms."""
    if isinstance(template, list):
        out = [evaluate(item, ctx) for item in template]
        flat: list[Any] = []
        for item in out:
            if isinstance(item, list):
                flat.extend(item)  # a $each inside a list contributes its items
            else:
                flat.append(item)
        return flat
    if not isinstance(template, dict):
        return template
    ops = [k for k in template if isinstance(k, str) and k.startswith("$")]
    if not ops:
        return {k: evaluate(v, ctx) for k, v in template.items()}
    op, arg = ops[0], template[ops[0]]
    if op == "$attr":
        values = ctx.values(str(arg))
        if template.get("all"):
            return values or evaluate(template.get("default"), ctx)
        return values[0].strip() if values and values[0].strip() else evaluate(template.get("default"), ctx)
    if op == "$var":
        return ctx.study.variables.get(str(arg))
    if op == "$concat":
        parts = [evaluate(p, ctx) for p in arg]
        if any(p is None or p == "" for p in parts):
            return None
        return "".join(str(p) for p in parts)
    if op == "$int":
        values = ctx.values(str(arg))
        try:
            return int(float(values[0])) if values else None
        except ValueError:
            return None
    if op == "$date":
        values = ctx.values(str(arg))
        return _fhir_date(values[0]) if values else None
    if op == "$datetime":
        dates, times = ctx.values(str(arg[0])), ctx.values(str(arg[1]))
        date = _fhir_date(dates[0]) if dates else None
        if date is None or len(date) != 10:
            return date
        time = _fhir_time(times[0]) if times else None
        tz = _tz(ctx)
        if time is None or tz is None:  # FHIR dateTime: a time needs a time zone
            return date
        return f"{date}T{time}{tz}"
    if op == "$name":
        name = _human_name(ctx.element(str(arg)))
        if template.get("as") == "text":
            return name.get("text") if name else None
        return name
    if op == "$gender":
        values = ctx.values(str(arg))
        code = values[0].strip().upper() if values else ""
        return {"M": "male", "F": "female", "O": "other"}.get(code, "unknown" if code else None)
    if op == "$map":
        values = ctx.values(str(arg))
        table = template["table"]
        key = values[0].strip() if values else None
        if key is not None and key in table:
            return evaluate(table[key], ctx)
        return evaluate(template.get("default"), ctx) if key is not None else None
    if op == "$issuer":
        values = ctx.values(str(arg))
        issuer = values[0].strip() if values else ""
        if not issuer:
            return evaluate(template.get("default"), ctx)
        if _OID_RE.match(issuer):
            return f"urn:oid:{issuer}"
        if _URI_RE.match(issuer):
            return issuer
        slug = re.sub(r"[^A-Za-z0-9.-]+", "-", issuer).strip("-")
        return f"urn:dicomflow:issuer:{slug}"
    if op == "$ref":
        return ctx.refs.get(str(arg))
    if op == "$count":
        return len(ctx.study.series) if arg == "series" else len(ctx.instances())
    if op == "$each":
        body = template.get("do")
        if arg == "series":
            return [evaluate(body, ctx.child(series=s)) for s in ctx.study.series]
        return [evaluate(body, ctx.child(instance=i)) for i in ctx.instances()]
    if op == "$codes":
        tag = attribute_tag(str(arg))
        seen: list[str] = []
        layers = ([s.attrs for s in ctx.study.series] if template.get("over", "series") == "series"
                  else [i.attrs() for i in ctx.instances()])
        for layer in layers:
            for v in values_of(layer, tag):
                if v.strip() and v.strip() not in seen:
                    seen.append(v.strip())
        return [{"system": evaluate(template.get("system"), ctx), "code": v} for v in seen]
    if op == "$codeseq":
        element = ctx.element(str(arg))
        items = (element or {}).get("Value") or []
        concepts = []
        for item in items:
            if isinstance(item, dict):
                coding = _coding_from_item(item)
                if coding is not None:
                    concepts.append({"coding": [coding], "text": coding.get("display")})
        return concepts
    if op == "$if":
        return evaluate(template.get("then"), ctx) if any(v.strip() for v in ctx.values(str(arg))) else None
    raise MappingError(f"unknown transform {op}")  # unreachable: checked when the mapping is loaded


def prune(value: Any) -> Any:
    """Drop None, empty strings, lists and objects (FHIR forbids empty elements)."""
    if isinstance(value, dict):
        out = {k: prune(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, "", [], {})}
    if isinstance(value, list):
        items = [prune(v) for v in value]
        return [v for v in items if v not in (None, "", [], {})]
    if isinstance(value, str):
        return value.strip()
    return value


def validate_resource(resource_type: str, body: dict[str, Any], mapping: str) -> dict[str, Any]:
    """Validate with fhir.resources (FHIR R4B, whose Patient/ImagingStudy/Endpoint equal R4's)."""
    try:
        model = get_fhir_model_class(resource_type)
    except KeyError:
        raise MappingError(f"mapping {mapping!r}: unknown FHIR resource type {resource_type!r}") from None
    try:
        model.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise MappingError(f"mapping {mapping!r} produced an invalid {resource_type}: {problems}") from None
    return body


def build_resources(mapping: Mapping, study: StudyView, refs: dict[str, str | None] | None = None
                    ) -> list[tuple[ResourceTemplate, BuiltResource | None]]:
    """Build every resource of a mapping in order; ``None`` for a resource whose ``when`` fails.

    ``refs`` maps the local id of an earlier resource to its reference (``Patient/123``); callers
    that upsert one resource at a time fill it in as they go (see :func:`build_one`).
    """
    refs = refs if refs is not None else {}
    out: list[tuple[ResourceTemplate, BuiltResource | None]] = []
    for template in mapping.resources:
        built = build_one(mapping, template, study, refs)
        out.append((template, built))
        if built is not None and template.id not in refs:
            refs[template.id] = f"{built.type}?identifier={built.search_identifier}"
    return out


def build_one(mapping: Mapping, template: ResourceTemplate, study: StudyView,
              refs: dict[str, str | None]) -> BuiltResource | None:
    ctx = _Context(study, mapping.timezone, refs)
    for name, condition in template.when.items():
        if not condition_holds(condition, ctx.values(name)):
            return None
    system, value = key_of(mapping, template, study)
    body = {"resourceType": template.type, **prune(evaluate(template.body, ctx))}
    validate_resource(template.type, body, mapping.name)
    return BuiltResource(template.id, template.type, system, value, body)


def key_of(mapping: Mapping, template: ResourceTemplate, study: StudyView) -> tuple[str, str]:
    """The (system, value) identifier a resource is upserted by."""
    ctx = _Context(study, mapping.timezone, {})
    system = prune(evaluate(template.key.system, ctx))
    value = prune(evaluate(template.key.value, ctx))
    if not isinstance(system, str) or not isinstance(value, str) or not system or not value:
        raise MappingError(f"mapping {mapping.name!r}: the identifier key of {template.id!r} is empty for this study")
    return system, value
