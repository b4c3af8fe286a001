"""Crashes and outages: the operator as a real process (`python -m tenantry_operator`) killed
with SIGKILL, and its Postgres and Redis stopped for a while; everything converges, nothing is
duplicated, orphaned or lost.

This module has its own control plane, Postgres and Redis (so stopping them touches no other
test) and no in-process operator watches them. Crash points are found deterministically where
it matters: a lock the test holds (a writer's KEY SHARE lock on the tenant's registry row, the
operator lock on the shared schema's migrations) parks the operator at a known step, seen in
`status.migration.step` and in pg_stat_activity, and the operator is killed there. Elsewhere
the kill lands after a seeded random delay.

Sizes: TENANTRY_RELIABILITY_TENANTS (default 50) tenants, TENANTRY_RELIABILITY_ROUNDS (default
10) kills while they are created, TENANTRY_RELIABILITY_SEED for the delays.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from kube_helpers import condition, get_json, tenant_status, wait_for
from psycopg import sql
from tenantry_devenv.controlplane import ControlPlane, start_control_plane
from tenantry_devenv.services import (
    Postgres,
    Redis,
    start_postgres,
    start_postgres_again,
    start_redis,
    start_redis_again,
)
from tenantry_operator import builders
from tenantry_operator.names import MANAGER
from tenantry_operator.outages import unreachable_condition
from tenantry_runtime.api_keys import prefix_of
from tenantry_runtime.contracts import runtime_record
from tenantry_runtime.contracts.database import (
    bridge_role,
    bridge_schema,
    migrate_lock_key,
    operator_lock,
    tenant_transaction,
)
from tenantry_runtime.contracts.redis_keys import TenantKeys

REPO_ROOT = Path(__file__).resolve().parents[1]
TENANTS = int(os.environ.get("TENANTRY_RELIABILITY_TENANTS", "50"))
ROUNDS = int(os.environ.get("TENANTRY_RELIABILITY_ROUNDS", "10"))
SEED = int(os.environ.get("TENANTRY_RELIABILITY_SEED", "20261127"))
CREDENTIALS_NAMESPACE = "tenantry-reliability-op"
RUNTIME_NAMESPACE = "tenantry-reliability-rt"
IDENTITY = "op-reliability"  # the same after each restart: it renews its own Lease at once
PLAN = "pro"  # pool and bridge

pytestmark = pytest.mark.timeout(900)


@dataclass
class World:
    plane: ControlPlane
    pg: Postgres
    pg_dir: Path
    redis: Redis
    redis_dir: Path
    logdir: Path
    operator: subprocess.Popen[bytes] | None = None
    starts: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def dsn(self) -> str:
        return self.pg.dsn("tenantry")

    def start_operator(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("TENANTRY_") and k not in {"KUBECONFIG", "POD_NAME"}}
        env.update({
            "KUBECONFIG": str(self.plane.kubeconfig),
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "operator"),
                                           str(REPO_ROOT / "runtime"),
                                           env.get("PYTHONPATH", "")]),
            "TENANTRY_DATABASE_URL": self.dsn,
            "TENANTRY_REDIS_URL": self.redis.url,
            "TENANTRY_RECONCILE_INTERVAL_SECONDS": "3",
            "TENANTRY_CREDENTIALS_NAMESPACE": CREDENTIALS_NAMESPACE,
            "TENANTRY_RUNTIME_NAMESPACE": RUNTIME_NAMESPACE,
            "TENANTRY_LEASE_NAME": "tenantry-reliability",
            "TENANTRY_LEASE_NAMESPACE": "default",
            "TENANTRY_LEASE_IDENTITY": IDENTITY,
        })
        self.starts += 1
        log = self.logdir / f"operator-{self.starts:02d}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.operator = subprocess.Popen(
                [sys.executable, "-m", "tenantry_operator"], env=env, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def log_text(self) -> str:
        return self.logs[-1].read_text(errors="replace") if self.logs else ""

    def wait_running(self) -> None:
        """Until kopf runs its handlers (startup migrated the shared database)."""
        wait_for("the operator to start kopf",
                 lambda: "Activity 'configure' succeeded" in self.log_text(), timeout=90)

    def kill_operator(self) -> None:
        assert self.operator is not None and self.operator.poll() is None, self.log_text()[-3000:]
        self.operator.send_signal(signal.SIGKILL)
        self.operator.wait(timeout=30)
        self.operator = None

    def stop_operator(self) -> None:
        if self.operator is not None:
            self.operator.kill()
            self.operator.wait(timeout=30)

    def restart_operator(self) -> None:
        self.kill_operator()
        self.start_operator()

    def explain(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}"
                         for log in self.logs[-2:])


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    # Not under pytest's base directory: a pytest session started meanwhile (another suite on
    # the machine) resets it to 0700, and the restarted Postgres could not reach its data.
    with tempfile.TemporaryDirectory(prefix="tenantry-reliability-") as path:
        yield from _world(Path(path))


def _world(root: Path) -> Iterator[World]:
    saved = os.environ.get("KUBECONFIG")
    plane = start_control_plane(root / "cluster")
    if saved is None:  # start_control_plane sets it only when unset; do not leak ours
        os.environ.pop("KUBECONFIG", None)
    stops: list[Callable[[], None]] = [plane.stop]
    try:
        plane.install_crds()
        plane.kubectl("apply", "-f", str(REPO_ROOT / "examples" / "plans.yaml"))
        pg = start_postgres(root / "pg")
        with psycopg.connect(pg.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE tenantry")
        redis_server = start_redis(root / "redis")
        world = World(plane, pg, root / "pg", redis_server, root / "redis", root)
        # The test replaces a restarted server in `world`: stop whichever runs at the end.
        stops += [lambda: world.pg.stop(), lambda: world.redis.stop()]
        world.start_operator()
        stops.append(world.stop_operator)
        world.wait_running()
        yield world
    finally:
        for stop in reversed(stops):
            stop()


# --------------------------------------------------------------------------------- helpers


def tenant_manifest(name: str, isolation: str = "pool") -> dict[str, Any]:
    return {"apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": name},
            "spec": {"planRef": {"name": PLAN}, "isolation": isolation,
                     "apiKeys": [{"name": "app"}], "deletionPolicy": "Delete"}}


def apply_all(plane: ControlPlane, manifests: list[dict[str, Any]]) -> None:
    plane.kubectl("apply", "-f", "-", input_text=json.dumps(
        {"apiVersion": "v1", "kind": "List", "items": manifests}))


def tenants_by_name(plane: ControlPlane) -> dict[str, dict[str, Any]]:
    listed = get_json(plane, "tnt") or {}
    return {t["metadata"]["name"]: t for t in listed.get("items", [])}


def wait_all_ready(world: World, names: list[str], timeout: float = 300) -> None:
    def not_ready() -> list[str]:
        live = tenants_by_name(world.plane)
        return [n for n in names
                if ((live.get(n) or {}).get("status") or {}).get("phase") != "Ready"]

    try:
        wait_for(f"{len(names)} tenants Ready", lambda: not not_ready(), timeout)
    except AssertionError:
        missing = not_ready()
        status = tenant_status(world.plane, missing[0]) if missing else {}
        raise AssertionError(f"not Ready: {missing}\n{json.dumps(status)}\n"
                             f"{world.explain()}") from None


def wait_all_gone(world: World, names: list[str], timeout: float = 240) -> None:
    try:
        wait_for("the tenants to be deleted",
                 lambda: not set(names) & set(tenants_by_name(world.plane)), timeout)
    except AssertionError:
        left = sorted(set(names) & set(tenants_by_name(world.plane)))
        raise AssertionError(f"still there (Terminating): {left}\n"
                             f"{json.dumps(tenant_status(world.plane, left[0]))}\n"
                             f"{world.explain()}") from None


def rows(dsn: str, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        return [tuple(r) for r in conn.execute(query, params).fetchall()]


def names_in(plane: ControlPlane, kind: str, namespace: str | None = None,
             selector: str = f"app.kubernetes.io/managed-by={MANAGER}") -> set[str]:
    args = ["-n", namespace] if namespace else []
    listed = get_json(plane, kind, *args, "-l", selector) or {}
    return {item["metadata"]["name"] for item in listed.get("items", [])}


def redis_keys(world: World) -> set[str]:
    client = redis.Redis.from_url(world.redis.url, decode_responses=True)
    try:
        return set(client.scan_iter(match="tenantry:v1:*", count=1000))
    finally:
        client.close()


def assert_converged(world: World, pool: list[str], bridge: list[str]) -> None:
    """Exactly one of everything per tenant, and nothing for any other tenant."""
    names = pool + bridge
    plane, dsn = world.plane, world.dsn
    registry = dict(rows(dsn, "SELECT tenant_id, isolation FROM tenantry.tenants"))
    assert registry == {**dict.fromkeys(pool, "pool"), **dict.fromkeys(bridge, "bridge")}
    managed = {r[0] for r in rows(dsn, "SELECT role_name FROM tenantry.managed_roles")}
    assert managed == {bridge_role(n) for n in bridge}
    roles = {r[0] for r in rows(dsn, "SELECT rolname FROM pg_roles WHERE rolname LIKE 't\\_%'")}
    assert roles == managed
    schemas = {r[0] for r in rows(dsn, "SELECT nspname FROM pg_namespace"
                                       " WHERE nspname LIKE 't\\_%'")}
    assert schemas == {bridge_schema(n) for n in bridge}
    for name in bridge:  # each bridge schema holds its own tenant's row, once
        assert rows(dsn, sql.SQL("SELECT tenant_id FROM {}").format(
            sql.Identifier(bridge_schema(name), "tenants"))) == [(name,)]
    assert redis_keys(world) == {TenantKeys(n).limits for n in names}
    assert names_in(plane, "namespace", selector="tenantry.dev/tenant") == {
        f"tenant-{n}" for n in names}
    # Every Secret and ConfigMap the operator made, listed once (not one kubectl per tenant).
    secrets = owned_objects(plane, "secrets")
    configmaps = owned_objects(plane, "configmaps")
    assert set(secrets.get(RUNTIME_NAMESPACE, {})) == {
        runtime_record.secret_name(n) for n in names}
    assert set(secrets.get(CREDENTIALS_NAMESPACE, {})) == {
        builders.credentials_backup_name(n, builders.TENANT_DB_SECRET) for n in bridge}
    tenant_namespaces = {f"tenant-{n}" for n in names}
    assert set(secrets) <= tenant_namespaces | {RUNTIME_NAMESPACE, CREDENTIALS_NAMESPACE}
    assert set(configmaps) == tenant_namespaces
    for name in names:
        ns = f"tenant-{name}"
        expected = {builders.API_KEYS_SECRET} | (
            {builders.TENANT_DB_SECRET} if name in bridge else set())
        assert set(secrets[ns]) == expected, name
        assert set(configmaps[ns]) == {builders.RUNTIME_CONFIGMAP}, name
        # The key the tenant holds is the one the runtime knows (no key issued twice).
        key = base64.b64decode(secrets[ns][builders.API_KEYS_SECRET]["data"]["app"]).decode()
        record = secrets[RUNTIME_NAMESPACE][runtime_record.secret_name(name)]
        payload = json.loads(base64.b64decode(record["data"][runtime_record.DATA_KEY]))
        assert [k["prefix"] for k in payload["api_keys"]] == [prefix_of(key)], name


def owned_objects(plane: ControlPlane, kind: str) -> dict[str, dict[str, dict[str, Any]]]:
    """namespace -> name -> object, of every `kind` carrying the operator's mark."""
    listed = get_json(plane, kind, "-A", "-l", f"app.kubernetes.io/managed-by={MANAGER}") or {}
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for item in listed.get("items", []):
        meta = item["metadata"]
        found.setdefault(meta["namespace"], {})[meta["name"]] = item
    return found


