"""Prometheus metrics of the routing engine (one registry per engine, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dicomflow.engine.store import EngineStore


class EngineMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["tenant", "route", "destination"]
        self.attempts = Counter("dicomflow_delivery_attempts", "Delivery attempts by result "
                                "(delivered, retry, dead)", [*labels, "result"], registry=self.registry)
        self.seconds = Histogram("dicomflow_delivery_seconds", "Time spent in one delivery attempt",
                                 ["destination"], registry=self.registry,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.deliveries = Gauge("dicomflow_deliveries", "Deliveries by status (pending is the queue, dead "
                                "the dead letters)", [*labels, "status"], registry=self.registry)
        self.backlog = Gauge("dicomflow_outbox_backlog", "Outbox events not routed yet", ["tenant"],
                             registry=self.registry)
        self.routes = Gauge("dicomflow_routes_loaded", "Routes in force", registry=self.registry)
        self.config_ok = Gauge("dicomflow_routes_config_valid", "1 when the route and mapping files on disk "
                               "are valid, 0 when the last good set is kept", registry=self.registry)
        self.reloads = Counter("dicomflow_routes_reloads", "Route/mapping reloads by result", ["result"],
                               registry=self.registry)
        self.stable = Counter("dicomflow_stable_events", "series.stable / study.stable events emitted",
                              registry=self.registry)

    async def render(self, store: EngineStore) -> bytes:
        """Refresh the gauges read from the database, then the exposition text."""
        self.deliveries.clear()
        for tenant, route, destination, status, count in await store.counts():
            self.deliveries.labels(tenant, route, destination, status).set(count)
        self.backlog.clear()
        for tenant, count in await store.outbox_backlog():
            self.backlog.labels(tenant).set(count)
        return generate_latest(self.registry)
