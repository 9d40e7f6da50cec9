"""The IndexStore port and the records it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from dicomflow.index.query import Query, SearchResults
from dicomflow.model import ParsedInstance, Source, StoreResult
from dicomflow.settings import DuplicatePolicy


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    tenant: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    instance_number: int | None
    transfer_syntax_uid: str
    number_of_frames: int | None
    pixel_data_offset: int | None
    blob_key: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class StoreRecord:
    """Outcome of :meth:`IndexStore.store_instance`: what happened and which blob is now unused."""

    result: StoreResult
    #: a blob that must be deleted after the commit (the new one for a duplicate, the old one on overwrite)
    obsolete_blob_key: str | None


class IndexStore(Protocol):
    """Metadata index and outbox. ``tenant`` is part of every call."""

    async def store_instance(
        self, tenant: str, parsed: ParsedInstance, *, blob_key: str, size: int, sha256: str,
        source: Source, policy: DuplicatePolicy, extra_tags: frozenset[str] = frozenset(),
    ) -> StoreRecord:
        """Commit index rows and the ``instance.stored`` outbox event in one transaction.

        Raises :class:`~dicomflow.errors.DuplicateInstanceError` when the SOP Instance UID exists with
        different bytes and the policy is to reject, and
        :class:`~dicomflow.errors.DatasetMismatchError` when the instance contradicts the hierarchy
        already stored (its series belongs to another study).
        """
        ...

    async def find_existing(self, tenant: str, sop_uid: str) -> InstanceRecord | None: ...

    async def list_instances(
        self, tenant: str, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
    ) -> list[InstanceRecord]:
        """Instances of a study/series/instance, ordered by series then instance number."""
        ...

    async def instance_metadata(
        self, tenant: str, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
    ) -> list[str]:
        """The stored PS3.18 JSON of each matching instance (as text, bulk data as placeholders)."""
        ...

    async def instance_metadata_keyed(
        self, tenant: str, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
    ) -> list[tuple[str, str, str]]:
        """(Series Instance UID, SOP Instance UID, stored JSON text) of each matching instance, in
        :meth:`list_instances` order; WADO-RS /metadata rewrites BulkDataURI placeholders with the UIDs."""
        ...

    async def delete(
        self, tenant: str, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None,
        *, source: Source,
    ) -> list[str]:
        """Remove the rows, emit a ``*.deleted`` outbox event, return the blob keys to delete.

        Raises :class:`~dicomflow.errors.NotFoundError` when nothing matches.
        """
        ...

    async def stored_sop_instances(self, tenant: str, sop_uids: list[str]) -> dict[str, str]:
        """SOP Instance UID -> SOP Class UID for those of ``sop_uids`` that are stored."""
        ...

    def search(self, tenant: str, query: Query) -> SearchResults:
        """Entities of ``tenant`` matching ``query`` (QIDO-RS and C-FIND), streamed as PS3.18 JSON dicts.

        Returns at once; the database is read while the results are iterated, in a stable order,
        ``query.offset`` skipped and at most ``query.limit`` yielded (``SearchResults.truncated`` tells
        whether more matched). See :mod:`dicomflow.index.query` for the matching rules.
        """
        ...

    async def close(self) -> None: ...
