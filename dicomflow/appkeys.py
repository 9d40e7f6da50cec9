"""Typed application state (aiohttp ``AppKey``s) shared by the adapters."""

from __future__ import annotations

from aiohttp import web

from dicomflow.index.base import IndexStore
from dicomflow.ingest.service import IngestService
from dicomflow.offload import Offloader
from dicomflow.settings import Settings
from dicomflow.storage.base import BlobStore

SETTINGS = web.AppKey("settings", Settings)
INDEX = web.AppKey("index", IndexStore)
BLOBS = web.AppKey("blobs", BlobStore)
INGEST = web.AppKey("ingest", IngestService)
OFFLOADER = web.AppKey("offloader", Offloader)

#: Request key: study UIDs a handler touched that are not in its URL (e.g. STOW to /studies), for audit.
AUDIT_STUDIES: web.RequestKey[list[str]] = web.RequestKey("audit_studies")
