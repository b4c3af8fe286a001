"""RAG and conversations: documents in, chunks embedded, top-k context into the system prompt,
turns stored; all as the tenant (see tenant_data.py), answers sanitized (sanitize.py).

Per-request controls (headers, never forwarded upstream; the Messages body stays exactly what
Anthropic's API accepts):
- `tenantry-rag: on|off`: RAG for this request; default `rag_default` for tenants whose
  collection is enabled. `on` for a tenant without a collection is a 400.
- `tenantry-conversation-id: <uuid>` with `tenantry-end-user: <id>` (or the body's
  `metadata.user_id`): the request's last user message and the answer are appended to that
  conversation in the tenant's `ai_conversations`.

Chunking (`chunk_text`): windows of `rag_chunk_chars` characters overlapping by
`rag_chunk_overlap`, each cut back to the last whitespace inside the window when there is one
(so words stay whole); 800 characters are about 200 tokens, under the local model's 256.

Search: the tenant's own collection table under RLS, filtered on its tenant id again (a
literal, validated against TENANT_ID_PATTERN, so the planner can use the tenant's partial
HNSW index, as the operator's search_sql does); every hit's tenant_id is checked once more in
Python, and a foreign hit is dropped, logged as a security event and counted.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from .contracts.database import Conn, fetch_rows, validate_identifier, validate_tenant_id
from .contracts.runtime_config import TenantRuntimeConfig
from .document_registry import DocumentRegistry
from .embeddings import Embedder, EmbeddingError, HttpEmbeddings, InputType, LocalMiniLM, Vector
from .errors import ApiError
from .messages import parse_json_object
from .sanitize import RewrittenStream, Sanitizer, StreamRewriter
from .settings import RuntimeSettings
from .store import Caller, TenantRecord, TenantStore
from .tenant_data import TenantDatabases, unavailable
from .upstream import UpstreamResponse

log = logging.getLogger(__name__)

RAG_HEADER = "tenantry-rag"
CONVERSATION_HEADER = "tenantry-conversation-id"
END_USER_HEADER = "tenantry-end-user"
CONTEXT_INTRO = ("Context from this tenant's documents. Cite the document id in square brackets"
                 " when you use a passage.")


# --- pure parts ---------------------------------------------------------------------------------


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    """Overlapping windows of at most `size` characters, cut at whitespace where possible."""
    if overlap >= size:
        raise ValueError("overlap must be smaller than the chunk size")
    text = text.strip()
    chunks: list[str] = []
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = text.rfind(" ", start + size // 2, end)
            cut = max(cut, text.rfind("\n", start + size // 2, end))
            if cut > start:
                end = cut
        piece = text[start:end].strip()
        if piece:
            chunks.append(piece)
        if end >= len(text):
            break
        start = max(end - overlap, start + 1)
        # Start the next window at a word boundary too.
        space = text.find(" ", start, end)
        if 0 <= space < end and overlap:
            start = space + 1
    return chunks


def rag_wanted(header: str | None, config: TenantRuntimeConfig, default: bool) -> bool:
    """Pure: whether this request gets context; raises ApiError for a bad header value."""
    choice = (header or "").strip().lower()
    if choice not in ("", "on", "off"):
        raise ApiError("invalid_request_error", f"{RAG_HEADER} must be 'on' or 'off'.")
    if choice == "off":
        return False
    if choice == "on":
        require_collection(config)
        return True
    return default and config.collection.enabled and config.collection.table is not None


def require_collection(config: TenantRuntimeConfig) -> tuple[str, str]:
    """The tenant's collection table as (schema, table); 400 when RAG is off for it."""
    collection = config.collection
    if not collection.enabled:
        raise ApiError("invalid_request_error", "RAG is disabled for this tenant "
                       "(its Tenant's spec.rag.enabled is false): no document collection.")
    if collection.table is None:
        raise ApiError("invalid_request_error",
                       "This tenant's document collection is not provisioned yet.")
    schema, _, table = collection.table.partition(".")
    return validate_identifier(schema), validate_identifier(table)


