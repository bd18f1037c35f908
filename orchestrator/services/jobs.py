"""Submitting, reading and cancelling jobs on behalf of a tenant.

A job is committed before its dispatch message is published (callers do the publish
after commit). Idempotency keys make resubmission return the same job; reusing a key
for a different request is a conflict, as with Stripe's API.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import event, func, insert, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from orchestrator.clock import as_utc, utcnow
from orchestrator.db.models import Batch, Job, JobEvent
from orchestrator.domain import BatchOut, JobEventOut, JobOut, JobStatus
from orchestrator.errors import Conflict, InvalidInput, NotFound
from orchestrator.scheduling import residency
from orchestrator.scheduling.placement import routing_policy
from orchestrator.scheduling.queues import queue_for
from orchestrator.services import agents
from orchestrator.services.transitions import transition
from orchestrator.settings import Settings

log = logging.getLogger(__name__)


def request_hash(req: Any) -> str:
    body = req.model_dump(mode="json", exclude={"idempotency_key"})
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _row(tenant_id: uuid.UUID, req: Any, settings: Settings, now: datetime, batch_id: uuid.UUID | None) -> dict[str, Any]:
    return {
        "id": uuid.uuid4(),
        "tenant_id": tenant_id,
        "kind": req.kind,
        "priority": req.priority,
        "queue": queue_for(req.kind, req.priority),
        "status": JobStatus.queued.value,
        "spec": req.spec.model_dump(mode="json", exclude_none=True),
        "requirements": req.requirements.model_dump(mode="json", exclude_none=True),
        "labels": req.labels,
        "attempt": 1,
        "max_attempts": _max_attempts(req, settings),
        "timeout_seconds": req.timeout_seconds or settings.default_timeout_seconds,
        "idempotency_key": req.idempotency_key,
        "request_hash": request_hash(req),
        "batch_id": batch_id,
        "excluded_offers": [],
        "use_reservation_id": req.reservation_id,
        "cost": 0.0,
        # If the dispatch message never arrives, the sweeper re-publishes after this.
        "next_check_at": now + timedelta(seconds=settings.sweep_grace_seconds),
        "created_at": now,
        "updated_at": now,
    }


def _max_attempts(req: Any, settings: Settings) -> int:
    """A training run may be restarted ``max_restarts`` times, and each restart is an attempt too: on top
    of them it keeps the attempts any job has for capacity that fails before it runs (a rental refused)."""
    attempts = req.max_attempts or settings.default_max_attempts
    if req.kind == "training":
        attempts = max(attempts, req.spec.max_restarts + (req.max_attempts or settings.default_max_attempts))
    return int(attempts)


def build_row(tenant_id: uuid.UUID, req: Any, settings: Settings, now: datetime) -> dict[str, Any]:
    """A job row for work the orchestrator creates itself (a distillation pair's teacher and student)."""
    return _row(tenant_id, req, settings, now, None)


def insert_rows(session: Session, rows: list[dict[str, Any]], actor: str) -> None:
    now = utcnow()
    session.execute(insert(Job), rows)
    session.execute(insert(JobEvent), [_event(r, now, actor) for r in rows])


def dispatch_rows(rows: list[dict[str, Any]]) -> None:
    """After commit: publish their dispatch messages (the sweeper publishes any that are lost)."""
    from orchestrator.services import messaging

    if rows:
        messaging.send_dispatches((r["id"], 1, r["queue"]) for r in rows)


def _event(row: dict[str, Any], now: datetime, actor: str) -> dict[str, Any]:
    return {"job_id": row["id"], "at": now, "from_status": None, "to_status": "queued", "attempt": 1,
            "actor": actor, "reason": f"submitted to queue {row['queue']}", "data": None}


def _existing(session: Session, tenant_id: uuid.UUID, keys: list[str]) -> dict[str, Job]:
    if not keys:
        return {}
    rows = session.scalars(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key.in_(keys)))
    return {job.idempotency_key: job for job in rows if job.idempotency_key}


def _same_request(job: Job, req: Any) -> Job:
    if job.request_hash != request_hash(req):
        raise Conflict(f"idempotency_key {req.idempotency_key!r} was already used for a different request (job {job.id})")
    return job


