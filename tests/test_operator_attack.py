"""Adversarial tests of the operator's data plane: what a hostile tenant workload can do.

Complements test_attack.py (database logins) and test_network_policies.py (traffic paths).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import psycopg
import pytest
from db_helpers import Conn, connect, drop_roles, q, scalar, scratch_database, unique
from lightkube import AsyncClient, KubeConfig
from lightkube.resources.core_v1 import Secret
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from tenantry_devenv.controlplane import ControlPlane
from tenantry_devenv.services import Postgres
from tenantry_operator import builders, cache_scope, dataplane, endpoint_reach, guardrails
from tenantry_operator.cache import MISS
from tenantry_operator.database import UnmanagedSchema, bootstrap_shared, ensure_bridge_tenant
from tenantry_operator.kube import Kube
from tenantry_operator.model import PlanSpec, TenantSpec, effective_spec
from tenantry_operator.names import namespace_name, standard_labels
from tenantry_operator.reconcile import phase_of
from tenantry_operator.settings import OperatorSettings
from tenantry_operator.steps import StepContext, StepFailed
from tenantry_runtime.contracts.database import (
    SHARED_SCHEMA,
    bridge_role,
    bridge_schema,
    migrate,
    tenant_transaction,
)

_SSL_REQUEST, _GSSENC_REQUEST = 80877103, 80877104


def _read_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("client closed")
        data += chunk
    return data


@contextmanager
def server_asking_for_a_clear_text_password() -> Iterator[tuple[int, list[bytes]]]:
    """A socket that speaks just enough of the Postgres protocol to ask the client for its
    password in clear text, as a tenant's Pod labelled like the silo could (the silo Service
    selects by labels any Pod of the namespace may carry). Yields its port and what it got."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    received: list[bytes] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                while True:  # SSL/GSS requests first (refused), then the startup message
                    (length,) = struct.unpack("!i", _read_exact(conn, 4))
                    body = _read_exact(conn, length - 4)
                    if struct.unpack("!i", body[:4])[0] in (_SSL_REQUEST, _GSSENC_REQUEST):
                        conn.sendall(b"N")
                        continue
                    break
                conn.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
                kind = _read_exact(conn, 1)
                (length,) = struct.unpack("!i", _read_exact(conn, 4))
                received.append(kind + _read_exact(conn, length - 4))
            except (ConnectionError, OSError):
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], received
    finally:
        listener.close()
        thread.join(10)


def _at(dsn: str, port: int) -> str:
    """`dsn` with its Service host swapped for 127.0.0.1:`port` (every other option kept)."""
    params = conninfo_to_dict(dsn)
    params.update(host="127.0.0.1", port=str(port))
    return make_conninfo("", **params)


def test_a_pod_posing_as_the_silo_never_receives_the_admin_password(
        shared_database: str, postgres: Postgres) -> None:
    password = secrets.token_urlsafe(24)
    dsn = builders.silo_admin_dsn("tenant-victim", password)
    with server_asking_for_a_clear_text_password() as (port, received), \
            pytest.raises(psycopg.OperationalError):
        psycopg.connect(_at(dsn, port), connect_timeout=5).close()
    assert not any(password.encode() in message for message in received), (
        "the operator sent the silo admin password in clear text to a server that asked")
    # A real server (SCRAM, as the silo image) still accepts the same DSN.
    real = _at(builders.silo_admin_dsn("tenant-victim", postgres.password), postgres.port)
    with psycopg.connect(real, connect_timeout=5) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


# --- a bridge login's table locks and the operator ----------------------------------------------


@dataclass
class Bridged:
    pg: Postgres
    db: str
    passwords: dict[str, str]

    def admin(self) -> Conn:
        return connect(self.pg, self.db)

    def provision(self, tenant: str) -> None:
        """One reconcile's database work, retried on a lock it may not wait for (as the
        operator's step is retried)."""
        password = self.passwords.setdefault(tenant, secrets.token_urlsafe(16))
        deadline = time.monotonic() + 60
        while True:
            try:
                with self.admin() as conn:
                    ensure_bridge_tenant(conn, tenant, password)
                return
            except psycopg.errors.LockNotAvailable:
                if time.monotonic() > deadline:
                    raise

    def login(self, tenant: str) -> Conn:
        return connect(self.pg, self.db, bridge_role(tenant), self.passwords[tenant])


@pytest.fixture(scope="module")
def bridged(postgres: Postgres) -> Iterator[Bridged]:
    world = None
    try:
        with scratch_database(postgres, "lk") as db:
            world = Bridged(postgres, db, {})
            with world.admin() as admin:
                bootstrap_shared(admin)
            yield world
    finally:
        if world is not None:
            drop_roles(postgres, [bridge_role(t) for t in world.passwords])


