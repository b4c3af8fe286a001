"""Raise a tenant's isolation in place while it keeps writing: nothing is lost, writes are held
only for the switch.

The move records itself and puts change-capture triggers on the source (`capture`), bulk copies
every table from one consistent snapshot, then replays the keys the tenant changed meanwhile in
rounds until few are left. Every table is then verified against a snapshot of the source (all
rows but those still in the change log), and only then are the tenant's writers held (its
registry row locked exclusively, see `tenantry_runtime.contracts.tenant_locks`) while the last
changes are replayed and verified, the verified copies recorded and the registry row flipped, in
one transaction; the writers resume against the new location. A crash before the flip resumes
(the bulk copy is skipped once recorded as done; replaying a key twice changes nothing); a crash
after it only finishes cleanup.

What is copied and what cleanup removes are one list, read from the catalog (`source_tables`):
every table of the source that holds the tenant's rows, whatever the spec says today (a tenant
with RAG disabled keeps its embeddings). Cleanup removes nothing without a verified copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import psycopg
from lightkube.models.core_v1 import EventSource, ObjectReference
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Event
from psycopg import sql
from psycopg.abc import Buffer
from tenantry_runtime.contracts.database import (
    PRIVATE_SCHEMA,
    SHARED_SCHEMA,
    Conn,
    bridge_schema,
    ensure_private_schema,
    fetch_rows,
    migrate_lock_key,
    operator_lock,
    set_tenant,
    validate_tenant_id,
)
from tenantry_runtime.contracts.tenant_locks import hold_writes

from . import database
from .capture import (
    Key,
    bulk_rows,
    consume_changes,
    key_columns,
    keys_json,
    last_change,
    mark_bulk_done,
    pending_changes,
    start_capture,
    stop_capture,
)
from .conditions import now_rfc3339
from .model import GROUP, VERSION, Hnsw, Isolation
from .steps import StepContext

log = logging.getLogger(__name__)
T = TypeVar("T")

_VERIFIED = sql.Identifier(PRIVATE_SCHEMA, "verified_copies")


class VerificationFailed(RuntimeError):
    """The copy does not match the source; the switch does not happen."""


class MoveRefused(RuntimeError):
    """The data cannot be moved without losing rows; nothing was switched."""


class RegistryMismatch(RuntimeError):
    """The registry names neither the source nor the target of the move; nothing was touched."""


class CleanupRefused(RuntimeError):
    """A source table has no verified copy; nothing was removed."""


@dataclass(frozen=True)
class TablePair:
    """A source table and where its rows go; target None: no rows there and nothing to copy."""

    source: tuple[str, str]
    target: tuple[str, str] | None


def current_isolation(conn: Conn, tenant: str) -> Isolation | None:
    """Where the tenant's data lives now, from the shared registry row (None: not yet)."""
    validate_tenant_id(tenant)
    exists = fetch_rows(conn, "SELECT to_regclass('tenantry.tenants') IS NOT NULL")[0][0]
    if not exists:
        return None
    with conn.transaction():
        set_tenant(conn, tenant)
        rows = fetch_rows(conn, "SELECT isolation FROM tenantry.tenants WHERE tenant_id = %s",
                          (tenant,))
    return Isolation(rows[0][0]) if rows else None


# --- what moves ---------------------------------------------------------------------------------


def source_schema(tenant: str, source: Isolation) -> str:
    if source is Isolation.POOL:
        return SHARED_SCHEMA
    if source is Isolation.BRIDGE:
        return bridge_schema(tenant)
    raise ValueError(f"nothing moves out of {source.value}: it is the highest isolation")


def source_tables(conn: Conn, tenant: str, source: Isolation) -> list[str]:
    """Every table of the source that cleanup removes the tenant's rows from: the move copies
    exactly these. Pool: each shared table with tenant_id but the registry; bridge: every
    table of the schema (it is dropped whole) but its migration ledger."""
    schema = source_schema(tenant, source)
    if source is Isolation.POOL:
        return [t for t in database.tenant_tables(conn, schema) if t != "tenants"]
    rows = fetch_rows(conn, """
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition
          AND c.relname <> 'schema_migrations'
        ORDER BY c.relname""", (schema,))
    return [str(name) for (name,) in rows]


def target_table(source: Isolation, table: str) -> str:
    """The target's name for a source table: pool embeddings tables become `embeddings`."""
    if source is Isolation.POOL and database._is_shared_table(SHARED_SCHEMA, table):
        return database.SCHEMA_EMBEDDINGS
    return table


def _exists(conn: Conn, schema: str, table: str) -> bool:
    return bool(fetch_rows(conn, """
        SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s""", (schema, table)))


def _has_rows(conn: Conn, schema: str, table: str, tenant: str) -> bool:
    return bool(fetch_rows(conn, sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE tenant_id = %s)"
                                         ).format(sql.Identifier(schema, table)), (tenant,))[0][0])


