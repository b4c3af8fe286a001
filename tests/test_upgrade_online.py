"""Online isolation upgrades against real Postgres: a tenant keeps writing (inserts, updates and
deletes through write_transaction, as the runtime's role) while its data moves, and the target
ends up exactly as the writer left it; the change log is closed to every tenant login."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import psycopg
import pytest
from db_helpers import Conn, connect, create_login_role, drop_roles, q, scratch_database, unique
from tenantry_devenv.services import Postgres
from tenantry_operator import database
from tenantry_operator.capture import start_capture, stop_capture, trigger_names
from tenantry_operator.model import Hnsw, Isolation
from tenantry_operator.upgrade import (
    MoveProgress,
    clean_up_source,
    move_data,
    prepare_target,
    source_schema,
)
from tenantry_runtime.contracts.database import (
    APP_ROLE,
    PRIVATE_SCHEMA,
    bridge_role,
    bridge_schema,
    tenant_transaction,
)
from tenantry_runtime.contracts.tenant_locks import TenantMoved, write_transaction

DIMS = 8
SEED_ROWS = 400


@dataclass
class Shop:
    """A shared database with a moving tenant, a bystander pool tenant and an app login."""

    pg: Postgres
    db: str
    tenant: str
    other: str
    app_user: str
    password: str = field(default_factory=lambda: "pw-" + unique("p"))

    @property
    def dsn(self) -> str:
        return self.pg.dsn(self.db)

    def app(self) -> Conn:
        """A login of the runtime's role, as the runtime writes (RLS applies)."""
        return connect(self.pg, self.db, self.app_user, self.password)

    def bridge(self, tenant: str) -> Conn:
        return connect(self.pg, self.db, bridge_role(tenant), self.password)


@pytest.fixture
def shop(postgres: Postgres) -> Iterator[Shop]:
    with scratch_database(postgres) as db:
        world = Shop(postgres, db, unique("mv"), unique("by"), unique("app"))
        with psycopg.connect(world.dsn, autocommit=True) as admin:
            database.bootstrap_shared(admin)
            create_login_role(admin, world.app_user, world.password, APP_ROLE)
            for tenant in (world.tenant, world.other):
                database.ensure_pool_tenant(admin, tenant)
                database.ensure_collection(admin, tenant, "shared", DIMS, 16, 64)
        yield world
    drop_roles(postgres, [world.app_user, bridge_role(world.tenant)])


def embeddings_table(tenant: str, where: Isolation) -> str:
    return (f"tenantry.tenant_embeddings_d{DIMS}" if where is Isolation.POOL
            else f"{bridge_schema(tenant)}.embeddings")


@dataclass
class Model:
    """What the writer did: the rows it expects, by table and id."""

    documents: dict[str, str] = field(default_factory=dict)
    embeddings: dict[str, str] = field(default_factory=dict)
    conversations: dict[str, str] = field(default_factory=dict)
    operations: int = 0


def vector(rng: random.Random) -> str:
    return str([round(rng.uniform(-1, 1), 6) for _ in range(DIMS)])


