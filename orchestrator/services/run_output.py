"""What a run prints, kept as it arrives: its logs, and the checkpoints it announces in them.

One convention for every provider: a run reports a checkpoint by printing a line
``GPUFLEET_CHECKPOINT {"step": 1200, "uri": "s3://…/step-1200"}`` once the checkpoint is
fully written. Output reaches us either from the instance wrapper (rented instances POST it
with the job-scoped token) or from the poller (runs on this machine's disk), so checkpoints
are recorded the same way wherever the job runs — and a redelivered chunk records nothing twice.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy import insert as insert_rows
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from orchestrator.clock import as_utc, utcnow
from orchestrator.db.engine import delete_in_batches, session_scope
from orchestrator.db.models import Job, JobCheckpoint, JobLog
from orchestrator.settings import get_settings

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "GPUFLEET_CHECKPOINT "
MAX_CHUNK = 64_000  # characters kept per chunk; a run printing megabytes at once keeps its tail
STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    uri: str
    attempt: int
    reported_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "uri": self.uri, "attempt": self.attempt,
                "reported_at": as_utc(self.reported_at).isoformat()}  # type: ignore[union-attr]


def parse_checkpoints(text: str) -> list[tuple[int, str]]:
    """(step, uri) of every well-formed checkpoint line; a malformed one is logged and skipped, since
    a typo in a user's print must not fail their run."""
    found = []
    for line in text.splitlines():
        if not line.startswith(CHECKPOINT_PREFIX):
            continue
        try:
            body = json.loads(line[len(CHECKPOINT_PREFIX):])
            step, uri = int(body["step"]), str(body["uri"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed checkpoint line: %.200s", line)
            continue
        if step >= 0 and uri:
            found.append((step, uri))
    return found


def append(session: Session, job_id: uuid.UUID, attempt: int, chunks: list[tuple[str, str]]) -> list[int]:
    """Store output chunks ``[(stream, text)]`` in order and record the checkpoints they announce;
    returns the steps recorded. Past the per-job limit the text is dropped (once, with a note), but
    checkpoint lines are still recorded: a run's progress matters more than its chatter."""
    # Postgres text cannot hold NUL; a chunk keeps its end (the latest lines) when it is too long.
    chunks = [(stream, text.replace("\x00", "")) for stream, text in chunks]
    rows: list[dict[str, Any]] = [
        {"job_id": job_id, "attempt": attempt, "stream": stream if stream in STREAMS else "stdout",
         "text": text[-MAX_CHUNK:]} for stream, text in chunks if text]
    if not rows:
        return []
    limit = get_settings().max_log_chars_per_job
    size = sum(len(str(r["text"])) for r in rows)
    total = session.scalar(update(Job).where(Job.id == job_id).values(log_chars=Job.log_chars + size)
                           .returning(Job.log_chars)) or 0
    kept = total - size
    if kept < limit:
        if total >= limit:
            rows.append({"job_id": job_id, "attempt": attempt, "stream": "stderr",
                         "text": f"[gpufleet] this job's output passed {limit:,} characters: the rest is not kept\n"})
        session.execute(insert_rows(JobLog), rows)
    steps = []
    for stream, text in chunks:
        if stream == "stdout":
            for step, uri in parse_checkpoints(text):
                record_checkpoint(session, job_id, attempt, step, uri)
                steps.append(step)
    return steps


def record_checkpoint(session: Session, job_id: uuid.UUID, attempt: int, step: int, uri: str) -> None:
    """Idempotent per (job, step): the first report of a step stands."""
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    session.execute(insert(JobCheckpoint).values(job_id=job_id, attempt=attempt, step=step, uri=uri)
                    .on_conflict_do_nothing(index_elements=["job_id", "step"]))


def latest_checkpoint(session: Session, job_id: uuid.UUID) -> Checkpoint | None:
    row = session.scalars(select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)
                          .order_by(JobCheckpoint.step.desc()).limit(1)).first()
    return Checkpoint(row.step, row.uri, row.attempt, row.reported_at) if row else None


def checkpoints(job_id: uuid.UUID) -> list[Checkpoint]:
    with session_scope() as s:
        return [Checkpoint(r.step, r.uri, r.attempt, r.reported_at) for r in s.scalars(
            select(JobCheckpoint).where(JobCheckpoint.job_id == job_id).order_by(JobCheckpoint.step))]


def last_progress_at(session: Session, job_id: uuid.UUID, attempt: int) -> datetime | None:
    """When this attempt last saved its work (None: it never did), to measure what a lost run cost."""
    return session.scalar(select(func.max(JobCheckpoint.reported_at))
                          .where(JobCheckpoint.job_id == job_id, JobCheckpoint.attempt == attempt))


def read(job_id: uuid.UUID, after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
    """Chunks after the id ``after``, oldest first: a follower passes the last id it saw."""
    with session_scope() as s:
        return [{"id": r.id, "attempt": r.attempt, "stream": r.stream, "text": r.text,
                 "at": as_utc(r.at).isoformat()}  # type: ignore[union-attr]
                for r in s.scalars(select(JobLog).where(JobLog.job_id == job_id, JobLog.id > after)
                                   .order_by(JobLog.id).limit(limit))]


def prune(batch: int = 5000) -> int:
    """Delete output older than the retention; returns how many chunks went."""
    cutoff = utcnow() - timedelta(days=get_settings().log_retention_days)
    return delete_in_batches(JobLog.id, JobLog.at < cutoff, batch=batch)
