"""Runtime overhead: the same closed-loop load at the local model endpoint directly and
through the runtime (auth, limits and budget in Redis, usage events on), in one run.

Prints requests/s, the ratio runtime/direct and latency p50/p99 for non-streaming and streaming
at each concurrency, and the runtime's RSS. Asserts nothing.

    .venv/bin/python bench/runtime_overhead.py [--seconds 5] [--concurrency 1,64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import redis
from tenantry_devenv.processes import Process, free_port, spawn, wait_until
from tenantry_devenv.services import start_redis
from tenantry_runtime.api_keys import generate_key, record_for
from tenantry_runtime.contracts.redis_keys import TenantKeys
from tenantry_runtime.contracts.runtime_config import (
    Collection,
    DatabaseLocation,
    Endpoint,
    TenantRuntimeConfig,
)
from tenantry_runtime.store import TenantRecord
from tenantry_runtime.upstream_stub import STUB_MODELS

UPSTREAM_KEY = "bench-upstream-key"
TENANT = "bench"


@dataclass(frozen=True)
class Result:
    requests: int
    seconds: float
    latencies: list[float]
    cpu_us: dict[str, float]  # server process -> CPU microseconds per request

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _read_response(reader: asyncio.StreamReader) -> None:
    """Read one HTTP/1.1 response (content-length or chunked) off a kept-alive connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    headers = head.lower()
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {head!r}")
    if b"transfer-encoding: chunked" in headers:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                return
    start = headers.index(b"content-length:") + len(b"content-length:")
    length = int(headers[start:headers.index(b"\r\n", start)])
    await reader.readexactly(length)


async def _worker(url: str, request: bytes, until: float, latencies: list[float]) -> int:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    done = 0
    try:
        while time.perf_counter() < until:
            started = time.perf_counter()
            writer.write(request)
            await _read_response(reader)
            latencies.append(time.perf_counter() - started)
            done += 1
    finally:
        writer.close()
    return done


