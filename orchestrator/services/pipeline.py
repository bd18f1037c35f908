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
import secrets
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import update

from orchestrator.clock import as_utc, utcnow
from orchestrator.db.engine import rows_changed, session_scope
from orchestrator.db.models import Job
from orchestrator.domain import JobStatus
from orchestrator.errors import CapacityBusy, NoPlacement
from orchestrator.scheduling.placement import Placement, offer_key, place
from orchestrator.scheduling.queues import provider_queue
from orchestrator.services import budgets, health, messaging, reports, reservations, run_output
from orchestrator.services.budgets import OverBudget
from orchestrator.services.run_spec import job_spec
from orchestrator.services.snapshots import Snapshot, snapshot
from orchestrator.services.transitions import advance, record_event, transition
from orchestrator.settings import Settings, get_settings
from providers.base import (
    Lease,
    NoCapacity,
    Offer,
    PermanentProviderError,
    Provider,
    ProviderError,
    ProviderKind,
    Requirements,
    RunHandle,
    RunStatus,
    TransientProviderError,
)
from providers.registry import get_providers

log = logging.getLogger(__name__)

FIRST_POLL_DELAY = 0.25
MAX_POLL_DELAY = 5.0
# NoCapacity at reserve time (the offer filled up, or was taken, between placement and reserve) is not a
# failure of the job: it goes back to the queue on the same attempt, and the offer sits out placement for
# BUSY_SECONDS ("busy:<offer>:<time>" entries in excluded_offers) so the job tries the next offer — or, when
# everything that fits is busy, waits with backoff instead of burning its attempts. Shared-slot capacity
# (warm pools, this machine) is not even set aside: it frees up in moments.
SHARED_SLOT_KINDS = frozenset({ProviderKind.cloud_pool, ProviderKind.self_hosted, ProviderKind.local})
BUSY_PREFIX = "busy:"
BUSY_SECONDS = 30.0


def _exclusions(excluded: list[str], now: float | None = None) -> tuple[set[str], set[str]]:
    """(offers that failed this job, offers busy a moment ago)."""
    now = time.time() if now is None else now
    failed, busy = set(), set()
    for entry in excluded:
        if entry.startswith(BUSY_PREFIX):
            key, _, at = entry[len(BUSY_PREFIX):].rpartition(":")
            if now - float(at or 0) < BUSY_SECONDS:
                busy.add(key)
        else:
            failed.add(entry)
    return failed, busy
S = JobStatus


def _grace(settings: Settings, extra: float = 0.0) -> datetime:
    return utcnow() + timedelta(seconds=settings.sweep_grace_seconds + extra)


# --- dispatch -----------------------------------------------------------------------------


def dispatch(
    job_id: uuid.UUID, attempt: int, actor: str = "dispatcher", serves: Callable[[str], bool] = lambda queue: False
) -> None:
    """Place a queued job. ``serves(queue)`` says whether this worker also consumes the provider's
    queue; if so the execute step runs here at once instead of costing another broker round trip."""
    job = snapshot(job_id)
    if job is None or job.status != S.queued or job.attempt != attempt:
        return
    if job.use_reservation_id:
        _bind_to_reservation(job, job.use_reservation_id, actor)
        return
    if job.kind == "distillation":  # placed nowhere itself: a teacher/student pair per prompt
        from orchestrator.distillation import pairs

        pairs.fan_out(job_id, attempt, actor)
        return
    failed, busy = _exclusions(job.excluded_offers)
    try:
        placement = place(
            providers_for(job.tenant_id), job.kind, job.spec, Requirements(**job.requirements), job.timeout_seconds, failed,
            seed=f"{job.id}:{job.attempt}", busy=busy, stats=health.stats, monitor=health.snapshot(),
        )
    except CapacityBusy as exc:
        _wait_for_capacity(job, str(exc), actor)
        return
    except NoPlacement as exc:
        history = f" after trying {', '.join(sorted(failed))}" if failed else ""
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
    chosen = _hold_and_record(job, placement, actor)
    if chosen is None:
        return
    placement = chosen
    queue = provider_queue(placement.provider)
    if serves(queue):
        execute(job_id, attempt)
    else:
        messaging.send(messaging.EXECUTE, [str(job_id), attempt], queue)