def _in_thread(work: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as err:  # reported by the test
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_a_bridge_login_holding_its_table_does_not_stall_other_tenants(
        bridged: Bridged) -> None:
    hostile, victim = unique("hostile"), unique("victim")
    bridged.provision(hostile)
    schema = bridge_schema(hostile)
    # A guard to restore (a new release's table, or a hand-made change), so the next reconcile
    # of the hostile tenant alters its table under the registry lock.
    with bridged.admin() as admin:
        admin.execute(q("ALTER TABLE {t} DROP CONSTRAINT tenant_id_pinned",
                        t=f"{schema}.documents"))
    with bridged.login(hostile) as holder:
        holder.autocommit = False  # an open transaction holding ACCESS SHARE, left idle
        holder.execute(q("SELECT 1 FROM {t} LIMIT 0", t=f"{schema}.documents"))
        hostile_reconcile, _ = _in_thread(lambda: bridged.provision(hostile))
        time.sleep(1)  # it now waits for the table, holding the registry lock
        victim_reconcile, victim_errors = _in_thread(lambda: bridged.provision(victim))
        victim_reconcile.join(45)
        stalled = victim_reconcile.is_alive()
        holder.rollback()
    hostile_reconcile.join(60)
    victim_reconcile.join(60)
    assert not stalled, "another tenant's provisioning waited for the hostile tenant's lock"
    assert victim_errors == []
    with bridged.login(victim) as conn:
        assert scalar(conn, "SELECT current_user") == bridge_role(victim)
    bridged.provision(hostile)  # released: the guard comes back
    with bridged.admin() as admin:
        assert scalar(admin, """SELECT count(*) FROM pg_constraint
                                WHERE conrelid = %s::regclass
                                  AND conname = 'tenant_id_pinned'""",
                      (f"{schema}.documents",)) == 1


def test_a_month_s_partition_is_not_held_up_by_a_bridge_login(bridged: Bridged) -> None:
    tenant = unique("holder")
    bridged.provision(tenant)
    schema = bridge_schema(tenant)
    with bridged.admin() as admin:
        last = scalar(admin, """
            SELECT max(c.relname) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = %s::regclass AND c.relname <> 'ai_usage_logs_default'""",
                      (f"{schema}.ai_usage_logs",))
        # As when a new month begins: the partition three months ahead is not there yet.
        admin.execute(q("DROP TABLE {t}", t=f"{schema}.{last}"))
    with bridged.login(tenant) as holder:
        holder.autocommit = False  # its usage, read in a transaction left open
        holder.execute(q("SELECT 1 FROM {t} LIMIT 0", t=f"{schema}.ai_usage_logs"))
        with bridged.admin() as admin:
            reconcile, errors = _in_thread(lambda: ensure_bridge_tenant(
                admin, tenant, bridged.passwords[tenant]))
            reconcile.join(30)
            waiting = reconcile.is_alive()
            holder.rollback()
            reconcile.join(30)
    assert not waiting, "the operator waited for as long as the tenant held its table"
    assert [type(e) for e in errors] == [psycopg.errors.LockNotAvailable]
    bridged.provision(tenant)  # released: the month's partition is made
    with bridged.admin() as admin:
        assert scalar(admin, "SELECT to_regclass(%s) IS NOT NULL", (f"{schema}.{last}",))


# --- a tenant's egress CIDRs and the node's own services -------------------------------------


def _egress_admits(policies: list[dict[str, Any]], address: str) -> bool:
    """Whether the workloads' egress rules admit `address` through an ipBlock (its `except`
    honoured), as a CNI reads them."""
    ip = ipaddress.ip_address(address)
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            for peer in rule.get("to", []):
                block = peer.get("ipBlock")
                if block is None:
                    continue
                net = ipaddress.ip_network(block["cidr"])
                if ip.version == net.version and ip in net and not any(
                        ip in ipaddress.ip_network(e) for e in block.get("except", [])):
                    return True
    return False


@pytest.mark.parametrize("address", ["169.254.169.254", "fd00:ec2::254", "fe80::a9fe:a9fe"])
def test_the_whole_internet_does_not_include_the_node_s_metadata_service(address: str) -> None:
    # The cloud's instance metadata answers on the node's link-local address with the node's
    # credentials: no CIDR a Tenant names may reach it.
    spec = effective_spec("acme", "uid", 1, TenantSpec.from_body({
        "planRef": {"name": "p"},
        "network": {"allowEgressCIDRs": ["0.0.0.0/0", "::/0", "169.254.0.0/16"]}}),
        PlanSpec.model_validate({"model": "m"}))
    policies = guardrails.network_policies(spec, "tenant-acme", "tenantry-runtime", "tenantry",
                                           ["10.244.0.0/16", "10.96.0.0/12"])
    assert _egress_admits(policies, "192.0.2.7")  # the outside, as asked
    assert not _egress_admits(policies, address)


# --- a bridge schema made before the operator ---------------------------------------------------


def test_a_bridge_schema_someone_else_made_first_is_not_adopted(bridged: Bridged) -> None:
    # Bridge schema names are a public function of the tenant id: someone with CREATE on the
    # database (another application, a careless engineer) can make one before the Tenant
    # exists, with a trigger of their own that copies every row the tenant writes.
    tenant, stranger = unique("early"), unique("stranger")
    schema, loot = bridge_schema(tenant), f"loot_{stranger}"
    with bridged.admin() as admin:
        admin.execute(q("CREATE ROLE {r}", r=stranger))
        try:
            migrate(admin, schema)
            admin.execute(q("ALTER SCHEMA {s} OWNER TO {r}", s=schema, r=stranger))
            admin.execute(q("ALTER TABLE {t} OWNER TO {r}", t=f"{schema}.documents", r=stranger))
            admin.execute(q("CREATE SCHEMA {s} AUTHORIZATION {r}", s=loot, r=stranger))
            admin.execute(q("SET ROLE {r}", r=stranger))
            admin.execute(q("CREATE TABLE {t} (content text)", t=f"{loot}.copies"))
            admin.execute(q("""CREATE FUNCTION {f}() RETURNS trigger SECURITY DEFINER
                               LANGUAGE plpgsql AS $$ BEGIN
                                 INSERT INTO {t} VALUES (NEW.content); RETURN NEW;
                               END $$""", f=f"{loot}.grab", t=f"{loot}.copies"))
            admin.execute(q("CREATE TRIGGER grab AFTER INSERT ON {t} FOR EACH ROW"
                            " EXECUTE FUNCTION {f}()", t=f"{schema}.documents", f=f"{loot}.grab"))
            admin.execute("RESET ROLE")
            password = bridged.passwords.setdefault(tenant, secrets.token_urlsafe(16))
            try:
                ensure_bridge_tenant(admin, tenant, password)
            except UnmanagedSchema as err:
                refused, copied, message = True, 0, str(err)
            else:
                refused = False
                with bridged.login(tenant) as conn, tenant_transaction(conn, tenant):
                    conn.execute(q("INSERT INTO {t} (content) VALUES ('secret plans')",
                                   t=f"{schema}.documents"))
                copied = scalar(admin, q("SELECT count(*) FROM {t}", t=f"{loot}.copies"))
            assert refused, (f"the operator adopted a schema made by {stranger}; its trigger"
                             f" copied {copied} row(s) the tenant wrote")
            assert schema in message and stranger in message
            assert scalar(admin, "SELECT count(*) FROM pg_roles WHERE rolname = %s",
                          (bridge_role(tenant),)) == 0  # nothing provisioned
        finally:
            admin.execute("RESET ROLE")
            admin.execute(q("DROP SCHEMA IF EXISTS {s} CASCADE", s=loot))
            admin.execute(q("DROP SCHEMA IF EXISTS {s} CASCADE", s=schema))
            admin.execute(q("DROP ROLE {r}", r=stranger))


def test_a_shared_schema_someone_else_made_before_the_install_is_not_adopted(
        postgres: Postgres) -> None:
    # Its owner could drop or rename every pool tenant's table and put its own in their place.
    stranger = unique("dba")
    with scratch_database(postgres, "pre") as db, connect(postgres, db) as admin:
        admin.execute(q("CREATE ROLE {r}", r=stranger))
        try:
            admin.execute(q("CREATE SCHEMA {s} AUTHORIZATION {r}", s=SHARED_SCHEMA, r=stranger))
            with pytest.raises(UnmanagedSchema, match=stranger):
                bootstrap_shared(admin)
            assert scalar(admin, "SELECT to_regclass('tenantry.documents')") is None
        finally:
            admin.execute(q("DROP SCHEMA {s} CASCADE", s=SHARED_SCHEMA))
            admin.execute(q("DROP ROLE {r}", r=stranger))


# --- a dedicated endpoint's URL and the runtime's network position ----------------------------


CLUSTER = ("10.244.0.0/16", "10.96.0.0/12")
PLATFORM = ("tenantry-runtime", "tenantry-system")


@pytest.mark.parametrize("url", [
    "http://api.tenant-beta:443/admin?",                       # completed by the search path
    "http://api.tenant-beta.svc:443/v1",
    "https://api.tenant-beta.svc.cluster.local/v1",
    "http://10-244-3-7.tenant-beta.pod.cluster.local:443",
    "http://tenantry-postgres.tenantry-system.svc:443",        # the operator's namespace
    "http://redis.tenantry-runtime.svc:6379", "http://redis:6379",  # the runtime's
    "http://169.254.169.254/latest", "http://10.244.3.7:443", "http://10.96.0.1:443",
])
def test_a_dedicated_endpoint_cannot_point_into_another_namespace(url: str) -> None:
    problem = endpoint_reach.endpoint_problem(url, "tenant-alpha", "tenant-", PLATFORM, CLUSTER)
    assert problem is not None, f"{url} accepted"


@pytest.mark.parametrize("url", [
    "https://api.anthropic.com", "https://models.example.com/v1", "https://example.com",
    "http://llm.tenant-alpha.svc:8080", "http://llm.tenant-alpha:8080",
    "https://192.0.2.10/v1", "http://10.0.5.20:8000",  # a model server in the VPC
    "http://127.0.0.1:9/v1", "http://localhost:8080",  # the runtime's own Pod (tests, demo)
    "http://llm.models.svc.cluster.local:8080/v1",      # a platform's model server
])
def test_a_dedicated_endpoint_may_be_outside_or_in_the_tenant_s_namespace(url: str) -> None:
    assert endpoint_reach.endpoint_problem(url, "tenant-alpha", "tenant-", PLATFORM,
                                           CLUSTER) is None


def test_the_runtime_config_step_refuses_such_an_endpoint_before_writing() -> None:
    spec = effective_spec("alpha", "uid", 1, TenantSpec.from_body({
        "planRef": {"name": "p"},
        "ai": {"endpoint": {"type": "dedicated", "url": "http://api.tenant-beta:443/x?",
                            "secretRef": {"name": "key"}}}}),
        PlanSpec.model_validate({"model": "m"}))
    # No API server: the step must stop before it reads or writes anything.
    ctx = StepContext(spec=spec, kube=cast(Kube, None), status={},
                      settings=OperatorSettings(cluster_cidrs=CLUSTER))
    with pytest.raises(StepFailed) as failed:
        asyncio.run(dataplane.ensure_runtime_config(ctx))
    assert failed.value.condition.reason == "EndpointNotAllowed"
    assert "tenant-beta" in failed.value.condition.message
    assert phase_of(spec, [failed.value.condition]) == "Failed"


# --- labelled objects a tenant makes and the operator's memory ---------------------------------


async def test_labelled_secrets_a_tenant_makes_stay_out_of_the_operator_s_memory(
        control_plane: ControlPlane) -> None:
    tenant = "hoarder"
    namespace = namespace_name(tenant)
    control_plane.kubectl("create", "namespace", namespace, check=False)
    labels = standard_labels(tenant, "credentials")  # what the operator's caches select by
    junk = [f"junk-{i}" for i in range(20)]
    docs = [{"apiVersion": "v1", "kind": "Secret",
             "metadata": {"name": name, "namespace": namespace, "labels": labels},
             "data": {"blob": base64.b64encode(secrets.token_bytes(64 * 1024)).decode()}}
            for name in [*junk, builders.API_KEYS_SECRET]]
    control_plane.kubectl("apply", "-f", "-", input_text="\n---\n".join(map(json.dumps, docs)))
    scoped = Kube(AsyncClient(config=KubeConfig.from_file(control_plane.kubeconfig)))
    plain = Kube(AsyncClient(config=KubeConfig.from_file(control_plane.kubeconfig)))
    try:
        assert await scoped.start_caches(60, keep=cache_scope.tenant_namespace_scope(
            "tenant-", ("tenantry-runtime", "tenantry-system")))
        assert await plain.start_caches(60)
        assert scoped.caches is not None and plain.caches is not None
        held, unscoped = scoped.caches.by_kind[Secret], plain.caches.by_kind[Secret]
        # The label alone lets them in; the scope keeps only what the operator writes there.
        assert all(unscoped.get(name, namespace) is not MISS for name in junk)
        assert [name for name in junk if held.get(name, namespace) is not MISS] == []
        assert held.get(builders.API_KEYS_SECRET, namespace) is not MISS
        # Nothing is hidden: a read of another name asks the API server.
        read = await scoped.read(Secret, junk[0], namespace)
        assert read is not None and read["metadata"]["name"] == junk[0]
        assert held.get(junk[0], namespace) is MISS
    finally:
        await scoped.close()
        await plain.close()
        control_plane.kubectl("delete", "namespace", namespace, "--wait=false")
