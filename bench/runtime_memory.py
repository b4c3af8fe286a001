"""Runtime memory per worker: RSS (anonymous and file-backed) of a real runtime worker process,
idle, after chat, after RAG use with the in-process embedding model, and after load bursts.

Starts the embedded Postgres (pgvector; the shared schema, one pool tenant with a collection),
redis-server, the local Messages-API endpoint and `python -m tenantry_runtime` (one uvicorn
worker, as the chart runs it). With `--baseline REF` another worker runs the runtime of that
git revision (extracted with `git archive`), and with `--malloc-arena-max N` another runs this
tree with glibc's MALLOC_ARENA_MAX=N, against the same servers; every phase is applied to each
worker in turn, so the columns are side by side. Prints, per phase and worker, RSS,
RssAnon, RssFile (/proc/<pid>/smaps_rollup) and the peak (VmHWM). Asserts nothing.

    .venv/bin/python bench/runtime_memory.py [--baseline main] [--malloc-arena-max 2]
        [--seconds 5] [--keep-logs]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import psycopg
from psycopg import sql
from runtime_overhead import UPSTREAM_KEY, Target, closed_loop, server, write_unbounded_limits
from tenantry_devenv.processes import free_port
from tenantry_devenv.services import start_postgres, start_redis
from tenantry_operator.database import bootstrap_shared, ensure_collection, ensure_pool_tenant
from tenantry_runtime.api_keys import generate_key, record_for
from tenantry_runtime.contracts.database import APP_ROLE, SHARED_SCHEMA
from tenantry_runtime.contracts.redis_keys import TenantKeys
from tenantry_runtime.contracts.runtime_config import (
    Collection,
    DatabaseLocation,
    Endpoint,
    TenantRuntimeConfig,
)
from tenantry_runtime.store import TenantRecord
from tenantry_runtime.upstream_stub import STUB_MODELS

ROOT = Path(__file__).resolve().parent.parent
APP_USER = "bench_runtime"
# Documents for the RAG phases: paragraphs of the project's own docs (real, varied English).
CORPUS = [p.strip() for f in ("docs/architecture.md", "docs/runtime.md")
          for p in (ROOT / f).read_text().split("\n\n") if len(p.strip()) > 200]


@dataclass
class Worker:
    """One runtime worker process and its tenant."""

    name: str
    url: str
    key: str
    process: psutil.Process

    def memory(self) -> dict[str, float]:
        """MB: Rss, RssAnon, RssFile from smaps_rollup, and the peak RSS (VmHWM)."""
        fields: dict[str, float] = {}
        for line in Path(f"/proc/{self.process.pid}/smaps_rollup").read_text().splitlines():
            parts = line.split()
            if parts[0] in ("Rss:", "Anonymous:", "Pss:"):
                fields[parts[0][:-1]] = int(parts[1]) / 1024
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                fields["Peak"] = int(line.split()[1]) / 1024
        fields["File"] = fields["Rss"] - fields["Anonymous"]
        return fields

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"x-api-key": self.key}, timeout=300)


def tenant_record(tenant: str, key: str) -> TenantRecord:
    config = TenantRuntimeConfig(
        revision=1, tenant=tenant, isolation="pool", suspended=False, model=STUB_MODELS[0],
        max_tokens_per_request=4096, endpoint=Endpoint(type="shared"),
        database=DatabaseLocation(kind="shared", schema_name=SHARED_SCHEMA),
        collection=Collection(enabled=True, table=f"{SHARED_SCHEMA}.tenant_embeddings_d384",
                              dimensions=384, top_k=4, shared=True),
        redis_key_prefix=TenantKeys(tenant).prefix)
    return TenantRecord(config=config, api_keys=(record_for(key, "bench"),))


def prepare_tenant(admin: psycopg.Connection[tuple[object, ...]], redis_url: str,
                   tenants: Path, tenant: str) -> str:
    ensure_pool_tenant(admin, tenant)
    ensure_collection(admin, tenant, "shared", 384, 16, 64)
    key, _ = generate_key()
    (tenants / f"{tenant}.json").write_text(tenant_record(tenant, key).model_dump_json())
    write_unbounded_limits(redis_url, tenant)
    return key


@contextmanager
def runtime_source(ref: str | None, workdir: Path) -> Iterator[Path]:
    """The directory holding `tenantry_runtime`: this tree's, or REF's from `git archive`."""
    if ref is None:
        yield ROOT / "runtime"
        return
    target = workdir / f"src-{ref.replace('/', '_')}"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "runtime"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    yield target / "runtime"


def chat(worker: Worker, rag: bool, count: int) -> None:
    with worker.client() as client:
        for n in range(count):
            answer = client.post("/v1/messages", headers={
                "tenantry-rag": "on" if rag else "off", "anthropic-version": "2023-06-01"},
                json={"model": STUB_MODELS[0], "max_tokens": 64, "messages": [
                    {"role": "user", "content": f"How are tenants isolated? ({n})"}]})
            answer.raise_for_status()


def ingest(worker: Worker, documents: list[str]) -> None:
    with worker.client() as client:
        for n, text in enumerate(documents):
            answer = client.post("/v1/documents", json={"text": text, "title": f"doc {n}"})
            answer.raise_for_status()


def search(worker: Worker, queries: list[str]) -> None:
    with worker.client() as client:
        for query in queries:
            answer = client.post("/v1/search", json={"query": query, "top_k": 4})
            answer.raise_for_status()


def documents(count: int, size: int) -> list[str]:
    """`count` texts of about `size` characters from the corpus, each different."""
    out = []
    for n in range(count):
        text, at = "", n * 7
        while len(text) < size:
            text += CORPUS[at % len(CORPUS)] + "\n\n"
            at += 1
        out.append(text[:size])
    return out


def rag_burst(worker: Worker, seconds: float) -> None:
    """Concurrently for `seconds`: 4 clients ingesting, 8 searching, 8 sending RAG messages."""
    until = time.monotonic() + seconds
    texts = documents(64, 3000)
    queries = [p[:120] for p in CORPUS]

    def loop(action: Callable[[int], None]) -> None:
        n = 0
        while time.monotonic() < until:
            action(n)
            n += 1

    jobs: list[Callable[[int], None]] = [
        *[lambda n, c=c: ingest(worker, [texts[(c * 16 + n) % len(texts)]]) for c in range(4)],
        *[lambda n, c=c: search(worker, [queries[(c * 31 + n) % len(queries)]])
          for c in range(8)],
        *[lambda n: chat(worker, True, 1) for _ in range(8)]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(loop, job) for job in jobs]:
            future.result()


def chat_burst(worker: Worker, seconds: float) -> None:
    """64 keep-alive connections, non-streaming then streaming, RAG off: the hot path."""
    target = Target(worker.name, [worker.url],
                    {"x-api-key": worker.key, "tenantry-rag": "off"}, [worker.process])
    for stream in (False, True):
        asyncio.run(closed_loop(target, stream, 64, seconds, []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--baseline", default=None,
                        help="A git revision whose runtime runs side by side (e.g. main).")
    parser.add_argument("--malloc-arena-max", type=int, default=None,
                        help="Also run this tree with MALLOC_ARENA_MAX set to this.")
    parser.add_argument("--seconds", type=float, default=5.0, help="Length of each burst.")
    parser.add_argument("--keep-logs", action="store_true", help="Print the servers' log tails.")
    args = parser.parse_args()
    print(f"machine: {psutil.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f} at start",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="tenantry-mem-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        print(f"logs in {tmp}", file=sys.stderr)
        if args.keep_logs:
            stack.callback(lambda: [print(f"--- {log.name}\n{log.read_text()[-3000:]}",
                                          file=sys.stderr) for log in workdir.glob("*.log")])
        redis_server = start_redis(workdir / "redis")
        stack.callback(redis_server.stop)
        postgres = start_postgres(workdir / "pg")
        stack.callback(postgres.stop)
        with psycopg.connect(postgres.dsn(), autocommit=True) as admin:
            admin.execute("CREATE DATABASE tenantry")
        password = secrets.token_urlsafe(12)
        tenants = workdir / "tenants"
        tenants.mkdir()
        names = ["current", *([] if args.malloc_arena_max is None else ["arena"]),
                 *([] if args.baseline is None else ["baseline"])]
        keys = {}
        with psycopg.connect(postgres.dsn("tenantry"), autocommit=True) as admin:
            bootstrap_shared(admin)
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                sql.Identifier(APP_USER), sql.Literal(password), sql.Identifier(APP_ROLE)))
            for name in names:
                keys[name] = prepare_tenant(admin, redis_server.url, tenants, f"mem{name}")
        stub_port = free_port()
        stub_url = f"http://127.0.0.1:{stub_port}"
        stack.enter_context(server(
            "stub", [sys.executable, "-m", "tenantry_runtime.upstream_stub", "--port",
                     str(stub_port), "--api-key", UPSTREAM_KEY], stub_port, workdir))
        workers = []
        for name in names:
            source = stack.enter_context(runtime_source(
                args.baseline if name == "baseline" else None, workdir))
            port = free_port()
            path = os.pathsep.join([str(source), *os.environ.get("PYTHONPATH", "").split(
                os.pathsep)])
            process = stack.enter_context(server(
                f"runtime-{name}", [sys.executable, "-m", "tenantry_runtime", "--host",
                                    "127.0.0.1", "--port", str(port)], port, workdir, env={
                    "PYTHONPATH": path,
                    "TENANTRY_RUNTIME_TENANTS_DIR": str(tenants),
                    "TENANTRY_RUNTIME_REDIS_URL": redis_server.url,
                    "TENANTRY_RUNTIME_UPSTREAM_URL": stub_url,
                    "TENANTRY_RUNTIME_UPSTREAM_API_KEY": UPSTREAM_KEY,
                    "TENANTRY_RUNTIME_DATABASE_URL": postgres.dsn("tenantry", APP_USER,
                                                                  password),
                    "TENANTRY_RUNTIME_MAX_CONCURRENT_PER_TENANT": "100000",
                    # The machine may be busy: a slow Redis answer is no refusal here.
                    "TENANTRY_RUNTIME_REDIS_TIMEOUT_SECONDS": "10",
                    **({"MALLOC_ARENA_MAX": str(args.malloc_arena_max)} if name == "arena"
                       else {})}))
            workers.append(Worker(name, f"http://127.0.0.1:{port}", keys[name],
                                  psutil.Process(process.pid)))
        phases: list[tuple[str, Callable[[Worker], None]]] = [
            ("idle, ready", lambda w: time.sleep(1)),
            ("after 20 chat requests (RAG off)", lambda w: chat(w, False, 20)),
            ("chat burst, 64 conc., RAG off", lambda w: chat_burst(w, args.seconds)),
            ("RAG: 1 query embedded", lambda w: search(w, ["How are tenants isolated?"])),
            ("RAG: 10 docs x 3,000 chars, 20 searches",
             lambda w: (ingest(w, documents(10, 3000)), search(w, [p[:120] for p in CORPUS[:20]]),
                        chat(w, True, 5))),
            ("RAG burst: 4 ingest, 8 search, 8 chat", lambda w: rag_burst(w, args.seconds)),
            ("chat burst again, RAG off", lambda w: chat_burst(w, args.seconds)),
            ("idle 5 s later", lambda w: time.sleep(5)),
        ]
        rows: list[tuple[str, dict[str, dict[str, float]]]] = []
        for title, action in phases:
            figures = {}
            for worker in workers:
                started = time.monotonic()
                action(worker)
                figures[worker.name] = worker.memory()
                print(f"  {title}: {worker.name} done in {time.monotonic() - started:.1f} s",
                      file=sys.stderr)
            rows.append((title, figures))
        labels = {"current": "this tree", "baseline": f"baseline {args.baseline}",
                  "arena": f"this tree, MALLOC_ARENA_MAX={args.malloc_arena_max}"}
        report(rows, [(name, labels[name]) for name in names])


def report(rows: list[tuple[str, dict[str, dict[str, float]]]],
           workers: list[tuple[str, str]]) -> None:
    names = [name for name, _ in workers]
    print("MB per worker process: RSS = RssAnon + RssFile (/proc/<pid>/smaps_rollup); peak = "
          "VmHWM so far")
    head = f"{'phase':42}" + "".join(f" | {label[-29:]:>29}" for _, label in workers)
    print(head)
    print(f"{'':42}" + "".join(f" | {'RSS':>5} {'anon':>5} {'file':>5} {'peak':>5} {'':5}"
                               for _ in names))
    for title, figures in rows:
        print(f"{title:42}" + "".join(
            f" | {figures[n]['Rss']:5.0f} {figures[n]['Anonymous']:5.0f} "
            f"{figures[n]['File']:5.0f} {figures[n]['Peak']:5.0f} {'':5}" for n in names))


if __name__ == "__main__":
    main()
