"""`make demo`: control plane, Postgres+pgvector, Redis, CRDs, the operator, two sample Tenants."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Protocol

import psycopg
import redis as redis_client

from .controlplane import REPO_ROOT, start_control_plane
from .processes import StartupError, log_tail, spawn
from .services import start_postgres, start_redis

SAMPLE_TENANTS = ("acme", "globex")


class Stoppable(Protocol):
    def stop(self) -> None: ...


def say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - the demo's output is for people


def run_demo(workdir: Path, keep: bool = False, timeout: float = 180.0) -> int:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    # Everything started, stopped in reverse order however this function is left (an error,
    # or a signal turned into SystemExit by processes.stop_on_signals).
    started: list[Stoppable] = []
    try:
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

        say("==> starting the operator")
        operator = spawn("tenantry-operator", [sys.executable, "-m", "tenantry_operator"],
                         workdir / "operator.log", env={
                             "KUBECONFIG": str(plane.kubeconfig),
                             "TENANTRY_DATABASE_URL": pg.dsn("tenantry"),
                             "TENANTRY_REDIS_URL": redis.url,
                             "TENANTRY_RECONCILE_INTERVAL_SECONDS": "30",
                         })
        started.append(operator)

        say("==> applying two sample tenants (examples/tenants.yaml): acme (pool), globex (bridge)")
        plane.kubectl("apply", "-f", str(REPO_ROOT / "examples" / "tenants.yaml"))
        deadline = time.monotonic() + timeout
        while True:
            phases = _phases(plane.kubectl("get", "tnt", "-o", "json").stdout)
            if all(phases.get(t) == "Ready" for t in SAMPLE_TENANTS):
                break
            if not operator.alive() or time.monotonic() > deadline:
                raise StartupError(f"tenants did not reach Ready ({phases}); operator log:\n"
                                   f"{log_tail(operator.log, 60)}")
            time.sleep(1)

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
            for (schema,) in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname"
                                          " LIKE 'tenant%' ORDER BY 1"):
                say(f"  schema {schema}")
        limits = redis_client.Redis.from_url(redis.url, decode_responses=True)
        for key in sorted(limits.scan_iter(match="tenantry:v1:*")):
            say(f"redis {key}: {limits.hgetall(key)}")
        say("\nruntime config of globex (ConfigMap tenant-globex/tenantry-runtime-config):")
        say(plane.kubectl("get", "configmap", "tenantry-runtime-config", "-n", "tenant-globex",
                          "-o", "jsonpath={.data.config\\.json}").stdout)
        say(f"\nKUBECONFIG={plane.kubeconfig}\noperator log: {operator.log}")
        if keep:
            say("running; press Ctrl-C to stop")
            while operator.alive():
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


def _phases(tenants_json: str) -> dict[str, str]:
    items = json.loads(tenants_json)["items"]
    return {t["metadata"]["name"]: (t.get("status") or {}).get("phase", "") for t in items}
