"""Operator at scale: N pool tenants applied at once on the local control plane, with the real
Postgres and Redis and the operator as its own process (`python -m tenantry_operator`).

For each N: time until all are Ready, create-to-Ready p50/p95 per tenant, the operator's API
writes per tenant (audit log, by user agent; and the API server's own write counter from
/metrics, every client included), the operator's peak RSS, then the writes and the duration of
one full resync of the settled state (an operator restart: kopf resumes every tenant), and one
bridge and one silo tenant create-to-Ready. Each N gets a fresh stack. Asserts nothing.

    .venv/bin/python bench/operator_scale.py [--tenants 100,1000] [--concurrency 32]
        [--rate 5,10,20] [--floor] [--no-operator] [--no-resync] [--no-single]
        [--operator-env TENANTRY_WORKER_LIMIT=16 ...] [--profile DIR] [--keep DIR]

`--rate R`: the Tenants arrive at R per second, evenly spaced, instead of all at once (one run,
on its own stack, per rate). `--floor`: first, on a stack of its own, the API server's floor:
the operator makes its writes for one template tenant, is stopped, and a plain aiohttp client
replays those 14 writes (same bodies, order and concurrency) for each of the N Tenants as they
are POSTed; Ready there means the replayed status patch. Every run also reports the CPU each
server of the stack used per tenant (API server, etcd, Postgres, ...).

The silo's StatefulSet runs under kwok (no container): its database is a second database in the
same Postgres (TENANTRY_SILO_DSN_OVERRIDES), so the silo figure is the operator's share only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
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


async def create_and_wait(
    plane: ControlPlane, bodies: list[dict[str, Any]], concurrency: int, wait_seconds: float,
    rate: float | None = None, created_hook: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """POST every Tenant (`concurrency` at once, or `rate` per second evenly spaced); (created
    at, Ready at) per name, monotonic. `created_hook` gets each created Tenant as answered."""
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
                if len(ready) == len(names):  # all Ready before the watch began
                    break
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

        async def create(body: dict[str, Any], due: float | None) -> None:
            if due is not None:  # paced: its own time slot, whatever the earlier POSTs took
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            async with gate:
                response = await client.post(TENANTS, json=body)
                response.raise_for_status()
                created[body["metadata"]["name"]] = time.monotonic()
                if created_hook is not None:
                    created_hook(response.json())

        start = time.monotonic()
        await asyncio.gather(*(create(b, None if rate is None else start + index / rate)
                               for index, b in enumerate(bodies)))
        try:
            await asyncio.wait_for(watcher, wait_seconds)
        except TimeoutError:
            say(f"!! only {len(ready)} of {len(names)} Ready after {wait_seconds:.0f} s")
    return created, ready


def write_kinds(writes: list[dict[str, Any]]) -> collections.Counter[str]:
    return collections.Counter(
        f"{w['verb']} {w['objectRef'].get('resource')}"
        + (f"/{w['objectRef']['subresource']}" if w["objectRef"].get("subresource") else "")
        for w in writes)


def operator_writes(plane: ControlPlane, offset: int) -> list[dict[str, Any]]:
    """The operator's write requests since `offset` (audit events, in order)."""
    return [w for w in plane.writes_since(offset)
            if str(w.get("userAgent", "")).startswith(OPERATOR_AGENTS)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def arrivals(count: int, rate: float | None) -> str:
    return "at once" if rate is None else f"at {rate:g} per second"


def readiness(count: int, rate: float | None, first: float, created: dict[str, float],
              ready: dict[str, float]) -> dict[str, Any]:
    """All Ready after (from the first POST), create-to-Ready p50/p95/max, load average."""
    latencies = [ready[n] - created[n] for n in ready if n in created]
    return {
        "tenants": count, "arrivals": arrivals(count, rate), "ready": len(ready),
        "all_ready_s": max(ready.values(), default=first) - first,
        "p50_s": statistics.median(latencies) if latencies else None,
        "p95_s": percentile(latencies, 0.95) if latencies else None,
        "max_s": max(latencies) if latencies else None,
        # The machine may be shared: the 1-minute load average when the last one was Ready.
        "load_average_1m": os.getloadavg()[0],
    }


def run_pool(bench: Stack, count: int, concurrency: int, rate: float | None = None,
             with_resync: bool = True) -> dict[str, Any]:
    plane = bench.plane
    start_operator(bench)
    bench.peak_rss = 0
    offset, api_before = plane.audit_offset(), plane.write_requests_total()
    trips_before = trips_now(bench) if bench.count_trips else None
    cpu_before = server_cpu(bench)
    bodies = [tenant_body(f"t{index:05d}") for index in range(count)]
    say(f"==> {count} pool tenants {arrivals(count, rate)} (load average"
        f" {os.getloadavg()[0]:.1f})")
    first = time.monotonic()
    created, ready = asyncio.run(create_and_wait(plane, bodies, concurrency,
                                                 max(300.0, count * 0.6), rate=rate))
    result: dict[str, Any] = readiness(count, rate, first, created, ready)
    time.sleep(2)  # the last status patches and Events land
    result_cpu = bench.cpu_seconds
    writes = write_kinds(operator_writes(plane, offset))
    api_total = plane.write_requests_total() - api_before
    result |= {
        "mode": "operator",
        "server_cpu_ms_per_tenant": cpu_per_tenant(cpu_before, server_cpu(bench), count),
        "writes_per_tenant": sum(writes.values()) / count,
        "api_writes_per_tenant_all_clients": api_total / count,
        "write_kinds": {k: round(v / count, 2) for k, v in sorted(writes.items())},
        "peak_rss_mb": bench.peak_rss / 2**20,
        # Robust to a shared machine: the operator's own CPU, not the wall clock.
        "operator_cpu_ms_per_tenant": result_cpu * 1000 / count,
    }
    if trips_before is not None:
        result["trips_per_tenant_create"] = per_tenant(trips_now(bench) - trips_before, count)
    if not with_resync:
        return result
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
    resync = write_kinds(operator_writes(plane, offset))
    result["resync_writes"] = sum(resync.values())
    result["resync_write_kinds"] = dict(resync)
    result["peak_rss_mb"] = max(result["peak_rss_mb"], bench.peak_rss / 2**20)
    if trips_before is not None:
        result["trips_per_tenant_resync"] = per_tenant(trips_now(bench) - trips_before, count)
    return result


def server_cpu(bench: Stack) -> dict[str, float]:
    """CPU seconds used so far by each server of the stack (its exited children included)."""
    processes = [(p.name, p.pid) for p in bench.plane.processes]
    processes += [("postgres", bench.pg.process.pid), ("redis", bench.redis.process.pid)]
    used: collections.Counter[str] = collections.Counter()
    for name, pid in processes:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                with suppress(psutil.NoSuchProcess):
                    times = proc.cpu_times()
                    used[name] += (times.user + times.system + times.children_user
                                   + times.children_system)
        except psutil.NoSuchProcess:
            continue
    return dict(used)


def cpu_per_tenant(before: dict[str, float], after: dict[str, float], count: int
                   ) -> dict[str, float]:
    """Milliseconds of CPU per tenant of each server that used any."""
    return {name: round((after[name] - before.get(name, 0.0)) * 1000 / count, 1)
            for name in after if after[name] - before.get(name, 0.0) > 0.05}


# The API server's floor (--floor): the operator's writes for one template pool tenant, recorded
# from the audit log and the live objects, then replayed for N new Tenants by a plain client.
FLOOR_AGENT = "tenantry-floor-bench"
TEMPLATE = "tz0000"  # as long as the bench's own names (t00000): the same body sizes
UID = "@@uid@@"


@dataclass
class Replay:
    """One write the operator made for the template tenant; TEMPLATE and UID in it are
    replaced by each new tenant's name and uid."""

    method: str
    path: str
    content_type: str
    body: str
    kind: str


def object_path(ref: dict[str, Any], collection: bool = False) -> str:
    group, version = ref.get("apiGroup"), ref.get("apiVersion", "v1")
    path = f"/apis/{group}/{version}" if group else f"/api/{version}"
    if ref.get("namespace") and ref["resource"] != "namespaces":  # a Namespace's is its name
        path += f"/namespaces/{ref['namespace']}"
    path += f"/{ref['resource']}"
    if not collection:
        path += f"/{ref['name']}" + (f"/{ref['subresource']}" if ref.get("subresource") else "")
    return path


def managed_part(value: Any, fields: dict[str, Any]) -> Any:
    """What of `value` a managedFields entry (fieldsV1) names: map keys followed, lists whole."""
    if not isinstance(value, dict):
        return value
    return {key[2:]: managed_part(value[key[2:]], sub) for key, sub in fields.items()
            if key.startswith("f:") and key[2:] in value}


def as_applied(live: dict[str, Any]) -> dict[str, Any]:
    """The live object as its writer sent it: the fields its tenantry-operator manager owns."""
    meta = live["metadata"]
    owned: dict[str, Any] = {}
    for entry in meta.get("managedFields") or []:
        if str(entry.get("manager", "")).startswith("tenantry-operator"):
            owned = managed_part(live, entry.get("fieldsV1") or {})
            break
    owned_meta = owned.pop("metadata", {})
    return {"apiVersion": live["apiVersion"], "kind": live["kind"], **owned,
            "metadata": {**owned_meta, "name": meta["name"],
                         **({"namespace": meta["namespace"]} if meta.get("namespace") else {})}}


def template_text(obj: Any, uid: str) -> str:
    text = json.dumps(obj, separators=(",", ":"))
    assert UID not in text
    return text.replace(uid, UID)


async def record_template(bench: Stack, as_create: bool = False) -> list[Replay]:
    """Run the operator for one pool tenant; its writes, in order, as replays. `as_create`:
    the server-side applies as plain creates (POST), to tell what the applies cost."""
    plane = bench.plane
    start_operator(bench)
    offset = plane.audit_offset()
    _, ready = await create_and_wait(plane, [tenant_body(TEMPLATE)], 1, 120)
    if TEMPLATE not in ready:
        raise RuntimeError("the floor's template tenant did not become Ready")
    await asyncio.sleep(3)  # kopf's last patch and the Event land
    stop_operator(bench)
    writes = [w for w in operator_writes(plane, offset)
              if TEMPLATE in json.dumps(w.get("objectRef")) + json.dumps(
                  (w.get("requestObject") or {}).get("involvedObject"))]
    replays: list[Replay] = []
    async with api_client(plane) as client:
        tenant = (await client.get(f"{TENANTS}/{TEMPLATE}")).json()
        uid = tenant["metadata"]["uid"]
        tenant_patches = 0
        for write in writes:
            ref, verb = write["objectRef"], write["verb"]
            kind = f"{verb} {ref['resource']}" + (f"/{ref['subresource']}"
                                                  if ref.get("subresource") else "")
            body: dict[str, Any]
            if ref["resource"] == "tenants" and ref.get("subresource") == "status":
                body, content_type = {"status": tenant["status"]}, "application/merge-patch+json"
            elif ref["resource"] == "tenants":
                # kopf: the finalizer first; then the diff base (last-handled-configuration)
                tenant_patches += 1
                meta = tenant["metadata"]
                body = ({"metadata": {"finalizers": meta["finalizers"]}} if tenant_patches == 1
                        else {"metadata": {"annotations": {
                            k: v for k, v in meta["annotations"].items()
                            if k.endswith("last-handled-configuration")}}})
                content_type = "application/merge-patch+json"
            elif verb == "create" and write.get("requestObject"):
                body, content_type = dict(write["requestObject"]), "application/json"
                body["metadata"] = {k: v for k, v in body["metadata"].items()
                                    if k not in ("resourceVersion", "uid", "creationTimestamp",
                                                 "managedFields")}
            else:
                live = (await client.get(object_path(ref))).json()
                body = as_applied(live)
                content_type = ("application/apply-patch+yaml" if verb == "patch"
                                else "application/json")
            if as_create and content_type.startswith("application/apply"):
                verb, content_type = "create", "application/json"
            path = object_path(ref, collection=verb == "create")
            if content_type.startswith("application/apply"):
                path += "?fieldManager=tenantry-operator&force=true"
            method = {"create": "POST", "patch": "PATCH", "update": "PUT"}[verb]
            replays.append(Replay(method, template_text(path, uid).strip('"'), content_type,
                                  template_text(body, uid), kind))
    # kopf posts its Events from a queue of its own, not before the status patch (a lower
    # bound for Ready: the status patch goes as soon as it can)
    return sorted(replays, key=lambda replay: replay.kind == "create events")


async def replay_writes(bench: Stack, replays: list[Replay], count: int, concurrency: int,
                        rate: float | None) -> tuple[dict[str, Any], float, list[str]]:
    """POST N Tenants as run_pool does; `concurrency` workers replay the template's writes for
    each Tenant as it is created (in order, like one reconcile). (readiness, all written after,
    errors)."""
    import aiohttp  # the operator's own fast client (fastpath.py)

    pki = bench.plane.workdir / "pki"
    tls = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    tls.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    errors: list[str] = []
    written: list[float] = []

    async with aiohttp.ClientSession(
            base_url=bench.plane.server, connector=aiohttp.TCPConnector(limit=concurrency),
            headers={"User-Agent": FLOOR_AGENT, "Accept": "application/json"}) as session:
        async def worker() -> None:
            while True:
                name, uid = await queue.get()
                for replay in replays:
                    async with session.request(
                            replay.method, replay.path.replace(TEMPLATE, name), ssl=tls,
                            data=replay.body.replace(TEMPLATE, name).replace(UID, uid),
                            headers={"Content-Type": replay.content_type}) as response:
                        await response.read()
                        if response.status >= 400:
                            errors.append(f"{replay.kind} {name}: {response.status}")
                written.append(time.monotonic())
                queue.task_done()

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        bodies = [tenant_body(f"t{index:05d}") for index in range(count)]
        first = time.monotonic()
        created, ready = await create_and_wait(
            bench.plane, bodies, concurrency, max(300.0, count * 0.6), rate=rate,
            created_hook=lambda obj: queue.put_nowait(
                (obj["metadata"]["name"], obj["metadata"]["uid"])))
        result = readiness(count, rate, first, created, ready)
        await queue.join()
        for task in workers:
            task.cancel()
    return result, max(written, default=first) - first, errors


def run_floor(bench: Stack, count: int, concurrency: int, rate: float | None,
              as_create: bool = False) -> dict[str, Any]:
    """The API server's floor: the operator's writes for N tenants, without the operator."""
    plane = bench.plane
    say("==> the floor's template: one pool tenant through the operator, then no operator")
    replays = asyncio.run(record_template(bench, as_create))
    say("    replayed per tenant: " + ", ".join(r.kind for r in replays))
    offset, cpu_before, client_before = plane.audit_offset(), server_cpu(bench), time.process_time()
    say(f"==> floor: {count} Tenants {arrivals(count, rate)}, their writes replayed"
        f" (load average {os.getloadavg()[0]:.1f})")
    result, all_written, errors = asyncio.run(replay_writes(bench, replays, count, concurrency,
                                                            rate))
    client_cpu = time.process_time() - client_before
    time.sleep(2)
    writes = write_kinds([w for w in plane.writes_since(offset)
                          if w.get("userAgent") == FLOOR_AGENT])
    result["mode"] = ("floor: no operator, its writes replayed"
                      + (", the applies as creates" if as_create else ""))
    result |= {
        "all_written_s": all_written,
        "errors": len(errors), "first_errors": errors[:5],
        "writes_per_tenant": sum(writes.values()) / count,
        "write_kinds": {k: round(v / count, 2) for k, v in sorted(writes.items())},
        "server_cpu_ms_per_tenant": cpu_per_tenant(cpu_before, server_cpu(bench), count),
        # The bench process: the Tenant POSTs, the watch and the replaying client.
        "client_cpu_ms_per_tenant": round(client_cpu * 1000 / count, 1),
    }
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
    print(f"\n## {result['tenants']} pool tenants {result['arrivals']}: {result['mode']}")
    for key, value in result.items():
        if key not in ("tenants", "arrivals", "mode"):
            print(f"{key:36} {shown(value)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", default="100,1000", help="comma-separated N per run")
    parser.add_argument("--concurrency", type=int, default=32, help="Tenant POSTs in flight")
    parser.add_argument("--rate", default="",
                        help="comma-separated arrival rates (Tenants per second, evenly spaced),"
                             " one run each; default: all at once")
    parser.add_argument("--floor", action="store_true",
                        help="first the API server's floor: the operator's writes replayed"
                             " without the operator, on a stack of its own")
    parser.add_argument("--floor-as-create", action="store_true",
                        help="the floor again, its server-side applies sent as plain creates")
    parser.add_argument("--no-operator", action="store_true", help="only the floor")
    parser.add_argument("--no-resync", action="store_true", help="skip the settled resync")
    parser.add_argument("--operator-env", nargs="*", default=[], help="KEY=VALUE for the operator")
    parser.add_argument("--profile", type=Path, help="cProfile the operator into this directory")
    parser.add_argument("--no-single", action="store_true", help="skip the bridge and silo runs")
    parser.add_argument("--count-trips", action="store_true",
                        help="count Postgres/Redis round trips (bench/count_round_trips.py)")
    parser.add_argument("--keep", type=Path, help="work here and keep it (logs, audit log)")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.operator_env)
    rates: list[float | None] = [float(r) for r in args.rate.split(",") if r] or [None]
    with tempfile.TemporaryDirectory(prefix="tenantry-scale-") as tmp:
        root = args.keep or Path(tmp)
        runs = 0
        for count in (int(n) for n in args.tenants.split(",")):
            for rate in rates:
                label = f"{count}" + ("" if rate is None else f"-at-{rate:g}")
                if args.floor:
                    with stack(root / f"run{runs}-floor-{label}", extra, None) as bench:
                        report(run_floor(bench, count, args.concurrency, rate))
                    runs += 1
                if args.floor_as_create:
                    with stack(root / f"run{runs}-create-{label}", extra, None) as bench:
                        report(run_floor(bench, count, args.concurrency, rate, as_create=True))
                    runs += 1
                if args.no_operator:
                    continue
                with stack(root / f"run{runs}-{label}", extra, args.profile) as bench:
                    runs += 1
                    bench.count_trips = args.count_trips
                    result = run_pool(bench, count, args.concurrency, rate,
                                      with_resync=not args.no_resync)
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
