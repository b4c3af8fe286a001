"""Pure parts of quiet reconciles: when an apply, a status patch or an Event is due."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest
from tenantry_operator.conditions import (
    Transition,
    latest_conditions,
    status_changes,
    transitions,
)
from tenantry_operator.kube import APPLIED_HASH_ANNOTATION, contains, stamped, up_to_date
from tenantry_operator.malloc import MALLOC_ARENAS, limit_malloc_arenas
from tenantry_operator.plans import roll_out, start_offsets


def _cm(data: dict[str, str], labels: dict[str, str] | None = None) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "namespace": "n", "labels": labels or {"a": "1"}},
            "data": data}


def _live(manifest: dict[str, object], **extra_meta: object) -> dict[str, object]:
    """What the API server returns after applying `manifest`: stamped, with server fields."""
    live = stamped(manifest)
    live["metadata"].update({"uid": "u", "resourceVersion": "7", **extra_meta})  # type: ignore[attr-defined]
    return live


def test_an_applied_manifest_is_up_to_date_and_any_drift_is_not() -> None:
    manifest = _cm({"k": "v"})
    assert up_to_date(_live(manifest), manifest)
    assert not up_to_date(_live(manifest), _cm({"k": "w"}))  # content changed
    assert not up_to_date(_live(manifest), _cm({"k": "v", "x": "y"}))
    assert not up_to_date(_live(manifest), _cm({"k": "v"}, {"a": "2"}))
    drifted = _live(manifest)
    drifted["metadata"]["labels"] = {}  # type: ignore[index]  # a label removed by hand
    assert not up_to_date(drifted, manifest)
    unstamped = _live(manifest)
    del unstamped["metadata"]["annotations"][APPLIED_HASH_ANNOTATION]  # type: ignore[index]
    assert not up_to_date(unstamped, manifest)


def test_a_field_dropped_from_the_manifest_is_applied_although_live_still_holds_it() -> None:
    old = _cm({"k": "v"}, {"a": "1", "b": "2"})
    assert not up_to_date(_live(old), _cm({"k": "v"}, {"a": "1"}))


def test_secret_string_data_compares_with_the_stored_base64_data() -> None:
    manifest = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": "s", "namespace": "n"}, "stringData": {"password": "p"}}
    live = _live(manifest)
    del live["stringData"]
    live["data"] = {"password": base64.b64encode(b"p").decode()}
    assert up_to_date(live, manifest)
    live["data"] = {"password": base64.b64encode(b"q").decode()}
    assert not up_to_date(live, manifest)
    # The digest never covers the payload: no hash of a password in the metadata.
    assert stamped(manifest)["metadata"]["annotations"] == stamped(
        {**manifest, "stringData": {"password": "other"}})["metadata"]["annotations"]


def test_server_defaults_and_normalised_quantities_still_match() -> None:
    wanted = {"spec": {"containers": [{"name": "c", "resources": {"limits": {"cpu": "1000m"}}}],
                       "volumes": {}}}
    live = {"spec": {"containers": [{"name": "c", "imagePullPolicy": "IfNotPresent",
                                     "resources": {"limits": {"cpu": "1"}}}]}}
    assert contains(live, wanted)
    assert not contains({"spec": {"containers": []}}, wanted)


def test_status_changes_are_empty_when_settled_and_remove_dropped_keys() -> None:
    status = {"phase": "Ready", "provisioned": {"namespace": "n", "collectionTable": "t"},
              "retained": {"location": "x"}}
    assert status_changes(status, {"phase": "Ready", "provisioned": dict(status["provisioned"])}
                          ) == {}
    assert status_changes(status, {"phase": "Ready", "provisioned": {"namespace": "n"}}) == {
        "provisioned": {"collectionTable": None}}
    assert status_changes(status, {"phase": "Failed"}) == {"phase": "Failed"}


def _cond(ctype: str, ok: bool, reason: str, message: str = "m") -> dict[str, str]:
    return {"type": ctype, "status": "True" if ok else "False", "reason": reason,
            "message": message}


def test_transitions_post_one_event_per_failure_and_one_for_what_turned_true() -> None:
    waiting = [_cond("Ready", False, "PlanNotFound"), _cond("PlanResolved", False, "PlanNotFound")]
    assert transitions([], waiting) == [Transition("Warning", "PlanNotFound", "PlanResolved: m")]
    assert transitions(waiting, waiting) == []  # the same failure again: no Event
    assert transitions(waiting, [_cond("Ready", False, "PlanNotFound"),
                                 _cond("PlanResolved", False, "InvalidPlan")]) == [
        Transition("Warning", "InvalidPlan", "PlanResolved: m")]
    ready = [_cond("Ready", True, "Reconciled"), _cond("PlanResolved", True, "Resolved"),
             _cond("NamespaceReady", True, "Applied")]
    assert transitions(waiting, ready) == [Transition(
        "Normal", "Ready", "all resources are provisioned (PlanResolved, NamespaceReady True)")]
    assert transitions(ready, ready) == []


def test_start_offsets_pace_the_rollout() -> None:
    assert start_offsets(4, 2.0) == [0.0, 0.5, 1.0, 1.5]
    assert start_offsets(0, 5.0) == []


async def test_roll_out_bounds_concurrency_and_reports_failures() -> None:
    running, peak, done = 0, 0, []

    async def reconcile(name: str) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        if name == "bad":
            raise RuntimeError("boom")
        done.append(name)

    started = time.monotonic()
    failed = await roll_out("p", ["a", "b", "c", "bad", "a"], reconcile, per_second=100,
                            concurrency=2)
    assert failed == ["bad"] and sorted(done) == ["a", "b", "c"]
    assert peak <= 2
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("per_second", [10.0])
async def test_roll_out_is_rate_limited(per_second: float) -> None:
    starts: list[float] = []

    async def reconcile(name: str) -> None:
        starts.append(time.monotonic())

    await roll_out("p", [f"t{i}" for i in range(5)], reconcile, per_second, concurrency=10)
    assert starts[-1] - starts[0] >= 4 / per_second * 0.9


def test_latest_conditions_take_each_type_from_the_last_computation() -> None:
    stored = [{"type": "Ready", "status": "False", "lastTransitionTime": "t0"},
              {"type": "BudgetAlert", "status": "True", "lastTransitionTime": "t0"}]
    computed = [{"type": "Ready", "status": "True", "lastTransitionTime": "t1"},
                {"type": "PlanResolved", "status": "True", "lastTransitionTime": "t1"}]
    assert sorted(latest_conditions(stored, computed), key=lambda c: c["type"]) == [
        {"type": "BudgetAlert", "status": "True", "lastTransitionTime": "t0"},
        {"type": "PlanResolved", "status": "True", "lastTransitionTime": "t1"},
        {"type": "Ready", "status": "True", "lastTransitionTime": "t1"}]
    assert latest_conditions(stored, []) == stored


def test_the_operator_caps_malloc_arenas_unless_the_environment_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_malloc_arenas(MALLOC_ARENAS) is True  # glibc here: mallopt accepted it
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the user's setting wins
    assert limit_malloc_arenas(MALLOC_ARENAS) is False
