"""The work a job goes through after submission, one short step per Celery task.

dispatch  queued → placing: choose an offer, hand over to the provider's queue.
execute   placing → running: reserve capacity, start the run, poll once.
poll      running → succeeded | failed | queued (failover): re-scheduled until done.
release   give capacity back and settle its cost; idempotent, re-driven by the sweeper.

Slow provider calls happen outside transactions; every state change is a guarded
update, so a duplicated or late message changes nothing. Reads that decide whether a
step applies are plain selects; the guarded update that follows is the real check.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from orchestrator.clock import as_utc, utcnow
from orchestrator.db.engine import rows_changed, session_scope, single_statement
from orchestrator.db.models import JOBS, Job
from orchestrator.domain import JobStatus
from orchestrator.errors import CapacityBusy, NoPlacement
from orchestrator.scheduling.placement import offer_key, place
from orchestrator.scheduling.queues import provider_queue
from orchestrator.services import messaging
from orchestrator.services.transitions import advance, record_event
from orchestrator.settings import Settings, get_settings
from providers.base import (
    JobSpec,
    Lease,
    NotYetReleased,
    Offer,
    PermanentProviderError,
    Provider,
    ProviderError,
    Requirements,
    RunHandle,
    RunStatus,
    TransientProviderError,
)
from providers.registry import get_providers

log = logging.getLogger(__name__)

FIRST_POLL_DELAY = 0.25
MAX_POLL_DELAY = 5.0
CAPACITY_RETRY_SECONDS = 2.0
MAX_CAPACITY_RETRY_SECONDS = 30.0
S = JobStatus


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
    )
    return Snapshot(**values)


def _grace(settings: Settings, extra: float = 0.0) -> datetime:
    return utcnow() + timedelta(seconds=settings.sweep_grace_seconds + extra)


def _job_spec(job: Snapshot) -> JobSpec:
    return JobSpec(
        job_id=str(job.id),
        kind=job.kind,  # type: ignore[arg-type]
        attempt=job.attempt,
        spec=job.spec,
        timeout_seconds=job.timeout_seconds,
        env={"GPUFLEET_JOB_ID": str(job.id)},
    )


# --- dispatch -----------------------------------------------------------------------------


def dispatch(
    job_id: uuid.UUID, attempt: int, actor: str = "dispatcher", serves: Callable[[str], bool] = lambda queue: False
) -> None:
    """Place a queued job. ``serves(queue)`` says whether this worker also consumes the provider's
    queue; if so the execute step runs here at once instead of costing another broker round trip."""
    settings = get_settings()
    job = snapshot(job_id)
    if job is None or job.status != S.queued or job.attempt != attempt:
        return
    try:
        placement = place(
            get_providers(), job.kind, job.spec, Requirements(**job.requirements), job.timeout_seconds, set(job.excluded_offers)
        )
    except CapacityBusy as exc:
        _wait_for_capacity(job, str(exc), actor)
        return
    except NoPlacement as exc:
        history = f" after trying {', '.join(job.excluded_offers)}" if job.excluded_offers else ""
        advance(
            job_id,
            expected=S.queued,
            attempt=attempt,
            to=S.failed,
            actor=actor,
            reason=f"{exc}{history}",
            values={"error": f"{exc}{history}", "next_check_at": None},
        )
        return
    moved = advance(
        job_id,
        expected=S.queued,
        attempt=attempt,
        to=S.placing,
        actor=actor,
        reason=f"placed: {placement.rationale}",
        values={
            "provider": placement.provider,
            "offer_id": placement.offer.offer_id,
            "price_per_hour": placement.offer.price_per_hour,
            "placement": placement.model_dump(mode="json"),
            "next_check_at": _grace(settings),
        },
        data={"provider": placement.provider, "offer": placement.offer.offer_id, "estimated_cost": placement.estimated_cost},
    )
    if not moved:
        return
    queue = provider_queue(placement.provider)
    if serves(queue):
        execute(job_id, attempt)
    else:
        messaging.send(messaging.EXECUTE, [str(job_id), attempt], queue)


def _wait_for_capacity(job: Snapshot, reason: str, actor: str) -> None:
    """Everything that fits is busy: stay queued and place again shortly, until the job's timeout."""
    settings = get_settings()
    waited = (utcnow() - job.created_at).total_seconds() if job.created_at else 0.0
    if waited > job.timeout_seconds:
        advance(
            job.id,
            expected=S.queued,
            attempt=job.attempt,
            to=S.failed,
            actor=actor,
            reason=f"gave up waiting for capacity after {job.timeout_seconds}s: {reason}",
            values={"error": f"no capacity within {job.timeout_seconds}s: {reason}", "next_check_at": None},
        )
        return
    delay = min(MAX_CAPACITY_RETRY_SECONDS, CAPACITY_RETRY_SECONDS * (1 + waited / 10))
    note = f"waiting for capacity: {reason}"
    with session_scope() as s:
        moved = rows_changed(
            s.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == S.queued.value, Job.attempt == job.attempt)
                .values(next_check_at=_grace(settings, delay), error=note)
            )
        )
        if moved and job.error != note:  # one event when waiting starts, not one per retry
            record_event(s, job.id, S.queued, S.queued, job.attempt, actor, note)
    if moved:
        messaging.send(messaging.DISPATCH, [str(job.id), job.attempt], job.queue, countdown=delay)


