"""Pure parsing of Messages API traffic: the request fields admission needs, usage out of
responses and SSE streams."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError
from .limits import Usage

_USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                 "cache_read_input_tokens")
# The most tokens one count of one answer may report (far above any context window). An
# endpoint reporting more is capped here: settle.lua's INCRBY and the usage table's bigint
# and numeric columns refuse what is far larger, and the settlement would be lost.
MAX_REPORTED_TOKENS = 10**9


@dataclass(frozen=True)
class MessagesRequest:
    model: str
    max_tokens: int
    stream: bool


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError("invalid_request_error",
                       f"Request body is not valid JSON: {error}") from None
    except RecursionError:
        # A few KB of brackets exhaust the parser's stack: the caller's error, not a 500.
        raise ApiError("invalid_request_error",
                       "Request body is nested too deeply.") from None
    if not isinstance(parsed, dict):
        raise ApiError("invalid_request_error", "Request body must be a JSON object.")
    return parsed


# The request fields the runtime decides on. It forwards the request's bytes, not its parse:
# with a field repeated, Python keeps the last and a parser that keeps the first (or fails
# differently) would run another model or max_tokens than the one checked.
_DECIDED = ("model", "max_tokens", "stream")
_DECIDED_KEYS = re.compile(rb'"(?:model|max_tokens|stream)"')
# A key whose last \u escape is followed by at most 16 plain characters: every key that
# spells a decided name with escapes ("mod\u0065l") is one. Escapes in values (non-ASCII
# text) are not followed by `":`, and the bounded run keeps the search linear.
_ESCAPED_KEY = re.compile(rb'\\u[0-9a-fA-F]{4}[^"\\:]{0,16}"\s*:')


def check_fields_once(body: bytes) -> None:
    """400 when the top-level object repeats a field the runtime decides on. Parsed again
    (with the pairs kept) only when the bytes could hold a repeat: a name written twice, or
    a key with an escape that could spell one (one C scan each otherwise: ~2 us per 2 KB)."""
    names = _DECIDED_KEYS.findall(body)
    if len(names) == len(set(names)) and _ESCAPED_KEY.search(body) is None:
        return
    objects: list[list[tuple[str, Any]]] = []

    def keep(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        objects.append(pairs)
        return dict(pairs)

    json.loads(body, object_pairs_hook=keep)  # parsed once before: cannot fail now
    top_level = [name for name, _ in objects[-1]]  # the top-level object is completed last
    for name in _DECIDED:
        if top_level.count(name) > 1:
            raise ApiError("invalid_request_error", f"{name}: given more than once.")


def parse_messages_request(body: bytes) -> MessagesRequest:
    """The fields the runtime decides on; the upstream validates the rest."""
    parsed = parse_json_object(body)
    check_fields_once(body)
    model, max_tokens = parsed.get("model"), parsed.get("max_tokens")
    stream = parsed.get("stream", False)
    if not isinstance(model, str) or not model:
        raise ApiError("invalid_request_error", "model: field required (a string).")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError("invalid_request_error", "max_tokens: field required (an integer >= 1).")
    check_messages(parsed.get("messages"))
    if not isinstance(stream, bool):
        raise ApiError("invalid_request_error", "stream: must be a boolean.")
    return MessagesRequest(model=model, max_tokens=max_tokens, stream=stream)


def check_messages(messages: object) -> None:
    """The shape every upstream relies on: a non-empty list of {role, content} objects (found
    by fuzzing: a bare string in the list made upstreams answer 500)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("invalid_request_error", "messages: field required (a non-empty list).")
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise ApiError("invalid_request_error",
                           f"messages.{n}: an object with role 'user' or 'assistant'.")
        if not isinstance(message.get("content"), str | list):
            raise ApiError("invalid_request_error",
                           f"messages.{n}.content: a string or a list of content blocks.")


def parse_count_tokens_request(body: bytes) -> str:
    """The model of a count_tokens request, its messages checked like a message's."""
    parsed = parse_json_object(body)
    check_fields_once(body)
    model = parsed.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError("invalid_request_error", "model: field required (a string).")
    check_messages(parsed.get("messages"))
    return model


def usage_of(raw: object, base: Usage | None = None) -> Usage:
    """A `usage` object as Usage; fields it lacks keep their value from `base`."""
    start = base or Usage()
    if not isinstance(raw, dict):
        return start
    values = {name: getattr(start, name) for name in _USAGE_FIELDS}
    for name in _USAGE_FIELDS:
        value = raw.get(name)
        # A negative count is no count: it would cancel the others' charge (a budget
        # bypass) and make an event the usage table refuses (CHECK >= 0).
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            values[name] = min(value, MAX_REPORTED_TOKENS)
    return Usage(**values)


_DECODER = json.JSONDecoder()


def loads_utf8(data: bytes) -> Any:
    """JSON from UTF-8 bytes (what model endpoints send). `json.loads` of bytes first guesses
    their encoding in Python, a third of its time on an SSE event's data (bench/README.md,
    third round). A UTF-8 byte order mark is skipped, as `json.loads` does. Raises ValueError
    (UnicodeDecodeError is one) as `json.loads` does, also for JSON nested too deeply to
    parse (RecursionError), so an endpoint's odd answer cannot skip its settlement."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return _DECODER.decode(data.decode())
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def sse_data_line(event: bytes) -> bytes | None:
    """What follows `data:` on an SSE event's first data line; None when there is none."""
    if event.startswith(b"data:"):
        start = 5
    else:
        at = event.find(b"\ndata:")
        if at < 0:
            return None
        start = at + 6
    end = event.find(b"\n", start)
    return event[start:] if end < 0 else event[start:end]


def sse_data(event: bytes) -> dict[str, Any] | None:
    """The object in an SSE event's (first) `data:` line; None when there is none."""
    line = sse_data_line(event)
    if line is None:
        return None
    try:
        parsed = loads_utf8(line)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def usage_of_message(body: bytes) -> Usage:
    """Usage of a non-streaming response body (zero when it has none)."""
    try:
        parsed = loads_utf8(body)
    except ValueError:
        return Usage()
    return usage_of(parsed.get("usage")) if isinstance(parsed, dict) else Usage()


@dataclass
class StreamUsage:
    """Reads usage out of SSE bytes as they pass through, without touching them.

    Only `message_start` and `message_delta` events are parsed (usage lives there; the
    deltas' cumulative counts win); every other event is skipped by a substring test.
    """

    usage: Usage = field(default_factory=Usage)
    completed: bool = False
    errored: bool = False
    _pending: bytes = b""

    def feed(self, chunk: bytes) -> None:
        data = self._pending + chunk if self._pending else chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        if end < 0:
            self._pending = data
            return
        self._pending = data[end + 2:]
        complete = data[:end]
        # Most chunks are deltas: one search in C instead of a split and tests per event.
        if b"event: message_" not in complete and b"event: error" not in complete:
            return
        for event in complete.split(b"\n\n"):
            if b"event: message_" in event or b"event: error" in event:
                self._read_event(event)

    def _read_event(self, event: bytes) -> None:
        if b"event: message_stop" in event:
            self.completed = True
            return
        if b"event: error" in event:
            self.errored = True
            return
        if b"event: message_start" not in event and b"event: message_delta" not in event:
            return
        parsed = sse_data(event)
        if parsed is None:
            return
        if parsed.get("type") == "message_start":
            message = parsed.get("message")
            if isinstance(message, dict):
                self.usage = usage_of(message.get("usage"), self.usage)
        elif parsed.get("type") == "message_delta":
            self.usage = usage_of(parsed.get("usage"), self.usage)
