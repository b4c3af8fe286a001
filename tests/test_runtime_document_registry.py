"""Other tenants' document ids are redacted on every runtime replica (issue 7, item 8): two
runtimes (uvicorn) sharing redis-server and the embedded Postgres, the official anthropic SDK
against the local model endpoint, which echoes the question (so the answer holds the ids)."""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anthropic
import httpx
import psycopg
import pytest
import redis
from db_helpers import connect, create_login_role, drop_roles, scratch_database, unique
from pydantic import SecretStr
from rag_helpers import RagTenants
from runtime_helpers import MODEL, UPSTREAM_KEY, RuntimeServer, serve, wait_for
from tenantry_cli.documents import document_ids, sync_tenant
from tenantry_devenv.services import Postgres, Redis
from tenantry_operator.database import bootstrap_shared, ensure_collection, ensure_pool_tenant
from tenantry_runtime.app import create_app
from tenantry_runtime.contracts.database import APP_ROLE, SHARED_SCHEMA, tenant_transaction
from tenantry_runtime.contracts.redis_keys import DOCUMENT_OWNERS, TenantKeys
from tenantry_runtime.sanitize import REDACTED, Sanitizer
from tenantry_runtime.settings import RuntimeSettings
from tenantry_runtime.store import TenantStore
from tenantry_runtime.upstream_stub import StubState

pytestmark = pytest.mark.timeout(240)
RAG_OFF = {"tenantry-rag": "off"}


@dataclass
class Replica:
    url: str
    app: object

    @property
    def sanitizer(self) -> Sanitizer:
        return self.app.state.rag.sanitizer  # type: ignore[attr-defined,no-any-return]


@dataclass
class Cluster:
    first: RuntimeServer  # where the tenants' files are written and documents created
    second: Replica
    settings: RuntimeSettings
    redis_url: str
    a: str
    b: str
    admin_dsn: str  # the database's owner, as the operator and `tenantry` connect

    @property
    def stub(self) -> StubState:
        return self.first.stub

    def key(self, tenant: str) -> str:
        return self.first.keys[tenant]["main"]

    def http(self, tenant: str) -> httpx.Client:
        return httpx.Client(base_url=self.first.url, headers={"x-api-key": self.key(tenant)},
                            timeout=60)

    def sdk(self, tenant: str, replica: Replica) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=replica.url, api_key=self.key(tenant),
                                   max_retries=0)

    def add_document(self, tenant: str, text: str) -> str:
        with self.http(tenant) as client:
            created = client.post("/v1/documents", json={"text": text})
        assert created.status_code == 201, created.text
        return str(created.json()["id"])

    @contextmanager
    def replica(self) -> Iterator[Replica]:
        """Another runtime on the same tenants, Redis and database (or a restarted one)."""
        store = TenantStore()
        app = create_app(self.settings, store)
        with serve(app) as url:
            wait_for(lambda: all(store.get(t) == self.first.store.get(t) for t in (
                self.a, self.b)), 10, "the replica to load the tenants")
            yield Replica(url, app)


@pytest.fixture(scope="module")
def cluster(postgres: Postgres, redis_server: Redis, workdir: Path,
            upstream_stub: tuple[str, StubState]) -> Iterator[Cluster]:
    app_user, app_password = unique("rtreg"), secrets.token_urlsafe(12)
    a, b = unique("rega"), unique("regb")
    try:
        with scratch_database(postgres, "registry") as db, connect(postgres, db) as admin:
            bootstrap_shared(admin)
            create_login_role(admin, app_user, app_password, APP_ROLE)
            for tenant in (a, b):
                ensure_pool_tenant(admin, tenant)
                ensure_collection(admin, tenant, "shared", 384, 16, 64)
            tenants_dir = workdir / "registry-tenants"
            tenants_dir.mkdir()
            stub_url, stub = upstream_stub
            settings = RuntimeSettings(
                tenants_dir=tenants_dir, config_poll_seconds=0.1,
                redis_url=SecretStr(redis_server.url), upstream_url=stub_url,
                upstream_api_key=SecretStr(UPSTREAM_KEY), upstream_retries=0,
                database_url=SecretStr(postgres.dsn(db, app_user, app_password)))
            store = TenantStore()
            app = create_app(settings, store)
            with serve(app) as url:
                first = RuntimeServer(url, tenants_dir, redis_server.url, stub, store, app)
                tenants = RagTenants(first)
                tenants.pool(a)
                tenants.pool(b)
                cluster = Cluster(first, Replica("", None), settings, redis_server.url, a, b,
                                  postgres.dsn(db))
                with cluster.replica() as second:
                    cluster.second = second
                    yield cluster
    finally:
        drop_roles(postgres, [app_user])


