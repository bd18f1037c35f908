"""Warm pools of rented instances: capacity a tenant keeps rented so jobs start in seconds, not after a
marketplace boot — grown from the queue and shrunk when idle by the autoscaler, like an ASG.

A member is an ordinary standalone reservation (``request.pool`` names its pool), so everything
reservations guarantee holds: the row exists before anything is rented, its price and lifetime are
recorded, budgets hold it, the reaper and the sweeper watch it, and its agent takes jobs. A job
placed on the pool is bound to one idle member (``use_reservation_id``, under that member's row
lock, so one job per member) and runs there through the agent; it costs nothing itself, since the
member's rent is already paid and recorded on the member.

The scaling memory (when the pool last grew, when it last had work) is read back from the rows, so
any worker can take the beat's turn.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import func, select, update

from orchestrator.clock import as_utc
from orchestrator.db.engine import rows_changed, session_scope
from orchestrator.db.models import Job, Reservation, Tenant
from orchestrator.domain import JobStatus
from orchestrator.scheduling.queues import provider_queue
from orchestrator.services import messaging, reservation_requests, reservations
from providers.pools.scaling import Limits, ScaleState, decide

log = logging.getLogger(__name__)
R = reservations
LIVE = (R.REQUESTED, R.PROVISIONING, R.ACTIVE)
WORKING = (JobStatus.placing.value, JobStatus.running.value)


class WarmPoolConfig(BaseModel):
    """A ``type: warm`` entry in providers.yaml."""

    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(min_length=1, description="The tenant whose jobs use the pool and whose budget pays for it.")
    provider: str = Field(min_length=1, description="The marketplace the members are rented from (e.g. vastai).")
    gpu: list[str] = Field(min_length=1)
    gpu_count: int = Field(default=1, ge=1, le=64)
    max_price_per_hour: float | None = Field(default=None, gt=0)
    min_instances: int = Field(default=0, ge=0)
    max_instances: int = Field(default=2, ge=1, le=100)
    idle_seconds: float = Field(default=300, ge=0, description="Idle this long before shrinking to min_instances.")
    cooldown_seconds: float = Field(default=60, ge=0)
    instance_seconds: int = Field(default=3600, ge=60, description="Each member's reservation length.")

    @model_validator(mode="after")
    def _limits(self) -> WarmPoolConfig:
        if self.min_instances > self.max_instances:
            raise ValueError("min_instances must not exceed max_instances")
        return self


def _tenant_id(session: Any, name: str) -> uuid.UUID | None:
    return session.scalar(select(Tenant.id).where(Tenant.name == name))


def tenant_id_of(name: str) -> uuid.UUID | None:
    with session_scope() as s:
        return _tenant_id(s, name)


def _members(session: Any, pool: str, states: tuple[str, ...] = LIVE) -> list[Reservation]:
    return list(session.scalars(select(Reservation).where(
        Reservation.request["pool"].as_string() == pool, Reservation.state.in_(states))
        .order_by(Reservation.created_at)))


def _busy(session: Any, rids: list[uuid.UUID]) -> set[uuid.UUID]:
    if not rids:
        return set()
    return set(session.scalars(select(Job.use_reservation_id).where(
        Job.use_reservation_id.in_(rids), Job.status.in_(WORKING))))


def idle_members(pool: str) -> list[tuple[uuid.UUID, str]]:
    """(id, region) of the active members with no job: the pool's free capacity."""
    with session_scope() as s:
        active = [m for m in _members(s, pool, (R.ACTIVE,)) if m.lease]
        busy = _busy(s, [m.id for m in active])
    return [(m.id, (m.offer or {}).get("region", "")) for m in active if m.id not in busy]


