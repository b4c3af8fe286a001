"""`python -m tenantry_devenv demo` end to end: Tenant YAML -> operator -> keys -> runtime ->
model (the local stub) -> usage and cost, as `make demo` shows it.

The demo runs as a real subprocess with a temporary state dir: without ANTHROPIC_API_KEY (the
demo's local Messages-API stub answers), and with one (ANTHROPIC_BASE_URL pointing at the
test's stub in place of Anthropic). Its process tree is sampled while it runs (as in
test_devenv_signals.py) to check which servers it started and that none is left when it ends.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
from runtime_helpers import UPSTREAM_KEY
from tenantry_runtime.upstream_stub import StubState

# demo_env: a temporary TENANTRY_DEV_STATE, no TENANTRY_*, KUBECONFIG or ANTHROPIC_* from the
# caller (so the local stub answers).
from test_devenv_signals import (  # noqa: F401 - demo_env is a fixture
    ProcessKey,
    demo_env,
    descendants,
    kill_all,
    still_running,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
TENANT_MODELS = {"acme": "claude-haiku-4-5", "globex": "claude-sonnet-4-6"}


def run_demo(env: dict[str, str], output: Path, timeout: float
             ) -> tuple[int, str, dict[ProcessKey, str]]:
    """(exit code, output, every process the demo started)."""
    with output.open("wb") as out:
        demo = subprocess.Popen([sys.executable, "-m", "tenantry_devenv", "demo"],
                                cwd=REPO_ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    started: dict[ProcessKey, str] = {}
    try:
        deadline = time.monotonic() + timeout
        while demo.poll() is None:
            started.update(descendants(demo.pid))
            assert time.monotonic() < deadline, f"demo still running:\n{output.read_text()}"
            time.sleep(0.5)
        return demo.returncode, output.read_text(errors="replace"), started
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        kill_all(started)


@pytest.mark.timeout(900)
def test_demo_shows_the_whole_path_from_tenant_yaml_to_metered_cost(
        demo_env: dict[str, str],  # noqa: F811 - the fixture imported above
        tmp_path: Path) -> None:
    code, out, started = run_demo(demo_env, tmp_path / "demo.out", timeout=840)
    assert code == 0, out[-6000:]
    # It says plainly that no model answers, and started the stub and the runtime.
    assert "NO model is called" in out
    assert "the answers came from the local Messages-API stub" in out
    names = set(started.values())
    assert {"redis-server", "postgres", "kube-apiserver"} <= names, names

    for tenant, model in TENANT_MODELS.items():
        # The key came from the tenant's Secret; the runtime serves the plan's model.
        assert f"read with kubectl from Secret tenant-{tenant}/tenantry-api-keys" in out
        assert f"{tenant}'s model (GET /v1/models): {model}" in out
        # The stub echoes: these are answers that went through the runtime, both ways.
        assert f"{tenant}: messages.create -> 'echo: Hello from {tenant}." in out, out
        assert re.search(rf"{tenant}: messages\.stream -> \d+ text deltas: 'echo: Now the same,"
                         r" streamed\.'", out), out
        # The ingested document's id reached the model's context.
        found = re.search(rf"{tenant}: POST /v1/documents -> id ({UUID})", out)
        assert found, out
        document_id = found.group(1)
        assert (f"{tenant}: the context that reached the model (the stub's recorded request)"
                f" cites document {document_id}") in out
        assert f'system prompt: <document id="{document_id}">' in out
        # Usage with a cost: three answered requests (the 429 is not billed).
        row = re.search(rf"^  {tenant}\s+\d{{4}}-\d\d-\d\d\s+{model}\s+3 requests\s+(\d+) in"
                        rf"\s+(\d+) out\s+cost (\d+\.\d+) USD$", out, re.MULTILINE)
        assert row, out
        assert int(row.group(1)) > 0 and int(row.group(2)) > 0 and Decimal(row.group(3)) > 0
        assert re.search(rf"^  {tenant}\s+total cost {re.escape(row.group(3))} USD$", out,
                         re.MULTILINE), out

    # A spent budget: the SDK got Anthropic's 429, marked not worth retrying.
    assert re.search(r"acme: messages\.create -> 429 rate_limit_error: Daily token budget"
                     r" exhausted\. \(retry-after \d+s, x-should-retry false\)", out), out
    # Keys are shown by their prefix only, never whole.
    assert re.findall(r"sk-tnt-[a-z0-9]{12}-[^…\s]", out) == []
    # A normal end stops everything too.
    left = still_running(started)
    assert not left, f"still running after the demo ended: {sorted(left.values())}"


@pytest.mark.timeout(900)
def test_demo_with_anthropic_api_key_calls_that_endpoint_with_that_key(
        demo_env: dict[str, str],  # noqa: F811 - the fixture imported above
        tmp_path: Path, upstream_stub: tuple[str, StubState]) -> None:
    """ANTHROPIC_API_KEY set: no stub is started, the runtime calls the endpoint with that key
    (here the test's own stub stands in for https://api.anthropic.com via ANTHROPIC_BASE_URL),
    and the output names it."""
    url, stub = upstream_stub
    env = {**demo_env, "ANTHROPIC_API_KEY": UPSTREAM_KEY, "ANTHROPIC_BASE_URL": url}
    code, out, started = run_demo(env, tmp_path / "demo.out", timeout=840)
    assert code == 0, out[-6000:]
    assert "NO model is called" not in out
    assert (f"==> upstream: the Messages API at {url} (ANTHROPIC_BASE_URL) answers, with your"
            " ANTHROPIC_API_KEY") in out
    assert f"the answers came from the Messages API at {url}" in out
    # Only the operator and the runtime run Python: no stub of the demo's own.
    assert sum(n.startswith("python") for n in started.values()) == 2, started
    found = re.search(rf"acme: POST /v1/documents -> id ({UUID})", out)
    assert found, out
    # The request with acme's document in its context reached this endpoint, with the key
    # (the stub refuses any other), and the tenant's key never did.
    with_document = [r for r in stub.received
                     if f'<document id="{found.group(1)}">' in str(r.body.get("system"))]
    assert len(with_document) == 1, [r.body for r in stub.received][-3:]
    assert with_document[0].headers["x-api-key"] == UPSTREAM_KEY
    assert re.search(r"acme: messages\.create -> 429 rate_limit_error", out), out
    assert re.search(r"^  globex\s+total cost 0\.\d+ USD$", out, re.MULTILINE), out
