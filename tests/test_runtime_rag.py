"""RAG end to end: documents, search, context in /v1/messages, conversations and sanitizing,
through the runtime (uvicorn) as the tenant, against the embedded Postgres (pgvector, RLS, the
runtime's login a member of APP_ROLE, a bridge tenant's own login), redis-server, the local
model endpoint and the official anthropic SDK."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import psycopg
import pytest
from db_helpers import connect, create_login_role, drop_roles, scratch_database, unique
from psycopg import sql
from pydantic import SecretStr
from rag_helpers import RagTenants
from runtime_helpers import MODEL, UPSTREAM_KEY, RuntimeServer, serve
from tenantry_devenv.services import Postgres, Redis
from tenantry_operator.database import (
    bootstrap_shared,
    ensure_bridge_tenant,
    ensure_collection,
    ensure_pool_tenant,
)
from tenantry_runtime.app import create_app
from tenantry_runtime.contracts.database import APP_ROLE, bridge_role, bridge_schema
from tenantry_runtime.embeddings import LocalMiniLM
from tenantry_runtime.rag import Rag
from tenantry_runtime.sanitize import REDACTED
from tenantry_runtime.settings import RuntimeSettings
from tenantry_runtime.store import TenantStore
from tenantry_runtime.upstream_stub import StubState

pytestmark = pytest.mark.timeout(180)


@dataclass
class World:
    server: RuntimeServer
    tenants: RagTenants
    admin: psycopg.Connection[Any]
    a: str
    b: str
    bridge: str

    def key(self, tenant: str) -> str:
        return self.server.keys[tenant]["main"]

    def http(self, tenant: str) -> httpx.Client:
        return httpx.Client(base_url=self.server.url, headers={"x-api-key": self.key(tenant)},
                            timeout=60)

    def sdk(self, tenant: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.server.url, api_key=self.key(tenant),
                                   max_retries=0)

    @property
    def stub(self) -> StubState:
        return self.server.stub

    def add_document(self, tenant: str, text: str, title: str = "", **extra: Any) -> str:
        with self.http(tenant) as client:
            answer = client.post("/v1/documents", json={"text": text, "title": title, **extra})
        assert answer.status_code == 201, answer.text
        return str(answer.json()["id"])

    def rows(self, table: str, tenant: str, column: str = "id") -> list[str]:
        schema, name = table.split(".")
        return [str(r[0]) for r in self.admin.execute(sql.SQL(
            "SELECT {} FROM {} WHERE tenant_id = %s ORDER BY 1").format(
            sql.Identifier(column), sql.Identifier(schema, name)), (tenant,)).fetchall()]


@pytest.fixture(scope="module")
def world(postgres: Postgres, redis_server: Redis, workdir: Path,
          upstream_stub: tuple[str, StubState]) -> Iterator[World]:
    roles: list[str] = []
    app_user, app_password = unique("rtrag"), secrets.token_urlsafe(12)
    a, b, bridge = unique("raga"), unique("ragb"), unique("ragbr")
    try:
        with scratch_database(postgres, "rag") as db, connect(postgres, db) as admin:
            bootstrap_shared(admin)
            create_login_role(admin, app_user, app_password, APP_ROLE)
            roles.append(app_user)
            for tenant in (a, b):
                ensure_pool_tenant(admin, tenant)
                ensure_collection(admin, tenant, "shared", 384, 16, 64)
            bridge_password = secrets.token_urlsafe(12)
            roles.append(bridge_role(bridge))
            ensure_bridge_tenant(admin, bridge, bridge_password)
            ensure_pool_tenant(admin, bridge, "bridge")
            ensure_collection(admin, bridge, "schema", 384, 16, 64)
            # A directory per use: test_runtime_hostile.py builds this world too.
            tenants_dir = Path(tempfile.mkdtemp(prefix="rag-tenants-", dir=workdir))
            stub_url, stub = upstream_stub
            settings = RuntimeSettings(
                tenants_dir=tenants_dir, config_poll_seconds=0.1,
                redis_url=SecretStr(redis_server.url), upstream_url=stub_url,
                upstream_api_key=SecretStr(UPSTREAM_KEY), upstream_retries=0,
                database_url=SecretStr(postgres.dsn(db, app_user, app_password)),
                max_concurrent_per_tenant=1000)
            store = TenantStore()
            app = create_app(settings, store)
            with serve(app) as url:
                server = RuntimeServer(url, tenants_dir, redis_server.url, stub, store, app)
                tenants = RagTenants(server)
                tenants.pool(a)
                tenants.pool(b)
                tenants.bridge(bridge, postgres.dsn(db, bridge_role(bridge), bridge_password))
                yield World(server, tenants, admin, a, b, bridge)
    finally:
        drop_roles(postgres, roles)


def rag_of(world: World) -> Rag:
    return world.server.app.state.rag  # type: ignore[no-any-return]


def test_documents_are_chunked_embedded_listed_and_searched(world: World) -> None:
    long_text = " ".join(f"Paragraph {n} explains how budgets reset at midnight UTC."
                         for n in range(60))
    passwords = world.add_document(world.a, "To reset a forgotten password, open Settings, "
                                   "choose Security and click 'Send reset link'.",
                                   title="Password help", metadata={"lang": "en"})
    recipe = world.add_document(world.a, "Bake the bread: two cups of flour, one egg, 200 ml "
                                "of milk, 35 minutes at 180 degrees.", title="Bread")
    budgets = world.add_document(world.a, long_text, title="Budgets")
    chunks = world.rows("tenantry.tenant_embeddings_d384", world.a, "document_id")
    assert chunks.count(budgets) == len(chunks) - 2 > 3  # the long one in several chunks
    with world.http(world.a) as client:
        first = client.get("/v1/documents", params={"limit": 2}).json()
        rest = client.get("/v1/documents", params={"after_id": first["last_id"]}).json()
        hits = client.post("/v1/search", json={"query": "I forgot my password, how do I change "
                                               "it?", "top_k": 3}).json()["data"]
    assert [d["id"] for d in first["data"] + rest["data"]] == [passwords, recipe, budgets]
    assert first["has_more"] and not rest["has_more"]
    assert first["data"][0]["title"] == "Password help"
    assert first["data"][0]["metadata"] == {"lang": "en"}
    assert len(hits) == 3 and hits[0]["document_id"] == passwords
    assert hits[0]["title"] == "Password help"
    assert hits[0]["score"] > hits[1]["score"] + 0.2


def test_the_context_reaches_the_model_with_its_document_ids_and_the_tenants_prompt(
        world: World) -> None:
    mine = world.add_document(world.a, "The launch code of project Falcon is PURPLE-HIPPO-42.",
                              title="Falcon")
    theirs = world.add_document(world.b, "The launch code of project Falcon is ORANGE-WALRUS-7.",
                                title="Falcon")
    client = world.sdk(world.a)
    client.messages.create(model=MODEL, max_tokens=64, system="be brief", messages=[
        {"role": "user", "content": "What is the launch code of project Falcon?"}])
    sent = world.stub.received[-1].body
    assert sent["system"].startswith("be brief\n\n")
    assert f'<document id="{mine}">' in sent["system"] and "PURPLE-HIPPO-42" in sent["system"]
    assert sent["messages"] == [{"role": "user",
                                 "content": "What is the launch code of project Falcon?"}]
    with client.messages.stream(model=MODEL, max_tokens=64, system=[
            {"type": "text", "text": "be kind"}], messages=[
            {"role": "user", "content": "launch code for Falcon?"}]) as stream:
        stream.get_final_message()
    streamed = world.stub.received[-1]
    assert streamed.body["system"][0] == {"type": "text", "text": "be kind"}
    assert mine in streamed.body["system"][1]["text"]
    assert not any(name.startswith("tenantry-") for name in streamed.headers)
    # B's call carries B's context only; A's calls never carried B's.
    world.sdk(world.b).messages.create(model=MODEL, max_tokens=64, messages=[
        {"role": "user", "content": "What is the launch code of project Falcon?"}])
    b_sent = world.stub.received[-1].body["system"]
    assert theirs in b_sent and "ORANGE-WALRUS-7" in b_sent and mine not in b_sent
    for received in world.stub.received:
        if mine in str(received.body):
            assert theirs not in str(received.body) and "ORANGE-WALRUS" not in str(received.body)


def test_rag_off_per_request_sends_the_request_unchanged(world: World) -> None:
    world.add_document(world.a, "Opting out keeps the request as the app wrote it.")
    body = {"model": MODEL, "max_tokens": 32, "system": "be brief",
            "messages": [{"role": "user", "content": "opting out?"}]}
    with world.http(world.a) as client:
        answer = client.post("/v1/messages", json=body, headers={"tenantry-rag": "off"})
        bad = client.post("/v1/messages", json=body, headers={"tenantry-rag": "maybe"})
    assert answer.status_code == 200
    assert world.stub.received[-1].body == body
    assert bad.status_code == 400 and "tenantry-rag" in bad.json()["error"]["message"]


def test_cross_tenant_documents_search_and_delete_are_invisible(world: World) -> None:
    secret = world.add_document(world.b, "Zebra migration notes: the herd crosses in March.",
                                title="Zebras")
    with world.http(world.a) as client:
        assert client.delete(f"/v1/documents/{secret}").status_code == 404
        listed = client.get("/v1/documents", params={"limit": 100}).json()["data"]
        after = client.get("/v1/documents", params={"after_id": secret}).json()["data"]
        hits = client.post("/v1/search", json={"query": "zebra herd migration in March",
                                               "top_k": 50}).json()["data"]
    assert secret not in [d["id"] for d in listed] and after == []
    assert secret not in [h["document_id"] for h in hits]
    assert all(h["document_id"] in [d["id"] for d in listed] for h in hits)
    assert secret in world.rows("tenantry.documents", world.b)  # untouched
    world.sdk(world.a).messages.create(model=MODEL, max_tokens=32, messages=[
        {"role": "user", "content": "zebra herd migration in March"}])
    assert secret not in str(world.stub.received[-1].body)
    assert "Zebra migration" not in str(world.stub.received[-1].body)


def test_delete_removes_the_document_and_its_chunks(world: World) -> None:
    doomed = world.add_document(world.a, "A document that will be deleted soon.")
    assert doomed in world.rows("tenantry.tenant_embeddings_d384", world.a, "document_id")
    with world.http(world.a) as client:
        gone = client.delete(f"/v1/documents/{doomed}")
        again = client.delete(f"/v1/documents/{doomed}")
        malformed = client.delete("/v1/documents/not-a-uuid")
    assert gone.json() == {"type": "document_deleted", "id": doomed}
    assert again.status_code == 404 and malformed.status_code == 404
    assert doomed not in world.rows("tenantry.documents", world.a)
    assert doomed not in world.rows("tenantry.tenant_embeddings_d384", world.a, "document_id")


def test_wrong_dimensions_and_a_disabled_collection_are_400_saying_why(world: World) -> None:
    wide, plain = unique("ragwide"), unique("ragplain")
    world.tenants.pool(wide, dimensions=768)
    world.tenants.add(plain)  # RAG disabled
    with world.http(wide) as client:
        answer = client.post("/v1/documents", json={"text": "some text"})
        search = client.post("/v1/search", json={"query": "some text"})
    assert answer.status_code == 400 == search.status_code
    message = answer.json()["error"]["message"]
    assert "384 dimensions" in message and "768" in message and "embeddingDimensions" in message
    with world.http(plain) as client:
        refused = [client.post("/v1/documents", json={"text": "x"}),
                   client.post("/v1/search", json={"query": "x"}),
                   client.post("/v1/messages", headers={"tenantry-rag": "on"}, json={
                       "model": MODEL, "max_tokens": 8,
                       "messages": [{"role": "user", "content": "x"}]})]
        plain_message = client.post("/v1/messages", json={
            "model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]})
    for response in refused:
        assert response.status_code == 400
        assert "RAG is disabled for this tenant" in response.json()["error"]["message"]
    assert plain_message.status_code == 200
    with world.http(world.a) as client:
        bad = [client.post("/v1/documents", json={"text": ""}),
               client.post("/v1/documents", json={"text": "x", "metadata": []}),
               client.post("/v1/search", json={"query": "x", "top_k": 0}),
               client.get("/v1/documents", params={"after_id": "nope"})]
    assert [r.status_code for r in bad] == [400, 400, 400, 400]


def test_conversation_turns_are_stored_and_only_their_tenant_reads_them(world: World) -> None:
    conversation = str(uuid.uuid4())
    headers = {"tenantry-conversation-id": conversation, "tenantry-end-user": "user-17"}
    client = world.sdk(world.a)
    client.messages.create(model=MODEL, max_tokens=32, extra_headers=headers, messages=[
        {"role": "user", "content": "first question"}])
    with client.messages.stream(model=MODEL, max_tokens=32, extra_headers=headers, messages=[
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "echo: first question"},
            {"role": "user", "content": "second question"}]) as stream:
        stream.get_final_message()
    with world.http(world.a) as mine:
        stored = mine.get(f"/v1/conversations/{conversation}").json()
        other_user = mine.get(f"/v1/conversations/{conversation}",
                              headers={"tenantry-end-user": "user-99"})
        half = mine.post("/v1/messages", headers={"tenantry-conversation-id": conversation},
                         json={"model": MODEL, "max_tokens": 8,
                               "messages": [{"role": "user", "content": "x"}]})
        malformed = mine.post("/v1/messages", headers={**headers,
                                                       "tenantry-conversation-id": "nope"},
                              json={"model": MODEL, "max_tokens": 8,
                                    "messages": [{"role": "user", "content": "x"}]})
    turns = [(t["role"], t["content"]) for t in stored["messages"]]
    assert turns == [
        ("user", "first question"),
        ("assistant", [{"type": "text", "text": "echo: first question"}]),
        ("user", "second question"),
        ("assistant", "echo: second question")]
    assert stored["end_users"] == ["user-17"] and stored["model"] == MODEL
    assert other_user.status_code == 404
    assert half.status_code == 400 and malformed.status_code == 400
    with world.http(world.b) as theirs:
        assert theirs.get(f"/v1/conversations/{conversation}").status_code == 404
    # metadata.user_id names the end user too.
    second = str(uuid.uuid4())
    client.messages.create(model=MODEL, max_tokens=32, metadata={"user_id": "u-meta"},
                           extra_headers={"tenantry-conversation-id": second},
                           messages=[{"role": "user", "content": "via metadata"}])
    with world.http(world.a) as mine:
        assert mine.get(f"/v1/conversations/{second}").json()["end_users"] == ["u-meta"]


def test_other_tenants_names_and_document_ids_are_redacted_from_answers(world: World) -> None:
    theirs = world.add_document(world.b, "A document of the other tenant.")
    sanitizer = rag_of(world).sanitizer
    before = dict(sanitizer.redactions)
    question = f"Tell {world.a} about {world.b} and document {theirs} please"
    client = world.sdk(world.a)
    message = client.messages.create(model=MODEL, max_tokens=64, extra_headers={
        "tenantry-rag": "off"}, messages=[{"role": "user", "content": question}])
    expected = f"echo: Tell {world.a} about {REDACTED} and document {REDACTED} please"
    assert message.content[0].text == expected
    with client.messages.stream(model=MODEL, max_tokens=64, extra_headers={
            "tenantry-rag": "off"}, messages=[{"role": "user", "content": question}]) as stream:
        assert stream.get_final_text() == expected
    assert sanitizer.redactions["tenant_name"] == before.get("tenant_name", 0) + 2
    assert sanitizer.redactions["document_id"] == before.get("document_id", 0) + 2
    # A tool call's input is redacted the same way, whole or streamed.
    tools = [{"name": "lookup", "description": "Look up a record.", "input_schema": {
        "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}]
    asked = client.messages.create(model=MODEL, max_tokens=64, tools=tools,
                                   extra_headers={"tenantry-rag": "off"},
                                   messages=[{"role": "user", "content": question}])
    redacted_question = f"Tell {world.a} about {REDACTED} and document {REDACTED} please"
    assert [b.input for b in asked.content if b.type == "tool_use"] == [
        {"query": redacted_question}]
    with client.messages.stream(model=MODEL, max_tokens=64, tools=tools,
                                extra_headers={"tenantry-rag": "off"},
                                messages=[{"role": "user", "content": question}]) as stream:
        final = stream.get_final_message()
    assert [b.input for b in final.content if b.type == "tool_use"] == [
        {"query": redacted_question}]
    # The tenant's own document id is never redacted.
    mine = world.add_document(world.a, "My own document.")
    own = client.messages.create(model=MODEL, max_tokens=64, extra_headers={
        "tenantry-rag": "off"}, messages=[{"role": "user", "content": f"see {mine}"}])
    assert own.content[0].text == f"echo: see {mine}"


def test_a_bridge_tenant_is_served_through_its_own_login_and_schema(world: World) -> None:
    document = world.add_document(world.bridge, "Bridge tenants keep their rows in their own "
                                  "schema, reached through their own login.", title="Bridge")
    schema = bridge_schema(world.bridge)
    assert world.rows(f"{schema}.documents", world.bridge) == [document]
    assert world.rows(f"{schema}.embeddings", world.bridge, "document_id") == [document]
    assert document not in world.rows("tenantry.documents", world.bridge)
    with world.http(world.bridge) as client:
        hits = client.post("/v1/search", json={"query": "own schema and login"}).json()["data"]
        listed = client.get("/v1/documents").json()["data"]
    assert [h["document_id"] for h in hits] == [document]
    assert [d["id"] for d in listed] == [document]
    world.sdk(world.bridge).messages.create(model=MODEL, max_tokens=32, messages=[
        {"role": "user", "content": "where are bridge rows kept?"}])
    assert document in world.stub.received[-1].body["system"]
    with world.http(world.a) as client:
        assert client.delete(f"/v1/documents/{document}").status_code == 404


def test_an_unreachable_tenant_database_is_a_clear_503(world: World) -> None:
    lost = unique("raglost")
    world.tenants.bridge(lost, "postgresql://nobody:x@127.0.0.1:9/tenantry")
    with world.http(lost) as client:
        answer = client.post("/v1/search", json={"query": "anything"})
        chat = client.post("/v1/messages", json={
            "model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]})
    for response in (answer, chat):
        assert response.status_code == 503, response.text
        assert "database is unreachable" in response.json()["error"]["message"]
    assert chat.headers["retry-after"] == "1"


def test_a_write_during_an_isolation_move_retries_with_the_reloaded_config(
        world: World) -> None:
    moving = unique("ragmove")
    ensure_pool_tenant(world.admin, moving)
    ensure_collection(world.admin, moving, "shared", 384, 16, 64)
    world.tenants.pool(moving)

    def registry(isolation: str) -> None:
        world.admin.execute("UPDATE tenantry.tenants SET isolation = %s WHERE tenant_id = %s",
                            (isolation, moving))

    # The registry says the data moved; the runtime's config still says pool: refused, clearly.
    registry("bridge")
    with world.http(moving) as client:
        refused = client.post("/v1/documents", json={"text": "written during a move"})
    assert refused.status_code == 503 and "moving" in refused.json()["error"]["message"]
    assert world.rows("tenantry.documents", moving) == []
    # The config catches up while the write is retrying: it lands, once.
    timer = threading.Timer(0.6, registry, ("pool",))
    timer.start()
    started = time.monotonic()
    with world.http(moving) as client:
        landed = client.post("/v1/documents", json={"text": "written after the move"})
    timer.join()
    assert landed.status_code == 201 and time.monotonic() - started > 0.5
    assert world.rows("tenantry.documents", moving) == [landed.json()["id"]]
    assert rag_of(world).databases.failures["tenant_moved"] >= 5


def model_files_open() -> int:
    """This process's descriptors open on a local embedding model's weights file."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile (the listing's own descriptor)
            count += os.readlink(f"/proc/self/fd/{fd}").endswith("model.safetensors")
    return count


def test_app_shutdown_closes_the_local_models_thread_and_file(world: World,
                                                                tmp_path: Path) -> None:
    """A runtime of its own over the same database: after its lifespan ends, the thread its
    in-process model embedded on has ended and the weights file that model read is closed."""
    settings = rag_of(world).settings.model_copy(update={"tenants_dir": tmp_path})
    before = set(threading.enumerate())
    store = TenantStore()
    app = create_app(settings, store)
    with serve(app) as url:
        server = RuntimeServer(url, tmp_path, world.server.redis_url, world.stub, store, app)
        key = RagTenants(server).pool(world.a)
        with httpx.Client(base_url=url, headers={"x-api-key": key}, timeout=60) as client:
            hits = client.post("/v1/search", json={"query": "how do budgets reset?"})
        assert hits.status_code == 200, hits.text
        model = app.state.rag.embedder
        assert isinstance(model, LocalMiniLM)
        file = model.load().words.file
        threads = [t for t in set(threading.enumerate()) - before
                   if t.name.startswith("embeddings")]
        assert len(threads) == 1 and threads[0].is_alive()
        opened = model_files_open()
        assert opened >= 1 and not file.closed
    assert not threads[0].is_alive()
    assert file.closed and model_files_open() == opened - 1
