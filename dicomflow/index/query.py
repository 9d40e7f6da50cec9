"""The one matcher behind QIDO-RS (PS3.18 10.6) and C-FIND (PS3.4 C.4.1): requests become a :class:`Query`.

Using it
--------
QIDO-RS::

    query, warnings = parse_qido(Level.STUDY, request.query.items(), pn_case_insensitive=True)

C-FIND (``identifier`` is ``Dataset.to_json_dict()`` of the request identifier, values already decoded
with its Specific Character Set)::

    query = query_from_identifier(identifier, Level.STUDY, pn_case_insensitive=True, limit=1000)

Then, for both::

    results = index.search(tenant, query)     # IndexStore.search: a SearchResults, nothing runs yet
    async with results:                       # closes the database cursor early (C-CANCEL)
        async for match in results:           # PS3.18 JSON dicts, streamed in a stable order
            ...
    results.truncated                         # True when query.limit cut the answer short

A pynetdicom handler thread drives the same object on the server's loop, one match per pending
response: ``run_on_loop(loop, results.__anext__(), timeout)`` until ``StopAsyncIteration``, and
``run_on_loop(loop, results.aclose(), timeout)`` on C-CANCEL (the database pool belongs to that loop).

Every match is a PS3.18 F.2 JSON dict with decoded (Unicode) values, so PN Alphabetic/Ideographic/
Phonetic groups come back as stored. A C-FIND adapter encodes them with ``SpecificCharacterSet =
"ISO_IR 192"`` (the stored 0008,0005 describes the stored bytes, not the decoded text). RetrieveURL
(0008,1190) needs the request's base URL and is added by the QIDO adapter; Retrieve AE Title and Query
Retrieve Level by the C-FIND adapter.

Matching (PS3.4 C.2.2.2)
------------------------
* Universal: an empty value (or ``*`` alone) only asks for the attribute to be returned.
* Single value: exact and case-sensitive, except PN when the tenant's ``pn_case_insensitive`` is on.
  Numbers (IS, DS, US, ...) compare numerically. Several values (QIDO ``\\``-separated, C-FIND VM > 1)
  match when any matches.
* List of UIDs: ``\\``- or ``,``-separated in QIDO (PS3.18 8.3.4.1), each validated.
* Wild card: ``*`` and ``?`` in string VRs (not UI, dates, times or numbers).
* Range: DA, TM, DT as ``a-b``, ``-b`` or ``a-``. An upper bound includes everything within its precision
  (``-1100`` includes 11:00:59). A single TM/DT value also matches with its precision (``1015`` matches
  ``101530``).
* Sequence: QIDO ``RequestAttributesSequence.ScheduledProcedureStepID=X`` or a C-FIND sequence key with
  one item; an entity matches when one of its items matches every non-empty item key.
* PN: a value of one component group (``Doe^John``) matches when any stored group (Alphabetic,
  Ideographic or Phonetic) matches it; with several groups (``Yamada^Tarou=山田^太郎``) each given group
  must match the stored group at the same position.
* ``fuzzymatching=true`` (PS3.18 8.3.4.1): a PN value is split into words at ``^``, spaces and commas; an
  entity matches when every word is, ignoring case, the beginning of some name component of one group
  (``joh do`` matches ``Doe^John``). Other VRs are matched as without fuzzy matching.

Attributes of the patient and study levels live in the ``studies`` table, series attributes in
``series``, everything else in ``instances`` (see :mod:`dicomflow.index.levels`). Attributes with a column
are matched in SQL; others by a post-filter over the stored JSON, which keeps limit/offset exact.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import TracebackType
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag

from dicomflow.errors import InvalidQueryError
from dicomflow.index.levels import is_series_level, is_study_level
from dicomflow.model import BULK_PLACEHOLDER, HEX_TAG, Level, attribute_tag, is_valid_uid

# -- attribute identifiers -------------------------------------------------------------------------

STUDY_UID = "0020000D"
SERIES_UID = "0020000E"
SOP_UID = "00080018"
PATIENT_ID = "00100020"
SPECIFIC_CHARACTER_SET = "00080005"
QUERY_RETRIEVE_LEVEL = "00080052"
RETRIEVE_AE_TITLE = "00080054"
INSTANCE_AVAILABILITY = "00080056"
RETRIEVE_URL = "00081190"
MODALITIES_IN_STUDY = "00080061"
SOP_CLASSES_IN_STUDY = "00080062"
NUM_PATIENT_STUDIES = "00201200"
NUM_PATIENT_SERIES = "00201202"
NUM_PATIENT_INSTANCES = "00201204"
NUM_STUDY_SERIES = "00201206"
NUM_STUDY_INSTANCES = "00201208"
NUM_SERIES_INSTANCES = "00201209"

#: Attributes computed by the index, not stored in any instance (PS3.4 C.6.1.1 / PS3.18 Table 10.6.3-3..5).
COMPUTED_LEVEL: dict[str, Level] = {
    NUM_PATIENT_STUDIES: Level.PATIENT, NUM_PATIENT_SERIES: Level.PATIENT,
    NUM_PATIENT_INSTANCES: Level.PATIENT,
    MODALITIES_IN_STUDY: Level.STUDY, SOP_CLASSES_IN_STUDY: Level.STUDY,
    NUM_STUDY_SERIES: Level.STUDY, NUM_STUDY_INSTANCES: Level.STUDY,
    NUM_SERIES_INSTANCES: Level.SERIES,
}

#: Attributes that are never matched: they describe the request or are filled in by the adapters.
NEVER_MATCHED = frozenset({SPECIFIC_CHARACTER_SET, QUERY_RETRIEVE_LEVEL, RETRIEVE_AE_TITLE,
                           INSTANCE_AVAILABILITY, RETRIEVE_URL, "00080201"})

UNIQUE_KEY: dict[Level, str] = {Level.PATIENT: PATIENT_ID, Level.STUDY: STUDY_UID,
                                Level.SERIES: SERIES_UID, Level.IMAGE: SOP_UID}

_DEPTH = {Level.PATIENT: 0, Level.STUDY: 1, Level.SERIES: 2, Level.IMAGE: 3}

#: PS3.18 Table 10.6.3-3 (plus Study Description, which every study list shows).
STUDY_DEFAULTS = frozenset({
    SPECIFIC_CHARACTER_SET, "00080020", "00080030", "00080050", INSTANCE_AVAILABILITY, MODALITIES_IN_STUDY,
    "00080090", "00080201", RETRIEVE_URL, "00100010", PATIENT_ID, "00100030", "00100040", STUDY_UID,
    "00200010", NUM_STUDY_SERIES, NUM_STUDY_INSTANCES, "00081030",
})
#: PS3.18 Table 10.6.3-4 (plus Study Instance UID, so that a series can be retrieved).
SERIES_DEFAULTS = frozenset({
    SPECIFIC_CHARACTER_SET, "00080060", "00080201", "0008103E", RETRIEVE_URL, SERIES_UID, "00200011",
    NUM_SERIES_INSTANCES, "00400244", "00400245", "00400275", STUDY_UID, INSTANCE_AVAILABILITY,
})
#: PS3.18 Table 10.6.3-5 (plus the Study and Series Instance UIDs).
INSTANCE_DEFAULTS = frozenset({
    SPECIFIC_CHARACTER_SET, "00080016", SOP_UID, INSTANCE_AVAILABILITY, "00080201", RETRIEVE_URL, "00200013",
    "00280010", "00280011", "00280100", "00280008", STUDY_UID, SERIES_UID,
})
#: Patient module attributes returned by default at the PATIENT level (PS3.4 C.6.1.1.2).
PATIENT_DEFAULTS = frozenset({SPECIFIC_CHARACTER_SET, "00100010", PATIENT_ID, "00100021", "00100030",
                              "00100040", NUM_PATIENT_STUDIES, NUM_PATIENT_SERIES, NUM_PATIENT_INSTANCES})

_STRING_VRS = frozenset({"AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
_INT_VRS = frozenset({"IS", "SL", "SS", "UL", "US", "SV", "UV"})
_FLOAT_VRS = frozenset({"DS", "FL", "FD"})
_RANGE_VRS = frozenset({"DA", "TM", "DT"})

_DA_RE = re.compile(r"^\d{8}$")
_TM_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_DT_RE = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")
MAX_VALUE_LENGTH = 1024
#: Largest limit/offset accepted (keeps values within every database's integer range)
MAX_COUNT = 2**31 - 1


def attribute_level(tag: str) -> Level:
    """The information-model level an attribute belongs to (patient attributes count as STUDY)."""
    if tag in COMPUTED_LEVEL:
        return COMPUTED_LEVEL[tag]
    if is_study_level(tag):
        return Level.STUDY
    if is_series_level(tag):
        return Level.SERIES
    return Level.IMAGE


def _level_allows(query_level: Level, tag: str) -> bool:
    """Whether ``tag`` may be a key at ``query_level``: the level itself or above (relational upward)."""
    if query_level is Level.PATIENT:
        return tag.startswith("0010") or COMPUTED_LEVEL.get(tag) is Level.PATIENT or tag == SPECIFIC_CHARACTER_SET
    level = attribute_level(tag)
    if level is Level.PATIENT:
        return False
    return _DEPTH[level] <= _DEPTH[query_level]


def vr_of(tag: str) -> str:
    """Dictionary VR of a tag; ambiguous VRs take their first option; unknown/private tags are ``UN``."""
    try:
        vr = str(dictionary_VR(int(tag, 16)))
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]


def name_of(tag: str) -> str:
    keyword = keyword_for_tag(int(tag, 16))
    return f"{tag} ({keyword})" if keyword else tag


def resolve_attribute(name: str) -> str:
    """A QIDO attribute ID (keyword or 8 hex digits) -> tag; :class:`InvalidQueryError` if unknown."""
    try:
        return attribute_tag(name)
    except ValueError:
        raise InvalidQueryError(f"unknown attribute {name!r}: not a DICOM keyword or tag (PS3.18 8.3.4.1)") from None


# -- query model -----------------------------------------------------------------------------------


class MatchType(StrEnum):
    """Matching types of PS3.4 C.2.2.2 (universal matching has no condition at all)."""

    SINGLE = "single"
    UID_LIST = "uid-list"
    WILDCARD = "wildcard"
    RANGE = "range"
    SEQUENCE = "sequence"
    FUZZY = "fuzzy"


@dataclass(frozen=True, slots=True)
class Condition:
    """One matching key. ``values`` are alternatives (any may match); ranges use ``low``/``high``."""

    tag: str
    vr: str
    match: MatchType
    values: tuple[str, ...] = ()
    low: str | None = None
    high: str | None = None
    items: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class Query:
    """A QIDO-RS request or a C-FIND identifier, ready for :meth:`IndexStore.search`.

    ``returns`` are extra attributes to return. QIDO returns the level's defaults plus ``returns``
    (everything when ``include_all``); C-FIND (``exact_returns``) returns exactly ``returns`` plus the
    unique keys, absent ones as empty elements. ``study_uid``/``series_uid`` scope the query (URL path).
    """

    level: Level
    conditions: tuple[Condition, ...] = ()
    study_uid: str | None = None
    series_uid: str | None = None
    returns: frozenset[str] = frozenset()
    include_all: bool = False
    exact_returns: bool = False
    #: C-FIND sequence return keys with item keys: tag -> requested item tags (PS3.4 C.2.2.1.3)
    sequence_returns: Mapping[str, frozenset[str]] = field(default_factory=dict)
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False
    pn_case_insensitive: bool = True
    #: tags the tenant indexes in ``extra_attributes`` (matched in SQL at the IMAGE level)
    extra_tags: frozenset[str] = frozenset()

    def return_tags(self) -> frozenset[str] | None:
        """Attributes to return, or None for "all of the level (and the levels above, unless scoped)"."""
        if self.include_all and not self.exact_returns:
            return None
        unique = {UNIQUE_KEY[lvl] for lvl in Level if _DEPTH[lvl] <= _DEPTH[self.level]}
        if self.level is not Level.PATIENT:
            unique.discard(PATIENT_ID)
        if self.exact_returns:
            return frozenset(self.returns | unique)
        defaults: set[str] = set()
        if self.level is Level.PATIENT:
            defaults |= PATIENT_DEFAULTS
        elif self.level is Level.STUDY:
            defaults |= STUDY_DEFAULTS
        elif self.level is Level.SERIES:
            defaults |= SERIES_DEFAULTS
            if self.study_uid is None:  # PS3.18 10.6.3.3.2: study attributes when not scoped to a study
                defaults |= STUDY_DEFAULTS - {NUM_STUDY_SERIES, NUM_STUDY_INSTANCES}
        else:
            defaults |= INSTANCE_DEFAULTS
            if self.series_uid is None:  # PS3.18 10.6.3.3.3: series (and study) attributes when unscoped
                defaults |= SERIES_DEFAULTS - {NUM_SERIES_INSTANCES}
            if self.study_uid is None:
                defaults |= STUDY_DEFAULTS - {NUM_STUDY_SERIES, NUM_STUDY_INSTANCES}
        return frozenset(defaults | self.returns)


# -- parsing values --------------------------------------------------------------------------------


def _bad(tag: str, why: str) -> InvalidQueryError:
    return InvalidQueryError(f"invalid value for {name_of(tag)}: {why}")


def _check_range_value(tag: str, vr: str, value: str) -> None:
    pattern = {"DA": _DA_RE, "TM": _TM_RE, "DT": _DT_RE}[vr]
    if not pattern.match(value):
        formats = {"DA": "YYYYMMDD", "TM": "HHMMSS.FFFFFF", "DT": "YYYYMMDDHHMMSS.FFFFFF&ZZXX"}[vr]
        raise _bad(tag, f"not a {vr} value ({formats}), PS3.5 6.2")


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _is_dt_with_offset(vr: str, value: str) -> bool:
    """``20240101120000-0500`` is one DT with a UTC offset, not a range (PS3.5 6.2 DT)."""
    if vr != "DT" or not _DT_RE.match(value):
        return False
    head, _, tail = value.rpartition("-")
    return len(tail) == 4 and len(head) >= 10 and "-" not in head


def parse_condition(tag: str, vr: str, values: list[str], *, fuzzy: bool = False) -> Condition | None:
    """One key's values (already split into alternatives) -> a Condition, or None for universal matching."""
    values = [v for v in values if v != ""]
    if not values or values == ["*"]:
        return None  # PS3.4 C.2.2.2.3 universal matching
    for v in values:
        if len(v) > MAX_VALUE_LENGTH:
            raise _bad(tag, f"longer than {MAX_VALUE_LENGTH} characters")
    if vr == "UI":
        for v in values:
            if not is_valid_uid(v):
                raise _bad(tag, "not a UID (PS3.5 9.1); wild cards are not allowed for UIDs")
        return Condition(tag, vr, MatchType.UID_LIST if len(values) > 1 else MatchType.SINGLE, tuple(values))
    if vr in _RANGE_VRS:
        if len(values) > 1:
            raise _bad(tag, "several values are not supported for dates and times")
        value = values[0]
        if "-" in value and not _is_dt_with_offset(vr, value):
            low, _, high = value.partition("-")
            if not low and not high:
                raise _bad(tag, "a range needs at least one bound")
            if low:
                _check_range_value(tag, vr, low)
            if high:
                _check_range_value(tag, vr, high)
            if low and high and low > high:
                raise _bad(tag, "range lower bound is after its upper bound")
            return Condition(tag, vr, MatchType.RANGE, low=low or None, high=high or None)
        _check_range_value(tag, vr, value)
        if vr == "DA":
            return Condition(tag, vr, MatchType.SINGLE, (value,))
        return Condition(tag, vr, MatchType.RANGE, low=value, high=value)  # same precision as the key
    if vr in _INT_VRS or vr in _FLOAT_VRS:
        for v in values:
            try:
                int(v) if vr in _INT_VRS else float(v)
            except ValueError:
                raise _bad(tag, f"not a number ({vr})") from None
        return Condition(tag, vr, MatchType.SINGLE, tuple(values))
    if vr == "SQ":
        raise _bad(tag, "sequences are matched through their item attributes (Sequence.Attribute=value)")
    if vr not in _STRING_VRS and vr != "UN":
        raise InvalidQueryError(f"matching on {name_of(tag)} (VR {vr}) is not supported")
    if vr == "PN" and fuzzy:
        return Condition(tag, vr, MatchType.FUZZY, tuple(values))
    kind = MatchType.WILDCARD if any(_has_wildcard(v) for v in values) else MatchType.SINGLE
    return Condition(tag, vr, kind, tuple(values))


