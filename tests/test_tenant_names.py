"""Tenant names with hyphens (`acme-corp`): validation, collision-free derived names, migration
0006, answer redaction, and pool/bridge/silo tenants of such names through the real operator.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import psycopg
import pytest
import yaml
from conftest import CREDENTIALS_NAMESPACE, RUNTIME_NAMESPACE
from db_helpers import Conn, connect, scalar, scratch_database
from kube_helpers import apply_tenant, delete_tenant, get_json, wait_for, wait_ready
from psycopg import sql
from runtime_helpers import KubeRuntime
from tenantry_devenv.controlplane import ControlPlane
from tenantry_devenv.services import Postgres
from tenantry_operator import builders
from tenantry_operator.names import LABEL_MANAGED_BY, LABEL_TENANT, namespace_name
from tenantry_operator.reconcile import resolve_spec
from tenantry_runtime.contracts import database as contract
from tenantry_runtime.contracts import runtime_record
from tenantry_runtime.contracts.database import (
    TENANT_ID_PATTERN,
    InvalidTenantId,
    bridge_schema,
    ensure_tenant_rls,
    migrate,
    opaque_name,
    tenant_transaction,
    validate_tenant_id,
)
from tenantry_runtime.contracts.redis_keys import TenantKeys
from tenantry_runtime.sanitize import REDACTED
from test_runtime_embeddings import sanitizer_for
from test_runtime_keys_e2e import keys_of, wait_served

REPO_ROOT = Path(__file__).resolve().parents[1]
VALID = ["a", "ab", "a-b", "acme-corp", "a--b", "a1-2b", "x" * 40, "a" + "-" * 38 + "b"]
INVALID = ["", "-a", "a-", "Acme", "acme_corp", "acme.corp", "1acme", "a" * 41, "a b", "{a}",
           "a:b", "a*", "é"]
# Ids whose naive derived names could meet: hyphens against none, and words the operator
# itself puts around ids (`tenant-`, `postgres-admin`, `tenant-db-credentials`).
TRICKY = ["ab", "a-b", "a-b-c", "ab-c", "a-bc", "abc", "tenant", "tenant-x", "x",
          "postgres-admin", "x-postgres-admin", "x-postgres", "tenant-db-credentials",
          "tenant-tenant"]


# --------------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("name", VALID)
def test_dns_labels_up_to_40_characters_are_tenant_ids(name: str) -> None:
    assert validate_tenant_id(name) == name


@pytest.mark.parametrize("name", INVALID)
def test_other_names_are_refused_with_what_to_use(name: str) -> None:
    with pytest.raises(InvalidTenantId, match="lowercase letters, digits and hyphens"):
        validate_tenant_id(name)


def test_the_crds_rule_is_the_contracts_pattern() -> None:
    for path in (REPO_ROOT / "crds" / "tenantry.dev_tenants.yaml",
                 REPO_ROOT / "charts" / "tenantry" / "crds" / "tenantry.dev_tenants.yaml"):
        crd = yaml.safe_load(path.read_text())
        rules = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
            "x-kubernetes-validations"]
        rule = next(r["rule"] for r in rules if "metadata.name" in r["rule"])
        assert f"matches('{TENANT_ID_PATTERN.pattern}')" in rule, path
    # The migration that widens the SQL CHECK carries the same pattern.
    body = (REPO_ROOT / "runtime" / "tenantry_runtime" / "contracts" / "migrations"
            / "0006_tenant_ids_with_hyphens.sql").read_text()
    assert f"'{TENANT_ID_PATTERN.pattern}'" in body


def test_derived_names_and_keys_never_collide() -> None:
    """Every name the operator and runtime derive from an id maps distinct ids to distinct
    names, and names of different kinds that share a namespace never meet."""
    derived: dict[str, Any] = {
        "namespace": namespace_name,
        "postgres object": lambda t: opaque_name("bridge", t),
        "redis prefix": lambda t: TenantKeys(t).prefix,
        "runtime record": runtime_record.secret_name,
    }
    for kind, derive in derived.items():
        names = [derive(t) for t in TRICKY]
        assert len(set(names)) == len(TRICKY), kind
    # The runtime's records and the operator's credential copies live, by default, in the same
    # namespace (tenantry-system): no record may be a copy's name (tenant `tenant`'s
    # `postgres-admin` copy once was tenant `postgres-admin`'s record).
    copies = {builders.credentials_backup_name(t, s) for t in TRICKY
              for s in (builders.SILO_ADMIN_SECRET, builders.TENANT_DB_SECRET)}
    records = {runtime_record.secret_name(t) for t in TRICKY}
    assert len(copies) == 2 * len(TRICKY)
    assert copies.isdisjoint(records)
    assert runtime_record.tenant_of(runtime_record.secret_name("a-b")) == "a-b"
    # Redis: one tenant's SCAN pattern never matches another tenant's keys.
    for one, other in itertools.permutations(TRICKY, 2):
        assert not TenantKeys(other).limits.startswith(TenantKeys(one).prefix)
    # Kubernetes: a namespace name is a DNS label (63), also for the longest id.
    assert len(namespace_name("a" * 40)) <= 63
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", namespace_name("a-b"))


async def test_the_operator_refuses_an_invalid_name_an_older_crd_let_through() -> None:
    body = {"metadata": {"name": "Acme-", "uid": "u", "generation": 1},
            "spec": {"planRef": {"name": "free"}}}
    spec, cond, retryable = await resolve_spec(body, kube=None)  # type: ignore[arg-type]
    assert spec is None and not retryable
    assert (cond.ok, cond.reason) == (False, "InvalidTenantName")
    assert "a DNS label such as 'acme-corp'" in cond.message


def test_hyphenated_names_are_redacted_whole_and_only_as_names() -> None:
    sanitizer = sanitizer_for("acme-corp", "acme", "globex", "big-co")
    doc = "0b9a3c7e-1111-4222-8333-444455556666"
    sanitizer.documents.add("globex", doc)
    text = (f"ACME-CORP and acme-corporate, acme and acme-x, the big-co-op, doc-{doc}, "
            "globex-acme-corp.")
    assert sanitizer.redact(text, "big-co", "req") == (
        f"{REDACTED} and {REDACTED}-corporate, {REDACTED} and {REDACTED}-x, the big-co-op,"
        f" doc-{REDACTED}, {REDACTED}-{REDACTED}.")
    # The caller's own name is kept whole: `acme` inside it is not another tenant's name.
    assert sanitizer.redact("we are acme-corp", "acme-corp", "req") == "we are acme-corp"
    # A stream may split a name at its hyphen, or end a delta inside a hyphenated word.
    assert sanitizer.could_begin("acme-", "big-co")
    assert sanitizer.could_begin("the-big-acme", "globex")  # `-corp` may follow
    assert not sanitizer.could_begin("zzz-qqq", "globex")


# --------------------------------------------------------------------------------- migration


def tenant_checks(conn: Conn) -> list[tuple[str, str, bool, str]]:
    """(table, constraint, validated, definition) of every tenant_id CHECK of `tenantry`'s
    tables (partitions inherit their parent's)."""
    return [tuple(row) for row in conn.execute("""
        SELECT c.relname, co.conname, co.convalidated, pg_get_constraintdef(co.oid)
        FROM pg_constraint co JOIN pg_class c ON c.oid = co.conrelid
        WHERE c.relnamespace = 'tenantry'::regnamespace AND co.contype = 'c'
          AND pg_get_constraintdef(co.oid) LIKE '%tenant_id ~%'
          AND NOT c.relispartition ORDER BY 1""").fetchall()]


@pytest.fixture
def old_schema(postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> Iterator[Conn]:
    """A database migrated up to 0005 only, as a deployment before hyphens was."""
    with scratch_database(postgres, "names") as name, connect(postgres, name) as conn:
        shipped = contract.load_migrations()
        with monkeypatch.context() as patch:
            patch.setattr(contract, "load_migrations",
                          lambda: [m for m in shipped if m.version <= 5])
            migrate(conn, "tenantry")
        yield conn


def test_migration_0006_lets_hyphenated_ids_in_and_keeps_refusing_bad_ones(
        old_schema: Conn) -> None:
    conn = old_schema
    # An operator-made table (the shared embeddings) created under the former pattern.
    conn.execute("CREATE TABLE tenantry.tenant_embeddings_d3 (tenant_id text NOT NULL,"
                 " id uuid PRIMARY KEY DEFAULT gen_random_uuid(), embedding vector(3))")
    conn.execute("ALTER TABLE tenantry.tenant_embeddings_d3 ADD CONSTRAINT tenant_id_valid"
                 " CHECK (tenant_id ~ '^[a-z][a-z0-9]{0,39}$')")
    with pytest.raises(psycopg.errors.CheckViolation), tenant_transaction(conn, "acme-corp"):
        conn.execute("INSERT INTO tenantry.tenants (tenant_id, isolation) VALUES (%s, 'pool')",
                     ("acme-corp",))

    assert migrate(conn, "tenantry")[0] == 6  # then the later ones
    for tenant in ("acme-corp", "ab", "a-b"):
        with tenant_transaction(conn, tenant):
            conn.execute("INSERT INTO tenantry.tenants (tenant_id, isolation)"
                         " VALUES (%s, 'pool')", (tenant,))
            conn.execute("INSERT INTO tenantry.documents (content) VALUES ('x')")
            conn.execute("INSERT INTO tenantry.tenant_embeddings_d3 (tenant_id, embedding)"
                         " VALUES (%s, '[1,2,3]')", (tenant,))
    for bad in ("a-", "-a", "A"):
        conn.execute("SELECT set_config('app.current_tenant', %s, false)", (bad,))
        with pytest.raises(psycopg.errors.CheckViolation, match="tenant_id_valid"):
            conn.execute("INSERT INTO tenantry.documents (content) VALUES ('x')")
    conn.execute("RESET app.current_tenant")
    # One valid constraint per table, none left with the former pattern; a re-run changes nothing.
    defs = tenant_checks(conn)
    assert {d[0] for d in defs} >= {"tenants", "documents", "ai_usage_logs", "usage_daily",
                                    "tenant_embeddings_d3"}
    assert all(d[1] == "tenant_id_valid" and d[2] and TENANT_ID_PATTERN.pattern in d[3]
               for d in defs), defs
    body = next(m for m in contract.load_migrations() if m.version == 6).body
    conn.execute("SET search_path TO tenantry, public")
    conn.execute(body)
    assert tenant_checks(conn) == defs
    # A table the operator creates later gets the current pattern (ensure_tenant_rls).
    conn.execute("CREATE TABLE tenantry.tenant_embeddings_d4 (tenant_id text NOT NULL)")
    conn.execute("ALTER TABLE tenantry.tenant_embeddings_d4 ADD CONSTRAINT tenant_id_valid"
                 " CHECK (tenant_id ~ '^[a-z][a-z0-9]{0,39}$')")
    ensure_tenant_rls(conn, "tenantry", "tenant_embeddings_d4")
    assert TENANT_ID_PATTERN.pattern in scalar(conn, """
        SELECT pg_get_constraintdef(oid) FROM pg_constraint
        WHERE conrelid = 'tenantry.tenant_embeddings_d4'::regclass
          AND conname = 'tenant_id_valid'""")


# --------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("name", ["-acme", "acme-", "Acme", "acme_corp", "a" * 41])
def test_the_crd_refuses_names_that_are_not_tenant_ids(control_plane: ControlPlane,
                                                       name: str) -> None:
    body = {"apiVersion": "tenantry.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": name},
            "spec": {"planRef": {"name": "free"}}}
    out = control_plane.kubectl("apply", "--dry-run=server", "-f", "-",
                                input_text=json.dumps(body), check=False)
    assert out.returncode != 0
    # The API server's own name check, or ours for what it accepts (a 41-character name).
    assert ("metadata.name must be a DNS label of at most 40 characters" in out.stderr
            or "a lowercase RFC 1123" in out.stderr), out.stderr


@pytest.mark.usefixtures("operator")
@pytest.mark.timeout(400)
def test_hyphenated_pool_bridge_and_silo_tenants_go_ready_and_are_served(
        control_plane: ControlPlane, shared_database: str, silo_postgres: Postgres,
        kube_runtime_server: KubeRuntime) -> None:
    plane = control_plane
    apply_tenant(plane, "acme-corp", plan="pro", apiKeys=[{"name": "app"}],
                 deletionPolicy="Delete")
    # `a-b` and `ab` side by side: nothing of one may land on the other.
    for name in ("a-b", "ab"):
        apply_tenant(plane, name, plan="pro", isolation="bridge", apiKeys=[{"name": "app"}],
                     deletionPolicy="Delete")
    apply_tenant(plane, "silo-co", plan="enterprise", isolation="silo",
                 database={"storage": {"size": "5Gi"}}, deletionPolicy="Delete")
    for name in ("acme-corp", "a-b", "ab"):
        wait_ready(plane, name, timeout=120)
    wait_ready(plane, "silo-co", timeout=180)

    with psycopg.connect(shared_database, autocommit=True) as conn:
        rows = dict(conn.execute("SELECT tenant_id, isolation FROM tenantry.tenants WHERE"
                                 " tenant_id = ANY(%s)",
                                 (["acme-corp", "a-b", "ab", "silo-co"],)).fetchall())
        assert rows == {"acme-corp": "pool", "a-b": "bridge", "ab": "bridge", "silo-co": "silo"}
        for name in ("a-b", "ab"):  # each its own schema, pinned to its own id
            pinned = scalar(conn, """
                SELECT pg_get_constraintdef(co.oid) FROM pg_constraint co
                JOIN pg_class c ON c.oid = co.conrelid
                JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = %s AND c.relname = 'documents'
                  AND co.conname = 'tenant_id_pinned'""", (bridge_schema(name),))
            assert hashlib.sha256(name.encode()).hexdigest() in pinned  # pinned by digest
    assert bridge_schema("a-b") != bridge_schema("ab")
    with psycopg.connect(silo_postgres.dsn("silo_silo-co"), autocommit=True) as silo:
        assert scalar(silo, sql.SQL("SELECT tenant_id FROM {}").format(
            sql.Identifier(bridge_schema("silo-co"), "tenants"))) == "silo-co"
    for name in ("acme-corp", "a-b", "ab", "silo-co"):
        assert get_json(plane, "namespace", f"tenant-{name}") is not None
        assert get_json(plane, "secret", runtime_record.secret_name(name), "-n",
                        RUNTIME_NAMESPACE) is not None

    # The runtime knows each key as its own tenant (`a-b`'s is not `ab`'s) ...
    for name in ("acme-corp", "a-b", "ab"):
        wait_served(kube_runtime_server, keys_of(plane, name)["app"], name)
    # ... and answers the pool tenant's request, metered under its id. (A bridge tenant's
    # login points at the in-cluster host of the shared Postgres, which this test process
    # cannot resolve: its requests are answered 503, database unreachable.)
    client = anthropic.Anthropic(base_url=kube_runtime_server.url,
                                 api_key=keys_of(plane, "acme-corp")["app"], max_retries=0)
    reply = client.messages.create(model="claude-sonnet-4-6", max_tokens=16,
                                   messages=[{"role": "user", "content": "hello"}])
    assert reply.content[0].type == "text"
    wait_for_metered(shared_database, str(reply._request_id), "acme-corp")

    for name in ("acme-corp", "a-b", "ab", "silo-co"):
        delete_tenant(plane, name)
    with psycopg.connect(shared_database, autocommit=True) as conn:
        assert scalar(conn, "SELECT count(*) FROM tenantry.tenants WHERE tenant_id = ANY(%s)",
                      (["acme-corp", "a-b", "ab", "silo-co"],)) == 0


def wait_for_metered(dsn: str, request_id: str, tenant: str) -> None:
    def row() -> Any:
        with psycopg.connect(dsn, autocommit=True) as conn:
            return conn.execute("SELECT tenant_id FROM tenantry.ai_usage_logs"
                                " WHERE request_id = %s", (request_id,)).fetchone()

    assert wait_for(f"usage of {request_id}", row, 30)[0] == tenant


@pytest.mark.usefixtures("operator")
@pytest.mark.timeout(300)
def test_a_credential_copy_under_its_former_name_is_still_used_and_deleted(
        control_plane: ControlPlane) -> None:
    """Copies were `tenantry-<tenant>-<secret>` before ids took hyphens: one that carries the
    tenant's marks restores the password, a look-alike of another tenant is ignored."""
    plane, secret = control_plane, builders.TENANT_DB_SECRET

    def copy(name: str, tenant: str, password: str) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Secret", "metadata": {
            "name": name, "namespace": CREDENTIALS_NAMESPACE,
            "labels": {LABEL_MANAGED_BY: "tenantry-operator", LABEL_TENANT: tenant,
                       builders.CREDENTIAL_LABEL: secret}},
            "stringData": {"password": password}}

    plane.kubectl("create", "namespace", CREDENTIALS_NAMESPACE, check=False)
    legacy = builders.legacy_credentials_backup_name("oldcopy", secret)
    foreign = builders.legacy_credentials_backup_name("other", secret)
    plane.kubectl("apply", "-f", "-", input_text=json.dumps(
        {"apiVersion": "v1", "kind": "List", "items": [
            copy(legacy, "oldcopy", "kept-from-before"),
            copy(foreign, "someone-else", "not-yours")]}))
    apply_tenant(plane, "oldcopy", plan="pro", isolation="bridge", deletionPolicy="Delete")
    apply_tenant(plane, "other", plan="pro", isolation="bridge", deletionPolicy="Delete")
    wait_ready(plane, "oldcopy", timeout=120)
    wait_ready(plane, "other", timeout=120)

    def password(tenant: str) -> str:
        live = get_json(plane, "secret", secret, "-n", f"tenant-{tenant}") or {}
        return base64.b64decode(live["data"]["password"]).decode()

    assert password("oldcopy") == "kept-from-before"
    assert password("other") != "not-yours"
    for tenant in ("oldcopy", "other"):  # the copy is now kept under the new name
        assert get_json(plane, "secret", builders.credentials_backup_name(tenant, secret),
                        "-n", CREDENTIALS_NAMESPACE) is not None
    delete_tenant(plane, "oldcopy")
    delete_tenant(plane, "other")
    assert get_json(plane, "secret", legacy, "-n", CREDENTIALS_NAMESPACE) is None
    # Not the tenant's (its marks name someone else): left alone.
    assert get_json(plane, "secret", foreign, "-n", CREDENTIALS_NAMESPACE) is not None
    plane.kubectl("delete", "secret", foreign, "-n", CREDENTIALS_NAMESPACE)
