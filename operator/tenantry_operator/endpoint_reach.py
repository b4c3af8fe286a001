"""Where a dedicated endpoint's URL may point: not into another tenant's namespace.

The runtime calls a dedicated tenant's `spec.ai.endpoint.url` from its own namespace, which
every tenant namespace admits (guardrails.py) and whose egress reaches the cluster. A URL
naming another tenant's Service (`http://api.tenant-b:443/x?`: the runtime's DNS search path
completes `<svc>.<namespace>`) would make the runtime a proxy into that namespace, past the
network policies that keep tenants apart. The operator refuses such a URL, and one into the
runtime's or the operator's own namespace, before it reaches the runtime's record (the runtime
keeps the last accepted one). Platform namespaces (a shared model server in `models`) stay
allowed, as the CRD documents.

Names only, as written: a public name that resolves to a cluster address is not caught here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from urllib.parse import urlsplit

from .guardrails import NODE_LOCAL_CIDRS

# Labels that make a name an in-cluster one, with the namespace just before them.
_CLUSTER_LABELS = ("svc", "pod")


def endpoint_problem(url: str, own_namespace: str, namespace_prefix: str,
                     platform_namespaces: Sequence[str] = (),
                     cluster_cidrs: Sequence[str] = ()) -> str | None:
    """Why the runtime must not call `url` for the tenant of `own_namespace`, or None.

    Refused: a name in another namespace that starts with `namespace_prefix` (a tenant's) or
    is one of `platform_namespaces` (the runtime's, the operator's), a bare name (a Service of
    the runtime's namespace), an address of `cluster_cidrs` or a node's link-local one.
    """
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        namespace = _namespace_of(host)
        if namespace is None or namespace == own_namespace or not (
                namespace == "" or namespace.startswith(namespace_prefix)
                or namespace in platform_namespaces):
            return None
        where = "the runtime's own namespace" if namespace == "" else f"namespace {namespace}"
        return (f"host {host} is a Service of {where}, not of the tenant's ({own_namespace}):"
                " the runtime does not call into other tenants' or its own namespace for a"
                f" tenant; name one in the tenant's namespace: <service>.{own_namespace}.svc")
    denied = [ipaddress.ip_network(c) for c in (*NODE_LOCAL_CIDRS, *cluster_cidrs)]
    if any(ip.version == net.version and ip in net for net in denied):
        return (f"host {host} is a node's or the cluster's own address; a dedicated endpoint"
                " must be outside the cluster or named in the tenant's namespace")
    return None


def _namespace_of(host: str) -> str | None:
    """The namespace an in-cluster name resolves in ("" for a bare name: the runtime's own),
    or None for a name that is not an in-cluster one."""
    labels = host.split(".")
    if host == "localhost":  # the runtime's own Pod (as 127.0.0.1): no other namespace
        return None
    if len(labels) == 1:
        return ""
    marker = next((i for i, label in enumerate(labels) if label in _CLUSTER_LABELS and i >= 2),
                  None)
    if marker is not None:
        return labels[marker - 1]
    # <service>.<namespace>, completed by the DNS search path; "example.com" is read the same
    # way, and passes unless "com" is one of the refused namespaces.
    return labels[1] if len(labels) == 2 else None
