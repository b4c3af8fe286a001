"""Online isolation upgrades: pool -> bridge of tenants of 10k, 100k (and 1M) rows while a writer
runs at a steady rate, on a real PostgreSQL 18 + pgvector (the embedded dev server).

Each tenant has N documents and N 384-d embeddings (2N rows). Per size it prints the total move
time, the bulk copy's rows/s (copy only) and its HNSW build time, the catch-up rounds and the
changes replayed, the write hold at the switch, and the writer's latency p50/p99/max during the
move next to its latency without a move (measured just before, in the same run). Asserts nothing.

    .venv/bin/python bench/upgrade.py [--sizes 10000,100000] [--with-1m] [--rate 50]
        [--baseline-seconds 15] [--no-target-index] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psycopg
from pgvector import Vector
from pgvector.psycopg import register_vector
from psycopg import sql
from tenantry_devenv.services import Postgres, start_postgres
from tenantry_operator import database, upgrade
from tenantry_operator.model import Hnsw, Isolation
from tenantry_operator.upgrade import MoveProgress, clean_up_source, move_data, prepare_target
from tenantry_runtime.contracts.database import (
    APP_ROLE,
    Conn,
    bridge_role,
    bridge_schema,
    tenant_transaction,
)
from tenantry_runtime.contracts.tenant_locks import TenantMoved, write_transaction

DIMS = 384
PASSWORD = "bench-" + uuid.uuid4().hex[:12]
APP_USER = "bench_app"
SEED_CHUNK = 20_000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- data ----------------------------------------------------------------------------------------


def seed_tenant(admin: Conn, tenant: str, rows: int) -> float:
    """N documents and N embeddings in the pool, loaded by binary COPY without the per-tenant
    HNSW index (built row by row the load would take most of the run; see the notes)."""
    database.ensure_pool_tenant(admin, tenant)
    table = database.ensure_collection(admin, tenant, "shared", DIMS, 16, 64)
    admin.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(
        "tenantry", database.pool_index_name(DIMS, tenant))))
    register_vector(admin)
    rng = np.random.default_rng(len(tenant) + rows)
    started = time.perf_counter()
    with admin.transaction():
        for offset in range(0, rows, SEED_CHUNK):
            count = min(SEED_CHUNK, rows - offset)
            ids = [uuid.uuid4() for _ in range(count)]
            with admin.cursor().copy(
                    "COPY tenantry.documents (tenant_id, id, title, content)"
                    " FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["text", "uuid", "text", "text"])
                for i, doc in enumerate(ids):
                    copy.write_row((tenant, doc, f"document {offset + i}",
                                    f"content of document {offset + i} " * 8))
            vectors = rng.standard_normal((count, DIMS), dtype=np.float32)
            schema, name = table.split(".")
            with admin.cursor().copy(sql.SQL(
                    "COPY {} (tenant_id, document_id, content, embedding)"
                    " FROM STDIN (FORMAT BINARY)").format(sql.Identifier(schema, name))) as copy:
                copy.set_types(["text", "uuid", "text", "vector"])
                for doc, vec in zip(ids, vectors, strict=True):
                    copy.write_row((tenant, doc, "chunk", Vector(vec)))
    admin.execute("VACUUM (ANALYZE) tenantry.documents")
    admin.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(*table.split("."))))
    return time.perf_counter() - started


# --- the writer ----------------------------------------------------------------------------------


@dataclass
class Sample:
    at: float
    seconds: float


@dataclass
class Writer:
    """An open-loop writer at `rate` transactions/s, as the runtime writes: the gate on the
    shared database as the app role, rows where the tenant lives (bridge: its own login)."""

    dsn: str
    bridge_dsn: str
    tenant: str
    rate: float
    samples: list[Sample] = field(default_factory=list)
    moved_at: float | None = None
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as err:
            self.errors.append(err)

    def _loop(self) -> None:
        rng = random.Random(1)
        where, schema = "pool", "tenantry"
        docs: list[uuid.UUID] = []
        with ExitStack() as stack:
            gate = stack.enter_context(psycopg.connect(self.dsn, autocommit=True))
            data = gate
            with gate.transaction():  # a sample of existing ids to update and delete
                gate.execute("SELECT set_config('app.current_tenant', %s, true)",
                             (self.tenant,))
                docs = [r[0] for r in gate.execute(
                    "SELECT id FROM tenantry.documents LIMIT 5000").fetchall()]
            period, due = 1 / self.rate, time.perf_counter()
            while not self.stop.is_set():
                due += period
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                started = time.perf_counter()
                try:
                    with write_transaction(gate, self.tenant, where), \
                            self._scoped(gate, data) as conn:
                        self._one(conn, schema, rng, docs)
                except TenantMoved:
                    where, schema = "bridge", bridge_schema(self.tenant)
                    data = stack.enter_context(psycopg.connect(self.bridge_dsn,
                                                               autocommit=True))
                    self.moved_at = time.perf_counter()
                    continue  # retried at once, as the runtime does
                self.samples.append(Sample(started, time.perf_counter() - started))

    @contextmanager
    def _scoped(self, gate: Conn, data: Conn) -> Iterator[Conn]:
        if data is gate:
            yield gate
        else:
            with tenant_transaction(data, self.tenant):
                yield data

    def _one(self, conn: Conn, schema: str, rng: random.Random, docs: list[uuid.UUID]) -> None:
        """One insert, one update, one delete (of a document the writer inserted earlier)."""
        new = uuid.uuid4()
        conn.execute(sql.SQL("INSERT INTO {} (tenant_id, id, title, content)"
                             " VALUES (%s, %s, 'live', 'written during the bench')").format(
            sql.Identifier(schema, "documents")), (self.tenant, new))
        target = docs[rng.randrange(len(docs))]
        conn.execute(sql.SQL("UPDATE {} SET title = %s WHERE id = %s").format(
            sql.Identifier(schema, "documents")), (f"u{rng.random()}", target))
        if len(docs) > 100:
            gone = docs.pop(rng.randrange(len(docs)))
            conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(
                sql.Identifier(schema, "documents")), (gone,))
        docs.append(new)

    def latencies(self, since: float, until: float) -> list[float]:
        return [s.seconds for s in self.samples if since <= s.at < until]


def percentiles(values: list[float]) -> tuple[float, float, float]:
    """(p50, p99, max) in ms."""
    if not values:
        return (float("nan"),) * 3
    ordered = sorted(values)
    return (statistics.median(ordered) * 1000,
            ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, ordered[-1] * 1000)


# --- one size ------------------------------------------------------------------------------------


@dataclass
class Result:
    rows: int
    seed_seconds: float
    move_seconds: float
    progress: MoveProgress
    cleanup_seconds: float
    without: tuple[float, float, float]
    during: tuple[float, float, float]
    samples: tuple[int, int]


def run_size(server: Postgres, db: str, rows: int, rate: float, baseline: float,
             target_index: bool) -> Result:
    tenant = f"bench{rows}"
    dsn = server.dsn(db)
    with psycopg.connect(dsn, autocommit=True) as admin:
        log(f"[{rows}] seeding {rows:,} documents + {rows:,} embeddings")
        seed_seconds = seed_tenant(admin, tenant, rows)
        prepare_target(admin, tenant, PASSWORD, DIMS, Hnsw())
        if not target_index:  # the move then builds none (see --no-target-index)
            admin.execute(sql.SQL("DROP INDEX {}").format(
                sql.Identifier(bridge_schema(tenant), "embeddings_hnsw")))
    writer = Writer(server.dsn(db, APP_USER, PASSWORD),
                    server.dsn(db, bridge_role(tenant), PASSWORD), tenant, rate)
    thread = writer.start()
    log(f"[{rows}] writer alone for {baseline:.0f} s")
    time.sleep(baseline)
    log(f"[{rows}] moving pool -> bridge")
    progress = MoveProgress()
    started = time.perf_counter()
    move_data(dsn, dsn, tenant, Isolation.POOL, Isolation.BRIDGE, progress)
    finished = time.perf_counter()
    time.sleep(1.0)  # the writer sees the switch and goes on at the new location
    writer.stop.set()
    thread.join(30)
    if writer.errors:
        raise writer.errors[0]
    with psycopg.connect(dsn, autocommit=True) as admin:
        cleanup_started = time.perf_counter()
        clean_up_source(admin, tenant, Isolation.POOL, Isolation.BRIDGE)
        cleanup_seconds = time.perf_counter() - cleanup_started
    without = writer.latencies(started - baseline, started)
    during = writer.latencies(started, finished)
    return Result(rows, seed_seconds, finished - started, progress, cleanup_seconds,
                  percentiles(without), percentiles(during), (len(without), len(during)))


def report(results: list[Result], rate: float) -> None:
    print(f"writer: {rate:.0f} transactions/s, each 1 insert + 1 update + 1 delete of a"
          " document, through write_transaction as the runtime's role")
    head = (f"{'rows':>9} {'move s':>7} {'bulk rows/s':>11} {'bulk s':>7} {'hnsw s':>7}"
            f" {'rounds':>6} {'changes':>7} {'hold ms':>8}   {'writer p50/p99/max ms':>24}"
            f"   {'during move':>24} {'p99 x':>6}")
    print(head)
    for r in results:
        p = r.progress
        copied = p.rows_copied
        rate_bulk = copied / p.bulk_seconds if p.bulk_seconds else float("nan")
        hold = (p.hold_seconds or 0) * 1000
        ratio = r.during[1] / r.without[1] if r.without[1] else float("nan")
        print(f"{copied:>9,} {r.move_seconds:>7.1f} {rate_bulk:>11,.0f} {p.bulk_seconds:>7.1f}"
              f" {p.index_seconds:>7.1f} {p.delta_rounds:>6} {p.delta_rows:>7} {hold:>8.0f}"
              f"   {_fmt(r.without):>24}   {_fmt(r.during):>24} {ratio:>6.2f}")
    for r in results:
        p = r.progress
        print(f"- {r.rows:,} docs: move = bulk copy {p.bulk_seconds:.1f} s + HNSW build"
              f" {p.index_seconds:.1f} s + catch-up rounds {p.catch_up_seconds:.1f} s + full"
              f" verification {p.verify_seconds:.1f} s + switch {(p.hold_seconds or 0):.2f} s"
              f" (+ setup); seeding took {r.seed_seconds:.1f} s, cleanup of the pool rows"
              f" {r.cleanup_seconds:.1f} s; writer samples without/during: {r.samples[0]}/"
              f"{r.samples[1]}")


def _fmt(values: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000",
                        help="documents per tenant (each with one embedding), comma-separated")
    parser.add_argument("--with-1m", action="store_true", help="add a 1,000,000-document tenant")
    parser.add_argument("--rate", type=float, default=50.0, help="writer transactions/s")
    parser.add_argument("--baseline-seconds", type=float, default=15.0,
                        help="writer alone before each move (the 'without' latencies)")
    parser.add_argument("--no-target-index", action="store_true",
                        help="give the target no HNSW index, so the move builds none (its cost"
                        " grows faster than linearly; measure it at smaller sizes)")
    parser.add_argument("--index-workers", type=int, default=None,
                        help="parallel workers of the target's HNSW build (default: the"
                        " server's max_parallel_maintenance_workers)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    upgrade.INDEX_BUILD_WORKERS = args.index_workers
    if args.with_1m:
        sizes.append(1_000_000)
    with ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="tenantry-bench-upgrade-")))
        server = start_postgres(workdir / "pg")
        stack.callback(server.stop)
        with psycopg.connect(server.dsn(), autocommit=True) as admin:
            admin.execute("CREATE DATABASE bench")
        with psycopg.connect(server.dsn("bench"), autocommit=True) as admin:
            database.bootstrap_shared(admin)
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                sql.Identifier(APP_USER), sql.Literal(PASSWORD), sql.Identifier(APP_ROLE)))
        results = [run_size(server, "bench", rows, args.rate, args.baseline_seconds,
                            not args.no_target_index) for rows in sizes]
        report(results, args.rate)


if __name__ == "__main__":
    main()
