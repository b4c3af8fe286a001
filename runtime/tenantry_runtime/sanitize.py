"""Redact other tenants' identifiers (tenant names, document ids) from model answers.

What counts: the name of any tenant the store serves other than the caller (whole words, any
case), and any UUID that is another tenant's document id: ids this replica created, listed or
retrieved (`KnownDocuments`, bounded), and with a `DocumentRegistry` every id registered in
Redis by any replica (asked with one HMGET of an answer's unknown UUIDs, the answers only).
Each becomes `[redacted]`; every redaction is logged as a security event and counted in
`Sanitizer.redactions[kind]` (kind `tenant_name` or `document_id`; exported as
`tenantry_runtime_redactions_total{kind}`).

Where: the text blocks of a non-streaming answer; in a stream, the `text_delta`s. A name or id
split across two deltas is caught: the tail of a delta that could begin one (a prefix of
another tenant's name, or of a known foreign id) is held back and sent with the next delta
or, at `content_block_stop`, on its own; with a registry, a tail that could begin any UUID
(a prefix of the 8-4-4-4-12 pattern) is held too, and the stream waits for the registry's
answer before it sends a delta with a UUID it has not resolved. A UUID is read where it
begins, glued to a word too (`doc_<uuid>`); in a stream, up to 8 hex characters glued to a
word (`the`, `docab`) are sent, and the rest of a foreign id they turn out to begin is
redacted (`StreamRewriter._continued`). Tool-use inputs are redacted
value by value (keys and strings of the parsed JSON): in a stream, a tool_use block's
`input_json_delta`s are held and sent as one delta, redacted, just before its
`content_block_stop` (the SDK's accumulated `input` is the same; only its granularity
changes, and only while sanitizing is on). Thinking blocks are not rewritten (their signature
covers them).
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from .document_registry import DocumentRegistry
from .messages import sse_data, sse_data_line
from .store import TenantStore
from .upstream import UpstreamResponse

log = logging.getLogger(__name__)
REDACTED = "[redacted]"
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
# A tenant id (40) or a UUID after a whole one (36 + 35): what a delta's tail may begin.
_TRAILING_WORD = re.compile(r"[A-Za-z0-9-]{1,76}$")
_UUID_TEMPLATE = "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"


def _prefix_pattern(template: str) -> re.Pattern[str]:
    """Matches every non-empty prefix of `template` (x: a hex digit)."""
    pattern = ""
    for char in reversed(template):
        unit = "-" if char == "-" else "[0-9a-fA-F]"
        pattern = f"{unit}(?:{pattern})?" if pattern else unit
    return re.compile(pattern)


_UUID_PREFIX = _prefix_pattern(_UUID_TEMPLATE)


# The end of a text that may begin a UUID, after any whole ones. The leftmost such start: the
# exact pass reads a UUID where it begins, glued to a word too (`doc_<uuid>`, `v2<uuid>`).
_OPEN_UUID_AT_END = re.compile(rf"(?:{_UUID})*(?P<open>{_UUID_PREFIX.pattern})$")
_HEX_OR_HYPHEN = frozenset("0123456789abcdefABCDEF-")
# Longest end that may hold an open UUID after a whole one (36 + 35, rounded up).
_OPEN_END_WINDOW = 80


def _open_uuid_at_end(text: str) -> re.Match[str] | None:
    """The open UUID (a proper prefix of one) that `text` ends with, if any."""
    if not text or text[-1] not in _HEX_OR_HYPHEN:
        return None
    return _OPEN_UUID_AT_END.search(text, max(0, len(text) - _OPEN_END_WINDOW))


def could_begin_uuid(text: str) -> bool:
    """Whether `text` is the start of a UUID but not yet a whole one."""
    return len(text) < len(_UUID_TEMPLATE) and _UUID_PREFIX.fullmatch(text) is not None


@dataclass
class KnownDocuments:
    """Document id -> tenant, for the ids this replica has seen (LRU, `limit` entries)."""

    limit: int = 100_000
    _owner: OrderedDict[str, str] = field(default_factory=OrderedDict)
    _sorted: list[str] | None = None

    def add(self, tenant: str, document_id: str) -> None:
        key = document_id.lower()
        if key not in self._owner:
            self._sorted = None
        self._owner[key] = tenant
        self._owner.move_to_end(key)
        while len(self._owner) > self.limit:
            self._owner.popitem(last=False)
            self._sorted = None

    def discard(self, document_id: str) -> None:
        if self._owner.pop(document_id.lower(), None) is not None:
            self._sorted = None

    def owner(self, document_id: str) -> str | None:
        return self._owner.get(document_id.lower())

    def __contains__(self, document_id: str) -> bool:
        return document_id.lower() in self._owner

    def foreign_prefix(self, text: str, tenant: str) -> bool:
        """True when `text` begins some other tenant's known document id."""
        if self._sorted is None:
            self._sorted = sorted(self._owner)
        prefix = text.lower()
        at = bisect.bisect_left(self._sorted, prefix)
        while at < len(self._sorted) and self._sorted[at].startswith(prefix):
            if self._owner.get(self._sorted[at]) != tenant:
                return True
            at += 1
        return False

    def __len__(self) -> int:
        return len(self._owner)