def _columns(conn: Conn, schema: str, table: str) -> list[tuple[str, str]]:
    return [(str(n), str(t)) for n, t in fetch_rows(conn, """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum""", (schema, table))]


def _embedding_dimensions(conn: Conn, schema: str, table: str) -> int | None:
    rows = fetch_rows(conn, """
        SELECT a.atttypmod FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s AND a.attname = 'embedding'
          AND NOT a.attisdropped""", (schema, table))
    return int(rows[0][0]) if rows and rows[0][0] > 0 else None


def plan_move(src: Conn, dst: Conn, tenant: str, source: Isolation
              ) -> tuple[list[TablePair], list[tuple[str, str]]]:
    """Pair every source table with its target; refuse whatever would leave rows behind.

    Also returns the target tables that no source fills but that may hold stale rows of an
    earlier attempt. Run under the write gate: which tables hold the tenant's rows cannot
    change meanwhile.
    """
    schema, dst_schema = source_schema(tenant, source), bridge_schema(tenant)
    tables = source_tables(src, tenant, source)
    per_tenant = set(database.tenant_tables(src, schema))
    pairs: list[TablePair] = []
    stale: list[tuple[str, str]] = []
    by_target: dict[str, list[str]] = {}
    for table in tables:
        if table in per_tenant:
            by_target.setdefault(target_table(source, table), []).append(table)
        elif _removes_rows(src, schema, table, tenant, source):
            raise MoveRefused(f"{schema}.{table} has rows but no tenant_id column, so it cannot"
                              " be copied per tenant; move or empty it by hand first")
        else:
            pairs.append(TablePair((schema, table), None))  # empty: nothing to lose
    for target, sources in by_target.items():
        holding = [t for t in sources if _has_rows(src, schema, t, tenant)]
        if len(holding) > 1:
            raise MoveRefused(f"tenant {tenant} has rows in {', '.join(holding)} of {schema};"
                              f" they cannot all go into {dst_schema}.{target}")
        present = _exists(dst, dst_schema, target)
        if holding and not present:
            raise MoveRefused(f"{schema}.{holding[0]} holds rows of {tenant} but the target has"
                              f" no {dst_schema}.{target}")
        chosen = holding[0] if holding else None
        if chosen is not None and _columns(src, schema, chosen) != _columns(
                dst, dst_schema, target):
            raise MoveRefused(f"{schema}.{chosen} and {dst_schema}.{target} have different"
                              " columns (e.g. other embedding dimensions)")
        if chosen is None and present:
            stale.append((dst_schema, target))
        pairs += [TablePair((schema, t), (dst_schema, target) if t == chosen else None)
                  for t in sources]
    return pairs, stale


def survey_source(conn: Conn, tenant: str, source: Isolation) -> tuple[int, list[int]]:
    """(rows to move, dimensions of the embeddings tables holding some of them)."""
    schema, total, dimensions = source_schema(tenant, source), 0, []
    with conn.transaction():
        set_tenant(conn, tenant)
        per_tenant = set(database.tenant_tables(conn, schema))
        for table in source_tables(conn, tenant, source):
            if table not in per_tenant:
                continue  # plan_move refuses it with a clear message
            count = int(fetch_rows(conn, sql.SQL("SELECT count(*) FROM {} WHERE tenant_id = %s")
                                   .format(sql.Identifier(schema, table)), (tenant,))[0][0])
            total += count
            dims = _embedding_dimensions(conn, schema, table)
            if count and dims is not None and target_table(
                    source, table) == database.SCHEMA_EMBEDDINGS:
                dimensions.append(dims)
    return total, dimensions


# --- copy and verify ----------------------------------------------------------------------------


# Catalog reads repeated for every replayed batch (and under the gate): remembered for the
# length of one move, in the mover's thread.
_catalog = threading.local()


@contextlib.contextmanager
def _remembering_catalog() -> Iterator[None]:
    _catalog.cache = {}
    try:
        yield
    finally:
        _catalog.cache = None


def _remembered(conn: Conn, kind: str, schema: str, table: str, read: Callable[[], T]) -> T:
    cache: dict[tuple[object, ...], Any] | None = getattr(_catalog, "cache", None)
    if cache is None:
        return read()
    key = (conn.info.host, conn.info.port, conn.info.dbname, kind, schema, table)
    if key not in cache:
        cache[key] = read()
    return cast(T, cache[key])


def _key_columns(conn: Conn, schema: str, table: str) -> list[str]:
    return _remembered(conn, "key", schema, table, lambda: key_columns(conn, schema, table))


def _key_order(conn: Conn, schema: str, table: str) -> sql.Composable:
    return _remembered(conn, "order", schema, table, lambda: _read_key_order(conn, schema, table))


