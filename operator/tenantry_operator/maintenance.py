"""Shared-database upkeep: migrate at startup, then keep monthly partitions created ahead."""

from __future__ import annotations

import asyncio
import logging

from . import database
from .settings import OperatorSettings

log = logging.getLogger(__name__)


async def on_startup(settings: OperatorSettings) -> None:
    """Migrate the shared database before any tenant is reconciled."""
    if settings.database_url is not None:
        # Idempotent: migrations (locked against other replicas), partitions ahead, grants.
        applied = await database.in_database(settings.database_url.get_secret_value(),
                                             database.bootstrap_shared)
        log.info("shared database ready; migrations applied now: %s", applied or "none")


async def keep_partitions_ahead(settings: OperatorSettings) -> None:
    """Runs for the operator's lifetime; a failed round is logged and retried next round."""
    while settings.database_url is not None:
        await asyncio.sleep(settings.maintenance_interval_seconds)
        try:
            await database.in_database(settings.database_url.get_secret_value(),
                                       database.bootstrap_shared)
        except Exception:
            log.exception("shared database maintenance failed; retrying next round")
