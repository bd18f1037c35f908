"""Tables. Postgres is the source of truth: a job exists once its row is committed."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# none_as_null: a Python None must be SQL NULL, or "IS NULL" queries would miss it.
JSONType = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
# SQLite has no 64-bit autoincrement type other than INTEGER PRIMARY KEY.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _now_default() -> Any:
    return func.now()


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Batch(Base):
    """A set of jobs tracked as one. ``POST /v1/jobs/batch`` makes one in a single call (kind ``jobs``);
    a batch run (``services/batches.py``) declares ``size`` items up front and receives them in chunks,
    so done-ness is "``size`` jobs terminal", never a state that could disagree with the jobs."""

    __tablename__ = "batches"
    # Creating a batch run again with the same key (a restarted client) finds the first one.
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    size: Mapped[int] = mapped_column(Integer)
    name: Mapped[str | None] = mapped_column(String(200))
    # The job kind of every item, or "jobs" for a mixed batch submitted in one call.
    kind: Mapped[str] = mapped_column(String(32), server_default="jobs")
    # open → cancelled; finished-ness comes from the jobs' counts.
    state: Mapped[str] = mapped_column(String(16), server_default="open")
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    output_uri: Mapped[str | None] = mapped_column(Text)
    # What placement would have charged at creation (``services.batches.estimate``), shown next to actuals.
    estimate: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # Job options applied to every item (priority, requirements, spec defaults) and the client's own notes.
    options: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        Index("ix_jobs_status_next_check", "status", "next_check_at"),
        Index("ix_jobs_unreleased", "released_at", "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    priority: Mapped[str] = mapped_column(String(16))
    queue: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    requirements: Mapped[dict[str, Any]] = mapped_column(JSONType)
    labels: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    max_attempts: Mapped[int] = mapped_column(Integer)
    timeout_seconds: Mapped[int] = mapped_column(Integer)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64))
    batch_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("batches.id", ondelete="SET NULL"), index=True)
    provider: Mapped[str | None] = mapped_column(String(64))
    offer_id: Mapped[str | None] = mapped_column(String(200))
    price_per_hour: Mapped[float | None] = mapped_column(Float)
    placement: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # Offers that failed this job, as "provider/offer" — placement skips them on retry.
    excluded_offers: Mapped[list[str]] = mapped_column(JSONType, default=list)
    run_handle: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    cost: Mapped[float] = mapped_column(Float, default=0.0)
    duration_seconds: Mapped[float | None] = mapped_column(Float)
    # When the sweeper should next expect progress; overdue non-terminal jobs are re-published.
    next_check_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The reservation of the current attempt (the capacity this attempt rents or runs on).
    reservation_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    # Run on this existing reservation instead of renting new capacity (or, placed on a warm pool, the
    # member this attempt is bound to).
    use_reservation_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, index=True)
    # The outcome a rented instance reported to the callback, for the attempt in it; secrets never stored:
    # only the hash of the job-scoped callback token.
    report: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    callback_token_hash: Mapped[str | None] = mapped_column(String(64))
    # When the agent on the reservation took this job (jobs on an existing reservation only).
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The teacher/student pair this job answers for (distillation), and which side it is.
    pair_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    pair_role: Mapped[str | None] = mapped_column(String(16))
    # Runs that were lost after they started (preempted, host gone, a retryable exit) and ran again,
    # and the work they lost: time since the last checkpoint (or since the start) when each ended.
    restarts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lost_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # Characters of output kept for the job (job_logs), checked against the per-job limit.
    log_chars: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class JobCheckpoint(Base):
    """A checkpoint a run reported (``GPUFLEET_CHECKPOINT {"step": …, "uri": …}`` on its output): the
    next run of the job resumes from the latest one. One row per step, however often it is reported."""

    __tablename__ = "job_checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(BigInteger)
    uri: Mapped[str] = mapped_column(Text)
    reported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())


class JobLog(Base):
    """A chunk of a run's output, in the order it arrived (``id``): what ``gpufleet logs`` shows."""

    __tablename__ = "job_logs"
    __table_args__ = (Index("ix_job_logs_job_id_id", "job_id", "id"), Index("ix_job_logs_at", "at"))

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    stream: Mapped[str] = mapped_column(String(8))
    text: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())