def _read_key_order(conn: Conn, schema: str, table: str) -> sql.Composable:
    """ORDER BY the primary key (all columns without one), tenant_id left out (it is fixed),
    text in the "C" collation: the same rows come out in the same order on any server."""
    rows = fetch_rows(conn, """
        SELECT a.attname, a.attcollation <> 0 FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
        WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped
          AND a.attname <> 'tenant_id'
          AND (i.indexrelid IS NULL OR a.attnum = ANY (i.indkey::int2[]))
        ORDER BY coalesce(array_position(i.indkey::int2[], a.attnum), a.attnum)""",
        (schema, table))
    keys = [sql.SQL('{} COLLATE "C"').format(sql.Identifier(name)) if collatable
            else sql.Identifier(name) for name, collatable in rows]
    return sql.SQL(" ORDER BY ") + sql.SQL(", ").join(keys) if keys else sql.SQL("")


def _keyset(conn: Conn, schema: str, table: str, keys: list[Key]
            ) -> tuple[sql.Composable, sql.Composable]:
    """(a row source `k` of the given primary keys, the join condition of `r` to it)."""
    relation = sql.Identifier(schema, table)
    keyset = sql.SQL("jsonb_populate_recordset(NULL::{}, {}::jsonb) AS k").format(
        relation, sql.Literal(keys_json(keys)))
    match = sql.SQL(" AND ").join(sql.SQL("r.{c} = k.{c}").format(c=sql.Identifier(c))
                                  for c in _key_columns(conn, schema, table))
    return keyset, match


def _select(conn: Conn, schema: str, table: str, tenant: str, keys: list[Key] | None,
            exclude: bool) -> sql.Composable:
    """The tenant's rows in key order: all, only those with `keys`, or all but (`exclude`)."""
    relation, owner = sql.Identifier(schema, table), sql.Literal(validate_tenant_id(tenant))
    if keys is None or (exclude and not keys):
        rows: sql.Composable = sql.SQL("SELECT * FROM {} WHERE tenant_id = {}").format(
            relation, owner)
    else:
        keyset, match = _keyset(conn, schema, table, keys)
        rows = (sql.SQL("SELECT r.* FROM {} r WHERE r.tenant_id = {} AND NOT EXISTS"
                        " (SELECT 1 FROM {} WHERE {})") if exclude else
                sql.SQL("SELECT r.* FROM {2} JOIN {0} r ON r.tenant_id = {1} AND {3}")
                ).format(relation, owner, keyset, match)
    return sql.SQL("SELECT * FROM ({}) AS rows{}").format(rows, _key_order(conn, schema, table))


def _stream(conn: Conn, schema: str, table: str, tenant: str,
            sink: Callable[[Buffer], object], keys: list[Key] | None = None,
            exclude: bool = False) -> tuple[int, str]:
    """Send the tenant's rows (see _select) as binary COPY in key order to `sink`; return
    (rows, sha256).

    Binary output does not depend on TimeZone, DateStyle, IntervalStyle, extra_float_digits or
    bytea_output, and the hash is computed while streaming, in constant memory.
    """
    # COPY takes no bind parameters: the tenant id is validated and quoted as a literal, the
    # keys are JSON quoted as a literal.
    query = sql.SQL("COPY ({}) TO STDOUT (FORMAT BINARY)").format(
        _select(conn, schema, table, tenant, keys, exclude))
    digest = hashlib.sha256()
    with conn.cursor() as cur:
        with cur.copy(query) as out:
            for chunk in out:
                digest.update(chunk)
                sink(chunk)
        return cur.rowcount, digest.hexdigest()


def fingerprint(conn: Conn, schema: str, table: str, tenant: str,
                keys: list[Key] | None = None, exclude: bool = False) -> tuple[int, str]:
    """(row count, checksum) of the tenant's rows; the same rows give the same pair anywhere."""
    return _stream(conn, schema, table, tenant, lambda _chunk: None, keys, exclude)


def _clear(conn: Conn, table: tuple[str, str], tenant: str) -> None:
    conn.execute(sql.SQL("DELETE FROM {} WHERE tenant_id = %s").format(
        sql.Identifier(*table)), (tenant,))


def _copy_rows(src: Conn, dst: Conn, source: tuple[str, str], target: tuple[str, str],
               tenant: str, keys: list[Key] | None = None) -> tuple[int, str]:
    copy_in = sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(sql.Identifier(*target))
    with dst.cursor() as cur, cur.copy(copy_in) as into:
        return _stream(src, *source, tenant, into.write, keys)


def copy_table(src: Conn, dst: Conn, source: tuple[str, str], target: tuple[str, str],
               tenant: str) -> tuple[int, str]:
    """Replace the tenant's rows in the target with the source's; return the source's
    fingerprint, hashed from the very stream that was sent."""
    _clear(dst, target, tenant)
    return _copy_rows(src, dst, source, target, tenant)


def _check(pair: TablePair, want: tuple[int, str], got: tuple[int, str], what: str = "") -> None:
    if want != got:
        assert pair.target is not None
        raise VerificationFailed(
            f"{'.'.join(pair.target)}{what}: {got[0]} rows/{got[1][:8]} after copy, "
            f"{'.'.join(pair.source)} has {want[0]}/{want[1][:8]}")


