"""Helpers for tests that drive the operator through the real API server with kubectl."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from typing import Any

from tenantry_devenv.controlplane import ControlPlane


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")


def get_json(plane: ControlPlane, *args: str) -> dict[str, Any] | None:
    out = plane.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def tenant_status(plane: ControlPlane, name: str) -> dict[str, Any]:
    obj = get_json(plane, "tnt", name) or {}
    return obj.get("status") or {}


def condition(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == ctype), {})


def apply_tenant(plane: ControlPlane, name: str, plan: str = "free", **spec: Any) -> None:
    body = {"apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant",
            "metadata": {"name": name}, "spec": {"planRef": {"name": plan}, **spec}}
    plane.kubectl("apply", "-f", "-", input_text=json.dumps(body))


def wait_ready(plane: ControlPlane, name: str, timeout: float = 60.0) -> dict[str, Any]:
    try:
        return wait_for(f"tenant {name} Ready",
                        lambda: (s := tenant_status(plane, name)).get("phase") == "Ready" and s,
                        timeout)
    except AssertionError as err:  # say why: the conditions carry the operator's reasons
        raise AssertionError(f"{err}\nstatus: {json.dumps(tenant_status(plane, name))}") from None


def delete_tenant(plane: ControlPlane, name: str) -> None:
    plane.kubectl("delete", "tnt", name, "--wait=false")
    wait_for(f"tenant {name} to disappear", lambda: get_json(plane, "tnt", name) is None,
             timeout=90)


def deep_merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """`change` laid over `base`, nested dicts merged (as Helm coalesces values)."""
    merged = copy.deepcopy(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged
