"""Budget alerts (issue 10): claimed once per period by the runtime replicas, delivered by the
operator as an Event, the BudgetAlert condition and a signed webhook.

Real parts: redis-server (its own database, 5, so an operator fixture running in the same
session, which reads database 0, never delivers these tenants' alerts), four runtime apps under
uvicorn with the official SDK against the upstream stub, the control plane's API server, and a
webhook receiver under uvicorn that verifies signatures as docs/billing-export-alerts.md says.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections import Counter
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest
import redis
import redis.asyncio
from billing_standins import WebhookReceiver
from db_helpers import unique
from kube_helpers import (
    apply_tenant,
    condition,
    delete_tenant,
    get_json,
    tenant_status,
    wait_ready,
)
from lightkube import AsyncClient, KubeConfig
from pydantic import SecretStr
from runtime_helpers import MODEL, serve, wait_for, write_limits
from tenantry_devenv.controlplane import ControlPlane
from tenantry_devenv.services import Redis
from tenantry_operator.alerts import (
    AlertDispatcher,
    WebhookFailed,
    alert_condition,
    public_address_only,
)
from tenantry_operator.alerts import (
    claimed as claimed_pairs,
)
from tenantry_operator.kube import Kube
from tenantry_operator.names import LABEL_MANAGED_BY, LABEL_TENANT, MANAGER
from tenantry_operator.settings import OperatorSettings
from tenantry_runtime.alerts import check_alerts, sign, verify
from tenantry_runtime.contracts.redis_keys import TenantKeys
from tenantry_runtime.resp import PipelinedRedis
from usage_helpers import App, running_app, runtime_of

SECRET = b"whsec-" + b"k" * 32


def alerts_redis(server: Redis) -> str:
    return server.url.rsplit("/", 1)[0] + "/5"


def test_signature_is_verified_and_replays_and_tampering_fail() -> None:
    body = b'{"id":"acme.daily.2026-11-27.80"}'
    now = int(time.time())
    header = sign(SECRET, body, now)
    assert header.startswith(f"t={now},v1=") and verify(SECRET, header, body)
    assert not verify(SECRET, header, body + b" ")  # tampered body
    assert not verify(b"another key" * 4, header, body)
    assert not verify(SECRET, sign(SECRET, body, now - 301), body)  # replayed later
    assert not verify(SECRET, header.replace(f"t={now}", f"t={now + 1}"), body)
    assert not verify(SECRET, "garbage", body)


def test_webhooks_to_private_addresses_are_refused_by_default() -> None:
    for url in ("http://127.0.0.1:8080/x", "http://10.0.0.1/x", "http://169.254.169.254/"):
        with pytest.raises(WebhookFailed, match="non-public"):
            asyncio.run(public_address_only(url))


def test_condition_names_the_worst_threshold() -> None:
    assert alert_condition([]).ok is False
    worst = alert_condition([("allowance", 80), ("allowance", 100), ("monthly", 80)])
    assert (worst.ok, worst.reason) == (True, "Allowance100Percent")
    assert worst.message == "reached this period: monthly 80%; allowance 100%"


def test_each_threshold_is_claimed_once_per_period(redis_server: Redis) -> None:
    url, tenant = alerts_redis(redis_server), unique("alertunit")
    write_limits(url, tenant, daily_tokens=1000, monthly_tokens=10_000,
                 included_monthly_tokens=5000)
    keys, client = TenantKeys(tenant), redis.Redis.from_url(url)
    today = datetime(2026, 11, 27, 10, tzinfo=UTC)
    tomorrow = today + timedelta(days=1)

    async def scenario() -> list[Any]:
        pipelined = PipelinedRedis(url, 5.0)
        try:
            seen = []
            for at, day_spent, month_spent in ((today, 799, 799), (today, 800, 800),
                                               (today, 999, 999), (today, 1000, 4000),
                                               (today, 5000, 5000), (tomorrow, 800, 5800)):
                client.set(keys.tokens_day(at), day_spent)
                client.set(keys.tokens_month(at), month_spent)
                # Eight concurrent checks, as eight settlements on four replicas.
                replies = await asyncio.gather(*(check_alerts(pipelined, tenant, at)
                                                 for _ in range(8)))
                seen.append(sorted(a for reply in replies for a in reply))
            return seen
        finally:
            await pipelined.aclose()

    try:
        assert asyncio.run(scenario()) == [
            [], [("daily", 80)], [], [("allowance", 80), ("daily", 100)],
            [("allowance", 100)], [("daily", 80)]]  # a new day: the daily budget again
        assert client.xlen(keys.alerts) == 5
        assert 0 < client.ttl(keys.alert_claims_day(today)) <= 2 * 86400
    finally:
        client.close()


def spend_until_refused(app: App, tenant: str, results: Counter[str]) -> None:
    client = anthropic.Anthropic(base_url=app.server.url, api_key=app.server.keys[tenant]["main"],
                                 max_retries=0)
    for _ in range(500):
        try:
            client.messages.create(model=MODEL, max_tokens=16, messages=[
                {"role": "user", "content": "spend a few tokens please, one two three"}])
            results["ok"] += 1
        except anthropic.RateLimitError:
            results["refused"] += 1
            return


def make_tenant(plane: ControlPlane, tenant: str, url: str) -> None:
    namespace = f"tenant-{tenant}"
    items = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": namespace, "labels": {LABEL_MANAGED_BY: MANAGER, LABEL_TENANT: tenant}}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "alert-hook",
                                                             "namespace": namespace},
         "data": {"hmac-key": base64.b64encode(SECRET).decode()}},
        {"apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": tenant},
         "spec": {"planRef": {"name": "free"}, "alerts": {"webhook": {
             "url": url, "secretRef": {"name": "alert-hook"}}}}}]
    plane.kubectl("apply", "-f", "-", input_text=json.dumps(
        {"apiVersion": "v1", "kind": "List", "items": items}))


def deliver_round(plane: ControlPlane, redis_url: str) -> int:
    async def one_round() -> int:
        kube = Kube(AsyncClient(config=KubeConfig.from_file(plane.kubeconfig)))
        client = redis.asyncio.Redis.from_url(redis_url)
        settings = OperatorSettings(redis_url=SecretStr(redis_url),
                                    alerts_webhook_allow_private=True)
        try:
            async with aiohttp.ClientSession() as http:
                return await AlertDispatcher(kube, client, settings, http).run_round()
        finally:
            await client.aclose()
            await kube.close()

    return asyncio.run(one_round())


def budget_events(plane: ControlPlane, tenant: str) -> list[dict[str, Any]]:
    events = get_json(plane, "events", "-n", "default",
                      "--field-selector", f"involvedObject.name={tenant}") or {}
    return [e for e in events.get("items", []) if e["reason"].startswith("BudgetAlert")]


def test_alerts_fire_once_per_period_under_four_replicas(
        control_plane: ControlPlane, redis_server: Redis, upstream_stub: tuple[str, object],
        tmp_path: Path) -> None:
    url, tenant = alerts_redis(redis_server), unique("alerts")
    stub_url, _ = upstream_stub
    with ExitStack() as stack:
        apps = [stack.enter_context(running_app(tmp_path, url, stub_url, None))
                for _ in range(4)]
        apps[0].server.add_tenant(tenant, limits={
            "daily_tokens": 3000, "monthly_tokens": 3000, "included_monthly_tokens": 1500,
            "overage_allowed": 1})
        for app in apps[1:]:
            app.server.keys[tenant] = apps[0].server.keys[tenant]
            app.server.write(apps[0].server.record(tenant))
        results: Counter[str] = Counter()
        threads = [threading.Thread(target=spend_until_refused, args=(app, tenant, results))
                   for app in apps]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert results["refused"] == 4 and results["ok"] > 20, results
        for app in apps:  # the checks run after the response, off the request's task
            wait_for(lambda a=app: not runtime_of(a).background, 10, "alert checks")
        claimed = Counter(key for app in apps
                          for key, value in runtime_of(app).metrics.alerts.values.items()
                          for _ in range(int(value)))
        assert len(claimed) == 6 and set(claimed.values()) == {1}, claimed
        client = redis.Redis.from_url(url)
        assert client.xlen(TenantKeys(tenant).alerts) == 6
        client.close()

    receiver = WebhookReceiver(SECRET, fail_first=1)  # one 500: retried in the next round
    with serve(receiver.app()) as hook_url:
        make_tenant(control_plane, tenant, f"{hook_url}/hooks/tenantry")
        assert deliver_round(control_plane, url) == 5
        assert deliver_round(control_plane, url) == 1
        assert deliver_round(control_plane, url) == 0  # nothing left: nothing sent again
    day, month = datetime.now(UTC).strftime("%Y-%m-%d"), datetime.now(UTC).strftime("%Y-%m")
    expected = {f"{tenant}.daily.{day}.80", f"{tenant}.daily.{day}.100",
                f"{tenant}.monthly.{month}.80", f"{tenant}.monthly.{month}.100",
                f"{tenant}.allowance.{month}.80", f"{tenant}.allowance.{month}.100"}
    assert set(receiver.delivered) == expected
    assert all(valid for _, valid, _ in receiver.attempts)
    successes = Counter(alert for alert, _, status in receiver.attempts if status == 204)
    assert successes == Counter(expected)  # one successful delivery per alert
    assert len(receiver.attempts) == 7  # and the one failure, retried
    hook = receiver.delivered[f"{tenant}.daily.{day}.100"]
    assert hook["type"] == "budget.threshold_reached" and hook["limit"] == 3000
    assert hook["used"] >= 3000 and hook["tenant"] == tenant
    events = budget_events(control_plane, tenant)
    assert len(events) == 6 and all(e["count"] == 1 for e in events)
    assert {e["type"] for e in events} == {"Normal", "Warning"}
    # The condition these claims give. Not read from the Tenant: the session's operator, whose
    # alert loop reads another Redis database, may reconcile this Tenant too and write its own
    # (a flake seen once); the operator's whole path is the next test.
    client = redis.Redis.from_url(url)
    now, keys = datetime.now(UTC), TenantKeys(tenant)
    claims = claimed_pairs([client.hkeys(keys.alert_claims_day(now)),
                            client.hkeys(keys.alert_claims_month(now))])
    client.close()
    wanted = alert_condition(claims)
    assert (wanted.status, wanted.reason) == ("True", "Daily100Percent")
    control_plane.kubectl("delete", "tnt", tenant, "--wait=false")


def test_the_running_operator_delivers_alerts_of_a_provisioned_tenant(
        operator: object, control_plane: ControlPlane, redis_server: Redis) -> None:
    """The whole path with the operator's own loop: its limits hash (with the plan's
    allowance), a runtime's check, then Event, condition and webhook from the operator."""
    tenant = unique("alertop")
    receiver = WebhookReceiver(SECRET)
    with serve(receiver.app()) as hook_url:
        apply_tenant(control_plane, tenant, "free", alerts={"webhook": {
            "url": f"{hook_url}/hooks/tenantry", "secretRef": {"name": "alert-hook"}}})
        namespace = wait_ready(control_plane, tenant)["provisioned"]["namespace"]
        control_plane.kubectl("-n", namespace, "create", "secret", "generic", "alert-hook",
                              f"--from-literal=hmac-key={SECRET.decode()}")
        client = redis.Redis.from_url(redis_server.url)
        keys, now = TenantKeys(tenant), datetime.now(UTC)
        # The free plan: 20000 a day, 200000 a month, all of it included.
        assert client.hget(keys.limits, "included_monthly_tokens") == b"200000"
        client.set(keys.tokens_day(now), 17_000)
        client.set(keys.tokens_month(now), 170_000)
        client.close()

        async def runtime_check() -> list[tuple[str, int]]:
            pipelined = PipelinedRedis(redis_server.url, 5.0)
            try:
                return await check_alerts(pipelined, tenant, now)
            finally:
                await pipelined.aclose()

        assert sorted(asyncio.run(runtime_check())) == [
            ("allowance", 80), ("daily", 80), ("monthly", 80)]
        wait_for(lambda: len(receiver.delivered) == 3, 30, "three webhooks")
        wait_for(lambda: len(budget_events(control_plane, tenant)) == 3, 30, "three Events")
        wait_for(lambda: condition(tenant_status(control_plane, tenant), "BudgetAlert").get(
            "reason") == "Daily80Percent", 30, "the BudgetAlert condition")
    assert len(receiver.attempts) == 3 and all(valid for _, valid, _ in receiver.attempts)
    delete_tenant(control_plane, tenant)