def sync_keys(src: Conn, dst: Conn, pair: TablePair, tenant: str, keys: list[Key]) -> int:
    """Make the target's rows of `keys` what the source holds for them now, and verify them."""
    assert pair.target is not None
    with dst.transaction():
        set_tenant(dst, tenant)
        keyset, match = _keyset(dst, *pair.target, keys)
        dst.execute(sql.SQL("DELETE FROM {} r USING {} WHERE r.tenant_id = %s AND {}").format(
            sql.Identifier(*pair.target), keyset, match), (tenant,))
        sent = _copy_rows(src, dst, pair.source, pair.target, tenant, keys)
        _check(pair, sent, fingerprint(dst, *pair.target, tenant, keys), " (changed rows)")
    return sent[0]


def _connect(dsn: str, autocommit: bool = True) -> Conn:
    # Binary COPY sends text in the client encoding: the same on both ends.
    return psycopg.connect(dsn, autocommit=autocommit, client_encoding="UTF8")


# --- the online move ----------------------------------------------------------------------------

# Replay reads the change log in batches of this many entries.
REPLAY_BATCH = 5000
# Catch-up rounds end when a round replayed at most this many changes (then the last round
# runs under the write gate), or after MAX_ROUNDS rounds (twice: before and after verifying).
SMALL_DELTA = 100
MAX_ROUNDS = 20
# Upper bound of maintenance_work_mem for the target's HNSW build (a graph that does not fit
# is built much more slowly, see pgvector's notice); the estimate below stays under it.
INDEX_MEMORY_LIMIT_MB = 2048
# Parallel workers of that build (None: the server's max_parallel_maintenance_workers). Fewer
# leave more CPU to the tenants' queries on a small server; the build then takes longer.
INDEX_BUILD_WORKERS: int | None = None


@dataclass
class MoveProgress:
    """What a move has done so far; written by the mover's thread, read for status."""

    rows_copied: int = 0      # rows of the bulk copy, committed or streaming now
    rows_total: int = 0
    phase: str = "Copying"    # Copying, CatchingUp, Switching
    delta_rounds: int = 0
    delta_rows: int = 0       # changes replayed, the last round included
    hold_seconds: float | None = None
    index_seconds: float = 0.0
    bulk_seconds: float = 0.0
    catch_up_seconds: float = 0.0
    verify_seconds: float = 0.0
    copying: int = field(default=0, repr=False)  # live row count of the COPY in flight

    @property
    def rows(self) -> int:
        return self.rows_copied + self.copying


class _CopyMonitor:
    """Polls pg_stat_progress_copy for the target session's COPY: live rows copied."""

    def __init__(self, dsn: str, pid: int, progress: MoveProgress) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(dsn, pid, progress),
                                        daemon=True)

    def __enter__(self) -> _CopyMonitor:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self, dsn: str, pid: int, progress: MoveProgress) -> None:
        with contextlib.suppress(psycopg.Error), _connect(dsn) as conn:
            while not self._stop.wait(1.0):
                rows = fetch_rows(conn, "SELECT tuples_processed FROM pg_stat_progress_copy"
                                        " WHERE pid = %s", (pid,))
                progress.copying = int(rows[0][0]) if rows else 0


def _hnsw_indexes(conn: Conn, schema: str, table: str) -> list[tuple[str, int, int]]:
    """(name, m, ef_construction) of the table's HNSW indexes."""
    rows = fetch_rows(conn, """
        SELECT c.relname, coalesce(c.reloptions, '{}') FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
        JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace
        WHERE n.nspname = %s AND t.relname = %s AND am.amname = 'hnsw'""", (schema, table))
    found = []
    for name, options in rows:
        parsed = dict(str(o).split("=", 1) for o in options)
        found.append((str(name), int(parsed.get("m", 16)), int(parsed.get("ef_construction", 64))))
    return found