# --- execute ------------------------------------------------------------------------------


def execute(job_id: uuid.UUID, attempt: int, actor: str = "executor") -> None:
    settings = get_settings()
    job = snapshot(job_id)
    if job is None or job.status != S.placing or job.attempt != attempt or not job.placement:
        return
    offer = Offer(**job.placement["offer"])
    provider = get_providers().get(job.provider or "")
    claimed = advance(
        job_id,
        expected=S.placing,
        attempt=attempt,
        to=S.running,
        actor=actor,
        reason=f"starting on {offer_key(offer)}",
        values={
            "started_at": utcnow(),
            "released_at": None,
            "run_handle": None,
            "next_check_at": _grace(settings, provider.start_timeout if provider else 0),
        },
    )
    if not claimed:
        return
    if provider is None:
        _fail(job, f"provider {job.provider!r} is no longer configured", actor, transient=True)
        return
    spec = _job_spec(job)
    try:
        lease = provider.reserve(offer, spec)
    except ProviderError as exc:
        _fail(job, f"reserve on {offer_key(offer)} failed: {exc}", actor, transient=not isinstance(exc, PermanentProviderError))
        return
    try:
        handle = provider.start(lease, spec)
    except ProviderError as exc:
        _release_quietly(provider, lease, None)
        _fail(job, f"start on {offer_key(offer)} failed: {exc}", actor, transient=not isinstance(exc, PermanentProviderError))
        return
    # Poll once before recording: work that is already done finishes in this one task.
    status = _observe(provider, handle, job, started=time.time())
    if status.state != "running":
        _finish(job, provider, handle, status, actor)
        return
    with session_scope() as s:
        stored = rows_changed(
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == S.running.value, Job.attempt == attempt)
                .values(
                    run_handle=handle.model_dump(mode="json"),
                    updated_at=utcnow(),
                    next_check_at=_grace(settings, FIRST_POLL_DELAY),
                )
            )
        )
    if not stored:  # cancelled while we were starting: give the capacity straight back
        _settle_release(job, provider, handle)
        return
    messaging.send(
        messaging.POLL, [str(job_id), attempt, FIRST_POLL_DELAY * 2], provider_queue(provider.name), countdown=FIRST_POLL_DELAY
    )


# --- poll ---------------------------------------------------------------------------------


def _observe(provider: Provider, handle: RunHandle, job: Snapshot, started: float) -> RunStatus:
    try:
        status = provider.poll(handle)
    except TransientProviderError as exc:
        log.warning("poll of job %s failed transiently: %s", job.id, exc)
        status = RunStatus(state="running")
    except ProviderError as exc:
        status = RunStatus(state="failed", error=str(exc), transient=not isinstance(exc, PermanentProviderError))
    if status.state == "running" and time.time() - started > job.timeout_seconds:
        status = RunStatus(state="failed", error=f"exceeded its time limit of {job.timeout_seconds}s")
    return status


def poll(job_id: uuid.UUID, attempt: int, delay: float = FIRST_POLL_DELAY, actor: str = "poller") -> None:
    settings = get_settings()
    job = snapshot(job_id)
    if job is None or job.attempt != attempt or job.run_handle is None:
        return
    if job.status != S.running:
        if job.status.terminal and job.released_at is None:
            release(job_id)
        return
    provider = get_providers().get(job.provider or "")
    if provider is None:
        _fail(job, f"provider {job.provider!r} is no longer configured", actor, transient=True)
        return
    handle = RunHandle(**job.run_handle)
    started = job.started_at.timestamp() if job.started_at else handle.started_at
    status = _observe(provider, handle, job, started)
    if status.state == "running":
        with session_scope() as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == S.running.value, Job.attempt == attempt)
                .values(next_check_at=_grace(settings, delay))
            )
        messaging.send(
            messaging.POLL, [str(job_id), attempt, min(delay * 2, MAX_POLL_DELAY)], provider_queue(provider.name), countdown=delay
        )
        return
    _finish(job, provider, handle, status, actor)


