"""Tenant API keys: format, hashing and the constant-time check (no I/O)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import UTC, datetime

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

KEY_PREFIX = "sk-tnt-"
_KEY = re.compile(r"^sk-tnt-(?P<prefix>[a-z0-9]{12})-(?P<secret>[A-Za-z0-9_-]{32,128})$")


class ApiKeyRecord(BaseModel):
    """What the runtime holds of a key: never the key itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=63)
    prefix: str = Field(pattern=r"^[a-z0-9]{12}$", description="Public lookup part of the key.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the whole key, hex.")
    expires_at: AwareDatetime | None = None


def generate_key() -> tuple[str, str]:
    """A new key and its prefix: `sk-tnt-<12 lowercase>-<secret>`."""
    prefix = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
    return f"{KEY_PREFIX}{prefix}-{secrets.token_urlsafe(32)}", prefix


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def record_for(key: str, name: str, expires_at: datetime | None = None) -> ApiKeyRecord:
    prefix = prefix_of(key)
    if prefix is None:
        raise ValueError("not a tenant key")
    return ApiKeyRecord(name=name, prefix=prefix, sha256=hash_key(key), expires_at=expires_at)


def prefix_of(key: str) -> str | None:
    """The lookup prefix of a well-formed key, else None."""
    match = _KEY.match(key)
    return match.group("prefix") if match else None


def key_matches(key: str, record: ApiKeyRecord, now: datetime | None = None) -> bool:
    """Constant-time hash comparison, and the key has not expired at `now`."""
    if not hmac.compare_digest(hash_key(key), record.sha256):
        return False
    if record.expires_at is None:
        return True
    return (now or datetime.now(UTC)) < record.expires_at
