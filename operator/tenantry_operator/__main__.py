"""`python -m tenantry_operator`: hold the leader Lease, then run kopf with our handlers.

Every replica runs this. One holds the Lease (leader.py) and runs kopf cluster-wide and
standalone; the others stand by and take over when the Lease expires or is released. A
leader that cannot renew exits non-zero, so Kubernetes restarts it as a standby.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import signal
import sys

import kopf
from aiohttp import web

from . import handlers  # noqa: F401 - registers the handlers
from .kube import Kube
from .leader import LeaderElector, RenewalThread
from .malloc import MALLOC_ARENAS, limit_malloc_arenas
from .metrics import CONTENT_TYPE, METRICS
from .settings import OperatorSettings, get_settings

log = logging.getLogger(__name__)


async def serve_health(port: int, elector: LeaderElector) -> web.AppRunner:
    """GET /healthz: 200 from leader and standby alike (a standby is healthy, only idle).
    GET /metrics: the operator's Prometheus metrics (metrics.py) on the same port."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"role": "leader" if elector.is_leader else "standby"})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=METRICS.render(leader=elector.is_leader),
                            headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()  # noqa: S104 - probed by the kubelet
    return runner


async def run(settings: OperatorSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # While standing by; kopf installs its own handlers for these once it runs.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    kube = Kube.from_env()
    elector = LeaderElector(kube.client, settings)
    health = await serve_health(settings.health_port, elector) if settings.health_port else None
    try:
        if not await elector.acquire(stop):
            return 0  # stopped while standing by
        # Renewals run on a thread and connection of their own (leader.RenewalThread): a busy
        # event loop must not delay them past the deadline.
        renewing = RenewalThread(elector, lambda: Kube.from_env().client)
        renewing.start()
        try:
            await kopf.operator(clusterwide=True, standalone=True, stop_flag=stop)
        finally:
            await renewing.stop()
            await elector.release()
        return 0
    finally:
        if health is not None:
            await health.cleanup()
        await kube.close()


# asyncio gives every TLS connection a zero-filled read buffer of 256 KiB (kopf's aiohttp and
# fastpath.py: about 50 connections at 32 workers, 13 MB of RSS). 64 KiB reads a large list
# in more reads, and costs a quarter of the memory.
SSL_READ_BUFFER = 64 * 1024


def main() -> None:
    limit_malloc_arenas(MALLOC_ARENAS)
    if hasattr(asyncio.sslproto.SSLProtocol, "max_size"):
        asyncio.sslproto.SSLProtocol.max_size = SSL_READ_BUFFER
    kopf.configure(log_prefix=True)  # as `kopf run`: object-related lines start [name]
    # One INFO line per HTTP request (a Lease renewal every few seconds) drowns the rest.
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sys.exit(asyncio.run(run(get_settings())))


if __name__ == "__main__":
    main()
