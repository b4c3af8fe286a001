"""Per-tenant write gate: writers share it, an isolation upgrade holds it exclusively.

Every runtime write transaction takes the shared lock first, then checks that the tenant's
data still lives where its config says (`tenants.isolation` in the shared database). An
upgrade takes the exclusive lock for its copy-verify-switch window, so writes wait briefly
and then land in the new location; none is lost.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .database import Conn, fetch_rows, set_tenant, validate_tenant_id


class TenantMoved(RuntimeError):
    """The tenant's data moved since the caller read its config; reload and retry."""


def write_lock_key(tenant: str) -> str:
    return f"tenantry.tenant-writes:{validate_tenant_id(tenant)}"


def hold_writes(conn: Conn, tenant: str) -> None:
    """Exclusive, until the caller's transaction ends: blocks the tenant's writers."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                 (write_lock_key(tenant),))


@contextmanager
def write_transaction(conn: Conn, tenant: str, expected_isolation: str) -> Iterator[Conn]:
    """A tenant-scoped write transaction on the shared database that refuses a stale location."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock_shared(hashtextextended(%s, 0))",
                     (write_lock_key(tenant),))
        set_tenant(conn, tenant)
        rows = fetch_rows(conn, "SELECT isolation FROM tenantry.tenants WHERE tenant_id = %s",
                          (tenant,))
        if rows and rows[0][0] != expected_isolation:
            raise TenantMoved(f"tenant {tenant} now lives at {rows[0][0]}")
        yield conn