def providers_for(tenant_id: uuid.UUID | None) -> dict[str, Provider]:
    """The providers this tenant's jobs may use: all of them, but a tenant's own warm pool only for it."""
    providers = get_providers()
    return {name: p for name, p in providers.items() if p.serves_tenant(tenant_id)}


def _bind_to_reservation(job: Snapshot, rid: uuid.UUID, actor: str) -> None:
    """A job submitted onto a standalone reservation is not placed: it waits for the reservation to be
    active, then goes to its provider's queue to be marked running there (nothing new is rented)."""
    row = reservations.get(rid)
    if row is None or row.state in (*reservations.FINAL, reservations.RELEASING):
        why = f"reservation {rid} is {row.state if row else 'gone'}"
        advance(job.id, expected=S.queued, attempt=job.attempt, to=S.failed, actor=actor, reason=why,
                values={"error": why, "next_check_at": None})
        return
    if row.state != reservations.ACTIVE or not row.lease:
        _wait_for_capacity(job, f"reservation {row.label} is {row.state}", actor)
        return
    offer = Offer(**(row.offer or {}))
    rationale = f"on reservation {row.label}: {offer_key(offer)} (paid by the reservation)"
    moved = advance(job.id, expected=S.queued, attempt=job.attempt, to=S.placing, actor=actor, reason=rationale, values={
        "provider": row.provider, "offer_id": row.offer_id, "price_per_hour": 0.0,
        "placement": {"provider": row.provider, "offer": offer.model_dump(mode="json"), "estimated_cost": 0.0,
                      "rationale": rationale, "considered": 1, "rejected": {}},
        "next_check_at": _grace(get_settings()),
    })
    if moved:
        messaging.send(messaging.EXECUTE, [str(job.id), job.attempt], provider_queue(row.provider or ""))


def _run_on_reservation(job: Snapshot, rid: uuid.UUID, actor: str) -> None:
    """Mark the job running on the reservation's capacity; its agent claims it from there."""
    row = reservations.get(rid)
    if row is None or row.state != reservations.ACTIVE or not row.lease:
        why = f"reservation {rid} is {row.state if row else 'gone'}"
        advance(job.id, expected=S.placing, attempt=job.attempt, to=S.failed, actor=actor, reason=why,
                values={"error": why, "next_check_at": None})
        return
    lease = Lease(**{k: v for k, v in row.lease.items() if k != "handle"})
    handle = RunHandle(provider=lease.provider, lease=lease, started_at=time.time(), data={"on_reservation": str(rid)})
    moved = advance(job.id, expected=S.placing, attempt=job.attempt, to=S.running, actor=actor,
                    reason=f"waiting for the agent on reservation {row.label}", values={
                        "started_at": utcnow(), "run_handle": handle.model_dump(mode="json"), "report": None,
                        "claimed_at": None, "callback_token_hash": None,
                        "next_check_at": _grace(get_settings(), MAX_POLL_DELAY)})
    if moved:
        messaging.send(messaging.POLL, [str(job.id), job.attempt, MAX_POLL_DELAY], provider_queue(lease.provider),
                       countdown=1.0)


def _observe_on_reservation(job: Snapshot, handle: RunHandle, started: float) -> RunStatus:
    """A job on a reservation is done when its agent reports; it fails if the reservation ends first."""
    row = reservations.get(uuid.UUID(handle.data["on_reservation"]))
    if row is None or row.state not in (reservations.PROVISIONING, reservations.ACTIVE):
        # On a warm pool's member that is the capacity's failure, not the job's: it runs again elsewhere.
        return RunStatus(state="failed", transient=bool(handle.data.get("warm_pool")),
                         error=f"reservation {row.label if row else handle.data['on_reservation']} ended before the job finished")
    claim_limit = get_settings().warm_claim_seconds
    if handle.data.get("warm_pool") and job.claimed_at is None and time.time() - started > claim_limit:
        # Its agent is not coming (stuck on a job that was cancelled, or dead): the member is given back
        # and the job runs elsewhere, instead of every job sent there waiting out its time limit.
        messaging.send(messaging.RELEASE_RESERVATION, [str(row.id)], provider_queue(row.provider or ""))
        return RunStatus(state="failed", transient=True,
                         error=f"warm instance {row.label} did not take the job within {claim_limit:.0f}s")
    if time.time() - started > job.timeout_seconds:
        return RunStatus(state="failed", error=f"exceeded its time limit of {job.timeout_seconds}s")
    return RunStatus(state="running")


