"""The operator's per-tenant requests (GET, server-side apply) over aiohttp.

Measured here: lightkube's httpx stack costs about 2 ms of CPU per request, aiohttp about
0.8 ms (bench/README.md, operator_scale). A pool tenant's creation makes about a dozen such
requests, and the operator's CPU is what bounds a burst of new tenants. URLs come from lightkube
(the same paths), and so do the cluster's TLS settings and the credentials: a client
certificate, a token, or a token file (in a Pod; re-read every minute and after a 401). Other
kinds of credentials (exec plugins, auth providers, basic auth) keep lightkube for everything
(`FastPath.for_client` returns None).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
from lightkube import ApiError, AsyncClient
from lightkube.config.client_adapter import verify_cluster

_TOKEN_SECONDS = 60.0
CONNECTIONS = 16


class FastPath:
    """GET and server-side apply of plain dicts; errors are lightkube's ApiError."""

    def __init__(self, client: AsyncClient) -> None:
        self._generic: Any = client._client  # lightkube's request builder: the URL of a kind
        config: Any = self._generic.config
        self._server = str(config.cluster.server).rstrip("/")
        self._ssl = (verify_cluster(config.cluster, config.user, config.abs_file)
                     if self._server.startswith("https") else None)
        self._token: str | None = config.user.token
        self._token_file: str | None = config.user.token_file
        self._token_read_at = 0.0
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def for_client(cls, client: AsyncClient) -> FastPath | None:
        config: Any = client._client.config
        user = config.user if config is not None else None
        if user is None or user.exec or user.auth_provider or (user.username and user.password):
            return None
        return cls(client)

    def _headers(self, content_type: str | None = None, reread: bool = False) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "tenantry-operator/aiohttp"}
        if content_type:
            headers["Content-Type"] = content_type
        if self._token_file is not None and (
                reread or time.monotonic() - self._token_read_at > _TOKEN_SECONDS):
            self._token = Path(self._token_file).read_text().strip()
            self._token_read_at = time.monotonic()
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def url(self, kind: Any, name: str, namespace: str | None) -> str:
        request = self._generic.prepare_request("get", res=kind, name=name, namespace=namespace)
        return f"{self._server}/{request.url}"

    async def _request(self, method: str, url: str, params: dict[str, str] | None = None,
                       body: bytes | None = None, content_type: str | None = None
                       ) -> tuple[int, bytes]:
        if self._session is None:  # made in the running loop, as aiohttp requires
            self._session = aiohttp.ClientSession(
                # Each TLS connection holds a read buffer (see __main__.SSL_READ_BUFFER);
                # a reconcile spends most of its time off the API server, so 16 serve 32.
                connector=aiohttp.TCPConnector(limit=CONNECTIONS),
                timeout=aiohttp.ClientTimeout(sock_connect=10, sock_read=10))
        for attempt in (1, 2):
            async with self._session.request(
                    method, url, params=params, data=body, ssl=self._ssl if self._ssl else True,
                    headers=self._headers(content_type, reread=attempt == 2)) as response:
                content = await response.read()
                if response.status == 401 and attempt == 1 and self._token_file is not None:
                    continue  # the kubelet rotated the token
                return response.status, content
        raise AssertionError("unreachable")

    @staticmethod
    def _error(method: str, url: str, status: int, content: bytes) -> ApiError:
        request = httpx2.Request(method, url)
        try:
            json.loads(content)
        except ValueError:  # not a Status (a proxy's page): make one
            content = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                  "code": status, "message": content.decode(errors="replace")
                                  [:500]}).encode()
        return ApiError(request=request,
                        response=httpx2.Response(status, content=content, request=request))

    async def get(self, kind: Any, name: str, namespace: str | None) -> dict[str, Any] | None:
        url = self.url(kind, name, namespace)
        status, content = await self._request("GET", url)
        if status == 404:
            return None
        if status >= 400:
            raise self._error("GET", url, status, content)
        found: dict[str, Any] = json.loads(content)
        return found

    async def apply(self, kind: Any, manifest: dict[str, Any], field_manager: str
                    ) -> dict[str, Any]:
        meta = manifest["metadata"]
        url = self.url(kind, meta["name"], meta.get("namespace"))
        status, content = await self._request(
            "PATCH", url, params={"fieldManager": field_manager, "force": "true"},
            body=json.dumps(manifest).encode(), content_type="application/apply-patch+yaml")
        if status >= 400:
            raise self._error("PATCH", url, status, content)
        applied: dict[str, Any] = json.loads(content)
        return applied

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
