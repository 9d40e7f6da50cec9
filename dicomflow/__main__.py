"""Command line: ``dicomflow serve [--http-port 8080] [--dimse-port 11112] [--data-dir DIR] [--config FILE]``."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from dicomflow import db as db_cli
from dicomflow import fsck as fsck_cli
from dicomflow.app import create_app
from dicomflow.audit import cli as audit_cli
from dicomflow.engine import cli as routing_cli
from dicomflow.errors import OutOfResourcesError
from dicomflow.index.migrate import SchemaVersionError
from dicomflow.settings import load_settings


class JsonFormatter(logging.Formatter):
    """One JSON object per line; callers never put patient data in messages at INFO or above."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _MalformedHttpFilter(logging.Filter):
    """aiohttp logs a malformed request (e.g. an oversized header) at ERROR with a traceback quoting the
    header bytes, which may be a bearer token or a query with patient data: keep one plain line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "malformed HTTP request refused (%s %s)", (exc.code, type(exc).__name__)
        return True


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # pynetdicom logs whole datasets at DEBUG and peer details at INFO: keep it at WARNING.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_MalformedHttpFilter())


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _serve(args: argparse.Namespace) -> int:
    http: dict[str, object] = {}
    dimse: dict[str, object] = {}
    if args.http_port is not None:
        http["port"] = args.http_port
    if args.host is not None:
        http["host"] = args.host
    if args.dimse_port is not None:
        dimse["port"] = args.dimse_port
    overrides: dict[str, object] = {"data_dir": args.data_dir, "insecure": True if args.insecure else None}
    settings = load_settings(args.config, **overrides)
    if http or dimse:
        settings = settings.model_copy(update={
            "http": settings.http.model_copy(update=http),
            "dimse": settings.dimse.model_copy(update=dimse),
        })
    _configure_logging(settings.log_level)
    logger = logging.getLogger("dicomflow")
    if not settings.auth.enabled and not _is_loopback(settings.http.host) and not settings.insecure:
        logger.error("refusing to serve on %s without authentication: configure auth.issuers, bind to "
                     "127.0.0.1, or pass --insecure", settings.http.host)
        return 2
    logger.info("dicomflow serving DICOMweb on http://%s:%d/dicomweb, data in %s", settings.http.host,
                settings.http.port, settings.data_dir.resolve())
    try:
        web.run_app(create_app(settings), host=settings.http.host, port=settings.http.port, print=None,
                    access_log=None)
    except SchemaVersionError as exc:  # refuse to run against another schema version
        logger.error("not serving: %s", exc)
        return 2
    except OutOfResourcesError as exc:  # index or blob store unreachable at start: let the supervisor retry
        logger.error("not serving: %s", exc.detail)
        return 3
    return 0


#: ``register(subparsers)`` functions of command groups living in their own modules
_SUBCOMMANDS: list[Callable[[Any], None]] = [audit_cli.register, db_cli.register, fsck_cli.register,
                                              routing_cli.register]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dicomflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the DICOMweb and DIMSE server")
    serve.add_argument("--http-port", type=int)
    serve.add_argument("--host", help="HTTP bind address (default 127.0.0.1)")
    serve.add_argument("--dimse-port", type=int)
    serve.add_argument("--data-dir", type=Path)
    serve.add_argument("--insecure", action="store_true",
                       help="allow a non-loopback HTTP address without authentication")
    serve.add_argument("--config", type=Path, help="YAML settings file (see config/settings.example.yaml)")
    serve.set_defaults(func=_serve)
    for register in _SUBCOMMANDS:  # other command groups (routes, db, fsck, ...) register themselves here
        register(sub)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