def text_of(content: object) -> str:
    """The text of a message's content (a string or text blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(block["text"] for block in content if isinstance(block, dict)
                         and block.get("type") == "text" and isinstance(block.get("text"), str))
    return ""


def last_user_message(parsed: Mapping[str, Any]) -> dict[str, Any] | None:
    messages = parsed.get("messages")
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return message
    return None


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    document_id: str
    title: str
    content: str
    score: float
    metadata: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"document_id": self.document_id, "chunk_id": self.chunk_id, "title": self.title,
                "content": self.content, "score": round(self.score, 6),
                "metadata": self.metadata}


def context_text(hits: Sequence[Hit]) -> str:
    """Pure: the context block, each passage under its document id."""
    parts = [CONTEXT_INTRO]
    for hit in hits:
        title = f" {hit.title}" if hit.title else ""
        parts.append(f"<document id=\"{hit.document_id}\">{title}\n{hit.content}\n</document>")
    return "\n\n".join(parts)


def with_context(parsed: dict[str, Any], context: str) -> dict[str, Any]:
    """Pure: the request with `context` after the tenant's own system prompt (kept as it was,
    string or blocks)."""
    system = parsed.get("system")
    if system is None or system == "" or system == []:
        merged: str | list[Any] = context
    elif isinstance(system, str):
        merged = system + "\n\n" + context
    elif isinstance(system, list):
        merged = [*system, {"type": "text", "text": context}]
    else:
        raise ApiError("invalid_request_error", "system: must be a string or a list of blocks.")
    return {**parsed, "system": merged}


@dataclass(frozen=True)
class ConversationRef:
    id: uuid.UUID
    end_user: str


def reject_nul(value: Any, field: str) -> None:
    """Pure: 400 when a string (or object key) anywhere in `value` holds U+0000, which
    Postgres cannot store in text or jsonb; checked before anything is written."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise ApiError("invalid_request_error",
                               f"{field}: text must not contain NUL (U+0000) characters.")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def conversation_of(headers: Mapping[str, str], parsed: Mapping[str, Any]
                    ) -> ConversationRef | None:
    """Pure: the conversation a request names, if any; 400 when half-named or malformed."""
    raw = headers.get(CONVERSATION_HEADER)
    if raw is None:
        return None
    try:
        conversation = uuid.UUID(raw)
    except ValueError:
        raise ApiError("invalid_request_error",
                       f"{CONVERSATION_HEADER} must be a UUID.") from None
    metadata = parsed.get("metadata")
    user = headers.get(END_USER_HEADER) or (
        metadata.get("user_id") if isinstance(metadata, dict) else None)
    if not isinstance(user, str) or not user or len(user) > 256:
        raise ApiError("invalid_request_error", f"{CONVERSATION_HEADER} needs an end user: "
                       f"{END_USER_HEADER} or metadata.user_id (at most 256 characters).")
    # The turns are stored: their text must fit Postgres.
    reject_nul(user, "end user")
    reject_nul(parsed.get("messages"), "messages")
    return ConversationRef(conversation, user)


def parse_uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ApiError("not_found_error", f"{what} {value} not found.") from None


def vector_literal(vector: Sequence[float]) -> str:
    return "[" + ",".join(f"{v:.7g}" for v in vector) + "]"


# --- SQL (each runs inside the caller's tenant transaction) -------------------------------------


def _documents(config: TenantRuntimeConfig) -> sql.Identifier:
    return sql.Identifier(validate_identifier(config.database.schema_name), "documents")


def insert_document(conn: Conn, record: TenantRecord, document_id: uuid.UUID, title: str,
                    text: str, metadata: dict[str, Any], chunks: Sequence[str],
                    vectors: Sequence[Vector]) -> tuple[str, datetime]:
    """The document as `document_id` (chosen by the caller, so that it can be registered
    before anyone can see it) with its chunks."""
    config = record.config
    schema, table = require_collection(config)
    tenant = config.tenant
    ((document_id, created_at),) = fetch_rows(conn, sql.SQL(
        "INSERT INTO {} (id, tenant_id, title, content, metadata) VALUES (%s, %s, %s, %s, %s)"
        " RETURNING id, created_at").format(_documents(config)),
        (document_id, tenant, title, text, Jsonb(metadata)))
    with conn.cursor() as cur:
        cur.executemany(sql.SQL(
            "INSERT INTO {} (tenant_id, document_id, content, metadata, embedding)"
            " VALUES (%s, %s, %s, %s, %s::public.vector)").format(
            sql.Identifier(schema, table)),
            [(tenant, document_id, chunk, Jsonb({"chunk": n}), vector_literal(vector))
             for n, (chunk, vector) in enumerate(zip(chunks, vectors, strict=True))])
    return str(document_id), created_at


