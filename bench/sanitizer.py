"""The response sanitizer's CPU per answer and per SSE event, without and with the shared
document registry (sanitize.py, document_registry.py), in one run.

1,000 tenants served, 10,000 document ids known locally (as docs/runtime.md's figures), a
redis-server for the registry. Per case: microseconds per 1.8 KB non-streaming answer and
per SSE event of a streamed one (the stub's events, a delta per word), and the Redis lookups
it sent. Cases: a clean answer; one naming an unknown foreign id (registry: one lookup); the
same id once known (cached). Asserts nothing.

    .venv/bin/python bench/sanitizer.py [--rounds 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import Any

from tenantry_devenv.services import start_redis
from tenantry_runtime.contracts.redis_keys import TenantKeys
from tenantry_runtime.contracts.runtime_config import (
    Collection,
    DatabaseLocation,
    Endpoint,
    TenantRuntimeConfig,
)
from tenantry_runtime.document_registry import DocumentRegistry
from tenantry_runtime.resp import PipelinedRedis
from tenantry_runtime.sanitize import Sanitizer, StreamRewriter
from tenantry_runtime.store import TenantRecord, TenantStore
from tenantry_runtime.upstream_stub import StubState, answer, stream_events

TENANTS, KNOWN_IDS = 1000, 10_000
CLEAN = ("The quarterly report shows steady growth in every region we serve, and the "
         "team expects the trend to hold through the next period as new customers arrive. ")


def store_of(count: int) -> TenantStore:
    store = TenantStore()
    for n in range(count):
        tenant = f"tenant-{n:04d}"
        store.apply(TenantRecord(config=TenantRuntimeConfig(
            revision=1, tenant=tenant, isolation="pool", suspended=False, model="m",
            max_tokens_per_request=1024, endpoint=Endpoint(type="shared"),
            database=DatabaseLocation(kind="shared", schema_name="public"),
            collection=Collection(enabled=False, table=None, dimensions=384, top_k=4,
                                  shared=True),
            redis_key_prefix=TenantKeys(tenant).prefix)))
    return store


def sanitizer_of(store: TenantStore, registry: DocumentRegistry | None) -> Sanitizer:
    sanitizer = Sanitizer(store, registry=registry)
    for n in range(KNOWN_IDS):
        sanitizer.documents.add(f"tenant-{n % TENANTS:04d}", str(uuid.uuid4()))
    return sanitizer


def message_of(text: str) -> dict[str, Any]:
    return answer({"model": "m", "max_tokens": 4096,
                   "messages": [{"role": "user", "content": text}]}, StubState())


async def batch(rounds: int, work: Callable[[], Coroutine[Any, Any, object]]) -> float:
    """Microseconds of one call of `work`, averaged over `rounds` calls."""
    started = time.perf_counter()
    for _ in range(rounds):
        await work()
    return (time.perf_counter() - started) / rounds * 1e6


async def side_by_side(rounds: int, works: list[Callable[[], Coroutine[Any, Any, object]]],
                       repeats: int = 9) -> list[float]:
    """Each work's best batch, the works' batches interleaved (the machine is shared, so
    load drifts; interleaving exposes each to the same drift)."""
    best = [float("inf")] * len(works)
    for _ in range(repeats):
        for n, work in enumerate(works):
            best[n] = min(best[n], await batch(rounds, work))
    return best


async def non_streaming(sanitizer: Sanitizer, body: bytes, forget: str | None) -> object:
    if forget is not None:  # so that each answer asks the registry again
        sanitizer.documents.discard(forget)
    await sanitizer.resolve(body)
    return sanitizer.redact_message(body, "tenant-0000", "req")


async def streaming(sanitizer: Sanitizer, events: list[bytes], forget: str | None) -> object:
    if forget is not None:
        sanitizer.documents.discard(forget)
    rewriter = StreamRewriter(sanitizer, "tenant-0000", "req")
    return [await rewriter.rewrite(event) for event in events]


async def measure(rounds: int, redis_url: str) -> None:
    store = store_of(TENANTS)
    redis = PipelinedRedis(redis_url, 5)
    registry = DocumentRegistry(redis)
    foreign = str(uuid.uuid4())
    await registry.register("tenant-0001", [foreign])
    clean_text = (CLEAN * 12)[:1800]
    named_text = clean_text[:900] + f" see {foreign} " + clean_text[900:1750]
    print(f"{TENANTS} tenants, {KNOWN_IDS} known ids, best of 9 interleaved batches of {rounds}; "
          "wall microseconds per call (a lookup's round trip to Redis included)")
    print(f"{'case':<34}{'registry':>9}{'answer us':>11}{'event us':>10}{'lookups':>9}")
    for label, text, fresh in (("clean 1.8 KB answer", clean_text, False),
                               ("foreign id, unknown here", named_text, True),
                               ("foreign id, cached", named_text, False)):
        message = message_of(text)
        body = json.dumps(message).encode()
        events = stream_events(message)
        sanitizers = []
        for with_registry in (False, True):
            sanitizer = sanitizer_of(store, registry if with_registry else None)
            sanitizer.names()
            if not with_registry or not fresh:
                sanitizer.documents.add("tenant-0001", foreign)
            sanitizers.append(sanitizer)
        forget = [None, foreign if fresh else None]
        before = registry.lookups
        whole = await side_by_side(rounds, [partial(non_streaming, s, body, f)
                                            for s, f in zip(sanitizers, forget, strict=True)])
        streamed = await side_by_side(rounds, [partial(streaming, s, events, f)
                                               for s, f in zip(sanitizers, forget, strict=True)])
        lookups = (registry.lookups - before) / (2 * 9 * rounds)
        for n, name in enumerate(("off", "on")):
            print(f"{label:<34}{name:>9}{whole[n]:>11.1f}{streamed[n] / len(events):>10.2f}"
                  f"{lookups if n else 0.0:>9.1f}")
    print(f"({len(events)} SSE events per streamed answer; lookups: Redis calls per answer)")
    await redis.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    logging.getLogger("tenantry_runtime.sanitize").setLevel(logging.ERROR)  # security events
    with tempfile.TemporaryDirectory(prefix="tenantry-bench-") as workdir:
        redis_server = start_redis(Path(workdir) / "redis")
        try:
            asyncio.run(measure(args.rounds, redis_server.url))
        finally:
            redis_server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
