"""Quiet, prompt and clear (issue 8), against the real control plane, Postgres and Redis.

A settled resync writes nothing (API server audit log, Redis's change counter, Postgres's
transaction ids); conditions and Events tell a Tenant's story; a TenantPlan edit reaches its
tenants' limits within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
from collections.abc import Iterable, Iterator
from typing import Any

import psycopg
import pytest
import redis
from kube_helpers import apply_tenant, condition, delete_tenant, get_json, tenant_status, wait_for
from kube_helpers import wait_ready as wait_ready_for
from tenantry_devenv.controlplane import ControlPlane
from tenantry_devenv.services import Postgres
from tenantry_devenv.services import Redis as RedisServer
from tenantry_operator.kube import Kube, Tenant, as_dict
from tenantry_operator.pipeline import reconcile_steps
from tenantry_operator.reconcile import Settled, reconcile_tenant
from tenantry_operator.settings import get_settings
from tenantry_runtime.contracts.redis_keys import TenantKeys

pytestmark = pytest.mark.usefixtures("operator")

INTERVAL = 3.0  # TENANTRY_RECONCILE_INTERVAL_SECONDS of the operator fixture


def concerns(entry: dict[str, Any], tenants: Iterable[str]) -> bool:
    """Whether an audited write is about one of `tenants` (their objects, copies, Events)."""
    ref = entry.get("objectRef") or {}
    name, namespace = ref.get("name") or "", ref.get("namespace") or ""
    involved = ((entry.get("requestObject") or {}).get("involvedObject") or {}).get("name")
    for tenant in tenants:
        if (namespace == f"tenant-{tenant}" or involved == tenant
                or (ref.get("resource") in ("tenants", "namespaces") and name
                    in (tenant, f"tenant-{tenant}"))
                or name == f"tenantry-tenant-{tenant}"
                or name.startswith((f"tenantry-{tenant}-", f"tenantry-{tenant}."))):
            return True
    return False


def describe(writes: list[dict[str, Any]]) -> str:
    return "\n".join(f"{w['verb']} {w.get('objectRef')} by {w.get('userAgent')}" for w in writes)


def next_xid(dsn: str) -> int:
    """The next transaction id Postgres will hand out: it moves only when something writes."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()
    assert row is not None
    return int(row[0])


def vacuuming(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return bool(conn.execute("SELECT 1 FROM pg_stat_activity"
                                 " WHERE backend_type = 'autovacuum worker'").fetchall())


@contextlib.contextmanager
def no_autovacuum(*dsns: str) -> Iterator[None]:
    """Autovacuum off while counting transaction ids: an autoanalyze (after the DDL of a new
    tenant) writes pg_statistic and takes ids of its own."""
    def switch(value: str) -> None:
        for dsn in dsns:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f"ALTER SYSTEM SET autovacuum = {value}")
                conn.execute("SELECT pg_reload_conf()")
    switch("off")
    try:
        wait_for("autovacuum workers to finish", lambda: not any(map(vacuuming, dsns)))
        yield
    finally:
        switch("on")


def redis_changes(url: str) -> int:
    info = redis.Redis.from_url(url).info("persistence")
    return int(info["rdb_changes_since_last_save"])


def events_of(plane: ControlPlane, tenant: str) -> list[dict[str, Any]]:
    out = plane.kubectl("get", "events", "-A", "-o", "json", "--field-selector",
                        f"involvedObject.name={tenant},involvedObject.kind=Tenant")
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return sorted(items, key=lambda e: e.get("firstTimestamp") or e.get("eventTime") or "")


async def forced_resync(names: Iterable[str]) -> list[tuple[str, dict[str, Any], list[Any]]]:
    """Reconcile each tenant now, as the resync timer does; (name, status patch, Events)."""
    kube = Kube.from_env()
    try:
        found = []
        for name in names:
            body = as_dict(await kube.get(Tenant, name))
            settled = await reconcile_tenant(body, kube, get_settings(), reconcile_steps())
            found.append((name, settled.status_patch, settled.events))
        return found
    finally:
        await kube.close()


