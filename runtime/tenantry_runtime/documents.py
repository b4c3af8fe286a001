"""Routes for the tenant's documents, search and conversations (all as the caller's tenant)."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from .app import Runtime, admitted_caller, read_body
from .contracts.runtime_config import TenantRuntimeConfig
from .errors import ApiError
from .messages import parse_json_object
from .policy import check_tenant_active
from .rag import (
    END_USER_HEADER,
    Rag,
    chunk_text,
    delete_document,
    insert_document,
    list_documents,
    parse_uuid,
    read_conversation,
    reject_nul,
    require_collection,
)
from .store import Caller

router = APIRouter()


def rag_of(request: Request) -> Rag:
    rag: Rag = request.app.state.rag
    return rag


async def caller_of(request: Request) -> Caller:
    """The authenticated, active caller, admitted by its requests/min: these routes embed
    (CPU, or a paid embeddings API) and query the tenant's database."""
    runtime: Runtime = request.app.state.runtime
    caller = await admitted_caller(runtime, request)
    check_tenant_active(caller.record)
    return caller


def _string(body: dict[str, Any], name: str, *, required: bool, limit: int) -> str:
    value = body.get(name, None if required else "")
    if not isinstance(value, str) or (required and not value.strip()):
        raise ApiError("invalid_request_error", f"{name}: a non-empty string is required."
                       if required else f"{name}: must be a string.")
    if len(value) > limit:
        raise ApiError("invalid_request_error", f"{name}: at most {limit} characters.")
    return value


def _top_k(body: dict[str, Any], config: TenantRuntimeConfig, largest: int) -> int:
    k = body.get("top_k", config.collection.top_k)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= largest:
        raise ApiError("invalid_request_error", f"top_k: an integer within 1..{largest}.")
    return k


@router.post("/v1/documents")
async def create_document(request: Request) -> Response:
    """Body `{"text", "title"?, "metadata"?}`: stored, chunked, embedded."""
    caller = await caller_of(request)
    rag = rag_of(request)
    settings = rag.settings
    body = parse_json_object(await read_body(request, settings.max_body_bytes))
    require_collection(caller.config)
    text = _string(body, "text", required=True, limit=settings.rag_max_document_chars)
    title = _string(body, "title", required=False, limit=1000)
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ApiError("invalid_request_error", "metadata: must be an object.")
    for name, value in (("text", text), ("title", title), ("metadata", metadata)):
        reject_nul(value, name)
    chunks = chunk_text(text, settings.rag_chunk_chars, settings.rag_chunk_overlap)
    vectors = await rag.embed(caller.config, chunks, "document")
    tenant, new_id = caller.config.tenant, uuid.uuid4()
    # Registered (sanitize.py: other tenants' answers redact it on every replica) before it
    # exists, so no answer can hold an id the registry has not seen.
    registry = rag.sanitizer.registry
    if registry is not None:
        await registry.register(tenant, [str(new_id)])
    try:
        document_id, created_at = await rag.databases.write(
            tenant, lambda conn, record: insert_document(conn, record, new_id, title, text,
                                                         metadata, chunks, vectors))
    except Exception:
        if registry is not None:
            await registry.forget(tenant, [str(new_id)])
        raise
    rag.sanitizer.documents.add(tenant, document_id)
    return JSONResponse({"type": "document", "id": document_id, "title": title,
                         "metadata": metadata, "chunks": len(chunks),
                         "created_at": created_at.isoformat()}, status_code=201)


@router.get("/v1/documents")
async def get_documents(request: Request, limit: int = 20, after_id: str | None = None
                        ) -> Response:
    """The tenant's documents, oldest first: `limit` (1..100) after `after_id`."""
    caller = await caller_of(request)
    rag = rag_of(request)
    if not 1 <= limit <= 100:
        raise ApiError("invalid_request_error", "limit: an integer within 1..100.")
    after = None
    if after_id is not None:
        try:
            after = uuid.UUID(after_id)
        except ValueError:
            raise ApiError("invalid_request_error", "after_id: must be a document id.") from None
    config = caller.config
    rows = await rag.databases.read(caller.record,
                                    lambda conn: list_documents(conn, config, limit + 1, after))
    page = rows[:limit]
    for row in page:
        rag.sanitizer.documents.add(config.tenant, row["id"])
    return JSONResponse({"data": page, "has_more": len(rows) > limit,
                         "first_id": page[0]["id"] if page else None,
                         "last_id": page[-1]["id"] if page else None})


@router.delete("/v1/documents/{document_id}")
async def remove_document(document_id: str, request: Request) -> Response:
    """The document and its chunks; 404 for an id the tenant does not have."""
    caller = await caller_of(request)
    rag = rag_of(request)
    wanted = parse_uuid(document_id, "document")
    deleted = await rag.databases.write(
        caller.config.tenant, lambda conn, record: delete_document(conn, record, wanted))
    if not deleted:
        raise ApiError("not_found_error", f"document {document_id} not found.")
    rag.sanitizer.documents.discard(document_id)
    if rag.sanitizer.registry is not None:
        await rag.sanitizer.registry.forget(caller.config.tenant, [str(wanted)])
    return JSONResponse({"type": "document_deleted", "id": str(wanted)})


@router.post("/v1/search")
async def search(request: Request) -> Response:
    """Body `{"query", "top_k"?}`: the nearest chunks of the tenant's own documents."""
    caller = await caller_of(request)
    rag = rag_of(request)
    body = parse_json_object(await read_body(request, rag.settings.max_body_bytes))
    query = _string(body, "query", required=True, limit=100_000)
    k = _top_k(body, caller.config, rag.settings.rag_max_top_k)
    hits = await rag.search(caller.record, query, k)
    return JSONResponse({"data": [hit.as_json() for hit in hits]})


@router.get("/v1/conversations/{conversation_id}")
async def get_conversation(conversation_id: str, request: Request) -> Response:
    """The stored turns; with `tenantry-end-user` only that end user's."""
    caller = await caller_of(request)
    rag = rag_of(request)
    wanted = parse_uuid(conversation_id, "conversation")
    end_user = request.headers.get(END_USER_HEADER)
    config = caller.config
    found = await rag.databases.read(
        caller.record, lambda conn: read_conversation(conn, config, wanted, end_user))
    if found is None:
        raise ApiError("not_found_error", f"conversation {conversation_id} not found.")
    return JSONResponse(found)
