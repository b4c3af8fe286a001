"""Isolation upgrades against real Postgres: writers are held, then redirected; none is lost."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from db_helpers import Conn, q, scratch_database, unique
from psycopg.conninfo import make_conninfo
from tenantry_devenv.services import Postgres
from tenantry_operator import database
from tenantry_operator.model import Hnsw, Isolation
from tenantry_operator.upgrade import (
    CleanupRefused,
    MoveProgress,
    MoveRefused,
    RegistryMismatch,
    VerificationFailed,
    clean_up_source,
    fingerprint,
    move_data,
    prepare_target,
    survey_source,
)
from tenantry_runtime.contracts.database import bridge_schema, rollup_usage
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
    progress = MoveProgress()
    move_data(dsn, dsn, tenant, Isolation.POOL, Isolation.BRIDGE, progress)
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
    assert progress.rows_copied >= 200


@pytest.mark.parametrize("change", ["NEW.title := NEW.title || '!'",
                                    "NEW.created_at := NEW.created_at + interval '1 microsecond'"])
def test_a_copy_that_differs_fails_verification_and_nothing_switches(
    pool_tenant: tuple[str, str], change: str,
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
            AS $$ BEGIN {change}; RETURN NEW; END $$;
            CREATE TRIGGER mangle BEFORE INSERT ON "{schema}".documents
            FOR EACH ROW EXECUTE FUNCTION "{schema}".mangle();""")
    with pytest.raises(VerificationFailed, match="documents"):
        move_data(dsn, dsn, tenant, Isolation.POOL, Isolation.BRIDGE)
    with psycopg.connect(dsn, autocommit=True) as admin:
        row = admin.execute("SELECT isolation FROM tenantry.tenants WHERE tenant_id = %s",
                            (tenant,)).fetchone()
        assert row == ("pool",)  # the registry did not switch
        assert fingerprint(admin, "tenantry", "documents", tenant)[0] == 1  # source intact


# --- helpers for whole moves -------------------------------------------------------------------


def rows_of(conn: Conn, table: str, tenant: str) -> list[tuple[Any, ...]]:
    """The tenant's rows of `schema.table`, in a stable order, as Python values."""
    schema, name = table.split(".")
    return sorted(tuple(row) for row in conn.execute(q(
        "SELECT * FROM {t} WHERE tenant_id = %s", t=f"{schema}.{name}"), (tenant,)).fetchall())


def seed(conn: Conn, tenant: str, embeddings: str | None) -> None:
    """Rows with timestamps, intervals' worth of dates, floats and JSON in every data table."""
    with write_transaction(conn, tenant, "pool"):
        for i in range(3):
            insert_document(conn, "tenantry", tenant, f"doc {i}")
            conn.execute("INSERT INTO tenantry.ai_conversations (tenant_id, title, messages,"
                         " created_at) VALUES (%s, %s, %s, %s)",
                         (tenant, f"c {i}", '[{"role": "user", "content": "hi"}]',
                          datetime(2026, 1, 15 + i, 12, 30, 0, 123456, tzinfo=UTC)))
            conn.execute("INSERT INTO tenantry.ai_usage_logs (tenant_id, request_id, created_at,"
                         " model, input_tokens) VALUES (%s, %s, now(), %s, %s)",
                         (tenant, f"r{i}", f"model-{'Bab'[i]}", i))
            if embeddings:
                conn.execute(q("INSERT INTO {t} (tenant_id, content, embedding)"
                               " VALUES (%s, %s, %s::vector)", t=embeddings),
                             (tenant, f"chunk {i}", str([0.1 + i / 3, 1e-7 * i, 2.0 / 3])))
    rollup_usage(conn, "tenantry", datetime.now(UTC).date(), tenant)


def registry(conn: Conn, tenant: str) -> str:
    row = conn.execute("SELECT isolation FROM tenantry.tenants WHERE tenant_id = %s",
                       (tenant,)).fetchone()
    assert row is not None
    return str(row[0])


def prepare_bridge(dsn: str, tenant: str, dims: int | None) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        prepare_target(conn, tenant, "pw-" + unique("p"), dims, Hnsw())


DATA = ["documents", "ai_conversations", "ai_usage_logs", "usage_daily"]


# --- item: what is copied is what cleanup removes -----------------------------------------------