class Writer:
    """Inserts, updates and deletes through write_transaction until the tenant moves."""

    def __init__(self, shop: Shop, tenant: str, where: Isolation, seed: int) -> None:
        self.shop, self.tenant, self.where = shop, tenant, where
        self.schema = source_schema(tenant, where)
        self.embeddings = embeddings_table(tenant, where)
        self.rng, self.model = random.Random(seed), Model()
        self.stop, self.moved = threading.Event(), threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    @contextmanager
    def _write(self, gate: Conn, data: Conn) -> Iterator[Conn]:
        """As the runtime: the gate on the shared database, rows where the tenant lives."""
        with write_transaction(gate, self.tenant, self.where.value):
            if data is gate:
                yield gate
            else:
                with tenant_transaction(data, self.tenant):
                    yield data

    def seed(self, rows: int) -> None:
        with ExitStack() as stack:
            gate, data = self._connections(stack)
            with self._write(gate, data) as conn:
                for _ in range(rows):
                    self._insert_document(conn)
                    self._insert_embedding(conn)

    def _connections(self, stack: ExitStack) -> tuple[Conn, Conn]:
        gate = stack.enter_context(self.shop.app())
        if self.where is Isolation.POOL:
            return gate, gate
        return gate, stack.enter_context(self.shop.bridge(self.tenant))

    def _insert_document(self, conn: Conn) -> None:
        doc, title = str(uuid.uuid4()), f"t{self.rng.random()}"
        conn.execute(q("INSERT INTO {t} (tenant_id, id, title, content) VALUES (%s, %s, %s, '')",
                       t=f"{self.schema}.documents"), (self.tenant, doc, title))
        self.model.documents[doc] = title

    def _insert_embedding(self, conn: Conn) -> None:
        row, emb = str(uuid.uuid4()), vector(self.rng)
        conn.execute(q("INSERT INTO {t} (tenant_id, id, content, embedding)"
                       " VALUES (%s, %s, 'c', %s::vector)", t=self.embeddings),
                     (self.tenant, row, emb))
        self.model.embeddings[row] = emb

    def _step(self, conn: Conn) -> None:
        rng, model = self.rng, self.model
        action = rng.randrange(7)
        if action == 0 or not model.documents:
            self._insert_document(conn)
        elif action == 1:
            doc = rng.choice(sorted(model.documents))
            title = f"u{rng.random()}"
            conn.execute(q("UPDATE {t} SET title = %s WHERE id = %s",
                           t=f"{self.schema}.documents"), (title, doc))
            model.documents[doc] = title
        elif action == 2:
            doc = rng.choice(sorted(model.documents))
            conn.execute(q("DELETE FROM {t} WHERE id = %s", t=f"{self.schema}.documents"), (doc,))
            del model.documents[doc]
        elif action == 3 or not model.embeddings:
            self._insert_embedding(conn)
        elif action == 4:
            row, emb = rng.choice(sorted(model.embeddings)), vector(rng)
            conn.execute(q("UPDATE {t} SET embedding = %s::vector WHERE id = %s",
                           t=self.embeddings), (emb, row))
            model.embeddings[row] = emb
        elif action == 5:
            row = rng.choice(sorted(model.embeddings))
            conn.execute(q("DELETE FROM {t} WHERE id = %s", t=self.embeddings), (row,))
            del model.embeddings[row]
        else:  # a table that holds no rows of the tenant when the move starts
            conv, title = str(uuid.uuid4()), f"c{rng.random()}"
            conn.execute(q("INSERT INTO {t} (tenant_id, id, title) VALUES (%s, %s, %s)",
                           t=f"{self.schema}.ai_conversations"), (self.tenant, conv, title))
            model.conversations[conv] = title

    def _run(self) -> None:
        try:
            with ExitStack() as stack:
                gate, data = self._connections(stack)
                while not self.stop.is_set():
                    # The model keeps only what committed.
                    saved = Model(dict(self.model.documents), dict(self.model.embeddings),
                                  dict(self.model.conversations), self.model.operations)
                    try:
                        with self._write(gate, data) as conn:
                            try:
                                for _ in range(self.rng.randint(1, 3)):
                                    self._step(conn)
                            except BaseException:
                                self.model = saved
                                raise
                        self.model.operations += 1
                    except TenantMoved:
                        self.model = saved
                        self.moved.set()
                        return
                    time.sleep(0.002)
        except BaseException as err:  # surfaced by the test
            self.errors.append(err)

    def wait_for(self, operations: int) -> None:
        deadline = time.monotonic() + 30
        while self.model.operations < operations and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.model.operations >= operations, self.errors

    def finish(self) -> Model:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        assert not self.errors, self.errors
        return self.model


def target_rows(dsn: str, tenant: str) -> Model:
    schema = bridge_schema(tenant)
    with psycopg.connect(dsn, autocommit=True) as conn:
        def rows(query: str) -> dict[str, str]:
            return {str(k): str(v) for k, v in conn.execute(q(query, s=schema), (tenant,))}
        return Model(
            rows("SELECT id, title FROM {s}.documents WHERE tenant_id = %s"),
            rows("SELECT id, embedding::text FROM {s}.embeddings WHERE tenant_id = %s"),
            rows("SELECT id, title FROM {s}.ai_conversations WHERE tenant_id = %s"))