@contextmanager
def deltas_of(stub: StubState, chars: int) -> Iterator[None]:
    stub.delta_chars = chars
    try:
        yield
    finally:
        stub.delta_chars = None


def ask(client: anthropic.Anthropic, question: str) -> tuple[str, str]:
    """The answer to `question`, non-streaming and streamed."""
    whole = client.messages.create(model=MODEL, max_tokens=64, extra_headers=RAG_OFF,
                                   messages=[{"role": "user", "content": question}])
    with client.messages.stream(model=MODEL, max_tokens=64, extra_headers=RAG_OFF,
                                messages=[{"role": "user", "content": question}]) as stream:
        streamed = stream.get_final_text()
    assert whole.content[0].type == "text"
    return whole.content[0].text, streamed


def owner_in_redis(cluster: Cluster, document_id: str) -> str | None:
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        owner = client.hget(DOCUMENT_OWNERS, document_id)
    finally:
        client.close()
    return owner.decode() if isinstance(owner, bytes) else None


def test_a_document_created_on_one_replica_is_redacted_on_another(cluster: Cluster) -> None:
    theirs = cluster.add_document(cluster.b, "The other tenant's contract.")
    mine = cluster.add_document(cluster.a, "My own notes.")
    assert owner_in_redis(cluster, theirs) == cluster.b
    assert owner_in_redis(cluster, mine) == cluster.a
    second = cluster.second
    assert theirs not in second.sanitizer.documents  # never seen by this replica
    # Its failures are the runtime's (tenantry_runtime_failures_total{reason}).
    registry = second.sanitizer.registry
    assert registry is not None
    assert registry.failures is second.app.state.runtime.failures  # type: ignore[attr-defined]
    before = second.sanitizer.redactions["document_id"]
    client = cluster.sdk(cluster.a, second)
    question = f"compare {theirs} with {mine} please"
    expected = f"echo: compare {REDACTED} with {mine} please"
    assert ask(client, question) == (expected, expected)
    # Split across deltas of 5 characters: no piece of it reaches the client.
    with deltas_of(cluster.stub, 5):
        assert ask(client, f"{mine}{theirs.upper()} end") == (
            f"echo: {mine}{REDACTED} end", f"echo: {mine}{REDACTED} end")
    assert second.sanitizer.redactions["document_id"] - before == 4
    scraped = httpx.get(f"{second.url}/metrics", timeout=10).text
    assert re.search(r'^tenantry_runtime_redactions_total\{kind="document_id"\} ' +
                     str(second.sanitizer.redactions["document_id"]) + r"(\.0)?$", scraped,
                     re.MULTILINE), scraped
    # Tenant B reads its own id on the replica that learnt it is B's.
    assert ask(cluster.sdk(cluster.b, second), question) == (
        f"echo: compare {theirs} with {REDACTED} please",) * 2


