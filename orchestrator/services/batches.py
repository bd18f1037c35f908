"""Batch runs: declare a batch, feed it items in chunks, watch it, list its items, cancel it, estimate it.

Each item becomes one ordinary job (same queues, placement, budgets, retries, sweeper) tagged with the
batch and the item's key. The job's idempotency key is derived from the batch id and the item key, and
the jobs table holds those keys unique per tenant: a chunk re-sent by a client that restarted finds the
jobs it already made and creates only the missing ones, so no item runs twice and none is lost.
Progress is computed from the jobs (Postgres is the truth), never kept as a counter that could drift.
"""

from __future__ import annotations

import hashlib
import statistics
import uuid
from collections import defaultdict
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import func, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from orchestrator.batch_models import (
    AppendOut,
    BatchItemOut,
    BatchItemPage,
    BatchRunCreate,
    BatchRunOut,
    Estimate,
    EstimateGroup,
    ItemIn,
    JobOptions,
)
from orchestrator.clock import as_utc, utcnow
from orchestrator.db.engine import session_scope
from orchestrator.db.models import Batch, Job
from orchestrator.domain import (
    SPEC_MODELS,
    TERMINAL,
    CommandJob,
    DistillationJob,
    InferenceJob,
    JobStatus,
    TrainingJob,
    TranscriptionJob,
)
from orchestrator.errors import CapacityBusy, Conflict, InvalidInput, NoPlacement, NotFound
from orchestrator.scheduling import residency
from orchestrator.scheduling.placement import estimate_cost, offer_key, place, routing_policy, usage_priced
from orchestrator.scheduling.queues import queue_for
from orchestrator.services import jobs
from orchestrator.settings import Settings
from providers.base import Requirements

OPEN = "open"
CANCELLED = "cancelled"
ITEM_LABEL = "batch_item"
THROUGHPUT_WINDOW_SECONDS = 60.0
CANCEL_CHUNK = 200

_JOB_MODELS: dict[str, type[BaseModel]] = {
    "inference": InferenceJob, "transcription": TranscriptionJob, "training": TrainingJob,
    "distillation": DistillationJob, "command": CommandJob,
}
# Run lengths for usage-priced offers when nothing was measured (their price says nothing about time).
_DEFAULT_SECONDS = {"inference": 5.0, "transcription": 60.0, "training": 3600.0, "distillation": 600.0, "command": 60.0}
_TERMINAL = [s.value for s in TERMINAL]


def item_idempotency_key(batch_id: uuid.UUID, key: str) -> str:
    """The job's idempotency key for an item: readable when it fits the 200-character column, hashed when not."""
    plain = f"batch:{batch_id}:{key}"
    if len(plain) <= 200:
        return plain
    return f"batch:{batch_id}:sha256:{hashlib.sha256(key.encode()).hexdigest()}"


# --- building and checking item jobs ------------------------------------------------------


def check_options(kind: str, options: JobOptions) -> None:
    """Refuse at the door what would fail every item: unknown spec defaults, an unknown data class,
    a label that would hide the item key."""
    known = SPEC_MODELS[kind].model_fields
    for name in options.defaults:
        if name not in known:
            raise InvalidInput(f"options.defaults.{name}", f"not a field of {kind} specs (known: {', '.join(known)})")
    if ITEM_LABEL in options.labels:
        raise InvalidInput(f"options.labels.{ITEM_LABEL}", "is set by the batch to each item's key")
    if options.requirements.data_class is not None:
        residency.resolve(routing_policy().residency, options.requirements.data_class)


def job_request(batch_id: uuid.UUID | None, kind: str, options: JobOptions, item: ItemIn, field: str) -> Any:
    """The job an item becomes, validated like any submitted job; a bad item is reported by its place in the
    call (``items.3.spec.audio_url``) so the caller knows which one."""
    body: dict[str, Any] = {
        "kind": kind,
        "spec": {**options.defaults, **item.spec},
        "priority": options.priority,
        "requirements": options.requirements.model_dump(mode="json", exclude_none=True),
        "labels": {**options.labels, ITEM_LABEL: item.key},
    }
    if batch_id is not None:
        body["idempotency_key"] = item_idempotency_key(batch_id, item.key)
    for name in ("max_attempts", "timeout_seconds"):
        if getattr(options, name) is not None:
            body[name] = getattr(options, name)
    try:
        return _JOB_MODELS[kind].model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise InvalidInput(f"{field}.{where}" if where else field,
                           f"{str(error['msg']).removeprefix('Value error, ')} (item {item.key!r})") from None