class Reservation(Base):
    """Rented capacity, recorded before the provider is called and kept after it is given back.

    ``requested → provisioning → active → releasing → released | failed``. The label is what the
    provider stores on the resource; the reaper matches provider listings against it. The budget
    hold (``hold_amount`` on the budgets in ``held_on``) is taken with the row and settled, with the
    real cost, exactly once when the row reaches ``released`` or ``failed``.
    """

    __tablename__ = "reservations"
    __table_args__ = (
        Index("ix_reservations_state_next_check", "state", "next_check_at"),
        Index("ix_reservations_tenant_created", "tenant_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    job_attempt: Mapped[int | None] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(100), unique=True)
    state: Mapped[str] = mapped_column(String(16))
    provider: Mapped[str | None] = mapped_column(String(64))
    offer_id: Mapped[str | None] = mapped_column(String(200))
    offer: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    external_id: Mapped[str | None] = mapped_column(String(200))
    lease: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    price_per_hour: Mapped[float] = mapped_column(Float, default=0.0)
    gpu: Mapped[str | None] = mapped_column(String(100))
    gpu_count: Mapped[int] = mapped_column(Integer, default=0)
    # What a standalone reservation asked for (POST /v1/reservations); None for a job's own capacity.
    request: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # Hash of the token the agent on a standalone reservation's capacity uses to take jobs.
    agent_token_hash: Mapped[str | None] = mapped_column(String(64))
    duration_seconds: Mapped[int | None] = mapped_column(Integer)
    hold_amount: Mapped[float] = mapped_column(Float, default=0.0)
    held_on: Mapped[list[Any]] = mapped_column(JSONType, default=list)
    hold_period: Mapped[str | None] = mapped_column(String(7))
    usage_cost: Mapped[float] = mapped_column(Float, default=0.0)
    cost: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text)
    next_check_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())
    active_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Budget(Base):
    """A spending limit on everything (global), one provider, or one tenant.

    ``monthly_limit`` caps spend plus holds in a calendar month (UTC); ``hourly_limit`` caps the
    burn rate — the summed $/h of capacity held at once."""

    __tablename__ = "budgets"
    __table_args__ = (UniqueConstraint("scope", "scope_key"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    scope: Mapped[str] = mapped_column(String(16))
    scope_key: Mapped[str] = mapped_column(String(100), default="")
    monthly_limit: Mapped[float | None] = mapped_column(Float)
    hourly_limit: Mapped[float | None] = mapped_column(Float)
    rate_held: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())


class BudgetPeriod(Base):
    """The ledger of one budget in one month: settled spend and outstanding holds."""

    __tablename__ = "budget_periods"

    budget_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("budgets.id", ondelete="CASCADE"), primary_key=True)
    period: Mapped[str] = mapped_column(String(7), primary_key=True)
    spent: Mapped[float] = mapped_column(Float, default=0.0)
    held: Mapped[float] = mapped_column(Float, default=0.0)


class CostEntry(Base):
    """One settled charge. ``source`` is unique, so a replayed settlement cannot charge twice."""

    __tablename__ = "cost_entries"
    __table_args__ = (Index("ix_cost_entries_tenant_at", "tenant_id", "at"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(200), unique=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default(), index=True)
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("tenants.id", ondelete="SET NULL"))
    job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    reservation_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    provider: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    amount: Mapped[float] = mapped_column(Float)
    note: Mapped[str] = mapped_column(Text, default="")


# Core tables for hot-path statements (the ORM's bulk-update bookkeeping costs more than the SQL).
JOBS: Table = Job.__table__  # type: ignore[assignment]
JOB_EVENTS: Table = JobEvent.__table__  # type: ignore[assignment]
RESERVATIONS: Table = Reservation.__table__  # type: ignore[assignment]