def same_vectors(got: dict[str, str], want: dict[str, str]) -> bool:
    """pgvector prints floats in its own shortest form: compare as numbers."""
    def parse(text: str) -> list[float]:
        return [float(x) for x in text.strip("[]").split(",")]
    return got.keys() == want.keys() and all(parse(got[k]) == parse(want[k]) for k in got)


def assert_target_is(model: Model, dsn: str, tenant: str) -> None:
    got = target_rows(dsn, tenant)
    assert got.documents == model.documents
    assert got.conversations == model.conversations
    assert same_vectors(got.embeddings, model.embeddings)


def capture_left(dsn: str, tenant: str) -> tuple[int, int]:
    """(capture triggers of the tenant anywhere, its change-log rows)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        triggers = conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname = ANY (%s)",
                                (list(trigger_names(tenant)),)).fetchone()
        log = conn.execute(q("SELECT count(*) FROM {t} WHERE tenant_id = %s",
                             t=f"{PRIVATE_SCHEMA}.move_changes"), (tenant,)).fetchone()
    assert triggers is not None and log is not None
    return int(triggers[0]), int(log[0])


def make_bridge(shop: Shop, tenant: str) -> None:
    """Raise `tenant` to bridge the provisioning way (no data yet): the move's source."""
    with psycopg.connect(shop.dsn, autocommit=True) as admin:
        prepare_target(admin, tenant, shop.password, DIMS, Hnsw())
        database.ensure_pool_tenant(admin, tenant, "bridge")


@pytest.mark.parametrize("route", ["pool-bridge", "pool-silo", "bridge-silo"])
def test_the_target_equals_what_a_concurrent_writer_did_row_for_row(
    shop: Shop, silo_postgres: Postgres, route: str,
) -> None:
    source, target = (Isolation(x) for x in route.split("-"))
    if source is Isolation.BRIDGE:
        make_bridge(shop, shop.tenant)
    writer = Writer(shop, shop.tenant, source, seed=7)
    writer.seed(SEED_ROWS)
    bystander = Writer(shop, shop.other, Isolation.POOL, seed=8)
    bystander.seed(50)
    with ExitStack() as stack:
        target_dsn = shop.dsn
        if target is Isolation.SILO:
            target_dsn = silo_postgres.dsn(stack.enter_context(scratch_database(silo_postgres)))
        with psycopg.connect(target_dsn, autocommit=True) as conn:
            database.bootstrap_shared(conn)
            prepare_target(conn, shop.tenant, shop.password, DIMS, Hnsw())
        writer.thread.start()
        bystander.thread.start()
        writer.wait_for(20)
        progress = MoveProgress()
        assert move_data(shop.dsn, target_dsn, shop.tenant, source, target, progress)
        assert writer.moved.wait(30)  # the writer learnt of the switch, as the runtime does
        model = writer.finish()
        others = bystander.finish()
        # Written while the data moved, replayed from the log, then held only for the switch.
        assert progress.delta_rows > 0 and progress.delta_rounds >= 2
        assert progress.rows_copied >= 2 * SEED_ROWS
        assert progress.hold_seconds is not None
        assert_target_is(model, target_dsn, shop.tenant)
        with psycopg.connect(shop.dsn, autocommit=True) as admin:
            # RAG reads and every row stayed at the source until cleanup.
            assert admin.execute(q("SELECT count(*) FROM {t} WHERE tenant_id = %s",
                                   t=embeddings_table(shop.tenant, source)),
                                 (shop.tenant,)).fetchone() == (len(model.embeddings),)
            clean_up_source(admin, shop.tenant, source, target)
        assert capture_left(shop.dsn, shop.tenant) == (0, 0)
        assert capture_left(shop.dsn, shop.other) == (0, 0)
        assert_target_is(model, target_dsn, shop.tenant)  # cleanup touched only the source
    # The bystander's rows are its own and all there.
    with shop.app() as conn, tenant_transaction(conn, shop.other):
        titles = dict(conn.execute("SELECT id::text, title FROM tenantry.documents").fetchall())
    assert titles == others.documents


