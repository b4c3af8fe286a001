"""Billing at request time in the runtime: a model outside the plan is refused with an
Anthropic-shaped error and never charged; a request is priced with the price version in
effect when it starts (real runtime under uvicorn, SDK, Redis, stub upstream)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import pytest
from runtime_helpers import MODEL, RuntimeServer, usage_events
from usage_helpers import running_app

pytestmark = pytest.mark.timeout(120)


def test_a_model_outside_the_tenants_plan_is_refused_and_not_charged(
        runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("tiergate")["main"]
    client = anthropic.Anthropic(base_url=runtime_server.url, api_key=key, max_retries=0)
    before = len(runtime_server.stub.received)
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model="claude-opus-4-1", max_tokens=16,
                               messages=[{"role": "user", "content": "hi"}])
    body = refused.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert "'claude-opus-4-1' is not available to this tenant" in body["error"]["message"]
    assert f"use {MODEL!r}" in body["error"]["message"]
    assert refused.value.request_id  # the request-id header, as Anthropic sends it
    assert len(runtime_server.stub.received) == before  # never reached the model
    assert usage_events(runtime_server.redis_url, "tiergate") == []


def book(versions: list[tuple[str, str, str]]) -> str:
    """A price book pricing MODEL per (version, effective_from, input price)."""
    return json.dumps({"currency": "USD", "unit": "per million tokens", "source": "test",
                       "versions": [{"version": name, "effective_from": start, "models": {
                           MODEL: {"input": price, "output": "2", "cache_write": "0",
                                   "cache_read": "0"}}} for name, start, price in versions]})


@pytest.mark.parametrize(("versions", "charged"), [
    # A change announced for later does not touch today's requests...
    ([("old", "2025-01-01T00:00:00Z", "1"), ("future", "2099-01-01T00:00:00Z", "100")], "old"),
    # ...and applies once its date has come.
    ([("old", "2025-01-01T00:00:00Z", "1"), ("new", "2026-01-01T00:00:00Z", "7")], "new"),
])
def test_a_request_is_priced_with_the_version_in_effect_when_it_starts(
        tmp_path: Path, redis_server: Any, upstream_stub: tuple[str, object],
        versions: list[tuple[str, str, str]], charged: str) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(book(versions))
    tenant = f"price{charged}"
    redis_url = redis_server.url
    with running_app(tmp_path, redis_url, upstream_stub[0], None, price_table=prices) as app:
        app.server.add_tenant(tenant)
        message = app.client(tenant).messages.create(
            model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "price me"}])
    event = usage_events(redis_url, tenant)[-1]
    price = Decimal({name: p for name, _, p in versions}[charged])
    expected = (message.usage.input_tokens * price + message.usage.output_tokens * 2) / 1_000_000
    assert (event["price_version"], Decimal(event["cost"])) == (charged, expected)
