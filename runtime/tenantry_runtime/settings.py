"""The runtime's one settings object, read from TENANTRY_RUNTIME_* environment variables."""

from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from .limits import SETTLED_MARKER_TTL_SECONDS

# Mounted into every Pod with a service account token: the namespace the Pod runs in.
_POD_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _own_namespace() -> str:
    try:
        return _POD_NAMESPACE_FILE.read_text().strip() or "tenantry-system"
    except OSError:
        return "tenantry-system"


class RuntimeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TENANTRY_RUNTIME_", env_nested_delimiter="__")

    # Tenant configs and key hashes (the directory source; the ConfigMap watch comes later).
    tenants_dir: Path | None = Field(
        None, description="Directory of <tenant>.json files: runtime config + API key hashes."
    )
    config_poll_seconds: float = Field(
        1.0, gt=0, description="How often the tenants directory is re-read (revocation delay)."
    )

    # Tenant records from Kubernetes (API keys area): the Secrets the operator writes into the
    # runtime's own namespace (contracts/runtime_record.py); takes the place of tenants_dir.
    config_source: Literal["directory", "kubernetes"] = Field(
        "directory", description="Where tenant records come from: tenants_dir, or Kubernetes."
    )
    kube_namespace: str = Field(
        default_factory=_own_namespace, min_length=1,
        description="The runtime's namespace (the Pod's own in a cluster): its records only.",
    )

    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"), description="Redis holding limits and counters."
    )
    redis_timeout_seconds: float = Field(0.5, gt=0, description="Socket timeout for Redis.")

    # Shared upstream (Anthropic or the local stub).
    upstream_url: str = Field("https://api.anthropic.com", description="Shared endpoint URL.")
    upstream_api_key: SecretStr = Field(SecretStr(""), description="Key of the shared endpoint.")
    upstream_connect_timeout_seconds: float = Field(5.0, gt=0)
    upstream_read_timeout_seconds: float = Field(
        600.0, gt=0, description="Longest silence between two bytes from the upstream."
    )
    upstream_max_connections: int = Field(256, ge=1, description="Pool size per endpoint.")
    upstream_retries: int = Field(
        2, ge=0, le=10, description="Retries on 429/5xx/connection errors before the first byte."
    )
    upstream_backoff_seconds: float = Field(0.25, ge=0, description="First retry delay.")
    upstream_backoff_max_seconds: float = Field(4.0, ge=0, description="Longest retry delay.")

    # Admission.
    max_body_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="Largest request body (Anthropic's is 32 MB)."
    )
    max_concurrent_per_tenant: int = Field(
        64, ge=1, description="Requests of one tenant in flight per replica; more get 429."
    )
    abandoned_stream_seconds: float = Field(
        300.0, gt=0, description="How long a stream whose client left is read on, for billing."
    )
    hold_seconds: int = Field(
        900, ge=1, description="A budget hold expires on its own after this (runtime died)."
    )

    spool_dir: Path | None = Field(
        None, description="Where settlements wait (fsync'd) while Redis is unreachable."
    )
    spool_replay_seconds: float = Field(1.0, gt=0, description="How often the spool is retried.")
    # Settlement idempotency (settle.lua's per-request marker).
    settled_marker_seconds: int = Field(
        SETTLED_MARKER_TTL_SECONDS, ge=60,
        description="How long a request id stays marked settled in Redis: a spool replay within"
        " it is never charged twice; ~35-110 bytes of Redis memory per request (buckets of"
        " 2 s per tenant, bench/settled_markers.py)."
    )
    price_table: Path | None = Field(
        None, description="A prices.json to use instead of the one shipped with the runtime."
    )

    # Metering into Postgres (off when unset: events stay in the tenants' Redis streams).
    database_url: SecretStr | None = Field(
        None, description="DSN of the shared Postgres that ai_usage_logs of pool tenants live in."
    )
    usage_flush_seconds: float = Field(1.0, gt=0, description="How often usage is written.")
    usage_batch: int = Field(500, ge=1, le=10_000, description="Events per insert batch.")
    replica_name: str = Field(
        default_factory=socket.gethostname, description="Consumer name in the usage group."
    )

    # RAG, conversations and response sanitizing (docs/runtime.md "RAG").
    embeddings_provider: Literal["local", "openai", "voyage"] = Field(
        "local", description="local: all-MiniLM-L6-v2 in-process (384 dims); openai: any "
        "OpenAI-compatible /v1/embeddings (TEI, vLLM, Ollama); voyage: Voyage's API."
    )
    embeddings_url: str = Field("", description="Base URL of the HTTP embeddings endpoint.")
    embeddings_api_key: SecretStr = Field(SecretStr(""), description="Its bearer key.")
    embeddings_model: str = Field("all-MiniLM-L6-v2", description="Model named to the endpoint.")
    embeddings_dimensions: int | None = Field(
        None, ge=1, le=2000, description="What the HTTP endpoint yields (checked per answer)."
    )
    rag_default: bool = Field(
        True, description="RAG on for tenants whose collection is enabled, unless the request "
        "says `tenantry-rag: off`; with False only `tenantry-rag: on` turns it on."
    )
    rag_chunk_chars: int = Field(800, ge=100, le=20_000, description="Chunk size (characters).")
    rag_chunk_overlap: int = Field(100, ge=0, le=5_000, description="Overlap between chunks.")
    rag_max_document_chars: int = Field(
        1_000_000, ge=1, description="Largest document text accepted by POST /v1/documents."
    )
    rag_max_top_k: int = Field(50, ge=1, le=1000, description="Largest top_k a search may ask.")
    tenant_pool_size: int = Field(
        8, ge=1, le=100, description="Connections per database pool (shared, and per DSN)."
    )
    sanitize_responses: bool = Field(
        True, description="Redact other tenants' names and document ids from answers."
    )

    # Metrics, failure modes and saturation (docs/runtime.md "Usage, metrics, ...").
    metrics_token: SecretStr | None = Field(
        None, description="Bearer token /metrics requires (tenant ids are in the metrics and "
        "tenant apps reach the same port): set it in production."
    )
    metrics_max_tenants: int = Field(
        200, ge=0, description="Tenants with their own metrics label; later ones are 'other'."
    )
    expected_replicas: int = Field(
        1, ge=1, description="Replicas sharing the rate limits while Redis is unreachable."
    )
    max_in_flight: int = Field(
        1024, ge=0, description="Admitted requests in flight per worker (0: no cap); at the "
        "cap, higher plan tiers are admitted first."
    )
    saturation_wait_seconds: float = Field(
        5.0, ge=0, description="How long a request waits for a slot at the cap before 529."
    )


@lru_cache(maxsize=1)
def get_settings() -> RuntimeSettings:
    return RuntimeSettings()
