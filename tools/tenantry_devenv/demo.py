"""`make demo`: control plane, Postgres+pgvector, Redis, CRDs, the operator, two sample
Tenants with API keys, the runtime and its upstream; then each tenant's app calls the runtime
(demo_calls.py)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Protocol

import httpx
import psycopg
import redis as redis_client
from psycopg import sql
from tenantry_runtime.contracts import runtime_record
from tenantry_runtime.contracts.database import APP_ROLE, bridge_schema

from .controlplane import REPO_ROOT, ControlPlane, start_control_plane
from .demo_calls import TourFailed, Upstream, say, tour
from .processes import Process, StartupError, free_port, log_tail, spawn, wait_until
from .services import Postgres, Redis, start_postgres, start_redis

SAMPLE_TENANTS = ("acme", "globex")
# The operator writes the runtime's copy of each tenant into this namespace; the runtime's
# Kubernetes source watches it (the chart's namespace).
RUNTIME_NAMESPACE = "tenantry-system"
RUNTIME_LOGIN = "tenantry_runtime"  # the runtime's Postgres login, a member of APP_ROLE
ANTHROPIC_URL = "https://api.anthropic.com"


class Stoppable(Protocol):
    def stop(self) -> None: ...


def run_demo(workdir: Path, keep: bool = False, timeout: float = 180.0) -> int:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    # Everything started, stopped in reverse order however this function is left (an error,
    # or a signal turned into SystemExit by processes.stop_on_signals).
    started: list[Stoppable] = []
    try:
        plane, pg, redis = start_platform(workdir, started)
        operator = start_operator(workdir, plane, pg, redis, started)
        apply_sample_tenants(plane, operator, timeout)
        show_what_the_operator_created(plane, pg, redis)

        upstream = start_upstream(workdir, started)
        runtime, url = start_runtime(workdir, plane, pg, redis, upstream, started)
        try:
            tour(plane, redis.url, url, upstream, SAMPLE_TENANTS)
        except TourFailed as failed:
            say(f"\nthe demo failed: {failed}\nupstream: {upstream_name(upstream)}\n"
                f"runtime log: {runtime.log}\n{log_tail(runtime.log, 20)}")
            return 1

        say(f"\nKUBECONFIG={plane.kubeconfig}\noperator log: {operator.log}\n"
            f"runtime log: {runtime.log}")
        say(f"the answers came from {upstream_name(upstream)}")
        if keep:
            say("running; press Ctrl-C to stop")
            while operator.alive() and runtime.alive():
                time.sleep(1)
        return 0
    finally:
        if started:
            say("==> stopping everything the demo started")
        for server in reversed(started):
            try:
                server.stop()
            except Exception as err:  # one failure must not leave the others running
                say(f"could not stop {server}: {err}")
        os.environ.pop("KUBECONFIG", None)


def start_platform(workdir: Path, started: list[Stoppable]
                   ) -> tuple[ControlPlane, Postgres, Redis]:
    say("==> starting the local control plane (kube-apiserver, etcd, controller-manager, "
        "scheduler, kwok)")
    plane = start_control_plane(workdir / "cluster")
    started.append(plane)
    say("==> starting embedded Postgres 18 + pgvector and redis-server")
    pg = start_postgres(workdir / "postgres")
    started.append(pg)
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE tenantry")
    redis = start_redis(workdir / "redis")
    started.append(redis)

    say("==> installing the CRDs and the example plans")
    plane.install_crds()
    plane.kubectl("apply", "-f", str(REPO_ROOT / "examples" / "plans.yaml"))
    return plane, pg, redis


def start_operator(workdir: Path, plane: ControlPlane, pg: Postgres, redis: Redis,
                   started: list[Stoppable]) -> Process:
    say("==> starting the operator")
    operator = spawn("tenantry-operator", [sys.executable, "-m", "tenantry_operator"],
                     workdir / "operator.log", env={
                         "KUBECONFIG": str(plane.kubeconfig),
                         "TENANTRY_DATABASE_URL": pg.dsn("tenantry"),
                         # Bridge logins in the runtime's copy must reach this Postgres.
                         "TENANTRY_DATABASE_HOST_FOR_RUNTIME": f"127.0.0.1:{pg.port}",
                         "TENANTRY_REDIS_URL": redis.url,
                         "TENANTRY_RUNTIME_NAMESPACE": RUNTIME_NAMESPACE,
                         "TENANTRY_RECONCILE_INTERVAL_SECONDS": "30",
                     })
    started.append(operator)
    return operator


def apply_sample_tenants(plane: ControlPlane, operator: Process, timeout: float) -> None:
    say("==> applying two sample tenants (examples/tenants.yaml): acme (pool), globex (bridge)")
    plane.kubectl("apply", "-f", str(REPO_ROOT / "examples" / "tenants.yaml"))
    deadline = time.monotonic() + timeout
    while True:
        phases = _phases(plane.kubectl("get", "tnt", "-o", "json").stdout)
        if all(phases.get(t) == "Ready" for t in SAMPLE_TENANTS):
            return
        if not operator.alive() or time.monotonic() > deadline:
            raise StartupError(f"tenants did not reach Ready ({phases}); operator log:\n"
                               f"{log_tail(operator.log, 60)}")
        time.sleep(1)


def show_what_the_operator_created(plane: ControlPlane, pg: Postgres, redis: Redis) -> None:
    say("\n==> what the operator created\n")
    say(plane.kubectl("get", "tnt").stdout)
    say(plane.kubectl("get", "namespaces", "-l", "tenantry.dev/tenant",
                      "-L", "tenantry.dev/tenant,tenantry.dev/isolation").stdout)
    for tenant in SAMPLE_TENANTS:
        status = json.loads(plane.kubectl("get", "tnt", tenant, "-o", "json").stdout)
        say(f"{tenant}: provisioned {json.dumps(status['status'].get('provisioned', {}))}")
    say("\nshared Postgres registry (tenantry.tenants) and tenant schemas:")
    with psycopg.connect(pg.dsn("tenantry")) as conn:
        for row in conn.execute("SELECT tenant_id, isolation, state FROM tenantry.tenants"
                                " ORDER BY tenant_id"):
            say(f"  {row[0]:<10} {row[1]:<7} {row[2]}")
        # Bridge schemas have opaque names (a listing names no tenant): look each one up.
        for tenant in SAMPLE_TENANTS:
            schema = bridge_schema(tenant)
            if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone():
                say(f"  schema {schema} ({tenant}'s bridge schema)")
    limits = redis_client.Redis.from_url(redis.url, decode_responses=True)
    for key in sorted(limits.scan_iter(match="tenantry:v1:*")):
        say(f"redis {key}: {limits.hgetall(key)}")
    say("\nruntime config of globex (ConfigMap tenant-globex/tenantry-runtime-config):")
    say(plane.kubectl("get", "configmap", "tenantry-runtime-config", "-n", "tenant-globex",
                      "-o", "jsonpath={.data.config\\.json}").stdout)
    say(f"\nthe runtime's copies (config + key hashes, one Secret per tenant) in"
        f" {RUNTIME_NAMESPACE}:")
    say(plane.kubectl("get", "secrets", "-n", RUNTIME_NAMESPACE, "-l",
                      runtime_record.SELECTOR).stdout)


def start_upstream(workdir: Path, started: list[Stoppable]) -> Upstream:
    """Anthropic when ANTHROPIC_API_KEY is set, else the local stub; the output says which."""
    api_key = os.environ.get("ANTHROPIC_API_KEY", "")
    if api_key:  # ANTHROPIC_BASE_URL, as the SDK reads it, for a proxy or a compatible endpoint
        upstream = Upstream(os.environ.get("ANTHROPIC_BASE_URL") or ANTHROPIC_URL, api_key,
                            recorded=None)
        say(f"\n==> upstream: {upstream_name(upstream)} answers, with your ANTHROPIC_API_KEY"
            " (held by the runtime only; the calls below are billed to it)")
        return upstream
    port, recorded = free_port(), workdir / "upstream-requests.jsonl"
    upstream = Upstream(f"http://127.0.0.1:{port}", secrets.token_urlsafe(16), recorded)
    stub = spawn("upstream-stub", [
        sys.executable, "-m", "tenantry_runtime.upstream_stub", "--port", str(port),
        "--api-key", upstream.api_key, "--record", recorded,
    ], workdir / "upstream-stub.log")
    started.append(stub)
    wait_until("the upstream stub to listen", lambda: _listens(port), stub, 30)
    say(f"\n==> upstream: NO model is called. {upstream_name(upstream)} answers by echoing"
        " the question; set ANTHROPIC_API_KEY to have Anthropic answer")
    return upstream


def upstream_name(upstream: Upstream) -> str:
    if upstream.is_stub:
        return ("the local Messages-API stub (python -m tenantry_runtime.upstream_stub,"
                f" {upstream.url})")
    if upstream.url != ANTHROPIC_URL:
        return f"the Messages API at {upstream.url} (ANTHROPIC_BASE_URL)"
    return f"Anthropic ({upstream.url})"


def create_runtime_login(pg: Postgres) -> str:
    """A login for the runtime, a member of APP_ROLE (so RLS applies); its DSN."""
    password = secrets.token_urlsafe(18)
    with psycopg.connect(pg.dsn("tenantry"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(RUNTIME_LOGIN), sql.Literal(password)))
        conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(APP_ROLE),
                                                      sql.Identifier(RUNTIME_LOGIN)))
    return pg.dsn("tenantry", RUNTIME_LOGIN, password)


def start_runtime(workdir: Path, plane: ControlPlane, pg: Postgres, redis: Redis,
                  upstream: Upstream, started: list[Stoppable]) -> tuple[Process, str]:
    say(f"==> starting the runtime (python -m tenantry_runtime): tenant records from the"
        f" Secrets in {RUNTIME_NAMESPACE}, Postgres login {RUNTIME_LOGIN} (member of"
        f" {APP_ROLE}), Redis, embeddings in-process")
    port = free_port()
    runtime = spawn("tenantry-runtime", [
        sys.executable, "-m", "tenantry_runtime", "--host", "127.0.0.1", "--port", str(port),
    ], workdir / "runtime.log", env={
        "KUBECONFIG": str(plane.kubeconfig),
        "TENANTRY_RUNTIME_CONFIG_SOURCE": "kubernetes",
        "TENANTRY_RUNTIME_KUBE_NAMESPACE": RUNTIME_NAMESPACE,
        "TENANTRY_RUNTIME_REDIS_URL": redis.url,
        "TENANTRY_RUNTIME_DATABASE_URL": create_runtime_login(pg),
        "TENANTRY_RUNTIME_UPSTREAM_URL": upstream.url,
        "TENANTRY_RUNTIME_UPSTREAM_API_KEY": upstream.api_key,
        "TENANTRY_RUNTIME_SPOOL_DIR": str(workdir / "runtime-spool"),
        "TENANTRY_RUNTIME_USAGE_FLUSH_SECONDS": "0.5",
    })
    started.append(runtime)
    url = f"http://127.0.0.1:{port}"
    wait_until("the runtime to be ready (GET /readyz)",
               lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, runtime, 120)
    say(f"the runtime is ready at {url}")
    return runtime, url


def _listens(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def _phases(tenants_json: str) -> dict[str, str]:
    items = json.loads(tenants_json)["items"]
    return {t["metadata"]["name"]: (t.get("status") or {}).get("phase", "") for t in items}