# --- create and append ----------------------------------------------------------------------


def find(session: Session, tenant_id: uuid.UUID, idempotency_key: str) -> Batch | None:
    return session.scalar(select(Batch).where(Batch.tenant_id == tenant_id, Batch.idempotency_key == idempotency_key))


def get(session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID, *, lock: bool = False) -> Batch:
    query = select(Batch).where(Batch.id == batch_id)
    if lock:  # appends and cancel serialise on the batch row, so no item slips in after a cancel
        query = query.with_for_update()
    batch = session.scalar(query)
    if batch is None or batch.tenant_id != tenant_id:
        raise NotFound(f"batch {batch_id} not found")
    return batch


def _same_batch(found: Batch, body: BatchRunCreate) -> Batch:
    if found.kind != body.kind or found.size != body.size:
        raise Conflict(f"idempotency_key {body.idempotency_key!r} was already used for a different batch "
                       f"({found.kind}, {found.size} items: batch {found.id})")
    return found


def create(session: Session, tenant_id: uuid.UUID, body: BatchRunCreate, estimate: Estimate | None) -> tuple[Batch, bool]:
    """Declare a batch run; returns (batch, created). Its idempotency key finds an earlier one instead.
    ``estimate``: computed by the caller before this transaction (placement asks providers; no
    transaction should wait on that)."""
    if body.idempotency_key and (found := find(session, tenant_id, body.idempotency_key)):
        return _same_batch(found, body), False
    check_options(body.kind, body.options)
    now = utcnow()
    batch = Batch(id=uuid.uuid4(), tenant_id=tenant_id, size=body.size, name=body.name, kind=body.kind, state=OPEN,
                  idempotency_key=body.idempotency_key, output_uri=body.output_uri,
                  estimate=estimate.model_dump(mode="json") if estimate else None,
                  options={"job": body.options.model_dump(mode="json", exclude_none=True), "client": body.client},
                  created_at=now, updated_at=now)
    try:
        with session.begin_nested():
            session.add(batch)
            session.flush()
    except IntegrityError:
        found = find(session, tenant_id, body.idempotency_key) if body.idempotency_key else None
        if found is None:
            raise
        return _same_batch(found, body), False
    return batch, True


def job_options(batch: Batch) -> JobOptions:
    return JobOptions.model_validate((batch.options or {}).get("job") or {})


def append(session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID, items: list[ItemIn], settings: Settings,
           actor: str = "api") -> tuple[AppendOut, list[dict[str, Any]]]:
    """Add items; returns (counts, the new job rows to dispatch after commit). Items already in the batch
    (same key, same spec) are found, not added again; the same key with a different spec is a conflict."""
    batch = get(session, tenant_id, batch_id, lock=True)
    if batch.state == CANCELLED:
        raise Conflict(f"batch {batch_id} is cancelled: no items can be added")
    if batch.kind == "jobs":
        raise Conflict(f"batch {batch_id} was submitted in one call; items can only be added to a batch run "
                       "(POST /v1/batches)")
    options = job_options(batch)
    reqs = [job_request(batch.id, batch.kind, options, item, f"items.{i}") for i, item in enumerate(items)]
    keys = [r.idempotency_key for r in reqs]
    existing = {j.idempotency_key: j for j in session.scalars(
        select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key.in_(keys)))}
    for req, item in zip(reqs, items, strict=True):
        job = existing.get(req.idempotency_key)
        if job is not None and job.request_hash != jobs.request_hash(req):
            raise Conflict(f"item {item.key!r} was already sent to batch {batch_id} with a different spec (job {job.id})")
    new = [r for r in reqs if r.idempotency_key not in existing]
    submitted = session.scalar(select(func.count()).select_from(Job).where(Job.batch_id == batch.id)) or 0
    if submitted + len(new) > batch.size:
        raise InvalidInput("items", f"batch {batch_id} was declared with {batch.size} items; it holds {submitted} "
                                    f"and this call adds {len(new)} new ones")
    now = utcnow()
    rows = []
    routes: dict[str, Any] | None = None
    paired: list[dict[str, Any]] = []
    if new and batch.kind == "inference":
        from orchestrator.distillation import traffic

        routes = traffic.active_routes(session, tenant_id)
    for req in new:
        row = jobs.build_row(tenant_id, req, settings, now)
        row["batch_id"] = batch.id
        rows.append(row)
        if routes is not None:
            # Inference to a teacher with a traffic route goes where single submits would (student, shadow).
            paired += jobs._distillation(session, tenant_id, req, row, routes)
    if rows:
        jobs.insert_rows(session, rows, actor)
        jobs._dispatch_after_commit(session, paired)
        session.execute(update(Batch).where(Batch.id == batch.id).values(updated_at=now))
    out = AppendOut(batch_id=batch.id, created=len(rows), existing=len(reqs) - len(new),
                    submitted=submitted + len(rows), size=batch.size)
    return out, rows


# --- progress, items ------------------------------------------------------------------------


def progress(session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID) -> BatchRunOut:
    """Counts by status, throughput over the last minute, ETA, cost so far, first/last end and elapsed time."""
    batch = get(session, tenant_id, batch_id)
    rows = session.execute(
        select(Job.status, func.count(), func.coalesce(func.sum(Job.cost), 0.0), func.min(Job.finished_at),
               func.max(Job.finished_at), func.min(Job.created_at))
        .where(Job.batch_id == batch.id).group_by(Job.status)).all()
    counts = {status: n for status, n, *_ in rows}
    cost = float(sum(r[2] for r in rows))
    finished = [t for r in rows if r[0] in _TERMINAL and (t := as_utc(r[3])) is not None]
    last = [t for r in rows if r[0] in _TERMINAL and (t := as_utc(r[4])) is not None]
    started = min((t for r in rows if (t := as_utc(r[5])) is not None), default=None)
    now = utcnow()
    window_start = now - timedelta(seconds=THROUGHPUT_WINDOW_SECONDS)
    if started is not None and started > window_start:
        window_start = started
    recent = session.scalar(select(func.count()).select_from(Job).where(
        Job.batch_id == batch.id, Job.status.in_(_TERMINAL), Job.finished_at >= window_start)) or 0
    submitted = sum(counts.values())
    done = sum(counts.get(s, 0) for s in _TERMINAL)
    # A cancelled batch gets no more items: it is finished when what it holds has ended.
    target = submitted if batch.state == CANCELLED else batch.size
    is_finished = done >= target
    span = (now - window_start).total_seconds()
    throughput = recent / span if span > 0 and recent else (0.0 if started else None)
    remaining = max(0, target - done)
    eta = 0.0 if is_finished else (remaining / throughput if throughput else None)
    first_finish = min(finished, default=None)
    last_finish = max(last, default=None)
    end = last_finish if is_finished and last_finish else now
    return BatchRunOut(
        id=batch.id, size=batch.size, created_at=as_utc(batch.created_at), counts=counts,  # type: ignore[arg-type]
        name=batch.name, kind=batch.kind, state=batch.state, submitted=submitted,
        queued=counts.get(JobStatus.queued.value, 0),
        running=counts.get(JobStatus.placing.value, 0) + counts.get(JobStatus.running.value, 0),
        succeeded=counts.get(JobStatus.succeeded.value, 0), failed=counts.get(JobStatus.failed.value, 0),
        cancelled=counts.get(JobStatus.cancelled.value, 0), done=done, finished=is_finished,
        throughput_per_second=round(throughput, 4) if throughput is not None else None,
        eta_seconds=round(eta, 1) if eta is not None else None, cost=round(cost, 8),
        elapsed_seconds=round((end - started).total_seconds(), 3) if started else None,
        first_finished_at=first_finish, last_finished_at=last_finish, cancelled_at=as_utc(batch.cancelled_at),
        updated_at=as_utc(batch.updated_at), output_uri=batch.output_uri, estimate=batch.estimate, options=batch.options)


def item_out(job: Job, with_result: bool) -> BatchItemOut:
    return BatchItemOut(key=(job.labels or {}).get(ITEM_LABEL, str(job.id)), job_id=job.id, status=job.status,
                        attempt=job.attempt, max_attempts=job.max_attempts, error=job.error, cost=job.cost,
                        duration_seconds=job.duration_seconds, provider=job.provider, offer_id=job.offer_id,
                        finished_at=as_utc(job.finished_at), result=job.result if with_result else None)


