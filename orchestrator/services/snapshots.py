"""The one read every pipeline step starts with: the fields of a job a step needs, in one select
(a plain Core select on a single connection: no ORM identity map on the hot path)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from orchestrator.clock import as_utc
from orchestrator.db.engine import single_statement
from orchestrator.db.models import JOBS, Job
from orchestrator.domain import JobStatus


@dataclass(frozen=True)
class Snapshot:
    """The fields a step needs, read in one select."""

    id: uuid.UUID
    status: JobStatus
    attempt: int
    max_attempts: int
    kind: str
    queue: str
    spec: dict[str, Any]
    requirements: dict[str, Any]
    timeout_seconds: int
    provider: str | None
    placement: dict[str, Any] | None
    excluded_offers: list[str]
    run_handle: dict[str, Any] | None
    released_at: datetime | None
    started_at: datetime | None
    created_at: datetime | None
    error: str | None
    tenant_id: uuid.UUID
    reservation_id: uuid.UUID | None
    report: dict[str, Any] | None
    use_reservation_id: uuid.UUID | None
    pair_id: uuid.UUID | None
    labels: dict[str, Any]
    restarts: int
    lost_seconds: float
    claimed_at: datetime | None


_T = JOBS.c
_COLUMNS = (
    Job.id,
    Job.status,
    Job.attempt,
    Job.max_attempts,
    Job.kind,
    Job.queue,
    Job.spec,
    Job.requirements,
    Job.timeout_seconds,
    Job.provider,
    Job.placement,
    Job.excluded_offers,
    Job.run_handle,
    Job.released_at,
    Job.started_at,
    Job.created_at,
    Job.error,
    Job.tenant_id,
    Job.reservation_id,
    Job.report,
    Job.use_reservation_id,
    Job.pair_id,
    Job.labels,
    Job.restarts,
    Job.lost_seconds,
    Job.claimed_at,
)


def snapshot(job_id: uuid.UUID) -> Snapshot | None:
    with single_statement() as conn:
        row = conn.execute(select(*(_T[c.key] for c in _COLUMNS)).where(_T.id == job_id)).first()
    if row is None:
        return None
    values = row._asdict()
    values.update(
        status=JobStatus(row.status),
        excluded_offers=list(row.excluded_offers or []),
        released_at=as_utc(row.released_at),
        started_at=as_utc(row.started_at),
        created_at=as_utc(row.created_at),
        claimed_at=as_utc(row.claimed_at),
    )
    return Snapshot(**values)
