"""Leader election (tenantry_operator.leader): the pure decisions, then real operator processes.

The process tests run `python -m tenantry_operator` twice against a control plane of this
module's own, so the in-process operator of the other tests never watches the same Tenants.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_helpers import apply_tenant, condition, get_json, tenant_status, wait_for
from lightkube import AsyncClient, KubeConfig
from pydantic import ValidationError
from tenantry_devenv.controlplane import ControlPlane, start_control_plane
from tenantry_devenv.processes import free_port
from tenantry_operator.leader import (
    EXIT_LEADERSHIP_LOST,
    FAILED_RENEWAL_RETRY_SECONDS,
    Action,
    LeaderElector,
    LeaseRecord,
    RenewalThread,
    Sighting,
    decide,
    held_spec,
    micro_time,
    observe,
    released_spec,
    renew_deadline_passed,
)
from tenantry_operator.settings import OperatorSettings

REPO_ROOT = Path(__file__).resolve().parents[1]


def record(holder: str, version: str = "7", duration: int = 10,
           transitions: int = 2) -> LeaseRecord:
    return LeaseRecord(holder=holder, duration_seconds=duration, transitions=transitions,
                       acquire_time="2026-01-01T00:00:00.000000Z", resource_version=version)


# --------------------------------------------------------------------------------- pure parts


def test_lease_record_from_body() -> None:
    body = {"metadata": {"name": "l", "resourceVersion": "42"},
            "spec": {"holderIdentity": "pod-a", "leaseDurationSeconds": 15,
                     "leaseTransitions": 3, "acquireTime": "2026-01-01T00:00:00.000000Z"}}
    assert LeaseRecord.from_body(body) == LeaseRecord(
        "pod-a", 15, 3, "2026-01-01T00:00:00.000000Z", "42")
    # A released Lease (no holder, fields dropped) reads as held by nobody.
    released = LeaseRecord.from_body({"metadata": {"resourceVersion": "43"}, "spec": {}})
    assert (released.holder, released.transitions, released.resource_version) == ("", 0, "43")


def test_missing_lease_is_created_and_own_lease_renewed() -> None:
    assert decide(None, "me", None, now=0.0) is Action.CREATE
    assert decide(record("me"), "me", None, now=0.0) is Action.RENEW
    # Even when it looks stale: it is ours (e.g. this Pod's container restarted).
    assert decide(record("me"), "me", Sighting("7", 0.0), now=1e6) is Action.RENEW


def test_released_lease_is_taken_at_once() -> None:
    assert decide(record(""), "me", None, now=0.0) is Action.TAKE


def test_held_lease_is_taken_only_after_its_duration_unchanged_on_our_clock() -> None:
    lease = record("other", version="7", duration=10)
    seen = observe(None, lease, now=100.0)
    assert seen == Sighting("7", 100.0)
    assert decide(lease, "me", seen, now=109.9) is Action.WAIT
    assert observe(seen, lease, now=109.9) is seen  # unchanged: the first sighting counts
    assert decide(lease, "me", seen, now=110.0) is Action.TAKE
    # A renewal (new resourceVersion) restarts the clock.
    renewed = record("other", version="8", duration=10)
    seen = observe(seen, renewed, now=112.0)
    assert seen == Sighting("8", 112.0)
    assert decide(renewed, "me", seen, now=121.0) is Action.WAIT
    # Never expired on a sighting of another version, nor without any sighting.
    assert decide(renewed, "me", Sighting("7", 0.0), now=1e6) is Action.WAIT
    assert decide(renewed, "me", None, now=1e6) is Action.WAIT


def test_micro_time_always_has_six_fraction_digits() -> None:
    # lightkube's typed Lease drops them when they are zero; the API server then says 400.
    assert micro_time(datetime(2026, 1, 1, tzinfo=UTC)) == "2026-01-01T00:00:00.000000Z"
    plus_two = timezone(timedelta(hours=2))
    assert micro_time(datetime(2026, 1, 1, 2, 0, 0, 5, tzinfo=plus_two)) == (
        "2026-01-01T00:00:00.000005Z")


def test_held_spec_counts_transitions_and_keeps_acquire_time_on_renewal() -> None:
    now = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    stamp = "2026-03-01T12:00:00.123456Z"
    assert held_spec(None, "me", 15, now) == {
        "holderIdentity": "me", "leaseDurationSeconds": 15, "renewTime": stamp,
        "acquireTime": stamp, "leaseTransitions": 0}
    renewed = held_spec(record("me", transitions=4), "me", 15, now)
    assert renewed["acquireTime"] == "2026-01-01T00:00:00.000000Z"
    assert (renewed["renewTime"], renewed["leaseTransitions"]) == (stamp, 4)
    taken = held_spec(record("other", transitions=4), "me", 15, now)
    assert (taken["holderIdentity"], taken["acquireTime"], taken["leaseTransitions"]) == (
        "me", stamp, 5)
    released = released_spec(record("me", transitions=4), now)
    assert released["holderIdentity"] is None and released["leaseTransitions"] == 4


def test_renew_deadline() -> None:
    assert not renew_deadline_passed(renewed_at=50.0, now=59.9, deadline_seconds=10.0)
    assert renew_deadline_passed(renewed_at=50.0, now=60.0, deadline_seconds=10.0)


@pytest.mark.parametrize(("retry", "deadline", "duration"), [
    (2.0, 15.0, 15), (2.0, 20.0, 15), (10.0, 10.0, 15), (0.5, 0.4, 15)])
def test_settings_refuse_timings_that_could_make_two_leaders(retry: float, deadline: float,
                                                             duration: int) -> None:
    with pytest.raises(ValidationError, match="retry period < renew deadline < duration"):
        OperatorSettings(lease_retry_period_seconds=retry,
                         lease_renew_deadline_seconds=deadline,
                         lease_duration_seconds=duration)


def test_identity_is_the_pod_name_or_host_and_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TENANTRY_LEASE_IDENTITY", raising=False)
    monkeypatch.setenv("POD_NAME", "tenantry-7d9f-abcde")
    assert OperatorSettings().lease_identity == "tenantry-7d9f-abcde"
    monkeypatch.delenv("POD_NAME")
    assert OperatorSettings().lease_identity.endswith(f"-{os.getpid()}")


# --------------------------------------------------------------------------------- processes

LEASE = "tenantry-leader-test"
LEASE_NAMESPACE = "default"
# Short, but with room for a slow machine: a leader stalled for the deadline exits.
DURATION, DEADLINE, RETRY = 8, 5.0, 1.0
# A standby notices within one retry period that the Lease changed, and polls once a period.
TAKEOVER_BOUND = DURATION + 2 * RETRY + 3.0


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A control plane of this module's own, with the CRDs and the example plans."""
    saved = os.environ.get("KUBECONFIG")
    plane = start_control_plane(tmp_path_factory.mktemp("leader") / "cluster")
    if saved is None:  # start_control_plane sets it only when unset; do not leak ours
        os.environ.pop("KUBECONFIG", None)
    try:
        plane.install_crds()
        plane.kubectl("apply", "-f", str(REPO_ROOT / "examples" / "plans.yaml"))
        yield plane
    finally:
        plane.stop()


