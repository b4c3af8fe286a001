"""Helpers for runtime tests: serve an ASGI app with a real uvicorn on a free port, and
write tenants (config file + key hashes + Redis limits) the way the operator will."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
import uvicorn
from tenantry_devenv.processes import Process, free_port, spawn, wait_until
from tenantry_devenv.services import redis_server_binary
from tenantry_runtime.api_keys import generate_key, record_for
from tenantry_runtime.contracts.database import SHARED_SCHEMA
from tenantry_runtime.contracts.redis_keys import TenantKeys
from tenantry_runtime.contracts.runtime_config import (
    Collection,
    DatabaseLocation,
    Endpoint,
    TenantRuntimeConfig,
)
from tenantry_runtime.store import TenantRecord, TenantStore
from tenantry_runtime.upstream_stub import STUB_MODELS, StubState

MODEL = STUB_MODELS[0]
UPSTREAM_KEY = "stub-upstream-key"


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run `app` under uvicorn in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), 20, "uvicorn to start")
    if not server.started:
        raise RuntimeError("uvicorn did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def wait_for(check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def tenant_config(tenant: str, **changes: Any) -> TenantRuntimeConfig:
    base = TenantRuntimeConfig(
        revision=1, tenant=tenant, isolation="pool", suspended=False, model=MODEL,
        max_tokens_per_request=1024, endpoint=Endpoint(type="shared"),
        database=DatabaseLocation(kind="shared", schema_name=SHARED_SCHEMA),
        collection=Collection(enabled=False, table=None, dimensions=384, top_k=4, shared=True),
        redis_key_prefix=TenantKeys(tenant).prefix)
    return base.model_copy(update=changes)


DEFAULT_LIMITS = {"daily_tokens": 1_000_000, "monthly_tokens": 10_000_000,
                  "overage_allowed": 0, "requests_per_minute": 100_000,
                  "tokens_per_minute": 100_000_000, "max_tokens_per_request": 1024,
                  "suspended": 0}


def write_limits(redis_url: str, tenant: str, **changes: int) -> None:
    """The limits hash as the operator writes it, counters and holds reset."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = TenantKeys(tenant)
        for key in client.scan_iter(match=keys.pattern):
            client.delete(key)
        client.hset(keys.limits, mapping={"revision": 1, **DEFAULT_LIMITS, **changes})
    finally:
        client.close()


@dataclass
class RuntimeServer:
    url: str
    tenants_dir: Path
    redis_url: str
    stub: StubState
    store: TenantStore
    app: Any
    keys: dict[str, dict[str, str]] = field(default_factory=dict)

    def add_tenant(self, tenant: str, *, keys: dict[str, datetime | None] | None = None,
                   limits: dict[str, int] | None = None, endpoint_api_key: str | None = None,
                   **config: Any) -> dict[str, str]:
        """Write the tenant's limits and file, wait until the runtime serves it; its keys."""
        write_limits(self.redis_url, tenant, **(limits or {}))
        wanted = keys if keys is not None else {"main": None}
        issued = {name: generate_key()[0] for name in wanted}
        self.keys[tenant] = issued
        self.write(TenantRecord(
            config=tenant_config(tenant, **config),
            api_keys=tuple(record_for(issued[n], n, wanted[n]) for n in wanted),
            endpoint_api_key=endpoint_api_key))
        return issued

    def write(self, record: TenantRecord) -> None:
        """Replace the tenant's file atomically and wait until the store holds the record."""
        tenant = record.config.tenant
        self.write_raw(tenant, record_json(record))
        wait_for(lambda: self.store.get(tenant) == record, 10, f"tenant {tenant} loaded")

    def write_raw(self, tenant: str, raw: bytes) -> None:
        path = self.tenants_dir / f"{tenant}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(raw)
        os.replace(temporary, path)

    def redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def record(self, tenant: str) -> TenantRecord:
        found = self.store.get(tenant)
        assert found is not None
        return found


def record_json(record: TenantRecord) -> bytes:
    """A tenant file's bytes; pydantic masks SecretStr, so the endpoint key is revealed here."""
    data = record.model_dump(mode="json")
    for name in ("endpoint_api_key", "database_dsn"):
        secret = getattr(record, name)
        if secret is not None:
            data[name] = secret.get_secret_value()
    return dumps(data)


def usage_events(redis_url: str, tenant: str) -> list[dict[str, Any]]:
    """The tenant's usage events, oldest first (each entry's request id checked)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        entries = client.xrange(TenantKeys(tenant).prefix + "usage")
        events = [json.loads(fields["event"]) for _, fields in entries]
        assert [f["request_id"] for _, f in entries] == [e["request_id"] for e in events]
        return events
    finally:
        client.close()


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def start_redis_on(port: int, workdir: Path) -> Process:
    """A redis-server on a given port, so a test can stop it and start another in its place."""
    workdir.mkdir(parents=True, exist_ok=True)
    process = spawn("redis-server", [
        redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", workdir], workdir / f"redis-{port}.log")
    wait_until("redis-server to answer PING", lambda: bool(redis.Redis(
        port=port, socket_timeout=1).ping()), process, 30)
    return process


@dataclass
class KubeRuntime:
    """A runtime served from the control plane's tenant records (conftest kube_runtime_server)."""

    url: str
    store: TenantStore
    app: Any
