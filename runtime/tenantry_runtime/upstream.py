"""Calls to the model endpoints: one connection pool per endpoint, timeouts, and retries on
429/5xx/connection errors only before the first byte reaches the client."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from .errors import ApiError, kind_for_status
from .http1 import ConnectionBroken, Pool, Response
from .settings import RuntimeSettings

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504, 529})
# Request headers the model needs; the tenant's own credentials never travel upstream.
FORWARDED_HEADERS = ("anthropic-version", "anthropic-beta", "content-type", "accept")


@dataclass(frozen=True)
class Endpoint:
    kind: str  # "shared" | "dedicated": recorded with usage
    url: str
    api_key: str


def backoff_delay(attempt: int, base: float, cap: float, retry_after: str | None) -> float:
    """Pure: the wait before retry `attempt` (0-based); an upstream retry-after within the
    cap wins, else exponential with jitter."""
    if retry_after is not None:
        try:
            asked = float(retry_after)
        except ValueError:
            asked = -1.0
        if 0 <= asked <= cap:
            return float(asked)
    return min(cap, base * 2.0**attempt) * random.uniform(0.5, 1.0)  # noqa: S311 - jitter


def upstream_error(status: int, body: bytes) -> ApiError:
    """Pure: what the client sees for an upstream error response."""
    if status in (401, 403):
        # The runtime's upstream credentials failed: not the tenant's key, so not a 401/403.
        return ApiError("api_error", f"The model endpoint refused the runtime ({status}).",
                        status=502)
    message = f"The model endpoint returned {status}."
    try:
        parsed = json.loads(body)
        inner = parsed["error"]
        message, kind = str(inner["message"]), str(inner["type"])
    except (ValueError, KeyError, TypeError):
        kind = kind_for_status(status)
    return ApiError(kind, message, status=status)


def forwarded_headers(incoming: Mapping[str, str], endpoint: Endpoint) -> dict[str, str]:
    headers = {name: incoming[name] for name in FORWARDED_HEADERS if name in incoming}
    headers.setdefault("anthropic-version", "2023-06-01")
    headers.setdefault("content-type", "application/json")
    headers["x-api-key"] = endpoint.api_key
    return headers


class UpstreamResponse:
    """A 2xx answer: the whole body (non-streaming) or its chunks as they arrive."""

    def __init__(self, response: Response, content: bytes | None) -> None:
        self._response = response
        self.status = response.status
        self.content = content if content is not None else b""

    def chunks(self) -> AsyncIterator[bytes]:
        return self._response.chunks()

    def close(self) -> None:
        self._response.close()


# Errors that mean "no (complete) answer from the endpoint" while reading it.
STREAM_ERRORS = (ConnectionBroken, TimeoutError)


class Upstreams:
    """A pooled HTTP/1.1 client per endpoint URL, created on first use.

    `http1.Pool` rather than aiohttp (its per-request Python was ~15% of the runtime's CPU)
    or httpx (its pool measured ~150 req/s at 64 concurrent here, aiohttp ~2,800):
    bench/README.md.
    """

    def __init__(self, settings: RuntimeSettings) -> None:
        self._settings = settings
        self._pools: dict[str, Pool] = {}

    def _pool(self, url: str) -> Pool:
        pool = self._pools.get(url)
        if pool is None:
            s = self._settings
            pool = Pool(url, max_connections=s.upstream_max_connections,
                        connect_timeout=s.upstream_connect_timeout_seconds,
                        read_timeout=s.upstream_read_timeout_seconds)
            self._pools[url] = pool
        return pool

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()
        self._pools.clear()

    async def send(self, endpoint: Endpoint, path: str, body: bytes,
                   headers: Mapping[str, str], *, read_body: bool) -> UpstreamResponse:
        """A 2xx response, retried while nothing has reached the client.

        With `read_body` the body is read inside the retry loop (non-streaming); otherwise
        the response is returned open and the caller streams it (no retries after that).
        Raises ApiError for an error the retries did not cure.
        """
        outgoing = forwarded_headers(headers, endpoint)
        s = self._settings
        for attempt in range(s.upstream_retries + 1):
            last = attempt == s.upstream_retries
            try:
                response = await self._pool(endpoint.url).post(path, outgoing, body)
                if response.status < 300:
                    content = await response.read() if read_body else None
                    return UpstreamResponse(response, content)
                error_body = await response.read()
                if last or response.status not in RETRYABLE_STATUS:
                    raise upstream_error(response.status, error_body)
                retry_after = response.headers.get("retry-after")
            except TimeoutError:
                if last:
                    raise ApiError("api_error", "The model endpoint timed out.",
                                   status=504) from None
                retry_after = None
            except ValueError as error:
                # Not worth a retry: its URL or its key (a line break) is misconfigured.
                log.error("upstream %s request not sent: %s", endpoint.kind, error)
                raise ApiError("api_error", "The model endpoint is misconfigured.",
                               status=502) from None
            except ConnectionBroken as error:
                if last:
                    raise ApiError("api_error", "The model endpoint is unreachable.",
                                   status=502) from error
                retry_after = None
            delay = backoff_delay(attempt, s.upstream_backoff_seconds,
                                  s.upstream_backoff_max_seconds, retry_after)
            log.info("upstream %s attempt %d failed; retrying in %.2fs", endpoint.kind,
                     attempt + 1, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