@dataclass
class OperatorProcess:
    identity: str
    popen: subprocess.Popen[bytes]
    log: Path
    health_port: int

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def role(self) -> str | None:
        """What GET /healthz says (leader or standby); None while it does not answer."""
        url = f"http://127.0.0.1:{self.health_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                role: str = json.loads(resp.read())["role"]
                return role
        except OSError:
            return None


@pytest.fixture
def operators(plane: ControlPlane, tmp_path: Path) -> Iterator[list[OperatorProcess]]:
    """Start operators with `start(identity)`; whatever still runs is killed at the end."""
    started: list[OperatorProcess] = []
    yield started
    for proc in started:
        if proc.alive():
            proc.popen.kill()
        proc.popen.wait(timeout=30)


def start_operator(plane: ControlPlane, started: list[OperatorProcess], identity: str,
                   logdir: Path, **settings: str) -> OperatorProcess:
    # Nothing of this pytest process's operator settings (the in-process operator's database,
    # Redis, kubeconfig) may leak in: these operators have no data plane and their own cluster.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TENANTRY_") and k not in {"KUBECONFIG", "POD_NAME"}}
    env.update({
        "KUBECONFIG": str(plane.kubeconfig),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "operator"), str(REPO_ROOT / "runtime"),
                                       env.get("PYTHONPATH", "")]),
        "TENANTRY_LEASE_NAME": LEASE,
        "TENANTRY_LEASE_NAMESPACE": LEASE_NAMESPACE,
        "TENANTRY_LEASE_IDENTITY": identity,
        "TENANTRY_LEASE_DURATION_SECONDS": str(DURATION),
        "TENANTRY_LEASE_RENEW_DEADLINE_SECONDS": str(DEADLINE),
        "TENANTRY_LEASE_RETRY_PERIOD_SECONDS": str(RETRY),
        "TENANTRY_HEALTH_PORT": str(health_port := free_port()),
        **settings,
    })
    log = logdir / f"{identity}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen([sys.executable, "-m", "tenantry_operator"], env=env,
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proc = OperatorProcess(identity, popen, log, health_port)
    started.append(proc)
    return proc


