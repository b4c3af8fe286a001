"""Pure parts of tenant API keys: issuing, the runtime record contract on both sides, and the
runtime's Kubernetes source applying Secrets to the store (no server needed)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict
from pydantic import SecretStr
from runtime_helpers import tenant_config
from tenantry_operator import builders
from tenantry_operator.model import TenantSpec
from tenantry_runtime.api_keys import generate_key, prefix_of, record_for
from tenantry_runtime.contracts import runtime_record
from tenantry_runtime.kube_source import KubeSource
from tenantry_runtime.store import Outcome, TenantRecord, TenantStore, parse_record


def new_key() -> str:
    return generate_key()[0]


def test_existing_keys_are_kept_and_only_missing_or_malformed_ones_are_issued() -> None:
    kept = new_key()
    keys, issued = builders.issue_api_keys(
        ["kept", "missing", "malformed"], {"kept": kept, "malformed": "hunter2", "gone": kept},
        new_key)
    assert keys["kept"] == kept
    assert issued == ["missing", "malformed"]
    assert set(keys) == {"kept", "missing", "malformed"}  # a removed name's key is dropped
    assert all(prefix_of(keys[n]) is not None for n in issued)
    assert keys["missing"] != keys["malformed"]


def test_keys_secret_holds_one_data_key_per_name_in_base64() -> None:
    key = new_key()
    secret = builders.api_keys_secret("acme", "tenant-acme", {"app": key})
    assert secret["metadata"]["name"] == "tenantry-api-keys"
    assert secret["metadata"]["labels"]["tenantry.dev/tenant"] == "acme"
    assert base64.b64decode(secret["data"]["app"]).decode() == key
    assert "stringData" not in secret
    assert builders.api_keys_secret("acme", "tenant-acme", {})["data"] == {}


def test_api_keys_parse_from_the_tenant_spec() -> None:
    spec = TenantSpec.from_body({"planRef": {"name": "pro"}, "apiKeys": [
        {"name": "app"}, {"name": "ci", "expiresAt": "2030-01-31T12:00:00+01:00"}]})
    assert [k.name for k in spec.api_keys] == ["app", "ci"]
    assert spec.api_keys[0].expires_at is None
    assert spec.api_keys[1].expires_at == datetime(2030, 1, 31, 11, tzinfo=UTC)


@pytest.mark.parametrize("password", ["plain", "with space", "qu'ote", "back\\slash", "a@b:c/d?"])
def test_login_dsn_quotes_every_field(password: str) -> None:
    dsn = builders.login_dsn({"host": "pg.tenant-a.svc:6543", "username": "tenant_a",
                              "password": password, "database": "tenantry"})
    assert conninfo_to_dict(dsn) == {"host": "pg.tenant-a.svc", "port": "6543",
                                     "user": "tenant_a", "password": password,
                                     "dbname": "tenantry"}
    no_port = builders.login_dsn({"host": "pg", "username": "u", "password": password,
                                  "database": "d"})
    assert conninfo_to_dict(no_port)["port"] == "5432"


def test_secret_differs_on_data_type_and_labels_only() -> None:
    manifest = builders.api_keys_secret("acme", "tenant-acme", {"app": new_key()})
    live: dict[str, Any] = {"metadata": {"labels": {**manifest["metadata"]["labels"],
                                                    "extra": "x"}, "resourceVersion": "7"},
                            "type": "Opaque", "data": dict(manifest["data"])}
    assert not builders.secret_differs(live, manifest)
    assert builders.secret_differs(None, manifest)
    assert builders.secret_differs({**live, "data": {}}, manifest)
    assert builders.secret_differs({**live, "metadata": {"labels": {}}}, manifest)


def test_key_issue_times_survive_reconciles_and_reset_for_a_new_key() -> None:
    web, batch = record_for(new_key(), "web"), record_for(new_key(), "batch")
    first = builders.key_issue_times(None, [web], "2026-11-01T00:00:00+00:00")
    manifest = builders.runtime_record_secret("acme", "rt", "{}", first)
    assert not builders.secret_differs(manifest, manifest)
    later = builders.key_issue_times(manifest, [web, batch], "2026-11-02T00:00:00+00:00")
    assert later == {"web": {"prefix": web.prefix, "at": "2026-11-01T00:00:00+00:00"},
                     "batch": {"prefix": batch.prefix, "at": "2026-11-02T00:00:00+00:00"}}
    assert builders.secret_differs(manifest, builders.runtime_record_secret(
        "acme", "rt", "{}", later))
    reissued = record_for(new_key(), "web")  # same name, new key: a new issue time
    assert builders.key_issue_times(manifest, [reissued], "2026-11-03T00:00:00+00:00")[
        "web"]["at"] == "2026-11-03T00:00:00+00:00"
    broken = {"metadata": {"annotations": {runtime_record.ANNOTATION_KEYS_ISSUED: "{nope"}}}
    assert builders.key_issue_times(broken, [web], "t")["web"]["at"] == "t"


def record(tenant: str, revision: int = 1, **fields: Any) -> TenantRecord:
    return TenantRecord(config=tenant_config(tenant, revision=revision), **fields)


def record_secret(rec: TenantRecord, name: str | None = None) -> dict[str, Any]:
    """The Secret exactly as the operator builds it."""
    tenant = rec.config.tenant
    secret = builders.runtime_record_secret(tenant, "rt", runtime_record.record_json(rec))
    if name is not None:
        secret["metadata"]["name"] = name
    return secret


def test_record_payload_reveals_its_secrets_and_round_trips() -> None:
    key = new_key()
    rec = record("acme", api_keys=(record_for(key, "app", datetime(2030, 1, 1, tzinfo=UTC)),),
                 endpoint_api_key=SecretStr("ep-key"), database_dsn=SecretStr("host=pg"))
    payload = runtime_record.record_json(rec)
    data = json.loads(payload)
    assert data["endpoint_api_key"] == "ep-key" and data["database_dsn"] == "host=pg"
    assert key not in payload
    assert parse_record(payload.encode()) == rec
    assert payload == runtime_record.record_json(parse_record(payload.encode()))  # stable
    secret = record_secret(rec)
    assert secret["metadata"]["name"] == "tenantry-tenant-acme"
    assert secret["metadata"]["labels"][runtime_record.LABEL_RECORD] == "v1"


def source() -> KubeSource:
    return KubeSource("rt", TenantStore())


def test_source_applies_the_operators_secret_and_authenticates_its_key() -> None:
    src, key = source(), new_key()
    rec = record("acme", api_keys=(record_for(key, "app"),))
    assert src.apply_secret(record_secret(rec)) is Outcome.APPLIED
    caller = src.store.authenticate(key)
    assert caller is not None and caller.config.tenant == "acme" and caller.key_name == "app"


def test_source_refuses_bad_secrets_and_keeps_the_last_good_record() -> None:
    src = source()
    good = record("acme", revision=5)
    src.apply_secret(record_secret(good))
    bad_json = record_secret(good)
    bad_json["data"][runtime_record.DATA_KEY] = base64.b64encode(b"{not json").decode()
    not_base64 = record_secret(good)
    not_base64["data"][runtime_record.DATA_KEY] = "%%%"
    no_data = {**record_secret(good), "data": {}}
    other_tenant = record_secret(record("other", revision=9), name="tenantry-tenant-acme")
    wrong_label = record_secret(record("acme", revision=9))
    wrong_label["metadata"]["labels"][runtime_record.LABEL_TENANT] = "other"
    for secret in (bad_json, not_base64, no_data, other_tenant, wrong_label):
        assert src.apply_secret(secret) is Outcome.REFUSED
    assert src.store.refused["invalid"] == 5
    assert src.store.get("acme") == good
    assert src.store.tenants() == ["acme"]


def test_source_ignores_a_stale_revision_and_foreign_names() -> None:
    src = source()
    src.apply_secret(record_secret(record("acme", revision=5)))
    assert src.apply_secret(record_secret(record("acme", revision=4))) is Outcome.STALE
    assert src.apply_secret(record_secret(record("acme", revision=5))) is Outcome.UNCHANGED
    foreign = record_secret(record("acme", revision=6), name="some-other-secret")
    assert src.apply_secret(foreign) is None
    assert src.store.get("acme") == record("acme", revision=5)


def test_watch_events_and_a_relist_add_change_and_remove_tenants() -> None:
    src, key = source(), new_key()
    with_key = record("acme", revision=2, api_keys=(record_for(key, "app"),))
    src.on_event("ADDED", record_secret(record("acme")))
    src.on_event("MODIFIED", record_secret(with_key))
    assert src.store.authenticate(key) is not None
    src.on_event("BOOKMARK", record_secret(record("acme", revision=3)))  # not a change
    assert src.store.get("acme") == with_key
    src.on_event("DELETED", record_secret(with_key))
    assert src.store.get("acme") is None and src.store.authenticate(key) is None
    # A relist is the whole truth: tenants without a Secret go, invalid ones keep their record.
    src.replace_all([record_secret(record("acme")), record_secret(record("beta"))])
    assert src.store.tenants() == ["acme", "beta"] and src.store.loaded
    broken = record_secret(record("beta", revision=2))
    broken["data"] = {}
    src.replace_all([broken])
    assert src.store.tenants() == ["beta"]
    assert src.store.get("beta") == record("beta")


def test_expiry_is_checked_on_every_request() -> None:
    src, key = source(), new_key()
    soon = datetime.now(UTC) + timedelta(seconds=30)
    src.apply_secret(record_secret(record("acme", api_keys=(record_for(key, "app", soon),))))
    assert src.store.authenticate(key) is not None
    assert src.store.authenticate(key, now=soon) is None
