"""The QIDO/C-FIND matcher without a database: parsing (parse_qido, query_from_identifier) and matching."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from dicomflow.errors import InvalidQueryError
from dicomflow.index.query import (
    STUDY_DEFAULTS,
    Condition,
    MatchType,
    build_result,
    element_matches,
    parse_qido,
    pn_matches,
    query_from_identifier,
    upper_bound,
    value_matches,
)
from dicomflow.model import Level


def conds(level: Level, params: list[tuple[str, str]]) -> dict[str, Condition]:
    query, _ = parse_qido(level, params)
    return {c.tag: c for c in query.conditions}


def test_keywords_and_tag_numbers_give_the_same_condition() -> None:
    by_keyword = conds(Level.STUDY, [("PatientID", "P1")])
    by_tag = conds(Level.STUDY, [("00100020", "P1")])
    assert by_keyword == by_tag == {"00100020": Condition("00100020", "LO", MatchType.SINGLE, ("P1",))}


@pytest.mark.parametrize(("value", "expected"), [
    ("20240101-20240131", ("20240101", "20240131")),
    ("20240101-", ("20240101", None)),
    ("-20240131", (None, "20240131")),
])
def test_date_ranges_including_open_ones(value: str, expected: tuple[str | None, str | None]) -> None:
    c = conds(Level.STUDY, [("StudyDate", value)])["00080020"]
    assert c.match is MatchType.RANGE and (c.low, c.high) == expected


def test_uid_lists_split_on_comma_and_backslash_and_repeats() -> None:
    c = conds(Level.STUDY, [("StudyInstanceUID", "1.2.3,1.2.4\\1.2.5"), ("StudyInstanceUID", "1.2.6")])
    assert c["0020000D"].match is MatchType.UID_LIST
    assert c["0020000D"].values == ("1.2.3", "1.2.4", "1.2.5", "1.2.6")


def test_wildcards_universal_and_fuzzy() -> None:
    query, _ = parse_qido(Level.STUDY, [("PatientName", "Do?^*"), ("AccessionNumber", ""),
                                        ("StudyDescription", "*"), ("fuzzymatching", "false")])
    assert [c.match for c in query.conditions] == [MatchType.WILDCARD]
    assert {"00080050", "00081030"} <= query.returns  # universal keys are return keys
    fuzzy, _ = parse_qido(Level.STUDY, [("PatientName", "joh do"), ("fuzzymatching", "true")])
    assert fuzzy.conditions[0].match is MatchType.FUZZY


def test_sequence_keys_with_dotted_paths() -> None:
    c = conds(Level.SERIES, [("RequestAttributesSequence.ScheduledProcedureStepID", "SPS1")])["00400275"]
    assert c.match is MatchType.SEQUENCE
    assert c.items == (Condition("00400009", "SH", MatchType.SINGLE, ("SPS1",)),)


def test_includefield_comma_separated_repeated_and_all() -> None:
    query, warnings = parse_qido(Level.STUDY, [("includefield", "00081030,StudyID"),
                                               ("includefield", "PatientAge")])
    assert {"00081030", "00200010", "00101010"} <= query.returns and not query.include_all
    assert not warnings
    everything, _ = parse_qido(Level.SERIES, [("includefield", "all")])
    assert everything.include_all and everything.return_tags() is None


def test_lower_level_keys_are_ignored_with_a_warning() -> None:
    query, warnings = parse_qido(Level.STUDY, [("Modality", "CT"), ("includefield", "SOPClassUID")])
    assert not query.conditions
    assert len(warnings) == 2
    assert any("Modality" in w for w in warnings) and any("SOPClassUID" in w for w in warnings)


def test_limits() -> None:
    query, warnings = parse_qido(Level.STUDY, [("limit", "101"), ("offset", "5")], default_limit=10,
                                 max_limit=1000)
    assert (query.limit, query.offset, warnings) == (101, 5, [])
    default, _ = parse_qido(Level.STUDY, [], default_limit=10)
    assert default.limit == 10
    capped, warnings = parse_qido(Level.STUDY, [("limit", "5000")], max_limit=1000)
    assert capped.limit == 1000 and "maximum" in warnings[0]


@pytest.mark.parametrize(("params", "message"), [
    ([("NoSuchKeyword", "x")], "unknown attribute"),
    ([("StudyDate", "2024-01-01")], "StudyDate"),
    ([("StudyDate", "20240131-20240101")], "after its upper bound"),
    ([("StudyTime", "25h")], "StudyTime"),
    ([("StudyInstanceUID", "1.2.*")], "not a UID"),
    ([("StudyInstanceUID", "abc")], "not a UID"),
    ([("limit", "-1")], "limit"),
    ([("offset", "x")], "offset"),
    ([("fuzzymatching", "yes")], "fuzzymatching"),
    ([("limit", "1"), ("limit", "2")], "more than once"),
    ([("PatientID", "a"), ("PatientID", "b")], "more than once"),
    ([("NumberOfStudyRelatedInstances", "many")], "not a number"),
    ([("PatientID.PatientName", "x")], "sequence"),
    ([("includefield", "NotAKeyword")], "unknown attribute"),
    ([("PatientID", "x" * 2000)], "longer than"),
])
def test_malformed_queries_raise_invalid_query(params: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(InvalidQueryError, match=message) as info:
        parse_qido(Level.STUDY, params)
    assert info.value.http_status == 400 and info.value.dimse_status == 0xA900


def test_default_return_attributes_depend_on_scope() -> None:
    study, _ = parse_qido(Level.STUDY, [])
    assert study.return_tags() == STUDY_DEFAULTS
    unscoped, _ = parse_qido(Level.SERIES, [])
    scoped, _ = parse_qido(Level.SERIES, [], study_uid="1.2.3")
    assert "00100010" in (unscoped.return_tags() or set())  # PS3.18 10.6.3.3.2 study attributes
    assert "00100010" not in (scoped.return_tags() or set())


# -- C-FIND identifiers ---------------------------------------------------------------------------

def test_identifier_keys_are_return_keys_and_non_empty_ones_match() -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = "Doe*"
    ds.StudyDate = "20240101-"
    ds.StudyInstanceUID = ""
    ds.ModalitiesInStudy = ["CT", "MR"]
    ds.SpecificCharacterSet = "ISO_IR 192"
    query = query_from_identifier(ds.to_json_dict(), Level.STUDY)
    by_tag = {c.tag: c for c in query.conditions}
    assert set(by_tag) == {"00100010", "00080020", "00080061"}
    assert by_tag["00080061"].values == ("CT", "MR")
    assert query.exact_returns and query.return_tags() == {"00100010", "00080020", "0020000D", "00080061"}


def test_identifier_rejects_keys_below_the_level() -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    with pytest.raises(InvalidQueryError, match="below the STUDY level"):
        query_from_identifier(ds.to_json_dict(), Level.STUDY)


def test_identifier_sequence_matching_and_item_return_keys() -> None:
    item = Dataset()
    item.ScheduledProcedureStepID = "SPS1"
    item.RequestedProcedureID = ""
    ds = Dataset()
    ds.RequestAttributesSequence = [item]
    query = query_from_identifier(ds.to_json_dict(), Level.SERIES)
    assert query.conditions[0].match is MatchType.SEQUENCE
    stored = {"00400275": {"vr": "SQ", "Value": [
        {"00400009": {"vr": "SH", "Value": ["SPS1"]}, "00401001": {"vr": "SH", "Value": ["RP1"]},
         "00400007": {"vr": "LO", "Value": ["not asked for"]}}]}}
    assert element_matches(query.conditions[0], stored, ignore_case=False)
    result = build_result(query, [stored], {})
    assert result["00400275"]["Value"] == [{"00400009": {"vr": "SH", "Value": ["SPS1"]},
                                            "00401001": {"vr": "SH", "Value": ["RP1"]}}]
    assert result["0020000E"] == {"vr": "UI"}  # unique key returned, empty when unknown


# -- matching ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("query", "stored", "ignore_case", "expected"), [
    ("Doe^John", "Doe^John", False, True),
    ("doe^john", "Doe^John", False, False),
    ("doe^john", "Doe^John", True, True),
    ("Doe*", "Doe^John", False, True),
    ("D?e^J*", "Doe^John", False, True),
    ("Doe", "Doe^John", False, False),
    ("Doe^John", "Doe^John^^^", False, True),
    ("Doe^John^", "Doe^John", False, True),
    ("山田^太郎", "Yamada^Tarou=山田^太郎=やまだ^たろう", False, True),
    ("やまだ*", "Yamada^Tarou=山田^太郎=やまだ^たろう", False, True),
    ("Yamada^Tarou=山田^太郎", "Yamada^Tarou=山田^太郎=やまだ^たろう", False, True),
    ("=山田^太郎", "Yamada^Tarou=山田^太郎=やまだ^たろう", False, True),
    ("Yamada^Tarou=山本^*", "Yamada^Tarou=山田^太郎=やまだ^たろう", False, False),
    ("müller*", "Müller^Hans", True, True),
    ("M*ller^Hans", "Müller^Hans", False, True),
])
def test_pn_matching(query: str, stored: str, ignore_case: bool, expected: bool) -> None:
    assert pn_matches(query, stored, ignore_case=ignore_case) is expected


@pytest.mark.parametrize(("query", "stored", "expected"), [
    ("joh do", "Doe^John", True),
    ("do", "Doe^John", True),
    ("john", "Doe^John", True),
    ("jane", "Doe^John", False),
    ("tar", "Yamada^Tarou=山田^太郎=やまだ^たろう", True),
    ("太", "Yamada^Tarou=山田^太郎=やまだ^たろう", True),
])
def test_fuzzy_pn_matching(query: str, stored: str, expected: bool) -> None:
    assert pn_matches(query, stored, ignore_case=False, fuzzy=True) is expected


def test_time_ranges_honour_the_precision_of_the_bounds() -> None:
    c = conds(Level.STUDY, [("StudyTime", "1000-1100")])["00080030"]
    assert value_matches(c, "110059", ignore_case=False)
    assert value_matches(c, "100000.5", ignore_case=False)
    assert not value_matches(c, "110100", ignore_case=False)
    assert not value_matches(c, "095959", ignore_case=False)
    single = conds(Level.STUDY, [("StudyTime", "1015")])["00080030"]
    assert value_matches(single, "101530", ignore_case=False)
    assert not value_matches(single, "101600", ignore_case=False)
    assert upper_bound("DT", "2024") == "20241231235959.999999"
    assert upper_bound("TM", "11") == "115959.999999"


def test_datetime_single_value_with_offset_is_not_a_range() -> None:
    c = conds(Level.IMAGE, [("AcquisitionDateTime", "20240101120000-0500")])["0008002A"]
    assert (c.low, c.high) == ("20240101120000-0500", "20240101120000-0500")
    r = conds(Level.IMAGE, [("AcquisitionDateTime", "2023-2024")])["0008002A"]
    assert (r.low, r.high) == ("2023", "2024")
    assert value_matches(r, "20241231235959", ignore_case=False)


def test_numbers_match_numerically() -> None:
    c = conds(Level.SERIES, [("SeriesNumber", "3")])["00200011"]
    assert element_matches(c, {"00200011": {"vr": "IS", "Value": [3]}}, ignore_case=False)
    assert not element_matches(c, {"00200011": {"vr": "IS", "Value": [30]}}, ignore_case=False)


def test_multi_valued_attributes_match_on_any_value() -> None:
    c = conds(Level.IMAGE, [("ImageType", "LOCALIZER")])["00080008"]
    stored = {"00080008": {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}}
    assert element_matches(c, stored, ignore_case=False)
    assert not element_matches(c, {"00080008": {"vr": "CS"}}, ignore_case=False)
