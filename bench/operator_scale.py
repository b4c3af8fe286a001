"""Operator at scale: N pool tenants applied at once on the local control plane, with the real
Postgres and Redis and the operator as its own process (`python -m tenantry_operator`).

For each N: time until all are Ready, create-to-Ready p50/p95 per tenant, the operator's API
writes per tenant (audit log, by user agent; and the API server's own write counter from
/metrics, every client included), the operator's peak RSS, then the writes and the duration of
one full resync of the settled state (an operator restart: kopf resumes every tenant), and one
bridge and one silo tenant create-to-Ready. Each N gets a fresh stack. Asserts nothing.

    .venv/bin/python bench/operator_scale.py [--tenants 100,1000] [--concurrency 32]
        [--operator-env TENANTRY_WORKER_LIMIT=16 ...] [--profile DIR] [--keep DIR]

The silo's StatefulSet runs under kwok (no container): its database is a second database in the
same Postgres (TENANTRY_SILO_DSN_OVERRIDES), so the silo figure is the operator's share only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
from tenantry_devenv.controlplane import ControlPlane, start_control_plane
from tenantry_devenv.processes import Process, free_port, log_tail, spawn, wait_until
from tenantry_devenv.services import Postgres, Redis, start_postgres, start_redis

REPO_ROOT = Path(__file__).resolve().parents[1]
TENANTS = "/apis/tenantry.dev/v1alpha1/tenants"
# kopf's own requests, lightkube's, and the operator's aiohttp fast path (fastpath.py)
OPERATOR_AGENTS = ("kopf/", "python-httpx2/", "tenantry-operator/")
RUNTIME_NAMESPACE = "tenantry-system"
SILO = "benchsilo"


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


@dataclass
class Stack:
    workdir: Path
    plane: ControlPlane
    pg: Postgres
    redis: Redis
    operator: Process | None = None
    peak_rss: int = 0
    cpu_seconds: float = 0.0  # user + system of the running operator, as last sampled
    sampling: bool = False
    runs: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)
    profile_dir: Path | None = None
    count_trips: bool = False


@contextmanager
def stack(workdir: Path, extra_env: dict[str, str], profile_dir: Path | None) -> Iterator[Stack]:
    with ExitStack() as stop:
        say(f"==> control plane, Postgres and Redis in {workdir}")
        plane = start_control_plane(workdir / "cluster")
        stop.callback(plane.stop)
        pg = start_postgres(workdir / "pg")
        stop.callback(pg.stop)
        redis = start_redis(workdir / "redis")
        stop.callback(redis.stop)
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE tenantry")
            conn.execute(f"CREATE DATABASE silo_{SILO}")
        plane.install_crds()
        plane.kubectl("apply", "-f", str(REPO_ROOT / "examples" / "plans.yaml"))
        plane.add_persistent_volumes(2, size="10Gi")
        bench = Stack(workdir, plane, pg, redis, extra_env=extra_env, profile_dir=profile_dir)
        stop.callback(lambda: stop_operator(bench))
        yield bench


def start_operator(bench: Stack) -> Process:
    bench.runs += 1
    health = free_port()
    argv: list[str | Path] = [sys.executable, "-m", "tenantry_operator"]
    trips: dict[str, str] = {}
    if bench.count_trips:
        argv[1:] = [Path(__file__).with_name("count_round_trips.py")]
        trips["TENANTRY_BENCH_TRIPS"] = str(trips_file(bench))
    if bench.profile_dir is not None:
        bench.profile_dir.mkdir(parents=True, exist_ok=True)
        argv[1:1] = ["-m", "cProfile", "-o", bench.profile_dir / f"operator-{bench.runs}.prof"]
    operator = spawn("tenantry-operator", argv, bench.workdir / f"operator-{bench.runs}.log", env={
        "KUBECONFIG": str(bench.plane.kubeconfig),
        "TENANTRY_DATABASE_URL": bench.pg.dsn("tenantry"),
        "TENANTRY_REDIS_URL": bench.redis.url,
        "TENANTRY_RUNTIME_NAMESPACE": RUNTIME_NAMESPACE,
        "TENANTRY_CREDENTIALS_NAMESPACE": RUNTIME_NAMESPACE,
        "TENANTRY_LEASE_NAMESPACE": "default",
        "TENANTRY_HEALTH_PORT": str(health),
        # Out of the way: the full resync is measured by a restart instead.
        "TENANTRY_RECONCILE_INTERVAL_SECONDS": "3600",
        "TENANTRY_SILO_DSN_OVERRIDES": json.dumps({SILO: bench.pg.dsn(f"silo_{SILO}")}),
        **trips,
        **bench.extra_env,
    })
    bench.operator = operator

    def leading() -> bool:
        try:
            return bool(httpx.get(f"http://127.0.0.1:{health}/healthz", timeout=1)
                        .json()["role"] == "leader")
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    wait_until("the operator to lead", leading, operator, 120)
    bench.sampling = True
    threading.Thread(target=sample_rss, args=(bench, operator.pid), daemon=True).start()
    return operator


def trips_file(bench: Stack) -> Path:
    return bench.workdir / f"trips-{bench.runs}.json"


def trips_now(bench: Stack) -> collections.Counter[str]:
    """The running operator's round-trip counters (count_round_trips.py), as last dumped."""
    time.sleep(1.5)  # the next dump
    path = trips_file(bench)
    return collections.Counter(json.loads(path.read_text()) if path.exists() else {})


