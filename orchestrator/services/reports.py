"""Outcomes reported by runs on rented instances (the callback the instance wrapper calls).

The caller proves itself with the job-scoped token it was started with; only the token's hash
is stored. A report is kept for the attempt that is running, so a late report from an old
attempt's instance cannot finish a newer attempt.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, update

from orchestrator.db.engine import rows_changed, session_scope
from orchestrator.db.models import Job
from orchestrator.domain import JobStatus
from orchestrator.errors import Conflict, NotFound


class RunReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: Literal["succeeded", "failed"]
    result: dict[str, Any] | None = None
    error: str | None = Field(default=None, max_length=4000)


class BadToken(Exception):
    pass


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def accept(job_id: uuid.UUID, token: str, report: RunReport) -> tuple[str, int]:
    """Store the report on the running attempt; returns (provider, attempt) so the caller can poll now."""
    digest = token_hash(token)
    with session_scope() as s:
        row = s.execute(select(Job.status, Job.attempt, Job.provider, Job.callback_token_hash)
                        .where(Job.id == job_id)).first()
        if row is None:
            raise NotFound(f"job {job_id} not found")
        if not row.callback_token_hash or not hmac.compare_digest(row.callback_token_hash, digest):
            raise BadToken()
        if row.status != JobStatus.running.value:
            raise Conflict(f"job {job_id} is {row.status}, not running")
        stored = rows_changed(s.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.running.value, Job.attempt == row.attempt,
                              Job.callback_token_hash == digest)
            .values(report={**report.model_dump(mode="json"), "attempt": row.attempt})))
        if not stored:
            raise Conflict(f"job {job_id} moved on; report not needed")
        return row.provider or "", row.attempt