def test_embeddings_of_a_tenant_with_rag_disabled_are_moved_not_deleted(
    pool_tenant: tuple[str, str],
) -> None:
    dsn, tenant = pool_tenant
    with psycopg.connect(dsn, autocommit=True) as admin:
        # RAG was on (a shared collection holds its vectors), another dimension exists too.
        database.ensure_collection(admin, tenant, "shared", 3, 16, 64)
        database.ensure_collection(admin, unique("n"), "shared", 5, 16, 64)
        seed(admin, tenant, "tenantry.tenant_embeddings_d3")
        before = {t: rows_of(admin, f"tenantry.{t}", tenant) for t in DATA}
        vectors = rows_of(admin, "tenantry.tenant_embeddings_d3", tenant)
        # RAG is disabled now: the upgrade still finds the vectors and makes room for them.
        total, held = survey_source(admin, tenant, Isolation.POOL)
    assert (total, held) == (3 * 5, [3])  # 3 rows in each of 5 tables
    prepare_bridge(dsn, tenant, held[0])
    assert move_data(dsn, dsn, tenant, Isolation.POOL, Isolation.BRIDGE)
    with psycopg.connect(dsn, autocommit=True) as admin:
        clean_up_source(admin, tenant, Isolation.POOL, Isolation.BRIDGE)
        schema = bridge_schema(tenant)
        assert rows_of(admin, f"{schema}.embeddings", tenant) == vectors
        assert {t: rows_of(admin, f"{schema}.{t}", tenant) for t in DATA} == before
        for table in [*DATA, "tenant_embeddings_d3", "tenant_embeddings_d5"]:
            assert rows_of(admin, f"tenantry.{table}", tenant) == []
        assert registry(admin, tenant) == "bridge"


def test_a_source_table_without_a_verified_copy_blocks_cleanup(
    pool_tenant: tuple[str, str],
) -> None:
    dsn, tenant = pool_tenant
    with psycopg.connect(dsn, autocommit=True) as admin:
        seed(admin, tenant, None)
        prepare_bridge(dsn, tenant, None)
    assert move_data(dsn, dsn, tenant, Isolation.POOL, Isolation.BRIDGE)
    with psycopg.connect(dsn, autocommit=True) as admin:
        # A tenant table the move never saw (e.g. added by hand or by a later migration).
        admin.execute("CREATE TABLE tenantry.notes (tenant_id text NOT NULL, body text)")
        admin.execute("INSERT INTO tenantry.notes VALUES (%s, 'keep me')", (tenant,))
        with pytest.raises(CleanupRefused, match=r"notes in tenantry have no verified copy"):
            clean_up_source(admin, tenant, Isolation.POOL, Isolation.BRIDGE)
        assert len(rows_of(admin, "tenantry.documents", tenant)) == 3  # nothing was removed
        assert rows_of(admin, "tenantry.notes", tenant) == [(tenant, "keep me")]


def test_a_bridge_table_that_cannot_be_copied_per_tenant_refuses_the_move(
    silo_postgres: Postgres, pool_tenant: tuple[str, str],
) -> None:
    dsn, tenant = pool_tenant
    prepare_bridge(dsn, tenant, None)
    with psycopg.connect(dsn, autocommit=True) as admin:
        database.ensure_pool_tenant(admin, tenant, "bridge")
        lookup = f"{bridge_schema(tenant)}.lookup"
        admin.execute(q("CREATE TABLE {t} (k text)", t=lookup))  # no tenant_id
        admin.execute(q("INSERT INTO {t} VALUES ('keep me')", t=lookup))
    # A silo is another server: the bridge role of the shared one is not there.
    with scratch_database(silo_postgres, "silo") as silo:
        silo_dsn = silo_postgres.dsn(silo)
        with psycopg.connect(silo_dsn, autocommit=True) as conn:
            database.bootstrap_shared(conn)
        prepare_bridge(silo_dsn, tenant, None)
        with pytest.raises(MoveRefused, match="lookup has rows but no tenant_id column"):
            move_data(dsn, silo_dsn, tenant, Isolation.BRIDGE, Isolation.SILO)
    with psycopg.connect(dsn, autocommit=True) as admin:
        assert registry(admin, tenant) == "bridge"


# --- item: a second reconcile never re-copies a cleaned source ----------------------------------


def test_a_second_move_after_a_completed_move_keeps_the_target_data(
    pool_tenant: tuple[str, str],
) -> None:
    dsn, tenant = pool_tenant
    schema = bridge_schema(tenant)
    with psycopg.connect(dsn, autocommit=True) as admin:
        seed(admin, tenant, None)
    prepare_bridge(dsn, tenant, None)
    assert move_data(dsn, dsn, tenant, Isolation.POOL, Isolation.BRIDGE)
    with psycopg.connect(dsn, autocommit=True) as admin:
        clean_up_source(admin, tenant, Isolation.POOL, Isolation.BRIDGE)
        with write_transaction(admin, tenant, "bridge"):
            insert_document(admin, schema, tenant, "written after the move")
        after = {t: rows_of(admin, f"{schema}.{t}", tenant) for t in DATA}
    assert len(after["documents"]) == 4
    # A reconcile that read the registry before the first move finished tries again.
    prepare_bridge(dsn, tenant, None)
    assert not move_data(dsn, dsn, tenant, Isolation.POOL, Isolation.BRIDGE)
    with psycopg.connect(dsn, autocommit=True) as admin:
        clean_up_source(admin, tenant, Isolation.POOL, Isolation.BRIDGE)  # idempotent
        assert {t: rows_of(admin, f"{schema}.{t}", tenant) for t in DATA} == after
        assert registry(admin, tenant) == "bridge"


