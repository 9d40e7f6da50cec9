"""Mount every DICOMweb transaction under ``/dicomweb`` (default tenant) and ``/tenants/{tenant}/dicomweb``."""

from __future__ import annotations

from aiohttp import web

from dicomflow.dicomweb import delete, qido, stow, wado
from dicomflow.dicomweb.common import Handler

ROOTS = ("/dicomweb", "/tenants/{tenant}/dicomweb")


def setup_routes(app: web.Application) -> list[web.AbstractRoute]:
    added: list[web.AbstractRoute] = []

    def add(method: str, path: str, handler: Handler) -> None:
        for root in ROOTS:
            added.append(app.router.add_route(method, root + path, handler))

    for module in (stow, qido, wado, delete):
        module.add_routes(add)
    return added