def list_documents(conn: Conn, config: TenantRuntimeConfig, limit: int,
                   after: uuid.UUID | None) -> list[dict[str, Any]]:
    after_clause = sql.SQL(
        "AND (created_at, id) > (SELECT created_at, id FROM {} WHERE tenant_id = %(t)s"
        " AND id = %(after)s)").format(_documents(config)) if after else sql.SQL("")
    rows = fetch_rows(conn, sql.SQL(
        "SELECT tenant_id, id, title, metadata, created_at, length(content) FROM {}"
        " WHERE tenant_id = %(t)s {} ORDER BY created_at, id LIMIT %(n)s").format(
        _documents(config), after_clause),
        {"t": config.tenant, "after": after, "n": limit})
    return [{"type": "document", "id": str(row[1]), "title": row[2], "metadata": row[3],
             "created_at": row[4].isoformat(), "characters": row[5]}
            for row in rows if row[0] == config.tenant]


def delete_document(conn: Conn, record: TenantRecord, document_id: uuid.UUID) -> bool:
    config = record.config
    table = config.collection.table
    if table is not None:
        schema, name = table.partition(".")[0], table.partition(".")[2]
        conn.execute(sql.SQL("DELETE FROM {} WHERE tenant_id = %s AND document_id = %s").format(
            sql.Identifier(validate_identifier(schema), validate_identifier(name))),
            (config.tenant, document_id))
    return bool(fetch_rows(conn, sql.SQL(
        "DELETE FROM {} WHERE tenant_id = %s AND id = %s RETURNING id").format(
        _documents(config)), (config.tenant, document_id)))


def search_chunks(conn: Conn, config: TenantRuntimeConfig, vector: Vector, k: int
                  ) -> list[tuple[str, Hit]]:
    """(tenant_id, hit) for the k nearest chunks the tenant's session can see."""
    schema, table = require_collection(config)
    tenant = validate_tenant_id(config.tenant)
    conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(min(max(40, k), 1000)),))
    if config.collection.shared:
        # One index for many tenants: keep scanning until k rows of this tenant survive.
        conn.execute("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true)")
    rows = fetch_rows(conn, sql.SQL("""
        WITH hits AS MATERIALIZED (
            SELECT tenant_id, id, document_id, content,
                   embedding OPERATOR(public.<=>) %(q)s::public.vector AS distance
            FROM {table} WHERE tenant_id = {tenant}
            ORDER BY embedding OPERATOR(public.<=>) %(q)s::public.vector LIMIT %(k)s)
        SELECT h.tenant_id, h.id, h.document_id, h.content, h.distance,
               coalesce(d.title, ''), coalesce(d.metadata, '{{}}'::jsonb)
        FROM hits h LEFT JOIN {documents} d ON d.tenant_id = h.tenant_id AND d.id = h.document_id
        ORDER BY h.distance, h.id""").format(
        table=sql.Identifier(schema, table), tenant=sql.Literal(tenant),
        documents=_documents(config)), {"q": vector_literal(vector), "k": k})
    return [(str(row[0]), Hit(str(row[1]), str(row[2]), str(row[5]), str(row[3]),
                              1.0 - float(row[4]), dict(row[6]))) for row in rows]