# One pass over the text, cost linear in its length whatever the number of tenants: each
# UUID and each maximal hyphenated word is looked up (tenant ids are DNS labels such as
# `acme-corp`: a name stands alone when it is a run of whole parts of such a word).
_TOKENS = re.compile(rf"(?P<uuid>{_UUID})|[A-Za-z0-9_]+(?:-[A-Za-z0-9_]+)*")
# The screen in front of it (most answers name nobody): a name can only be there when the
# first part of it (up to its first hyphen) is a word of the text.
_WORDS = re.compile(r"[A-Za-z0-9_]+")
_ANY_UUID = re.compile(_UUID)
_ANY_UUID_BYTES = re.compile(_UUID.encode())
# The middle of every UUID: its leading `-` lets the engine skip to hyphens (15x faster than
# the whole pattern over text without UUIDs, ~1 us instead of ~19 us per 2 KB).
_UUID_HINT = r"-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
_ANY_UUID_HINT = re.compile(_UUID_HINT)
_ANY_UUID_HINT_BYTES = re.compile(_UUID_HINT.encode())

# A text delta's data as Anthropic (and the stub) lay it out, its text without escapes or
# control characters: for such a line the match gives what `json.loads` would (index, text),
# without parsing it; any other line is parsed (bench/README.md, fourth round).
_PLAIN_TEXT_DELTA = re.compile(
    rb' ?\{"type":"content_block_delta","index":(0|[1-9][0-9]{0,8}),'
    rb'"delta":\{"type":"text_delta","text":"([^"\\\x00-\x1f]*)"\}\}\r?')
# The texts of such deltas in a chunk (the text's class keeps a match inside one text).
_PLAIN_TEXTS = re.compile(rb'"type":"text_delta","text":"([^"\\\x00-\x1f]*)"\}\}')

_MAX_NAME_PARTS = 20  # a tenant id has at most 40 characters
NAMES_REFRESH_SECONDS = 1.0


def _has_uuid(text: str) -> bool:
    return _ANY_UUID_HINT.search(text) is not None and _ANY_UUID.search(text) is not None


