"""Pure parts of the runtime: keys, policy, parsing, limits arithmetic, store, stub answers."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr
from runtime_helpers import MODEL, tenant_config
from tenantry_runtime.api_keys import generate_key, key_matches, prefix_of, record_for
from tenantry_runtime.contracts.runtime_config import Endpoint
from tenantry_runtime.errors import ApiError
from tenantry_runtime.limits import Usage, Verdict, ms_to_period_ends, refusal
from tenantry_runtime.messages import (
    MessagesRequest,
    StreamUsage,
    parse_messages_request,
    usage_of_message,
)
from tenantry_runtime.policy import api_key_of, check_request, endpoint_for
from tenantry_runtime.settings import RuntimeSettings
from tenantry_runtime.spool import SettlementSpool
from tenantry_runtime.store import DirectorySource, Outcome, TenantRecord, TenantStore
from tenantry_runtime.upstream import backoff_delay, forwarded_headers, upstream_error
from tenantry_runtime.upstream_stub import StubState, answer, stream_events

# --- keys ---------------------------------------------------------------------------------------


def test_generated_keys_parse_and_match_only_their_own_hash() -> None:
    key, prefix = generate_key()
    assert key.startswith(f"sk-tnt-{prefix}-") and prefix_of(key) == prefix
    record = record_for(key, "main")
    assert record.sha256 != key and key not in record.model_dump_json()
    assert key_matches(key, record)
    assert not key_matches(key[:-1] + ("a" if key[-1] != "a" else "b"), record)
    assert not key_matches(generate_key()[0], record)


def test_malformed_keys_have_no_prefix() -> None:
    for key in ("", "sk-ant-api03-xyz", "sk-tnt-short-secret", "sk-tnt-ABCDEFGHIJKL-" + "x" * 40):
        assert prefix_of(key) is None


def test_expiry_is_checked_against_now() -> None:
    key, _ = generate_key()
    at = datetime(2030, 1, 1, tzinfo=UTC)
    record = record_for(key, "main", expires_at=at)
    assert key_matches(key, record, now=at - timedelta(seconds=1))
    assert not key_matches(key, record, now=at)


def test_naive_expiry_is_refused() -> None:
    key, _ = generate_key()
    with pytest.raises(ValueError, match="timezone"):
        record_for(key, "main", expires_at=datetime(2030, 1, 1))


# --- policy -------------------------------------------------------------------------------------


def test_api_key_from_x_api_key_or_bearer() -> None:
    assert api_key_of({"x-api-key": "k1"}) == "k1"
    assert api_key_of({"authorization": "Bearer k2"}) == "k2"
    assert api_key_of({"authorization": "bearer  k3 "}) == "k3"
    assert api_key_of({"authorization": "Basic k4"}) is None
    assert api_key_of({"authorization": "Bearer "}) is None
    assert api_key_of({}) is None


def record(**changes: object) -> TenantRecord:
    return TenantRecord(config=tenant_config("unit", **changes))


def test_check_request_refuses_suspended_other_models_and_too_many_tokens() -> None:
    ok = MessagesRequest(model=MODEL, max_tokens=1024, stream=False)
    check_request(record(), ok)
    with pytest.raises(ApiError) as suspended:
        check_request(record(suspended=True), ok)
    assert suspended.value.status == 403
    with pytest.raises(ApiError) as too_many:
        check_request(record(max_tokens_per_request=1023), ok)
    assert (too_many.value.status, too_many.value.kind) == (400, "invalid_request_error")
    with pytest.raises(ApiError):
        check_request(record(), MessagesRequest(model="other", max_tokens=1, stream=False))


def test_a_dedicated_tenant_never_falls_back_to_the_shared_endpoint() -> None:
    settings = RuntimeSettings(upstream_url="http://shared", upstream_api_key=SecretStr("s"))
    assert endpoint_for(record(), settings).url == "http://shared"
    dedicated = Endpoint(type="dedicated", url="http://mine", secret_name="x", secret_key="k")
    with pytest.raises(ApiError) as missing_key:
        endpoint_for(record(endpoint=dedicated), settings)
    assert missing_key.value.status == 503
    with_key = TenantRecord(config=tenant_config("unit", endpoint=dedicated),
                            endpoint_api_key=SecretStr("dk"))
    chosen = endpoint_for(with_key, settings)
    assert (chosen.kind, chosen.url, chosen.api_key) == ("dedicated", "http://mine", "dk")


# --- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"max_tokens": 5, "messages": [{}]}',
    b'{"model": "m", "max_tokens": 0, "messages": [{}]}',
    b'{"model": "m", "max_tokens": true, "messages": [{}]}',
    b'{"model": "m", "max_tokens": 5, "messages": []}',
    b'{"model": "m", "max_tokens": 5, "messages": [{}], "stream": "yes"}',
])
def test_bad_requests_are_400(body: bytes) -> None:
    with pytest.raises(ApiError) as caught:
        parse_messages_request(body)
    assert caught.value.status == 400


def test_stream_usage_survives_any_chunking() -> None:
    message = answer({"model": MODEL, "max_tokens": 50,
                      "messages": [{"role": "user", "content": "a b c"}]}, StubState())
    raw = b"".join(stream_events(message))
    for size in (1, 7, 64, len(raw)):
        seen = StreamUsage()
        for at in range(0, len(raw), size):
            seen.feed(raw[at:at + size])
        assert seen.completed and not seen.errored
        assert seen.usage == Usage(input_tokens=3, output_tokens=4)


def test_stream_usage_reads_crlf_events_and_errors_in_any_chunking() -> None:
    message = answer({"model": MODEL, "max_tokens": 50,
                      "messages": [{"role": "user", "content": "a b c"}]}, StubState())
    events = stream_events(message)
    raw = b"".join(events).replace(b"\n", b"\r\n")
    broken = b"".join(events[:-2]) + b'event: error\ndata: {"type":"error"}\n\n'
    for size in (1, 2, 5, 64, len(raw)):
        seen = StreamUsage()
        for at in range(0, len(raw), size):
            seen.feed(raw[at:at + size])
        assert seen.completed and seen.usage == Usage(input_tokens=3, output_tokens=4)
        seen = StreamUsage()
        for at in range(0, len(broken), size):
            seen.feed(broken[at:at + size])
        assert seen.errored and not seen.completed
        assert seen.usage == Usage(input_tokens=3, output_tokens=1)  # message_start's count


def test_usage_of_a_message_body() -> None:
    body = json.dumps({"usage": {"input_tokens": 3, "output_tokens": 2,
                                 "cache_read_input_tokens": 5}}).encode()
    assert usage_of_message(body) == Usage(3, 2, 0, 5)
    assert usage_of_message(b"garbage") == Usage()
    assert usage_of_message(b"\xef\xbb\xbf" + body) == Usage(3, 2, 0, 5)  # a BOM, as json.loads
    assert Usage(3, 2, 1, 5).charged == 11


# --- limits arithmetic --------------------------------------------------------------------------


def test_period_ends() -> None:
    day, month = ms_to_period_ends(datetime(2026, 2, 28, 23, 59, 59, tzinfo=UTC))
    assert (day, month) == (1000, 1000)
    day, month = ms_to_period_ends(datetime(2026, 12, 31, 0, 0, tzinfo=UTC))
    assert (day, month) == (86_400_000, 86_400_000)
    day, month = ms_to_period_ends(datetime(2026, 1, 1, tzinfo=UTC))
    assert (day, month) == (86_400_000, 31 * 86_400_000)


def test_refusals_map_to_anthropic_statuses() -> None:
    assert refusal(Verdict.ADMITTED, 0) is None
    expected = {Verdict.SUSPENDED: 403, Verdict.NOT_PROVISIONED: 503,
                Verdict.REQUESTS_PER_MINUTE: 429, Verdict.TOKENS_PER_MINUTE: 429,
                Verdict.DAILY_BUDGET: 429, Verdict.MONTHLY_BUDGET: 429,
                Verdict.RESERVATION_OVER_TOKENS_PER_MINUTE: 400}
    for verdict, status in expected.items():
        error = refusal(verdict, 1500)
        assert error is not None and error.status == status
    limited = refusal(Verdict.DAILY_BUDGET, 1500)
    assert limited is not None
    assert limited.headers() == {"retry-after": "2", "retry-after-ms": "1500"}
    tomorrow = refusal(Verdict.DAILY_BUDGET, 3_600_000)
    assert tomorrow is not None and tomorrow.headers()["x-should-retry"] == "false"


# --- upstream decisions -------------------------------------------------------------------------


def test_backoff_honours_a_short_retry_after_and_caps_the_rest() -> None:
    assert backoff_delay(0, 0.25, 4.0, "2") == 2.0
    assert 2.0 <= backoff_delay(5, 0.25, 4.0, "60") <= 4.0
    assert 0.125 <= backoff_delay(0, 0.25, 4.0, None) <= 0.25


def test_upstream_credential_failures_are_not_the_tenants_401() -> None:
    error = upstream_error(401, b'{"type":"error","error":{"type":"authentication_error",'
                                b'"message":"bad"}}')
    assert (error.status, error.kind) == (502, "api_error")
    passed = upstream_error(529, b'{"type":"error","error":{"type":"overloaded_error",'
                                 b'"message":"busy"}}')
    assert (passed.status, passed.kind, passed.message) == (529, "overloaded_error", "busy")
    assert upstream_error(503, b"<html>").kind == "api_error"


def test_only_model_headers_travel_upstream() -> None:
    from tenantry_runtime.upstream import Endpoint as Upstream

    sent = forwarded_headers({"x-api-key": "tenant", "authorization": "Bearer tenant",
                              "anthropic-beta": "b", "cookie": "c"}, Upstream("shared", "u", "up"))
    assert sent == {"anthropic-beta": "b", "anthropic-version": "2023-06-01", "x-api-key": "up",
                    "content-type": "application/json"}


# --- store --------------------------------------------------------------------------------------


def test_store_keeps_newer_ignores_stale_and_refuses_bad_tenant_ids() -> None:
    store = TenantStore()
    key, _ = generate_key()
    first = TenantRecord(config=tenant_config("acme", revision=2),
                         api_keys=(record_for(key, "main"),))
    assert store.apply(first) is Outcome.APPLIED
    assert store.apply(first) is Outcome.UNCHANGED
    stale = TenantRecord(config=tenant_config("acme", revision=1))
    assert store.apply(stale) is Outcome.STALE
    caller = store.authenticate(key)
    assert caller is not None and caller.config.revision == 2
    bad = TenantRecord(config=tenant_config("acme").model_copy(update={"tenant": "Acme;drop"}))
    assert store.apply(bad) is Outcome.REFUSED and store.refused["invalid_tenant_id"] == 1
    twice = TenantRecord(config=tenant_config("acme", revision=3),
                         api_keys=(record_for(key, "a"), record_for(key, "b")))
    assert store.apply(twice) is Outcome.REFUSED and store.refused["key_prefix_conflict"] == 1
    newer = TenantRecord(config=tenant_config("acme", revision=3))
    assert store.apply(newer) is Outcome.APPLIED
    assert store.authenticate(key) is None  # the newer record no longer lists the key


def test_directory_source_refuses_invalid_files_and_forgets_deleted_ones(tmp_path: Path) -> None:
    store = TenantStore()
    source = DirectorySource(tmp_path, store)
    good = TenantRecord(config=tenant_config("acme"))
    (tmp_path / "acme.json").write_text(good.model_dump_json())
    (tmp_path / "other.json").write_text(good.model_dump_json())  # names another tenant
    source.sync()
    assert store.tenants() == ["acme"] and store.refused["name_mismatch"] == 1
    (tmp_path / "acme.json").write_text('{"config": {}}')
    source.sync()
    assert store.get("acme") == good and store.refused["invalid"] == 1
    (tmp_path / "acme.json").unlink()
    source.sync()
    assert store.tenants() == []


# --- stub ---------------------------------------------------------------------------------------


def test_stub_honours_max_tokens_stop_sequences_and_tool_choice() -> None:
    base = {"model": MODEL, "messages": [{"role": "user", "content": "one two three"}]}
    assert answer({**base, "max_tokens": 2}, StubState())["stop_reason"] == "max_tokens"
    stopped = answer({**base, "max_tokens": 9, "stop_sequences": ["three"]}, StubState())
    assert stopped["content"][0]["text"] == "echo: one two "
    tools = [{"name": "a", "input_schema": {"type": "object"}},
             {"name": "b", "input_schema": {"type": "object", "properties": {
                 "q": {"type": "string"}}, "required": ["q"]}}]
    chosen = answer({**base, "max_tokens": 9, "tools": tools,
                     "tool_choice": {"type": "tool", "name": "b"}}, StubState())
    assert chosen["content"][-1]["name"] == "b"
    assert chosen["content"][-1]["input"] == {"q": "one two three"}
    none = answer({**base, "max_tokens": 9, "tools": tools, "tool_choice": {"type": "none"}},
                  StubState())
    assert none["stop_reason"] == "end_turn"


# --- prices -------------------------------------------------------------------------------------


def test_cost_from_the_shipped_price_table() -> None:
    from decimal import Decimal

    from tenantry_runtime.pricing import load_price_table

    table = load_price_table()
    usage = Usage(input_tokens=1_000_000, output_tokens=2_000_000,
                  cache_creation_input_tokens=1_000_000, cache_read_input_tokens=10_000_000)
    assert table.cost("claude-sonnet-4-5", usage) == Decimal("3") + 30 + Decimal("3.75") + 3
    assert table.cost("claude-unknown", usage) is None
    assert table.version and table.currency == "USD"


# --- spool --------------------------------------------------------------------------------------


def test_a_worker_adopts_the_spool_files_of_workers_that_are_gone(tmp_path: Path) -> None:
    from tenantry_runtime.spool import SettlementSpool

    (tmp_path / "settlements-999999999.jsonl").write_text('{"keys": [], "args": []}\n')
    (tmp_path / "settlements-1.jsonl").write_text("")  # pid 1 runs: not an orphan
    spool = SettlementSpool(tmp_path)
    assert spool.adopt_orphans() == 1
    assert spool.adopt_orphans() == 0
    assert spool.pending() == 1
    assert (tmp_path / "settlements-1.jsonl").exists()
    assert not (tmp_path / "settlements-999999999.jsonl").exists()


def test_a_spool_file_replayed_whole_while_it_is_counted_counts_nothing(tmp_path: Path) -> None:
    """The replay unlinks a file it finished: between `pending`'s listing and its read
    (seen in CI as a FileNotFoundError from the replay test's wait)."""
    spool = SettlementSpool(tmp_path)
    spool.path.write_bytes(b'{"keys": [], "args": []}\n')
    (tmp_path / f"settlements-{os.getpid()}.adopted-1.jsonl").write_bytes(b"{}\n{}\n")
    listed = spool._files()
    spool.path.unlink()  # replayed whole right after the listing
    spool._files = lambda: listed  # type: ignore[method-assign]
    assert spool.pending() == 2
