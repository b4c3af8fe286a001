"""The stream rewriter's fast paths (a plain text delta read without a JSON parse; a chunk
screened once for all its deltas) give exactly what the parsing, delta-by-delta path gives:
same bytes, same answer text, same redactions, for answers mixing names, name prefixes,
known and unknown UUIDs, escapes, non-ASCII text and long words, in any chunking; with and
without the shared document registry (a real redis-server)."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tenantry_devenv.services import Redis as RedisServer
from tenantry_runtime.document_registry import DocumentRegistry
from tenantry_runtime.resp import PipelinedRedis
from tenantry_runtime.sanitize import Sanitizer, StreamRewriter
from tenantry_runtime.upstream_stub import StubState, answer, stream_events
from test_runtime_embeddings import sanitizer_for

FOREIGN = "0b9a3c7e-1111-4222-8333-444455556666"  # globex's
OWN = "5f0e0c9a-aaaa-4bbb-8ccc-dddddddddddd"  # acme's
UNKNOWN = "12345678-1234-1234-1234-123456789012"
WORDS = ["the", "acme", "globex", "Globex", "glo", "bex", "big-corp", "big", "corp", "a",
         "cafe", "deadbeef", FOREIGN, OWN, UNKNOWN, FOREIGN[:13], "line\nglobex", 'say "globex"',
         "\\globex", "ünïcode globex", "İglobex", "x" * 90 + "globex", "globex" + "y" * 80,
         "big-corp-globex", "acme-globex", "text", "delta", "0b9a3c7e-", "…", ".",
         # A name inside a delta (not its held-back tail): the screen must see it.
         "globex.", "line\nglobex.", 'say "globex".', "\\globex.", "İglobex.", "\tglobex,",
         f"{FOREIGN}.", f"{UNKNOWN}.", "big-corp."]


class ParsingRewriter(StreamRewriter):
    """The rewriter without its fast paths: every delta parsed and screened on its own."""

    def _quiet(self, events: bytes) -> bool:
        return False

    @staticmethod
    def _plain_text_delta(raw: bytes) -> tuple[int, str] | None:
        return None


def sanitizer() -> Sanitizer:
    sanitizing = sanitizer_for("acme", "globex", "big-corp")
    sanitizing.documents.add("globex", FOREIGN)
    sanitizing.documents.add("acme", OWN)
    return sanitizing


def answer_events(text: str, delta_chars: int | None) -> list[bytes]:
    message = answer({"model": "m", "max_tokens": 400, "messages": [
        {"role": "user", "content": text}]}, StubState())
    return stream_events(message, delta_chars)


def chunked(events: list[bytes], seed: int) -> list[bytes]:
    """The events joined a few at a time, some chunks cut anywhere."""
    draw = random.Random(seed)
    data = b"".join(events)
    chunks: list[bytes] = []
    at = 0
    while at < len(data):
        if draw.random() < 0.3:
            size = draw.randint(1, 80)
        else:  # whole events, as a socket read brings them
            end = at
            for _ in range(draw.randint(1, 4)):
                found = data.find(b"\n\n", end)
                end = len(data) if found < 0 else found + 2
            size = end - at
        chunks.append(data[at:at + size])
        at += size
    return chunks


async def both(sanitizers: tuple[Sanitizer, Sanitizer], chunks: list[bytes]
               ) -> tuple[tuple[bytes, str], tuple[bytes, str]]:
    results = []
    for rewriter in (StreamRewriter(sanitizers[0], "acme", "req_fast"),
                     ParsingRewriter(sanitizers[1], "acme", "req_slow")):
        out = b"".join([await rewriter.rewrite(chunk) for chunk in chunks]) + rewriter.flush()
        results.append((out, rewriter.answer_text()))
    return results[0], results[1]


@settings(max_examples=300, deadline=None)
@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=12),
       delta_chars=st.one_of(st.none(), st.integers(1, 7)), seed=st.integers(0, 10**6))
async def test_fast_and_parsing_rewriters_agree(words: list[str], delta_chars: int | None,
                                                seed: int) -> None:
    pair = (sanitizer(), sanitizer())
    fast, slow = await both(pair, chunked(answer_events(" ".join(words), delta_chars), seed))
    assert fast == slow
    assert pair[0].redactions == pair[1].redactions


def test_the_fast_paths_are_taken_for_a_plain_answer() -> None:
    """A clean answer in one chunk is screened once and its deltas are not parsed; one that
    names another tenant is not quiet (and is redacted, by the test above's agreement)."""
    rewriter = StreamRewriter(sanitizer(), "acme", "req_q")
    clean = b"".join(answer_events("nothing to see here", None))
    assert rewriter._quiet(clean)
    assert not rewriter._quiet(b"".join(answer_events("ask globex", None)))
    assert not rewriter._quiet(b"".join(answer_events(f"see {UNKNOWN}", None)))
    assert not rewriter._quiet(b"".join(answer_events("line\nglobex", None)))
    delta = next(e for e in answer_events("hello there", None) if b"text_delta" in e)
    assert StreamRewriter._plain_text_delta(delta) == (0, "echo:")
    escaped = next(e for e in answer_events('say "hi"', None) if b'\\"' in e)
    assert StreamRewriter._plain_text_delta(escaped) is None
    assert json.loads(escaped.split(b"data: ")[1])["delta"]["text"] == ' "hi"'


@pytest.fixture
async def registry(redis_server: RedisServer) -> AsyncIterator[DocumentRegistry]:
    redis = PipelinedRedis(redis_server.url, 5)
    shared = DocumentRegistry(redis)
    assert await shared.register("globex", [UNKNOWN, FOREIGN])
    assert await shared.register("acme", [OWN])
    yield shared
    await redis.aclose()


async def test_with_the_registry_both_agree_and_ask_alike(registry: DocumentRegistry) -> None:
    """With a registry any UUID (and a delta tail that may begin one) waits for a lookup:
    the fast path asks the same ids and sends the same bytes."""
    draw = random.Random(7)
    # Every word alone (in one delta, and split), then mixes.
    cases = [[word] for word in WORDS for _ in range(2)] + [
        [draw.choice(WORDS) for _ in range(draw.randint(2, 10))] for _ in range(30)]
    for round_, words in enumerate(cases):
        # Half the rounds know no id here: only the registry's answers can redact.
        pair = ((sanitizer(), sanitizer()) if round_ % 2 else
                (sanitizer_for("acme", "globex", "big-corp"),
                 sanitizer_for("acme", "globex", "big-corp")))
        for sanitizing in pair:
            sanitizing.registry = registry
        events = answer_events(" ".join(words), [None, 2, 5][round_ // 2 % 3])
        fast, slow = await both(pair, chunked(events, round_))
        assert fast == slow, words
        assert pair[0].redactions == pair[1].redactions
        assert sorted(pair[0].documents._owner) == sorted(pair[1].documents._owner)
