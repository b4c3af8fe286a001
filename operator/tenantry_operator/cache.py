"""Watch-backed caches of the objects the operator owns: a settled reconcile reads without a GET.

One `KindCache` per kind lists, then watches, the objects that carry the operator's
managed-by label (or every object of a kind the platform team keeps few of, TenantPlans), so
its memory follows the number of tenants, not what tenants create in their namespaces. Each
object is kept as compressed JSON without its managedFields.

Rules that keep the reads correct (Kube.read):
- a hit is served from the cache; the watch removes an object deleted (or unlabelled) by hand
  within milliseconds, so the next reconcile repairs it as before;
- a miss of a label-filtered cache is not proof of absence (someone else's object of that name
  carries no label): Kube.read asks the API server then;
- after a write, the write's response is stored (read after write); a watch event older than
  what is stored (a lower resourceVersion) never replaces it;
- a deletion leaves a tombstone for `TOMBSTONE_SECONDS`: a late event, GET or write
  response, or a list made before the deletion (a resourceVersion not above the deletion's;
  the same uid when a version is unknown) never brings the object back; a re-created object
  (new uid, higher resourceVersion) is taken at once;
- while a watch is down for longer than `stale_after`, the cache is not used at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import zlib
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

from lightkube import ALL_NS, AsyncClient
from lightkube.core.resource import NamespacedResource

log = logging.getLogger(__name__)

Key = tuple[str | None, str]  # (namespace, name)
Keep = Callable[[str | None, str], bool]  # (namespace, name) -> held by the cache
_MISS: Any = object()
# How long a deleted object's tombstone refuses late events and responses about it: a GET or
# a write in flight across the deletion answers within seconds; this bounds their memory.
TOMBSTONE_SECONDS = 60.0


def _version(obj: Mapping[str, Any]) -> int:
    """resourceVersion as a number; 0 when it is not one.

    The API calls resourceVersions opaque; the caches compare them as numbers because every
    API server stores in etcd, whose revisions they are (one counter across all kinds). A
    version that is no number compares as unknown (0): a write's response then wins, and a
    tombstone falls back to the deleted object's uid.
    """
    text = str((obj.get("metadata") or {}).get("resourceVersion") or "")
    return int(text) if text.isdigit() else 0


def _uid(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")


class Tombstone(NamedTuple):
    """What is known of a deleted object: its uid and the deletion's resourceVersion (either
    may be unknown: "" and 0), and until when (monotonic) the tombstone holds."""
    uid: str
    version: int
    expires: float

    def buries(self, obj: Mapping[str, Any]) -> bool:
        """Whether `obj` is not newer than the deletion: by resourceVersion when both are
        known (a label-filtered watch also "deletes" an object whose label was removed; put
        back, the same uid returns with a higher version), else by uid (a deleted object's
        uid never comes back)."""
        version = _version(obj)
        if version and self.version:
            return version <= self.version
        uid = _uid(obj)
        return bool(uid) and uid == self.uid


def _key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace"), str(meta.get("name"))


def compact(obj: Mapping[str, Any]) -> bytes:
    """Pure: the object as stored: without managedFields (most of an object's size), as
    compressed JSON (a runtime record Secret: 966 bytes of JSON, 610 stored)."""
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"}
    return zlib.compress(json.dumps({**obj, "metadata": meta}, separators=(",", ":")).encode(), 1)


def expand(stored: bytes) -> dict[str, Any]:
    """Pure: the object `compact` stored."""
    found: dict[str, Any] = json.loads(zlib.decompress(stored))
    return found


def _refused(err: Exception) -> bool:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None) == 403


class Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class KindCache:
    """list+watch of one kind, across namespaces, filtered by a label selector."""

    def __init__(self, client: AsyncClient, kind: Any, label_selector: str | None,
                 stale_after: float = 10.0, watch_seconds: int = 290,
                 listing: asyncio.Lock | None = None, keep: Keep | None = None) -> None:
        self.kind = kind
        self.label_selector = label_selector
        # Which (namespace, name) it holds at all; reads of the others go to the API server.
        self.keep = keep
        # A cache of every object of its kind: a miss proves absence.
        self.complete = label_selector is None
        self._generic: Any = client._client  # lightkube's request builder: raw JSON, no models
        self._namespaced = issubclass(kind, NamespacedResource)
        self._store: dict[Key, tuple[int, bytes]] = {}
        self._tombstones: dict[Key, Tombstone] = {}  # in order of expiry
        self._resource_version = ""
        self._stale_after = stale_after
        self._watch_seconds = watch_seconds
        self._healthy_until = 0.0  # monotonic; reads use the cache only before this
        self._connected = False
        self.listed = asyncio.Event()
        self.settled = asyncio.Event()  # listed, or refused for good: startup waits no longer
        self.relists = 0
        # One list at a time across the caches, in pages of 100: a restarted operator's lists
        # of every kind at once raised its peak RSS by the parsed pages.
        self._listing = listing or asyncio.Lock()

    @property
    def usable(self) -> bool:
        return self.listed.is_set() and (self._connected
                                         or time.monotonic() < self._healthy_until)

    def __len__(self) -> int:
        return len(self._store)

    def get(self, name: str, namespace: str | None = None) -> Any:
        """The cached object as a dict; None when absent; `MISS` when unknown (not usable, or
        a label-filtered cache without it)."""
        if not self.usable or (self.keep is not None and not self.keep(namespace, name)):
            return _MISS
        entry = self._store.get((namespace, name))
        if entry is not None:
            return expand(entry[1])
        return None if self.complete else _MISS

    def put(self, obj: Mapping[str, Any]) -> None:
        """Store what a write returned, unless the cache already holds a newer version."""
        if self._matches(obj):
            self._remember(obj)
        else:  # the watch will not see it: nor may a read
            self._store.pop(_key(obj), None)

    def forget(self, name: str, namespace: str | None = None) -> None:
        """Not known any more: a label-filtered cache's next read asks the API server."""
        self._store.pop((namespace, name), None)

    def deleted(self, name: str, namespace: str | None, answer: Mapping[str, Any] | None
                ) -> None:
        """The operator deleted the object; `answer` is the API server's response to the
        DELETE (the object still terminating, the deleted object, or a Status naming its
        uid), None when there was none to delete."""
        key = (namespace, name)
        held = self._store.pop(key, None)
        if answer is None:  # not found: what was held is gone
            if held is not None:
                self._bury(key, Tombstone(_uid(expand(held[1])), held[0], 0.0))
            return
        if (answer.get("metadata") or {}).get("deletionTimestamp"):
            # Finalizers or a grace period keep it: it exists, terminating, until DELETED.
            self.put(answer)
            return
        if answer.get("kind") == "Status":  # gone; no resourceVersion given
            self._bury(key, Tombstone(str((answer.get("details") or {}).get("uid") or ""),
                                      0, 0.0))
        else:
            self._bury(key, Tombstone(_uid(answer), _version(answer), 0.0))

    def _bury(self, key: Key, stone: Tombstone) -> None:
        if not (stone.uid or stone.version):
            return
        now = time.monotonic()
        while self._tombstones:  # the oldest first: drop the expired ones
            oldest = next(iter(self._tombstones))
            if self._tombstones[oldest].expires > now:
                break
            del self._tombstones[oldest]
        self._tombstones.pop(key, None)
        self._tombstones[key] = stone._replace(expires=now + TOMBSTONE_SECONDS)

    def _buried(self, obj: Mapping[str, Any]) -> bool:
        stone = self._tombstones.get(_key(obj))
        return (stone is not None and stone.expires > time.monotonic()
                and stone.buries(obj))

    def _matches(self, obj: Mapping[str, Any]) -> bool:
        """Whether the watch would deliver this object (the selector is key=value pairs) and
        the cache keeps it."""
        if not self._kept(obj):
            return False
        if self.label_selector is None:
            return True
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(labels.get(k) == v for k, v in
                   (pair.split("=", 1) for pair in self.label_selector.split(",")))

    def _kept(self, obj: Mapping[str, Any]) -> bool:
        return self.keep is None or self.keep(*_key(obj))

    def _remember(self, obj: Mapping[str, Any]) -> None:
        if self._buried(obj) or not self._kept(obj):  # a late event of a deleted object
            return
        key, version = _key(obj), _version(obj)
        held = self._store.get(key)
        if held is None or version >= held[0]:
            self._store[key] = (version, compact(obj))

    def _drop(self, obj: Mapping[str, Any]) -> None:
        key = _key(obj)
        held = self._store.get(key)
        if held is not None and _version(obj) >= held[0]:
            del self._store[key]
        self._bury(key, Tombstone(_uid(obj), _version(obj), 0.0))

    def _request(self, watch: bool, params: dict[str, Any]) -> Any:
        request = self._generic.prepare_request(
            "list", res=self.kind, namespace=ALL_NS if self._namespaced else None, watch=watch,
            params={"labelSelector": self.label_selector, **params})
        if watch:  # no read timeout: a quiet watch is not a dead one (the server ends it)
            request.timeout = self._generic._watch_timeout
        return self._generic.build_adapter_request(request)

    async def _list(self) -> None:
        async with self._listing:
            await self._list_pages()

    async def _list_pages(self) -> None:
        store: dict[Key, tuple[int, bytes]] = {}
        token: str | None = None
        while True:
            response = await self._generic.send(self._request(False, {"limit": 100,
                                                                      "continue": token}))
            response.raise_for_status()
            page = json.loads(response.content)
            # A list's items carry no apiVersion and kind (watch events and GETs do).
            kind = {"apiVersion": page.get("apiVersion"),
                    "kind": str(page.get("kind", "")).removesuffix("List")}
            for item in page.get("items") or []:
                # Not one it keeps, or deleted while the (paged) list was made.
                if self._kept(item) and not self._buried(item):
                    store[_key(item)] = (_version(item), compact({**kind, **item}))
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                break
        self._resource_version = str(page["metadata"]["resourceVersion"])
        listed_at = _version(page)
        # What a write stored while the list was made is newer than the list: it stays (the
        # watch, resumed from the list's version, delivers what happens to it next).
        for key, (version, stored) in self._store.items():
            if version > listed_at and version > store.get(key, (0, b""))[0]:
                store[key] = (version, stored)
        self._store = store
        self.listed.set()
        self.settled.set()

    async def _watch(self) -> None:
        params = {"resourceVersion": self._resource_version, "allowWatchBookmarks": "true",
                  "timeoutSeconds": self._watch_seconds}
        response = await self._generic.send(self._request(True, params), stream=True)
        try:
            response.raise_for_status()
            self._connected = True
            async for line in response.aiter_lines():
                if line:
                    self._event(json.loads(line))
        finally:
            self._connected = False
            self._healthy_until = time.monotonic() + self._stale_after
            await response.aclose()

    def _event(self, event: Mapping[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone(str(obj.get("message")))
            raise RuntimeError(f"watch of {self.kind.__name__}: {obj.get('message')}")
        version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if version:
            self._resource_version = version
        if kind in ("ADDED", "MODIFIED"):
            self._remember(obj)
        elif kind == "DELETED":
            self._drop(obj)

    async def run(self) -> None:
        """List, then watch forever; a watch the server ends resumes where it was, a 410 or
        any other failure lists again (after a pause that grows to 5 s)."""
        delay = 0.0
        need_list = True
        while True:
            try:
                if need_list:
                    await self._list()
                    self.relists += 1
                    need_list = False
                await self._watch()
                delay = 0.0
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if _refused(err):  # RBAC without list/watch: reads stay with the API server
                    log.warning("no cache of %ss (not allowed to list and watch them): reading"
                                " them from the API server", self.kind.__name__)
                    self.settled.set()
                    return
                if not isinstance(err, Gone):
                    log.warning("cache of %s: %s; listing again", self.kind.__name__, err)
                need_list = True
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2 or 0.2)


class Caches:
    """The caches of one operator process, by kind; started once, stopped at cleanup."""

    def __init__(self, client: AsyncClient, kinds: Mapping[Any, str | None],
                 keep: Callable[[Any, str | None, str], bool] | None = None) -> None:
        """`keep(kind, namespace, name)`: what each cache holds (None: all it is sent)."""
        listing = asyncio.Lock()
        self.by_kind = {kind: KindCache(client, kind, selector, listing=listing,
                                        keep=partial(keep, kind) if keep else None)
                        for kind, selector in kinds.items()}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(c.run(), name=f"cache {k.__name__}")
                       for k, c in self.by_kind.items()]

    async def wait_listed(self, wait_seconds: float) -> bool:
        """Until every cache has its first list; False on timeout (reads then go to the API
        server until it comes)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(c.settled.wait()
                                                    for c in self.by_kind.values())), wait_seconds)
            return all(c.listed.is_set() for c in self.by_kind.values())
        return False

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []


MISS = _MISS
