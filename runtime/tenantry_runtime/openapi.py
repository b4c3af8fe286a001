"""The parts of /openapi.json FastAPI cannot infer: the routes read their JSON bodies, query
strings and keys themselves (one parse, Anthropic's errors), so their request bodies, the
`x-api-key` / bearer credentials and the error shape are described here, on the generated
description. Clients, docs and the schemathesis test (tests/test_runtime_schemathesis.py) read
it; the routes' own checks stay the authority."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

Schema = dict[str, Any]

ERROR: Schema = {
    "type": "object", "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {"type": "object", "required": ["type", "message"], "properties": {
            "type": {"type": "string", "enum": [
                "invalid_request_error", "authentication_error", "permission_error",
                "not_found_error", "request_too_large", "rate_limit_error", "api_error",
                "overloaded_error"]},
            "message": {"type": "string"}}},
    },
}
_CONTENT_BLOCK: Schema = {"type": "object", "required": ["type"],
                          "properties": {"type": {"type": "string"}, "text": {"type": "string"}}}
_MESSAGE: Schema = {
    "type": "object", "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["user", "assistant"]},
        "content": {"oneOf": [{"type": "string"},
                              {"type": "array", "items": _CONTENT_BLOCK}]},
    },
}
_SYSTEM: Schema = {"oneOf": [{"type": "string"}, {"type": "array", "items": _CONTENT_BLOCK}]}
_COUNT_TOKENS: Schema = {
    "type": "object", "required": ["model", "messages"],
    "properties": {"model": {"type": "string"}, "messages": {"type": "array", "items": _MESSAGE},
                   "system": _SYSTEM},
}
_MESSAGES: Schema = {
    "type": "object", "required": ["model", "max_tokens", "messages"],
    "properties": {**_COUNT_TOKENS["properties"],
                   "max_tokens": {"type": "integer", "minimum": 1},
                   "stream": {"type": "boolean"},
                   "temperature": {"type": "number", "minimum": 0, "maximum": 1}},
}
_DOCUMENT: Schema = {
    "type": "object", "required": ["text"],
    "properties": {"text": {"type": "string", "minLength": 1},
                   "title": {"type": "string", "maxLength": 1000},
                   "metadata": {"type": "object"}},
}
_SEARCH: Schema = {
    "type": "object", "required": ["query"],
    "properties": {"query": {"type": "string", "minLength": 1},
                   "top_k": {"type": "integer", "minimum": 1}},
}
# Request bodies by (path, method).
BODIES: dict[tuple[str, str], Schema] = {
    ("/v1/messages", "post"): _MESSAGES,
    ("/v1/messages/count_tokens", "post"): _COUNT_TOKENS,
    ("/v1/documents", "post"): _DOCUMENT,
    ("/v1/search", "post"): _SEARCH,
}
_DAY = {"type": "string", "format": "date"}
_END_USER: Schema = {
    "name": "tenantry-end-user", "in": "header", "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 256},
    "description": "The tenant's end user a conversation belongs to."}
# Query and header parameters by (path, method).
PARAMETERS: dict[tuple[str, str], list[Schema]] = {
    ("/v1/messages", "post"): [
        {"name": "tenantry-conversation-id", "in": "header", "required": False,
         "schema": {"type": "string", "format": "uuid"},
         "description": "Store the turns under this conversation (needs an end user)."},
        _END_USER],
    ("/v1/conversations/{conversation_id}", "get"): [_END_USER],
    ("/v1/usage", "get"): [
        {"name": "from", "in": "query", "required": False, "schema": _DAY,
         "description": "First day (UTC), default the first of this month."},
        {"name": "to", "in": "query", "required": False, "schema": _DAY,
         "description": "Last day (UTC), default today."}],
}
# Routes anyone may call: the probes. /metrics has its own optional token.
OPEN = {"/healthz", "/readyz", "/readyz/local", "/metrics"}


def describe(schema: Schema) -> Schema:
    """Add bodies, query and header parameters, credentials and the error shape, in place
    (idempotent)."""
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {})["Error"] = ERROR
    components["securitySchemes"] = {
        "ApiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        "Bearer": {"type": "http", "scheme": "bearer"},
    }
    error = {"description": "An error in Anthropic's shape.",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            body = BODIES.get((path, method))
            if body is not None:
                operation["requestBody"] = {"required": True,
                                            "content": {"application/json": {"schema": body}}}
            known = {p["name"] for p in operation.get("parameters", [])}
            operation["parameters"] = [*operation.get("parameters", []), *(
                p for p in PARAMETERS.get((path, method), []) if p["name"] not in known)]
            if not operation["parameters"]:
                del operation["parameters"]
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)  # FastAPI's validation error: answered as a 400 here
            responses["4XX"] = error
            if path not in OPEN:
                operation["security"] = [{"ApiKey": []}, {"Bearer": []}]
    return schema


def install(app: FastAPI) -> None:
    """Make `app.openapi()` (and /openapi.json) return the described schema."""
    generate: Callable[[], Schema] = app.openapi

    def openapi() -> Schema:
        return describe(generate())

    app.openapi = openapi  # type: ignore[method-assign]
