"""QIDO-RS (PS3.18 10.6)."""

from __future__ import annotations

from dicomflow.dicomweb.common import RouteAdder


def add_routes(add: RouteAdder) -> None:
    return None
