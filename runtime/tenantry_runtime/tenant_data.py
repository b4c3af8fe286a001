"""The tenant's own rows: reads and writes as the tenant, through its isolation level.

Pool tenants are reached through the runtime's shared DSN (`database_url`, a login that is a
member of APP_ROLE, under RLS); bridge and silo tenants through the DSN of their own login
(`TenantRecord.database_dsn`, standing in for the credentials Secret). Every unit of work runs
in `tenant_transaction` (RLS sees the tenant only). Writes also hold the tenant's write gate
(`contracts.tenant_locks.write_transaction`) on the shared database for their whole
transaction, so an isolation upgrade waits for them, and a `TenantMoved` makes them retry with
the config the store holds by then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TypeVar

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from .contracts.database import Conn, reset_session, tenant_transaction
from .contracts.tenant_locks import TenantMoved, write_transaction
from .errors import ApiError
from .settings import RuntimeSettings
from .store import TenantRecord, TenantStore

log = logging.getLogger(__name__)
T = TypeVar("T")
# How long a write waits for the store to catch up with a moved tenant.
MOVED_RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0)


def unavailable(what: str) -> ApiError:
    return ApiError("api_error", what, status=503, retry_after=1)


@dataclass
class TenantDatabases:
    settings: RuntimeSettings
    store: TenantStore
    _pools: dict[str, ConnectionPool[Conn]] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)

    def _pool(self, dsn: str) -> ConnectionPool[Conn]:
        pool = self._pools.get(dsn)
        if pool is None:
            # reset_session: a returned connection carries no tenant, role or temp state.
            pool = ConnectionPool(dsn, min_size=0, max_size=self.settings.tenant_pool_size,
                                  # No server-side prepared statements: DISCARD ALL
                                  # drops them under psycopg's feet (seen with executemany).
                                  kwargs={"autocommit": True, "connect_timeout": 5,
                                          "prepare_threshold": None},
                                  reset=reset_session, timeout=10, open=True,
                                  name="tenant-data")
            self._pools[dsn] = pool
        return pool

    def shared_dsn(self) -> str:
        if self.settings.database_url is None:
            raise unavailable("RAG and conversations need a database: the runtime has no "
                              "TENANTRY_RUNTIME_DATABASE_URL.")
        return self.settings.database_url.get_secret_value()

    def tenant_dsn(self, record: TenantRecord) -> str:
        if record.config.database.kind == "shared":
            return self.shared_dsn()
        if record.database_dsn is None:
            raise unavailable(f"The runtime has no database credentials for this tenant's "
                              f"{record.config.isolation} database yet.")
        return record.database_dsn.get_secret_value()

    async def read(self, record: TenantRecord, work: Callable[[Conn], T]) -> T:
        """`work` in a transaction that sees only the tenant's rows."""
        dsn = self.tenant_dsn(record)

        def run() -> T:
            with self._pool(dsn).connection() as conn, tenant_transaction(
                    conn, record.config.tenant):
                return work(conn)

        return await self._guarded(run)

    async def write(self, tenant: str, work: Callable[[Conn, TenantRecord], T]) -> T:
        """`work(conn, record)` as the tenant, under the write gate; retried on TenantMoved
        with the record the store holds by then."""
        for delay in (*MOVED_RETRY_SECONDS, None):
            record = self.store.get(tenant)
            if record is None:
                raise ApiError("authentication_error", "This tenant is no longer served.")
            try:
                return await self._guarded(lambda r=record: self._write(r, work))  # type: ignore[misc]
            except TenantMoved as moved:
                self.failures["tenant_moved"] = self.failures.get("tenant_moved", 0) + 1
                if delay is None:
                    raise unavailable("This tenant's data is moving; try again shortly."
                                      ) from moved
                log.info("tenant %s moved (%s): retrying with the reloaded config", tenant,
                         moved)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _write(self, record: TenantRecord, work: Callable[[Conn, TenantRecord], T]) -> T:
        config = record.config
        shared, own = self.shared_dsn(), self.tenant_dsn(record)
        with ExitStack() as stack:
            gate = stack.enter_context(self._pool(shared).connection())
            # The gate's transaction also sets the tenant on that connection (RLS).
            stack.enter_context(write_transaction(gate, config.tenant, config.isolation))
            if own == shared:
                return work(gate, record)
            # Bridge/silo: the rows live elsewhere; they commit while the gate is still held.
            conn = stack.enter_context(self._pool(own).connection())
            stack.enter_context(tenant_transaction(conn, config.tenant))
            return work(conn, record)
        raise AssertionError("unreachable")

    async def _guarded(self, run: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(run)
        except (PoolTimeout, psycopg.OperationalError) as error:
            self.failures["database_unavailable"] = self.failures.get(
                "database_unavailable", 0) + 1
            log.warning("tenant database unavailable: %s", error)
            raise unavailable("The tenant's database is unreachable; try again shortly."
                              ) from None
        except psycopg.Error as error:
            # A missing table or privilege: provisioning is behind, not the client's fault.
            self.failures["database_error"] = self.failures.get("database_error", 0) + 1
            log.exception("tenant database refused the runtime: %s", type(error).__name__)
            raise unavailable("The tenant's data is not reachable right now "
                              f"({type(error).__name__}); try again shortly.") from None

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
