"""Which attributes belong to the study and series levels of the information model.

Study level: the Patient module (group 0010) and the General Study / Patient Study modules, as listed
for QIDO-RS study responses in PS3.18 Table 10.6.3-3 and for C-FIND in PS3.4 C.6.2.1.2.
Series level: General Series and related attributes, PS3.18 Table 10.6.3-4 / PS3.4 C.6.2.1.3.
Everything else in an instance's metadata is instance level.
"""

from __future__ import annotations

STUDY_LEVEL_TAGS: frozenset[str] = frozenset({
    "00080005",  # SpecificCharacterSet
    "00080020",  # StudyDate
    "00080030",  # StudyTime
    "00080050",  # AccessionNumber
    "00080051",  # IssuerOfAccessionNumberSequence
    "00080056",  # InstanceAvailability
    "00080090",  # ReferringPhysicianName
    "00080096",  # ReferringPhysicianIdentificationSequence
    "00081030",  # StudyDescription
    "00081032",  # ProcedureCodeSequence
    "00081048",  # PhysiciansOfRecord
    "00081060",  # NameOfPhysiciansReadingStudy
    "00081080",  # AdmittingDiagnosesDescription
    "00081110",  # ReferencedStudySequence
    "00080201",  # TimezoneOffsetFromUTC
    "0020000D",  # StudyInstanceUID
    "00200010",  # StudyID
    "00321032",  # RequestingPhysician
    "00321060",  # RequestedProcedureDescription
    "00401001",  # RequestedProcedureID
    "00101010",  # PatientAge
    "00101020",  # PatientSize
    "00101030",  # PatientWeight
    "001021B0",  # AdditionalPatientHistory
})

SERIES_LEVEL_TAGS: frozenset[str] = frozenset({
    "00080021",  # SeriesDate
    "00080031",  # SeriesTime
    "00080060",  # Modality
    "00080070",  # Manufacturer
    "00080080",  # InstitutionName
    "00081010",  # StationName
    "0008103E",  # SeriesDescription
    "00081040",  # InstitutionalDepartmentName
    "00081050",  # PerformingPhysicianName
    "00081070",  # OperatorsName
    "00081090",  # ManufacturerModelName
    "00081111",  # ReferencedPerformedProcedureStepSequence
    "00180015",  # BodyPartExamined
    "00181030",  # ProtocolName
    "00185100",  # PatientPosition
    "0020000E",  # SeriesInstanceUID
    "00200011",  # SeriesNumber
    "00200060",  # Laterality
    "00400244",  # PerformedProcedureStepStartDate
    "00400245",  # PerformedProcedureStepStartTime
    "00400253",  # PerformedProcedureStepID
    "00400254",  # PerformedProcedureStepDescription
    "00400275",  # RequestAttributesSequence
})


def is_study_level(tag: str) -> bool:
    # PS3.3 C.7.1.1 Patient module: everything in group 0010 goes with the study.
    return tag in STUDY_LEVEL_TAGS or tag.startswith("0010")


def is_series_level(tag: str) -> bool:
    return tag in SERIES_LEVEL_TAGS


def split_levels(metadata: dict[str, object]) -> tuple[dict[str, object], dict[str, object]]:
    """Split an instance's JSON model into (study-level, series-level) attribute dicts."""
    study: dict[str, object] = {}
    series: dict[str, object] = {}
    charset = metadata.get("00080005")
    for tag, value in metadata.items():
        if is_study_level(tag):
            study[tag] = value
        elif is_series_level(tag):
            series[tag] = value
    if charset is not None:
        series["00080005"] = charset
    return study, series
