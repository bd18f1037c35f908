"""The outbox sweeper: re-drives jobs whose next step is overdue.

The broker is a doorbell, so any message may be lost (Redis flushed, a worker killed
between ack and commit). Every non-terminal job carries ``next_check_at``; when that
is past, the sweeper publishes the message the job is waiting for. Duplicates are
harmless because every step is a guarded update.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update

from orchestrator.clock import utcnow
from orchestrator.db.engine import rows_changed, session_scope
from orchestrator.db.models import Job
from orchestrator.domain import TERMINAL, JobStatus
from orchestrator.scheduling.queues import provider_queue
from orchestrator.services import messaging, reservation_requests, reservations
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
            select(Job.id, Job.status, Job.attempt, Job.queue, Job.provider, Job.run_handle, Job.reservation_id,
                   Job.excluded_offers, Job.offer_id, Job.use_reservation_id)
            .where(or_(
                and_(Job.status.in_([S.queued.value, S.placing.value, S.running.value]), Job.next_check_at < now),
                and_(Job.status.in_([t.value for t in TERMINAL]), Job.reservation_id.is_not(None),
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
                # The executor died between claiming the job and recording its run. Whatever it may have
                # rented carries the reservation's label: release that reservation (found by label), and
                # place the job again away from the offer it was starting on.
                excluded = [*(row.excluded_offers or []), f"{row.provider}/{row.offer_id}"]
                values: dict[str, object] = {"attempt": row.attempt + 1, "excluded_offers": excluded}
                if row.reservation_id and row.use_reservation_id:  # bound to a warm pool's member for that attempt
                    values.update(use_reservation_id=None, claimed_at=None)
                transition(s, row.id, expected=S.running, attempt=row.attempt, to=S.queued, actor=ACTOR,
                           reason="the executor was lost before the run was recorded; retrying elsewhere",
                           values=values)
                if row.reservation_id:
                    outbox.append((messaging.RELEASE_RESERVATION, [str(row.reservation_id)], provider_queue(row.provider)))
                outbox.append((messaging.DISPATCH, [str(row.id), row.attempt + 1], row.queue))
                done["dispatch"] += 1
    outbox += _overdue_reservations(now, done)
    for task, args, queue in outbox:
        messaging.send(task, args, queue)
    if done:
        log.info("sweeper re-published %s", dict(done))
    return done


def _overdue_reservations(now: datetime, done: Counter[str]) -> list[tuple[str, list[object], str]]:
    """Reservations nobody is advancing: releases to retry, and job capacity whose job has moved on."""
    settings = get_settings()
    out: list[tuple[str, list[object], str]] = []
    rows = reservations.overdue(now)
    if not rows:
        return out
    job_ids = {r.job_id for r in rows if r.job_id}
    with session_scope() as s:
        jobs = {j.id: j for j in s.execute(select(Job.id, Job.status, Job.attempt, Job.reservation_id)
                                              .where(Job.id.in_(job_ids)))} if job_ids else {}
    reservations.bump([row.id for row in rows], settings.sweep_grace_seconds)
    for row in rows:
        if row.job_id is None:  # a standalone reservation: send the step it waits for
            step = reservation_requests.redrive(row)
            if step:
                out.append(step)
                done["reservation"] += 1
            continue
        job = jobs.get(row.job_id) if row.job_id else None
        abandoned = row.job_id is not None and (
            job is None or S(job.status).terminal or job.reservation_id != row.id or job.attempt != row.job_attempt)
        if row.state == reservations.RELEASING or abandoned:
            out.append((messaging.RELEASE_RESERVATION, [str(row.id)], provider_queue(row.provider or "none")))
            done["release_reservation"] += 1
    return out