def lease_spec(plane: ControlPlane, name: str = LEASE) -> dict[str, Any]:
    lease = get_json(plane, "lease", name, "-n", LEASE_NAMESPACE) or {}
    spec: dict[str, Any] = lease.get("spec") or {}
    return spec


def holder(plane: ControlPlane, name: str = LEASE) -> str:
    return str(lease_spec(plane, name).get("holderIdentity") or "")


def wait_reconciled(plane: ControlPlane, tenant: str, procs: list[OperatorProcess]) -> None:
    """The operator wrote the Tenant's status: the namespace step ran (there is no database
    here, so the next step reports NoDatabaseConfigured)."""
    def done() -> bool:
        status = tenant_status(plane, tenant)
        return (condition(status, "NamespaceReady").get("status") == "True"
                and condition(status, "DatabaseReady").get("reason") == "NoDatabaseConfigured")

    try:
        wait_for(f"tenant {tenant} reconciled", done, timeout=90)
    except AssertionError as err:
        logs = "\n".join(f"--- {p.identity}\n{p.text()[-3000:]}" for p in procs)
        raise AssertionError(f"{err}\n{json.dumps(tenant_status(plane, tenant))}\n{logs}") from None


def test_one_leader_reconciles_and_a_standby_takes_over_when_it_dies(
        plane: ControlPlane, operators: list[OperatorProcess], tmp_path: Path) -> None:
    first = [start_operator(plane, operators, name, tmp_path) for name in ("op-a", "op-b")]
    leader_id = wait_for("a leader", lambda: holder(plane), timeout=60)
    leader = next(p for p in first if p.identity == leader_id)
    standby = next(p for p in first if p.identity != leader_id)
    assert lease_spec(plane)["leaseDurationSeconds"] == DURATION

    apply_tenant(plane, "leadfirst", plan="free", isolation="pool")
    wait_reconciled(plane, "leadfirst", first)
    wait_for("the standby to log that it stands by", lambda: "standing by" in standby.text())
    # Exactly one reconciles: the leader handled the Tenant, the standby never started kopf.
    assert "[leadfirst]" in leader.text()
    assert "leadfirst" not in standby.text()
    assert "Activity 'configure'" in leader.text()
    assert "Activity 'configure'" not in standby.text()
    assert leader.alive() and standby.alive()
    assert holder(plane) == leader.identity
    # Both answer the probes (a standby must be Ready, or a rollout would never finish).
    assert (leader.role(), standby.role()) == ("leader", "standby")
    transitions = int(lease_spec(plane).get("leaseTransitions") or 0)

    leader.popen.send_signal(signal.SIGKILL)
    leader.popen.wait(timeout=30)
    killed = time.monotonic()
    wait_for("the standby to take the Lease", lambda: holder(plane) == standby.identity,
             timeout=TAKEOVER_BOUND + 30)
    took = time.monotonic() - killed
    assert took <= TAKEOVER_BOUND, f"takeover after {took:.1f}s"
    assert int(lease_spec(plane)["leaseTransitions"]) == transitions + 1

    apply_tenant(plane, "leadsecond", plan="free", isolation="pool")
    wait_reconciled(plane, "leadsecond", [standby])
    assert "[leadsecond]" in standby.text()
    assert standby.role() == "leader"

    # A clean stop hands the Lease back at once, and exits 0.
    standby.popen.send_signal(signal.SIGTERM)
    assert standby.popen.wait(timeout=60) == 0, standby.text()[-3000:]
    assert holder(plane) == ""
    assert "released lease" in standby.text()


def test_a_leader_that_could_not_renew_exits_instead_of_reconciling_beside_another(
        plane: ControlPlane, operators: list[OperatorProcess], tmp_path: Path) -> None:
    """A leader frozen past the deadline (a long pause, a partition) finds a new leader when it
    wakes, and exits non-zero so Kubernetes restarts it as a standby."""
    wait_for("no holder from the last test", lambda: holder(plane) == "", timeout=30)
    paused = start_operator(plane, operators, "op-paused", tmp_path)
    wait_for("op-paused to lead", lambda: holder(plane) == "op-paused", timeout=60)
    wait_for("kopf to run", lambda: "Activity 'configure'" in paused.text(), timeout=60)
    other = start_operator(plane, operators, "op-other", tmp_path)
    wait_for("op-other to stand by", lambda: "standing by" in other.text(), timeout=60)

    paused.popen.send_signal(signal.SIGSTOP)
    try:
        wait_for("op-other to take the Lease", lambda: holder(plane) == "op-other",
                 timeout=TAKEOVER_BOUND + 30)
    finally:
        paused.popen.send_signal(signal.SIGCONT)
    code = paused.popen.wait(timeout=DEADLINE + 10)
    assert code == EXIT_LEADERSHIP_LOST, paused.text()[-3000:]
    assert "leadership lost" in paused.text()
    assert holder(plane) == "op-other" and other.alive()