def test_settled_pool_bridge_and_silo_tenants_make_no_writes(
    control_plane: ControlPlane, shared_database: str, silo_postgres: Postgres,
    redis_server: RedisServer,
) -> None:
    tenants = {"qpool": {}, "qbridge": {"plan": "pro", "isolation": "bridge"},
               "quietsilo": {"plan": "enterprise", "isolation": "silo",
                             "database": {"storage": {"size": "1Gi"}}}}
    for name, spec in tenants.items():
        apply_tenant(control_plane, name, deletionPolicy="Delete",
                     apiKeys=[{"name": "app"}], **spec)
    try:
        for name in tenants:
            wait_ready_for(control_plane, name, timeout=180)
        time.sleep(2 * INTERVAL)  # the resyncs right after Ready run too
        with no_autovacuum(shared_database, silo_postgres.dsn("silo_quietsilo")):
            assert_settled(control_plane, tenants, shared_database,
                           silo_postgres.dsn("silo_quietsilo"), redis_server.url)

        # Drift is still repaired: a label removed by hand comes back, and only it is written.
        offset = control_plane.audit_offset()
        control_plane.kubectl("label", "namespace", "tenant-qpool", "tenantry.dev/plan-")
        wait_for("the label to be restored", lambda: (get_json(
            control_plane, "namespace", "tenant-qpool") or {})["metadata"]["labels"].get(
            "tenantry.dev/plan") == "free", timeout=30)
        repairs = [w for w in control_plane.writes_since(offset) if concerns(w, tenants)
                   and not str(w.get("userAgent", "")).startswith("kubectl")]
        assert [(w["verb"], w["objectRef"]["resource"]) for w in repairs] == [
            ("patch", "namespaces")], describe(repairs)
    finally:
        for name in tenants:
            delete_tenant(control_plane, name)


def assert_settled(control_plane: ControlPlane, tenants: Iterable[str], shared_dsn: str,
                   silo_dsn: str, redis_url: str) -> None:
    def counters() -> tuple[int, int, int, int]:
        return (control_plane.audit_offset(), next_xid(shared_dsn), next_xid(silo_dsn),
                redis_changes(redis_url))

    # Several resync ticks of the running operator.
    offset, shared_xid, silo_xid, redis_before = counters()
    time.sleep(3 * INTERVAL + 1)
    writes = [w for w in control_plane.writes_since(offset) if concerns(w, tenants)]
    assert writes == [], "settled resyncs wrote:\n" + describe(writes)
    # Nor read a credential Secret from the API server: the cache serves them.
    reads = [r for r in control_plane.requests_since(offset, {"get"}) if concerns(r, tenants)]
    assert reads == [], "settled resyncs read Secrets:\n" + describe(reads)
    assert next_xid(shared_dsn) == shared_xid, "the shared database was written"
    assert next_xid(silo_dsn) == silo_xid, "the silo database was written"
    assert redis_changes(redis_url) == redis_before, "Redis was written"

    # A forced resync of every one, through the function the timer runs.
    offset, shared_xid, silo_xid, redis_before = counters()
    for name, patch, events in asyncio.run(forced_resync(tenants)):
        assert patch == {}, f"{name}: status patch {patch}"
        assert events == [], f"{name}: events {events}"
    writes = [w for w in control_plane.writes_since(offset) if concerns(w, tenants)]
    assert writes == [], "a forced resync wrote:\n" + describe(writes)
    assert (next_xid(shared_dsn), next_xid(silo_dsn)) == (shared_xid, silo_xid)
    assert redis_changes(redis_url) == redis_before


def test_conditions_and_events_tell_the_story(control_plane: ControlPlane) -> None:
    name, plan = "qstory", "qlateplan"
    apply_tenant(control_plane, name, plan=plan, deletionPolicy="Delete")
    waiting = wait_for("PlanNotFound", lambda: (
        condition(s := tenant_status(control_plane, name), "PlanResolved").get("reason")
        == "PlanNotFound" and s))
    not_found_since = condition(waiting, "PlanResolved")["lastTransitionTime"]
    time.sleep(2 * INTERVAL)  # resyncs while the plan is missing: no new Event, same time
    assert condition(tenant_status(control_plane, name), "PlanResolved")[
        "lastTransitionTime"] == not_found_since
    warnings = [e for e in events_of(control_plane, name) if e["reason"] == "PlanNotFound"]
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning"
    assert "TenantPlan 'qlateplan' does not exist" in warnings[0]["message"]

    time.sleep(1.1)  # lastTransitionTime has a resolution of one second
    control_plane.kubectl("apply", "-f", "-", input_text=json.dumps({
        "apiVersion": "tenantry.dev/v1alpha1", "kind": "TenantPlan",
        "metadata": {"name": plan}, "spec": {"model": "claude-haiku-4-5"}}))
    ready = wait_ready_for(control_plane, name, timeout=60)
    resolved = condition(ready, "PlanResolved")
    assert resolved["status"] == "True" and resolved["lastTransitionTime"] > not_found_since
    assert {c["observedGeneration"] for c in ready["conditions"]} == {1}
    reasons = [(e["type"], e["reason"]) for e in events_of(control_plane, name)]
    assert ("Normal", "Ready") in reasons
    ready_event = next(e for e in events_of(control_plane, name) if e["reason"] == "Ready")
    assert "PlanResolved" in ready_event["message"] and "DatabaseReady" in ready_event["message"]

    # A spec change: every condition observes generation 2; none transitions, none is stamped.
    before = {c["type"]: c["lastTransitionTime"] for c in ready["conditions"]}
    count = len(events_of(control_plane, name))
    time.sleep(1.1)
    control_plane.kubectl("patch", "tnt", name, "--type=merge", "-p",
                          json.dumps({"spec": {"ai": {"rateLimits": {"requestsPerMinute": 7}}}}))
    # BudgetAlert is the alert loop's (it follows within its interval, a second here).
    updated = wait_for("generation 2 observed", lambda: (
        (s := tenant_status(control_plane, name)).get("observedGeneration") == 2
        and s.get("phase") == "Ready"
        and {c["observedGeneration"] for c in s["conditions"]} == {2} and s))
    assert {c["observedGeneration"] for c in updated["conditions"]} == {2}
    assert {c["type"]: c["lastTransitionTime"] for c in updated["conditions"]} == before
    time.sleep(INTERVAL)
    assert len(events_of(control_plane, name)) == count  # no transition, no Event
    delete_tenant(control_plane, name)
    control_plane.kubectl("delete", "tenantplan", plan)


