"""`python -m tenantry_devenv demo --keep` stops all it started on SIGTERM, SIGHUP and SIGINT.

The demo runs as a real subprocess with a temporary state dir. Its process tree is read from
/proc (parent pids), independently of what the demo itself records, so a server it forgot is
found as well.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
UP_LINE = "running; press Ctrl-C to stop"
# Servers the demo starts; each must be among its descendants once it is up.
EXPECTED = {"etcd", "kube-apiserver", "kube-controller", "kube-scheduler", "kwok", "postgres",
            "redis-server"}
STOP_WITHIN = 30.0  # seconds from the signal until the last descendant is gone (~7 s)

ProcessKey = tuple[int, str]  # (pid, start time): a pid reused later is another process


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) from /proc/<pid>/stat; None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # the command name may contain spaces
    return int(fields[1]), fields[0], fields[19]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def descendants(root: int) -> dict[ProcessKey, str]:
    """Every living process below `root`, with its command name."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
    found: dict[ProcessKey, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        stat = _stat(pid)
        if stat is None or stat[1] == "Z":
            continue
        found[(pid, stat[2])] = _comm(pid)
        todo.extend(children.get(pid, []))
    return found


def still_running(procs: dict[ProcessKey, str]) -> dict[ProcessKey, str]:
    alive = {}
    for (pid, started), name in procs.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == started and stat[1] != "Z":
            alive[(pid, started)] = name
    return alive


def kill_all(procs: dict[ProcessKey, str]) -> None:
    """Leave nothing behind, whatever the code under test did (each server leads a group)."""
    for pid, _ in still_running(procs):
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(pid, signal.SIGKILL)


@pytest.fixture
def demo_env(tmp_path: Path) -> dict[str, str]:
    # Without ANTHROPIC_API_KEY the demo's runtime calls the local stub, never Anthropic.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TENANTRY_", "ANTHROPIC_")) and k != "KUBECONFIG"}
    env.update({
        "TENANTRY_DEV_STATE": str(tmp_path / "state"),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / p) for p in ("operator", "runtime",
                                                                   "tools")]
                                      + [env.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1",
    })
    return env


@pytest.mark.timeout(900)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT],
                         ids=lambda s: signal.Signals(s).name)
def test_demo_stops_everything_it_started(demo_env: dict[str, str], tmp_path: Path,
                                          signum: signal.Signals) -> None:
    output = tmp_path / "demo.out"
    with output.open("wb") as out:
        demo = subprocess.Popen([sys.executable, "-m", "tenantry_devenv", "demo", "--keep"],
                                cwd=REPO_ROOT, env=demo_env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    started: dict[ProcessKey, str] = {}
    try:
        deadline = time.monotonic() + 600
        while UP_LINE not in output.read_text(errors="replace"):
            started.update(descendants(demo.pid))
            assert demo.poll() is None, f"demo exited:\n{output.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"demo not up:\n{output.read_text()[-4000:]}"
            time.sleep(1)
        started.update(descendants(demo.pid))
        names = set(started.values())
        assert names >= EXPECTED, f"expected servers missing: {EXPECTED - names}"
        # The operator, the upstream stub and the runtime.
        assert sum(n.startswith("python") for n in started.values()) >= 3, started
        # The state dir came from TENANTRY_DEV_STATE, not the repository's .tenantry-dev.
        assert (Path(demo_env["TENANTRY_DEV_STATE"]) / "demo" / "cluster" / "kubeconfig").exists()

        signalled = time.monotonic()
        demo.send_signal(signum)
        code = demo.wait(timeout=STOP_WITHIN)
        while still_running(started) and time.monotonic() - signalled < STOP_WITHIN:
            time.sleep(0.2)
        left = still_running(started)
        assert not left, (f"still running {time.monotonic() - signalled:.0f}s after "
                          f"{signum.name}: {sorted(left.values())}")
        # The demo handled the signal (it was not simply killed by it) and cleaned up.
        assert code == 128 + signum, f"exit code {code}:\n{output.read_text()[-3000:]}"
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        kill_all(started)


_SPAWN_AND_WAIT = """
import sys, time
from pathlib import Path
from tenantry_devenv.processes import spawn
from tenantry_devenv.services import start_redis

redis = start_redis(Path(sys.argv[1]) / "redis")
detached = spawn("sleeper", ["sleep", "600"], Path(sys.argv[1]) / "sleep.log",
                 die_with_parent=False)
print(redis.process.pid, detached.pid, flush=True)
time.sleep(600)
"""


def test_servers_die_with_a_parent_killed_without_cleanup(demo_env: dict[str, str],
                                                          tmp_path: Path) -> None:
    """The last resort (SIGKILL leaves no `finally`): servers get SIGKILL with their parent,
    unless spawned detached (`make cluster-up` leaves its control plane running on purpose)."""
    parent = subprocess.Popen([sys.executable, "-c", _SPAWN_AND_WAIT, str(tmp_path)],
                              env=demo_env, stdout=subprocess.PIPE, text=True)
    redis_pid, sleeper_pid = 0, 0
    try:
        assert parent.stdout is not None
        redis_pid, sleeper_pid = map(int, parent.stdout.readline().split())
        servers = {key: name for key, name in descendants(parent.pid).items()
                   if key[0] in (redis_pid, sleeper_pid)}
        assert sorted(servers.values()) == ["redis-server", "sleep"]
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(still_running(servers)) > 1:
            time.sleep(0.1)
        assert sorted(still_running(servers).values()) == ["sleep"]
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in (redis_pid, sleeper_pid):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
