"""Tenants and API keys. Keys are shown once at creation and stored only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.clock import utcnow
from orchestrator.db.models import ApiKey, Tenant
from orchestrator.errors import NotFound

KEY_PREFIX = "gf_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyInfo:
    id: uuid.UUID
    tenant: str
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name, created_at=utcnow())
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, tenant_name: str, name: str = "", key: str | None = None) -> str:
    """Create a key for the tenant (created if new) and return the key itself — the only time it is visible."""
    tenant = get_or_create_tenant(session, tenant_name)
    key = key or KEY_PREFIX + secrets.token_urlsafe(32)
    existing = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if existing is None:
        session.add(ApiKey(tenant_id=tenant.id, name=name, prefix=key[:10], key_hash=hash_key(key), created_at=utcnow()))
        session.flush()
    return key


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    return session.scalar(
        select(Tenant).join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )


def list_keys(session: Session, tenant_name: str | None = None) -> list[KeyInfo]:
    query = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id).order_by(ApiKey.created_at)
    if tenant_name:
        query = query.where(Tenant.name == tenant_name)
    return [KeyInfo(k.id, t, k.name, k.prefix, k.created_at, k.revoked_at) for k, t in session.execute(query)]


def revoke_key(session: Session, key_id_or_prefix: str) -> KeyInfo:
    query = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id)
    try:
        rows = session.execute(query.where(ApiKey.id == uuid.UUID(key_id_or_prefix))).all()
    except ValueError:
        rows = session.execute(query.where(ApiKey.prefix == key_id_or_prefix[:10])).all()
    if len(rows) != 1:
        raise NotFound(f"no single API key matches {key_id_or_prefix!r}")
    key, tenant = rows[0]
    key.revoked_at = key.revoked_at or utcnow()
    return KeyInfo(key.id, tenant, key.name, key.prefix, key.created_at, key.revoked_at)


def bootstrap(session: Session, entries: list[str]) -> None:
    """Create the ``tenant:key`` pairs from settings, so a fresh stack is usable at once."""
    for entry in entries:
        tenant, _, key = entry.partition(":")
        create_key(session, tenant, name="bootstrap", key=key)
