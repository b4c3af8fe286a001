"""Schemathesis against the running runtime: every operation of its /openapi.json, positive and
negative cases, with and without a tenant key, against the real app with Redis, Postgres and
the stub upstream. No answer may be a 5xx; every error is in Anthropic's shape. Bounded and
deterministic (hypothesis derandomized, a fixed number of examples per operation and mode).
The seeded fuzz in test_runtime_operations.py stays: it sends malformed bytes schemathesis
does not (broken JSON, invalid UTF-8, huge numbers)."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from db_helpers import connect, scratch_database
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from rag_helpers import RagTenants
from runtime_helpers import MODEL
from schemathesis import Case, GenerationMode
from schemathesis.core.transport import Response
from schemathesis.schemas import APIOperation
from tenantry_devenv.services import Postgres
from tenantry_operator.database import bootstrap_shared, ensure_collection, ensure_pool_tenant
from usage_helpers import App, running_app

pytestmark = pytest.mark.timeout(300)
TENANT = "schemathesis"

# Per operation and generation mode: ~600 requests in ~12 s here (150 found nothing more).
EXAMPLES = 30
ANTHROPIC_ERROR_TYPES = {
    "invalid_request_error", "authentication_error", "permission_error", "not_found_error",
    "request_too_large", "rate_limit_error", "api_error", "overloaded_error",
}


@pytest.fixture
def app(redis_server: Any, upstream_stub: tuple[str, object], postgres: Postgres,
        tmp_path: Path) -> Iterator[App]:
    """A runtime of its own with usage metering into a scratch database, where the tenant
    TENANT has its registry row and a collection (so documents, search and RAG are reached)."""
    with scratch_database(postgres, "schemathesis") as name:
        with connect(postgres, name) as conn:
            bootstrap_shared(conn)
            ensure_pool_tenant(conn, TENANT)
            ensure_collection(conn, TENANT, "shared", 384, 16, 64)
        with running_app(tmp_path, redis_server.url, upstream_stub[0],
                         postgres.dsn(name)) as running:
            yield running


def check_answer(case: Case, response: Response) -> None:
    """No 5xx; a 4xx carries `{"type": "error", "error": {"type", "message"}}`."""
    where = case.as_curl_command()
    assert response.status_code < 500, (where, response.status_code, response.text[:300])
    if response.status_code < 400:
        return
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), (
        where, response.headers, response.text[:300])
    body = response.json()
    assert body.get("type") == "error", (where, body)
    error = body.get("error")
    assert isinstance(error, dict) and error.get("type") in ANTHROPIC_ERROR_TYPES, (where, body)
    assert isinstance(error.get("message"), str) and error["message"], (where, body)


def as_the_tenant_would(case: Case) -> None:
    """The description cannot know the tenant's model or limits: half the cases ask for its
    model and a small max_tokens, so generated messages reach the upstream too."""
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = MODEL
        if isinstance(case.body.get("max_tokens"), int):
            case.body["max_tokens"] = 1 + case.body["max_tokens"] % 64


def fuzz_operation(operation: APIOperation, mode: GenerationMode, base_url: str,
                   credentials: list[dict[str, str]], session: requests.Session,
                   statuses: Counter[tuple[str, int]]) -> None:
    """Run EXAMPLES cases of one operation, counting the answers by operation and status."""

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(mode), headers=st.sampled_from(credentials),
           tenant_model=st.booleans())
    def run(case: Case, headers: dict[str, str], tenant_model: bool) -> None:
        if tenant_model:
            as_the_tenant_would(case)
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
        statuses[operation.label, response.status_code] += 1
        check_answer(case, response)

    run()


def negatable(operation: APIOperation) -> bool:
    definition = operation.definition.raw
    return bool(definition.get("requestBody") or definition.get("parameters"))


# schemathesis's negative-mode generators call `random` inside strategies (its own code, not ours).
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
def test_schemathesis_every_operation_answers_without_5xx_and_in_anthropic_error_shape(
        app: App) -> None:
    base_url = app.server.url
    key = RagTenants(app.server).pool(TENANT)
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", timeout=10)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {operation.label for operation in operations}
    assert {"POST /v1/messages", "POST /v1/messages/count_tokens", "GET /v1/usage",
            "GET /v1/models/{model_id}", "POST /v1/documents", "GET /metrics"} <= labels
    credentials = [{}, {"x-api-key": key}, {"authorization": f"Bearer {key}"},
                   {"x-api-key": key, "anthropic-version": "2023-06-01"}]
    started = time.monotonic()
    statuses: Counter[tuple[str, int]] = Counter()
    with requests.Session() as session:
        for operation in operations:
            # Negative cases need something to break: a body, a parameter or a credential.
            modes = [GenerationMode.POSITIVE] + (
                [GenerationMode.NEGATIVE] if negatable(operation) else [])
            for mode in modes:
                fuzz_operation(operation, mode, base_url, credentials, session, statuses)
    elapsed = time.monotonic() - started
    print(f"{sum(statuses.values())} requests in {elapsed:.1f} s:",  # noqa: T201 - pytest -s
          sorted(statuses.items()))
    assert sum(statuses.values()) >= len(operations) * EXAMPLES


def test_nul_characters_bound_for_postgres_are_a_clear_400(app: App) -> None:
    """Found by schemathesis: `{"text": "\\u0000"}` reached Postgres (which cannot store
    U+0000 in text or jsonb) and came back as a 503 that said to retry."""
    key = RagTenants(app.server).pool(TENANT)
    headers = {"x-api-key": key}
    bodies: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        ("/v1/documents", {"text": "a\u0000b"}, {}),
        ("/v1/documents", {"text": "ok", "title": "\u0000"}, {}),
        ("/v1/documents", {"text": "ok", "metadata": {"k\u0000": 1}}, {}),
        ("/v1/messages", {"model": MODEL, "max_tokens": 8,
                          "messages": [{"role": "user", "content": "hi\u0000"}]},
         {"tenantry-conversation-id": str(uuid.uuid4()), "tenantry-end-user": "u1"}),
    ]
    for path, body, extra in bodies:
        response = requests.post(f"{app.server.url}{path}", json=body,
                                 headers={**headers, **extra}, timeout=30)
        assert response.status_code == 400, (path, body, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert "NUL" in response.json()["error"]["message"]
    # Without a conversation nothing is stored: the message goes upstream as it is.
    response = requests.post(f"{app.server.url}/v1/messages", json=bodies[-1][1],
                             headers=headers, timeout=30)
    assert response.status_code == 200, response.text
