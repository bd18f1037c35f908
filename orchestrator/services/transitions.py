"""The job state machine. Every change of status is one guarded UPDATE plus its event.

The guard (id, expected status, attempt) is what makes duplicate and late Celery
messages harmless: the second one finds no row to update and stops.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.orm import Session

from orchestrator.clock import utcnow
from orchestrator.db.engine import rows_changed, session_scope
from orchestrator.db.models import JOB_EVENTS, JOBS
from orchestrator.domain import JobStatus
from orchestrator.errors import InvalidTransition

S = JobStatus
ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    S.queued: frozenset({S.placing, S.cancelled, S.failed}),
    S.placing: frozenset({S.running, S.queued, S.failed, S.cancelled}),
    S.running: frozenset({S.succeeded, S.failed, S.cancelled, S.queued}),
    S.succeeded: frozenset(),
    S.failed: frozenset(),
    S.cancelled: frozenset(),
}


def check_allowed(current: JobStatus, to: JobStatus) -> None:
    if to not in ALLOWED[current]:
        raise InvalidTransition(f"a job cannot go from {current.value} to {to.value}")


def transition(
    session: Session,
    job_id: uuid.UUID,
    *,
    expected: JobStatus,
    attempt: int,
    to: JobStatus,
    actor: str,
    reason: str = "",
    values: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
) -> bool:
    """Move the job if it is still ``expected`` at ``attempt``. False means someone else moved it first."""
    check_allowed(expected, to)
    now = utcnow()
    fields = dict(values or {})
    if to.terminal:
        fields.setdefault("finished_at", now)
    guarded = (
        update(JOBS)
        .where(JOBS.c.id == job_id, JOBS.c.status == expected.value, JOBS.c.attempt == attempt)
        .values(status=to.value, updated_at=now, **fields)
    )
    if rows_changed(session.execute(guarded)) != 1:
        return False
    record_event(session, job_id, expected, to, fields.get("attempt", attempt), actor, reason, data)
    return True


def advance(job_id: uuid.UUID, **kwargs: Any) -> bool:
    """``transition`` in a transaction of its own: each pipeline step moves the job once."""
    with session_scope() as s:
        return transition(s, job_id, **kwargs)


def record_event(
    session: Session,
    job_id: uuid.UUID,
    from_status: JobStatus | None,
    to: JobStatus,
    attempt: int,
    actor: str,
    reason: str,
    data: dict[str, Any] | None = None,
) -> None:
    session.execute(insert(JOB_EVENTS).values(
        job_id=job_id, at=utcnow(), from_status=from_status.value if from_status else None, to_status=to.value,
        attempt=attempt, actor=actor, reason=reason, data=data))