def test_a_move_whose_registry_names_neither_end_stops_with_a_clear_error(
    pool_tenant: tuple[str, str],
) -> None:
    dsn, tenant = pool_tenant
    with psycopg.connect(dsn, autocommit=True) as admin:
        seed(admin, tenant, None)
        prepare_bridge(dsn, tenant, None)
        database.ensure_pool_tenant(admin, tenant, "silo")  # someone else moved it on
    with pytest.raises(RegistryMismatch, match=r"lives at silo, neither pool .* nor bridge"):
        move_data(dsn, dsn, tenant, Isolation.POOL, Isolation.BRIDGE)
    with psycopg.connect(dsn, autocommit=True) as admin:
        assert rows_of(admin, f"{bridge_schema(tenant)}.documents", tenant) == []  # nothing copied
        assert registry(admin, tenant) == "silo"


# --- item: verification does not depend on session settings -------------------------------------


def test_verification_passes_when_the_target_session_has_other_settings(
    postgres: Postgres, pool_tenant: tuple[str, str],
) -> None:
    dsn, tenant = pool_tenant
    with psycopg.connect(dsn, autocommit=True) as admin:
        database.ensure_collection(admin, tenant, "shared", 3, 16, 64)
        seed(admin, tenant, "tenantry.tenant_embeddings_d3")
        before = {t: rows_of(admin, f"tenantry.{t}", tenant) for t in DATA}
    with scratch_database(postgres, "silo") as silo:
        # The silo server runs with other defaults than the shared one.
        silo_dsn = make_conninfo(postgres.dsn(silo), options=(
            "-c TimeZone=Pacific/Chatham -c DateStyle=SQL,DMY -c IntervalStyle=sql_standard"
            " -c extra_float_digits=0 -c bytea_output=escape -c lc_monetary=C"))
        with psycopg.connect(silo_dsn, autocommit=True) as conn:
            assert conn.execute("SHOW TimeZone").fetchone() == ("Pacific/Chatham",)
            database.bootstrap_shared(conn)
            prepare_target(conn, tenant, "pw-" + unique("p"), 3, Hnsw())
        progress = MoveProgress()
        assert move_data(dsn, silo_dsn, tenant, Isolation.POOL, Isolation.SILO, progress)
        schema = bridge_schema(tenant)
        with psycopg.connect(postgres.dsn(silo), autocommit=True) as conn:
            assert {t: rows_of(conn, f"{schema}.{t}", tenant) for t in DATA} == before
            assert len(rows_of(conn, f"{schema}.embeddings", tenant)) == 3
    assert progress.rows_copied == 3 * 5
    with psycopg.connect(dsn, autocommit=True) as admin:
        assert registry(admin, tenant) == "silo"


def test_the_fingerprint_is_the_same_under_any_session_settings(
    postgres: Postgres, pool_tenant: tuple[str, str],
) -> None:
    dsn, tenant = pool_tenant
    with psycopg.connect(dsn, autocommit=True) as admin:
        seed(admin, tenant, None)
        plain = {t: fingerprint(admin, "tenantry", t, tenant) for t in DATA}
        admin.execute("SET TimeZone = 'Asia/Kathmandu'")
        admin.execute("SET DateStyle = 'German, YMD'")
        admin.execute("SET extra_float_digits = -3")
        assert {t: fingerprint(admin, "tenantry", t, tenant) for t in DATA} == plain
        assert plain["documents"][0] == 3


def test_two_concurrent_moves_copy_once_and_the_second_finds_the_work_done(
    pool_tenant: tuple[str, str],
) -> None:
    dsn, tenant = pool_tenant
    with psycopg.connect(dsn, autocommit=True) as admin:
        seed(admin, tenant, None)
        before = {t: rows_of(admin, f"tenantry.{t}", tenant) for t in DATA}
    prepare_bridge(dsn, tenant, None)
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(move_data, dsn, dsn, tenant, Isolation.POOL, Isolation.BRIDGE)
                for _ in range(2)]
        assert sorted(run.result(timeout=60) for run in runs) == [False, True]
    with psycopg.connect(dsn, autocommit=True) as admin:
        clean_up_source(admin, tenant, Isolation.POOL, Isolation.BRIDGE)
        assert {t: rows_of(admin, f"{bridge_schema(tenant)}.{t}", tenant) for t in DATA} == before