def _distillation(session: Session, tenant_id: uuid.UUID, req: Any, row: dict[str, Any],
                  routes: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Inference for a teacher model may go to its production student (traffic shift, maybe shadowed
    by the teacher), or be flagged to pair with a student; returns the extra job rows this creates.
    ``routes``: the tenant's active traffic routes, when the caller looked them up once for a batch."""
    if req.kind != "inference":
        return []
    from orchestrator.distillation import pairs, traffic

    if routes is None:
        routes = traffic.active_routes(session, tenant_id)
    spec = row["spec"]
    if not routes.get(spec["model"]) and req.distill is None:
        return []
    rule = residency.resolve(routing_policy().residency, req.requirements.data_class).rule
    messages = spec.get("messages") or [{"role": "user", "content": spec.get("prompt", "")}]
    routed = traffic.route(session, tenant_id, routes.get(spec["model"]), seed=str(row["id"]))
    if routed is not None:
        row["spec"] = {**spec, "model": routed.served_model}
        row["labels"] = {**row["labels"], "route": f"student {routed.student_name} v{routed.version}"}
        if not routed.shadow or not rule.replication:
            return []
        shadow = pairs.PairRequest(teacher_model=spec["model"], student_model=routed.served_model, messages=messages,
                                   max_tokens=spec.get("max_tokens", 256), requirements=row["requirements"])
        return pairs.pair_existing(session, row, pairs.STUDENT, shadow, source="shadow")
    if req.distill is None:
        return []
    if not rule.replication:
        raise InvalidInput("distill", "this request's data class forbids sending it to a second model")
    flagged = pairs.PairRequest(teacher_model=spec["model"], student_model=req.distill.student_model, messages=messages,
                                max_tokens=spec.get("max_tokens", 256), tags=req.distill.tags,
                                requirements=row["requirements"])
    return pairs.pair_existing(session, row, pairs.TEACHER, flagged, source="inference")


def _dispatch_after_commit(session: Session, rows: list[dict[str, Any]]) -> None:
    if rows:
        event.listen(session, "after_commit", lambda _s: dispatch_rows(rows), once=True)


def _check_routing(req: Any) -> None:
    """Refuse at the door what placement could never honour: an unknown data class."""
    if req.requirements.data_class is not None:
        residency.resolve(routing_policy().residency, req.requirements.data_class)


def submit(session: Session, tenant_id: uuid.UUID, req: Any, settings: Settings, actor: str = "api") -> tuple[Job, bool]:
    """Insert one job; returns (job, created). An existing idempotency key returns the original job."""
    if req.idempotency_key:
        found = _existing(session, tenant_id, [req.idempotency_key]).get(req.idempotency_key)
        if found:
            return _same_request(found, req), False
    _check_routing(req)
    if req.reservation_id:
        agents.check_usable(session, tenant_id, req.reservation_id, req.kind, req.spec.model_dump())
    now = utcnow()
    row = _row(tenant_id, req, settings, now, None)
    try:
        with session.begin_nested():
            paired = _distillation(session, tenant_id, req, row)
            session.execute(insert(Job), [row])
            session.execute(insert(JobEvent), [_event(row, now, actor)])
            _dispatch_after_commit(session, paired)
    except IntegrityError:
        # A concurrent submit with the same key won the race: return its job.
        found = _existing(session, tenant_id, [req.idempotency_key]).get(req.idempotency_key) if req.idempotency_key else None
        if found is None:
            raise
        return _same_request(found, req), False
    return session.get_one(Job, row["id"]), True


def submit_batch(session: Session, tenant_id: uuid.UUID, reqs: list[Any], settings: Settings,
                 actor: str = "api") -> tuple[uuid.UUID, list[dict[str, Any]], list[Job]]:
    """Insert a batch in one transaction; returns (batch id, new rows, jobs that already existed)."""
    if len(reqs) > settings.max_batch_size:
        raise InvalidInput("jobs", f"a batch holds at most {settings.max_batch_size} jobs, got {len(reqs)}")
    keys = [r.idempotency_key for r in reqs if r.idempotency_key]
    if len(keys) != len(set(keys)):
        raise Conflict("idempotency_key values must be unique within a batch")
    for req in reqs:
        _check_routing(req)
        if req.reservation_id:
            agents.check_usable(session, tenant_id, req.reservation_id, req.kind, req.spec.model_dump())
    existing = _existing(session, tenant_id, keys)
    now = utcnow()
    batch_id = uuid.uuid4()
    session.execute(insert(Batch), [{"id": batch_id, "tenant_id": tenant_id, "size": len(reqs), "created_at": now}])
    from orchestrator.distillation import traffic

    routes = traffic.active_routes(session, tenant_id) if any(r.kind == "inference" for r in reqs) else {}
    rows, reused, paired = [], [], []
    for req in reqs:
        if req.idempotency_key in existing:
            reused.append(_same_request(existing[req.idempotency_key], req))
        else:
            rows.append(_row(tenant_id, req, settings, now, batch_id))
            paired += _distillation(session, tenant_id, req, rows[-1], routes)
    if rows:
        session.execute(insert(Job), rows)
        session.execute(insert(JobEvent), [_event(r, now, actor) for r in rows])
    _dispatch_after_commit(session, paired)
    return batch_id, rows, reused


def get_job(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"job {job_id} not found")
    return job


def events_for(session: Session, job_id: uuid.UUID) -> list[JobEvent]:
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def to_out(job: Job, events: list[JobEvent] | None = None) -> JobOut:
    out = JobOut.model_validate(job, from_attributes=True)
    for field in ("created_at", "started_at", "finished_at"):
        setattr(out, field, as_utc(getattr(out, field)))
    if events is not None:
        out.events = [JobEventOut.model_validate(e, from_attributes=True) for e in events]
        for e in out.events:
            e.at = as_utc(e.at)  # type: ignore[assignment]
    return out


def encode_cursor(job: Job) -> str:
    raw = f"{as_utc(job.created_at).isoformat()}|{job.id}"  # type: ignore[union-attr]
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        at, _, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return datetime.fromisoformat(at), uuid.UUID(job_id)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("cursor", "not valid: pass the next_cursor of a previous page") from None


def list_jobs(session: Session, tenant_id: uuid.UUID, *, status: str | None = None, kind: str | None = None,
              batch_id: uuid.UUID | None = None, ids: list[uuid.UUID] | None = None, limit: int = 50,
              cursor: str | None = None) -> tuple[list[Job], str | None]:
    query = select(Job).where(Job.tenant_id == tenant_id)
    if status:
        query = query.where(Job.status == status)
    if kind:
        query = query.where(Job.kind == kind)
    if batch_id:
        query = query.where(Job.batch_id == batch_id)
    if ids:
        query = query.where(Job.id.in_(ids))
    if cursor:
        at, last_id = decode_cursor(cursor)
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(at, last_id))
    jobs = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    next_cursor = encode_cursor(jobs[limit - 1]) if len(jobs) > limit else None
    return jobs[:limit], next_cursor