def bind(pool: str, member_id: uuid.UUID, job_id: uuid.UUID, attempt: int) -> bool:
    """Give the running job this member if it is still idle. The member's row lock makes the
    check-and-bind atomic across workers."""
    with session_scope() as s:
        member = s.scalars(select(Reservation).where(Reservation.id == member_id, Reservation.state == R.ACTIVE)
                           .with_for_update(skip_locked=True)).first()
        if member is None or (member.request or {}).get("pool") != pool or _busy(s, [member_id]):
            return False
        return bool(rows_changed(s.execute(update(Job).where(
            Job.id == job_id, Job.attempt == attempt, Job.status == JobStatus.running.value)
            .values(use_reservation_id=member_id, claimed_at=None))))


def _memory(session: Any, pool: str, members: list[Reservation], now: float) -> ScaleState:
    """When the pool last grew (its newest member), and when it last had work (a member's last job's
    end, else when the newest member came up)."""
    rids = [m.id for m in members]
    last_job = session.scalar(select(func.max(Job.finished_at)).where(Job.use_reservation_id.in_(rids))) if rids else None
    newest = max((as_utc(m.created_at) for m in members), default=None)  # type: ignore[type-var]
    came_up = max((as_utc(m.active_at) for m in members if m.active_at), default=None)  # type: ignore[type-var]
    active = max((t for t in (as_utc(last_job), came_up) if t is not None), default=None)
    return ScaleState(last_resize_at=newest.timestamp() if newest else None,  # type: ignore[union-attr]
                      last_active_at=active.timestamp() if active else (now if members else None))


def autoscale(pool: str, config: WarmPoolConfig, depth: int, in_flight: int, waited_seconds: float) -> str | None:
    """Grow to the members the queue asks for (within limits and cooldown), or release idle members once
    the pool has been idle long enough; returns the decision, or None when nothing changes."""
    now = time.time()
    limits = Limits(min_size=config.min_instances, max_size=config.max_instances, member_concurrency=1,
                    idle_seconds=config.idle_seconds, cooldown_seconds=config.cooldown_seconds)
    with session_scope() as s:
        tenant_id = _tenant_id(s, config.tenant)
        if tenant_id is None:
            return f"no tenant {config.tenant!r}: nothing rented"
        members = _members(s, pool)
        decision = decide(limits, _memory(s, pool, members, now), current=len(members), queue_depth=depth,
                          in_flight=in_flight, now=now, waited_seconds=waited_seconds)
        if decision.size is None or decision.size == len(members):
            return None
        if decision.size > len(members):
            body = reservation_requests.ReservationCreate(
                gpu=config.gpu, gpu_count=config.gpu_count, duration_seconds=config.instance_seconds,
                max_price_per_hour=config.max_price_per_hour, provider=config.provider, pool=pool,
                max_wait_seconds=max(60, int(config.cooldown_seconds * 5)))
            grown = [reservation_requests.create(s, tenant_id, body).id for _ in range(decision.size - len(members))]
            shrunk: list[Reservation] = []
        else:
            grown, shrunk = [], []
            for member in reversed(members):  # newest first; a busy member (or one being bound) stays
                if len(shrunk) >= len(members) - decision.size:
                    break
                locked = s.scalars(select(Reservation).where(Reservation.id == member.id)
                                   .with_for_update(skip_locked=True)).first()
                if locked is None or _busy(s, [member.id]):
                    continue
                # Marked releasing under the lock bind() takes, so no job is bound to it from now on.
                if member.provider is None or R.move(s, member.id, LIVE, R.RELEASING,
                                                     error=f"warm pool {pool} shrank"):
                    shrunk.append(member)
    for rid in grown:
        messaging.send(messaging.PLACE_RESERVATION, [str(rid)], "default")
    for member in shrunk:
        if member.provider is None:
            R.release(member.id, reason=f"warm pool {pool} shrank")
        else:
            messaging.send(messaging.RELEASE_RESERVATION, [str(member.id)], provider_queue(member.provider))
    log.info("warm pool %s: %s", pool, decision.reason)
    return decision.reason
