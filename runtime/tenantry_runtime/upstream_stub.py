"""A local model endpoint speaking Anthropic's Messages API, for tests, benchmarks and the demo.

Deterministic: the answer echoes the last user message; tokens are whitespace-separated words.
It honours max_tokens, stop_sequences and tools (a tool_use block for the first or chosen
tool), streams SSE event for event as Anthropic does (ping included), and records every
request it received so tests can assert what reached the model.

Run alone: `python -m tenantry_runtime.upstream_stub --port 8001 [--record FILE]`; with
--record, each request's path and body (never its headers, which carry the key) is appended to
FILE as one JSON line, so another process (`make demo`) can show what reached the model.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .errors import error_body

STUB_MODELS = ("claude-stub-1",)


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class StubState:
    """What the stub saw and how it should misbehave next (set by tests)."""

    api_key: str | None = None
    keep_received: bool = True
    received: list[Received] = field(default_factory=list)
    fail_next: list[int] = field(default_factory=list)  # statuses to answer, in order
    delay_seconds: float = 0.0
    event_delay_seconds: float = 0.0  # between SSE events
    break_stream_after: int | None = None  # drop the connection after this many events
    record_to: Path | None = None  # append {path, body} per request as JSON lines
    delta_chars: int | None = None  # cut streamed text deltas to at most this many characters
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def next_id(self, kind: str) -> str:
        return f"{kind}_stub{next(self._ids):016d}"


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_text_of(block.get("text", "")) if block.get("type") == "text"
                        else _text_of(block.get("content", "")) if block.get("type") ==
                        "tool_result" else "" for block in content if isinstance(block, dict))
    return ""


def count_input_tokens(body: dict[str, Any]) -> int:
    """Words in the system prompt, the messages and the tool definitions."""
    text = _text_of(body.get("system", ""))
    for message in body.get("messages", []):
        text += " " + _text_of(message.get("content", ""))
    for tool in body.get("tools", []) or []:
        text += " " + json.dumps(tool)
    return max(1, len(text.split()))


def _last_user(body: dict[str, Any]) -> dict[str, Any]:
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    return users[-1] if users else {}


def _tool_to_use(body: dict[str, Any]) -> dict[str, Any] | None:
    tools = body.get("tools") or []
    choice = body.get("tool_choice") or {}
    content = _last_user(body).get("content")
    answered = isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content)
    if not tools or answered or choice.get("type") == "none":
        return None
    if choice.get("type") == "tool":
        chosen: dict[str, Any] = next(
            (t for t in tools if t.get("name") == choice.get("name")), tools[0])
        return chosen
    return dict(tools[0])


def _tool_input(tool: dict[str, Any], text: str) -> dict[str, Any]:
    schema = tool.get("input_schema") or {}
    props = schema.get("properties") or {}
    return {name: text if (spec or {}).get("type", "string") == "string" else None
            for name, spec in props.items() if name in (schema.get("required") or props)}


def answer(body: dict[str, Any], state: StubState) -> dict[str, Any]:
    """Pure (except ids): the Message the stub replies with."""
    last = _text_of(_last_user(body).get("content", ""))
    words = ("echo: " + last).split()
    max_tokens = int(body.get("max_tokens", 1))
    stop_reason, stop_sequence = "end_turn", None
    tool = _tool_to_use(body)
    content: list[dict[str, Any]] = []
    if tool is not None:
        words = ["Using", str(tool.get("name"))]
        stop_reason = "tool_use"
    if len(words) > max_tokens:
        words, stop_reason, tool = words[:max_tokens], "max_tokens", None
    text = " ".join(words)
    for sequence in body.get("stop_sequences") or []:
        at = text.find(sequence)
        if at >= 0:
            text, stop_reason, stop_sequence, tool = text[:at], "stop_sequence", sequence, None
    content.append({"type": "text", "text": text})
    if tool is not None:
        content.append({"type": "tool_use", "id": state.next_id("toolu"),
                        "name": tool.get("name"), "input": _tool_input(tool, last)})
    return {
        "id": state.next_id("msg"), "type": "message", "role": "assistant",
        "model": body.get("model"), "content": content, "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": {"input_tokens": count_input_tokens(body), "output_tokens": len(text.split()),
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
    }


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def stream_events(message: dict[str, Any], delta_chars: int | None = None) -> list[bytes]:
    """The SSE events Anthropic emits for `message`, in order: a text delta per word, or
    per `delta_chars` characters of it (identifiers split across deltas)."""
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None,
             "usage": {**usage, "output_tokens": 1}}
    events = [_sse("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            events.append(_sse("content_block_start", {
                "type": "content_block_start", "index": index,
                "content_block": {"type": "text", "text": ""}}))
            if index == 0:
                events.append(_sse("ping", {"type": "ping"}))
            words = block["text"].split(" ")
            pieces = [word if n == 0 else " " + word for n, word in enumerate(words)]
            if delta_chars:
                pieces = [piece[at:at + delta_chars] for piece in pieces
                          for at in range(0, len(piece), delta_chars)]
            for piece in pieces:
                events.append(_sse("content_block_delta", {
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": piece}}))
        else:
            events.append(_sse("content_block_start", {
                "type": "content_block_start", "index": index,
                "content_block": {**block, "input": {}}}))
            raw = json.dumps(block["input"])
            for at in range(0, len(raw), 16):
                events.append(_sse("content_block_delta", {
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": raw[at:at + 16]}}))
        events.append(_sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    events.append(_sse("message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": message["stop_reason"],
                  "stop_sequence": message["stop_sequence"]},
        "usage": {"output_tokens": usage["output_tokens"]}}))
    events.append(_sse("message_stop", {"type": "message_stop"}))
    return events


def _error(status: int, kind: str, message: str) -> Response:
    return Response(error_body(kind, message), status_code=status,
                    media_type="application/json")


def create_stub_app(state: StubState | None = None) -> Starlette:
    stub = state or StubState()

    async def admitted(request: Request) -> tuple[dict[str, Any] | None, Response | None]:
        if stub.api_key is not None and request.headers.get("x-api-key") != stub.api_key:
            return None, _error(401, "authentication_error", "invalid x-api-key")
        try:
            body = json.loads(await request.body())
        except ValueError:
            return None, _error(400, "invalid_request_error", "body is not JSON")
        if stub.keep_received:
            stub.received.append(Received(request.url.path, dict(request.headers), body))
        if stub.record_to is not None:
            with stub.record_to.open("a") as out:
                out.write(json.dumps({"path": request.url.path, "body": body}) + "\n")
        if stub.fail_next:
            status = stub.fail_next.pop(0)
            kind = {429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")
            return None, _error(status, kind, f"stub failure {status}")
        if stub.delay_seconds:
            await asyncio.sleep(stub.delay_seconds)
        return body, None

    async def messages(request: Request) -> Response:
        body, refused = await admitted(request)
        if refused is not None or body is None:
            return refused or _error(400, "invalid_request_error", "no body")
        message = answer(body, stub)
        if not body.get("stream"):
            return Response(json.dumps(message), media_type="application/json")
        events = stream_events(message, stub.delta_chars)
        pause, cut = stub.event_delay_seconds, stub.break_stream_after

        async def send() -> AsyncIterator[bytes]:
            for n, event in enumerate(events):
                if cut is not None and n == cut:
                    raise ConnectionAbortedError("stub: stream broken on purpose")
                if pause:
                    await asyncio.sleep(pause)
                yield event

        return StreamingResponse(send(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    async def count_tokens(request: Request) -> Response:
        body, refused = await admitted(request)
        if refused is not None or body is None:
            return refused or _error(400, "invalid_request_error", "no body")
        return Response(json.dumps({"input_tokens": count_input_tokens(body)}),
                        media_type="application/json")

    app = Starlette(routes=[
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
    ])
    app.state.stub = stub
    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--api-key", default=None, help="Require this x-api-key.")
    parser.add_argument("--record", type=Path, default=None,
                        help="Append each request's path and body to this file (JSON lines).")
    args = parser.parse_args()
    state = StubState(api_key=args.api_key, keep_received=False, record_to=args.record)
    uvicorn.run(create_stub_app(state), host=args.host, port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
