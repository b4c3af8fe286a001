"""The shared registry `document id -> tenant` in Redis, for the response sanitizer.

Every replica writes the ids of the documents it creates (`POST /v1/documents`) and drops the
ids of those it deletes; the sanitizer asks it, with one HMGET, about the UUIDs of an answer
its own cache (`sanitize.KnownDocuments`) does not know. So a document created through one
replica is redacted from another tenant's answer on every replica, also after a restart. Keys:
`contracts.redis_keys.DOCUMENT_OWNERS` and `TenantKeys.documents` (the operator drops a deleted
tenant's entries, `tenantry_operator.quotas.forget_documents`; `tenantry documents backfill`
registers documents created before the registry existed).

Redis unavailable: a failed write is logged and counted (`document_register_failed`,
`document_forget_failed` in `tenantry_runtime_failures_total`), never the client's error: the
document was stored (or deleted) and the sanitizer still knows it locally. A failed lookup
(`document_registry_unavailable`) leaves the sanitizer with this replica's cache.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .contracts.redis_keys import DOCUMENT_OWNERS, TenantKeys
from .local_limits import LogThrottle
from .resp import PipelinedRedis, RedisUnavailable, ReplyError

log = logging.getLogger(__name__)


@dataclass
class DocumentRegistry:
    redis: PipelinedRedis
    # The runtime's failure counters (reasons above), shared so /metrics shows them.
    failures: Counter[str] = field(default_factory=Counter)
    log_throttle: LogThrottle = field(default_factory=LogThrottle)
    lookups: int = 0  # HMGETs sent (one per answer that named unknown UUIDs)

    async def register(self, tenant: str, document_ids: Sequence[str]) -> bool:
        """Record the ids as `tenant`'s; False (logged, counted) when Redis failed."""
        return await self._write("document_register_failed", tenant,
                                 TenantKeys(tenant).register_documents(document_ids))

    async def forget(self, tenant: str, document_ids: Sequence[str]) -> bool:
        """Drop the ids (their documents are deleted); False when Redis failed."""
        return await self._write("document_forget_failed", tenant,
                                 TenantKeys(tenant).forget_documents(document_ids))

    async def owners(self, document_ids: Sequence[str]) -> list[str | None] | None:
        """The owner of each id (None: not a registered document); None when Redis failed."""
        self.lookups += 1
        try:
            reply = await self.redis.execute("HMGET", DOCUMENT_OWNERS, *document_ids)
        except (RedisUnavailable, ReplyError) as error:
            self._failed("document_registry_unavailable",
                         "document registry unreachable; answers are sanitized with this "
                         "replica's known document ids only: %s", error)
            return None
        return [owner.decode() if isinstance(owner, bytes) else None for owner in reply]

    async def _write(self, reason: str, tenant: str, commands: list[list[str]]) -> bool:
        # Sent in one loop turn: one write, one round trip (resp.PipelinedRedis).
        replies: list[Any] = await asyncio.gather(
            *(self.redis.execute(*command) for command in commands), return_exceptions=True)
        errors = [reply for reply in replies if isinstance(reply, BaseException)]
        for error in errors:
            if not isinstance(error, (RedisUnavailable, ReplyError)):
                raise error
        if errors:
            self._failed(reason, "document registry not updated for tenant %s: %s", tenant,
                         errors[0])
            return False
        return True

    def _failed(self, reason: str, message: str, *args: object) -> None:
        self.failures[reason] += 1
        held_back = self.log_throttle.due(reason)
        if held_back is not None:
            log.warning(message + (" (%d more since the last line)" if held_back else ""),
                        *args, *((held_back,) if held_back else ()))
