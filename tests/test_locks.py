"""A tenant's login cannot hold the locks other tenants' writes and the operator's upkeep need.

Every lock the code takes is tried by a bridge tenant's own login (whose password the tenant
holds): advisory keys are derivable from the source, so it takes them all; table and row locks
must be refused for lack of privileges. Another tenant's writer, migrate(), ensure_partitions()
and ensure_collection() must still finish promptly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import psycopg
import pytest
from db_helpers import Conn, connect, create_login_role, drop_roles, q, scratch_database, unique
from tenantry_devenv.services import Postgres
from tenantry_operator import database
from tenantry_runtime.contracts import database as contracts_database
from tenantry_runtime.contracts.database import (
    APP_ROLE,
    PRIVATE_SCHEMA,
    bridge_role,
    ensure_partitions,
    ensure_private_schema,
    migrate,
)
from tenantry_runtime.contracts.tenant_locks import (
    TenantNotRegistered,
    hold_writes,
    write_transaction,
)

DIMS = 4
T = TypeVar("T")


@dataclass
class Shared:
    pg: Postgres
    db: str
    victim: str  # a pool tenant
    attacker: str  # a bridge tenant
    attacker_password: str
    app_user: str
    app_password: str

    def admin(self) -> Conn:
        return connect(self.pg, self.db)

    def app(self) -> Conn:
        return connect(self.pg, self.db, self.app_user, self.app_password)


@pytest.fixture
def shared(postgres: Postgres) -> Iterator[Shared]:
    attacker, app_user = unique("evil"), unique("runtime")
    roles = [bridge_role(attacker), app_user]
    try:
        with scratch_database(postgres, "lock") as db:
            world = Shared(postgres, db, unique("v"), attacker, "pw-" + unique("p"), app_user,
                           "pw-" + unique("p"))
            with world.admin() as admin:
                database.bootstrap_shared(admin)
                database.ensure_pool_tenant(admin, world.victim)
                database.ensure_collection(admin, world.victim, "shared", DIMS, 16, 64)
                database.ensure_bridge_tenant(admin, attacker, world.attacker_password)
                database.ensure_pool_tenant(admin, attacker, "bridge")
                create_login_role(admin, app_user, world.app_password, APP_ROLE)
            yield world
    finally:
        drop_roles(postgres, roles)


# Every key the code used to take with pg_advisory_*, and the names of today's locks.
def derivable_keys(victim: str) -> list[str]:
    collection = f"tenantry.tenant_embeddings_d{DIMS}"
    return [f"tenantry.tenant-writes:{victim}", "tenantry.migrate:tenantry",
            "tenantry.partitions:tenantry", "tenantry.extension.vector",
            f"tenantry.collection:{collection}", "migrate:tenantry", "partitions:tenantry",
            "extension:vector", f"collection:{collection}"]


def attack(conn: Conn, victim: str) -> list[str]:
    """Take every lock a tenant login can name; return the attempts that were refused."""
    for key in derivable_keys(victim):
        conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (key,))
    refused = []
    conn.execute("BEGIN")
    lock = "LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE"
    attempts = [
        q(lock, t=f"{PRIVATE_SCHEMA}.locks"),
        q("SELECT * FROM {t} FOR UPDATE", t=f"{PRIVATE_SCHEMA}.locks"),
        q(lock, t="tenantry.tenants"),
        q("SELECT * FROM {t} FOR UPDATE", t="tenantry.tenants"),
        q(lock, t="tenantry.documents"),
        q(lock, t=f"tenantry.tenant_embeddings_d{DIMS}"),
        q(lock, t="tenantry.ai_usage_logs"),
    ]
    for statement in attempts:
        conn.execute("SAVEPOINT attempt")
        try:
            conn.execute(statement)
        except psycopg.errors.InsufficientPrivilege:
            refused.append(statement.as_string(conn))
        conn.execute("ROLLBACK TO SAVEPOINT attempt")
    return refused  # the transaction stays open, holding whatever it got


def finishes(work: Callable[[], object], seconds: float) -> bool:
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    finished = done.wait(seconds)
    if errors:
        raise errors[0]
    return finished


def test_a_bridge_login_cannot_block_other_tenants_or_the_operator(shared: Shared) -> None:
    attacker = connect(shared.pg, shared.db, bridge_role(shared.attacker),
                       shared.attacker_password)
    outcomes: dict[str, bool] = {}
    try:
        refused = attack(attacker, shared.victim)

        def write() -> None:
            with shared.app() as conn, write_transaction(conn, shared.victim, "pool"):
                conn.execute("INSERT INTO tenantry.documents (tenant_id, content)"
                             " VALUES (%s, 'still writing')", (shared.victim,))

        def upkeep(step: Callable[[Conn], object]) -> Callable[[], None]:
            def run() -> None:
                with shared.admin() as conn:
                    step(conn)
            return run

        for name, work in {
            "writer": write,
            "migrate": upkeep(lambda c: migrate(c, "tenantry")),
            "ensure_partitions": upkeep(lambda c: ensure_partitions(c, "tenantry")),
            "ensure_collection": upkeep(lambda c: database.ensure_collection(
                c, shared.victim, "shared", DIMS, 16, 64)),
            "bootstrap_shared": upkeep(database.bootstrap_shared),
        }.items():
            outcomes[name] = finishes(work, 5)
    finally:
        attacker.close()  # releases whatever it held, so no thread stays blocked
    assert len(refused) == 7, refused
    assert outcomes == dict.fromkeys(outcomes, True)
    with shared.admin() as admin:
        row = admin.execute("SELECT count(*) FROM tenantry.documents WHERE tenant_id = %s",
                            (shared.victim,)).fetchone()
        assert row == (1,)


def test_writers_share_the_gate(shared: Shared) -> None:
    with shared.app() as first, write_transaction(first, shared.victim, "pool"):
        def second() -> None:
            with shared.app() as conn, write_transaction(conn, shared.victim, "pool"):
                conn.execute("INSERT INTO tenantry.documents (tenant_id, content)"
                             " VALUES (%s, 'b')", (shared.victim,))
        assert finishes(second, 5)  # not held up by the first writer's open transaction


def test_the_operators_routine_upsert_does_not_wait_for_writers(shared: Shared) -> None:
    def upsert() -> None:
        with shared.admin() as conn:
            database.ensure_pool_tenant(conn, shared.victim)

    with shared.app() as writer, write_transaction(writer, shared.victim, "pool"):
        assert finishes(upsert, 5)


def test_holding_the_gate_of_an_unregistered_tenant_is_refused(shared: Shared) -> None:
    with shared.admin() as admin, admin.transaction(), pytest.raises(TenantNotRegistered):
        hold_writes(admin, unique("nobody"))


# --- bootstrap and concurrency of the operator's own locks ---------------------------------------


def run_together(work: Callable[[], T], times: int) -> list[T]:
    """Start `work` `times` times at once (a barrier lines them up); return results in order."""
    barrier = threading.Barrier(times)

    def lined_up() -> T:
        barrier.wait()
        return work()

    with ThreadPoolExecutor(times) as pool:
        return [f.result(timeout=60) for f in [pool.submit(lined_up) for _ in range(times)]]


def test_the_lock_schema_is_created_once_by_racing_callers(postgres: Postgres) -> None:
    with scratch_database(postgres, "boot") as db:
        def create() -> None:
            with connect(postgres, db) as conn:
                ensure_private_schema(conn)

        run_together(create, 6)
        with connect(postgres, db) as conn:
            row = conn.execute("SELECT count(*) FROM pg_class c JOIN pg_namespace n"
                               " ON n.oid = c.relnamespace WHERE n.nspname = %s"
                               " AND c.relkind = 'r'", (PRIVATE_SCHEMA,)).fetchone()
            assert row == (len(contracts_database._PRIVATE_TABLES),)  # each table once


def test_concurrent_partition_upkeep_creates_each_partition_once(postgres: Postgres) -> None:
    with scratch_database(postgres, "part") as db:
        with connect(postgres, db) as conn:
            migrate(conn, "tenantry")

        def upkeep() -> list[str]:
            with connect(postgres, db) as conn:
                return ensure_partitions(conn, "tenantry", months_ahead=2)

        created = [name for names in run_together(upkeep, 4) for name in names]
        assert len(created) == len(set(created)) == 6  # 3 months x 2 tables, each once