def _index_memory_mb(rows: int, dimensions: int, m: int) -> int:
    """maintenance_work_mem for an HNSW build of `rows` vectors: the graph with some slack."""
    per_row = dimensions * 4 + m * 2 * 16 + 256
    return max(64, min(INDEX_MEMORY_LIMIT_MB, rows * per_row * 5 // 4 // 2**20 + 1))


def _bulk_copy(shared_dsn: str, target_dsn: str, dst: Conn, pairs: list[TablePair],
               stale: list[tuple[str, str]], tenant: str, progress: MoveProgress) -> int:
    """Copy every table from one consistent snapshot of the source, replacing the target's
    rows, and build the target's HNSW indexes once, after the load; all in one target
    transaction, so a crash leaves the target as it was.

    In one database (pool -> bridge) the target transaction itself reads the source at its
    REPEATABLE READ snapshot (INSERT ... SELECT, no round trip); across servers (silo) binary
    COPY streams from a snapshot session to the target.
    """
    started = time.monotonic()
    progress.rows_copied = 0
    same_database = shared_dsn == target_dsn
    with ExitStack() as stack:
        if same_database:
            dst.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            stack.callback(setattr, dst, "isolation_level", None)
            snapshot: Conn | None = None
        else:
            snapshot = stack.enter_context(_connect(shared_dsn, autocommit=False))
            snapshot.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            snapshot.read_only = True
        with dst.transaction():
            # The first statement takes the snapshot: after the capture triggers committed.
            set_tenant(dst, tenant)
            rebuild: list[tuple[TablePair, str, int, int]] = []
            with snapshot.transaction() if snapshot else contextlib.nullcontext():
                if snapshot:
                    set_tenant(snapshot, tenant)
                for table in stale:
                    _clear(dst, table, tenant)
                for pair in pairs:
                    if pair.target is None:
                        continue
                    for name, m, ef in _hnsw_indexes(dst, *pair.target):
                        # Built once below: maintained row by row the load is many times slower.
                        dst.execute(sql.SQL("DROP INDEX {}").format(
                            sql.Identifier(pair.target[0], name)))
                        rebuild.append((pair, name, m, ef))
                    # The target schema is the tenant's alone, read by nobody before the switch.
                    dst.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(*pair.target)))
                    if snapshot is None:
                        rows = dst.execute(sql.SQL(
                            "INSERT INTO {} SELECT * FROM {} WHERE tenant_id = %s").format(
                            sql.Identifier(*pair.target), sql.Identifier(*pair.source)),
                            (tenant,)).rowcount
                    else:
                        with _CopyMonitor(target_dsn, dst.info.backend_pid, progress):
                            rows, _digest = _copy_rows(snapshot, dst, pair.source, pair.target,
                                                       tenant)
                    progress.copying, progress.rows_copied = 0, progress.rows_copied + rows
            progress.bulk_seconds = time.monotonic() - started
            index_started = time.monotonic()
            for pair, name, m, ef in rebuild:
                assert pair.target is not None
                into, relation = pair.target
                count = int(fetch_rows(dst, sql.SQL("SELECT count(*) FROM {}").format(
                    sql.Identifier(into, relation)))[0][0])
                dims = _embedding_dimensions(dst, into, relation) or 0
                dst.execute("SELECT set_config('maintenance_work_mem', %s, true)",
                            (f"{_index_memory_mb(count, dims, m)}MB",))
                if INDEX_BUILD_WORKERS is not None:
                    dst.execute("SELECT set_config('max_parallel_maintenance_workers', %s, true)",
                                (str(INDEX_BUILD_WORKERS),))
                database._ensure_hnsw_index(dst, into, relation, name, m, ef, None)
            progress.index_seconds = time.monotonic() - index_started
    return progress.rows_copied


def _keyed(conn: Conn, pair: TablePair) -> bool:
    """Whether the table's changes can be replayed by key (it has a primary key)."""
    return bool(_key_columns(conn, *pair.source))


def _replay(src: Conn, dst: Conn, pairs: dict[str, TablePair], tenant: str,
            progress: MoveProgress, unplanned: set[str] | None = None) -> int:
    """Replay the change log in batches until it has nothing newer; return the changes done.

    A batch is consumed (deleted from the log) only after its keys were copied and verified:
    after a crash it is replayed again, which changes nothing. Changes of tables that cannot be
    replayed by key are consumed too, and their tables added to `unplanned`: the switch copies
    them whole.
    """
    # A round covers what was logged when it started; later changes are the next round's (and
    # one logged earlier that commits late is still in the log then).
    done, after, upto = 0, 0, last_change(src, tenant)
    while True:
        ids, keys = pending_changes(src, tenant, REPLAY_BATCH, after, upto)
        if not ids:
            return done
        for table, table_keys in keys.items():
            pair = pairs.get(table)
            if pair is not None and pair.target is not None and _keyed(src, pair):
                sync_keys(src, dst, pair, tenant, table_keys)
            elif unplanned is not None:
                # A table that had no rows at the start, or has no primary key.
                unplanned.add(table)
        consume_changes(src, tenant, ids)
        done, after = done + len(ids), ids[-1]
        progress.delta_rows += len(ids)


def _catch_up(src: Conn, dst: Conn, pairs: dict[str, TablePair], tenant: str,
              progress: MoveProgress, unplanned: set[str]) -> None:
    """Rounds of replay until one is small (or MAX_ROUNDS of them): then the last round,
    under the gate, replays about what the writers did during that small one."""
    for _ in range(MAX_ROUNDS):
        replayed = _replay(src, dst, pairs, tenant, progress, unplanned)
        progress.delta_rounds += 1
        if replayed <= SMALL_DELTA:
            return