def assert_nothing_left(world: World, names: list[str]) -> None:
    dsn = world.dsn
    for (table,) in rows(dsn, """
            SELECT c.relname FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
            WHERE c.relnamespace = 'tenantry'::regnamespace AND c.relkind IN ('r', 'p')
              AND NOT c.relispartition AND a.attname = 'tenant_id'"""):
        assert rows(dsn, sql.SQL("SELECT count(*) FROM {} WHERE tenant_id = ANY(%s)").format(
            sql.Identifier("tenantry", table)), (names,)) == [(0,)], table
    assert rows(dsn, "SELECT count(*) FROM tenantry.managed_roles") == [(0,)]
    assert rows(dsn, "SELECT count(*) FROM pg_roles WHERE rolname LIKE 't\\_%'") == [(0,)]
    assert rows(dsn, "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 't\\_%'") == [(0,)]
    assert redis_keys(world) == set()
    assert names_in(world.plane, "secret", RUNTIME_NAMESPACE) == set()
    assert names_in(world.plane, "secret", CREDENTIALS_NAMESPACE) == set()
    wait_for("the tenant namespaces to go", lambda: not names_in(
        world.plane, "namespace", selector="tenantry.dev/tenant"), timeout=60)


def lock_waiters(dsn: str) -> int:
    """Sessions of the operator waiting for a lock the test holds."""
    return int(rows(dsn, "SELECT count(*) FROM pg_stat_activity WHERE datname = 'tenantry'"
                         " AND wait_event_type = 'Lock'")[0][0])


