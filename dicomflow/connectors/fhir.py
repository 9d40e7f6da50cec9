"""fhir action: upsert the resources of a mapping (Patient, Endpoint, ImagingStudy) on a FHIR R4 server.

Each resource is written by conditional update on its identifier (FHIR R4 3.1.0.4.3,
``PUT [type]?identifier=system|value``: 201 when new, 200 when it existed), so repeating a delivery
updates the same resources. Many servers run that search and the create without isolation, so two
deliveries of one new resource at once would both create it: each conditional update holds the
resource's key across every worker process on the index (engine/keylock.py). The study is read from
the index when the delivery runs, so counts are the ones stored at that time whichever event triggered
it. When the study is gone, the route's ``on_delete`` decides: ImagingStudy.status ``entered-in-error``,
delete it, or leave it.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
from fhirpy import AsyncFHIRClient
from fhirpy.base.exceptions import BaseFHIRError

from dicomflow.connectors.base import DeliveryError, DeliveryJob, Outcome, http_failure
from dicomflow.engine.context import EngineContext
from dicomflow.engine.routes import OnDelete
from dicomflow.errors import OutOfResourcesError
from dicomflow.mapping.evaluate import MappingError, build_one, escape_search, key_of
from dicomflow.mapping.model import Mapping
from dicomflow.mapping.view import StudyView
from dicomflow.settings import FhirDestination

logger = logging.getLogger(__name__)


async def _raise_for_status(response: aiohttp.ClientResponse) -> None:
    if response.status >= 400:
        raise http_failure(response.status, "FHIR server", await response.text(errors="replace"))


class FhirConnector:
    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx

    async def _client(self, dest: FhirDestination) -> AsyncFHIRClient:
        authorization = await self.ctx.tokens.authorization(dest.oauth2, dest.basic, dest.timeout)
        return AsyncFHIRClient(
            dest.url.rstrip("/"), authorization=authorization,
            aiohttp_config={"timeout": aiohttp.ClientTimeout(total=dest.timeout),
                            "raise_for_status": _raise_for_status},
        )

    def _mapping(self, job: DeliveryJob) -> Mapping:
        name = str(job.action.get("mapping"))
        mapping = self.ctx.route_set().mappings.get(name)
        if mapping is None:
            raise DeliveryError(f"mapping {name!r} is not loaded (removed since the event was routed?)",
                                retryable=False)
        return mapping

    def variables(self, tenant: str, study_uid: str) -> dict[str, str]:
        root = self.ctx.dicomweb_root(tenant)
        return {"tenant": tenant, "dicomweb_root": root, "study_uid": study_uid,
                "study_url": f"{root}/studies/{study_uid}"}

    async def deliver(self, job: DeliveryJob) -> Outcome:
        dest = job.destination
        assert isinstance(dest, FhirDestination)
        mapping = self._mapping(job)
        tenant, study_uid = job.tenant, job.event.study_uid
        view = await self.ctx.store.study_view(tenant, study_uid, self.variables(tenant, study_uid))
        try:
            client = await self._client(dest)
            if view is None:
                return await self._study_gone(client, job, mapping)
            return await self._upsert(client, mapping, view, dest.url)
        except MappingError as exc:
            raise DeliveryError(str(exc), retryable=False) from None
        except DeliveryError:
            raise
        except OutOfResourcesError:  # the index, where the lock of a resource is taken
            raise DeliveryError("index database unavailable", retryable=True) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryError(f"FHIR server unreachable: {type(exc).__name__}", retryable=True,
                                detail=f"FHIR server unreachable: {exc!r}") from None
        except (ValueError, BaseFHIRError, KeyError, TypeError, AttributeError) as exc:
            # a 2xx answer that is not the FHIR JSON we asked for
            raise DeliveryError(f"FHIR server answered something that is not FHIR JSON ({type(exc).__name__})",
                                retryable=True, detail=f"unexpected FHIR answer: {exc!r}"[:1500]) from None

    async def _upsert(self, client: AsyncFHIRClient, mapping: Mapping, view: StudyView, url: str) -> Outcome:
        refs: dict[str, str | None] = {}
        done: list[str] = []
        for template in mapping.resources:
            built = build_one(mapping, template, view, refs)
            if built is None:
                refs[template.id] = None
                continue
            body: dict[str, Any] = dict(built.body)
            resource = client.resource(built.type, **{k: v for k, v in body.items() if k != "resourceType"})
            # two deliveries upserting one resource at once (two studies of a new patient, on two workers)
            # would both find nothing and both create it: one conditional update per resource at a time
            async with self.ctx.locks.hold(f"fhir {url.rstrip('/')} {built.type}?{built.search_identifier}"):
                saved, created = await client.resources(built.type).search(
                    identifier=built.search_identifier).update(resource)
            if not saved or "id" not in saved:
                raise DeliveryError(f"FHIR server did not return the {built.type} it stored", retryable=True)
            refs[template.id] = f"{built.type}/{saved['id']}"
            done.append(f"{built.type}/{saved['id']} {'created' if created else 'updated'}")
        return Outcome(", ".join(done) or "nothing to send")

    async def _study_gone(self, client: AsyncFHIRClient, job: DeliveryJob, mapping: Mapping) -> Outcome:
        on_delete = OnDelete(job.action.get("on_delete", OnDelete.ENTERED_IN_ERROR))
        if on_delete is OnDelete.IGNORE:
            return Outcome("study not stored; on_delete: ignore")
        # the study's key needs only its UID: build it from a study holding nothing else
        uid_only = StudyView(job.tenant, job.event.study_uid,
                             {"0020000D": {"vr": "UI", "Value": [job.event.study_uid]}}, [],
                             self.variables(job.tenant, job.event.study_uid))
        templates = [t for t in mapping.resources if t.type == "ImagingStudy"]
        if not templates:
            return Outcome("mapping has no ImagingStudy; nothing to retract")
        system, value = key_of(mapping, templates[0], uid_only)
        found = await client.resources("ImagingStudy").search(
            identifier=f"{escape_search(system)}|{escape_search(value)}").fetch_all()
        changed: list[str] = []
        for resource in found:
            if on_delete is OnDelete.DELETE:
                await resource.delete()  # type: ignore[no-untyped-call]
                changed.append(f"ImagingStudy/{resource['id']} deleted")
            elif ("status" in resource and resource["status"]) != "entered-in-error":
                resource["status"] = "entered-in-error"
                await resource.save()
                changed.append(f"ImagingStudy/{resource['id']} entered-in-error")
        return Outcome(", ".join(changed) or "no ImagingStudy to retract")
