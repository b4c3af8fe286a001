"""Settlements that could not reach Redis, kept on local disk and replayed when it returns.

One file per worker process (`settlements-<pid>.jsonl`), each line fsync'd before the request
is considered settled. A worker adopts the files of workers that are gone (an atomic rename,
so only one adopts each) and replays them in order; replayed lines leave the file by an atomic
rewrite. A settlement replayed after Redis did run it (a reply lost to a timeout) changes
nothing: settle.lua keeps a marker per request id (`SETTLED_MARKER_TTL_SECONDS`) and answers
`ALREADY_SETTLED`; such replays are counted in `already_settled`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from pathlib import Path

from .limits import ALREADY_SETTLED, Limiter, Settlement
from .resp import RedisUnavailable, ReplyError

log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SettlementSpool:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.path = directory / f"settlements-{os.getpid()}.jsonl"
        self._lock = asyncio.Lock()
        # Replays Redis had already run (their first reply was lost): not charged again.
        self.already_settled = 0

    def _append(self, line: bytes) -> None:
        with self.path.open("ab") as out:
            out.write(line)
            out.flush()
            os.fsync(out.fileno())

    async def append(self, settlement: Settlement) -> None:
        line = json.dumps({"keys": settlement.keys, "args": settlement.args}).encode() + b"\n"
        async with self._lock:
            await asyncio.to_thread(self._append, line)

    def adopt_orphans(self) -> int:
        """Take over the spool files of workers that no longer run; how many were taken."""
        adopted = 0
        for path in sorted(self.directory.glob("settlements-*.jsonl")):
            pid = path.stem.removeprefix("settlements-").split(".")[0]
            if path == self.path or not pid.isdigit() or _alive(int(pid)):
                continue
            target = self.directory / (
                f"settlements-{os.getpid()}.adopted-{uuid.uuid4().hex}.jsonl")
            try:
                os.rename(path, target)
            except FileNotFoundError:
                continue  # another worker adopted it first
            adopted += 1
        return adopted

    def _files(self) -> list[Path]:
        own = sorted(self.directory.glob(f"settlements-{os.getpid()}.adopted-*.jsonl"))
        return [*own, self.path] if self.path.exists() else own

    async def replay(self, limiter: Limiter) -> int:
        """Settle what is spooled, oldest first; stops at the first Redis failure."""
        replayed = 0
        async with self._lock:
            for path in self._files():
                lines = path.read_bytes().splitlines()
                done = 0
                for line in lines:
                    entry = json.loads(line)
                    try:
                        held = await limiter.settle(Settlement(entry["keys"], entry["args"]))
                    except (RedisUnavailable, ReplyError):
                        break
                    if held == ALREADY_SETTLED:
                        self.already_settled += 1
                    done += 1
                replayed += done
                remaining = lines[done:]
                if remaining:
                    temporary = path.with_suffix(".tmp")
                    temporary.write_bytes(b"".join(line + b"\n" for line in remaining))
                    os.replace(temporary, path)
                    return replayed
                path.unlink()
        return replayed

    def pending(self) -> int:
        """Settlements waiting in the spool files (a file replayed whole meanwhile: 0)."""
        count = 0
        for path in self._files():
            # The replay unlinks a file it finished between the listing and the read.
            with contextlib.suppress(FileNotFoundError):
                count += len(path.read_bytes().splitlines())
        return count

    async def keep_replaying(self, limiter: Limiter, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if not self._files():
                continue
            before = self.already_settled
            try:
                replayed = await self.replay(limiter)
            except (OSError, ValueError):
                log.exception("replaying the settlement spool failed")
                continue
            if replayed:
                log.info("replayed %d spooled settlements (%d already settled in Redis, not"
                         " charged again)", replayed, self.already_settled - before)
