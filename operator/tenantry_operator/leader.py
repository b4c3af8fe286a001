"""Leader election on a coordination.k8s.io/v1 Lease: one operator replica reconciles at a time.

kopf's own peering pauses every peer of equal priority, so replicas of one Deployment would all
stop. Instead each replica runs `python -m tenantry_operator`, which holds this Lease before it
starts kopf and exits the moment it may have lost it.

Expiry is judged on the standby's own monotonic clock: a Lease is expired when its
resourceVersion has not changed for `leaseDurationSeconds` since this process first saw it
(as client-go does), so clock skew between nodes cannot make two leaders. The leader gives up
after `renew deadline` < `duration` without a successful renewal, before any standby may take
over. The pure parts (reading a Lease body, deciding, building the next spec) carry no I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from lightkube import ApiError, AsyncClient
from lightkube.core.resource import ApiInfo, ResourceDef
from lightkube.generic_resource import GenericNamespacedResource

from .settings import OperatorSettings

log = logging.getLogger(__name__)


class Lease(GenericNamespacedResource):
    """A dict-bodied Lease. lightkube's typed model writes a MicroTime without its six fraction
    digits when they are zero, which the API server rejects. Not put in lightkube's registry,
    so it cannot clash with the typed class."""

    _api_info = ApiInfo(resource=ResourceDef("coordination.k8s.io", "v1", "Lease"),
                        plural="leases", verbs=["get", "post", "put"])


# Exit status when leadership may be lost: non-zero, so Kubernetes restarts the container.
EXIT_LEADERSHIP_LOST = 3
# A clean shutdown waits this long at most to hand the Lease back (else it simply expires).
RELEASE_TIMEOUT_SECONDS = 5.0
# A renewal that failed (an error, a conflict, a timeout) is tried again this soon rather than a
# whole retry period later: the deadline leaves room for several more attempts.
FAILED_RENEWAL_RETRY_SECONDS = 0.5
# One attempt may use this share of the renew deadline at most, so a request hung on a dead
# connection still leaves time for attempts on a new one (kube-controller-manager gives its
# leader-election client a timeout of half the deadline).
ATTEMPT_SHARE_OF_DEADLINE = 1 / 3


class Action(enum.Enum):
    CREATE = "create"  # no Lease yet
    RENEW = "renew"  # we hold it
    TAKE = "take"  # released, or unrenewed for its duration
    WAIT = "wait"  # another holder renewed it recently


@dataclass(frozen=True)
class LeaseRecord:
    """What a Lease object says, as far as the election needs it."""

    holder: str  # "" when released
    duration_seconds: int
    transitions: int
    acquire_time: str | None
    resource_version: str

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> LeaseRecord:
        spec = body.get("spec") or {}
        return cls(
            holder=spec.get("holderIdentity") or "",
            duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
            transitions=int(spec.get("leaseTransitions") or 0),
            acquire_time=spec.get("acquireTime"),
            resource_version=str(body["metadata"]["resourceVersion"]),
        )


@dataclass(frozen=True)
class Sighting:
    """When this process first saw a given version of the Lease (monotonic seconds)."""

    resource_version: str
    since: float


def observe(previous: Sighting | None, record: LeaseRecord, now: float) -> Sighting:
    """Keep the first sighting of an unchanged Lease; any write starts a new one."""
    if previous is not None and previous.resource_version == record.resource_version:
        return previous
    return Sighting(record.resource_version, now)


def decide(record: LeaseRecord | None, identity: str, sighting: Sighting | None,
           now: float) -> Action:
    """What to do with the Lease as read, given when we first saw this version of it."""
    if record is None:
        return Action.CREATE
    if record.holder == identity:
        return Action.RENEW
    if not record.holder:
        return Action.TAKE
    if (sighting is not None and sighting.resource_version == record.resource_version
            and now - sighting.since >= record.duration_seconds):
        return Action.TAKE
    return Action.WAIT


def micro_time(moment: datetime) -> str:
    """RFC 3339 with exactly six fractional digits: the API server's MicroTime format."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def held_spec(record: LeaseRecord | None, identity: str, duration_seconds: int,
              now: datetime) -> dict[str, Any]:
    """The spec that claims (or renews) the Lease for `identity`."""
    stamp = micro_time(now)
    spec: dict[str, Any] = {"holderIdentity": identity, "leaseDurationSeconds": duration_seconds,
                            "renewTime": stamp}
    if record is None:
        return {**spec, "acquireTime": stamp, "leaseTransitions": 0}
    if record.holder == identity:
        return {**spec, "acquireTime": record.acquire_time or stamp,
                "leaseTransitions": record.transitions}
    return {**spec, "acquireTime": stamp, "leaseTransitions": record.transitions + 1}


