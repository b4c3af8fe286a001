"""Benchmark the usage export: rows per second from ai_usage_logs to an OpenMeter stand-in.

A real PostgreSQL 18 (tenantry_devenv's embedded server) holds N usage rows; the exporter
(tenantry_runtime.export, in-process) sends them all to a local HTTP stand-in that parses each
batch and deduplicates ids, once per batch size, side by side in one run (each batch size has
its own checkpoint, so each exports every row). Prints figures, asserts nothing.

    .venv/bin/python bench/usage_export.py [--rows 100000] [--batches 100,500,2000]
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import uvicorn
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from tenantry_devenv.services import start_postgres
from tenantry_runtime.contracts.database import migrate
from tenantry_runtime.export import ExportSettings, OpenMeterSink, UsageExporter


class StandIn:
    def __init__(self) -> None:
        self.ids: set[str] = set()

    async def ingest(self, request: Request) -> Response:
        for event in json.loads(await request.body()):
            self.ids.add(event["id"])
        return Response(status_code=204)


def serve(app: Starlette) -> tuple[str, uvicorn.Server]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def fill(dsn: str, rows: int) -> float:
    start, t0 = time.perf_counter(), datetime(2026, 11, 1, tzinfo=UTC)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Transactions of 500 rows, as the usage writer's batches.
        for first in range(0, rows, 500):
            with conn.transaction(), conn.cursor() as cur, cur.copy(
                    "COPY tenantry.ai_usage_logs (tenant_id, request_id, created_at, model,"
                    " input_tokens, output_tokens, cost, currency, price_version)"
                    " FROM STDIN") as copy:
                for n in range(first, min(first + 500, rows)):
                    copy.write_row((f"tenant{n % 100}", f"req_{n:09d}",
                                    t0 + timedelta(seconds=n), "claude-sonnet-4-5", 800, 100,
                                    "0.0039", "USD", "2026-11-01"))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batches", default="100,500,2000")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as workdir:
        pg = start_postgres(Path(workdir) / "pg")
        try:
            with psycopg.connect(pg.dsn(), autocommit=True) as conn:
                conn.execute("CREATE DATABASE bench")
            dsn = pg.dsn("bench")
            with psycopg.connect(dsn, autocommit=True) as conn:
                migrate(conn, "tenantry")
            print(f"{args.rows} usage rows inserted in {fill(dsn, args.rows):.1f} s")
            for size in (int(b) for b in args.batches.split(",")):
                stand_in = StandIn()
                url, server = serve(Starlette(routes=[
                    Route("/api/v1/events", stand_in.ingest, methods=["POST"])]))
                settings = ExportSettings(database_url=SecretStr(dsn), openmeter_url=url,
                                          batch_size=size, exporter=f"bench{size}")
                sink = OpenMeterSink.from_settings(settings)
                with psycopg.connect(dsn, autocommit=True) as conn:
                    exporter = UsageExporter(conn, sink, settings)
                    exporter.prepare()
                    start = time.perf_counter()
                    sent = exporter.export_pending()
                    took = time.perf_counter() - start
                sink.close()
                server.should_exit = True
                print(f"batch {size:>5}: {sent} events in {took:6.2f} s = "
                      f"{sent / took:8.0f} events/s ({len(stand_in.ids)} unique ids received)")
        finally:
            pg.stop()


if __name__ == "__main__":
    main()
