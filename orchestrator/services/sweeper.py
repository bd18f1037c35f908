"""The outbox sweeper: re-drives jobs whose next step is overdue.

The broker is a doorbell, so any message may be lost (Redis flushed, a worker killed
between ack and commit). Every non-terminal job carries ``next_check_at``; when that
is past, the sweeper publishes the message the job is waiting for. Duplicates are
harmless because every step is a guarded update.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import timedelta

from sqlalchemy import and_, or_, select, update

from orchestrator.clock import utcnow
from orchestrator.db.engine import rows_changed, session_scope
from orchestrator.db.models import Job
from orchestrator.domain import TERMINAL, JobStatus
from orchestrator.scheduling.queues import provider_queue
from orchestrator.services import messaging
from orchestrator.services.transitions import transition
from orchestrator.settings import get_settings

log = logging.getLogger(__name__)
S = JobStatus
ACTOR = "sweeper"


def sweep(limit: int = 1000) -> Counter[str]:
    settings = get_settings()
    now = utcnow()
    later = now + timedelta(seconds=settings.sweep_grace_seconds)
    stale = now - timedelta(seconds=settings.sweep_grace_seconds)
    done: Counter[str] = Counter()
    with session_scope() as s:
        rows = s.execute(
            select(Job.id, Job.status, Job.attempt, Job.queue, Job.provider, Job.run_handle)
            .where(or_(
                and_(Job.status.in_([S.queued.value, S.placing.value, S.running.value]), Job.next_check_at < now),
                and_(Job.status.in_([t.value for t in TERMINAL]), Job.run_handle.is_not(None),
                     Job.released_at.is_(None), Job.updated_at < stale),
            ))
            .order_by(Job.next_check_at)
            .limit(limit)
        ).all()
    outbox: list[tuple[str, list[object], str]] = []
    for row in rows:
        status = S(row.status)
        with session_scope() as s:
            if status.terminal:
                outbox.append((messaging.RELEASE, [str(row.id)], provider_queue(row.provider)))
                s.execute(update(Job).where(Job.id == row.id).values(updated_at=now))
                done["release"] += 1
                continue
            bumped = rows_changed(s.execute(
                update(Job).where(Job.id == row.id, Job.status == row.status, Job.attempt == row.attempt)
                .values(next_check_at=later)
            ))
            if not bumped:
                continue
            if status == S.queued:
                outbox.append((messaging.DISPATCH, [str(row.id), row.attempt], row.queue))
                done["dispatch"] += 1
            elif status == S.placing:  # placed (dispatch writes the offer with the status)
                outbox.append((messaging.EXECUTE, [str(row.id), row.attempt], provider_queue(row.provider)))
                done["execute"] += 1
            elif row.run_handle:
                outbox.append((messaging.POLL, [str(row.id), row.attempt], provider_queue(row.provider)))
                done["poll"] += 1
            else:
                # The executor died between claiming the job and recording its run.
                transition(s, row.id, expected=S.running, attempt=row.attempt, to=S.queued, actor=ACTOR,
                           reason="the executor was lost before the run was recorded; retrying",
                           values={"attempt": row.attempt + 1})
                outbox.append((messaging.DISPATCH, [str(row.id), row.attempt + 1], row.queue))
                done["dispatch"] += 1
    for task, args, queue in outbox:
        messaging.send(task, args, queue)
    if done:
        log.info("sweeper re-published %s", dict(done))
    return done
