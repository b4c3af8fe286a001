"""Runtime overhead: the same closed-loop load at the local model endpoint directly, through
the runtime (auth, limits and budget in Redis, usage events on) with 1 and 2 worker processes,
and through a peer gateway (LiteLLM's proxy, installed into bench/.venv-peers), in one run.

Prints requests/s, the ratio to direct and latency p50/p99 for non-streaming and streaming at
each concurrency, CPU per request of each gateway, and RSS per process. Asserts nothing.

    .venv/bin/python bench/runtime_overhead.py [--seconds 5] [--concurrency 1,64]
        [--workers 1,2] [--no-peer] [--keep-logs] [--baseline CHECKOUT] [--repeat N]

With --baseline, the runtime of another checkout (its `runtime/` first on PYTHONPATH, e.g. a
worktree of main) runs as `base xN` next to this one, so a change is measured side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
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
    cpu_us: dict[str, float]  # "gateway" | "stub" -> CPU microseconds per request

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


@dataclass(frozen=True)
class Target:
    """Where the load goes: one or more processes of one server, and how to authenticate."""

    name: str
    urls: list[str]
    headers: dict[str, str]
    processes: list[psutil.Process]


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


def http_request(url: str, headers: dict[str, str], stream: bool) -> bytes:
    body = json.dumps({"model": STUB_MODELS[0], "max_tokens": 64, "stream": stream,
                       "messages": [{"role": "user", "content": "how fast is the runtime"}]})
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (f"POST /v1/messages HTTP/1.1\r\nhost: {urlsplit(url).netloc}\r\n{lines}"
            f"anthropic-version: 2023-06-01\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n{body}").encode()


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


async def closed_loop(target: Target, stream: bool, concurrency: int, seconds: float,
                      stub: list[psutil.Process]) -> Result:
    """`concurrency` keep-alive connections, spread round-robin over the target's processes,
    each sending its next request as soon as the last answer is in."""
    requests = [http_request(url, target.headers, stream) for url in target.urls]

    async def load(until: float, latencies: list[float]) -> list[int]:
        return await asyncio.gather(*(
            _worker(target.urls[n % len(target.urls)], requests[n % len(requests)], until,
                    latencies) for n in range(concurrency)))

    await load(time.perf_counter() + 0.5, [])
    latencies: list[float] = []
    watched = {"gateway": target.processes, "stub": stub}
    cpu_before = {name: _cpu_seconds(p) for name, p in watched.items()}
    started = time.perf_counter()
    done = sum(await load(started + seconds, latencies))
    elapsed = time.perf_counter() - started
    cpu = {name: (_cpu_seconds(p) - cpu_before[name]) / max(done, 1) * 1e6
           for name, p in watched.items()}
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
    write_unbounded_limits(redis_url, TENANT)
    return key


def write_unbounded_limits(redis_url: str, tenant: str) -> None:
    """Limits no benchmark reaches, so that every request is admitted and settled."""
    client = redis.Redis.from_url(redis_url)
    client.hset(TenantKeys(tenant).limits, mapping={
        "revision": 1, "daily_tokens": 10**12, "monthly_tokens": 10**13, "overage_allowed": 0,
        "requests_per_minute": 10**9, "tokens_per_minute": 10**12,
        "max_tokens_per_request": 4096, "suspended": 0})
    client.close()


@contextmanager
def server(name: str, argv: list[str], port: int, workdir: Path,
           env: dict[str, str] | None = None, *, ready_path: str = "/healthz",
           timeout: float = 30) -> Iterator[Process]:
    process = spawn(name, argv, workdir / f"{name}.log", env=env)
    try:
        wait_until(f"{name} to listen", lambda: httpx.get(
            f"http://127.0.0.1:{port}{ready_path}", timeout=1).status_code < 500, process,
            timeout)
        yield process
    finally:
        process.stop()


def process_tree(pid: int) -> list[psutil.Process]:
    """A server's process and its children (LiteLLM's CLI may fork its workers)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


# LiteLLM's proxy, installed by this script into its own venv (never the project's).
PEER_VENV = Path(__file__).resolve().parent / ".venv-peers"
PEER_PACKAGE = "litellm[proxy]"
PEER_KEY = "sk-bench-litellm-master"