def _bulk_free(value: Any) -> Any:
    """Drop BulkDataURI placeholders (QIDO responses carry no bulk data) from an element value tree."""
    if isinstance(value, dict):
        if "BulkDataURI" in value and str(value["BulkDataURI"]).startswith(BULK_PLACEHOLDER):
            return None
        if value.get("vr") == "SQ" and value.get("Value"):
            return {"vr": "SQ", "Value": [strip_bulk(item) for item in value["Value"]]}
    return value


def strip_bulk(attrs: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag, element in attrs.items():
        kept = _bulk_free(element)
        if kept is not None:
            out[tag] = kept
    return out


# -- QIDO-RS ---------------------------------------------------------------------------------------

#: QIDO query parameters that are not attribute keys (PS3.18 8.3.4, 8.3.3.1).
_CONTROL_PARAMS = frozenset({"includefield", "fuzzymatching", "limit", "offset", "accept", "charset"})


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise InvalidQueryError(f"{name} must be true or false")


def _parse_count(name: str, value: str) -> int:
    if not value.strip().isdigit():
        raise InvalidQueryError(f"{name} must be a non-negative integer")
    number = int(value)
    if number > MAX_COUNT:
        raise InvalidQueryError(f"{name} must be at most {MAX_COUNT}")
    return number


def _split_values(vr: str, value: str) -> list[str]:
    if vr == "UI":
        return [v.strip() for v in re.split(r"[,\\]", value)]  # PS3.18 8.3.4.1 UID list
    return value.split("\\")


def parse_qido(
    level: Level,
    params: Iterable[tuple[str, str]],
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    pn_case_insensitive: bool = True,
    extra_tags: frozenset[str] = frozenset(),
    default_limit: int = 1000,
    max_limit: int = 10000,
) -> tuple[Query, list[str]]:
    """QIDO-RS query parameters (PS3.18 8.3.4, 10.6.1) -> (Query, warnings for the Warning header).

    ``params`` are the decoded (percent-decoding done) name/value pairs in request order. Unknown
    parameters, unknown attributes and malformed values raise :class:`InvalidQueryError` (400). Keys
    below the query level are ignored with a warning, as PS3.18 10.6.1.2 lets the origin server ignore
    keys it does not support.
    """
    warnings: list[str] = []
    returns: set[str] = set()
    include_all = False
    fuzzy = False
    limit: int | None = None
    offset = 0
    keys: dict[str, list[str]] = {}
    seq_keys: dict[tuple[str, ...], list[str]] = {}
    seen_control: set[str] = set()
    for raw_name, value in params:
        name = raw_name.strip()
        if name in _CONTROL_PARAMS:
            if name != "includefield" and name in seen_control:
                raise InvalidQueryError(f"query parameter {name!r} given more than once")
            seen_control.add(name)
        if name == "includefield":
            for item in value.split(","):
                item = item.strip()
                if not item:
                    continue
                if item.lower() == "all":
                    include_all = True
                    continue
                tag = resolve_attribute(item.split(".")[0])
                if not _level_allows(level, tag) and tag not in NEVER_MATCHED:
                    warnings.append(f"includefield {name_of(tag)} is not an attribute of the {level.value} "
                                    "level; ignored")
                    continue
                returns.add(tag)
        elif name == "fuzzymatching":
            fuzzy = _parse_bool(name, value)
        elif name == "limit":
            limit = _parse_count(name, value)
        elif name == "offset":
            offset = _parse_count(name, value)
        elif name in ("accept", "charset"):
            continue  # media type negotiation: handled by the adapter
        elif not name:
            raise InvalidQueryError("empty query parameter name")
        elif "." in name:
            path = tuple(resolve_attribute(part) for part in name.split("."))
            if vr_of(path[0]) != "SQ" or any(vr_of(p) != "SQ" for p in path[:-1]):
                raise InvalidQueryError(f"{name!r}: only sequence attributes may be followed by '.'")
            seq_keys.setdefault(path, []).append(value)
        else:
            tag = resolve_attribute(name)
            keys.setdefault(tag, []).append(value)

    conditions: list[Condition] = []
    for tag, raw_values in keys.items():
        if tag in NEVER_MATCHED:
            warnings.append(f"{name_of(tag)} is never matched; ignored")
            continue
        if not _level_allows(level, tag):
            warnings.append(f"{name_of(tag)} is not an attribute of the {level.value} level; ignored")
            continue
        vr = vr_of(tag)
        if len(raw_values) > 1 and vr != "UI":
            raise InvalidQueryError(f"{name_of(tag)} given more than once")
        returns.add(tag)
        split: list[str] = []
        for raw in raw_values:
            split.extend(_split_values(vr, raw))
        if vr == "SQ":
            if any(split):
                raise _bad(tag, "sequences are matched through their item attributes (Sequence.Attribute=value)")
            continue
        cond = parse_condition(tag, vr, split, fuzzy=fuzzy)
        if cond is not None:
            conditions.append(cond)
    for path, raw_values in seq_keys.items():
        if not _level_allows(level, path[0]):
            warnings.append(f"{name_of(path[0])} is not an attribute of the {level.value} level; ignored")
            continue
        if len(raw_values) > 1:
            raise InvalidQueryError(f"{'.'.join(path)} given more than once")
        returns.add(path[0])
        leaf_vr = vr_of(path[-1])
        leaf = parse_condition(path[-1], leaf_vr, _split_values(leaf_vr, raw_values[0]), fuzzy=fuzzy)
        if leaf is None:
            continue
        for outer in reversed(path[:-1]):
            leaf = Condition(outer, "SQ", MatchType.SEQUENCE, items=(leaf,))
        conditions.append(leaf)

    effective = default_limit if limit is None or limit == 0 else limit
    if effective > max_limit:
        warnings.append(f"limit {effective} exceeds the maximum of {max_limit}; at most {max_limit} results")
        effective = max_limit
    query = Query(level=level, conditions=tuple(conditions), study_uid=study_uid, series_uid=series_uid,
                  returns=frozenset(returns), include_all=include_all, limit=effective, offset=offset,
                  fuzzy=fuzzy, pn_case_insensitive=pn_case_insensitive, extra_tags=extra_tags)
    return query, warnings


# -- C-FIND ----------------------------------------------------------------------------------------


def _json_strings(element: Mapping[str, Any]) -> list[str]:
    """Values of a PS3.18 JSON element as DICOM strings (PN groups joined with '=')."""
    out: list[str] = []
    for v in element.get("Value") or ():
        if isinstance(v, dict):
            groups = [v.get("Alphabetic", ""), v.get("Ideographic", ""), v.get("Phonetic", "")]
            while groups and not groups[-1]:
                groups.pop()
            out.append("=".join(groups))
        elif isinstance(v, float) and v.is_integer():
            out.append(str(int(v)))
        else:
            out.append(str(v))
    return out


def _identifier_conditions(identifier: Mapping[str, Any], level: Level | None,
                           returns: set[str] | None, seq_returns: dict[str, frozenset[str]] | None
                           ) -> list[Condition]:
    conditions: list[Condition] = []
    for raw_tag, element in identifier.items():
        tag = raw_tag.upper()
        if not HEX_TAG.match(tag) or not isinstance(element, Mapping):
            raise InvalidQueryError(f"identifier attribute {raw_tag!r} is not a PS3.18 JSON element")
        if tag in (QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET) or int(tag[4:], 16) == 0:
            continue
        vr = str(element.get("vr") or vr_of(tag))
        has_value = bool(element.get("Value"))
        if level is not None:
            allowed = _level_allows(level, tag)
            if not allowed and has_value and tag not in NEVER_MATCHED:
                raise InvalidQueryError(f"{name_of(tag)} is below the {level.value} level "
                                        "(PS3.4 C.4.1.2.1: keys at or above the query level only)")
        if returns is not None:
            returns.add(tag)
        if tag in NEVER_MATCHED or not has_value:
            continue
        if vr == "SQ":
            items = element["Value"]
            if len(items) != 1 or not isinstance(items[0], Mapping):
                raise _bad(tag, "a sequence key holds exactly one item (PS3.4 C.2.2.2.6)")
            item = items[0]
            if seq_returns is not None:
                seq_returns[tag] = frozenset(k.upper() for k in item)
            inner = _identifier_conditions(item, None, None, None)
            if inner:
                conditions.append(Condition(tag, "SQ", MatchType.SEQUENCE, items=tuple(inner)))
            continue
        if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN", "AT"):
            raise InvalidQueryError(f"matching on {name_of(tag)} (VR {vr}) is not supported")
        values = _json_strings(element)
        cond = parse_condition(tag, vr, values)
        if cond is not None:
            conditions.append(cond)
    return conditions


def query_from_identifier(
    identifier: Mapping[str, Any],
    level: Level,
    *,
    pn_case_insensitive: bool = True,
    extra_tags: frozenset[str] = frozenset(),
    limit: int | None = None,
) -> Query:
    """A C-FIND request identifier (PS3.18 JSON, e.g. ``Dataset.to_json_dict()``) -> Query.

    Every attribute present is a return key; those with a value are also matching keys (PS3.4 C.2.2.1).
    Query/Retrieve Level and Specific Character Set are never matched. A key with a value below
    ``level`` raises :class:`InvalidQueryError` (the C-FIND adapter answers 0xA900). Results hold
    exactly the return keys (empty when the entity has no value), plus the unique keys.
    """
    returns: set[str] = set()
    seq_returns: dict[str, frozenset[str]] = {}
    conditions = _identifier_conditions(identifier, level, returns, seq_returns)
    return Query(level=level, conditions=tuple(conditions), returns=frozenset(returns), exact_returns=True,
                 sequence_returns=seq_returns, limit=limit, pn_case_insensitive=pn_case_insensitive,
                 extra_tags=extra_tags)


# -- matching in Python (the post-filter) ----------------------------------------------------------

_WILDCARD_CACHE: dict[tuple[str, bool], re.Pattern[str]] = {}


def wildcard_regex(pattern: str, ignore_case: bool = False) -> re.Pattern[str]:
    """PS3.4 C.2.2.2.4: ``*`` any sequence (also empty), ``?`` one character; everything else literal."""
    key = (pattern, ignore_case)
    compiled = _WILDCARD_CACHE.get(key)
    if compiled is None:
        body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
        compiled = re.compile(body, re.DOTALL | (re.IGNORECASE if ignore_case else 0))
        if len(_WILDCARD_CACHE) < 4096:
            _WILDCARD_CACHE[key] = compiled
    return compiled


def upper_bound(vr: str, value: str) -> str:
    """An inclusive upper bound string that covers everything within the bound's precision."""
    if vr == "TM":
        return value + "235959.999999"[len(value):] if len(value) < 13 else value
    if vr == "DT":
        zone = ""
        m = re.search(r"[+-]\d{4}$", value)
        if m:
            value, zone = value[: m.start()], m.group()
        full = "99991231235959.999999"
        return (value + full[len(value):] if len(value) < len(full) else value) + zone
    return value


def _pn_groups(value: str) -> list[str]:
    groups = value.split("=")
    return groups + [""] * (3 - len(groups))


_FUZZY_SPLIT = re.compile(r"[\^ ,]+")


def _pn_fuzzy(query: str, stored: str) -> bool:
    words = [w.strip("*").upper() for w in _FUZZY_SPLIT.split(query.replace("=", " ")) if w.strip("*")]
    if not words:
        return True
    for group in _pn_groups(stored):
        components = [c.upper() for c in _FUZZY_SPLIT.split(group) if c]
        if components and all(any(c.startswith(w) for c in components) for w in words):
            return True
    return False


def pn_matches(query: str, stored: str, *, ignore_case: bool, fuzzy: bool = False) -> bool:
    """PN matching as documented in the module docstring."""
    if fuzzy:
        return _pn_fuzzy(query, stored)
    stored_groups = _pn_groups(stored)
    query_groups = query.split("=")

    def group_match(q: str, s: str) -> bool:
        if _has_wildcard(q):
            return wildcard_regex(q, ignore_case).fullmatch(s) is not None
        q, s = q.rstrip("^ "), s.rstrip("^ ")  # PS3.5 6.2.1.1: trailing empty components may be omitted
        return q.upper() == s.upper() if ignore_case else q == s

    if len(query_groups) == 1:
        return any(group_match(query, s) for s in stored_groups if s or not query)
    return all(group_match(q, s) for q, s in zip(query_groups, stored_groups, strict=False) if q)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def value_matches(cond: Condition, stored: str, *, ignore_case: bool) -> bool:
    """Whether one stored value (DICOM string form) matches a non-sequence condition."""
    if cond.match is MatchType.RANGE:
        if not stored:
            return False
        if cond.vr == "TM":
            stored = stored.strip()
        if cond.low is not None and stored < cond.low:
            return False
        return not (cond.high is not None and stored > upper_bound(cond.vr, cond.high))
    if cond.vr == "PN":
        return any(pn_matches(v, stored, ignore_case=ignore_case, fuzzy=cond.match is MatchType.FUZZY)
                   for v in cond.values)
    if cond.vr in _INT_VRS or cond.vr in _FLOAT_VRS:
        number = _number(stored)
        return number is not None and any(_number(v) == number for v in cond.values)
    for v in cond.values:
        if _has_wildcard(v) and cond.vr != "UI":
            if wildcard_regex(v).fullmatch(stored):
                return True
        elif v == stored:
            return True
    return False


def element_matches(cond: Condition, attrs: Mapping[str, Any], *, ignore_case: bool) -> bool:
    """Whether a PS3.18 JSON dataset matches one condition (any of a multi-valued attribute's values)."""
    element = attrs.get(cond.tag)
    if not isinstance(element, Mapping):
        return False
    if cond.match is MatchType.SEQUENCE:
        for item in element.get("Value") or ():
            if isinstance(item, Mapping) and all(
                    element_matches(inner, item, ignore_case=ignore_case) for inner in cond.items):
                return True
        return False
    return any(value_matches(cond, s, ignore_case=ignore_case) for s in _json_strings(element))


# -- building results ------------------------------------------------------------------------------


def empty_element(tag: str) -> dict[str, Any]:
    return {"vr": vr_of(tag)}


def _filter_sequence(element: Mapping[str, Any], item_tags: frozenset[str]) -> dict[str, Any]:
    items = []
    for item in element.get("Value") or ():
        if isinstance(item, Mapping):
            items.append({t: item.get(t) or empty_element(t) for t in sorted(item_tags)})
    return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}