def _finish(job: Snapshot, provider: Provider, handle: RunHandle, status: RunStatus, actor: str) -> None:
    released = _release_quietly(provider, handle.lease, handle)
    # Usage is billed now; rented time is billed when the capacity is actually given back.
    cost = (status.cost or 0.0) + (_rented_cost(handle.lease) if released else 0.0)
    duration = round(time.time() - handle.started_at, 3)
    done = {
        "result": status.result,
        "duration_seconds": duration,
        "next_check_at": None,
        "run_handle": handle.model_dump(mode="json"),
        "cost": Job.cost + cost,
        "released_at": utcnow() if released else None,
    }
    if status.state == "succeeded":
        moved = advance(
            job.id,
            expected=S.running,
            attempt=job.attempt,
            to=S.succeeded,
            actor=actor,
            reason=f"finished on {handle.provider}/{handle.lease.offer_id} in {duration:.2f}s, cost ${cost:.6f}",
            values={**done, "error": None},
        )
    else:
        moved = _fail(job, status.error or "failed", actor, transient=status.transient, values=done)
    if not moved:
        # Cancelled meanwhile: the capacity is still ours to account for.
        with session_scope() as s:
            s.execute(
                update(Job)
                .where(Job.id == job.id, Job.attempt == job.attempt, Job.released_at.is_(None))
                .values(run_handle=done["run_handle"], cost=done["cost"], released_at=done["released_at"])
            )


def _rented_cost(lease: Lease) -> float:
    return round(lease.price_per_hour * max(0.0, time.time() - lease.reserved_at) / 3600, 8)


def _fail(job: Snapshot, reason: str, actor: str, *, transient: bool, values: dict[str, Any] | None = None) -> bool:
    """Fail over to another offer if the failure was the capacity's and attempts remain; else fail the job.

    Returns False if the job had already moved on (cancelled, or handled by a duplicate message)."""
    settings = get_settings()
    values = {"next_check_at": None, **(values or {})}
    excluded = [*job.excluded_offers]
    if job.placement:
        excluded.append(offer_key(Offer(**job.placement["offer"])))
    retry = transient and job.attempt < job.max_attempts
    if retry:
        moved = advance(
            job.id,
            expected=S.running,
            attempt=job.attempt,
            to=S.queued,
            actor=actor,
            reason=f"{reason}; retrying elsewhere (attempt {job.attempt + 1} of {job.max_attempts})",
            values={
                **values,
                "attempt": job.attempt + 1,
                "excluded_offers": excluded,
                "result": None,
                "next_check_at": _grace(settings),
                "error": reason,
            },
        )
    else:
        final = reason if not transient else f"{reason}; gave up after {job.attempt} attempts"
        moved = advance(
            job.id,
            expected=S.running,
            attempt=job.attempt,
            to=S.failed,
            actor=actor,
            reason=final,
            values={**values, "error": final},
        )
    if moved and retry:
        messaging.send(messaging.DISPATCH, [str(job.id), job.attempt + 1], job.queue)
    return moved


# --- release ------------------------------------------------------------------------------


def _release_quietly(provider: Provider, lease: Lease, handle: RunHandle | None) -> bool:
    try:
        provider.release(lease, handle)
        return True
    except NotYetReleased:
        return False
    except ProviderError as exc:
        log.warning("release of %s on %s failed: %s; the sweeper will retry", lease.external_id, provider.name, exc)
        return False


def _settle_release(job: Snapshot, provider: Provider, handle: RunHandle) -> bool:
    if not _release_quietly(provider, handle.lease, handle):
        return False
    with session_scope() as s:
        s.execute(
            update(Job)
            .where(Job.id == job.id, Job.released_at.is_(None), Job.attempt == job.attempt)
            .values(
                released_at=utcnow(),
                cost=Job.cost + _rented_cost(handle.lease),
                next_check_at=None,
                run_handle=handle.model_dump(mode="json"),
            )
        )
    return True


def release(job_id: uuid.UUID) -> bool:
    """Give back the capacity of a job that no longer needs it and settle its cost. Idempotent."""
    job = snapshot(job_id)
    if job is None or job.run_handle is None or job.released_at is not None or job.status == S.running:
        return True
    provider = get_providers().get(job.provider or "")
    if provider is None:
        log.error("job %s holds capacity on unknown provider %r", job_id, job.provider)
        return False
    return _settle_release(job, provider, RunHandle(**job.run_handle))