def _verify_outside_gate(shared_dsn: str, dst: Conn, pairs: list[TablePair], tenant: str
                         ) -> dict[TablePair, tuple[int, str]]:
    """Compare every table in full, writers running: at one snapshot of the source, all rows
    but those whose keys are still in the log must be equal in the target (only the move
    writes there). The keys left out are replayed and verified one by one under the gate."""
    verified: dict[TablePair, tuple[int, str]] = {}
    with _connect(shared_dsn, autocommit=False) as snap:
        snap.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        snap.read_only = True
        with snap.transaction():
            set_tenant(snap, tenant)
            _ids, pending = pending_changes(snap, tenant, None)
            for pair in pairs:
                if pair.target is None or not _keyed(snap, pair):
                    continue  # copied whole under the gate
                keys = pending.get(pair.source[1], [])
                want = fingerprint(snap, *pair.source, tenant, keys, exclude=True)
                with dst.transaction():
                    set_tenant(dst, tenant)
                    got = fingerprint(dst, *pair.target, tenant, keys, exclude=True)
                _check(pair, want, got)
                verified[pair] = want
    return verified


def _captured_tables(conn: Conn, tenant: str, source: Isolation) -> list[str]:
    """The source tables that get capture triggers: those holding rows per tenant."""
    per_tenant = set(database.tenant_tables(conn, source_schema(tenant, source)))
    return [t for t in source_tables(conn, tenant, source) if t in per_tenant]


def move_data(shared_dsn: str, target_dsn: str, tenant: str, source: Isolation,
              target: Isolation, progress: MoveProgress | None = None) -> bool:
    """Move the tenant's data while it keeps writing; hold its writes only for the switch.

    Capture changes, bulk copy from a snapshot, replay the change log in rounds, verify every
    table against a snapshot, then under the write gate replay (and verify) the last changes,
    record the verified copies and flip the registry row. Returns False when the registry
    already names the target: another reconcile moved the data (and may have cleaned the
    source), so nothing is copied again.
    """
    progress = progress if progress is not None else MoveProgress()
    schema = source_schema(tenant, source)
    with _remembering_catalog(), _connect(shared_dsn) as guard, _connect(shared_dsn) as shared, \
            _connect(target_dsn) as dst, guard.transaction():
        # One mover per tenant from here to the end; a second one then finds the work done.
        operator_lock(guard, f"move:{tenant}")
        where = current_isolation(shared, tenant)
        if where is target:
            return False
        if where is not source:
            raise RegistryMismatch(
                f"tenant {tenant}: the registry says its data lives at"
                f" {where.value if where else 'nowhere'}, neither {source.value} (the source)"
                f" nor {target.value} (the target); not moving")
        tables = _captured_tables(shared, tenant, source)
        bulk_done = start_capture(shared, tenant, source.value, target.value, schema, tables)
        pairs, stale = plan_move(shared, dst, tenant, source)
        by_source = {pair.source[1]: pair for pair in pairs}
        if bulk_done:
            progress.rows_copied = bulk_rows(shared, tenant)
        else:
            rows = _bulk_copy(shared_dsn, target_dsn, dst, pairs, stale, tenant, progress)
            mark_bulk_done(shared, tenant, True, rows)
        progress.phase = "CatchingUp"
        unplanned: set[str] = set()
        try:
            started = time.monotonic()
            _catch_up(shared, dst, by_source, tenant, progress, unplanned)
            verify_started = time.monotonic()
            verified = _verify_outside_gate(shared_dsn, dst, pairs, tenant)
            progress.verify_seconds = time.monotonic() - verify_started
            # What the writers did during the verification: replayed now, not under the gate.
            _catch_up(shared, dst, by_source, tenant, progress, unplanned)
            progress.catch_up_seconds = time.monotonic() - started - progress.verify_seconds
            progress.phase = "Switching"
            return _switch(shared, dst, tenant, source, target, (tables, pairs), verified,
                           progress, unplanned)
        except VerificationFailed:
            mark_bulk_done(shared, tenant, False)  # the next attempt starts from a new copy
            raise


def _switch(shared: Conn, dst: Conn, tenant: str, source: Isolation, target: Isolation,
            plan: tuple[list[str], list[TablePair]], verified: dict[TablePair, tuple[int, str]],
            progress: MoveProgress, unplanned: set[str]) -> bool:
    """Under the write gate: replay the last changes, copy what appeared meanwhile, record the
    verified copies and flip the registry row; the writers wait only for this.

    `plan` is the source tables and pairs the move started with; it is made again (catalog
    reads, slow) only when a table without a target got rows or the source has other tables.
    """
    tables, pairs = plan
    started = time.monotonic()
    with shared.transaction():
        where = hold_writes(shared, tenant)  # also scopes `shared` to the tenant
        if where == target.value:
            return False
        if where != source.value:
            raise RegistryMismatch(f"tenant {tenant}: the registry says its data lives at"
                                   f" {where}, neither {source.value} nor {target.value}")
        _replay(shared, dst, {p.source[1]: p for p in pairs}, tenant, progress, unplanned)
        progress.delta_rounds += 1
        if unplanned or _captured_tables(shared, tenant, source) != tables:
            final, stale = plan_move(shared, dst, tenant, source)
        else:
            final, stale = pairs, []
        with dst.transaction():
            set_tenant(dst, tenant)
            for table in stale:
                _clear(dst, table, tenant)
            for pair in final:
                if pair.target is not None and pair not in verified:
                    # A table that had no rows when the move started (small), or no primary
                    # key (never the case for the tables of the migrations): copied whole.
                    verified[pair] = copy_table(shared, dst, pair.source, pair.target, tenant)
                    _check(pair, verified[pair], fingerprint(dst, *pair.target, tenant))
        _record_verified(shared, tenant, target, final, verified)
        database.ensure_pool_tenant(shared, tenant, target.value)
    progress.hold_seconds = time.monotonic() - started
    return True