def released_spec(record: LeaseRecord, now: datetime) -> dict[str, Any]:
    """The spec that hands the Lease back: no holder, so a standby takes it at once."""
    return {"holderIdentity": None, "leaseDurationSeconds": 1, "acquireTime": None,
            "renewTime": micro_time(now), "leaseTransitions": record.transitions}


def renew_deadline_passed(renewed_at: float, now: float, deadline_seconds: float) -> bool:
    """True once the leader went `deadline_seconds` without a successful renewal."""
    return now - renewed_at >= deadline_seconds


def exit_now(reason: str) -> None:
    """Stop reconciling at once: no graceful kopf shutdown that could outlive the Lease."""
    log.critical("leadership lost (%s); exiting so that only one replica reconciles", reason)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(EXIT_LEADERSHIP_LOST)


class LeaderElector:
    """Acquire, renew and release one Lease through lightkube's async client."""

    def __init__(self, client: AsyncClient, settings: OperatorSettings,
                 on_lost: Callable[[str], None] = exit_now) -> None:
        self.client = client
        self.name = settings.lease_name
        self.namespace = settings.lease_namespace
        self.identity = settings.lease_identity
        self.duration = settings.lease_duration_seconds
        self.deadline = settings.lease_renew_deadline_seconds
        self.retry = settings.lease_retry_period_seconds
        self.on_lost = on_lost
        self.is_leader = False
        self._sighting: Sighting | None = None
        self._record: LeaseRecord | None = None  # as last read or written
        self._renewed_at = 0.0  # monotonic start of the last successful write

    async def _read(self) -> LeaseRecord | None:
        try:
            lease = await self.client.get(Lease, self.name, namespace=self.namespace)
        except ApiError as err:
            if err.status.code == 404:
                return None
            raise
        return LeaseRecord.from_body(lease)

    async def _write(self, record: LeaseRecord | None, spec: dict[str, Any]) -> LeaseRecord | None:
        """Create or replace (optimistically, by resourceVersion); None when another won."""
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if record is not None:
            metadata["resourceVersion"] = record.resource_version
        body = Lease.from_dict({"metadata": metadata, "spec": spec})
        try:
            if record is None:
                written = await self.client.create(body)
            else:
                written = await self.client.replace(body)
        except ApiError as err:
            if err.status.code == 409:  # created or updated by someone else since our read
                return None
            raise
        return LeaseRecord.from_body(written)

    async def try_hold(self) -> bool:
        """One round: read, decide, write. True when this process holds the Lease after it."""
        started = time.monotonic()
        record = await self._read()
        if record is not None:
            self._sighting = observe(self._sighting, record, started)
        action = decide(record, self.identity, self._sighting, started)
        previous, self._record = self._record, record
        # A leader only ever renews: finding the Lease gone or taken means it lost it.
        if action is Action.WAIT or (self.is_leader and action is not Action.RENEW):
            if record is not None and (previous is None or previous.holder != record.holder):
                log.info("lease %s/%s is held by %s; standing by", self.namespace, self.name,
                         record.holder or "nobody")
            return False
        written = await self._write(record, held_spec(record, self.identity, self.duration,
                                                      datetime.now(UTC)))
        if written is None:
            return False
        if action is not Action.RENEW or not self.is_leader:
            log.info("acquired lease %s/%s as %s (%s)", self.namespace, self.name,
                     self.identity, action.value)
        self._record = written
        self._renewed_at = started
        return True

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this process holds the Lease (True) or `stop` is set (False)."""
        while not stop.is_set():
            try:
                if await self.try_hold():
                    self.is_leader = True
                    return True
            except Exception as err:  # API server unreachable, etc.: try again next period
                log.warning("could not read or take lease %s/%s: %s", self.namespace,
                            self.name, err)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.retry)
        return False

    async def keep_renewed(self) -> None:
        """Renew every retry period (a failed attempt again after FAILED_RENEWAL_RETRY_SECONDS);
        call `on_lost` the moment leadership may be gone."""
        delay = self.retry
        while True:
            await asyncio.sleep(delay)
            now = time.monotonic()
            if renew_deadline_passed(self._renewed_at, now, self.deadline):
                # E.g. the process was paused: do not touch the API, a standby may lead now.
                self.on_lost(f"no renewal for {now - self._renewed_at:.1f}s")
                return
            try:
                # Never wait past the deadline for a hung request, nor the whole of it.
                async with asyncio.timeout(min(self.deadline * ATTEMPT_SHARE_OF_DEADLINE,
                                               self._renewed_at + self.deadline - now)):
                    held = await self.try_hold()
            except Exception as err:
                log.warning("renewing lease %s/%s failed: %s", self.namespace, self.name,
                            err or type(err).__name__)
                held = False
            if not held and (self._record is None or self._record.holder != self.identity):
                self.on_lost("the lease was deleted" if self._record is None
                             else f"the lease is held by {self._record.holder or 'nobody'}")
                return
            now = time.monotonic()
            if not held and renew_deadline_passed(self._renewed_at, now, self.deadline):
                self.on_lost(f"no renewal for {now - self._renewed_at:.1f}s")
                return
            delay = self.retry if held else min(FAILED_RENEWAL_RETRY_SECONDS, self.retry)

    async def release(self) -> None:
        """Hand the Lease back on a clean shutdown, so a standby need not wait for expiry."""
        if not self.is_leader:
            return
        self.is_leader = False
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_SECONDS):
                record = await self._read()
                if record is not None and record.holder == self.identity:
                    await self._write(record, released_spec(record, datetime.now(UTC)))
                    log.info("released lease %s/%s", self.namespace, self.name)
        except Exception as err:  # it expires on its own
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, err)


class RenewalThread:
    """`keep_renewed` on a thread and event loop of its own, with an API client of its own.

    On the operator's loop a renewal waited behind every callback queued there (kopf's
    processing, watch events, TLS work of every client): at load average ~20 that delayed it
    past the deadline ("no renewal for 10.3 s"). Here it waits for nothing of the operator's;
    the GIL is handed over every few milliseconds even while the other thread computes.
    `on_lost` is called on this thread (exit_now ends the process from any thread).
    """

    def __init__(self, elector: LeaderElector, make_client: Callable[[], AsyncClient]) -> None:
        self.elector = elector
        self.make_client = make_client
        self._running = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()),
                                        name="lease-renewal", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._running.wait()

    async def _main(self) -> None:
        own_client = self.elector.client
        client: AsyncClient | None = None
        try:
            self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
            self.elector.client = client = self.make_client()
            self._running.set()
            await self.elector.keep_renewed()
        except asyncio.CancelledError:
            pass  # stop()
        except BaseException as err:
            # Renewals stopped while still leading: a standby will take over, so stop too.
            self.elector.on_lost(f"lease renewal failed: {err!r}")
        finally:
            self._running.set()
            self.elector.client = own_client
            if client is not None:
                await client.close()

    async def stop(self) -> None:
        """Stop renewing and wait for the thread (before `release`, on the caller's loop)."""
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                loop.call_soon_threadsafe(task.cancel)
        await asyncio.to_thread(self._thread.join)