def test_a_restarted_replica_still_redacts_and_a_deleted_document_is_forgotten(
        cluster: Cluster) -> None:
    theirs = cluster.add_document(cluster.b, "Another document of the other tenant.")
    question = f"what is {theirs}?"
    redacted, plain = f"echo: what is {REDACTED}?", f"echo: what is {theirs}?"
    with cluster.replica() as fresh:
        assert len(fresh.sanitizer.documents) == 0
        with deltas_of(cluster.stub, 7):
            assert ask(cluster.sdk(cluster.a, fresh), question) == (redacted, redacted)
    assert ask(cluster.sdk(cluster.a, cluster.second), question) == (redacted, redacted)
    # Deleted through the first replica: gone from the registry, so a replica that never saw
    # it no longer redacts the (now meaningless) id; one that saw it still does (it was
    # another tenant's id; docs/runtime.md).
    with cluster.http(cluster.b) as client:
        assert client.delete(f"/v1/documents/{theirs}").status_code == 200
    assert owner_in_redis(cluster, theirs) is None
    keys = redis.Redis.from_url(cluster.redis_url)
    try:
        assert not keys.sismember(TenantKeys(cluster.b).documents, theirs)
    finally:
        keys.close()
    with cluster.replica() as third:
        assert ask(cluster.sdk(cluster.a, third), question) == (plain, plain)
    assert ask(cluster.sdk(cluster.a, cluster.second), question) == (redacted, redacted)


def test_a_document_the_database_does_not_store_leaves_no_registry_entry(
        cluster: Cluster) -> None:
    broken = unique("regbr")
    RagTenants(cluster.first).bridge(broken, "postgresql://nobody:x@127.0.0.1:1/none")
    keys = redis.Redis.from_url(cluster.redis_url)
    try:
        with cluster.http(broken) as client:
            refused = client.post("/v1/documents", json={"text": "never stored"})
        assert refused.status_code == 503, refused.text
        assert keys.scard(TenantKeys(broken).documents) == 0
        owners = {value.decode() for value in keys.hvals(DOCUMENT_OWNERS)}
        assert broken not in owners
    finally:
        keys.close()


def test_backfill_registers_older_documents_and_drops_gone_ones(cluster: Cluster) -> None:
    """`tenantry documents backfill`'s work (tenantry_cli.documents) on this database: the
    CLI around it is tested in tests/test_cli.py."""
    older = [str(uuid.uuid4()) for _ in range(5)]
    neighbours = [str(uuid.uuid4()) for _ in range(3)]
    lingering = str(uuid.uuid4())  # deleted while Redis was away
    with psycopg.connect(cluster.admin_dsn, autocommit=True) as admin:
        for tenant, ids in ((cluster.b, older), (cluster.a, neighbours)):
            with tenant_transaction(admin, tenant):
                for document_id in ids:
                    admin.execute("INSERT INTO tenantry.documents (id, tenant_id, content)"
                                  " VALUES (%s, %s, 'from before the registry')",
                                  (document_id, tenant))
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        client.hset(DOCUMENT_OWNERS, lingering, cluster.b)
        client.sadd(TenantKeys(cluster.b).documents, lingering)
        question = f"{older[0]} {lingering}"
        assert ask(cluster.sdk(cluster.a, cluster.second), question) == (
            f"echo: {older[0]} {REDACTED}",) * 2  # the replica learns `lingering` only
        registered = set(client.smembers(TenantKeys(cluster.b).documents))
        with psycopg.connect(cluster.admin_dsn, autocommit=True) as conn, \
                tenant_transaction(conn, cluster.b):
            documents, added, dropped = sync_tenant(
                client, cluster.b, document_ids(conn, SHARED_SCHEMA, cluster.b, batch=2))
        assert (added, dropped) == (5, 1)
        assert documents == len(registered) - 1 + 5
        assert client.hmget(DOCUMENT_OWNERS, [*older, lingering, *neighbours]) == [
            cluster.b.encode()] * 5 + [None] * 4
        with psycopg.connect(cluster.admin_dsn, autocommit=True) as conn, \
                tenant_transaction(conn, cluster.b):
            again = sync_tenant(client, cluster.b, document_ids(conn, SHARED_SCHEMA,
                                                                  cluster.b))
        assert again == (documents, 0, 0)  # idempotent
    finally:
        client.close()
    with cluster.replica() as fresh:
        assert ask(cluster.sdk(cluster.a, fresh), question) == (
            f"echo: {REDACTED} {lingering}",) * 2