class _Stale(Exception):
    """The job moved while we were placing it: undo the hold and the reservation row."""


def _hold_and_record(job: Snapshot, placement: Placement, actor: str) -> Placement | None:
    """Walk the candidates best first; the first whose budget hold fits is placed, with its
    reservation row and the job's move to ``placing`` in the same transaction."""
    settings = get_settings()
    over: dict[str, str] = {}
    can_wait = False
    limits: dict[str, list[Any]] = {}
    with session_scope() as s:
        for index, candidate in enumerate(placement.candidates):
            amount, rate = reservations.hold_for(candidate.offer, job.kind, candidate.estimated_cost, job.timeout_seconds)
            provider = candidate.offer.provider
            if provider not in limits:
                limits[provider] = budgets.applicable(s, job.tenant_id, provider)
            try:
                # A savepoint only where a hold can fail and must be undone (it costs two round trips).
                with s.begin_nested() if limits[provider] else nullcontext():
                    rid = reservations.open_reservation(s, tenant_id=job.tenant_id, offer=candidate.offer, amount=amount,
                                                        rate=rate, job_id=job.id, job_attempt=job.attempt,
                                                        limits=limits[provider])
                    chosen = placement.choose(index, over)
                    if not transition(
                        s, job.id, expected=S.queued, attempt=job.attempt, to=S.placing, actor=actor,
                        reason=f"placed: {chosen.rationale}",
                        values={
                            "provider": chosen.provider,
                            "offer_id": chosen.offer.offer_id,
                            "price_per_hour": chosen.offer.price_per_hour,
                            "placement": chosen.model_dump(mode="json"),
                            "reservation_id": rid,
                            "next_check_at": _grace(settings),
                        },
                        data={"provider": chosen.provider, "offer": chosen.offer.offer_id, "reservation": str(rid),
                              "estimated_cost": chosen.estimated_cost, "budget_hold": amount},
                    ):
                        raise _Stale
                return chosen
            except OverBudget as exc:
                over[offer_key(candidate.offer)] = str(exc)
                can_wait = can_wait or exc.can_wait
            except _Stale:
                s.rollback()
                return None
    detail = "; ".join(f"{k}: {v}" for k, v in over.items())
    if can_wait:
        _wait_for_capacity(job, f"budget: {detail}", actor)
    else:
        advance(job.id, expected=S.queued, attempt=job.attempt, to=S.failed, actor=actor,
                reason=f"over budget: {detail}", values={"error": f"over budget: {detail}", "next_check_at": None})
    return None