def install_peer() -> Path | str:
    """The `litellm` executable, installed on first use; or why it is not available."""
    executable = PEER_VENV / "bin" / "litellm"
    if executable.exists():
        return executable
    print(f"installing {PEER_PACKAGE} into {PEER_VENV} (first run only) ...", file=sys.stderr)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True,
                       capture_output=True, timeout=300)
        subprocess.run([str(PEER_VENV / "bin" / "pip"), "install", "-q", PEER_PACKAGE],
                       check=True, capture_output=True, timeout=1200)
    except (OSError, subprocess.SubprocessError) as error:
        output = getattr(error, "stderr", b"") or b""
        return f"installing {PEER_PACKAGE} failed: {error} {output.decode()[-500:]}"
    return executable if executable.exists() else f"{PEER_PACKAGE} installed no `litellm`"


def peer_config(workdir: Path, stub_url: str) -> Path:
    """The stub as an Anthropic upstream, behind the proxy's master key (auth on; LiteLLM
    keeps budgets and spend logs in a database, which this run does not give it)."""
    config = workdir / "litellm.yaml"
    config.write_text(json.dumps({
        "model_list": [{"model_name": STUB_MODELS[0], "litellm_params": {
            "model": f"anthropic/{STUB_MODELS[0]}", "api_base": stub_url,
            "api_key": UPSTREAM_KEY}}],
        "general_settings": {"master_key": PEER_KEY},
        "litellm_settings": {"drop_params": True, "telemetry": False},
    }))  # JSON is YAML
    return config


@contextmanager
def runtimes(count: int, tenants: Path, redis_url: str, stub_url: str, workdir: Path,
             checkout: Path | None = None) -> Iterator[list[tuple[str, Process]]]:
    """`count` runtime processes, one uvicorn worker each, as the chart runs them; with
    `checkout`, that checkout's runtime code instead of this one's."""
    code = {} if checkout is None else {"PYTHONPATH": os.pathsep.join(
        str(checkout / part) for part in ("runtime", "operator", "tools"))}
    label = "runtime" if checkout is None else "base"
    with ExitStack() as stack:
        started = []
        for n in range(count):
            port = free_port()
            process = stack.enter_context(server(
                f"{label}{count}-{n}",
                [sys.executable, "-m", "tenantry_runtime", "--host", "127.0.0.1", "--port",
                 str(port)], port, workdir, env={
                    "TENANTRY_RUNTIME_TENANTS_DIR": str(tenants),
                    "TENANTRY_RUNTIME_REDIS_URL": redis_url,
                    "TENANTRY_RUNTIME_UPSTREAM_URL": stub_url,
                    "TENANTRY_RUNTIME_UPSTREAM_API_KEY": UPSTREAM_KEY,
                    # One tenant drives all the load: lift its share of the replica.
                    "TENANTRY_RUNTIME_MAX_CONCURRENT_PER_TENANT": "100000", **code}))
            started.append((f"http://127.0.0.1:{port}", process))
        yield started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--workers", default="1,2",
                        help="Runtime processes (one uvicorn worker each) to compare.")
    parser.add_argument("--no-peer", action="store_true", help="Skip LiteLLM's proxy.")
    parser.add_argument("--keep-logs", action="store_true", help="Print the servers' log tails.")
    parser.add_argument("--repeat", type=int, default=1,
                        help="Runs per row, targets taking turns; the median run is shown.")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="Also run this checkout's runtime (as `base xN`), side by side.")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    worker_counts = [int(w) for w in args.workers.split(",")]
    print(f"machine: {psutil.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f} at start",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="tenantry-bench-") as tmp, ExitStack() as stack:
        print(f"logs in {tmp}", file=sys.stderr)
        workdir = Path(tmp)
        redis_server = start_redis(workdir / "redis")
        stack.callback(redis_server.stop)
        if args.keep_logs:
            stack.callback(lambda: [print(f"--- {log.name}\n{log.read_text()[-3000:]}",
                                          file=sys.stderr) for log in workdir.glob("*.log")])
        tenants = workdir / "tenants"
        tenants.mkdir()
        key = write_tenant(tenants, redis_server.url)
        stub_port = free_port()
        stub_url = f"http://127.0.0.1:{stub_port}"
        stub = stack.enter_context(server(
            "stub", [sys.executable, "-m", "tenantry_runtime.upstream_stub", "--port",
                     str(stub_port), "--api-key", UPSTREAM_KEY], stub_port, workdir))
        targets = [Target("direct", [stub_url], {"x-api-key": UPSTREAM_KEY}, [])]
        checkouts: list[tuple[Path | None, str]] = [(None, "runtime")]
        if args.baseline is not None:
            checkouts.insert(0, (args.baseline.resolve(), "base"))
        for count in worker_counts:
            for checkout, label in checkouts:
                started = stack.enter_context(runtimes(count, tenants, redis_server.url,
                                                       stub_url, workdir, checkout))
                targets.append(Target(f"{label} x{count}", [url for url, _ in started],
                                      {"x-api-key": key},
                                      [psutil.Process(p.pid) for _, p in started]))
        peer_note = "LiteLLM: skipped (--no-peer)"
        if not args.no_peer:
            peer = install_peer()
            if isinstance(peer, str):
                peer_note = f"LiteLLM: not run: {peer}"
            else:
                peer_port = free_port()
                try:
                    process = stack.enter_context(server(
                        "litellm", [str(peer), "--config", str(peer_config(workdir, stub_url)),
                                    "--host", "127.0.0.1", "--port", str(peer_port),
                                    "--num_workers", "1"], peer_port, workdir,
                        env={"LITELLM_LOG": "ERROR", "DISABLE_ADMIN_UI": "True"},
                        ready_path="/health/liveliness", timeout=180))
                except Exception as error:  # the run goes on without the peer
                    peer_note = f"LiteLLM: not run: it did not start: {str(error)[:600]}"
                else:
                    version = subprocess.run(
                        [str(PEER_VENV / "bin" / "pip"), "show", "litellm"], text=True,
                        capture_output=True, check=False).stdout.split("Version: ")[-1]
                    peer_note = f"LiteLLM {version.split()[0]} (litellm[proxy]), one worker"
                    targets.append(Target("litellm", [f"http://127.0.0.1:{peer_port}"], {
                        "x-api-key": PEER_KEY, "authorization": f"Bearer {PEER_KEY}"},
                        process_tree(process.pid)))
        results = asyncio.run(run_all(targets, levels, args.seconds,
                                      [psutil.Process(stub.pid)], args.repeat))
        report(targets, results, peer_note)