# --------------------------------------------------------------------------------- 1. crashes


def test_operator_killed_at_random_points_while_tenants_are_created_and_deleted(
        world: World) -> None:
    rng = random.Random(SEED)
    started = time.monotonic()
    phases: dict[str, float] = {}

    def lap(phase: str) -> None:
        phases[phase] = round(time.monotonic() - started - sum(phases.values()), 1)

    names = [f"crash{i:02d}" for i in range(TENANTS)]
    bridge = names[::5]  # every fifth: a schema, a role, credentials
    pool = [n for n in names if n not in bridge]
    per_round = math.ceil(TENANTS / ROUNDS)
    kills: list[float] = []
    for round_ in range(ROUNDS):
        batch = names[round_ * per_round:(round_ + 1) * per_round]
        if batch:
            apply_all(world.plane, [tenant_manifest(n, "bridge" if n in bridge else "pool")
                                    for n in batch])
        world.wait_running()
        kills.append(round(rng.uniform(0.2, 3.0), 2))
        time.sleep(kills[-1])
        world.restart_operator()
    lap("kills")
    wait_all_ready(world, names)
    lap("ready")
    assert_converged(world, pool, bridge)
    # A settled state stays settled across more restarts (no duplicate on resume).
    world.wait_running()
    world.restart_operator()
    world.wait_running()
    time.sleep(4)  # a resync tick
    wait_all_ready(world, names)
    assert_converged(world, pool, bridge)
    lap("restart settled")

    # Deletion, killed a few times on the way: every Tenant goes, nothing stays behind.
    world.plane.kubectl("delete", "tnt", *names, "--wait=false")
    for _ in range(3):
        time.sleep(round(rng.uniform(0.5, 3.0), 2))
        world.restart_operator()
        world.wait_running()
    lap("deletion kills")
    wait_all_gone(world, names)
    assert_nothing_left(world, names)
    lap("gone")
    print(f"kill delays (s) after kopf started: {kills}; phases (s): {phases}")  # noqa: T201