def _record_verified(conn: Conn, tenant: str, target: Isolation, pairs: list[TablePair],
                     copied: dict[TablePair, tuple[int, str]]) -> None:
    for pair in pairs:
        rows, digest = copied.get(pair, (0, ""))  # not copied: verified empty under the gate
        where = f"{target.value}:{'.'.join(pair.target)}" if pair.target else None
        conn.execute(sql.SQL("""
            INSERT INTO {} (tenant_id, source_schema, source_table, target, rows, digest)
            VALUES (%s, %s, %s, %s, %s, %s)
            ON CONFLICT (tenant_id, source_schema, source_table) DO UPDATE SET
                target = EXCLUDED.target, rows = EXCLUDED.rows, digest = EXCLUDED.digest,
                verified_at = now()""").format(_VERIFIED),
            (tenant, *pair.source, where, rows, digest))


# --- the step -----------------------------------------------------------------------------------


async def report(ctx: StepContext, **fields: Any) -> None:
    """Patch migration progress into the Tenant's status now, not only at the end."""
    migration = {**ctx.status_updates.get("migration", {}), **fields}
    ctx.status_updates["migration"] = migration
    await ctx.kube.patch_tenant_status(ctx.spec.name, {"migration": migration})


def _progress_fields(progress: MoveProgress) -> dict[str, Any]:
    fields: dict[str, Any] = {"step": progress.phase, "rowsCopied": progress.rows,
                              "deltaRounds": progress.delta_rounds,
                              "deltaRows": progress.delta_rows}
    if progress.hold_seconds is not None:
        fields["holdMilliseconds"] = round(progress.hold_seconds * 1000)
    return fields


async def _report_while_moving(ctx: StepContext, progress: MoveProgress) -> None:
    last: dict[str, Any] = {}
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL_SECONDS)
        fields = _progress_fields(progress)
        if fields != last:
            with contextlib.suppress(Exception):  # progress is best effort; the move goes on
                await report(ctx, **fields)
            last = fields


PROGRESS_INTERVAL_SECONDS = 2.0


async def post_event(ctx: StepContext, reason: str, message: str) -> None:
    """An Event on the Tenant (cluster-scoped: its Events live in `default`, as kopf's do)."""
    spec = ctx.spec
    event = Event(
        metadata=ObjectMeta(name=f"{spec.name}.{uuid.uuid4().hex[:16]}", namespace="default"),
        involvedObject=ObjectReference(apiVersion=f"{GROUP}/{VERSION}", kind="Tenant",
                                       name=spec.name, uid=spec.uid),
        reason=reason, message=message, type="Normal", count=1,
        firstTimestamp=datetime.now(UTC), lastTimestamp=datetime.now(UTC),
        source=EventSource(component="tenantry-operator"))
    try:
        await ctx.kube.client.create(event)
    except Exception as err:  # an Event is informational: never fail the move for it
        log.warning("tenant %s: could not post Event %s: %s", spec.name, reason, err)


def prepare_target(conn: Conn, tenant: str, password: str, dimensions: int | None,
                   hnsw: Hnsw) -> None:
    """The target schema, role and (when `dimensions`) collection exist before the copy."""
    database.ensure_bridge_tenant(conn, tenant, password)
    if dimensions is not None:
        database.ensure_collection(conn, tenant, "schema", dimensions, hnsw.m,
                                   hnsw.ef_construction)


