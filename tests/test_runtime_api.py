"""The runtime end to end: the official anthropic SDK -> runtime (uvicorn) -> local model
endpoint (uvicorn), with the real redis-server holding limits, holds and usage events."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from runtime_helpers import MODEL, UPSTREAM_KEY, RuntimeServer, usage_events, wait_for
from tenantry_runtime.limits import limit_keys
from tenantry_runtime.store import TenantRecord

pytestmark = pytest.mark.timeout(120)


def sdk(server: RuntimeServer, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0)


def hello(client: anthropic.Anthropic, text: str = "hello there", **extra: object
          ) -> anthropic.types.Message:
    return client.messages.create(model=MODEL, max_tokens=64,
                                  messages=[{"role": "user", "content": text}], **extra)


def test_create_answers_and_the_model_sees_the_upstream_key_never_the_tenants(
        runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("apisync")["main"]
    message = hello(sdk(runtime_server, key), "what is tenantry")
    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: what is tenantry"
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 4
    received = runtime_server.stub.received[-1]
    assert received.headers["x-api-key"] == UPSTREAM_KEY
    assert key not in str(received.headers)
    assert "authorization" not in received.headers


def test_usage_event_carries_the_request_id_the_client_saw(
        runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("apievents")["main"]
    message = hello(sdk(runtime_server, key), "count these four")
    events = usage_events(runtime_server.redis_url, "apievents")
    assert len(events) == 1
    event = events[0]
    assert event["request_id"] == message._request_id
    assert (event["model"], event["status"], event["endpoint"]) == (MODEL, 200, "shared")
    assert event["input_tokens"] == message.usage.input_tokens
    assert event["output_tokens"] == message.usage.output_tokens == 4
    # claude-stub-1 is priced at 1 USD in / 2 USD out per million tokens in prices.json.
    expected = Decimal(message.usage.input_tokens * 1 + 4 * 2) / 1_000_000
    assert (Decimal(event["cost"]), event["currency"]) == (expected, "USD")
    assert event["price_version"]
    spent = runtime_server.redis_client().get(limit_keys("apievents", datetime.now(UTC)).day)
    assert int(spent or 0) == message.usage.input_tokens + 4


async def test_async_create(runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("apiasync")["main"]
    async with anthropic.AsyncAnthropic(base_url=runtime_server.url, api_key=key,
                                        max_retries=0) as client:
        messages = await asyncio.gather(*(client.messages.create(
            model=MODEL, max_tokens=32, messages=[{"role": "user", "content": f"n{i}"}])
            for i in range(10)))
    assert sorted(m.content[0].text for m in messages
                  ) == sorted(f"echo: n{i}" for i in range(10))


def test_stream_passes_events_through_and_usage_is_billed(
        runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("apistream")["main"]
    client = sdk(runtime_server, key)
    with client.messages.stream(model=MODEL, max_tokens=64, messages=[
            {"role": "user", "content": "stream me five words"}]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds and "message_delta" in kinds
    assert final.content[0].text == "echo: stream me five words"
    events = usage_events(runtime_server.redis_url, "apistream")
    assert [(e["stream"], e["output_tokens"], e["status"]) for e in events] == [(True, 5, 200)]
    assert events[0]["request_id"] == stream.response.headers["request-id"]


def test_raw_sse_bytes_include_ping_exactly_as_the_model_sent_them(
        runtime_server: RuntimeServer, upstream_stub: tuple[str, object]) -> None:
    key = runtime_server.add_tenant("apiraw")["main"]
    body = {"model": MODEL, "max_tokens": 16, "stream": True,
            "messages": [{"role": "user", "content": "raw bytes"}]}
    through = httpx.post(f"{runtime_server.url}/v1/messages", json=body, headers={
        "x-api-key": key, "anthropic-version": "2023-06-01"}).text
    direct = httpx.post(f"{upstream_stub[0]}/v1/messages", json=body, headers={
        "x-api-key": UPSTREAM_KEY, "anthropic-version": "2023-06-01"}).text
    assert "event: ping" in through

    def without_ids(text: str) -> str:
        import re
        return re.sub(r'"msg_stub\d+"', "ID", text)

    assert without_ids(through) == without_ids(direct)


async def test_async_stream(runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("apiastream")["main"]
    client = anthropic.AsyncAnthropic(base_url=runtime_server.url, api_key=key, max_retries=0)
    async with client.messages.stream(model=MODEL, max_tokens=64, messages=[
            {"role": "user", "content": "async stream"}]) as stream:
        text = await stream.get_final_text()
    await client.close()
    assert text == "echo: async stream"


def test_tool_use_non_streaming_and_streaming(runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("apitools")["main"]
    client = sdk(runtime_server, key)
    tools = [{"name": "lookup", "description": "Look something up",
              "input_schema": {"type": "object", "properties": {"query": {"type": "string"}},
                               "required": ["query"]}}]
    message = hello(client, "find tenantry", tools=tools)
    assert message.stop_reason == "tool_use"
    use = message.content[-1]
    assert use.type == "tool_use" and use.name == "lookup" and use.input == {
        "query": "find tenantry"}
    with client.messages.stream(model=MODEL, max_tokens=64, tools=tools,
                                messages=[{"role": "user", "content": "find it"}]) as stream:
        final = stream.get_final_message()
    assert final.content[-1].type == "tool_use"
    assert final.content[-1].input == {"query": "find it"}
    answer = client.messages.create(
        model=MODEL, max_tokens=64, tools=tools,
        messages=[{"role": "user", "content": "find tenantry"},
                  {"role": "assistant", "content": message.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                "content": "found it"}]}])
    assert answer.stop_reason == "end_turn"
    assert runtime_server.stub.received[-1].body["tools"] == tools


def test_system_prompt_as_string_and_as_blocks_reaches_the_model(
        runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("apisystem")["main"]
    client = sdk(runtime_server, key)
    hello(client, system="be brief")
    assert runtime_server.stub.received[-1].body["system"] == "be brief"
    blocks = [{"type": "text", "text": "be brief"}, {"type": "text", "text": "and kind"}]
    hello(client, system=blocks)
    assert runtime_server.stub.received[-1].body["system"] == blocks


def test_stop_sequences(runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("apistop")["main"]
    client = sdk(runtime_server, key)
    message = hello(client, "one two STOP three", stop_sequences=["STOP"])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "STOP"
    assert message.content[0].text == "echo: one two "
    with client.messages.stream(model=MODEL, max_tokens=64, stop_sequences=["STOP"], messages=[
            {"role": "user", "content": "a STOP b"}]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence"


def test_bearer_authorization_works_like_x_api_key(runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("apibearer")["main"]
    client = anthropic.Anthropic(base_url=runtime_server.url, auth_token=key, max_retries=0)
    assert hello(client).content[0].text == "echo: hello there"


def test_bad_key_is_401_in_anthropics_shape(runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("apibadkey")["main"]
    for wrong in (key[:-1] + ("A" if key[-1] != "A" else "B"), "sk-ant-not-ours", "x"):
        with pytest.raises(anthropic.AuthenticationError) as caught:
            hello(sdk(runtime_server, wrong))
        assert caught.value.body == {"type": "error", "error": {
            "type": "authentication_error", "message": "invalid x-api-key"}}
    missing = httpx.post(f"{runtime_server.url}/v1/messages", json={})
    assert missing.status_code == 401


def test_suspended_tenant_is_403(runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("apisuspend", suspended=True)["main"]
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        hello(sdk(runtime_server, key))
    assert caught.value.body["error"]["type"] == "permission_error"


def test_max_tokens_above_the_tenant_limit_and_other_models_are_400(
        runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("apimaxtok", max_tokens_per_request=100)["main"]
    client = sdk(runtime_server, key)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=MODEL, max_tokens=101,
                               messages=[{"role": "user", "content": "x"}])
    assert "exceeds this tenant's limit of 100" in caught.value.message
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="claude-other", max_tokens=10,
                               messages=[{"role": "user", "content": "x"}])
    assert client.messages.create(model=MODEL, max_tokens=100, messages=[
        {"role": "user", "content": "x"}]).stop_reason == "end_turn"


def test_budget_exhausted_is_429_with_retry_after(runtime_server: RuntimeServer) -> None:
    # Reservation ~ body/3 + 64 = ~190; each request really spends 60 in + 61 out.
    key = runtime_server.add_tenant("apibudget", limits={"daily_tokens": 250})["main"]
    client = sdk(runtime_server, key)
    sixty_words = "word " * 60
    assert hello(client, sixty_words).usage.output_tokens == 61
    with pytest.raises(anthropic.RateLimitError) as caught:
        hello(client, sixty_words)
    assert caught.value.body["error"]["type"] == "rate_limit_error"
    assert "Daily token budget" in caught.value.message
    assert int(caught.value.response.headers["retry-after"]) > 0
    # Retrying before midnight is pointless: the SDK is told not to.
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(usage_events(runtime_server.redis_url, "apibudget")) == 1


def test_rate_limit_is_429_with_retry_after(runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("apirpm", limits={"requests_per_minute": 2})["main"]
    client = sdk(runtime_server, key)
    hello(client)
    hello(client)
    with pytest.raises(anthropic.RateLimitError) as caught:
        hello(client)
    assert 25 <= int(caught.value.response.headers["retry-after"]) <= 30


def test_expired_key_is_refused_and_its_sibling_works(runtime_server: RuntimeServer) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=1.5)
    keys = runtime_server.add_tenant("apiexpiry", keys={"shortlived": soon, "lasting": None})
    hello(sdk(runtime_server, keys["shortlived"]))
    time.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.1)
    with pytest.raises(anthropic.AuthenticationError):
        hello(sdk(runtime_server, keys["shortlived"]))
    hello(sdk(runtime_server, keys["lasting"]))


def test_a_key_removed_from_the_store_stops_working_within_seconds(
        runtime_server: RuntimeServer) -> None:
    keys = runtime_server.add_tenant("apirevoke", keys={"old": None, "new": None})
    hello(sdk(runtime_server, keys["old"]))
    record = runtime_server.record("apirevoke")
    started = time.monotonic()
    runtime_server.write_raw("apirevoke", TenantRecord(
        config=record.config, api_keys=tuple(k for k in record.api_keys if k.name == "new"),
    ).model_dump_json().encode())

    def refused() -> bool:
        try:
            hello(sdk(runtime_server, keys["old"]))
        except anthropic.AuthenticationError:
            return True
        return False

    wait_for(refused, 5, "the removed key to be refused")
    assert time.monotonic() - started < 5
    hello(sdk(runtime_server, keys["new"]))


def test_a_stale_revision_is_ignored_and_an_invalid_file_keeps_the_last_good(
        runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("apirevs", revision=5)["main"]
    record = runtime_server.record("apirevs")
    stale = record.model_copy(update={"config": record.config.model_copy(
        update={"revision": 4, "suspended": True})})
    stale_before = runtime_server.store.stale_ignored
    runtime_server.write_raw("apirevs", stale.model_dump_json().encode())
    wait_for(lambda: runtime_server.store.stale_ignored > stale_before, 5,
             "the stale revision to be seen")
    assert runtime_server.record("apirevs") == record
    refused_before = sum(runtime_server.store.refused.values())
    runtime_server.write_raw("apirevs", b'{"config": {"tenant": "apirevs"}}')
    wait_for(lambda: sum(runtime_server.store.refused.values()) > refused_before, 5,
             "the invalid file to be refused")
    assert runtime_server.record("apirevs") == record
    hello(sdk(runtime_server, key))


def test_cross_tenant_a_key_only_ever_reaches_its_own_config_and_limits(
        runtime_server: RuntimeServer) -> None:
    key_a = runtime_server.add_tenant("crossa", max_tokens_per_request=50)["main"]
    key_b = runtime_server.add_tenant("crossb", max_tokens_per_request=500,
                                      limits={"daily_tokens": 1})["main"]
    # B's budget is spent, A's is not: A's key is admitted against A's limits only.
    sdk(runtime_server, key_a).messages.create(model=MODEL, max_tokens=50, messages=[
        {"role": "user", "content": "a"}])
    with pytest.raises(anthropic.RateLimitError):
        sdk(runtime_server, key_b).messages.create(model=MODEL, max_tokens=50, messages=[
            {"role": "user", "content": "b"}])
    # A's per-request limit (50) applies to A's key even though B allows 500.
    with pytest.raises(anthropic.BadRequestError):
        sdk(runtime_server, key_a).messages.create(model=MODEL, max_tokens=60, messages=[
            {"role": "user", "content": "a"}])
    assert [e["tenant"] for e in usage_events(runtime_server.redis_url, "crossa")] == ["crossa"]
    assert usage_events(runtime_server.redis_url, "crossb") == []
    # A key whose prefix B already holds is refused for A: lookups stay unambiguous.
    b_key = runtime_server.record("crossb").api_keys[0]
    record_a = runtime_server.record("crossa")
    refused_before = runtime_server.store.refused["key_prefix_conflict"]
    runtime_server.write_raw("crossa", record_a.model_copy(update={
        "config": record_a.config.model_copy(update={"revision": 2}),
        "api_keys": (*record_a.api_keys, b_key)}).model_dump_json().encode())
    wait_for(lambda: runtime_server.store.refused["key_prefix_conflict"] > refused_before, 5,
             "the conflicting prefix to be refused")
    assert runtime_server.store.authenticate(key_b).record.config.tenant == "crossb"


def test_upstream_overload_is_retried_before_the_first_byte(
        runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("apiretry")["main"]
    runtime_server.stub.fail_next[:] = [529, 503]
    assert hello(sdk(runtime_server, key)).stop_reason == "end_turn"
    runtime_server.stub.fail_next[:] = [529, 529, 529]
    with pytest.raises(anthropic.APIStatusError) as caught:
        hello(sdk(runtime_server, key))
    assert caught.value.status_code == 529
    assert caught.value.body["error"]["type"] == "overloaded_error"
    runtime_server.stub.fail_next[:] = [529, 529, 529]
    stream = sdk(runtime_server, key).messages.stream(model=MODEL, max_tokens=8, messages=[
        {"role": "user", "content": "s"}])
    with pytest.raises(anthropic.APIStatusError) as streamed, stream as events:
        events.get_final_message()
    assert streamed.value.status_code == 529
    # Failed requests are recorded with no tokens and release their holds.
    statuses = [e["status"] for e in usage_events(runtime_server.redis_url, "apiretry")]
    assert statuses == [200, 529, 529]
    held = runtime_server.redis_client().get(limit_keys("apiretry", datetime.now(UTC)).held_total)
    assert int(held or 0) == 0


def test_unknown_route_too_large_and_bad_json_use_anthropics_error_shape(
        runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("apierrors")["main"]
    headers = {"x-api-key": key}
    unknown = httpx.get(f"{runtime_server.url}/v1/nothing", headers=headers)
    assert (unknown.status_code, unknown.json()["error"]["type"]) == (404, "not_found_error")
    large = httpx.post(f"{runtime_server.url}/v1/messages", headers=headers,
                       content=b"x" * (65 * 1024))
    assert (large.status_code, large.json()["error"]["type"]) == (413, "request_too_large")
    bad = httpx.post(f"{runtime_server.url}/v1/messages", headers=headers, content=b"{nope")
    assert (bad.status_code, bad.json()["type"]) == (400, "error")
    with pytest.raises(anthropic.BadRequestError):
        sdk(runtime_server, key).messages.create(model=MODEL, max_tokens=0, messages=[
            {"role": "user", "content": "x"}])


def test_count_tokens_and_models(runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("apicount")["main"]
    client = sdk(runtime_server, key)
    counted = client.messages.count_tokens(model=MODEL, messages=[
        {"role": "user", "content": "four words right here"}])
    assert counted.input_tokens == 4
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("claude-other")


def test_health_and_readiness(runtime_server: RuntimeServer) -> None:
    assert httpx.get(f"{runtime_server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{runtime_server.url}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_a_stream_broken_after_the_first_byte_ends_with_an_error_event_and_is_billed(
        runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("apibroken")["main"]
    runtime_server.stub.break_stream_after = 4  # message_start, block start, ping, one delta
    try:
        with pytest.raises(anthropic.APIStatusError) as caught, sdk(
                runtime_server, key).messages.stream(model=MODEL, max_tokens=64, messages=[
                    {"role": "user", "content": "this stream will break"}]) as stream:
            for _ in stream:
                pass
    finally:
        runtime_server.stub.break_stream_after = None
    assert caught.value.body["error"]["type"] == "api_error"
    # No retry after the first byte: the model was asked once.
    asked = [r for r in runtime_server.stub.received
             if r.body["messages"][0]["content"] == "this stream will break"]
    assert len(asked) == 1
    [event] = usage_events(runtime_server.redis_url, "apibroken")
    assert event["status"] == 502 and event["input_tokens"] == 4
    held = runtime_server.redis_client().get(limit_keys("apibroken", datetime.now(UTC)).held_total)
    assert int(held or 0) == 0


def test_a_client_that_disconnects_mid_stream_is_billed_for_the_whole_answer(
        runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("apidisconnect")["main"]
    runtime_server.stub.event_delay_seconds = 0.05
    try:
        with httpx.stream("POST", f"{runtime_server.url}/v1/messages", headers={
                "x-api-key": key, "anthropic-version": "2023-06-01"}, json={
                "model": MODEL, "max_tokens": 64, "stream": True,
                "messages": [{"role": "user", "content": "one two three four five six"}]},
                ) as response:
            first = next(response.iter_raw())
        assert first.startswith(b"event: message_start")
        wait_for(lambda: usage_events(runtime_server.redis_url, "apidisconnect"), 10,
                 "the usage event of the abandoned stream")
    finally:
        runtime_server.stub.event_delay_seconds = 0.0
    [event] = usage_events(runtime_server.redis_url, "apidisconnect")
    # The runtime read the stream to its end: all 7 output tokens ("echo:" + 6 words) billed.
    assert (event["status"], event["input_tokens"], event["output_tokens"]) == (499, 6, 7)
    held = runtime_server.redis_client().get(
        limit_keys("apidisconnect", datetime.now(UTC)).held_total)
    assert int(held or 0) == 0


def test_a_dedicated_tenant_uses_its_endpoint_and_never_falls_back_to_the_shared_one(
        runtime_server: RuntimeServer, upstream_stub: tuple[str, object]) -> None:
    from tenantry_devenv.processes import free_port
    from tenantry_runtime.contracts.runtime_config import Endpoint

    mine = Endpoint(type="dedicated", url=upstream_stub[0], secret_name="s", secret_key="k")
    key = runtime_server.add_tenant("apidedicated", endpoint=mine,
                                    endpoint_api_key=UPSTREAM_KEY)["main"]
    hello(sdk(runtime_server, key), "dedicated call")
    assert usage_events(runtime_server.redis_url, "apidedicated")[0]["endpoint"] == "dedicated"
    dead = Endpoint(type="dedicated", url=f"http://127.0.0.1:{free_port()}", secret_name="s",
                    secret_key="k")
    key = runtime_server.add_tenant("apideaddedic", endpoint=dead,
                                    endpoint_api_key=UPSTREAM_KEY)["main"]
    with pytest.raises(anthropic.APIStatusError) as caught:
        hello(sdk(runtime_server, key), "must not reach the shared endpoint")
    assert caught.value.status_code == 502
    assert not [r for r in runtime_server.stub.received
                if r.body["messages"][0]["content"] == "must not reach the shared endpoint"]
    key = runtime_server.add_tenant("apinokey", endpoint=mine)["main"]
    with pytest.raises(anthropic.APIStatusError) as unconfigured:
        hello(sdk(runtime_server, key))
    assert unconfigured.value.status_code == 503


def test_redis_down_fails_closed_with_503_and_not_ready(
        upstream_stub: tuple[str, object]) -> None:
    from pydantic import SecretStr
    from runtime_helpers import serve, tenant_config
    from tenantry_devenv.processes import free_port
    from tenantry_runtime.api_keys import generate_key, record_for
    from tenantry_runtime.app import create_app
    from tenantry_runtime.settings import RuntimeSettings
    from tenantry_runtime.store import TenantStore

    store = TenantStore()
    key, _ = generate_key()
    store.apply(TenantRecord(config=tenant_config("noredis"),
                             api_keys=(record_for(key, "main"),)))
    settings = RuntimeSettings(redis_url=SecretStr(f"redis://127.0.0.1:{free_port()}/0"),
                               upstream_url=upstream_stub[0],
                               upstream_api_key=SecretStr(UPSTREAM_KEY))
    before = len(upstream_stub[1].received)
    with serve(create_app(settings, store)) as url:
        client = anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as caught:
            hello(client)
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"] == "1"
        assert httpx.get(f"{url}/readyz").status_code == 503
    assert len(upstream_stub[1].received) == before


async def test_200_parallel_sdk_requests_against_a_budget_that_fits_50(
        runtime_server: RuntimeServer) -> None:
    from tenantry_runtime.limits import estimate_input_tokens, reservation

    body = httpx.Request("POST", "http://x", json={
        "max_tokens": 1024, "messages": [{"role": "user", "content": "in parallel"}],
        "model": MODEL}).content
    # The SDK serialises the same fields, give or take some bytes: with max_tokens dominating
    # the reservation, 50 fit and 51 do not even if the estimate is off by 10 tokens.
    reserve = reservation(estimate_input_tokens(len(body)), 1024)
    budget = 50 * reserve + reserve // 2
    key = runtime_server.add_tenant("apiparallel", limits={"daily_tokens": budget})["main"]
    runtime_server.stub.delay_seconds = 3.0  # every admitted request holds its reservation
    try:
        client = anthropic.AsyncAnthropic(base_url=runtime_server.url, api_key=key,
                                          max_retries=0, timeout=60)
        outcomes = await asyncio.gather(*(client.messages.create(
            model=MODEL, max_tokens=1024, messages=[{"role": "user", "content": "in parallel"}])
            for _ in range(200)), return_exceptions=True)
        await client.close()
    finally:
        runtime_server.stub.delay_seconds = 0.0
    answered = [o for o in outcomes if isinstance(o, anthropic.types.Message)]
    limited = [o for o in outcomes if isinstance(o, anthropic.RateLimitError)]
    assert (len(answered), len(limited)) == (50, 150)
    spent = runtime_server.redis_client().get(limit_keys("apiparallel", datetime.now(UTC)).day)
    assert int(spent or 0) == sum(m.usage.input_tokens + m.usage.output_tokens for m in answered)
    assert int(spent or 0) <= budget


async def test_one_tenants_burst_is_capped_and_another_tenant_is_still_served(
        runtime_server: RuntimeServer, upstream_stub: tuple[str, object]) -> None:
    from pydantic import SecretStr
    from runtime_helpers import serve
    from tenantry_runtime.app import Runtime, create_app
    from tenantry_runtime.settings import RuntimeSettings

    greedy = runtime_server.add_tenant("capgreedy")["main"]
    modest = runtime_server.add_tenant("capmodest")["main"]
    settings = RuntimeSettings(
        redis_url=SecretStr(runtime_server.redis_url), upstream_url=upstream_stub[0],
        upstream_api_key=SecretStr(UPSTREAM_KEY), max_concurrent_per_tenant=3)
    runtime_server.stub.delay_seconds = 1.0
    try:
        app = create_app(settings, runtime_server.store)
        with serve(app) as url:
            def client(key: str) -> anthropic.AsyncAnthropic:
                return anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0)

            burst = [client(greedy).messages.create(
                model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "mine"}])
                for _ in range(8)]
            started = asyncio.gather(*burst, return_exceptions=True)
            await asyncio.sleep(0.3)  # the burst is in flight
            other = await client(modest).messages.create(
                model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "me too"}])
            outcomes = await started
            runtime: Runtime = app.state.runtime
            assert runtime.in_flight == {}
    finally:
        runtime_server.stub.delay_seconds = 0.0
    assert other.content[0].text == "echo: me too"
    limited = [o for o in outcomes if isinstance(o, anthropic.RateLimitError)]
    assert len(limited) == 5 and "concurrent" in limited[0].message
    assert len([o for o in outcomes if isinstance(o, anthropic.types.Message)]) == 3


async def test_the_plans_concurrency_cap_overrides_the_runtime_default_for_its_tenants(
        runtime_server: RuntimeServer) -> None:
    # The runtime's own default is 1000 in flight per tenant; the capped tenant's plan says 2.
    capped = runtime_server.add_tenant("plancapped")["main"]
    runtime_server.write(runtime_server.record("plancapped").model_copy(
        update={"max_concurrent_requests": 2}))
    roomy = runtime_server.add_tenant("planroomy")["main"]

    def client(key: str) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=runtime_server.url, api_key=key, max_retries=0)

    async def burst(key: str) -> list[Any]:
        return await asyncio.gather(*(client(key).messages.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
            for _ in range(5)), return_exceptions=True)

    runtime_server.stub.delay_seconds = 1.0
    try:
        capped_outcomes, roomy_outcomes = await asyncio.gather(burst(capped), burst(roomy))
    finally:
        runtime_server.stub.delay_seconds = 0.0
    limited = [o for o in capped_outcomes if isinstance(o, anthropic.RateLimitError)]
    assert len(limited) == 3 and "concurrent" in limited[0].message
    assert all(isinstance(o, anthropic.types.Message) for o in roomy_outcomes)


def test_images_reach_the_model_byte_for_byte(runtime_server: RuntimeServer) -> None:
    import base64

    key = runtime_server.add_tenant("apiimage")["main"]
    png = base64.b64encode(bytes(range(256)) * 8).decode()
    content = [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                            "data": png}},
               {"type": "text", "text": "what is this"}]
    message = sdk(runtime_server, key).messages.create(
        model=MODEL, max_tokens=16, messages=[{"role": "user", "content": content}])
    assert message.content[0].text == "echo: what is this"
    assert runtime_server.stub.received[-1].body["messages"][0]["content"] == content


def test_settlements_spool_to_disk_while_redis_is_away_and_replay_when_it_returns(
        upstream_stub: tuple[str, object], tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from pydantic import SecretStr
    from runtime_helpers import serve, start_redis_on, tenant_config, write_limits
    from tenantry_devenv.processes import free_port
    from tenantry_runtime.api_keys import generate_key, record_for
    from tenantry_runtime.app import Runtime, create_app
    from tenantry_runtime.settings import RuntimeSettings
    from tenantry_runtime.store import TenantStore

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    first = start_redis_on(port, tmp_path / "redis1")
    write_limits(url, "spooled")
    store = TenantStore()
    key, _ = generate_key()
    store.apply(TenantRecord(config=tenant_config("spooled"), api_keys=(record_for(key, "k"),)))
    settings = RuntimeSettings(
        redis_url=SecretStr(url), upstream_url=upstream_stub[0],
        upstream_api_key=SecretStr(UPSTREAM_KEY), spool_dir=tmp_path / "spool",
        spool_replay_seconds=0.2)
    stub = upstream_stub[1]
    app = create_app(settings, store)
    second = None
    try:
        with serve(app) as base, ThreadPoolExecutor(1) as pool:
            runtime: Runtime = app.state.runtime
            stub.delay_seconds = 1.0
            client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
            answer = pool.submit(hello, client, "served while redis goes away")
            time.sleep(0.5)  # admitted, waiting on the model
            first.stop()
            message = answer.result(timeout=30)
            stub.delay_seconds = 0.0
            assert message.content[0].text == "echo: served while redis goes away"
            assert runtime.spool is not None and runtime.spool.pending() == 1
            assert runtime.failures["settlement_lost"] == 0
            second = start_redis_on(port, tmp_path / "redis2")
            wait_for(lambda: runtime.spool is not None and runtime.spool.pending() == 0, 15,
                     "the spool to be replayed")
        [event] = usage_events(url, "spooled")
        assert event["request_id"] == message._request_id
        assert event["output_tokens"] == message.usage.output_tokens
    finally:
        stub.delay_seconds = 0.0
        first.stop()
        if second is not None:
            second.stop()

def test_every_request_of_this_module_left_the_in_flight_count(
        runtime_server: RuntimeServer) -> None:
    """Runs last here: refusals, upstream errors, broken and abandoned streams all released."""
    runtime = runtime_server.app.state.runtime
    wait_for(lambda: not runtime.background, 10, "background settlements")
    assert runtime.in_flight == {}
