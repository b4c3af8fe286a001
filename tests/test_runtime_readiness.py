"""GET /readyz: tenant records, Redis and Postgres; GET /readyz/local: the tenant records only
(the chart's readiness probe: every replica shares Redis and Postgres, so their outage must not
take every replica out of the Service while fail-open tenants and chat can still be served)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from runtime_helpers import serve
from tenantry_devenv.processes import free_port
from tenantry_runtime.app import create_app
from tenantry_runtime.settings import RuntimeSettings
from tenantry_runtime.store import TenantStore


def dead_url(scheme: str) -> str:
    return f"{scheme}://x:y@127.0.0.1:{free_port()}/0"


def test_local_readiness_counts_only_the_tenant_records() -> None:
    settings = RuntimeSettings(redis_url=SecretStr(dead_url("redis")),
                               database_url=SecretStr(dead_url("postgresql")))
    with serve(create_app(settings, TenantStore())) as url:  # a given store counts as loaded
        full = httpx.get(f"{url}/readyz", timeout=10)
        local = httpx.get(f"{url}/readyz/local", timeout=10)
    assert full.status_code == 503
    assert [p.split(":")[0] for p in full.json()["problems"]] == ["redis", "postgres"]
    assert local.status_code == 200 and local.json()["status"] == "ready"


def test_records_not_loaded_is_never_ready(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The Kubernetes source against an API server that is not there: no list, no records.
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""apiVersion: v1
kind: Config
current-context: gone
clusters: [{{name: gone, cluster: {{server: "http://127.0.0.1:{free_port()}"}}}}]
users: [{{name: gone, user: {{token: x}}}}]
contexts: [{{name: gone, context: {{cluster: gone, user: gone}}}}]
""")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    settings = RuntimeSettings(config_source="kubernetes", kube_namespace="nowhere",
                               redis_url=SecretStr(dead_url("redis")))
    with serve(create_app(settings, TenantStore())) as url:
        for path in ("/readyz", "/readyz/local"):
            ready = httpx.get(f"{url}{path}", timeout=10)
            assert ready.status_code == 503
            assert "tenant configs not loaded" in ready.json()["problems"]