# --------------------------------------------------------------------------------- 2. upgrade


def seed(dsn: str, tenant: str, count: int) -> None:
    """Documents, embeddings and usage rows, written as the tenant would."""
    with psycopg.connect(dsn, autocommit=True) as conn, tenant_transaction(conn, tenant):
        conn.execute("""
            INSERT INTO tenantry.documents (tenant_id, title, content)
            SELECT %s, 'doc ' || i, repeat('text ' || i || ' ', 20)
            FROM generate_series(1, %s) i""", (tenant, count))
        conn.execute("""
            INSERT INTO tenantry.tenant_embeddings_d384 (tenant_id, document_id, content,
                                                         embedding)
            SELECT %s, d.id, d.title,
                   (SELECT array_agg(((n + length(d.title)) %% 11) / 10.0 + 0.01)
                    FROM generate_series(1, 384) n)::public.vector
            FROM tenantry.documents d WHERE d.tenant_id = %s""", (tenant, tenant))
        conn.execute("""
            INSERT INTO tenantry.ai_usage_logs (tenant_id, request_id, model, input_tokens,
                                                output_tokens, created_at)
            SELECT %s, 'req-' || i, 'm', 10 + i, 5 + i, now() FROM generate_series(1, %s) i""",
                     (tenant, count))