def per_tenant(counts: collections.Counter[str], count: int) -> dict[str, float]:
    return {name: round(value / count, 2) for name, value in sorted(counts.items())}


def stop_operator(bench: Stack) -> None:
    bench.sampling = False
    if bench.operator is not None:
        bench.operator.stop(timeout=60)
        bench.operator = None


def sample_rss(bench: Stack, pid: int) -> None:
    try:
        proc = psutil.Process(pid)
        while bench.sampling:
            bench.peak_rss = max(bench.peak_rss, proc.memory_info().rss)
            times = proc.cpu_times()
            bench.cpu_seconds = times.user + times.system
            time.sleep(0.2)
    except psutil.NoSuchProcess:
        return


def api_client(plane: ControlPlane) -> httpx.AsyncClient:
    pki = plane.workdir / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return httpx.AsyncClient(base_url=plane.server, verify=ctx, timeout=60,
                             limits=httpx.Limits(max_connections=64),
                             headers={"User-Agent": "tenantry-operator-scale-bench"})


def tenant_body(name: str, plan: str = "free", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": name},
            "spec": {"planRef": {"name": plan}, "deletionPolicy": "Delete",
                     "apiKeys": [{"name": "app"}], **spec}}


async def create_and_wait(plane: ControlPlane, bodies: list[dict[str, Any]], concurrency: int,
                          wait_seconds: float) -> tuple[dict[str, float], dict[str, float]]:
    """POST every Tenant (`concurrency` at once); (created at, Ready at) per name, monotonic."""
    names = {b["metadata"]["name"] for b in bodies}
    created: dict[str, float] = {}
    ready: dict[str, float] = {}
    async with api_client(plane) as client:
        async def list_ready() -> str:
            """Record the Ready ones; the list's resourceVersion to watch from."""
            listed = await client.get(TENANTS)
            while listed.status_code != 200:  # e.g. 429 while the CRD's storage initialises
                await asyncio.sleep(0.5)
                listed = await client.get(TENANTS)
            for obj in listed.json()["items"]:
                seen(obj)
            return str(listed.json()["metadata"]["resourceVersion"])

        def seen(obj: dict[str, Any]) -> None:
            name = obj["metadata"]["name"]
            if (name in names and name not in ready
                    and (obj.get("status") or {}).get("phase") == "Ready"):
                ready[name] = time.monotonic()

        async def watch() -> None:
            # The API server ends a watch now and then (or answers 410 Gone): list again.
            while len(ready) < len(names):
                version = await list_ready()
                params = {"watch": "1", "resourceVersion": version}
                try:
                    async with client.stream("GET", TENANTS, params=params,
                                             timeout=None) as stream:
                        async for line in stream.aiter_lines():
                            event = json.loads(line) if line else {}
                            if event.get("type") in ("ADDED", "MODIFIED"):
                                seen(event["object"])
                            if len(ready) == len(names) or event.get("type") == "ERROR":
                                break
                except httpx.HTTPError:
                    await asyncio.sleep(0.5)

        watcher = asyncio.create_task(watch())
        gate = asyncio.Semaphore(concurrency)

        async def create(body: dict[str, Any]) -> None:
            async with gate:
                response = await client.post(TENANTS, json=body)
                response.raise_for_status()
                created[body["metadata"]["name"]] = time.monotonic()

        await asyncio.gather(*(create(b) for b in bodies))
        try:
            await asyncio.wait_for(watcher, wait_seconds)
        except TimeoutError:
            say(f"!! only {len(ready)} of {len(names)} Ready after {wait_seconds:.0f} s")
    return created, ready


