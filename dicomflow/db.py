"""``dicomflow db upgrade`` and ``dicomflow db check``: the index schema version (see index/migrate.py)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from dicomflow.errors import OutOfResourcesError
from dicomflow.index import migrate
from dicomflow.index.schema import SCHEMA_VERSION
from dicomflow.index.sql import make_engine
from dicomflow.settings import load_settings

T = TypeVar("T")


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (SQLAlchemyError, ValueError):
        return "<index URL>"


def _why(exc: BaseException) -> str:
    # the cause's text (connection refused, timeout), never a SQLAlchemy message that may quote the URL
    cause = exc.__cause__ if isinstance(exc, OutOfResourcesError) and exc.__cause__ else exc
    return f"{type(cause).__name__}: {cause}" if isinstance(cause, OSError) else type(cause).__name__


def _index_url(args: argparse.Namespace) -> str:
    if args.index:
        return str(args.index)
    settings = load_settings(args.config, data_dir=args.data_dir)
    if settings.index is None:  # the embedded default: its folder may not exist yet
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings.index_url


def _on_index(command: str, args: argparse.Namespace,
              work: Callable[[AsyncEngine], Coroutine[Any, Any, T]]) -> tuple[str, T] | int:
    """``work`` on the index ``args`` names, with an engine of its own; on failure, says why on stderr and
    returns the exit code (1: settings or schema, 2: the database cannot be reached)."""

    async def run(url: str) -> T:
        engine = make_engine(url)
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    try:
        url = _index_url(args)
        return url, asyncio.run(run(url))
    except (migrate.SchemaVersionError, ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"dicomflow db {command}: {exc}\n")
        return 1
    except (SQLAlchemyError, OSError, OutOfResourcesError) as exc:
        sys.stderr.write(f"dicomflow db {command}: cannot reach the index database ({_why(exc)})\n")
        return 2


def _main_upgrade(args: argparse.Namespace) -> int:
    outcome = _on_index("upgrade", args, migrate.upgrade)
    if isinstance(outcome, int):
        return outcome
    url, result = outcome
    if result.before is None:
        sys.stdout.write(f"created the index schema (version {result.after}) in {_safe(url)}\n")
    elif result.before == result.after:
        sys.stdout.write(f"the index schema is already at version {result.after}\n")
    else:
        sys.stdout.write(f"upgraded the index schema from version {result.before} to {result.after}\n")
    return 0


def _main_check(args: argparse.Namespace) -> int:
    outcome = _on_index("check", args, migrate.read_version)
    if isinstance(outcome, int):
        return outcome
    _, found = outcome
    problem = migrate.describe(found)
    if problem is not None:
        sys.stderr.write(f"dicomflow db check: {problem}\n")
        return 1
    sys.stdout.write(f"the index schema is at version {SCHEMA_VERSION}, as this dicomflow expects\n")
    return 0


def register(sub: Any) -> None:
    """``dicomflow db upgrade|check [--config F] [--index URL]``."""
    db = sub.add_parser("db", help="index database schema: create, upgrade, check")
    commands = db.add_subparsers(dest="db_command", required=True)
    upgrade = commands.add_parser("upgrade", help="create the schema or upgrade it to this version")
    upgrade.set_defaults(func=_main_upgrade)
    check = commands.add_parser("check", help="exit 0 when the schema is at this version, 1 otherwise")
    check.set_defaults(func=_main_check)
    for parser in (upgrade, check):
        parser.add_argument("--config", type=Path, help="YAML settings file")
        parser.add_argument("--data-dir", type=Path)
        parser.add_argument("--index", help="index URL (overrides the settings)")
