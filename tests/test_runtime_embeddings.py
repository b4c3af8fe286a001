"""Embeddings (the numpy all-MiniLM-L6-v2 and the HTTP providers), the chunker, the context
assembly and the answer sanitizer: pure parts and the model, no database."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from runtime_helpers import serve, tenant_config
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from tenantry_runtime.contracts.runtime_config import Collection
from tenantry_runtime.embeddings import (
    EmbeddingError,
    HttpEmbeddings,
    LocalMiniLM,
    basic_tokens,
    cosine,
)
from tenantry_runtime.errors import ApiError
from tenantry_runtime.rag import Hit, chunk_text, context_text, rag_wanted, with_context
from tenantry_runtime.sanitize import REDACTED, Sanitizer, StreamRewriter
from tenantry_runtime.store import TenantRecord, TenantStore
from tenantry_runtime.upstream_stub import StubState, answer, stream_events

pytestmark = pytest.mark.timeout(120)
MODEL = LocalMiniLM()
# Printed by sentence-transformers for all-MiniLM-L6-v2 (its quickstart; also in
# jiyun1013/Himedia2024 Proj3/text_sts.py): model.similarity over these three sentences.
REFERENCE = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
REFERENCE_SIMILARITIES = [[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]]


def test_similarities_match_sentence_transformers_reference_values() -> None:
    vectors = MODEL.encode(REFERENCE)
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(vectors @ vectors.T, REFERENCE_SIMILARITIES, atol=6e-4)


def test_similar_sentences_score_clearly_higher_than_unrelated_ones() -> None:
    query = "How do I reset my password?"
    similar = "Steps to change a forgotten account password"
    unrelated = "The recipe needs two cups of flour and an egg"
    q, s, u = MODEL.encode([query, similar, unrelated])
    assert cosine(q, s) > 0.5 > 0.15 > cosine(q, u)
    assert np.linalg.norm(q) == pytest.approx(1.0, abs=1e-5)


def test_a_batch_equals_single_calls() -> None:
    texts = ["short", "a somewhat longer sentence about Kubernetes operators",
             "ünïcödé accents and CJK 東京 text", "x " * 400]
    batch = MODEL.encode(texts)
    singles = np.stack([MODEL.encode([t])[0] for t in texts])
    np.testing.assert_allclose(batch, singles, atol=2e-6)


async def test_a_closed_model_waits_for_its_pass_and_loads_again_when_used() -> None:
    """aclose runs after a pass already queued on the model's thread (that pass reads the file
    to the end), closes the file and ends the thread; a later call opens both again."""
    model = LocalMiniLM()
    text = "budgets reset at midnight UTC"
    pending = asyncio.ensure_future(model.embed([text, "x " * 400], "document"))
    await asyncio.sleep(0)  # the pass is on the model's thread
    await model.aclose()
    first = await pending
    assert model._loaded is None and model._executor is None
    again = await model.embed([text], "query")
    file = model.load().words.file
    await model.aclose()
    assert file.closed
    np.testing.assert_allclose(again[0], first[0], atol=2e-6)


def test_tokenizer_is_bert_uncased() -> None:
    # bert-base-uncased ids: [CLS] it ' s so sunny outside ! [SEP]
    assert MODEL.tokenize("It's so sunny outside!") == [
        101, 2009, 1005, 1055, 2061, 11559, 2648, 999, 102]
    assert basic_tokens("Café RÉSUMÉ,東京\tok") == ["cafe", "resume", ",", "東", "京", "ok"]
    vocab = MODEL.load().wordpiece.vocab
    assert [vocab[p] for p in MODEL.load().wordpiece.pieces("embeddings")] == [
        vocab["em"], vocab["##bed"], vocab["##ding"], vocab["##s"]]
    long = MODEL.tokenize("word " * 1000)
    assert len(long) == 256 and long[0] == 101 and long[-1] == 102


def test_empty_input_gives_no_vectors() -> None:
    assert MODEL.encode([]).shape == (0, 384)


@pytest.fixture(scope="module")
def embeddings_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """An embeddings endpoint backed by the local model, in OpenAI's and Voyage's shape
    (answers in reverse order, as the API allows); records the bodies it received."""
    received: list[dict[str, Any]] = []

    async def embed(request: Request) -> Response:
        body = json.loads(await request.body())
        received.append(body)
        if body["model"] == "broken":
            return JSONResponse({"data": [{"index": 0}]})
        if request.headers.get("authorization") != "Bearer sekret":
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        vectors = MODEL.encode(body["input"])
        data = [{"object": "embedding", "index": n, "embedding": v.tolist()}
                for n, v in enumerate(vectors)]
        return JSONResponse({"object": "list", "data": data[::-1], "model": body["model"]})

    app = Starlette(routes=[Route("/v1/embeddings", embed, methods=["POST"])])
    with serve(app) as url:
        yield url, received


async def test_http_providers_openai_and_voyage_shapes(
        embeddings_server: tuple[str, list[dict[str, Any]]]) -> None:
    url, received = embeddings_server
    texts = ["first text", "second, different text", "third"]
    expected = MODEL.encode(texts)
    for style in ("openai", "voyage"):
        provider = HttpEmbeddings(url, "minilm", "sekret", style=style, batch_size=2)
        vectors = await provider.embed(texts, "document")
        await provider.aclose()
        np.testing.assert_allclose(np.array(vectors), expected, atol=1e-6)
    assert [r.get("input_type") for r in received[-4:]] == [None, None, "document", "document"]
    assert received[-1]["input"] == ["third"]  # batches of two


async def test_http_provider_errors_are_embedding_errors(
        embeddings_server: tuple[str, list[dict[str, Any]]]) -> None:
    url, _ = embeddings_server
    for provider, says in ((HttpEmbeddings(url, "minilm", "wrong"), "answered 401"),
                           (HttpEmbeddings(url, "broken", "sekret"), "malformed"),
                           (HttpEmbeddings("http://127.0.0.1:9", "m"), "unreachable")):
        with pytest.raises(EmbeddingError, match=says):
            await provider.embed(["x"], "query")
        await provider.aclose()


def test_chunks_overlap_keep_words_whole_and_cover_the_text() -> None:
    words = [f"w{n:04d}" for n in range(1000)]
    text = " ".join(words)
    chunks = chunk_text(text, 200, 50)
    assert all(len(c) <= 200 for c in chunks)
    assert all(set(c.split()) <= set(words) for c in chunks)  # no word cut in half
    seen = [w for c in chunks for w in c.split()]
    assert set(seen) == set(words)
    for before, after in itertools.pairwise(chunks):
        assert before.split()[-1] in after.split()[:12]  # overlap
    assert chunk_text("  one short text ", 200, 50) == ["one short text"]
    assert chunk_text("", 200, 50) == []


def test_context_keeps_the_tenants_system_prompt_as_string_or_blocks() -> None:
    hit = Hit("c1", "d0c-1", "Guide", "passage text", 0.9, {})
    context = context_text([hit])
    assert '<document id="d0c-1"> Guide\npassage text\n</document>' in context
    body = {"model": "m", "messages": []}
    assert with_context(body, context)["system"] == context
    assert with_context({**body, "system": "be brief"}, context)["system"] == (
        "be brief\n\n" + context)
    blocks = [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}]
    assert with_context({**body, "system": blocks}, context)["system"] == [
        *blocks, {"type": "text", "text": context}]


def test_rag_header_decides_per_request() -> None:
    on = tenant_config("ragon", collection=Collection(
        enabled=True, table="tenantry.t", dimensions=384, top_k=3, shared=True))
    off = tenant_config("ragoff")
    assert rag_wanted(None, on, True) and not rag_wanted(None, on, False)
    assert rag_wanted("on", on, False) and not rag_wanted("OFF", on, True)
    assert not rag_wanted(None, off, True) and not rag_wanted("off", off, True)
    with pytest.raises(ApiError, match="RAG is disabled for this tenant"):
        rag_wanted("on", off, True)
    with pytest.raises(ApiError, match="must be 'on' or 'off'"):
        rag_wanted("yes", on, True)


def sanitizer_for(*tenants: str) -> Sanitizer:
    store = TenantStore()
    for tenant in tenants:
        store.apply(TenantRecord(config=tenant_config(tenant)))
    return Sanitizer(store)


def test_redacts_other_tenants_names_and_document_ids_but_not_the_callers() -> None:
    sanitizer = sanitizer_for("acme", "globex")
    foreign, own = "0b9a3c7e-1111-4222-8333-444455556666", "5f0e0c9a-aaaa-4bbb-8ccc-dddddddddddd"
    sanitizer.documents.add("globex", foreign)
    sanitizer.documents.add("acme", own)
    text = (f"Acme and GLOBEX; globexcorp and xglobex stay; see {foreign.upper()} and {own}; "
            "unknown 12345678-1234-1234-1234-123456789012")
    assert sanitizer.redact(text, "acme", "req_1") == (
        f"Acme and {REDACTED}; globexcorp and xglobex stay; see {REDACTED} and {own}; "
        "unknown 12345678-1234-1234-1234-123456789012")
    assert sanitizer.redactions == {"tenant_name": 1, "document_id": 1}
    body = json.dumps({"content": [{"type": "text", "text": "ask globex"},
                                   {"type": "tool_use", "input": {"q": "globex"}}]}).encode()
    redacted = json.loads(sanitizer.redact_message(body, "acme", "req_2"))
    assert redacted["content"][0]["text"] == f"ask {REDACTED}"
    assert redacted["content"][1]["input"] == {"q": REDACTED}
    clean = b'{"content": [{"type": "text", "text": "nothing here"}]}'
    assert sanitizer.redact_message(clean, "acme", "req_3") is clean


def test_a_streamed_tool_input_is_held_and_redacted_as_one_delta() -> None:
    sanitizer = sanitizer_for("acme", "globex")
    tool = {"name": "lookup", "input_schema": {"type": "object", "properties": {
        "query": {"type": "string"}}, "required": ["query"]}}
    message = answer({"model": "m", "max_tokens": 50, "tools": [tool], "messages": [
        {"role": "user", "content": "find the globex contract and globex's owner"}]}, StubState())
    events = stream_events(message)
    pieces = [e for e in events if b"input_json_delta" in e]
    assert len(pieces) > 2  # the stub sends the input in 16-character pieces
    rewriter = StreamRewriter(sanitizer, "acme", "req_tool")
    out = b"".join(rewriter.feed(e) for e in events) + rewriter.flush()
    deltas = [json.loads(line[5:]) for line in out.split(b"\n")
              if line.startswith(b"data:") and b"input_json_delta" in line]
    assert len(deltas) == 1
    assert json.loads(deltas[0]["delta"]["partial_json"]) == {
        "query": f"find the {REDACTED} contract and {REDACTED}'s owner"}
    # It comes right before its block's stop, at the same index.
    at = out.index(b"input_json_delta")
    assert out.index(b"content_block_stop", at) > at
    assert b"event: message_stop" in out
    # Without sanitizing, a tool input streams as the upstream sent it.
    plain = StreamRewriter(None, "acme", "req_raw")
    assert b"".join(plain.feed(e) for e in events) == b"".join(events)


def test_a_name_split_across_stream_deltas_is_redacted() -> None:
    sanitizer = sanitizer_for("acme", "globex")
    message = answer({"model": "m", "max_tokens": 50, "messages": [
        {"role": "user", "content": "tell me about globex now"}]}, StubState())
    events = stream_events(message)
    # Split "globex" between two deltas, and every event across two chunks.
    events = [e.replace(b'"text":" globex"', b'"text":" glo"') for e in events]
    at = next(n for n, e in enumerate(events) if b'" glo"' in e)
    events.insert(at + 1, events[at].replace(b'" glo"', b'"bex"'))
    rewriter = StreamRewriter(sanitizer, "acme", "req_s")
    out = b"".join(rewriter.feed(e[:7]) + rewriter.feed(e[7:]) for e in events)
    out += rewriter.flush()
    texts = [json.loads(line[5:])["delta"]["text"] for line in out.split(b"\n")
             if line.startswith(b"data:") and b"text_delta" in line]
    assert "".join(texts) == f"echo: tell me about {REDACTED} now"
    assert rewriter.answer_text() == f"echo: tell me about {REDACTED} now"
    assert b"event: message_stop" in out and rewriter.completed
    assert sanitizer.redactions["tenant_name"] == 1
    # A clean stream passes byte for byte.
    plain = stream_events(answer({"model": "m", "max_tokens": 9, "messages": [
        {"role": "user", "content": "nothing to see"}]}, StubState()))
    rewriter = StreamRewriter(sanitizer, "acme", "req_t")
    assert b"".join(rewriter.feed(e) for e in plain) == b"".join(plain)
