"""Isolation upgrades against real Postgres: writers are held, then redirected; none is lost."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from db_helpers import scratch_database, unique
from tenantry_devenv.services import Postgres
from tenantry_operator import database
from tenantry_operator.model import Isolation
from tenantry_operator.upgrade import VerificationFailed, fingerprint, move_data
from tenantry_runtime.contracts.database import bridge_schema
from tenantry_runtime.contracts.tenant_locks import TenantMoved, hold_writes, write_transaction


def insert_document(conn: psycopg.Connection[object], schema: str, tenant: str, title: str) -> None:
    conn.execute(f'INSERT INTO "{schema}".documents (tenant_id, title, content) '  # noqa: S608
                 "VALUES (%s, %s, '')", (tenant, title))


@pytest.fixture
def pool_tenant(postgres: Postgres) -> Iterator[tuple[str, str]]:
    """(dsn, tenant): a fresh shared database with one pool tenant in it."""
    with scratch_database(postgres) as db:
        dsn, tenant = postgres.dsn(db), unique("t")
        with psycopg.connect(dsn, autocommit=True) as admin:
            database.bootstrap_shared(admin)
            database.ensure_pool_tenant(admin, tenant)
        yield dsn, tenant


def test_writers_wait_while_held_and_learn_that_the_tenant_moved(
    pool_tenant: tuple[str, str],
) -> None:
    dsn, tenant = pool_tenant
    outcome: list[str] = []

    def writer() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            try:
                with write_transaction(conn, tenant, "pool"):
                    insert_document(conn, "tenantry", tenant, "late")
                outcome.append("written")
            except TenantMoved:
                outcome.append("moved")

    with psycopg.connect(dsn, autocommit=True) as upgrader, upgrader.transaction():
        hold_writes(upgrader, tenant)
        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(0.5)
        assert outcome == []  # the writer is held, not failed and not written
        database.ensure_pool_tenant(upgrader, tenant, "bridge")
    thread.join(10)
    assert outcome == ["moved"]


def test_concurrent_writes_during_a_move_all_land_in_the_new_location(
    pool_tenant: tuple[str, str],
) -> None:
    dsn, tenant = pool_tenant
    with psycopg.connect(dsn, autocommit=True) as admin:
        database.ensure_collection(admin, tenant, "shared", 8, 16, 64)
        with write_transaction(admin, tenant, "pool"):
            for i in range(200):
                insert_document(admin, "tenantry", tenant, f"seed {i}")
        database.ensure_bridge_tenant(admin, tenant, "pw-" + unique("p"))
        database.ensure_collection(admin, tenant, "schema", 8, 16, 64)
    acknowledged: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        location, expected, n = "tenantry", "pool", 0
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set() or n < 5:
                title = f"live {n}"
                try:
                    with write_transaction(conn, tenant, expected):
                        insert_document(conn, location, tenant, title)
                except TenantMoved:  # the runtime reloads its config and retries
                    location, expected = bridge_schema(tenant), "bridge"
                    continue
                acknowledged.append(title)
                n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.3)
    progress: list[int] = []
    move_data(dsn, dsn, tenant, Isolation.POOL, Isolation.BRIDGE, 8, progress)
    time.sleep(0.3)
    stop.set()
    thread.join(30)

    with psycopg.connect(dsn, autocommit=True) as admin:
        titles = {row[0] for row in admin.execute(
            f'SELECT title FROM "{bridge_schema(tenant)}".documents WHERE tenant_id = %s',  # noqa: S608
            (tenant,))}
    assert len(acknowledged) >= 5
    assert set(acknowledged) <= titles  # every acknowledged write survived the move
    assert {f"seed {i}" for i in range(200)} <= titles
    assert sum(progress) >= 200


def test_a_copy_that_differs_fails_verification_and_nothing_switches(
    pool_tenant: tuple[str, str],
) -> None:
    dsn, tenant = pool_tenant
    with psycopg.connect(dsn, autocommit=True) as admin:
        with write_transaction(admin, tenant, "pool"):
            insert_document(admin, "tenantry", tenant, "original")
        database.ensure_bridge_tenant(admin, tenant, "pw-" + unique("p"))
        schema = bridge_schema(tenant)
        # A target that silently alters rows, as a broken copy would.
        admin.execute(f"""
            CREATE FUNCTION "{schema}".mangle() RETURNS trigger LANGUAGE plpgsql
            AS $$ BEGIN NEW.title := NEW.title || '!'; RETURN NEW; END $$;
            CREATE TRIGGER mangle BEFORE INSERT ON "{schema}".documents
            FOR EACH ROW EXECUTE FUNCTION "{schema}".mangle();""")
    with pytest.raises(VerificationFailed, match="documents"):
        move_data(dsn, dsn, tenant, Isolation.POOL, Isolation.BRIDGE, None, [])
    with psycopg.connect(dsn, autocommit=True) as admin:
        row = admin.execute("SELECT isolation FROM tenantry.tenants WHERE tenant_id = %s",
                            (tenant,)).fetchone()
        assert row == ("pool",)  # the registry did not switch
        assert fingerprint(admin, "tenantry", "documents", tenant)[0] == 1  # source intact