def list_items(session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID, *, status: str | None = None,
               limit: int = 100, cursor: str | None = None, results: bool = False) -> BatchItemPage:
    """Items in submission order (keyset pages), optionally one status; ``results`` adds each job's result."""
    batch = get(session, tenant_id, batch_id)
    query = select(Job).where(Job.batch_id == batch.id)
    if status:
        query = query.where(Job.status == status)
    if cursor:
        at, last_id = jobs.decode_cursor(cursor)
        query = query.where(tuple_(Job.created_at, Job.id) > tuple_(at, last_id))
    found = list(session.scalars(query.order_by(Job.created_at, Job.id).limit(limit + 1)))
    next_cursor = jobs.encode_cursor(found[limit - 1]) if len(found) > limit else None
    return BatchItemPage(items=[item_out(j, results) for j in found[:limit]], next_cursor=next_cursor)


# --- cancel ---------------------------------------------------------------------------------


def cancel(tenant_id: uuid.UUID, batch_id: uuid.UUID, actor: str = "api") -> tuple[BatchRunOut, list[tuple[uuid.UUID, str]]]:
    """Cancel the batch and every job of it that has not ended, through the same path as a single cancel.
    Returns (progress, (job, provider) pairs whose rented capacity the caller must release after commit).
    Jobs are cancelled a chunk per transaction so a large batch never holds one long transaction; the
    batch is marked first, under its row lock, so no append can add items behind the sweep."""
    with session_scope() as s:
        batch = get(s, tenant_id, batch_id, lock=True)
        ended = s.scalar(select(func.count()).select_from(Job).where(Job.batch_id == batch_id,
                                                                     Job.status.in_(_TERMINAL))) or 0
        if batch.state != CANCELLED and ended >= batch.size:
            raise Conflict(f"batch {batch_id} already finished: all {batch.size} items ended")
        if batch.state != CANCELLED:
            now = utcnow()
            batch.state, batch.cancelled_at, batch.updated_at = CANCELLED, now, now
    releases: list[tuple[uuid.UUID, str]] = []
    tries: dict[uuid.UUID, int] = {}
    while True:  # chunk after chunk until none is left; a job that keeps moving is looked at 20 times at most
        with session_scope() as s:
            query = select(Job.id).where(Job.batch_id == batch_id, Job.status.notin_(_TERMINAL))
            if stuck := [j for j, n in tries.items() if n >= 20]:
                query = query.where(Job.id.notin_(stuck))
            pending = list(s.scalars(query.order_by(Job.id).limit(CANCEL_CHUNK)))
            for job_id in pending:
                tries[job_id] = tries.get(job_id, 0) + 1
                try:
                    job, needs_release = jobs.cancel(s, tenant_id, job_id, actor=actor)
                except Conflict:
                    continue  # it ended meanwhile (or is changing too fast: the next round takes it)
                if needs_release and job.provider:
                    releases.append((job.id, job.provider))
        if not pending:
            break
    with session_scope() as s:
        return progress(s, tenant_id, batch_id), releases


# --- estimate ---------------------------------------------------------------------------------


def _group_key(spec: dict[str, Any]) -> tuple[str | None, int | None]:
    """What placement's choice and price depend on in a spec: providers list offers per model, and a
    usage-priced offer's estimate per token budget. Items alike in these are placed alike."""
    tokens = spec.get("max_tokens")
    return spec.get("model"), int(tokens) if tokens is not None else None


def _measured_seconds(tenant_id: uuid.UUID | None, kind: str, provider: str, offer_id: str) -> float | None:
    """Median run time of this tenant's recent succeeded jobs of this kind on this offer, if there are any."""
    if tenant_id is None:
        return None
    since = utcnow() - timedelta(days=7)
    with session_scope() as s:
        durations = list(s.scalars(
            select(Job.duration_seconds).where(
                Job.tenant_id == tenant_id, Job.created_at >= since, Job.kind == kind, Job.provider == provider,
                Job.offer_id == offer_id, Job.status == JobStatus.succeeded.value, Job.duration_seconds.is_not(None))
            .order_by(Job.created_at.desc()).limit(200)))
    measured = [d for d in durations if d is not None]
    return float(statistics.median(measured)) if measured else None


