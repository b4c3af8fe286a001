"""A real local Kubernetes control plane: etcd, kube-apiserver, controller-manager, scheduler, kwok.

Certificates, the service-account key pair and an admin kubeconfig are generated for each run.
kwok fakes one Node and drives Pods through Running/Ready, so StatefulSets work without a kubelet.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import textwrap
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .processes import Process, StartupError, free_port, spawn, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "tools" / "controlplane" / "build.sh"
FAKE_NODE = "kwok-node-0"
# A StorageClass without a provisioner plus pre-made PVs lets StatefulSet PVCs bind for real.
LOCAL_STORAGE_CLASS = "local-fake"
# Audit verbs that change state (the API server's requests POST, PUT, PATCH, DELETE).
WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})
_METRIC_WRITE_VERBS = ("POST", "PUT", "PATCH", "APPLY", "DELETE")  # as /metrics names them


def control_plane_binaries() -> Path:
    """Build (first time) or find (later) the cached binaries; returns their directory."""
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], check=False, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise StartupError(f"building the control plane failed:\n{result.stderr[-4000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def generate_pki(pki: Path) -> None:
    """CA, API server serving cert, admin client cert (system:masters), service-account keys."""
    pki.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=tenantry-test-ca", cwd=pki)
    (pki / "apiserver.ext").write_text(
        "subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
        "extendedKeyUsage=serverAuth\n"
    )
    (pki / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subj, ext in (
        ("apiserver", "/CN=kube-apiserver", "apiserver.ext"),
        ("admin", "/O=system:masters/CN=tenantry-admin", "client.ext"),
    ):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", "-subj", subj, cwd=pki)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", f"{name}.crt", cwd=pki)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def write_kubeconfig(path: Path, server: str, pki: Path) -> None:
    path.write_text(textwrap.dedent(f"""\
        apiVersion: v1
        kind: Config
        clusters:
        - name: tenantry-local
          cluster:
            server: {server}
            certificate-authority: {pki / 'ca.crt'}
        users:
        - name: admin
          user:
            client-certificate: {pki / 'admin.crt'}
            client-key: {pki / 'admin.key'}
        contexts:
        - name: tenantry-local
          context: {{cluster: tenantry-local, user: admin}}
        current-context: tenantry-local
        """))


class KubectlError(RuntimeError):
    """kubectl exited non-zero; the message carries its output."""


@dataclass
class ControlPlane:
    """The running control plane; `kubeconfig` is an admin kubeconfig for it."""

    workdir: Path
    bin_dir: Path
    processes: list[Process] = field(default_factory=list)
    api_port: int = 0
    # Detached servers outlive this process (`make cluster-up`); others die with it.
    detached: bool = False

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    def kubectl(self, *args: str, input_text: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input_text, capture_output=True, text=True, check=False, timeout=120,
        )
        if check and result.returncode != 0:
            raise KubectlError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stderr}{result.stdout}")
        return result

    @property
    def audit_log(self) -> Path:
        return self.workdir / "logs" / "audit.log"

    def _write_audit_policy(self) -> Path:
        path = self.workdir / "audit-policy.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_AUDIT_POLICY)
        return path

    def audit_offset(self) -> int:
        """Where the audit log ends now: pass it to `writes_since` to see what came after."""
        return self.audit_log.stat().st_size if self.audit_log.exists() else 0

    def writes_since(self, offset: int) -> list[dict[str, Any]]:
        """The completed write requests (create, update, patch, delete) logged after `offset`.

        Each is an audit event: verb, userAgent, objectRef; Events carry their body
        (requestObject) so that the object they are about can be told.
        """
        return self.requests_since(offset, WRITE_VERBS)

    def requests_since(self, offset: int, verbs: Iterable[str]) -> list[dict[str, Any]]:
        """The completed requests of `verbs` logged after `offset`: writes, and GETs of
        Secrets (the only reads the audit policy logs)."""
        wanted = frozenset(verbs)
        if not self.audit_log.exists():
            return []
        with self.audit_log.open("rb") as log:
            log.seek(offset)
            lines = log.read().splitlines()
        found = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:  # a line being written right now
                continue
            if entry.get("stage") == "ResponseComplete" and entry.get("verb") in wanted:
                found.append(entry)
        return found

    def write_requests_total(self) -> int:
        """Write requests (POST, PUT, PATCH, server-side APPLY, DELETE) the API server has served
        since it started, from every client, as its /metrics counts them."""
        status, text = self._get("/metrics")
        if status != 200:
            raise RuntimeError(f"GET /metrics answered {status}")
        total = 0.0
        for line in text.splitlines():
            if line.startswith("apiserver_request_total{") and any(
                    f'verb="{verb}"' in line for verb in _METRIC_WRITE_VERBS):
                total += float(line.rsplit(" ", 1)[1])
        return int(total)

    def _get(self, path: str) -> tuple[int, str]:
        pki = self.workdir / "pki"
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        req = urllib.request.Request(self.server + path)  # noqa: S310 - our own https server
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:  # noqa: S310
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as err:
            return int(err.code), err.read().decode()

    def _spawn(self, name: str, argv: Sequence[str | Path], log: Path) -> Process:
        return spawn(name, argv, log, die_with_parent=not self.detached)

    def start(self, timeout: float = 180.0) -> None:
        pki, logs = self.workdir / "pki", self.workdir / "logs"
        generate_pki(pki)
        etcd_port, peer_port = free_port(), free_port()
        self.api_port = free_port()
        etcd = self._spawn("etcd", [
            self.bin_dir / "etcd", "--data-dir", self.workdir / "etcd",
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"default=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync", "--log-level", "warn",
        ], logs / "etcd.log")
        self.processes.append(etcd)
        apiserver = self._spawn("kube-apiserver", [
            self.bin_dir / "kube-apiserver",
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--authorization-mode=Node,RBAC", "--allow-privileged=true",
            "--storage-media-type=application/json", "--v=1",
            # Who wrote what: tests and bench/operator_scale.py count the operator's writes.
            f"--audit-policy-file={self._write_audit_policy()}",
            f"--audit-log-path={self.audit_log}", "--audit-log-format=json",
            "--audit-log-maxsize=500", "--audit-log-maxbackup=1",
        ], logs / "kube-apiserver.log")
        self.processes.append(apiserver)
        write_kubeconfig(self.kubeconfig, self.server, pki)
        wait_until("kube-apiserver /readyz", lambda: self._get("/readyz")[0] == 200,
                   apiserver, timeout)

        common = [f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
                  "--bind-address=127.0.0.1"]
        self.processes.append(self._spawn("kube-controller-manager", [
            self.bin_dir / "kube-controller-manager", *common,
            f"--secure-port={free_port()}",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            "--use-service-account-credentials=false",
            "--controllers=*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle",
        ], logs / "kube-controller-manager.log"))
        self.processes.append(self._spawn("kube-scheduler", [
            self.bin_dir / "kube-scheduler", *common, f"--secure-port={free_port()}",
        ], logs / "kube-scheduler.log"))
        kwok = self._spawn("kwok", [
            self.bin_dir / "kwok", f"--kubeconfig={self.kubeconfig}",
            f"--config={self.bin_dir / 'kwok-stages.yaml'}",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--cidr=10.244.0.0/16", "--node-ip=127.0.0.1",
            f"--server-address=127.0.0.1:{free_port()}",
        ], logs / "kwok.log")
        self.processes.append(kwok)
        self._seed_cluster(kwok, timeout)

    def _seed_cluster(self, kwok: Process, timeout: float) -> None:
        """A fake Ready node, a StorageClass with PVs to bind, and the default ServiceAccount."""
        self.kubectl("apply", "-f", "-", input_text=_SEED_MANIFESTS)

        def node_ready() -> bool:
            out = self.kubectl("get", "node", FAKE_NODE, "-o", "json", check=False)
            conds = json.loads(out.stdout)["status"].get("conditions", [])
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

        wait_until("the kwok node to be Ready", node_ready, kwok, timeout)
        # Admission taints a new Node not-ready; the node-lifecycle controller would lift it,
        # but it is off here (kwok posts no heartbeats, so it would evict everything instead).
        self.kubectl("taint", "node", FAKE_NODE, "node.kubernetes.io/not-ready:NoSchedule-",
                     check=False)
        wait_until(
            "the default ServiceAccount",
            lambda: self.kubectl("get", "sa", "default", check=False).returncode == 0,
            self.processes[2], timeout,
        )

    def install_crds(self, timeout: float = 60.0) -> None:
        """Apply crds/ and wait until the API server serves them."""
        self.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
        names = [f"crd/{p.stem.split('_')[1]}.tenantry.dev"
                 for p in sorted((REPO_ROOT / "crds").glob("*.yaml"))]
        wait_until("the CRDs to be Established", lambda: self.kubectl(
            "wait", "--for=condition=Established", "--timeout=10s", *names,
            check=False).returncode == 0, None, timeout)

    def add_persistent_volumes(self, count: int, size: str = "100Gi") -> None:
        """Pre-made volumes for silo PVCs to bind to (there is no storage provisioner here)."""
        docs = [_PV_TEMPLATE.format(index=i, size=size, cls=LOCAL_STORAGE_CLASS,
                                    path=self.workdir / "volumes" / str(i), node=FAKE_NODE)
                for i in range(count)]
        self.kubectl("apply", "-f", "-", input_text="\n---\n".join(docs))

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()

    def save_state(self) -> None:
        state = {"api_port": self.api_port, "bin_dir": str(self.bin_dir),
                 "processes": [[p.name, p.pid, str(p.log)] for p in self.processes]}
        (self.workdir / "state.json").write_text(json.dumps(state))

    @classmethod
    def load_state(cls, workdir: Path) -> ControlPlane:
        state = json.loads((workdir / "state.json").read_text())
        plane = cls(workdir=workdir, bin_dir=Path(state["bin_dir"]), api_port=state["api_port"])
        plane.processes = [Process(n, int(pid), Path(log)) for n, pid, log in state["processes"]]
        return plane


def start_control_plane(workdir: Path, timeout: float = 180.0, *,
                        detached: bool = False) -> ControlPlane:
    """Build or reuse the binaries, then start everything; stops what started if a step fails
    (or a signal arrives: see processes.stop_on_signals)."""
    workdir.mkdir(parents=True, exist_ok=True)
    plane = ControlPlane(workdir=workdir, bin_dir=control_plane_binaries(), detached=detached)
    try:
        plane.start(timeout=timeout)
    except BaseException:
        plane.stop()
        raise
    os.environ.setdefault("KUBECONFIG", str(plane.kubeconfig))
    return plane


_SEED_MANIFESTS = f"""\
apiVersion: v1
kind: Node
metadata:
  name: {FAKE_NODE}
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/hostname: {FAKE_NODE}
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
    topology.kubernetes.io/region: eu-west
status:
  allocatable: {{cpu: "32", memory: 256Gi, pods: "110"}}
  capacity: {{cpu: "32", memory: 256Gi, pods: "110"}}
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: {LOCAL_STORAGE_CLASS}
  annotations:
    storageclass.kubernetes.io/is-default-class: "true"
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: Immediate
reclaimPolicy: Retain
allowVolumeExpansion: true
"""

# Writes, and of the reads only GETs of Secrets (the operator serves its credential Secrets
# from its cache: a settled resync reads none); bodies only for Events (to tell which object
# an Event is about), nothing for Leases (renewed every few seconds by kwok and leader
# election).
_AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  verbs: [get]
  resources: [{group: "", resources: [secrets]}]
- level: None
  verbs: [get, list, watch]
- level: None
  resources: [{group: coordination.k8s.io, resources: [leases]}]
- level: Request
  resources: [{group: "", resources: [events]}, {group: events.k8s.io, resources: [events]}]
- level: Metadata
"""

_PV_TEMPLATE = """\
apiVersion: v1
kind: PersistentVolume
metadata:
  name: fake-pv-{index}
spec:
  capacity: {{storage: {size}}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: {cls}
  hostPath: {{path: {path}}}
"""
