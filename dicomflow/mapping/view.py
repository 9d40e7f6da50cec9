"""What a mapping sees: one study as stored in the index (study, series and instance attributes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class InstanceView:
    sop_uid: str
    sop_class_uid: str
    instance_number: int | None

    def attrs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"00080018": {"vr": "UI", "Value": [self.sop_uid]},
                               "00080016": {"vr": "UI", "Value": [self.sop_class_uid]}}
        if self.instance_number is not None:
            out["00200013"] = {"vr": "IS", "Value": [self.instance_number]}
        return out


@dataclass(frozen=True, slots=True)
class SeriesView:
    series_uid: str
    #: series-level attributes (PS3.18 JSON model)
    attrs: dict[str, Any]
    instances: list[InstanceView] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StudyView:
    """A study: study-level attributes (Patient and Study modules), its series and their instances."""

    tenant: str
    study_uid: str
    attrs: dict[str, Any]
    series: list[SeriesView] = field(default_factory=list)
    #: variables a mapping can read with $var: tenant, dicomweb_root, study_url
    variables: dict[str, str] = field(default_factory=dict)

    @property
    def num_instances(self) -> int:
        return sum(len(s.instances) for s in self.series)