def _wait_for_capacity(job: Snapshot, reason: str, actor: str) -> None:
    """Everything that fits is busy: stay queued and place again shortly, until the job's timeout."""
    settings = get_settings()
    waited = (utcnow() - job.created_at).total_seconds() if job.created_at else 0.0
    limit = min(job.timeout_seconds, settings.max_wait_seconds)
    if waited > limit:
        advance(
            job.id,
            expected=S.queued,
            attempt=job.attempt,
            to=S.failed,
            actor=actor,
            reason=f"gave up waiting for capacity after {limit}s: {reason}",
            values={"error": f"no capacity within {limit}s: {reason}", "next_check_at": None},
        )
        return
    # Exponential backoff: each wait is half the time waited so far, between the configured bounds.
    delay = min(settings.capacity_retry_max_seconds, max(settings.capacity_retry_seconds, waited / 2))
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
    if job is not None and job.status == S.placing and job.attempt == attempt and job.use_reservation_id:
        _run_on_reservation(job, job.use_reservation_id, actor)
        return
    if job is None or job.status != S.placing or job.attempt != attempt or not job.placement or not job.reservation_id:
        return
    offer = Offer(**job.placement["offer"])
    provider = get_providers().get(job.provider or "")
    rid = job.reservation_id
    token = secrets.token_urlsafe(24)
    with session_scope() as s:
        claimed = transition(
            s, job_id, expected=S.placing, attempt=attempt, to=S.running, actor=actor,
            reason=f"starting on {offer_key(offer)}",
            values={
                "started_at": utcnow(),
                "released_at": None,
                "run_handle": None,
                "report": None,
                "callback_token_hash": reports.token_hash(token),
                "next_check_at": _grace(settings, provider.start_timeout if provider else 0),
            },
        )
        # The reservation says "provisioning" before the provider is asked: nothing is rented unrecorded.
        if claimed and not reservations.mark_provisioning(s, rid):
            s.rollback()  # its reservation was already given up (swept): leave the job to the sweeper
            claimed = False
    if not claimed:
        return
    if provider is None:
        reservations.fail(rid, f"provider {job.provider!r} is no longer configured")
        _fail(job, f"provider {job.provider!r} is no longer configured", actor, transient=True)
        return
    spec = job_spec(job, reservations.label_for(rid), token)
    try:
        lease = provider.reserve(offer, spec)
    except ProviderError as exc:
        if isinstance(exc, TransientProviderError):  # a provider failure (NoCapacity is not: full is healthy)
            health.record_outcome(provider.name, False, detail=f"reserve failed: {exc}")
        reservations.fail(rid, f"reserve failed: {exc}")
        if isinstance(exc, NoCapacity):
            _busy(job, offer_key(offer), f"{offer_key(offer)} is busy: {exc}", actor,
                  set_aside=provider.kind not in SHARED_SLOT_KINDS)
            return
        _fail(job, f"reserve on {offer_key(offer)} failed: {exc}", actor, transient=not isinstance(exc, PermanentProviderError))
        return
    try:
        handle = provider.start(lease, spec)
    except ProviderError as exc:
        if isinstance(exc, TransientProviderError):
            health.record_outcome(provider.name, False, detail=f"start failed: {exc}")
        reservations.release(rid, None, reason=f"start failed: {exc}", lease=lease)
        _fail(job, f"start on {offer_key(offer)} failed: {exc}", actor, transient=not isinstance(exc, PermanentProviderError))
        return
    # Poll once before recording: work that is already done finishes in this one task.
    status = _observe(provider, handle, job, started=time.time())
    if status.output:
        _keep_output(job, status.output)
    if status.state != "running":
        _finish(job, provider, handle, status, actor)
        return
    if not status.provisioning:
        handle.data["active"] = True
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
        # The lease goes on the reservation with the run handle: until then the label is what finds it.
        if stored:
            reservations.record_lease(s, rid, lease, active=not status.provisioning)
    if not stored:  # cancelled while we were starting: give the capacity straight back
        reservations.release(rid, handle, reason="the job ended while its capacity was starting", lease=lease)
        return
    messaging.send(
        messaging.POLL, [str(job_id), attempt, FIRST_POLL_DELAY * 2], provider_queue(provider.name), countdown=FIRST_POLL_DELAY
    )


def _busy(job: Snapshot, key: str, reason: str, actor: str, *, set_aside: bool) -> None:
    """The offer filled up (or was taken) between placement and reserve: back to the queue on the same
    attempt, the offer set aside for a moment, to be placed again at once (the next offer) — dispatch
    waits with backoff when everything that fits is busy, as for any wait."""
    note = f"waiting for capacity: {reason}"
    excluded = [e for e in job.excluded_offers if not e.startswith(f"{BUSY_PREFIX}{key}:")]
    if set_aside:
        excluded.append(f"{BUSY_PREFIX}{key}:{time.time():.0f}")
    delay = 0.0 if set_aside else get_settings().capacity_retry_seconds
    moved = advance(job.id, expected=S.running, attempt=job.attempt, to=S.queued, actor=actor, reason=note,
                    values={"error": note, "excluded_offers": excluded, "next_check_at": _grace(get_settings(), delay)})
    if moved:
        messaging.send(messaging.DISPATCH, [str(job.id), job.attempt], job.queue, countdown=delay or None)


