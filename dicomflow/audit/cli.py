"""``dicomflow audit verify``: recompute every tenant's hash chain and report tampering."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from dicomflow.audit.trail import verify_chain
from dicomflow.index.sql import SqlIndexStore
from dicomflow.settings import load_settings


async def _verify(index_url: str, tenant: str | None) -> int:
    index = await SqlIndexStore.open(index_url)
    try:
        checked, problems = await verify_chain(index.engine, tenant)
    finally:
        await index.close()
    for p in problems:
        print(f"TAMPERED tenant={p.tenant} record={p.seq}: {p.problem}")
    print(f"{checked} audit record(s) checked, {len(problems)} problem(s)")
    return 1 if problems else 0


def _run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, data_dir=args.data_dir)
    return asyncio.run(_verify(settings.index_url, args.tenant))


def register(sub: Any) -> None:
    audit = sub.add_parser("audit", help="audit trail tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="verify the hash chain of the audit trail")
    verify.add_argument("--config", type=Path)
    verify.add_argument("--data-dir", type=Path)
    verify.add_argument("--tenant")
    verify.set_defaults(func=_run)
