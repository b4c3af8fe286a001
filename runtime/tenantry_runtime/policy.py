"""Pure per-request decisions on an authenticated caller: who may call, what, and where to."""

from __future__ import annotations

from collections.abc import Mapping

from .errors import ApiError
from .messages import MessagesRequest
from .settings import RuntimeSettings
from .store import TenantRecord
from .upstream import Endpoint


def api_key_of(headers: Mapping[str, str]) -> str | None:
    """The key from `x-api-key`, else from `Authorization: Bearer`."""
    key = headers.get("x-api-key")
    if key:
        return key
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def check_tenant_active(record: TenantRecord) -> None:
    if record.config.suspended:
        raise ApiError("permission_error", "This tenant is suspended.")


def check_model(record: TenantRecord, model: str) -> None:
    if model != record.config.model:
        raise ApiError("invalid_request_error",
                       f"model: {model!r} is not available to this tenant; use "
                       f"{record.config.model!r}.")


def check_request(record: TenantRecord, request: MessagesRequest) -> None:
    """Suspended -> 403; another model or max_tokens above the tenant's limit -> 400."""
    check_tenant_active(record)
    check_model(record, request.model)
    limit = record.config.max_tokens_per_request
    if request.max_tokens > limit:
        raise ApiError("invalid_request_error",
                       f"max_tokens: {request.max_tokens} exceeds this tenant's limit of {limit}.")


def endpoint_for(record: TenantRecord, settings: RuntimeSettings) -> Endpoint:
    """The tenant's endpoint; a dedicated tenant never falls back to the shared one."""
    endpoint = record.config.endpoint
    if endpoint.type == "shared":
        return Endpoint("shared", settings.upstream_url,
                        settings.upstream_api_key.get_secret_value())
    if not endpoint.url or record.endpoint_api_key is None:
        raise ApiError("api_error", "This tenant's dedicated endpoint is not configured.",
                       status=503)
    return Endpoint("dedicated", endpoint.url, record.endpoint_api_key.get_secret_value())