async def run_all(targets: list[Target], levels: list[int], seconds: float,
                  stub: list[psutil.Process], repeat: int = 1
                  ) -> dict[tuple[str, int, str], Result]:
    """Each row `repeat` times, the targets taking turns (so a burst of load elsewhere on
    the machine hits them alike); the run with the median rate stands for the row."""
    runs: dict[tuple[str, int, str], list[Result]] = {}
    for stream in (False, True):
        mode = "stream" if stream else "non-stream"
        for concurrency in levels:
            for _ in range(repeat):
                for target in targets:
                    try:
                        result = await closed_loop(target, stream, concurrency, seconds, stub)
                    except (OSError, RuntimeError, asyncio.IncompleteReadError) as error:
                        print(f"  {mode:10} c={concurrency:<3} {target.name:11} failed: "
                              f"{str(error)[:300]}", file=sys.stderr)
                        continue
                    runs.setdefault((mode, concurrency, target.name), []).append(result)
                    print(f"  {mode:10} c={concurrency:<3} {target.name:11} "
                          f"{result.rate:8.0f} req/s", file=sys.stderr)
    return {row: sorted(results, key=lambda r: r.rate)[len(results) // 2]
            for row, results in runs.items()}


def report(targets: list[Target], results: dict[tuple[str, int, str], Result],
           peer_note: str) -> None:
    print(f"load average {os.getloadavg()[0]:.1f} at the end; {peer_note}")
    print(f"{'mode':10} {'conc':>4} {'target':11} {'req/s':>7} {'ratio':>6} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'added p50':>9} {'added p99':>9} "
          f"{'gw cpu us':>9} {'stub cpu us':>11}")
    for (mode, concurrency, name), result in results.items():
        direct = results.get((mode, concurrency, "direct"))
        if direct is None:
            continue
        added = ("", "") if name == "direct" else (
            f"{result.percentile(0.5) - direct.percentile(0.5):.2f}",
            f"{result.percentile(0.99) - direct.percentile(0.99):.2f}")
        gateway = "" if name == "direct" else f"{result.cpu_us['gateway']:.0f}"
        print(f"{mode:10} {concurrency:>4} {name:11} {result.rate:>7.0f} "
              f"{result.rate / direct.rate:>6.2f} {result.percentile(0.5):>7.2f} "
              f"{result.percentile(0.99):>7.2f} {added[0]:>9} {added[1]:>9} {gateway:>9} "
              f"{result.cpu_us['stub']:>11.0f}")
    print("\nRSS after the run, per process (MB):")
    for target in targets:
        if target.processes:
            sizes = [p.memory_info().rss / 2**20 for p in target.processes if p.is_running()]
            print(f"  {target.name:11} " + ", ".join(f"{size:.0f}" for size in sizes))


if __name__ == "__main__":
    main()