def operator_writes(plane: ControlPlane, offset: int) -> collections.Counter[str]:
    writes = plane.writes_since(offset)
    return collections.Counter(
        f"{w['verb']} {w['objectRef'].get('resource')}"
        + (f"/{w['objectRef']['subresource']}" if w["objectRef"].get("subresource") else "")
        for w in writes if str(w.get("userAgent", "")).startswith(OPERATOR_AGENTS))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_pool(bench: Stack, count: int, concurrency: int) -> dict[str, Any]:
    plane = bench.plane
    start_operator(bench)
    bench.peak_rss = 0
    offset, api_before = plane.audit_offset(), plane.write_requests_total()
    trips_before = trips_now(bench) if bench.count_trips else None
    bodies = [tenant_body(f"t{index:05d}") for index in range(count)]
    say(f"==> {count} pool tenants at once")
    first = time.monotonic()
    created, ready = asyncio.run(create_and_wait(plane, bodies, concurrency,
                                                 max(300.0, count * 0.6)))
    all_ready = max(ready.values(), default=first) - first
    latencies = [ready[n] - created[n] for n in ready if n in created]
    time.sleep(2)  # the last status patches and Events land
    result_cpu = bench.cpu_seconds
    writes = operator_writes(plane, offset)
    api_total = plane.write_requests_total() - api_before
    result: dict[str, Any] = {
        "tenants": count, "ready": len(ready), "all_ready_s": all_ready,
        "p50_s": statistics.median(latencies) if latencies else None,
        "p95_s": percentile(latencies, 0.95) if latencies else None,
        "writes_per_tenant": sum(writes.values()) / count,
        "api_writes_per_tenant_all_clients": api_total / count,
        "write_kinds": {k: round(v / count, 2) for k, v in sorted(writes.items())},
        "peak_rss_mb": bench.peak_rss / 2**20,
        # Robust to a shared machine: the operator's own CPU, not the wall clock.
        "operator_cpu_ms_per_tenant": result_cpu * 1000 / count,
    }
    if trips_before is not None:
        result["trips_per_tenant_create"] = per_tenant(trips_now(bench) - trips_before, count)
    # One full resync of the settled state: a restart resumes (reconciles) every tenant.
    stop_operator(bench)
    offset = plane.audit_offset()
    started = time.monotonic()
    operator = start_operator(bench)
    trips_before = trips_now(bench) if bench.count_trips else None
    wait_until("the resync of every tenant", lambda: log_text(operator).count(
        "Handler 'tenant_changed' succeeded") >= count, operator, max(300.0, count * 0.6))
    result["resync_s"] = time.monotonic() - started
    result["resync_cpu_ms_per_tenant"] = bench.cpu_seconds * 1000 / count
    time.sleep(2)
    resync = operator_writes(plane, offset)
    result["resync_writes"] = sum(resync.values())
    result["resync_write_kinds"] = dict(resync)
    result["peak_rss_mb"] = max(result["peak_rss_mb"], bench.peak_rss / 2**20)
    if trips_before is not None:
        result["trips_per_tenant_resync"] = per_tenant(trips_now(bench) - trips_before, count)
    return result


def log_text(operator: Process) -> str:
    return operator.log.read_text(errors="replace")


def run_single(bench: Stack, body: dict[str, Any], timeout: float) -> float | None:
    created, ready = asyncio.run(create_and_wait(bench.plane, [body], 1, timeout))
    name = body["metadata"]["name"]
    return ready[name] - created[name] if name in ready and name in created else None


def shown(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return json.dumps(value) if isinstance(value, dict) else str(value)


def report(result: dict[str, Any]) -> None:
    print(f"\n## {result['tenants']} pool tenants")
    for key, value in result.items():
        print(f"{key:36} {shown(value)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", default="100,1000", help="comma-separated N per run")
    parser.add_argument("--concurrency", type=int, default=32, help="Tenant POSTs in flight")
    parser.add_argument("--operator-env", nargs="*", default=[], help="KEY=VALUE for the operator")
    parser.add_argument("--profile", type=Path, help="cProfile the operator into this directory")
    parser.add_argument("--no-single", action="store_true", help="skip the bridge and silo runs")
    parser.add_argument("--count-trips", action="store_true",
                        help="count Postgres/Redis round trips (bench/count_round_trips.py)")
    parser.add_argument("--keep", type=Path, help="work here and keep it (logs, audit log)")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.operator_env)
    with tempfile.TemporaryDirectory(prefix="tenantry-scale-") as tmp:
        root = args.keep or Path(tmp)
        for index, count in enumerate(int(n) for n in args.tenants.split(",")):
            with stack(root / f"run{index}-{count}", extra, args.profile) as bench:
                bench.count_trips = args.count_trips
                result = run_pool(bench, count, args.concurrency)
                if not args.no_single:
                    result["bridge_create_to_ready_s"] = run_single(
                        bench, tenant_body("benchbridge", "pro", isolation="bridge"), 120)
                    result["silo_create_to_ready_s"] = run_single(
                        bench, tenant_body(SILO, "enterprise", isolation="silo",
                                           database={"storage": {"size": "1Gi"}}), 300)
                report(result)
                if bench.operator is not None and not bench.operator.alive():
                    say(log_tail(bench.operator.log, 40))


if __name__ == "__main__":
    main()