@dataclass
class Sanitizer:
    store: TenantStore
    documents: KnownDocuments = field(default_factory=KnownDocuments)
    # Shared across replicas; None: this replica's `documents` only.
    registry: DocumentRegistry | None = None
    redactions: Counter[str] = field(default_factory=Counter)
    _names: frozenset[str] = frozenset()
    _first_parts: frozenset[str] = frozenset()
    _sorted_names: list[str] = field(default_factory=list)
    _names_at: float = -1e9

    def names(self) -> frozenset[str]:
        """The served tenants' names, re-read at most once a second (the hot path)."""
        now = time.monotonic()
        if now - self._names_at >= NAMES_REFRESH_SECONDS:
            self._sorted_names = self.store.tenants()
            self._names = frozenset(self._sorted_names)
            self._first_parts = frozenset(name.split("-", 1)[0] for name in self._names)
            self._names_at = now
        return self._names

    def unresolved(self, text: str | bytes, asked: Collection[str] = ()) -> list[str]:
        """The UUIDs of `text` (lowercase, once each) to ask the registry about: not known
        here and not in `asked`. Empty without a registry; one C search for most texts."""
        if self.registry is None:
            return []
        if isinstance(text, bytes):
            if _ANY_UUID_HINT_BYTES.search(text) is None:
                return []
            found: Iterable[str] = (m.decode() for m in _ANY_UUID_BYTES.findall(text))
        else:
            if _ANY_UUID_HINT.search(text) is None:
                return []
            found = _ANY_UUID.findall(text)
        wanted = {m.lower() for m in found}
        return sorted(m for m in wanted if m not in self.documents and m not in asked)

    async def learn(self, document_ids: list[str]) -> None:
        """Ask the registry about the ids (one HMGET) and keep the owners it knows. Redis
        unavailable: counted and logged by the registry; this replica's set decides."""
        if self.registry is None or not document_ids:
            return
        owners = await self.registry.owners(document_ids)
        for document_id, owner in zip(document_ids, owners or (), strict=False):
            if owner is not None:
                self.documents.add(owner, document_id)

    async def resolve(self, text: str | bytes) -> None:
        """Make the owners of `text`'s document ids known before it is redacted."""
        await self.learn(self.unresolved(text))

    def redact(self, text: str, tenant: str, request_id: str) -> str:
        """`text` with other tenants' identifiers replaced; counted and logged."""
        result, found = self.redacted(text, tenant)
        self.record(found, tenant, request_id)
        return result

    def record(self, found: Counter[str], tenant: str, request_id: str) -> None:
        """Count and log redactions (a security event)."""
        if found:
            self.redactions.update(found)
            log.warning("security event: answer to tenant %s (request %s) named other tenants'"
                        " identifiers; redacted %s", tenant, request_id, dict(found))

    def foreign_document(self, document_id: str, tenant: str) -> bool:
        """Whether `document_id` is known as another tenant's document."""
        owner = self.documents.owner(document_id)
        return owner is not None and owner != tenant

    def may_name_others(self, text: str) -> bool:
        """False when `text` surely has nothing to redact: no served tenant's name as a word
        (the caller's own counts: the exact pass keeps it) and no UUID while ids are known.
        In C but for the set lookups: the exact pass calls back into Python per word."""
        if self.documents and _has_uuid(text):
            return True
        self.names()
        # Lowering the whole text first is cheaper than word by word, and the same for ASCII
        # (lowering other characters can merge them into a word: "İ" gives "i" and a mark).
        words = _WORDS.findall(text.lower()) if text.isascii() else map(
            str.lower, _WORDS.findall(text))
        return not self._first_parts.isdisjoint(words)

    def redacted(self, text: str, tenant: str) -> tuple[str, Counter[str]]:
        """Pure but for the names' refresh: the redacted text and what was redacted."""
        found: Counter[str] = Counter()
        if not self.may_name_others(text):
            return text, found
        names = self.names()

        def replace(match: re.Match[str]) -> str:
            value = match.group(0)
            if match.group("uuid") is not None:
                if not self.foreign_document(value, tenant):
                    return value
                found["document_id"] += 1
                return REDACTED
            if "-" not in value:  # most words: one set lookup
                lowered = value.lower()
                if lowered == tenant or lowered not in names:
                    return value
                found["tenant_name"] += 1
                return REDACTED
            if _has_uuid(value):  # glued to word characters: `doc_<uuid>`, `v2<uuid>-x`
                return around_uuids(value)
            return "-".join(self._redacted_parts(value.split("-"), tenant, names, found))

        def around_uuids(word: str) -> str:
            """A word holding UUIDs: each read where it begins (the leftmost match, as
            `unresolved` reads them), the text between them read for names."""
            out: list[str] = []
            last = 0
            for match in _ANY_UUID.finditer(word):
                out.append(_TOKENS.sub(replace, word[last:match.start()]))
                if self.foreign_document(match.group(0), tenant):
                    found["document_id"] += 1
                    out.append(REDACTED)
                else:
                    out.append(match.group(0))
                last = match.end()
            out.append(_TOKENS.sub(replace, word[last:]))
            return "".join(out)

        return _TOKENS.sub(replace, text), found

    @staticmethod
    def _redacted_parts(parts: list[str], tenant: str, names: frozenset[str],
                        found: Counter[str]) -> list[str]:
        """The parts of a hyphenated word (without UUIDs) with each run of parts that is
        another tenant's name (longest run first) replaced by REDACTED. The caller's own name
        is a run too: kept whole, so a shorter name inside it is not redacted."""
        out: list[str] = []
        at = 0
        while at < len(parts):
            for end in range(min(len(parts), at + _MAX_NAME_PARTS), at, -1):
                run = "-".join(parts[at:end])
                lowered = run.lower()
                if lowered in names:
                    if lowered != tenant:
                        found["tenant_name"] += 1
                        run = REDACTED
                    out.append(run)
                    at = end
                    break
            else:
                out.append(parts[at])
                at += 1
        return out

    def could_begin(self, tail: str, tenant: str) -> bool:
        """Whether `tail` (the end of a delta) may be the start of an identifier to redact."""
        return self.hold_from(tail, tenant) is not None

    def hold_from(self, tail: str, tenant: str) -> int | None:
        """Where in `tail` (the end of a delta) to hold back text that may begin an
        identifier to redact (None: nowhere). A name or a known id: the whole tail; with a
        registry, any UUID: from where it may begin (whole UUIDs before it can go), unless
        it is a short run of hex glued to a word (see `StreamRewriter._continued`)."""
        self.names()
        lowered = tail.lower()
        names = self._sorted_names
        # A name may begin at the tail's start or after any of its hyphens (`big-acme` may be
        # followed by `-corp`).
        starts = [0] + [at + 1 for at, char in enumerate(lowered) if char == "-"]
        for start in starts:
            piece = lowered[start:]
            at = bisect.bisect_left(names, piece)
            while piece and at < len(names) and names[at].startswith(piece):
                if names[at] != tenant:
                    return 0
                at += 1
        if self.registry is None:  # this replica's ids only
            return 0 if len(tail) <= 36 and self.documents.foreign_prefix(tail, tenant) else None
        # Any UUID may be another tenant's: no sorted copy of the known ids to rebuild.
        match = _open_uuid_at_end(tail)
        if match is None:
            return None
        at = match.start("open")
        # Held at the tail's start, after a hyphen or whole UUIDs, or glued to a word once its
        # first group is whole (`doc<8 hex>-`). Most words end in a few hex letters (`the`,
        # `decade`): holding them would rewrite most deltas, so they go out, and the next
        # delta redacts the rest of a foreign id they began.
        if at == 0 or tail[at - 1] == "-" or at > match.start() or "-" in match.group("open"):
            return at
        return None

    def redact_value(self, value: Any, tenant: str, request_id: str) -> Any:
        """A parsed JSON value with every string (object keys too) redacted."""
        if isinstance(value, str):
            return self.redact(value, tenant, request_id)
        if isinstance(value, list):
            return [self.redact_value(item, tenant, request_id) for item in value]
        if isinstance(value, dict):
            return {self.redact(key, tenant, request_id): self.redact_value(item, tenant,
                                                                             request_id)
                    for key, item in value.items()}
        return value

    def redact_tool_input(self, partial_json: str, tenant: str, request_id: str) -> str:
        """A tool call's whole input JSON, redacted; as plain text when it does not parse."""
        if not self.redacted(partial_json, tenant)[1]:
            return partial_json
        try:
            parsed = json.loads(partial_json)
        except ValueError:
            return self.redact(partial_json, tenant, request_id)
        return json.dumps(self.redact_value(parsed, tenant, request_id))

    def redact_message(self, body: bytes, tenant: str, request_id: str) -> bytes:
        """A non-streaming answer with its text blocks redacted (bytes kept when clean)."""
        try:
            text = body.decode()
        except UnicodeDecodeError:
            return body
        if not self.redacted(text, tenant)[1]:
            return body
        try:
            message = json.loads(body)
        except ValueError:
            return body
        changed = False
        for block in message.get("content") or [] if isinstance(message, dict) else []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                clean = self.redact(block["text"], tenant, request_id)
                changed = changed or clean != block["text"]
                block["text"] = clean
            elif block.get("type") == "tool_use" and "input" in block:
                clean_input = self.redact_value(block["input"], tenant, request_id)
                changed = changed or clean_input != block["input"]
                block["input"] = clean_input
        return json.dumps(message).encode() if changed else body


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class _Lookup(Exception):
    """An event holds UUIDs the registry must be asked about before it can be rewritten."""

    def __init__(self, document_ids: list[str]) -> None:
        super().__init__()
        self.document_ids = document_ids