def http_request(url: str, key: str, stream: bool) -> bytes:
    body = json.dumps({"model": STUB_MODELS[0], "max_tokens": 64, "stream": stream,
                       "messages": [{"role": "user", "content": "how fast is the runtime"}]})
    host = urlsplit(url).netloc
    return (f"POST /v1/messages HTTP/1.1\r\nhost: {host}\r\nx-api-key: {key}\r\n"
            f"anthropic-version: 2023-06-01\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n{body}").encode()


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def closed_loop(url: str, key: str, stream: bool, concurrency: int, seconds: float,
                      servers: dict[str, psutil.Process]) -> Result:
    request = http_request(url, key, stream)
    warm: list[float] = []
    await asyncio.gather(*(_worker(url, request, time.perf_counter() + 0.5, warm)
                           for _ in range(concurrency)))
    latencies: list[float] = []
    cpu_before = {name: _cpu_seconds(p) for name, p in servers.items()}
    started = time.perf_counter()
    counts = await asyncio.gather(*(_worker(url, request, started + seconds, latencies)
                                    for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    done = sum(counts)
    cpu = {name: (_cpu_seconds(p) - cpu_before[name]) / done * 1e6 for name, p in servers.items()}
    return Result(done, elapsed, latencies, cpu)


def write_tenant(directory: Path, redis_url: str) -> str:
    key, _ = generate_key()
    config = TenantRuntimeConfig(
        revision=1, tenant=TENANT, isolation="pool", suspended=False, model=STUB_MODELS[0],
        max_tokens_per_request=4096, endpoint=Endpoint(type="shared"),
        database=DatabaseLocation(kind="shared", schema_name="public"),
        collection=Collection(enabled=False, table=None, dimensions=384, top_k=4, shared=True),
        redis_key_prefix=TenantKeys(TENANT).prefix)
    record = TenantRecord(config=config, api_keys=(record_for(key, "bench"),))
    (directory / f"{TENANT}.json").write_text(record.model_dump_json())
    client = redis.Redis.from_url(redis_url)
    client.hset(TenantKeys(TENANT).limits, mapping={
        "revision": 1, "daily_tokens": 10**12, "monthly_tokens": 10**13, "overage_allowed": 0,
        "requests_per_minute": 10**9, "tokens_per_minute": 10**12,
        "max_tokens_per_request": 4096, "suspended": 0})
    client.close()
    return key


@contextmanager
def server(name: str, argv: list[str], port: int, workdir: Path,
           env: dict[str, str] | None = None) -> Iterator[Process]:
    process = spawn(name, argv, workdir / f"{name}.log", env=env)
    try:
        wait_until(f"{name} to listen", lambda: httpx.get(
            f"http://127.0.0.1:{port}/healthz", timeout=1).status_code < 600, process, 30)
        yield process
    finally:
        process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--keep-logs", action="store_true", help="Print the servers' log tails.")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="tenantry-bench-") as tmp:
        print(f"logs in {tmp}", file=sys.stderr)
        workdir = Path(tmp)
        redis_server = start_redis(workdir / "redis")
        tenants = workdir / "tenants"
        tenants.mkdir()
        key = write_tenant(tenants, redis_server.url)
        stub_port, runtime_port = free_port(), free_port()
        stub_url = f"http://127.0.0.1:{stub_port}"
        runtime_url = f"http://127.0.0.1:{runtime_port}"
        python = sys.executable
        try:
            with server("stub", [python, "-m", "tenantry_runtime.upstream_stub", "--port",
                                 str(stub_port), "--api-key", UPSTREAM_KEY], stub_port,
                        workdir) as stub, \
                 server("runtime", [python, "-m", "tenantry_runtime", "--host", "127.0.0.1",
                                    "--port", str(runtime_port)], runtime_port, workdir, env={
                     "TENANTRY_RUNTIME_TENANTS_DIR": str(tenants),
                     "TENANTRY_RUNTIME_REDIS_URL": redis_server.url,
                     "TENANTRY_RUNTIME_UPSTREAM_URL": stub_url,
                     "TENANTRY_RUNTIME_UPSTREAM_API_KEY": UPSTREAM_KEY,
                     # One tenant drives all the load: lift its share of the replica.
                     "TENANTRY_RUNTIME_MAX_CONCURRENT_PER_TENANT": "100000"}) as runtime:
                servers = {"stub": psutil.Process(stub.pid),
                           "runtime": psutil.Process(runtime.pid),
                           "redis": psutil.Process(redis_server.process.pid)}
                report(asyncio.run(run_all(stub_url, runtime_url, key, levels, args.seconds,
                                           servers)),
                       servers["runtime"].memory_info().rss)
        finally:
            redis_server.stop()
            if args.keep_logs:
                for log in workdir.glob("*.log"):
                    print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)


async def run_all(stub_url: str, runtime_url: str, key: str, levels: list[int],
                  seconds: float, servers: dict[str, psutil.Process],
                  ) -> dict[tuple[str, int, str], Result]:
    results: dict[tuple[str, int, str], Result] = {}
    for stream in (False, True):
        mode = "stream" if stream else "non-stream"
        for concurrency in levels:
            for target, url, credential in (("direct", stub_url, UPSTREAM_KEY),
                                            ("runtime", runtime_url, key)):
                results[mode, concurrency, target] = await closed_loop(
                    url, credential, stream, concurrency, seconds, servers)
                print(f"  {mode:10} c={concurrency:<3} {target:8} "
                      f"{results[mode, concurrency, target].rate:8.0f} req/s", file=sys.stderr)
    return results


def report(results: dict[tuple[str, int, str], Result], rss: int) -> None:
    print(f"{'mode':10} {'conc':>4} {'direct r/s':>10} {'runtime r/s':>11} {'ratio':>6} "
          f"{'direct p50/p99 ms':>18} {'runtime p50/p99 ms':>19} {'added p50/p99':>14}")
    for (mode, concurrency, target), direct in results.items():
        if target != "direct":
            continue
        through = results[mode, concurrency, "runtime"]
        print(f"{mode:10} {concurrency:>4} {direct.rate:>10.0f} {through.rate:>11.0f} "
              f"{through.rate / direct.rate:>6.2f} "
              f"{direct.percentile(0.5):>8.2f}/{direct.percentile(0.99):<9.2f} "
              f"{through.percentile(0.5):>9.2f}/{through.percentile(0.99):<9.2f} "
              f"{through.percentile(0.5) - direct.percentile(0.5):>6.2f}/"
              f"{through.percentile(0.99) - direct.percentile(0.99):<7.2f}")
    print(f"runtime RSS after the run: {rss / 2**20:.0f} MB (one uvicorn worker)")
    print("\nCPU per request, microseconds (independent of other load on the machine):")
    print(f"{'mode':10} {'conc':>4} {'stub direct':>11} {'runtime':>8} {'stub via rt':>11} "
          f"{'redis':>6}")
    for (mode, concurrency, target), direct in results.items():
        if target != "direct":
            continue
        through = results[mode, concurrency, "runtime"].cpu_us
        print(f"{mode:10} {concurrency:>4} {direct.cpu_us['stub']:>11.0f} "
              f"{through['runtime']:>8.0f} {through['stub']:>11.0f} {through['redis']:>6.0f}")


if __name__ == "__main__":
    main()