async def reconcile_in_order(name: str) -> list[Settled]:
    """Reconcile a Ready tenant twice in one loop: first from its live body, then from a stale
    copy whose conditions predate its plan (what a handler queued behind the plan's roll-out
    holds when it gets the lock)."""
    kube = Kube.from_env()
    try:
        live = as_dict(await kube.get(Tenant, name))
        stale = copy.deepcopy(live)
        for cond in stale["status"]["conditions"]:
            if cond["type"] in ("PlanResolved", "Ready"):
                cond.update(status="False", reason="PlanNotFound",
                            lastTransitionTime="2020-01-01T00:00:00Z")
        return [await reconcile_tenant(body, kube, get_settings(), reconcile_steps())
                for body in (live, stale)]
    finally:
        await kube.close()


def test_a_reconcile_from_a_stale_body_stamps_no_transition_twice(
        control_plane: ControlPlane) -> None:
    name = "qstale"
    apply_tenant(control_plane, name, deletionPolicy="Delete")
    ready = wait_ready_for(control_plane, name)
    stamps = {c["type"]: c["lastTransitionTime"] for c in ready["conditions"]}
    time.sleep(1.1)  # a second stamp would differ
    first, second = asyncio.run(reconcile_in_order(name))
    assert (first.status_patch, first.events) == ({}, [])
    # The stale body's conditions are replaced by those just computed: no second Ready Event,
    # and the patch (still against the stale body) writes the times they already have.
    assert second.events == []
    assert {c["type"]: c["lastTransitionTime"] for c in second.status_patch["conditions"]
            if c["type"] in stamps} == stamps
    delete_tenant(control_plane, name)


def test_a_plan_edit_reaches_the_tenants_limits_within_seconds(
    control_plane: ControlPlane, redis_server: RedisServer,
) -> None:
    name, plan = "qplanned", "qplan"
    control_plane.kubectl("apply", "-f", "-", input_text=json.dumps({
        "apiVersion": "tenantry.dev/v1alpha1", "kind": "TenantPlan", "metadata": {"name": plan},
        "spec": {"model": "claude-haiku-4-5", "rateLimits": {"requestsPerMinute": 10}}}))
    apply_tenant(control_plane, name, plan=plan, deletionPolicy="Delete")
    wait_ready_for(control_plane, name)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    limits_key = TenantKeys(name).limits
    assert client.hget(limits_key, "requests_per_minute") == "10"

    started = time.monotonic()
    control_plane.kubectl("patch", "tenantplan", plan, "--type=merge", "-p", json.dumps(
        {"spec": {"rateLimits": {"requestsPerMinute": 77}}}))
    wait_for("the new limit in Redis", lambda: client.hget(
        limits_key, "requests_per_minute") == "77", timeout=10)
    elapsed = time.monotonic() - started
    config = json.loads((get_json(control_plane, "configmap", "tenantry-runtime-config", "-n",
                                  f"tenant-{name}") or {})["data"]["config.json"])
    assert config["revision"] == tenant_status(control_plane, name)["runtimeConfig"]["revision"]
    # The plan watch did it (the resync timer would post no PlanChanged Event).
    changed = wait_for("the PlanChanged Event", lambda: [
        e for e in events_of(control_plane, name) if e["reason"] == "PlanChanged"])
    assert f"plan {plan} changed" in changed[0]["message"]
    print(f"plan edit reached Redis after {elapsed:.2f} s")  # noqa: T201 - shown with -s
    delete_tenant(control_plane, name)
    control_plane.kubectl("delete", "tenantplan", plan)