class DistillationPair(Base):
    """One input answered by a teacher and a student: what the student learns from, and how well it
    already agrees. Written when the request arrives (``pending``), completed when both answers are in.
    Indexed for streaming exports by time, model pair and acceptance; old rows are deleted in batches
    by the retention sweep, so the table does not grow without bound."""

    __tablename__ = "distillation_pairs"
    __table_args__ = (
        Index("ix_distillation_pairs_tenant_created", "tenant_id", "created_at"),
        Index("ix_distillation_pairs_models_created", "teacher_model", "student_model", "created_at"),
        Index("ix_distillation_pairs_accepted_created", "accepted", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | complete | failed
    source: Mapped[str] = mapped_column(String(16), default="query")  # query | job | inference | shadow
    teacher_model: Mapped[str] = mapped_column(String(200))
    student_model: Mapped[str] = mapped_column(String(200))
    tags: Mapped[list[str]] = mapped_column(JSONType, default=list)
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JSONType)
    parent_job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    teacher_job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    student_job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    teacher_output: Mapped[str | None] = mapped_column(Text)
    student_output: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    teacher_tokens: Mapped[int | None] = mapped_column(Integer)
    student_tokens: Mapped[int | None] = mapped_column(Integer)
    teacher_latency_ms: Mapped[float | None] = mapped_column(Float)
    student_latency_ms: Mapped[float | None] = mapped_column(Float)
    teacher_cost: Mapped[float | None] = mapped_column(Float)
    student_cost: Mapped[float | None] = mapped_column(Float)
    teacher_logprob: Mapped[float | None] = mapped_column(Float)
    # Quality of the teacher's answer as training data (0..1) and how it was judged.
    score: Mapped[float | None] = mapped_column(Float)
    score_method: Mapped[str | None] = mapped_column(String(16))
    # How closely the student's answer matches the teacher's (0..1): the evaluation signal.
    agreement: Mapped[float | None] = mapped_column(Float)
    accepted: Mapped[bool | None] = mapped_column(Boolean)
    error: Mapped[str | None] = mapped_column(Text)


class ModelVersion(Base):
    """A trained student in the registry: where its weights are, how it scored, which stage it is in."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("tenant_id", "name", "version"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(16), default="staging")  # staging | production | archived
    artifact_uri: Mapped[str | None] = mapped_column(String(2000))
    # The model name inference jobs use to reach this version (what a provider serves it as).
    served_model: Mapped[str | None] = mapped_column(String(200))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    params: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    training_job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class TrafficRoute(Base):
    """How much of a teacher model's traffic the production student takes (canary), and how much of
    the student's traffic is still shadowed by the teacher to keep measuring it."""

    __tablename__ = "traffic_routes"
    __table_args__ = (UniqueConstraint("tenant_id", "teacher_model"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    teacher_model: Mapped[str] = mapped_column(String(200))
    student_name: Mapped[str] = mapped_column(String(200))
    share: Mapped[float] = mapped_column(Float, default=0.0)
    shadow_rate: Mapped[float] = mapped_column(Float, default=0.1)
    auto: Mapped[bool] = mapped_column(Boolean, default=True)
    step: Mapped[float] = mapped_column(Float, default=0.1)
    max_share: Mapped[float] = mapped_column(Float, default=0.9)
    min_agreement: Mapped[float] = mapped_column(Float, default=0.8)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())


class ProviderHealth(Base):
    """The health monitor's view of one provider, shared by every worker: the last check, the circuit
    breaker (closed | open | half_open) and the measurements it decides on. One row per provider, written
    by the beat's checks (a row lock per update) and by the pipeline after real work (one UPDATE)."""

    __tablename__ = "provider_health"

    provider: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The provider's own answer at the last check (real work does not change it; it feeds the breaker).
    healthy: Mapped[bool] = mapped_column(Boolean, default=True)
    breaker: Mapped[str] = mapped_column(String(16), default="closed")
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    # Moving average of failures (0..1), and how many observations it has seen since the breaker closed.
    error_rate: Mapped[float] = mapped_column(Float, default=0.0)
    observations: Mapped[int] = mapped_column(Integer, default=0)
    latency_ewma_ms: Mapped[float | None] = mapped_column(Float)
    # The last (at most 50) latencies in ms of health checks and of real requests, for the p95s:
    # {"checks": [...], "requests": [...]} (a plain list, from before requests were measured, is checks).
    latency_samples: Mapped[list[float] | dict[str, Any]] = mapped_column(JSONType, default=list)
    detail: Mapped[str] = mapped_column(String(500), default="")
    opened_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the monitor last looked at it: older than health_max_age_seconds, placement asks the provider.
    checked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=_now_default())


PROVIDER_HEALTH: Table = ProviderHealth.__table__  # type: ignore[assignment]