async def run_upgrade(ctx: StepContext, source: Isolation, shared_dsn: str, target_dsn: str,
                      password: str) -> None:
    spec = ctx.spec
    total, held = await database.in_database(
        shared_dsn, lambda c: survey_source(c, spec.name, source))
    resumed = (ctx.status.get("migration") or {}).get("step") in MOVING_STEPS
    await report(ctx, **{"from": source.value, "to": spec.isolation.value, "step": "Copying",
                         "rowsCopied": 0, "rowsTotal": total, "deltaRounds": 0,
                         "deltaRows": 0, **({} if resumed else {"startedAt": now_rfc3339()})})
    await post_event(ctx, "UpgradeStarted" if not resumed else "UpgradeResumed",
                     f"moving {total} rows from {source.value} to {spec.isolation.value};"
                     " writes go on until a short hold at the switch")
    # Embeddings move even when RAG is disabled now; with other dimensions than the spec's,
    # plan_move refuses with a clear message instead of dropping them.
    dims = spec.rag.embedding_dimensions if spec.rag.enabled else (held[0] if held else None)
    await database.in_database(target_dsn, lambda c: prepare_target(
        c, spec.name, password, dims, spec.rag.hnsw))
    progress = MoveProgress(rows_total=total)
    reporter = asyncio.create_task(_report_while_moving(ctx, progress))
    try:
        moved = await asyncio.to_thread(move_data, shared_dsn, target_dsn, spec.name, source,
                                        spec.isolation, progress)
    finally:
        reporter.cancel()
    fields = _progress_fields(progress)
    fields["step"] = "CleaningUp"
    await report(ctx, **(fields if moved else {"step": "CleaningUp"}))
    if moved:
        await post_event(ctx, "UpgradeSwitched", (
            f"now at {spec.isolation.value}: {progress.rows_copied} rows copied in"
            f" {progress.bulk_seconds:.1f} s, HNSW built in {progress.index_seconds:.1f} s,"
            f" {progress.delta_rows} changes replayed in {progress.delta_rounds} rounds;"
            f" writes held {fields.get('holdMilliseconds', 0)} ms"))
    await finish_cleanup(ctx, shared_dsn)


# The steps of status.migration while data moves (a reconcile that finds one resumes it).
MOVING_STEPS = ("Copying", "CatchingUp", "Switching")


# --- cleanup ------------------------------------------------------------------------------------


def _verified_tables(conn: Conn, tenant: str, schema: str) -> set[str]:
    rows = fetch_rows(conn, sql.SQL(
        "SELECT source_table FROM {} WHERE tenant_id = %s AND source_schema = %s").format(
        _VERIFIED), (tenant, schema))
    return {str(name) for (name,) in rows}


def _removes_rows(conn: Conn, schema: str, table: str, tenant: str, source: Isolation) -> bool:
    """Whether cleanup would remove rows from `table`: the tenant's (pool), any (bridge)."""
    if source is Isolation.POOL:
        return _has_rows(conn, schema, table, tenant)
    return bool(fetch_rows(conn, sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(
        sql.Identifier(schema, table)))[0][0])


def clean_up_source(conn: Conn, tenant: str, source: Isolation, target: Isolation) -> None:
    """Remove the old copy once the registry names the target. Every source table that still
    holds rows must have a recorded verified copy, else nothing is removed (idempotent,
    crash-safe)."""
    schema = source_schema(tenant, source)
    ensure_private_schema(conn)
    if current_isolation(conn, tenant) is target:
        # Before any source row is deleted: else each deletion would be logged as a change.
        stop_capture(conn, tenant)
    forget = sql.SQL("DELETE FROM {} WHERE tenant_id = %s AND source_schema = %s").format(
        _VERIFIED)
    with conn.transaction():
        # Held: no migration adds a table to the source while we compare and remove.
        operator_lock(conn, migrate_lock_key(schema))
        if current_isolation(conn, tenant) is not target:  # never before the switch
            raise VerificationFailed(f"refusing cleanup of {tenant}: the switch did not happen")
        verified = _verified_tables(conn, tenant, schema)
        unverified = [t for t in source_tables(conn, tenant, source)
                      if t not in verified and _removes_rows(conn, schema, t, tenant, source)]
        if unverified:
            raise CleanupRefused(
                f"refusing cleanup of {tenant}: {', '.join(unverified)} in {schema} have no"
                " verified copy in the new location; nothing was removed")
        if source is Isolation.POOL:
            database.delete_shared_rows(conn, tenant, keep_registry=True)
            conn.execute(forget, (tenant, schema))
            return
    database.drop_bridge(conn, tenant)
    conn.execute(forget, (tenant, schema))  # after the drop: a crash in between retries it


def cleanup_pending(ctx: StepContext) -> bool:
    """An isolation upgrade has yet to remove the old copy of the tenant's data."""
    migration = ctx.status_updates.get("migration") or ctx.status.get("migration") or {}
    return migration.get("step") in (*MOVING_STEPS, "CleaningUp")


async def finish_cleanup(ctx: StepContext, shared_dsn: str) -> None:
    """Remove the old copy once the registry says the data moved (idempotent, crash-safe)."""
    if not cleanup_pending(ctx):
        return
    migration = ctx.status_updates.get("migration") or ctx.status.get("migration") or {}
    await database.in_database(shared_dsn, lambda c: clean_up_source(
        c, ctx.spec.name, Isolation(migration["from"]), ctx.spec.isolation))
    ctx.status_updates["migration"] = migration
    await report(ctx, step="Done", finishedAt=now_rfc3339())
    await post_event(ctx, "UpgradeFinished", f"data at {ctx.spec.isolation.value}; the old"
                     f" copy at {migration['from']} is removed")
