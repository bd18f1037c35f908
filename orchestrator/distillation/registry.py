"""The model registry: trained student versions and their stages.

A name has versions 1, 2, …; at most one is in ``production`` at a time. Promoting archives the
current production version; rolling back restores the most recently archived former production
version. Traffic shifting reads the production version of a student name.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from orchestrator.clock import utcnow
from orchestrator.db.models import ModelVersion
from orchestrator.errors import Conflict, NotFound

STAGING, PRODUCTION, ARCHIVED = "staging", "production", "archived"


def register(session: Session, tenant_id: uuid.UUID, name: str, *, artifact_uri: str | None, served_model: str | None,
             metrics: dict[str, Any] | None = None, params: dict[str, Any] | None = None,
             training_job_id: uuid.UUID | None = None) -> ModelVersion:
    """The name's next version, in ``staging``. Two registrations racing for the same number: the unique
    (tenant, name, version) constraint refuses one, which takes the number after."""
    for _ in range(5):
        latest = session.scalar(select(func.max(ModelVersion.version)).where(
            ModelVersion.tenant_id == tenant_id, ModelVersion.name == name)) or 0
        version = ModelVersion(id=uuid.uuid4(), tenant_id=tenant_id, name=name, version=latest + 1, stage=STAGING,
                               artifact_uri=artifact_uri, served_model=served_model, metrics=metrics or {},
                               params=params or {}, training_job_id=training_job_id, created_at=utcnow())
        try:
            with session.begin_nested():
                session.add(version)
                session.flush()
            return version
        except IntegrityError:
            continue
    raise Conflict(f"could not register a new version of {name}: too many concurrent registrations")


def get(session: Session, tenant_id: uuid.UUID, name: str, version: int) -> ModelVersion:
    found = session.scalar(select(ModelVersion).where(ModelVersion.tenant_id == tenant_id, ModelVersion.name == name,
                                                      ModelVersion.version == version))
    if found is None:
        raise NotFound(f"model {name} version {version} not found")
    return found


def versions(session: Session, tenant_id: uuid.UUID, name: str | None = None) -> list[ModelVersion]:
    q = select(ModelVersion).where(ModelVersion.tenant_id == tenant_id)
    if name:
        q = q.where(ModelVersion.name == name)
    return list(session.scalars(q.order_by(ModelVersion.name, ModelVersion.version)))


def production(session: Session, tenant_id: uuid.UUID, name: str) -> ModelVersion | None:
    return session.scalar(select(ModelVersion).where(ModelVersion.tenant_id == tenant_id, ModelVersion.name == name,
                                                     ModelVersion.stage == PRODUCTION))


def promote(session: Session, tenant_id: uuid.UUID, name: str, version: int) -> ModelVersion:
    target = get(session, tenant_id, name, version)
    if target.stage == PRODUCTION:
        return target
    session.execute(update(ModelVersion).where(ModelVersion.tenant_id == tenant_id, ModelVersion.name == name,
                                               ModelVersion.stage == PRODUCTION).values(stage=ARCHIVED))
    target.stage, target.promoted_at = PRODUCTION, utcnow()
    session.flush()
    return target


def rollback(session: Session, tenant_id: uuid.UUID, name: str) -> ModelVersion:
    """Production goes back to the version that was in production before it."""
    current = production(session, tenant_id, name)
    previous = session.scalar(select(ModelVersion).where(
        ModelVersion.tenant_id == tenant_id, ModelVersion.name == name, ModelVersion.stage == ARCHIVED,
        ModelVersion.promoted_at.is_not(None), ModelVersion.id != (current.id if current else None))
        .order_by(ModelVersion.promoted_at.desc()).limit(1))
    if previous is None:
        raise Conflict(f"model {name} has no earlier production version to roll back to")
    if current is not None:
        current.stage = ARCHIVED
    previous.stage, previous.promoted_at = PRODUCTION, utcnow()
    session.flush()
    return previous


def set_metrics(session: Session, version_id: uuid.UUID, metrics: dict[str, Any]) -> None:
    row = session.get(ModelVersion, version_id)
    if row is not None:
        row.metrics = {**(row.metrics or {}), **metrics}
