"""WADO-RS (PS3.18 10.4): placeholder."""

from __future__ import annotations

from dicomflow.dicomweb.common import RouteAdder


def add_routes(add: RouteAdder) -> None:
    return None