def test_a_leader_whose_lease_was_taken_exits_at_its_next_renewal(
        plane: ControlPlane, operators: list[OperatorProcess], tmp_path: Path) -> None:
    lease = "tenantry-taken-test"
    leader = start_operator(plane, operators, "op-taken", tmp_path, TENANTRY_LEASE_NAME=lease)
    wait_for("kopf to run", lambda: "Activity 'configure'" in leader.text(), timeout=60)
    plane.kubectl("patch", "lease", lease, "-n", LEASE_NAMESPACE, "--type=merge",
                  "-p", json.dumps({"spec": {"holderIdentity": "intruder"}}))
    code = leader.popen.wait(timeout=2 * RETRY + 10)
    assert code == EXIT_LEADERSHIP_LOST, leader.text()[-3000:]
    assert "leadership lost (the lease is held by intruder)" in leader.text()


def test_the_charts_service_account_may_elect_and_reconcile(
        plane: ControlPlane, operators: list[OperatorProcess], tmp_path: Path) -> None:
    """The operator as the chart deploys it: its rendered RBAC, ServiceAccount token, env."""
    namespace = "tenantry-system"
    plane.kubectl("create", "namespace", namespace)
    rendered = subprocess.run(
        [str(plane.bin_dir / "helm"), "template", "tenantry",
         str(REPO_ROOT / "charts" / "tenantry"), "--namespace", namespace,
         "--set", "replicaCount=2"],
        capture_output=True, text=True, check=True, timeout=120)
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    rbac = [d for d in docs if d["kind"] in {"ServiceAccount", "ClusterRole",
                                             "ClusterRoleBinding", "Role", "RoleBinding"}]
    # The runtime's namespace (its own ServiceAccount and Role live there) exists first.
    for other in {d["metadata"].get("namespace") for d in rbac} - {None, namespace}:
        plane.kubectl("create", "namespace", other)
    plane.kubectl("apply", "--server-side", "-f", "-", input_text=yaml.safe_dump_all(rbac))
    deployment = next(d for d in docs if d["kind"] == "Deployment"
                      and d["spec"]["template"]["spec"]["containers"][0]["command"]
                      == ["python", "-m", "tenantry_operator"])
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    token = plane.kubectl("create", "token", account, "-n", namespace).stdout.strip()
    kubeconfig = tmp_path / "service-account.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": {
            "server": plane.server,
            "certificate-authority": str(plane.workdir / "pki" / "ca.crt")}}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}]}))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    chart_env = {e["name"]: e["value"] for e in container["env"]
                 if "value" in e and e["name"].startswith("TENANTRY_")
                 and e["name"] != "TENANTRY_HEALTH_PORT"}  # a free port here instead
    pod = start_operator(plane, operators, "tenantry-6b7c9-x2x4q", tmp_path, **chart_env,
                         KUBECONFIG=str(kubeconfig))

    wait_for("the Pod to lead", lambda: lease_holder_in(plane, chart_env) == pod.identity,
             timeout=60)
    apply_tenant(plane, "leadrbac", plan="free", isolation="pool")
    wait_reconciled(plane, "leadrbac", [pod])
    assert "Forbidden" not in pod.text() and " 403" not in pod.text(), pod.text()[-3000:]
    pod.popen.send_signal(signal.SIGTERM)
    assert pod.popen.wait(timeout=60) == 0, pod.text()[-3000:]
    assert lease_holder_in(plane, chart_env) == ""


def lease_holder_in(plane: ControlPlane, env: dict[str, str]) -> str:
    """The holder of the Lease named by the chart's settings."""
    lease = get_json(plane, "lease", env["TENANTRY_LEASE_NAME"], "-n",
                     env["TENANTRY_LEASE_NAMESPACE"]) or {}
    return str((lease.get("spec") or {}).get("holderIdentity") or "")


# ------------------------------------------------------------------ renewal on a busy operator

BURST = DEADLINE - 1.0  # CPU work that never yields, each burst shorter than the deadline