TABLES = {"documents": "documents", "tenant_embeddings_d384": "embeddings",
          "ai_usage_logs": "ai_usage_logs"}


def snapshot(dsn: str, tenant: str, schema: str) -> dict[str, tuple[int, str]]:
    """Per table: (rows, md5 of every row's text in order) of the tenant's rows in `schema`."""
    found = {}
    for pool_table, bridge_table in TABLES.items():
        table = pool_table if schema == "tenantry" else bridge_table
        ((count, digest),) = rows(dsn, sql.SQL(
            "SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), ''))"
            " FROM {} t WHERE tenant_id = %s").format(sql.Identifier(schema, table)), (tenant,))
        found[pool_table] = (int(count), str(digest))
    return found


def registry(dsn: str, tenant: str) -> str | None:
    found = rows(dsn, "SELECT isolation FROM tenantry.tenants WHERE tenant_id = %s", (tenant,))
    return str(found[0][0]) if found else None


def migration_step(world: World, tenant: str) -> str | None:
    step: str | None = (tenant_status(world.plane, tenant).get("migration") or {}).get("step")
    return step


def kill_while_parked(world: World, hold: Callable[[psycopg.Connection[Any]], None],
                      parked: Callable[[], bool], act: Callable[[], None]) -> None:
    """Hold a lock, `act`, wait until the operator is `parked` on it, SIGKILL it there, then
    release the lock and start the operator again."""
    with psycopg.connect(world.dsn, autocommit=True) as holder:
        holder.execute("BEGIN")
        hold(holder)
        act()
        try:
            wait_for("the operator to wait for the test's lock",
                     lambda: parked() and lock_waiters(world.dsn) > 0, timeout=90)
        except AssertionError:
            raise AssertionError(world.explain()) from None
        world.kill_operator()
        holder.execute("ROLLBACK")
    world.start_operator()


def hold_writer_gate(tenant: str) -> Callable[[psycopg.Connection[Any]], None]:
    """A runtime writer in flight: KEY SHARE on the tenant's registry row (write_transaction)."""
    def hold(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT 1 FROM tenantry.tenants WHERE tenant_id = %s FOR KEY SHARE",
                     (tenant,))
    return hold