_UNSET: Any = object()


def build_result(query: Query, sources: Sequence[Mapping[str, Any]], computed: Mapping[str, Any],
                 wanted: frozenset[str] | None = _UNSET) -> dict[str, Any]:
    """One match: the return attributes of ``query`` (``wanted``: its precomputed ``return_tags()``)
    picked from ``sources`` (lowest level first wins) and ``computed``, sorted by tag, without bulk data."""
    if wanted is _UNSET:
        wanted = query.return_tags()
    merged: dict[str, Any] = {}
    for source in reversed(sources):
        merged.update(source)
    merged.update(computed)
    result: dict[str, Any] = {}
    if wanted is None:
        for tag, element in merged.items():
            kept = _bulk_free(element)
            if kept is not None:
                result[tag] = kept
    else:
        for tag in wanted:
            element = merged.get(tag)
            if element is not None:
                kept = _bulk_free(element)
                if kept is not None:
                    if query.sequence_returns.get(tag):
                        kept = _filter_sequence(kept, query.sequence_returns[tag])
                    result[tag] = kept
            elif query.exact_returns and tag not in (RETRIEVE_URL, RETRIEVE_AE_TITLE):
                result[tag] = empty_element(tag)
    return dict(sorted(result.items()))


def with_scope(query: Query, study_uid: str | None, series_uid: str | None) -> Query:
    return replace(query, study_uid=study_uid, series_uid=series_uid)


# -- streamed results ------------------------------------------------------------------------------


class SearchResults:
    """The matches of one search, streamed: ``async for match in results``.

    Close it early (``async with results`` or :meth:`aclose`) to release the database cursor, e.g. on
    C-CANCEL. :attr:`truncated` becomes True when more entities matched than ``query.limit`` allowed;
    it is final once iteration has ended.
    """

    def __init__(self) -> None:
        self.truncated = False
        self.count = 0
        self._gen: AsyncIterator[dict[str, Any]] | None = None

    def attach(self, gen: AsyncIterator[dict[str, Any]]) -> SearchResults:
        self._gen = gen
        return self

    def __aiter__(self) -> SearchResults:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._gen is None:
            raise StopAsyncIteration
        match = await self._gen.__anext__()
        self.count += 1
        return match

    async def aclose(self) -> None:
        gen, self._gen = self._gen, None
        aclose = getattr(gen, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> SearchResults:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
