"""What runs on rented instances report (the callbacks the instance wrapper calls): their output as it
comes, and their outcome.

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
from orchestrator.services import run_output


class RunReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: Literal["succeeded", "failed"]
    result: dict[str, Any] | None = None
    error: str | None = Field(default=None, max_length=4000)


class BadToken(Exception):
    pass


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class OutputChunk(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stream: Literal["stdout", "stderr"] = "stdout"
    # Longer chunks are accepted and cut to their end when kept: refusing one would lose the checkpoint
    # lines in it (the body as a whole is bounded by the API's payload limit).
    text: str


class RunOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    chunks: list[OutputChunk] = Field(min_length=1, max_length=1000)


def _running_attempt(s: Any, job_id: uuid.UUID, digest: str) -> Any:
    """The job's row if the token is this attempt's and the job is running."""
    row = s.execute(select(Job.status, Job.attempt, Job.provider, Job.callback_token_hash)
                    .where(Job.id == job_id)).first()
    if row is None:
        raise NotFound(f"job {job_id} not found")
    if not row.callback_token_hash or not hmac.compare_digest(row.callback_token_hash, digest):
        raise BadToken()
    if row.status != JobStatus.running.value:
        raise Conflict(f"job {job_id} is {row.status}, not running")
    return row


def accept_output(job_id: uuid.UUID, token: str, output: RunOutput) -> list[int]:
    """Keep the run's output and the checkpoints it announces; returns the steps recorded."""
    with session_scope() as s:
        row = _running_attempt(s, job_id, token_hash(token))
        return run_output.append(s, job_id, row.attempt, [(c.stream, c.text) for c in output.chunks])


def accept(job_id: uuid.UUID, token: str, report: RunReport) -> tuple[str, int]:
    """Store the report on the running attempt; returns (provider, attempt) so the caller can poll now."""
    digest = token_hash(token)
    with session_scope() as s:
        row = _running_attempt(s, job_id, digest)
        stored = rows_changed(s.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.running.value, Job.attempt == row.attempt,
                              Job.callback_token_hash == digest)
            .values(report={**report.model_dump(mode="json"), "attempt": row.attempt})))
        if not stored:
            raise Conflict(f"job {job_id} moved on; report not needed")
        return row.provider or "", row.attempt
