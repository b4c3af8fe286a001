"""Per-tenant write gate: writers share it, an isolation upgrade holds it exclusively.

The gate is the tenant's own row in the registry `tenantry.tenants` (the row that says where
its data lives). Every runtime write transaction takes a shared row lock on it (FOR KEY SHARE)
and checks in the same statement that the data still lives where its config says. An upgrade
copies while writers go on, then locks the row exclusively (FOR UPDATE) only for its last round
and the switch, and flips it, so writes wait briefly and then land in the new location; none is
lost.

Row locks, not advisory locks: only roles with privileges on the admin-owned registry can take
them (the runtime's APP_ROLE under RLS, the operator). A bridge tenant's login has no USAGE on
schema `tenantry`, so it cannot hold another tenant's gate, whereas an advisory key can be taken
by any login that can compute it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .database import Conn, fetch_rows, set_tenant, validate_tenant_id


class TenantMoved(RuntimeError):
    """The tenant's data moved since the caller read its config; reload and retry."""


class TenantNotRegistered(RuntimeError):
    """The tenant has no registry row, so there is no gate to hold."""


def _lock_registry_row(conn: Conn, tenant: str, *, exclusive: bool) -> str | None:
    """Lock the tenant's registry row and return its isolation (None: no row)."""
    set_tenant(conn, validate_tenant_id(tenant))
    # KEY SHARE (writers) conflicts with UPDATE (the upgrade) but not with itself, nor with the
    # operator's routine upsert of the row.
    query = ("SELECT isolation FROM tenantry.tenants WHERE tenant_id = %s FOR UPDATE"
             if exclusive else
             "SELECT isolation FROM tenantry.tenants WHERE tenant_id = %s FOR KEY SHARE")
    rows = fetch_rows(conn, query, (tenant,))
    return str(rows[0][0]) if rows else None


def hold_writes(conn: Conn, tenant: str) -> str:
    """Exclusive, until the caller's transaction ends: blocks the tenant's writers.

    Returns where the registry says the data lives, read under the lock.
    """
    isolation = _lock_registry_row(conn, tenant, exclusive=True)
    if isolation is None:
        raise TenantNotRegistered(f"tenant {tenant} has no row in tenantry.tenants")
    return isolation


@contextmanager
def write_transaction(conn: Conn, tenant: str, expected_isolation: str) -> Iterator[Conn]:
    """A tenant-scoped write transaction on the shared database that refuses a stale location."""
    with conn.transaction():
        isolation = _lock_registry_row(conn, tenant, exclusive=False)
        if isolation is not None and isolation != expected_isolation:
            raise TenantMoved(f"tenant {tenant} now lives at {isolation}")
        yield conn