async def keep_busy(seconds: float, each_burst: Callable[[float], None]) -> None:
    """What a loaded operator's event loop looks like to a renewal sharing it: callbacks that
    hold it for long stretches, one after the other (only a `sleep(0)` between them)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        while time.monotonic() - started < BURST:
            pass
        each_burst(started)
        await asyncio.sleep(0)


def lease_client(plane: ControlPlane) -> AsyncClient:
    return AsyncClient(config=KubeConfig.from_file(plane.kubeconfig))


async def elected(plane: ControlPlane, identity: str, lost: list[str],
                  retry: float = RETRY) -> tuple[LeaderElector, AsyncClient]:
    client = lease_client(plane)
    elector = LeaderElector(client, OperatorSettings(
        lease_name=f"tenantry-busy-{identity}", lease_namespace=LEASE_NAMESPACE,
        lease_identity=identity, lease_duration_seconds=DURATION,
        lease_renew_deadline_seconds=DEADLINE, lease_retry_period_seconds=retry),
        on_lost=lost.append)
    assert await elector.acquire(asyncio.Event())
    return elector, client


def test_renewals_keep_the_lease_while_the_operators_loop_is_kept_busy(
        plane: ControlPlane) -> None:
    """RenewalThread renews on its own loop and connection: through 3 deadlines of bursts on
    the operator's loop, each burst sees a renewal and leadership is never lost. The control,
    renewing on the busy loop itself (as before), loses the Lease."""
    async def renew_apart() -> tuple[list[str], list[bool]]:
        lost: list[str] = []
        elector, client = await elected(plane, "busy-apart", lost)
        renewed_during: list[bool] = []
        renewing = RenewalThread(elector, lambda: lease_client(plane))
        renewing.start()
        try:
            await keep_busy(3 * DEADLINE, lambda started: renewed_during.append(
                elector._renewed_at > started))
        finally:
            await renewing.stop()
            await elector.release()
            await client.close()
        return lost, renewed_during

    async def renew_on_the_busy_loop() -> list[str]:
        lost: list[str] = []
        elector, client = await elected(plane, "busy-shared", lost)
        renewing = asyncio.create_task(elector.keep_renewed())
        try:
            await keep_busy(3 * DEADLINE, lambda _: None)
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
            await client.close()
        return lost

    lost, renewed_during = asyncio.run(renew_apart())
    assert lost == [] and len(renewed_during) >= 3 and all(renewed_during), renewed_during
    # Held by us to the end, then released.
    assert lease_spec(plane, "tenantry-busy-busy-apart")["leaseDurationSeconds"] == 1
    assert holder(plane, "tenantry-busy-busy-apart") == ""
    assert [reason for reason in asyncio.run(renew_on_the_busy_loop())
            if reason.startswith("no renewal for")]


def test_a_failed_renewal_is_retried_promptly_within_the_deadline(plane: ControlPlane) -> None:
    """A renewal refused (the Lease was written by someone else between the renewal's read and
    its write, so the write conflicts) is tried again after FAILED_RENEWAL_RETRY_SECONDS, not a
    whole retry period later (here 4 s, one less than the deadline); leadership is kept."""
    retry = DEADLINE - 1.0

    async def steps() -> tuple[list[str], float]:
        lost: list[str] = []
        elector, client = await elected(plane, "conflicted", lost, retry)
        real_read = elector._read
        refused_at: list[float] = []

        async def read_then_bump() -> LeaseRecord | None:
            found = await real_read()
            elector._read = real_read  # type: ignore[method-assign]
            await asyncio.to_thread(plane.kubectl, "annotate", "lease", elector.name, "-n",
                                    LEASE_NAMESPACE, "--overwrite", "tenantry.dev/bumped=yes")
            refused_at.append(time.monotonic())
            return found

        real_try = elector.try_hold
        renewed = asyncio.Event()

        async def try_and_tell() -> bool:
            held = await real_try()
            if held:
                renewed.set()
            return held

        elector._read = read_then_bump  # type: ignore[method-assign]
        elector.try_hold = try_and_tell  # type: ignore[method-assign]
        renewing = asyncio.create_task(elector.keep_renewed())
        try:
            await asyncio.wait_for(renewed.wait(), timeout=DURATION)
            return lost, elector._renewed_at - refused_at[0]
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
            await elector.release()
            await client.close()

    lost, retried_after = asyncio.run(steps())
    assert lost == []
    # The next attempt started FAILED_RENEWAL_RETRY_SECONDS after the refusal, not `retry`.
    assert FAILED_RENEWAL_RETRY_SECONDS <= retried_after < retry / 2, retried_after