def batch_summary(session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID) -> BatchOut:
    batch = session.get(Batch, batch_id)
    if batch is None or batch.tenant_id != tenant_id:
        raise NotFound(f"batch {batch_id} not found")
    counts = dict(session.execute(
        select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)).all())
    return BatchOut(id=batch.id, size=batch.size, created_at=as_utc(batch.created_at), counts=counts)  # type: ignore[arg-type]


def cancel(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID, actor: str = "api") -> tuple[Job, bool]:
    """Cancel a job that has not finished; returns (job, needs_release) — True if capacity was rented."""
    for _ in range(5):
        job = get_job(session, tenant_id, job_id)
        status = JobStatus(job.status)
        if status.terminal:
            raise Conflict(f"job {job_id} already {status.value}")
        if transition(session, job_id, expected=status, attempt=job.attempt, to=JobStatus.cancelled,
                      actor=actor, reason="cancelled by the caller"):
            session.refresh(job)
            if job.pair_id is not None:  # its teacher/student pair learns now, not at the daily upkeep
                event.listen(session, "after_commit", lambda _s: _record_pair(job_id), once=True)
            return job, job.run_handle is not None and job.released_at is None
        session.expire(job)  # it moved under us: look again
    raise Conflict(f"job {job_id} is changing too fast to cancel; try again")


def _record_pair(job_id: uuid.UUID) -> None:
    from orchestrator.distillation import pairs

    try:
        pairs.record(job_id)
    except Exception:  # the cancel stands; the daily upkeep settles the pair
        log.exception("recording cancelled job %s into its distillation pair failed", job_id)


def wait_for(tenant_id: uuid.UUID, job_id: uuid.UUID, timeout: float) -> JobOut:
    """Block (polling the row, from 20 ms up to 250 ms apart) until the job ends or ``timeout`` passes:
    for API calls that answer with a job's result (the front door, distillation queries)."""
    import time

    from orchestrator.db.engine import session_scope

    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        with session_scope() as s:
            out = to_out(get_job(s, tenant_id, job_id))
        if out.status.terminal or time.monotonic() >= deadline:
            return out
        time.sleep(delay)
        delay = min(0.25, delay * 1.5)
