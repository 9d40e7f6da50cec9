"""Principals, permissions and the role -> permission table."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Permission(StrEnum):
    """What a member of an organization may do (product sheet: organization-based access control)."""

    READ = "read"  # WADO-RS, C-MOVE/C-GET
    SEARCH = "search"  # QIDO-RS, C-FIND
    WRITE = "write"  # STOW-RS, C-STORE
    DELETE = "delete"
    MERGE = "merge"  # merge/update
    IMPORT = "import"
    EXPORT = "export"
    ADMIN = "admin"  # configuration, dead letters, audit


#: Default role table; a deployment overrides it under ``auth.role_permissions``.
DEFAULT_ROLE_PERMISSIONS: dict[str, list[str]] = {
    "viewer": ["read", "search"],
    "technologist": ["read", "search", "write"],
    "integrator": ["read", "search", "write", "import", "export"],
    "data-manager": ["read", "search", "write", "delete", "merge", "import", "export"],
    "admin": [p.value for p in Permission],
}


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: subject, client and the roles it holds per organization (tenant)."""

    subject: str
    issuer: str
    client_id: str | None = None
    memberships: dict[str, frozenset[str]] = field(default_factory=dict)  # tenant -> roles

    def permissions(self, tenant: str, table: dict[str, list[str]]) -> frozenset[Permission]:
        perms: set[Permission] = set()
        for role in self.memberships.get(tenant, frozenset()):
            perms.update(Permission(p) for p in table.get(role, []))
        return frozenset(perms)

    def is_member(self, tenant: str) -> bool:
        return tenant in self.memberships