def test_upgrade_killed_mid_copy_and_after_the_switch_resumes_and_loses_nothing(
        world: World) -> None:
    plane, dsn = world.plane, world.dsn
    names = ["upcopy", "upswitch", "upneighbor"]
    apply_all(plane, [tenant_manifest(n) for n in names])
    wait_all_ready(world, names)
    for name in names:
        seed(dsn, name, 3000)
    before = {n: snapshot(dsn, n, "tenantry") for n in names}
    assert all(count == 3000 for count, _ in before["upcopy"].values())

    def upgrade(name: str) -> Callable[[], None]:
        return lambda: plane.kubectl("patch", "tnt", name, "--type=merge",
                                     "-p", '{"spec": {"isolation": "bridge"}}')

    # Mid-copy: the move waits for the writer gate (today right after the target is prepared;
    # an online copy takes it for its final catch-up), nothing switched. In terms of status
    # only: a step before cleanup, so the test holds whatever the copy's steps are called.
    kill_while_parked(world, hold_writer_gate("upcopy"),
                      lambda: migration_step(world, "upcopy") not in (None, "CleaningUp", "Done"),
                      upgrade("upcopy"))
    assert registry(dsn, "upcopy") == "pool"
    assert snapshot(dsn, "upcopy", "tenantry") == before["upcopy"]

    # After the switch: the registry names the bridge, cleanup waits for the schema's lock.
    def hold_cleanup(conn: psycopg.Connection[Any]) -> None:
        operator_lock(conn, migrate_lock_key("tenantry"))

    world.wait_running()
    kill_while_parked(world, hold_cleanup,
                      lambda: (registry(dsn, "upswitch") == "bridge"
                               and migration_step(world, "upswitch") not in (None, "Done")),
                      upgrade("upswitch"))
    # Both copies exist at this point: the verified bridge copy and the pool rows.
    assert snapshot(dsn, "upswitch", bridge_schema("upswitch")) == before["upswitch"]

    wait_all_ready(world, names)
    for name in ("upcopy", "upswitch"):
        wait_for(f"{name}'s migration Done", lambda n=name: migration_step(world, n) == "Done")
        assert registry(dsn, name) == "bridge"
        assert snapshot(dsn, name, bridge_schema(name)) == before[name], name
        assert all(c == 0 for c, _ in snapshot(dsn, name, "tenantry").values()), name
        migration = tenant_status(plane, name)["migration"]
        assert (migration["from"], migration["to"]) == ("pool", "bridge")
    assert snapshot(dsn, "upneighbor", "tenantry") == before["upneighbor"]
    assert_converged(world, ["upneighbor"], ["upcopy", "upswitch"])

    # Deletion killed while it waits for a writer of the tenant: it resumes and finishes.
    world.wait_running()
    kill_while_parked(world, hold_writer_gate("upneighbor"),
                      lambda: get_json(plane, "secret", runtime_record.secret_name("upneighbor"),
                                       "-n", RUNTIME_NAMESPACE) is None,
                      lambda: plane.kubectl("delete", "tnt", "upneighbor", "--wait=false"))
    wait_all_gone(world, ["upneighbor"])
    plane.kubectl("delete", "tnt", "upcopy", "upswitch", "--wait=false")
    wait_all_gone(world, names)
    assert_nothing_left(world, names)


# --------------------------------------------------------------------------------- 3. outages


def test_only_a_lost_or_refused_server_reads_as_unreachable() -> None:
    refused = psycopg.OperationalError('connection to server at "127.0.0.1", port 1 failed:'
                                       " Connection refused\n\tIs the server running?")
    cond = unreachable_condition("DatabaseReady", refused)
    assert cond is not None and (cond.type, cond.ok, cond.reason) == (
        "DatabaseReady", False, "DatabaseUnreachable")
    assert "Connection refused" in cond.message and "\n" not in cond.message
    shutdown = unreachable_condition("DatabaseReady", psycopg.errors.AdminShutdown("bye"))
    assert shutdown is not None and shutdown.reason == "DatabaseUnreachable"
    lost = unreachable_condition("LimitsReady", redis.exceptions.ConnectionError("refused"))
    assert lost is not None and lost.reason == "RedisUnreachable"
    # An answer from a running server is not an outage: the exception's own name stays.
    assert unreachable_condition("DatabaseReady", psycopg.errors.LockNotAvailable("x")) is None
    assert unreachable_condition("DatabaseReady", psycopg.errors.QueryCanceled("x")) is None
    assert unreachable_condition("LimitsReady", redis.exceptions.ResponseError("x")) is None
    assert unreachable_condition("LimitsReady", ValueError("x")) is None



