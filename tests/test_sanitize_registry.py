"""The sanitizer's shared document registry against a real redis-server: UUID-prefix hold-back,
lookups before a delta is sent, clean streams untouched and free, Redis unavailable, and the
operator dropping a deleted tenant's ids. End to end through two runtimes:
tests/test_runtime_document_registry.py."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from redis.asyncio import Redis
from tenantry_devenv.services import Redis as RedisServer
from tenantry_operator.quotas import delete_tenant_keys, forget_documents
from tenantry_runtime.contracts.redis_keys import DOCUMENT_OWNERS, TenantKeys
from tenantry_runtime.document_registry import DocumentRegistry
from tenantry_runtime.resp import PipelinedRedis
from tenantry_runtime.sanitize import REDACTED, Sanitizer, StreamRewriter, could_begin_uuid
from tenantry_runtime.upstream_stub import StubState, answer, stream_events
from test_runtime_embeddings import sanitizer_for

ID = "0b9a3c7e-1111-4222-8333-444455556666"


@pytest.mark.parametrize("text", ["0", "0b9a3c7e", "0b9a3c7e-", "0b9a3c7e-11", "0B9A3C7E-1111-4",
                                  ID[:-1], "f", "cafe", "2026"])
def test_every_proper_prefix_of_a_uuid_could_begin_one(text: str) -> None:
    assert could_begin_uuid(text)


@pytest.mark.parametrize("text", ["", ID, "0b9a3c7e1", "0b9a3c7-", "0b9a3c7e--", "g", "x0b9",
                                  "0b9a3c7e-111-", "the"])
def test_whole_uuids_and_non_hex_words_are_not_held(text: str) -> None:
    assert not could_begin_uuid(text)


@pytest.fixture
def registry(pipelined_redis: PipelinedRedis) -> DocumentRegistry:
    return DocumentRegistry(pipelined_redis)


def with_registry(registry: DocumentRegistry, *tenants: str) -> Sanitizer:
    sanitizer = sanitizer_for(*tenants)
    sanitizer.registry = registry
    return sanitizer


def texts_of(out: bytes) -> list[str]:
    return [json.loads(line[5:])["delta"]["text"] for line in out.split(b"\n")
            if line.startswith(b"data:") and b"text_delta" in line]


def events_for(question: str, delta_chars: int | None = None) -> list[bytes]:
    message = answer({"model": "m", "max_tokens": 50, "messages": [
        {"role": "user", "content": question}]}, StubState())
    return stream_events(message, delta_chars)


async def rewritten(rewriter: StreamRewriter, events: list[bytes]) -> bytes:
    out = b"".join([await rewriter.rewrite(event) for event in events])
    return out + rewriter.flush()


async def test_a_foreign_id_split_over_many_deltas_is_redacted_after_one_lookup(
        registry: DocumentRegistry) -> None:
    foreign, own = str(uuid.uuid4()), str(uuid.uuid4())
    assert await registry.register("globex", [foreign])
    assert await registry.register("acme", [own])
    sanitizer = with_registry(registry, "acme", "globex")
    events = events_for(f"see {foreign} and {own} ok", delta_chars=3)
    assert sum(b"text_delta" in e for e in events) > 20  # each id over 12 deltas
    before = registry.lookups
    rewriter = StreamRewriter(sanitizer, "acme", "req_split")
    out = await rewritten(rewriter, events)
    assert "".join(texts_of(out)) == f"echo: see {REDACTED} and {own} ok"
    assert rewriter.answer_text() == f"echo: see {REDACTED} and {own} ok"
    # No delta ever carried a piece of the foreign id; each id was asked about once.
    assert not any(foreign[:8] in text or foreign[-12:] in text for text in texts_of(out))
    assert registry.lookups - before == 2
    assert sanitizer.redactions["document_id"] == 1
    # Known now: the next answer naming them asks Redis nothing.
    again = await rewritten(StreamRewriter(sanitizer, "acme", "req_again"),
                            events_for(f"{foreign} {own}", delta_chars=5))
    assert "".join(texts_of(again)) == f"echo: {REDACTED} {own}"
    assert registry.lookups - before == 2


async def test_an_unregistered_uuid_is_asked_once_and_kept(registry: DocumentRegistry) -> None:
    sanitizer = with_registry(registry, "acme", "globex")
    stranger = str(uuid.uuid4())
    before = registry.lookups
    out = await rewritten(StreamRewriter(sanitizer, "acme", "req_u"),
                          events_for(f"a {stranger} b {stranger.upper()}", delta_chars=7))
    assert "".join(texts_of(out)) == f"echo: a {stranger} b {stranger.upper()}"
    assert registry.lookups - before == 1


async def test_a_clean_stream_passes_byte_for_byte_without_asking_redis(
        registry: DocumentRegistry) -> None:
    sanitizer = with_registry(registry, "acme", "globex")
    events = events_for("nothing to see here, move along")
    before = registry.lookups
    assert await rewritten(StreamRewriter(sanitizer, "acme", "req_c"), events) == b"".join(
        events)
    assert registry.lookups == before


async def test_a_hex_like_tail_is_held_one_delta_and_the_text_is_unchanged(
        registry: DocumentRegistry) -> None:
    sanitizer = with_registry(registry, "acme", "globex")
    events = events_for("buy a cafe 2026 now")
    before = registry.lookups
    out = await rewritten(StreamRewriter(sanitizer, "acme", "req_h"), events)
    assert "".join(texts_of(out)) == "echo: buy a cafe 2026 now"
    assert " a" not in texts_of(out)  # held, sent with what followed
    assert registry.lookups == before


async def test_a_non_streaming_answer_is_resolved_with_one_hmget(
        registry: DocumentRegistry) -> None:
    foreign, other = str(uuid.uuid4()), str(uuid.uuid4())
    await registry.register("globex", [foreign, other])
    sanitizer = with_registry(registry, "acme", "globex")
    body = json.dumps({"content": [{"type": "text", "text": f"see {foreign}"},
                                   {"type": "tool_use", "input": {"q": other}}]}).encode()
    before = registry.lookups
    await sanitizer.resolve(body)
    redacted = json.loads(sanitizer.redact_message(body, "acme", "req_n"))
    assert redacted["content"] == [{"type": "text", "text": f"see {REDACTED}"},
                                   {"type": "tool_use", "input": {"q": REDACTED}}]
    assert registry.lookups - before == 1
    # The owner reads its own ids unredacted.
    assert sanitizer.redact_message(body, "globex", "req_o") == body
    clean = b'{"content": [{"type": "text", "text": "no ids"}]}'
    await sanitizer.resolve(clean)
    assert registry.lookups - before == 1


async def test_a_tool_input_with_an_unresolved_id_waits_for_the_lookup(
        registry: DocumentRegistry) -> None:
    foreign = str(uuid.uuid4())
    await registry.register("globex", [foreign])
    sanitizer = with_registry(registry, "acme", "globex")
    tool = {"name": "lookup", "input_schema": {"type": "object", "properties": {
        "query": {"type": "string"}}, "required": ["query"]}}
    events = stream_events(answer({"model": "m", "max_tokens": 50, "tools": [tool], "messages": [
        {"role": "user", "content": f"find {foreign}"}]}, StubState()))
    out = await rewritten(StreamRewriter(sanitizer, "acme", "req_t"), events)
    (delta,) = [json.loads(line[5:]) for line in out.split(b"\n")
                if line.startswith(b"data:") and b"input_json_delta" in line]
    assert json.loads(delta["delta"]["partial_json"]) == {"query": f"find {REDACTED}"}


async def test_without_redis_the_replicas_own_set_decides_and_it_is_counted(
        redis_server: RedisServer) -> None:
    dead = PipelinedRedis("redis://127.0.0.1:1", 1)
    registry = DocumentRegistry(dead)
    sanitizer = with_registry(registry, "acme", "globex")
    known, unknown = str(uuid.uuid4()), str(uuid.uuid4())
    sanitizer.documents.add("globex", known)
    out = await rewritten(StreamRewriter(sanitizer, "acme", "req_d"),
                          events_for(f"{known} {unknown}", delta_chars=4))
    assert "".join(texts_of(out)) == f"echo: {REDACTED} {unknown}"
    assert registry.failures["document_registry_unavailable"] == 1
    assert not await registry.register("acme", [unknown])
    assert not await registry.forget("acme", [unknown])
    assert registry.failures["document_register_failed"] == 1
    assert registry.failures["document_forget_failed"] == 1
    await dead.aclose()


async def test_deleting_a_tenant_with_its_data_forgets_its_ids_only(
        redis_server: RedisServer, registry: DocumentRegistry) -> None:
    mine = [str(uuid.uuid4()) for _ in range(2500)]  # more than one SSCAN batch
    neighbour = str(uuid.uuid4())
    await registry.register("regdel", mine)
    await registry.register("regdel2", [neighbour])
    client = Redis.from_url(redis_server.url)
    try:
        # Retain keeps the documents, so their registry entries stay.
        await delete_tenant_keys(client, "regdel")
        assert await client.hget(DOCUMENT_OWNERS, mine[0]) == b"regdel"
        await delete_tenant_keys(client, "regdel", documents=True)
        assert await client.hmget(DOCUMENT_OWNERS, mine) == [None] * len(mine)
        assert not await client.exists(TenantKeys("regdel").documents)
        assert await client.hget(DOCUMENT_OWNERS, neighbour) == b"regdel2"
        assert await forget_documents(client, "regdel") == 0  # idempotent
        assert await forget_documents(client, "regdel2") == 1
    finally:
        await client.aclose()


async def test_a_foreign_id_glued_to_another_uuid_is_held_and_redacted(
        registry: DocumentRegistry) -> None:
    foreign, own = str(uuid.uuid4()), str(uuid.uuid4())
    await registry.register("globex", [foreign])
    sanitizer = with_registry(registry, "acme", "globex")
    for chars in (3, 5, 11):
        rewriter = StreamRewriter(sanitizer, "acme", f"req_g{chars}")
        out = await rewritten(rewriter, events_for(f"{own}{foreign}{own} end", chars))
        assert "".join(texts_of(out)) == f"echo: {own}{REDACTED}{own} end"
        assert not any(foreign[:4] in text for text in texts_of(out))


@pytest.mark.parametrize("glue", ["doc_", "doc", "v2", "ref-x", "ab"])
def test_an_id_glued_to_a_word_is_read_where_it_begins(glue: str) -> None:
    sanitizer = sanitizer_for("acme", "globex")
    foreign, own = str(uuid.uuid4()), str(uuid.uuid4())
    sanitizer.documents.add("globex", foreign)
    sanitizer.documents.add("acme", own)
    text = (f"{glue}{foreign} {glue}{foreign.upper()}_x {glue}{own} globex-{foreign}-acme "
            f"{foreign}{glue}")
    assert sanitizer.redact(text, "acme", "req_glue") == (
        f"{glue}{REDACTED} {glue}{REDACTED}_x {glue}{own} {REDACTED}-{REDACTED}-acme "
        f"{REDACTED}{glue}")
    assert sanitizer.redactions == {"document_id": 4, "tenant_name": 1}
    body = json.dumps({"content": [{"type": "text", "text": f"see {glue}{foreign}"},
                                   {"type": "tool_use", "input": {"q": f"x{foreign}"}}]})
    redacted = json.loads(sanitizer.redact_message(body.encode(), "acme", "req_glue2"))
    assert redacted["content"] == [{"type": "text", "text": f"see {glue}{REDACTED}"},
                                   {"type": "tool_use", "input": {"q": f"x{REDACTED}"}}]


async def test_a_foreign_id_glued_to_a_word_in_a_stream_leaks_at_most_its_first_group(
        registry: DocumentRegistry) -> None:
    """Behind `doc_` or a hyphen it is held whole; glued to letters or digits the delta that
    ends in a few of its hex digits goes out (holding every word that ends in a-f would
    rewrite most deltas), and the rest is redacted: 8 characters of 36 at most."""
    ids = [str(uuid.uuid4()) for _ in range(3)] + ["abcdef01-2345-4789-8bcd-ef0123456789"]
    await registry.register("globex", ids)
    sanitizer = with_registry(registry, "acme", "globex")
    for foreign in ids:
        for glue, whole in (("doc_", True), ("ref-", True), ("doc", False), ("v20", False)):
            for chars in (1, 2, 3, 5, 7, 11):
                rewriter = StreamRewriter(sanitizer, "acme", f"req_{glue}{chars}")
                out = await rewritten(rewriter, events_for(f"see {glue}{foreign} end", chars))
                text = "".join(texts_of(out))
                assert rewriter.answer_text() == text
                leak = re.fullmatch(rf"echo: see {glue}(?P<leak>[0-9a-f]{{0,8}})"
                                    rf"{re.escape(REDACTED)} end", text)
                assert leak is not None, (glue, chars, text)
                assert foreign.startswith(leak["leak"])
                if whole:
                    assert leak["leak"] == "", (glue, chars, text)
                assert not any(foreign[8:20] in delta for delta in texts_of(out))


async def test_an_own_id_and_hex_words_glued_or_not_pass_unchanged_over_every_split(
        registry: DocumentRegistry) -> None:
    own, stranger = str(uuid.uuid4()), str(uuid.uuid4())
    await registry.register("acme", [own])
    sanitizer = with_registry(registry, "acme", "globex")
    question = (f"embedded decade facade 0xdeadbeef cafe-babe doc{own} v2{stranger} "
                "deadbeef-cafe 0123456789abcdef0123")
    for chars in (1, 2, 3, 4, 6, 9, 13):
        rewriter = StreamRewriter(sanitizer, "acme", f"req_own{chars}")
        out = await rewritten(rewriter, events_for(question, chars))
        assert "".join(texts_of(out)) == f"echo: {question}", chars
    assert sanitizer.redactions == {}


def delta_events(*texts: str) -> list[bytes]:
    """One text block streamed as exactly these deltas (the stub picks its own cuts)."""
    events = [b"event: content_block_delta\ndata: " + json.dumps(
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "text_delta", "text": text}}, separators=(",", ":")).encode()
        + b"\n\n" for text in texts]
    return [*events, b'event: content_block_stop\ndata: {"type":"content_block_stop",'
            b'"index":0}\n\n']


async def test_a_glued_id_cut_anywhere_leaks_nothing_once_its_first_group_is_whole(
        registry: DocumentRegistry) -> None:
    foreign = "abcdef01-2345-4789-8bcd-ef0123456789"
    await registry.register("globex", [foreign])
    sanitizer = with_registry(registry, "acme", "globex")
    text = f"see doc{foreign} end"
    first_hyphen = text.index("-")
    for cut in range(1, len(text)):
        for cuts in ((cut,), (cut, min(cut + 3, len(text) - 1))):
            parts = [text[a:b] for a, b in zip((0, *cuts), (*cuts, len(text)), strict=True)]
            rewriter = StreamRewriter(sanitizer, "acme", f"req_cut{cut}")
            out = texts_of(await rewritten(rewriter, delta_events(*parts)))
            leak = re.fullmatch(rf"see doc(?P<leak>[0-9a-f]{{0,8}}){re.escape(REDACTED)} end",
                                "".join(out))
            assert leak is not None and foreign.startswith(leak["leak"]), (parts, out)
            # A delta holding the first group and its hyphen is held from the group's start.
            if cut > first_hyphen:
                assert leak["leak"] == "", (parts, out)