def estimate(kind: str, options: JobOptions, reqs: list[Any], total: int, settings: Settings,
             tenant_id: uuid.UUID | None = None) -> Estimate:
    """What the batch would cost and take if placed now: a dry run of placement (no reservation, no budget
    hold, nothing written) per group of alike items in ``reqs``, scaled to ``total`` when they are a sample.

    One run length per item serves both figures: the median measured on the chosen offer for this tenant in
    the last week when there is one (rented time is then priced at it), else the length placement's own
    estimate assumed (its price ÷ the offer's $/h; a per-kind default for usage-priced offers). Items of a
    group run ``parallel`` at once — the free capacity of the offers that fit: runs are detached from the
    workers, so the queue's worker concurrency bounds how fast items are placed, not how many run."""
    from orchestrator.services import health, pipeline

    groups: dict[tuple[str | None, int | None], list[Any]] = defaultdict(list)
    for req in reqs:
        groups[_group_key(req.spec.model_dump(mode="json", exclude_none=True))].append(req)
    scale = total / len(reqs)
    queue = queue_for(kind, options.priority)
    concurrency = settings.queue_concurrency.get(queue, 2)
    requirements = Requirements.model_validate(options.requirements.model_dump())
    out: list[EstimateGroup] = []
    cost = 0.0
    seconds = 0.0
    unplaceable = 0
    placed_items = 0
    for (model, _tokens), members in groups.items():
        sample = members[0]
        n = round(len(members) * scale)
        group = EstimateGroup(model=model, items=n, queue=queue, queue_concurrency=concurrency)
        spec = sample.spec.model_dump(mode="json", exclude_none=True)
        timeout = options.timeout_seconds or settings.default_timeout_seconds
        try:
            placement = place(pipeline.providers_for(tenant_id), kind, spec, requirements, timeout, stats=health.stats,
                              monitor=health.snapshot(), seed="estimate")
        except CapacityBusy as exc:
            group.unplaceable = f"every fitting offer is busy right now (items would wait): {exc}"
        except NoPlacement as exc:
            group.unplaceable = str(exc)
        if group.unplaceable:
            unplaceable += n
            out.append(group)
            continue
        offer = placement.offer
        measured = _measured_seconds(tenant_id, kind, offer.provider, offer.offer_id)
        hourly = not usage_priced(offer, kind) and offer.price_per_hour > 0
        per_item_cost = placement.estimated_cost
        if usage_priced(offer, kind):  # billed per token: each item's own length counts (audio differs)
            per_item_cost = sum(estimate_cost(offer, kind, m.spec.model_dump(mode="json", exclude_none=True), timeout)
                                for m in members) / len(members)
        if measured is not None:
            per_item_seconds = measured
            if hourly:
                per_item_cost = offer.price_per_hour * measured / 3600
        elif hourly:
            per_item_seconds = placement.estimated_cost * 3600 / offer.price_per_hour
        else:
            per_item_seconds = _DEFAULT_SECONDS.get(kind, 60.0)
        parallel = max(1, sum(c.offer.capacity for c in placement.candidates))
        group_seconds = -(-n // parallel) * per_item_seconds
        group = group.model_copy(update={
            "provider": offer.provider, "offer": offer_key(offer), "gpu": offer.gpu,
            "price_per_hour": None if usage_priced(offer, kind) else offer.price_per_hour,
            "price_per_1k_tokens": offer.price_per_1k_tokens if usage_priced(offer, kind) else None,
            "cost_per_item": round(per_item_cost, 8), "seconds_per_item": round(per_item_seconds, 3),
            "seconds_source": "measured" if measured is not None else ("placement" if hourly else "default"),
            "parallel": parallel,
            "rationale": placement.rationale})
        cost += per_item_cost * n
        seconds += group_seconds
        placed_items += n
        out.append(group)
    return Estimate(items=total, sampled=len(reqs), estimated_cost=round(cost, 6),
                    cost_per_item=round(cost / placed_items, 8) if placed_items else None,
                    estimated_seconds=round(seconds, 1) if placed_items else None,
                    unplaceable_items=unplaceable, groups=out, at=utcnow())


def estimate_items(kind: str, options: JobOptions, items: list[ItemIn], total: int | None, settings: Settings,
                   tenant_id: uuid.UUID | None, field: str = "items") -> Estimate:
    """Validate the items like real ones (a bad item is a 422 naming it), then estimate."""
    check_options(kind, options)
    reqs = [job_request(None, kind, options, item, f"{field}.{i}") for i, item in enumerate(items)]
    return estimate(kind, options, reqs, total or len(items), settings, tenant_id)