def append_turns(conn: Conn, record: TenantRecord, ref: ConversationRef, model: str,
                 turns: list[dict[str, Any]]) -> None:
    """Append to the conversation's newest row, or start one. Two first turns at once may
    start two rows; reading merges every row of the id, so no turn is lost."""
    config = record.config
    table = sql.Identifier(validate_identifier(config.database.schema_name), "ai_conversations")
    params = {"t": config.tenant, "id": ref.id, "turns": Jsonb(turns), "model": model,
              "meta": Jsonb({"end_user": ref.end_user})}
    updated = fetch_rows(conn, sql.SQL("""
        UPDATE {table} SET messages = messages || %(turns)s, updated_at = now()
        WHERE tenant_id = %(t)s AND id = %(id)s AND metadata = %(meta)s
          AND created_at = (SELECT max(created_at) FROM {table}
                            WHERE tenant_id = %(t)s AND id = %(id)s AND metadata = %(meta)s)
        RETURNING id""").format(table=table), params)
    if not updated:
        conn.execute(sql.SQL(
            "INSERT INTO {} (tenant_id, id, model, messages, metadata)"
            " VALUES (%(t)s, %(id)s, %(model)s, %(turns)s, %(meta)s)").format(table), params)


def read_conversation(conn: Conn, config: TenantRuntimeConfig, conversation: uuid.UUID,
                      end_user: str | None) -> dict[str, Any] | None:
    table = sql.Identifier(validate_identifier(config.database.schema_name), "ai_conversations")
    rows = fetch_rows(conn, sql.SQL(
        "SELECT tenant_id, created_at, updated_at, model, messages, metadata FROM {}"
        " WHERE tenant_id = %s AND id = %s ORDER BY created_at").format(table),
        (config.tenant, conversation))
    rows = [row for row in rows if row[0] == config.tenant
            and (end_user is None or row[5].get("end_user") == end_user)]
    if not rows:
        return None
    return {"type": "conversation", "id": str(conversation),
            "end_users": sorted({str(row[5].get("end_user")) for row in rows}),
            "model": rows[-1][3], "created_at": rows[0][1].isoformat(),
            "updated_at": max(row[2] for row in rows).isoformat(),
            "messages": [turn for row in rows for turn in row[4]]}


# --- the service --------------------------------------------------------------------------------


def embedder_for(settings: RuntimeSettings) -> Embedder:
    if settings.embeddings_provider == "local":
        return LocalMiniLM()
    if not settings.embeddings_url:
        raise ValueError("TENANTRY_RUNTIME_EMBEDDINGS_URL is required for an HTTP provider")
    return HttpEmbeddings(settings.embeddings_url, settings.embeddings_model,
                          settings.embeddings_api_key.get_secret_value(),
                          style=settings.embeddings_provider,
                          expected_dimensions=settings.embeddings_dimensions,
                          name=settings.embeddings_provider)