@dataclass
class StreamRewriter:
    """Rewrites SSE events of one answer: redacts text deltas, collects the answer's text.

    Events are passed through byte for byte unless a delta is redacted or held back. With a
    registry, an event whose text holds a UUID not resolved yet stops the rewriting: `lookup`
    names the ids, `resolve()` asks the registry, `drain()` goes on (RewrittenStream does both).
    """

    sanitizer: Sanitizer | None
    tenant: str
    request_id: str
    texts: dict[int, list[str]] = field(default_factory=dict)
    completed: bool = False
    _buffer: bytes = b""
    _pending: dict[int, str] = field(default_factory=dict)
    # Per block index, the open UUID a sent delta ended with (hex glued to a word).
    _carried: dict[int, str] = field(default_factory=dict)
    # Tool-use input per block index, held until the block stops (see the module's doc).
    _tool_json: dict[int, list[str]] = field(default_factory=dict)
    # Events not rewritten yet (waiting for `lookup`), and the ids this stream asked about.
    _queue: deque[bytes] = field(default_factory=deque)
    lookup: list[str] = field(default_factory=list)
    _asked: set[str] = field(default_factory=set)
    # True while `feed` rewrites events of a quiet chunk (see `_quiet`).
    _in_quiet: bool = False

    def feed(self, chunk: bytes) -> bytes:
        data = self._buffer + chunk if self._buffer else chunk
        end = data.rfind(b"\n\n") + 2
        if end < 2:
            self._buffer = data
            return b""
        self._buffer = data[end:]
        events = data[:end - 2].split(b"\n\n")
        if self._queue or self.lookup:
            self._queue.extend(events)
            return self.drain()
        out: list[bytes] = []
        changed = False
        self._in_quiet = self._quiet(data[:end])
        try:
            for n, event in enumerate(events):
                raw = event + b"\n\n"
                try:
                    rewritten = self._event(raw)
                except _Lookup as wanted:
                    self.lookup = wanted.document_ids
                    self._queue.extend(events[n:])
                    return b"".join(out)
                changed = changed or rewritten is not raw
                out.append(rewritten)
        finally:
            self._in_quiet = False
        # Most answers pass unchanged: their bytes as they came, without joining the events.
        return b"".join(out) if changed else data[:end]

    def _quiet(self, events: bytes) -> bool:
        """Whether no plain text delta in `events` (`_PLAIN_TEXT_DELTA`) can hold an
        identifier to redact or a UUID to ask about: their texts, found in one pass, are
        screened once (no UUID, no word that begins a served tenant's name: the
        sanitizer's screen) instead of delta by delta."""
        if self.sanitizer is None:
            return False
        texts = b"\n".join(_PLAIN_TEXTS.findall(events))
        if _ANY_UUID_HINT_BYTES.search(texts) is not None:
            return False
        try:
            return not self.sanitizer.may_name_others(texts.decode())
        except UnicodeDecodeError:
            return False

    def drain(self) -> bytes:
        """The queued events rewritten, up to one that waits for a lookup."""
        out: list[bytes] = []
        while self._queue and not self.lookup:
            try:
                out.append(self._event(self._queue[0] + b"\n\n"))
            except _Lookup as wanted:
                self.lookup = wanted.document_ids
                break
            self._queue.popleft()
        return b"".join(out)

    async def rewrite(self, chunk: bytes) -> bytes:
        """`feed`, asking the registry whenever a UUID must be resolved before its event."""
        out = self.feed(chunk)
        while self.lookup:
            await self.resolve()
            out += self.drain()
        return out

    async def resolve(self) -> None:
        """Ask the registry about `lookup` (once per id and stream), then clear it."""
        wanted, self.lookup = self.lookup, []
        self._asked.update(wanted)
        if self.sanitizer is not None:
            await self.sanitizer.learn(wanted)

    def _need(self, text: str) -> None:
        """Raise _Lookup when `text` holds UUIDs to ask the registry about first."""
        if self.sanitizer is not None:
            wanted = self.sanitizer.unresolved(text, self._asked)
            if wanted:
                raise _Lookup(wanted)

    def flush(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        return rest

    def _event(self, raw: bytes) -> bytes:
        if b"content_block_delta" in raw and b'"text_delta"' in raw:
            return self._text_delta(raw)
        if (self.sanitizer is not None and b"content_block_delta" in raw
                and b'"input_json_delta"' in raw):
            return self._hold_tool_json(raw)
        if b"content_block_stop" in raw and self._carried:
            self._carried.clear()
        if b"content_block_stop" in raw and (self._tool_json or self._pending):
            data = self._data(raw)
            index = data.get("index") if data else None
            if isinstance(index, int) and index in self._tool_json and self.sanitizer:
                held = "".join(self._tool_json[index])
                self._need(held)
                del self._tool_json[index]
                clean = self.sanitizer.redact_tool_input(held, self.tenant, self.request_id)
                return _sse("content_block_delta", {
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": clean}}) + raw
            if isinstance(index, int) and self._pending.get(index):
                self._need(self._pending[index])
                text = self._clean(self._pending.pop(index))
                self.texts.setdefault(index, []).append(text)
                return self._delta(index, text) + raw
        if b"event: message_stop" in raw:
            self.completed = True
        return raw

    def _text_delta(self, raw: bytes) -> bytes:
        parsed = plain = self._plain_text_delta(raw)
        if parsed is None:
            parsed = self._delta_field(raw, "text")
            if parsed is None:
                return raw
        index, original = parsed
        # Screened with its chunk (`_quiet`): a plain delta, without text held before it.
        quiet = self._in_quiet and plain is not None and index not in self._pending
        text = self._pending.get(index, "") + original
        held = lead = ""
        if self.sanitizer is not None:
            carried = self._carried.get(index, "")
            if carried and text[:1] in _HEX_OR_HYPHEN:
                lead, text, held = self._continued(carried, text)
            continuing = bool(held)  # all of it held as the carried UUID's continuation
            trailing = None if continuing else _TRAILING_WORD.search(text)
            at = self.sanitizer.hold_from(trailing.group(0), self.tenant) if trailing else None
            if trailing and at is not None:
                text, held = text[:trailing.start() + at], text[trailing.start() + at:]
            # A quiet delta has nothing to redact or ask about; cut, it is screened alone
            # (its part before the cut may end in a word that was not screened).
            if not quiet or held:
                self._need(text)  # before any state changes: the event is rewritten again
                text = self._clean(text)
            if lead:
                self.sanitizer.record(Counter(document_id=1), self.tenant, self.request_id)
                text = lead + text
            if not continuing:
                self._carry(index, None if held else text)
        if held:
            self._pending[index] = held
        else:
            self._pending.pop(index, None)
        self.texts.setdefault(index, []).append(text)
        if text == original:
            return raw
        return self._delta(index, text) if text else b""

    def _continued(self, carried: str, text: str) -> tuple[str, str, str]:
        """`text` after a sent delta that ended in `carried`, an open UUID glued to a word:
        (REDACTED or "", text, held). A foreign id that began in `carried` and ends in `text`
        loses its rest (what was sent of it, 8 hex characters at most, stays); one that still
        goes on holds all of `text`. Raises _Lookup first when the id is unresolved."""
        joined = carried + text
        whole = _ANY_UUID.search(joined)
        if whole is not None and whole.start() < len(carried):
            self._need(whole.group(0))
            assert self.sanitizer is not None
            if self.sanitizer.foreign_document(whole.group(0), self.tenant):
                return REDACTED, joined[whole.end():], ""
            return "", text, ""
        still = _open_uuid_at_end(joined)
        if still is not None and still.start("open") < len(carried):
            return "", "", text
        return "", text, ""

    def _carry(self, index: int, sent: str | None) -> None:
        """Remember the open UUID that `sent` ends with (None: text was held after it)."""
        match = _open_uuid_at_end(sent) if sent is not None else None
        if match is not None:
            self._carried[index] = match.group("open")
        else:
            self._carried.pop(index, None)

    @staticmethod
    def _plain_text_delta(raw: bytes) -> tuple[int, str] | None:
        """(index, text) of a text delta laid out as `_PLAIN_TEXT_DELTA`; None for any
        other (then parsed)."""
        line = sse_data_line(raw)
        match = _PLAIN_TEXT_DELTA.fullmatch(line) if line is not None else None
        if match is None:
            return None
        try:
            return int(match.group(1)), match.group(2).decode()
        except UnicodeDecodeError:
            return None

    def _hold_tool_json(self, raw: bytes) -> bytes:
        parsed = self._delta_field(raw, "partial_json")
        if parsed is None:
            return raw
        index, partial_json = parsed
        self._tool_json.setdefault(index, []).append(partial_json)
        return b""

    @classmethod
    def _delta_field(cls, raw: bytes, key: str) -> tuple[int, str] | None:
        """(index, delta[key]) of a content_block_delta event; None when it is not that."""
        data = cls._data(raw)
        delta = data.get("delta") if data else None
        index = data.get("index") if data else None
        if not isinstance(delta, dict) or not isinstance(index, int) or not isinstance(
                delta.get(key), str):
            return None
        return index, delta[key]

    def _clean(self, text: str) -> str:
        if self.sanitizer is None:
            return text
        return self.sanitizer.redact(text, self.tenant, self.request_id)

    @staticmethod
    def _delta(index: int, text: str) -> bytes:
        return _sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                            "delta": {"type": "text_delta", "text": text}})

    @staticmethod
    def _data(raw: bytes) -> dict[str, Any] | None:
        return sse_data(raw)

    def answer_text(self) -> str:
        return "".join("".join(self.texts[index]) for index in sorted(self.texts))


class RewrittenStream(UpstreamResponse):
    """An upstream stream seen through a StreamRewriter; `on_end` runs once it completed."""

    def __init__(self, inner: UpstreamResponse, rewriter: StreamRewriter,
                 on_end: Callable[[StreamRewriter], Any] | None = None) -> None:
        super().__init__(inner._response, None)
        self._inner = inner
        self.rewriter = rewriter
        self._on_end = on_end

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner.chunks():
            out = await self.rewriter.rewrite(chunk)
            if self.rewriter.completed and self._on_end is not None:
                await self._on_end(self.rewriter)
                self._on_end = None
            if out:
                yield out
        rest = self.rewriter.flush()
        if rest:
            yield rest
