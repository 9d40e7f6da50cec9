"""``dicomflow routes validate|schema|test``, ``dicomflow deliveries list|retry|drop`` and ``dicomflow worker``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

from dicomflow.engine.config import load_route_set
from dicomflow.engine.events import Event, EventType
from dicomflow.engine.matching import attributes_match, wants
from dicomflow.engine.routes import route_json_schema
from dicomflow.engine.yamlfile import ConfigFileError
from dicomflow.settings import Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "data_dir", None) is not None:
        overrides["data_dir"] = args.data_dir
    settings = load_settings(getattr(args, "config", None), **overrides)
    routing: dict[str, Any] = {}
    if getattr(args, "routes_dir", None) is not None:
        routing["routes_dir"] = args.routes_dir
    if getattr(args, "mappings_dir", None) is not None:
        routing["mappings_dir"] = args.mappings_dir
    if routing:
        settings = settings.model_copy(update={"routing": settings.routing.model_copy(update=routing)})
    return settings




def _load(args: argparse.Namespace) -> tuple[Settings, Any] | None:
    settings = _settings(args)
    routes_dir = settings.routing.routes_dir or Path("routes")
    try:
        return settings, load_route_set(routes_dir, settings.routing.mappings_dir, settings)
    except ConfigFileError as exc:
        for problem in exc.problems:
            sys.stderr.write(f"{problem}\n")
        sys.stderr.write(f"{len(exc.problems)} problem(s) found\n")
        return None


def _validate(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded is None:
        return 1
    _, routes = loaded
    sys.stdout.write(f"ok: {len(routes.routes)} route(s) ({', '.join(sorted(routes.routes)) or 'none'}), "
                     f"{len(routes.mappings)} mapping(s) ({', '.join(sorted(routes.mappings)) or 'none'})\n")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from dicomflow.mapping.model import mapping_json_schema

    schema = mapping_json_schema() if args.kind == "mapping" else route_json_schema()
    sys.stdout.write(json.dumps(schema, indent=2) + "\n")
    return 0


def _test(args: argparse.Namespace) -> int:
    """Dry run: which routes an instance would match and what FHIR resources they would send."""
    from dicomflow.index.levels import split_levels
    from dicomflow.ingest.parse import configure_pydicom, parse_part10
    from dicomflow.mapping.evaluate import MappingError, build_resources
    from dicomflow.mapping.view import InstanceView, SeriesView, StudyView

    loaded = _load(args)
    if loaded is None:
        return 1
    settings, routes = loaded
    configure_pydicom()
    try:
        parsed = parse_part10(args.file, settings.limits.bulk_data_threshold)
    except Exception as exc:
        sys.stderr.write(f"{args.file}: not a readable DICOM file: {exc}\n")
        return 1
    if args.route is not None and args.route not in routes.routes:
        sys.stderr.write(f"no route named {args.route!r}\n")
        return 1
    tenant = args.tenant or settings.default_tenant
    study_attrs, series_attrs = split_levels(parsed.metadata)
    view = StudyView(tenant, parsed.study_instance_uid, study_attrs, [SeriesView(
        parsed.series_instance_uid, series_attrs,
        [InstanceView(parsed.sop_instance_uid, parsed.sop_class_uid,
                      _int(parsed.metadata.get("00200013")))])],
        {"tenant": tenant, "dicomweb_root": "<dicomweb root>", "study_uid": parsed.study_instance_uid,
         "study_url": f"<dicomweb root>/studies/{parsed.study_instance_uid}"})
    report: list[dict[str, Any]] = []
    for route in routes.routes.values():
        if args.route is not None and route.name != args.route:
            continue
        matched: list[str] = []
        for event_type in route.events:
            quiet = routes.quiet_for(route, tenant, settings)
            event = Event(0, event_type, tenant, parsed.study_instance_uid, parsed.series_instance_uid,
                          parsed.sop_instance_uid, source={"protocol": args.protocol},
                          quiet=quiet if event_type.value.endswith(".stable") else None)
            attrs = [{} if event_type.is_deletion else
                     parsed.metadata if event_type is EventType.INSTANCE_STORED else {**study_attrs, **series_attrs}]
            if wants(route, event, quiet) and attributes_match(route, attrs):
                matched.append(event_type.value)
        entry: dict[str, Any] = {"route": route.name, "matches": matched, "actions": []}
        for action in route.actions if matched else []:
            item: dict[str, Any] = {"type": action.type, "destination": action.destination}
            if action.type == "fhir":
                try:
                    item["resources"] = [b.body for _, b in build_resources(routes.mappings[action.mapping], view)
                                         if b is not None]
                except MappingError as exc:
                    item["error"] = str(exc)
            entry["actions"].append(item)
        report.append(entry)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    sys.stdout.write("(dry run: nothing was sent)\n")
    return 0


def _int(element: Any) -> int | None:
    try:
        return int(element["Value"][0])
    except (TypeError, KeyError, IndexError, ValueError):
        return None


async def _with_store(args: argparse.Namespace, work: Any) -> Any:
    from dicomflow.engine.store import EngineStore
    from dicomflow.index.sql import SqlIndexStore

    settings = _settings(args)
    index = await SqlIndexStore.open(args.index or settings.index_url)
    try:
        return await work(EngineStore(index))
    finally:
        await index.close()


def _list(args: argparse.Namespace) -> int:
    async def work(store: Any) -> list[Any]:
        return list(await store.list_deliveries(status=args.status, tenant=args.tenant, route=args.route,
                                                destination=args.destination, study_uid=args.study, limit=args.limit))

    rows = asyncio.run(_with_store(args, work))
    if args.json:
        sys.stdout.write(json.dumps([r.as_dict() for r in rows], indent=2) + "\n")
        return 0
    for r in rows:
        error = f"  {r.last_error[:100]}" if r.last_error and r.status != "done" else ""
        subject = r.event.study_uid or str(r.event.extra.get("transaction_uid", ""))  # commitment: Transaction UID
        sys.stdout.write(f"{r.id:>8} {r.status:<8} {r.attempts:>3} {r.tenant} {r.route}[{r.step}] "
                         f"{r.action.get('type')}->{r.destination} {r.event.type.value} {subject}{error}\n")
    return 0


def _retry(args: argparse.Namespace) -> int:
    if not args.ids and not args.all_dead:
        sys.stderr.write("give delivery ids or --all-dead\n")
        return 2

    async def work(store: Any) -> int:
        return int(await store.retry(args.ids or None, tenant=args.tenant))

    changed = asyncio.run(_with_store(args, work))
    sys.stdout.write(f"{changed} delivery(ies) queued again\n")
    return 0 if changed else 1


def _drop(args: argparse.Namespace) -> int:
    async def work(store: Any) -> int:
        return int(await store.drop(args.ids, tenant=args.tenant))

    changed = asyncio.run(_with_store(args, work))
    sys.stdout.write(f"{changed} delivery(ies) dropped\n")
    return 0 if changed else 1


def _worker(args: argparse.Namespace) -> int:
    """Run the routing worker alone (no HTTP, no DIMSE) until SIGTERM/SIGINT."""
    from dicomflow.__main__ import _configure_logging
    from dicomflow.engine.worker import RoutingEngine
    from dicomflow.index.sql import SqlIndexStore
    from dicomflow.ingest.parse import configure_pydicom
    from dicomflow.offload import Offloader
    from dicomflow.storage.factory import open_blob_store

    settings = _settings(args)
    _configure_logging(settings.log_level)

    async def run() -> None:
        configure_pydicom()
        offloader = Offloader(settings.limits.parse_workers)
        index = await SqlIndexStore.open(settings.index_url)
        blobs = await open_blob_store(settings, offloader)
        engine = RoutingEngine(settings, index, blobs, offloader)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await engine.start()
        try:
            await stop.wait()
        finally:
            await engine.stop()
            await blobs.close()
            await index.close()
            offloader.shutdown()

    asyncio.run(run())
    return 0


def _common(parser: Any) -> None:
    parser.add_argument("--config", type=Path, help="YAML settings file")
    parser.add_argument("--data-dir", type=Path)


def register(sub: Any) -> None:
    routes = sub.add_parser("routes", help="route and mapping files: validate, JSON Schema, dry run")
    commands = routes.add_subparsers(dest="routes_command", required=True)
    validate = commands.add_parser("validate", help="check every route and mapping file (exit 1 on problems)")
    validate.set_defaults(func=_validate)
    schema = commands.add_parser("schema", help="print the JSON Schema of route (or mapping) files")
    schema.add_argument("--kind", choices=["route", "mapping"], default="route")
    schema.set_defaults(func=_schema)
    test = commands.add_parser("test", help="dry run: which routes a file matches, what would be sent")
    test.add_argument("--file", type=Path, required=True)
    test.add_argument("--route", help="only this route")
    test.add_argument("--tenant", help="tenant the file is stored for (default: the default tenant)")
    test.add_argument("--protocol", default="dicomweb", choices=["dicomweb", "dimse", "import"])
    test.set_defaults(func=_test)
    for parser in (validate, test):
        _common(parser)
        parser.add_argument("--routes-dir", type=Path, help="default: settings routing.routes_dir or ./routes")
        parser.add_argument("--mappings-dir", type=Path, help="default: settings routing.mappings_dir")

    deliveries = sub.add_parser("deliveries", help="the delivery queue and dead letters")
    dcommands = deliveries.add_subparsers(dest="deliveries_command", required=True)
    listing = dcommands.add_parser("list", help="list deliveries (newest first)")
    listing.add_argument("--status", choices=["waiting", "pending", "done", "dead", "dropped"])
    listing.add_argument("--route")
    listing.add_argument("--destination")
    listing.add_argument("--study")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_list)
    retry = dcommands.add_parser("retry", help="replay deliveries (dead, dropped or done) by id, or --all-dead")
    retry.add_argument("ids", nargs="*", type=int)
    retry.add_argument("--all-dead", action="store_true")
    retry.set_defaults(func=_retry)
    drop = dcommands.add_parser("drop", help="give up on deliveries (they stay listed as dropped)")
    drop.add_argument("ids", nargs="+", type=int)
    drop.set_defaults(func=_drop)
    for parser in (listing, retry, drop):
        _common(parser)
        parser.add_argument("--index", help="index URL (overrides the settings)")
        parser.add_argument("--tenant")

    worker = sub.add_parser("worker", help="run the routing worker alone (several may share a PostgreSQL index)")
    _common(worker)
    worker.set_defaults(func=_worker)
