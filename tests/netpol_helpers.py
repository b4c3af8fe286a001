"""Running cyclonus, a real NetworkPolicy analyzer, over policies and a model of Pods.

cyclonus (built from Go modules by tools/controlplane/build.sh) reads policy files and answers,
for each (source, destination, port, protocol), whether the policies allow the traffic. Shared
by tests/test_network_policies.py (the operator's tenant guardrails) and
tests/test_chart_evaluation_netpol.py (the chart's evaluation data stores).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "controlplane" / "build.sh"


@dataclass(frozen=True)
class Peer:
    name: str
    namespace: str
    labels: dict[str, str]
    ip: str
    port: int
    protocol: str = "TCP"


# (source, destination Pod or an outside address, port, protocol)
Query = tuple[Peer, Peer | str, int, str]
NamespaceLabels = Callable[[str], dict[str, str]]


def metadata_name_only(namespace: str) -> dict[str, str]:
    """The one label the API server puts on every namespace."""
    return {"kubernetes.io/metadata.name": namespace}


# Named by `name=` so that test modules can import it without shadowing warnings.
@pytest.fixture(scope="module", name="cyclonus")
def cyclonus_fixture() -> str:
    built = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True,
                           check=False)
    assert built.returncode == 0, f"{BUILD_SCRIPT} failed:\n{built.stderr[-4000:]}"
    binary = Path(built.stdout.strip().splitlines()[-1]) / "cyclonus"
    assert binary.is_file() and os.access(binary, os.X_OK), f"build.sh left no cyclonus at {binary}"
    return str(binary)


def write_policies(directory: Path, policies: Iterable[dict[str, Any]]) -> Path:
    """The policies as files the analyzer reads: one object per file (it reads the first of a
    stream)."""
    path = directory / "policies"
    path.mkdir()
    for policy in policies:
        assert policy["kind"] == "NetworkPolicy", policy["kind"]
        meta = policy["metadata"]
        (path / f"{meta['namespace']}.{meta['name']}.yaml").write_text(yaml.safe_dump(policy))
    return path


def peer_json(pod: Peer | str, namespace_labels: NamespaceLabels) -> dict[str, Any]:
    if isinstance(pod, str):  # an address outside the cluster
        return {"Internal": None, "IP": pod}
    return {"Internal": {"PodLabels": pod.labels, "Namespace": pod.namespace,
                         "NamespaceLabels": namespace_labels(pod.namespace)}, "IP": pod.ip}


def analyze(cyclonus: str, policies: Path, directory: Path, queries: list[Query],
            namespace_labels: NamespaceLabels = metadata_name_only) -> list[bool]:
    """The analyzer's verdict on each query, in order."""
    traffic_file = directory / "traffic.json"
    traffic_file.write_text(json.dumps([
        {"Source": peer_json(source, namespace_labels),
         "Destination": peer_json(destination, namespace_labels),
         "Protocol": protocol, "ResolvedPort": port, "ResolvedPortName": ""}
        for source, destination, port, protocol in queries]))
    result = subprocess.run(
        [cyclonus, "analyze", "--mode", "query-traffic", "--policy-path", str(policies),
         "--traffic-path", str(traffic_file)],
        capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    # One table per query, its footer reads "IS ALLOWED? | TRUE" (or FALSE).
    verdicts = re.findall(r"IS ALLOWED\?\s*\|\s*(TRUE|FALSE)", result.stdout)
    assert len(verdicts) == len(queries), result.stdout[-4000:]
    return [v == "TRUE" for v in verdicts]
