"""Where the CLI reads from: the same settings (environment) as the operator.

- Kubernetes ($KUBECONFIG or in-cluster): Tenants, TenantPlans (billing terms), and the
  runtime's record Secrets in TENANTRY_RUNTIME_NAMESPACE (schema, database kind, key
  metadata: hashes only, never a key);
- TENANTRY_DATABASE_URL: the shared Postgres (pool and bridge tenants' usage and invoices);
- TENANTRY_SILO_DSN_OVERRIDES: silo tenants' databases when the CLI runs outside the cluster
  (else the record's in-cluster DSN);
- TENANTRY_REDIS_URL: Redis (doctor only).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from lightkube import ApiError, Client, KubeConfig
from lightkube.generic_resource import create_global_resource
from lightkube.resources.core_v1 import Secret
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from tenantry_runtime.billing import BillingTerms
from tenantry_runtime.contracts import runtime_record
from tenantry_runtime.contracts.database import tenant_transaction, validate_tenant_id
from tenantry_runtime.store import TenantRecord, parse_record

GROUP, VERSION = "tenantry.dev", "v1alpha1"
Tenant = create_global_resource(GROUP, VERSION, "Tenant", "tenants")
TenantPlan = create_global_resource(GROUP, VERSION, "TenantPlan", "tenantplans")


class CliSettings(BaseSettings):
    """The operator's variables, so one environment serves both."""

    model_config = SettingsConfigDict(env_prefix="TENANTRY_", extra="ignore")

    database_url: SecretStr | None = None
    redis_url: SecretStr | None = None
    runtime_namespace: str = "tenantry-system"
    silo_dsn_overrides: dict[str, str] = {}


class CliError(Exception):
    """A failure the user can fix; `code` is the process exit code (docs/billing.md)."""

    def __init__(self, message: str, code: int, fix: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.fix = fix


NOT_FOUND, UNREACHABLE, REFUSED = 3, 4, 6


def kube_client() -> Client:
    try:
        return Client(config=KubeConfig.from_env())
    except Exception as error:  # lightkube raises ConfigError and OSError subclasses
        raise CliError(f"no Kubernetes configuration: {error}", UNREACHABLE,
                       "set KUBECONFIG to a kubeconfig of the cluster (or run in a Pod)") from None


@dataclass(frozen=True)
class TenantView:
    """One tenant as the CLI needs it."""

    name: str
    spec: dict[str, Any]
    status: dict[str, Any]
    record: TenantRecord | None
    terms: BillingTerms | None
    problem: str | None = None  # why usage/invoices cannot be read (None: they can)
    keys_issued: dict[str, Any] = field(default_factory=dict)  # {name: {prefix, at}}

    @property
    def schema(self) -> str:
        assert self.record is not None
        return self.record.config.database.schema_name


class Sources:
    def __init__(self, settings: CliSettings | None = None, kube: Client | None = None) -> None:
        self.settings = settings or CliSettings()
        self._kube = kube

    @property
    def kube(self) -> Client:
        if self._kube is None:
            self._kube = kube_client()
        return self._kube

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApiError as error:
            if error.status.code == 404:
                raise CliError(f"{what} not found", NOT_FOUND) from None
            raise CliError(f"Kubernetes refused {what}: {error.status.message}",
                           UNREACHABLE) from None
        except OSError as error:
            raise CliError(f"Kubernetes API unreachable reading {what}: {error}", UNREACHABLE,
                           "check KUBECONFIG and that the API server answers") from None

    def tenant_names(self) -> list[str]:
        tenants = self._call("Tenants", lambda: list(self.kube.list(Tenant)))
        return sorted(t.metadata.name for t in tenants if t.metadata and t.metadata.name)

    def _record(self, name: str) -> tuple[TenantRecord | None, dict[str, Any]]:
        """The runtime record and the issue times of its keys (annotation, may be absent)."""
        try:
            secret = self.kube.get(Secret, runtime_record.secret_name(name),
                                   namespace=self.settings.runtime_namespace)
        except ApiError as error:
            if error.status.code == 404:
                return None, {}
            raise CliError(f"Kubernetes refused the runtime record of {name}: "
                           f"{error.status.message}", UNREACHABLE) from None
        raw = (secret.data or {}).get(runtime_record.DATA_KEY)
        annotations = (secret.metadata.annotations if secret.metadata else None) or {}
        try:
            issued = json.loads(annotations.get(runtime_record.ANNOTATION_KEYS_ISSUED, "{}"))
        except ValueError:
            issued = {}
        record = None if raw is None else parse_record(base64.b64decode(raw))
        return record, issued if isinstance(issued, dict) else {}

    def tenant(self, name: str) -> TenantView:
        try:
            validate_tenant_id(name)
        except ValueError as error:
            raise CliError(str(error), 2) from None
        body = self._call(f"Tenant {name!r}", self.kube.get, Tenant, name)
        spec, status = dict(body.get("spec") or {}), dict(body.get("status") or {})
        record, issued = self._record(name)
        plan_name = (spec.get("planRef") or {}).get("name")
        terms: BillingTerms | None = None
        problem: str | None = None
        if plan_name:
            try:
                plan = self.kube.get(TenantPlan, plan_name)
                terms = BillingTerms.from_plan((plan.get("spec") or {}).get("billing"))
            except ApiError:
                problem = f"its TenantPlan {plan_name!r} does not exist"
        else:
            problem = "it names no plan (spec.planRef.name)"
        if record is None:
            problem = (f"the operator has not written its runtime record into namespace "
                       f"{self.settings.runtime_namespace!r} yet (TENANTRY_RUNTIME_NAMESPACE)")
        return TenantView(name, spec, status, record, terms, problem, issued)

    def dsn(self, view: TenantView) -> str:
        """Where the tenant's usage and invoices live, as a libpq DSN."""
        if view.record is None:
            raise CliError(f"tenant {view.name}: {view.problem}", NOT_FOUND)
        if view.record.config.database.kind == "dedicated":
            override = self.settings.silo_dsn_overrides.get(view.name)
            if override:
                return override
            if view.record.database_dsn is None:
                raise CliError(f"silo tenant {view.name} has no database DSN in its record",
                               NOT_FOUND, "set TENANTRY_SILO_DSN_OVERRIDES")
            return view.record.database_dsn.get_secret_value()
        if self.settings.database_url is None:
            raise CliError("TENANTRY_DATABASE_URL is not set", UNREACHABLE,
                           "export TENANTRY_DATABASE_URL=postgresql://... (the operator's DSN)")
        return self.settings.database_url.get_secret_value()

    @contextmanager
    def tenant_connection(self, view: TenantView) -> Iterator[psycopg.Connection[Any]]:
        """A connection inside the tenant's transaction (RLS on the tenant)."""
        try:
            with psycopg.connect(self.dsn(view), autocommit=True, connect_timeout=5) as conn, \
                    tenant_transaction(conn, view.name):
                yield conn
        except psycopg.OperationalError as error:
            raise CliError(f"database of {view.name} unreachable: {str(error).strip()}",
                           UNREACHABLE, "check TENANTRY_DATABASE_URL (or the silo's DSN)"
                           ) from None


def redacted(dsn: str) -> str:
    """A DSN without its password, for messages."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparseable DSN>"
    parts.pop("password", None)
    return json.dumps({k: v for k, v in parts.items() if v is not None}, sort_keys=True)