def stop_postgres(world: World) -> None:
    """A fast shutdown (SIGINT): sessions are cut, new connections refused."""
    os.kill(world.pg.process.pid, signal.SIGINT)
    wait_for("postgres to stop", lambda: not world.pg.process.alive(), timeout=60)


def reason_of(world: World, tenant: str, ctype: str) -> str | None:
    reason: str | None = condition(tenant_status(world.plane, tenant), ctype).get("reason")
    return reason


def assert_not_served(world: World, tenant: str) -> None:
    """Nothing after the failed step exists: no keys, no runtime copy, no limits."""
    ns = f"tenant-{tenant}"
    assert get_json(world.plane, "secret", builders.API_KEYS_SECRET, "-n", ns) is None
    assert get_json(world.plane, "configmap", builders.RUNTIME_CONFIGMAP, "-n", ns) is None
    assert get_json(world.plane, "secret", runtime_record.secret_name(tenant), "-n",
                    RUNTIME_NAMESPACE) is None


def test_postgres_and_redis_outages_are_reported_and_converge_when_they_return(
        world: World) -> None:
    plane = world.plane
    apply_all(plane, [tenant_manifest("steady")])
    wait_all_ready(world, ["steady"])

    stop_postgres(world)
    try:
        apply_all(plane, [tenant_manifest("outpool"), tenant_manifest("outbridge", "bridge")])
        for name in ("outpool", "outbridge", "steady"):  # steady: on its next resync
            wait_for(f"{name}: DatabaseUnreachable",
                     lambda n=name: reason_of(world, n, "DatabaseReady") == "DatabaseUnreachable",
                     timeout=60)
        status = tenant_status(plane, "outbridge")
        assert status["phase"] == "Provisioning"
        assert "cannot reach Postgres" in condition(status, "DatabaseReady")["message"]
        assert condition(status, "Ready")["status"] == "False"
        for name in ("outpool", "outbridge"):
            assert_not_served(world, name)
        assert get_json(plane, "secret", builders.TENANT_DB_SECRET, "-n",
                        "tenant-outbridge") is None
        # The tenant that was Ready keeps being served meanwhile: nothing is torn down.
        assert get_json(plane, "secret", runtime_record.secret_name("steady"), "-n",
                        RUNTIME_NAMESPACE) is not None
        # An operator (re)started during the outage cannot migrate at startup: it retries.
        world.restart_operator()
        wait_for("the operator's startup to fail and retry", lambda: (
            "Activity 'configure' failed with an exception" in world.log_text()), timeout=60)
    finally:
        world.pg = start_postgres_again(world.pg, world.pg_dir)
    back = time.monotonic()
    world.wait_running()
    assert time.monotonic() - back < 30, "startup was not retried promptly"
    wait_all_ready(world, ["steady", "outpool", "outbridge"], timeout=120)
    assert_converged(world, ["steady", "outpool"], ["outbridge"])

    world.redis.stop()
    try:
        apply_all(plane, [tenant_manifest("outredis")])
        wait_for("outredis: RedisUnreachable",
                 lambda: reason_of(world, "outredis", "LimitsReady") == "RedisUnreachable",
                 timeout=60)
        status = tenant_status(plane, "outredis")
        assert condition(status, "DatabaseReady")["status"] == "True"
        assert "cannot reach Redis" in condition(status, "LimitsReady")["message"]
        assert status["phase"] == "Provisioning"
        assert_not_served(world, "outredis")
    finally:
        world.redis = start_redis_again(world.redis, world.redis_dir)
    names = ["steady", "outpool", "outbridge", "outredis"]
    wait_all_ready(world, names, timeout=120)
    # Redis came back empty: every tenant's limits are written again by the resync.
    wait_for("every tenant's limits back in Redis",
             lambda: redis_keys(world) == {TenantKeys(n).limits for n in names}, timeout=60)
    assert_converged(world, ["steady", "outpool", "outredis"], ["outbridge"])

    plane.kubectl("delete", "tnt", *names, "--wait=false")
    wait_all_gone(world, names)
    assert_nothing_left(world, names)