@dataclass
class Rag:
    settings: RuntimeSettings
    store: TenantStore
    databases: TenantDatabases
    embedder: Embedder
    sanitizer: Sanitizer
    # Events with no client to tell, by kind (foreign_hit: a search row of another tenant,
    # dropped; conversation_not_stored), beside sanitizer.redactions.
    security_events: Counter[str] = field(default_factory=Counter)

    @classmethod
    def build(cls, settings: RuntimeSettings, store: TenantStore,
              embedder: Embedder | None = None,
              registry: DocumentRegistry | None = None) -> Rag:
        return cls(settings, store, TenantDatabases(settings, store),
                   embedder or embedder_for(settings), Sanitizer(store, registry=registry))

    async def embed(self, config: TenantRuntimeConfig, texts: Sequence[str],
                    input_type: InputType) -> list[Vector]:
        """Vectors of the tenant's dimension; 400 when the provider's differs."""
        wanted = config.collection.dimensions
        known = self.embedder.dimensions
        if known is not None and known != wanted:
            raise self._dimension_error(known, wanted)
        try:
            vectors = await self.embedder.embed(texts, input_type)
        except EmbeddingError as error:
            log.warning("embedding failed: %s", error)
            raise unavailable(f"Embeddings are unavailable: {error}") from None
        for vector in vectors:
            if len(vector) != wanted:
                raise self._dimension_error(len(vector), wanted)
        return vectors

    def _dimension_error(self, got: int, wanted: int) -> ApiError:
        return ApiError("invalid_request_error", (
            f"The runtime's embedding model ({self.embedder.name}) yields {got} dimensions, "
            f"but this tenant's collection has {wanted} (spec.rag.embeddingDimensions): "
            "set the Tenant's embeddingDimensions to match, or configure another embeddings "
            "provider."))

    async def search(self, record: TenantRecord, query: str, k: int) -> list[Hit]:
        config = record.config
        require_collection(config)
        (vector,) = await self.embed(config, [query], "query")
        found = await self.databases.read(record, lambda c: search_chunks(c, config, vector, k))
        hits: list[Hit] = []
        for owner, hit in found:
            if owner != config.tenant:
                self.security_events["foreign_hit"] += 1
                log.error("security event: search of tenant %s returned a row of tenant %s; "
                          "dropped", config.tenant, owner)
                continue
            self.sanitizer.documents.add(config.tenant, hit.document_id)
            hits.append(hit)
        return hits

    def context_allowance(self, caller: Caller, headers: Mapping[str, str]) -> int:
        """Bytes of context a request may gain: counted in its budget reservation."""
        config = caller.config
        if not rag_wanted(headers.get(RAG_HEADER), config, self.settings.rag_default):
            return 0
        return config.collection.top_k * (self.settings.rag_chunk_chars + 100) + 200

    async def augment(self, caller: Caller, headers: Mapping[str, str], body: bytes) -> bytes:
        """The body with the tenant's top-k context in its system prompt (unchanged bytes
        when RAG is off or the last user message has no text)."""
        config = caller.config
        if not rag_wanted(headers.get(RAG_HEADER), config, self.settings.rag_default):
            return body
        parsed = parse_json_object(body)
        query = text_of((last_user_message(parsed) or {}).get("content"))
        if not query.strip():
            return body
        hits = await self.search(caller.record, query, config.collection.top_k)
        if not hits:
            return body
        return json.dumps(with_context(parsed, context_text(hits))).encode()

    async def record_turns(self, caller: Caller, ref: ConversationRef, request_body: bytes,
                           answer: list[Any] | str, request_id: str, model: str) -> None:
        """Store the turns; a failure is logged and counted, never raised: the answer was
        generated and billed, so the client gets it either way."""
        try:
            await self._record_turns(caller, ref, request_body, answer, request_id, model)
        except ApiError as error:
            self.security_events["conversation_not_stored"] += 1
            log.error("conversation turn of %s not stored: %s", request_id, error.message)

    async def _record_turns(self, caller: Caller, ref: ConversationRef, request_body: bytes,
                            answer: list[Any] | str, request_id: str, model: str) -> None:
        parsed = parse_json_object(request_body)
        user = last_user_message(parsed) or {}
        at = datetime.now(UTC).isoformat()
        turns = [{"role": "user", "content": user.get("content", ""), "request_id": request_id,
                  "at": at},
                 {"role": "assistant", "content": answer, "request_id": request_id, "at": at}]
        await self.databases.write(caller.config.tenant, lambda c, r: append_turns(
            c, r, ref, model, turns))

    async def finish_message(self, caller: Caller, request_id: str, request_body: bytes,
                             answer: bytes, ref: ConversationRef | None, model: str) -> bytes:
        """A non-streaming answer, sanitized; its turns stored when a conversation is named."""
        if self.settings.sanitize_responses:
            await self.sanitizer.resolve(answer)
            answer = self.sanitizer.redact_message(answer, caller.config.tenant, request_id)
        if ref is not None:
            try:
                content = json.loads(answer).get("content", [])
            except (ValueError, AttributeError):
                content = []
            await self.record_turns(caller, ref, request_body, content, request_id, model)
        return answer

    def wrap_stream(self, caller: Caller, request_id: str, request_body: bytes,
                    upstream: UpstreamResponse, ref: ConversationRef | None,
                    model: str) -> UpstreamResponse:
        """The stream sanitized delta by delta; its text stored at message_stop."""
        sanitizer = self.sanitizer if self.settings.sanitize_responses else None
        if sanitizer is None and ref is None:
            return upstream
        rewriter = StreamRewriter(sanitizer, caller.config.tenant, request_id)
        on_end = None
        if ref is not None:
            async def on_end(done: StreamRewriter) -> None:
                await self.record_turns(caller, ref, request_body, done.answer_text(),
                                        request_id, model)
        return RewrittenStream(upstream, rewriter, on_end)

    async def aclose(self) -> None:
        try:
            if isinstance(self.embedder, HttpEmbeddings | LocalMiniLM):
                await self.embedder.aclose()
        finally:
            self.databases.close()