# --- poll ---------------------------------------------------------------------------------


def _observe(provider: Provider, handle: RunHandle, job: Snapshot, started: float) -> RunStatus:
    try:
        status = provider.poll(handle)
    except TransientProviderError as exc:
        log.warning("poll of job %s failed transiently: %s", job.id, exc)
        status = RunStatus(state="running", provisioning=not handle.data.get("active", False))
    except ProviderError as exc:
        status = RunStatus(state="failed", error=str(exc), transient=not isinstance(exc, PermanentProviderError))
    if status.state == "running" and time.time() - started > job.timeout_seconds:
        status = RunStatus(state="failed", error=f"exceeded its time limit of {job.timeout_seconds}s")
    return status


def _reported(job: Snapshot) -> RunStatus | None:
    """The outcome the run reported to our callback for this attempt, if any: it beats the instance's state."""
    report = job.report
    if not report or report.get("attempt") != job.attempt or report.get("state") not in ("succeeded", "failed"):
        return None
    return RunStatus(state=report["state"], result=report.get("result"), error=report.get("error"))


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
    if handle.data.get("on_reservation"):
        status = _reported(job) or _observe_on_reservation(job, handle, started)
    else:
        status = _reported(job) or _observe(provider, handle, job, started)
    if status.output:
        _keep_output(job, status.output)
    if status.state == "running" and job.reservation_id and handle.lease.price_per_hour > 0:
        why = reservations.stop_reason(job.reservation_id, poll_margin_seconds=min(delay * 2, MAX_POLL_DELAY) + 1)
        if why:
            status = RunStatus(state="failed", error=why)
    if status.state == "running":
        became_active = not status.provisioning and not handle.data.get("active")
        if became_active:
            handle.data["active"] = True
        with session_scope() as s:
            values: dict[str, Any] = {"next_check_at": _grace(settings, delay)}
            if became_active or status.output:  # the handle holds how far the output was read
                values["run_handle"] = handle.model_dump(mode="json")
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == S.running.value, Job.attempt == attempt)
                .values(**values)
            )
            if became_active and job.reservation_id:
                reservations.move(s, job.reservation_id, (reservations.PROVISIONING,), reservations.ACTIVE,
                                  active_at=utcnow())
        messaging.send(
            messaging.POLL, [str(job_id), attempt, min(delay * 2, MAX_POLL_DELAY)], provider_queue(provider.name), countdown=delay
        )
        return
    _finish(job, provider, handle, status, actor)


def _finish(job: Snapshot, provider: Provider, handle: RunHandle, status: RunStatus, actor: str) -> None:
    """Release first (which settles the cost onto the job), then record the outcome."""
    if job.reservation_id:
        reservations.release(job.reservation_id, handle, reason=status.error or "", lease=handle.lease,
                             usage_cost=status.cost or 0.0)
    duration = round(time.time() - handle.started_at, 3)
    done = {
        "result": status.result,
        "duration_seconds": duration,
        "next_check_at": None,
        "run_handle": handle.model_dump(mode="json"),
    }
    if status.state == "succeeded":
        health.record_outcome(handle.provider, True, latency_ms=health.request_latency_ms(job.kind, handle, status.result))
        ended = advance(
            job.id,
            expected=S.running,
            attempt=job.attempt,
            to=S.succeeded,
            actor=actor,
            reason=f"finished on {handle.provider}/{handle.lease.offer_id} in {duration:.2f}s",
            values={**done, "error": None},
        )
    else:
        transient, reason = _retryable(job, status)
        # A retryable exit is the user's code asking to run again, not the capacity failing: keep the offer.
        ended = _fail(job, reason, actor, transient=transient, values=done, ran=True,
                      exclude=status.transient or not transient)
    if ended and job.pair_id is not None:
        _record_pair(job.id)
    if ended and status.state == "succeeded" and "distill_student" in (job.labels or {}):
        messaging.send(messaging.AFTER_TRAINING, [str(job.id)], "distillation")  # register + evaluate the student


