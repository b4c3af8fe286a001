"""Runtime apps of their own for tests that need their own settings (own tenants directory,
so their usage writer drains only their tenants)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
from pydantic import SecretStr
from runtime_helpers import MODEL, UPSTREAM_KEY, RuntimeServer, serve
from tenantry_runtime.app import Runtime, create_app
from tenantry_runtime.settings import RuntimeSettings
from tenantry_runtime.store import TenantStore


@dataclass
class App:
    server: RuntimeServer
    settings: RuntimeSettings

    def client(self, tenant: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.server.url,
                                   api_key=self.server.keys[tenant]["main"], max_retries=0)

    def call(self, tenant: str, text: str, stream: bool = False) -> str:
        client = self.client(tenant)
        messages: Any = [{"role": "user", "content": text}]
        if stream:
            with client.messages.stream(model=MODEL, max_tokens=32, messages=messages) as s:
                s.get_final_message()
                return str(s.response.headers["request-id"])
        return str(client.messages.create(model=MODEL, max_tokens=32,
                                          messages=messages)._request_id)

    def get(self, path: str, tenant: str | None = None, **params: str) -> httpx.Response:
        headers = {} if tenant is None else {"x-api-key": self.server.keys[tenant]["main"]}
        return httpx.get(f"{self.server.url}{path}", params=params, timeout=10,
                         headers=headers)

    def usage(self, tenant: str, **params: str) -> httpx.Response:
        return httpx.get(f"{self.server.url}/v1/usage", params=params, timeout=10,
                         headers={"x-api-key": self.server.keys[tenant]["main"]})


@contextmanager
def running_app(tmp_path: Path, redis_url: str, stub_url: str, database_url: str | None,
                **settings: Any) -> Iterator[App]:
    """A runtime of its own (own tenants directory: its writer drains only its tenants)."""
    tenants = tmp_path / f"tenants-{secrets.token_hex(3)}"
    tenants.mkdir()
    config = RuntimeSettings(
        tenants_dir=tenants, config_poll_seconds=0.1, redis_url=SecretStr(redis_url),
        upstream_url=stub_url, upstream_api_key=SecretStr(UPSTREAM_KEY),
        database_url=None if database_url is None else SecretStr(database_url),
        usage_flush_seconds=0.1, **settings)
    store = TenantStore()
    app = create_app(config, store)
    with serve(app) as url:
        yield App(RuntimeServer(url, tenants, redis_url, None, store, app),  # type: ignore[arg-type]
                  config)


def runtime_of(app: App) -> Runtime:
    runtime: Runtime = app.server.app.state.runtime
    return runtime