def test_a_mover_killed_mid_move_is_resumed_and_loses_nothing(shop: Shop) -> None:
    writer = Writer(shop, shop.tenant, Isolation.POOL, seed=11)
    writer.seed(SEED_ROWS)
    with psycopg.connect(shop.dsn, autocommit=True) as conn:
        prepare_target(conn, shop.tenant, shop.password, DIMS, Hnsw())
    writer.thread.start()
    writer.wait_for(10)
    code = ("import sys; from tenantry_operator.upgrade import move_data;"
            " from tenantry_operator.model import Isolation;"
            " move_data(sys.argv[1], sys.argv[1], sys.argv[2], Isolation.POOL, Isolation.BRIDGE)")
    mover = subprocess.Popen([sys.executable, "-c", code, shop.dsn, shop.tenant],
                             env={**os.environ})
    with psycopg.connect(shop.dsn, autocommit=True) as admin:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and mover.poll() is None:
            done = admin.execute(q("SELECT bulk_done FROM {t} WHERE tenant_id = %s",
                                   t=f"{PRIVATE_SCHEMA}.moves"), (shop.tenant,)).fetchone()
            if done == (True,):
                break
            time.sleep(0.005)
    assert mover.poll() is None, "the mover finished before it could be killed"
    os.kill(mover.pid, signal.SIGKILL)
    mover.wait(10)
    writer.wait_for(writer.model.operations + 10)  # the writer never stopped
    progress = MoveProgress()
    assert move_data(shop.dsn, shop.dsn, shop.tenant, Isolation.POOL, Isolation.BRIDGE, progress)
    assert progress.rows_copied >= 2 * SEED_ROWS  # resumed: the bulk copy was not repeated
    assert writer.moved.wait(30)
    assert_target_is(writer.finish(), shop.dsn, shop.tenant)


HOSTILE = [
    "SELECT * FROM tenantry_private.move_changes",
    "SELECT * FROM tenantry_private.moves",
    "INSERT INTO tenantry_private.move_changes (tenant_id, source_table, key)"
    " VALUES ('{other}', 'documents', '{{}}')",
    "DELETE FROM tenantry_private.move_changes",
    "UPDATE tenantry_private.moves SET bulk_done = true",
    "SELECT tenantry_private.capture_change()",
]


def test_no_tenant_login_can_read_write_or_call_the_change_capture(shop: Shop) -> None:
    make_bridge(shop, shop.other)  # a bridge tenant with a login of its own
    with psycopg.connect(shop.dsn, autocommit=True) as admin:
        start_capture(admin, shop.tenant, "pool", "bridge", "tenantry",
                      database.tenant_tables(admin, "tenantry"))
    moving = Writer(shop, shop.tenant, Isolation.POOL, seed=3)
    moving.seed(5)  # as the runtime's role: the triggers log it, no privilege needed
    with psycopg.connect(shop.dsn, autocommit=True) as admin:
        logged = admin.execute(q("SELECT DISTINCT tenant_id FROM {t}", t=f"{PRIVATE_SCHEMA}"
                                 ".move_changes")).fetchall()
    assert logged == [(shop.tenant,)]
    for login, tenant in ((shop.app, shop.tenant), (shop.app, shop.other),
                          (lambda: shop.bridge(shop.other), shop.other)):
        for statement in HOSTILE:
            with login() as conn, pytest.raises(psycopg.errors.InsufficientPrivilege), \
                    tenant_transaction(conn, tenant):
                conn.execute(statement.format(other=shop.other))  # type: ignore[arg-type]
    with shop.bridge(shop.other) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        # Hooking the capture function to a table it controls.
        conn.execute(q("CREATE TRIGGER spy AFTER INSERT ON {t} FOR EACH ROW"
                       " EXECUTE FUNCTION tenantry_private.capture_change('new', 'documents')",
                       t=f"{bridge_schema(shop.other)}.documents"))
    with psycopg.connect(shop.dsn, autocommit=True) as admin:
        stop_capture(admin, shop.tenant)
        count = admin.execute(q("SELECT count(*) FROM {t}", t=f"{PRIVATE_SCHEMA}.move_changes")
                              ).fetchone()
    assert count == (0,)
    assert capture_left(shop.dsn, shop.tenant) == (0, 0)