def _keep_output(job: Snapshot, output: list[tuple[str, str]]) -> None:
    """The run's output since the last poll, with the checkpoints it announces (a failure to store
    logs must not fail the job)."""
    try:
        with session_scope() as s:
            run_output.append(s, job.id, job.attempt, output)
    except Exception:
        log.exception("keeping the output of job %s failed", job.id)


def _retryable(job: Snapshot, status: RunStatus) -> tuple[bool, str]:
    """A failure of the capacity is retried; a failure of the user's code only when its exit code is
    one the job declared retryable (training runs resume from their latest checkpoint)."""
    reason = status.error or "failed"
    codes = job.spec.get("retry_exit_codes") or []
    code = (status.result or {}).get("exit_code")
    if not status.transient and code in codes:
        return True, f"{reason} (exit code {code} is retryable)"
    return status.transient, reason


def _record_pair(job_id: uuid.UUID) -> None:
    """A distillation pair's job ended: its answer goes into the pair (a failure here must not undo the job)."""
    from orchestrator.distillation import pairs

    try:
        pairs.record(job_id)
    except Exception:
        log.exception("recording job %s into its distillation pair failed", job_id)


def _fail(job: Snapshot, reason: str, actor: str, *, transient: bool, values: dict[str, Any] | None = None,
          ran: bool = False, exclude: bool = True) -> bool:
    """Fail over to another offer if the failure was the capacity's and attempts remain; else fail the job.
    ``ran``: the run had started, so running it again is a restart (counted, with the work it lost).

    Returns False if the job had already moved on (cancelled, or handled by a duplicate message)."""
    settings = get_settings()
    values = {"next_check_at": None, **(values or {})}
    excluded = [*job.excluded_offers]
    if job.placement and exclude:
        excluded.append(offer_key(Offer(**job.placement["offer"])))
    retry = transient and job.attempt < job.max_attempts
    max_restarts = job.spec.get("max_restarts") if job.kind == "training" else None
    if retry and ran and max_restarts is not None and job.restarts >= max_restarts:
        retry, transient = False, False
        reason = f"{reason}; not restarted: it already ran {job.restarts + 1} times (max_restarts {max_restarts})"
    restart_note = ""
    if retry and ran:
        values.update(_restart(job))
        restart_note = f", restart {values['restarts']}" + (
            f" from checkpoint step {values.pop('resume_step')}" if "resume_step" in values else " from the start")
    if retry:
        moved = advance(
            job.id,
            expected=S.running,
            attempt=job.attempt,
            to=S.queued,
            actor=actor,
            reason=f"{reason}; retrying {'elsewhere' if exclude else 'again'} "
                   f"(attempt {job.attempt + 1} of {job.max_attempts}{restart_note})",
            values={
                **values,
                "attempt": job.attempt + 1,
                "excluded_offers": excluded,
                # A job placed on a warm pool's member was bound to it for that attempt only.
                **({"use_reservation_id": None} if job.reservation_id and job.use_reservation_id else {}),
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


def _restart(job: Snapshot) -> dict[str, Any]:
    """The restart count, the work this run lost (since its last checkpoint, or its start) added to the
    job's total, and the step the next run resumes from."""
    now = utcnow()
    with session_scope() as s:
        saved_at = as_utc(run_output.last_progress_at(s, job.id, job.attempt))
        latest = run_output.latest_checkpoint(s, job.id)
    since = max((t for t in (saved_at, job.started_at) if t is not None), default=now)
    values: dict[str, Any] = {"restarts": job.restarts + 1,
                              "lost_seconds": round(job.lost_seconds + max(0.0, (now - since).total_seconds()), 3)}
    if latest is not None:
        values["resume_step"] = latest.step
    return values


# --- release ------------------------------------------------------------------------------


def release(job_id: uuid.UUID) -> bool:
    """Give back the capacity of a job that no longer needs it and settle its cost. Idempotent."""
    job = snapshot(job_id)
    if job is None or job.reservation_id is None or job.released_at is not None or job.status == S.running:
        return True
    handle = RunHandle(**job.run_handle) if job.run_handle else None
    return reservations.release(job.reservation_id, handle, reason=f"job {job.status.value}")
