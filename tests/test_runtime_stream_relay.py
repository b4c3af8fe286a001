"""How the runtime relays a stream: events go on as they come, and only the answer's end waits
for the settlement (the usage event is durable before the response completes)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from runtime_helpers import MODEL, RuntimeServer, usage_events

pytestmark = pytest.mark.timeout(120)


def test_events_go_on_as_they_come_and_message_stop_waits_for_the_usage_event(
        runtime_server: RuntimeServer) -> None:
    key = runtime_server.add_tenant("relayorder")["main"]
    # The model pauses before every event: message_delta reaches the runtime well before
    # message_stop and the stream's end, after which the runtime settles.
    runtime_server.stub.event_delay_seconds = 0.5
    events_when: dict[str, list[dict[str, Any]]] = {}
    received = b""
    try:
        with httpx.stream("POST", f"{runtime_server.url}/v1/messages", headers={
                "x-api-key": key, "anthropic-version": "2023-06-01"}, json={
                "model": MODEL, "max_tokens": 16, "stream": True,
                "messages": [{"role": "user", "content": "hi"}]}, timeout=30) as response:
            for piece in response.iter_raw():
                received += piece
                for kind in ("message_delta", "message_stop"):
                    if f"event: {kind}".encode() in received and kind not in events_when:
                        events_when[kind] = usage_events(runtime_server.redis_url,
                                                         "relayorder")
    finally:
        runtime_server.stub.event_delay_seconds = 0.0
    assert received.endswith(b'data: {"type":"message_stop"}\n\n')
    # message_delta was passed on before the model finished: nothing was settled yet.
    assert events_when["message_delta"] == []
    # message_stop only after the settlement: the usage event was there when it arrived.
    [event] = events_when["message_stop"]
    assert (event["status"], event["output_tokens"], event["stream"]) == (200, 2, True)
