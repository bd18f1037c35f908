"""Standalone reservations (``POST /v1/reservations``): N GPUs of a model for a duration.

The row is written first (``requested``, no provider yet); ``place`` picks the cheapest offer
that fits — on the named provider, then its fallbacks, or anywhere for ``auto`` — and holds
``price × duration`` against the budgets; ``provision`` rents it on the provider's queue;
``watch`` follows it to ``active`` and gives it back when it expires, is deleted, or vanishes.
When nothing fits right now the request stays ``requested`` and is tried again with backoff,
so it is served when capacity appears, until its ``max_wait_seconds`` runs out.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from datetime import timedelta
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from orchestrator.clock import as_utc, utcnow
from orchestrator.db.engine import session_scope
from orchestrator.db.models import Reservation
from orchestrator.errors import CapacityBusy, Conflict, InvalidInput, NoPlacement, NotFound
from orchestrator.scheduling.placement import offer_key, place
from orchestrator.scheduling.queues import provider_queue
from orchestrator.services import agents, budgets, health, messaging, reports, reservations
from orchestrator.services.budgets import OverBudget
from orchestrator.settings import get_settings
from providers.base import JobSpec, Lease, Offer, ProviderError, Requirements, RunHandle
from providers.instance import agent_command
from providers.registry import get_providers

log = logging.getLogger(__name__)
R = reservations
KIND: Final = "command"  # what a reservation's capacity must be able to run
RETRY_SECONDS, MAX_RETRY_SECONDS = 2.0, 60.0


class ReservationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gpu: list[str] = Field(min_length=1, description="Acceptable GPU models, best first is not implied: cheapest wins.")
    gpu_count: int = Field(default=1, ge=1, le=64)
    duration_seconds: int = Field(ge=60, le=30 * 24 * 3600)
    max_price_per_hour: float | None = Field(default=None, gt=0)
    provider: str = Field(default="auto", min_length=1, max_length=64, description="'auto' or a provider name.")
    fallback_providers: list[str] = Field(default_factory=list, max_length=20)
    regions: list[str] | None = None
    min_reliability: float | None = Field(default=None, ge=0, le=1)
    interruptible: bool | None = None
    max_wait_seconds: int = Field(default=3600, ge=0, le=7 * 24 * 3600,
                                  description="How long to wait for capacity or budget before giving up.")
    pool: str | None = Field(default=None, max_length=64, description=(
        "The warm pool this reservation is a member of (set by the autoscaler; its jobs run there)."))


def create(session: Session, tenant_id: uuid.UUID, body: ReservationCreate) -> Reservation:
    configured = get_providers()
    for name in ([body.provider] if body.provider != "auto" else []) + body.fallback_providers:
        if name not in configured:
            raise InvalidInput("provider", f"{name!r} is not a configured provider ({', '.join(sorted(configured))})")
    rid = uuid.uuid4()
    now = utcnow()
    session.execute(insert(Reservation).values(
        id=rid, tenant_id=tenant_id, label=R.label_for(rid), state=R.REQUESTED, request=body.model_dump(mode="json"),
        duration_seconds=body.duration_seconds, gpu=body.gpu[0], gpu_count=body.gpu_count, price_per_hour=0.0,
        hold_amount=0.0, held_on=[], usage_cost=0.0, cost=0.0, created_at=now, updated_at=now,
        next_check_at=now + timedelta(seconds=get_settings().sweep_grace_seconds)))
    return session.get_one(Reservation, rid)


def get(session: Session, tenant_id: uuid.UUID, rid: uuid.UUID) -> Reservation:
    row = session.get(Reservation, rid)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"reservation {rid} not found")
    return row


def list_for(session: Session, tenant_id: uuid.UUID, state: str | None, limit: int) -> list[Reservation]:
    query = select(Reservation).where(Reservation.tenant_id == tenant_id)
    if state:
        query = query.where(Reservation.state == state)
    return list(session.scalars(query.order_by(Reservation.created_at.desc()).limit(limit)))


def _requirements(req: ReservationCreate, provider: str | None) -> Requirements:
    return Requirements(gpu=req.gpu, gpu_count=req.gpu_count, max_price_per_hour=req.max_price_per_hour,
                        regions=req.regions, min_reliability=req.min_reliability, interruptible=req.interruptible,
                        providers=[provider] if provider else None)


# --- place ------------------------------------------------------------------------------


def place_request(rid: uuid.UUID) -> None:
    row = R.get(rid)
    if row is None or row.state != R.REQUESTED:
        return
    if row.provider is not None:  # placed, provisioning message lost
        messaging.send(messaging.PROVISION_RESERVATION, [str(rid)], provider_queue(row.provider))
        return
    req = _asked(row)
    excluded = set((row.request or {}).get("excluded", []))
    groups: list[str | None] = [None] if req.provider == "auto" else [req.provider, *req.fallback_providers]
    reasons: list[str] = []
    waiting = False
    for group in groups:
        try:
            placement = place(get_providers(), KIND, {}, _requirements(req, group), req.duration_seconds, excluded,
                              monitor=health.snapshot())
        except CapacityBusy as exc:
            waiting = True
            reasons.append(str(exc))
            continue
        except NoPlacement as exc:
            reasons.append(str(exc))
            continue
        for candidate in placement.candidates:
            amount, rate = R.hold_for(candidate.offer, KIND, candidate.estimated_cost, req.duration_seconds)
            try:
                with session_scope() as s:
                    R.open_reservation(s, tenant_id=row.tenant_id, offer=candidate.offer, amount=amount, rate=rate,
                                       reservation_id=rid, request=row.request, duration_seconds=req.duration_seconds)
            except OverBudget as exc:
                reasons.append(f"{offer_key(candidate.offer)}: {exc}")
                waiting = waiting or exc.can_wait
                continue
            except Conflict:
                return  # placed or deleted concurrently
            messaging.send(messaging.PROVISION_RESERVATION, [str(rid)], provider_queue(candidate.offer.provider))
            return
    _wait_or_fail(row, "; ".join(reasons) or "no provider offers this capacity", waiting)


def _asked(row: Reservation) -> ReservationCreate:
    """What the caller asked for; "excluded" is our own note on the request (offers that failed it)."""
    return ReservationCreate(**{k: v for k, v in (row.request or {}).items() if k != "excluded"})


def _wait_or_fail(row: Reservation, reason: str, can_wait: bool) -> None:
    req = _asked(row)
    waited = time.time() - as_utc(row.created_at).timestamp()  # type: ignore[union-attr]
    if not can_wait or waited > req.max_wait_seconds:
        why = reason if not can_wait else f"no capacity within {req.max_wait_seconds}s: {reason}"
        R.fail(row.id, why)
        return
    delay = min(MAX_RETRY_SECONDS, RETRY_SECONDS * (1 + waited / 10))
    with session_scope() as s:
        s.execute(update(Reservation).where(Reservation.id == row.id, Reservation.state == R.REQUESTED).values(
            error=f"waiting: {reason}", next_check_at=utcnow() + timedelta(seconds=delay + get_settings().sweep_grace_seconds)))
    messaging.send(messaging.PLACE_RESERVATION, [str(row.id)], "default", countdown=delay)


# --- provision --------------------------------------------------------------------------


def _keepalive(row: Reservation, agent_token: str) -> JobSpec:
    """What the rented capacity runs while reserved: the agent that takes jobs submitted onto it."""
    seconds = int(row.duration_seconds or 60)
    env = {"GPUFLEET_RESERVATION": row.label, **agents.agent_env(row.id, agent_token, seconds)}
    return JobSpec(job_id=str(row.id), kind=KIND, attempt=1, spec={"command": agent_command()},
                   timeout_seconds=seconds, env=env, label=row.label)


def provision(rid: uuid.UUID) -> None:
    row = R.get(rid)
    if row is None or row.state != R.REQUESTED or row.provider is None or row.job_id is not None:
        return
    provider = get_providers().get(row.provider)
    agent_token = secrets.token_urlsafe(24)
    with session_scope() as s:
        if not R.mark_provisioning(s, rid):
            return
        s.execute(update(Reservation).where(Reservation.id == rid).values(agent_token_hash=reports.token_hash(agent_token)))
    if provider is None:
        R.fail(rid, f"provider {row.provider!r} is no longer configured")
        return
    offer = Offer(**(row.offer or {}))
    spec = _keepalive(row, agent_token)
    try:
        lease = provider.reserve(offer, spec)
    except ProviderError as exc:
        _replace(row, offer, f"reserve on {offer_key(offer)} failed: {exc}")
        return
    with session_scope() as s:
        R.record_lease(s, rid, lease, active=False)
    try:
        handle = provider.start(lease, spec)
    except ProviderError as exc:
        R.release(rid, None, reason=f"start on {offer_key(offer)} failed: {exc}")
        return
    with session_scope() as s:
        s.execute(update(Reservation).where(Reservation.id == rid).values(
            lease={**lease.model_dump(mode="json"), "handle": handle.model_dump(mode="json")}))
    messaging.send(messaging.WATCH_RESERVATION, [str(rid)], provider_queue(provider.name), countdown=0.25)


def _replace(row: Reservation, offer: Offer, reason: str) -> None:
    """The offer could not be rented: free the hold, put the request back to be placed elsewhere."""
    with session_scope() as s:
        current = s.get(Reservation, row.id)
        if current is None or current.state != R.PROVISIONING:
            return
        budgets.settle(s, list(current.held_on or []), current.hold_period, current.hold_amount, current.price_per_hour, 0.0)
        request = dict(current.request or {})
        request["excluded"] = [*request.get("excluded", []), offer_key(offer)]
        s.execute(update(Reservation).where(Reservation.id == row.id, Reservation.state == R.PROVISIONING).values(
            state=R.REQUESTED, provider=None, offer_id=None, offer=None, hold_amount=0.0, held_on=[], price_per_hour=0.0,
            request=request, error=reason, updated_at=utcnow()))
    messaging.send(messaging.PLACE_RESERVATION, [str(row.id)], "default")


# --- watch ------------------------------------------------------------------------------


def watch(rid: uuid.UUID) -> None:
    """Follow rented capacity: activate it, notice it vanished, release it when it expires."""
    row = R.get(rid)
    if row is None or row.state not in (R.PROVISIONING, R.ACTIVE) or row.job_id is not None or not row.lease:
        return
    provider = get_providers().get(row.provider or "")
    if provider is None:
        return
    handle_data: dict[str, Any] = dict(row.lease.get("handle") or {})
    lease = Lease(**{k: v for k, v in row.lease.items() if k != "handle"})
    now = utcnow()
    if row.expires_at is not None and as_utc(row.expires_at) <= now:  # type: ignore[operator]
        R.release(rid, RunHandle(**handle_data) if handle_data else None, reason="expired")
        return
    handle = RunHandle(**handle_data) if handle_data else RunHandle(provider=provider.name, lease=lease, started_at=time.time())
    try:
        status = provider.poll(handle)
    except ProviderError as exc:
        log.warning("watching reservation %s: %s", rid, exc)
        status = None
    if status is not None and status.state != "running":
        R.release(rid, handle, reason=f"ended early: {status.error or status.state}")
        return
    delay = 5.0
    if status is not None and not status.provisioning and row.state == R.PROVISIONING:
        expires = now + timedelta(seconds=int(row.duration_seconds or 60))
        with session_scope() as s:
            R.move(s, rid, (R.PROVISIONING,), R.ACTIVE, active_at=now, expires_at=expires)
        row.expires_at = expires
    if row.expires_at is not None:
        delay = max(0.2, min(delay, (as_utc(row.expires_at) - now).total_seconds()))  # type: ignore[operator]
    with session_scope() as s:
        s.execute(update(Reservation).where(Reservation.id == rid).values(
            next_check_at=utcnow() + timedelta(seconds=delay + get_settings().sweep_grace_seconds)))
    messaging.send(messaging.WATCH_RESERVATION, [str(rid)], provider_queue(provider.name), countdown=delay)


def cancel(session: Session, tenant_id: uuid.UUID, rid: uuid.UUID) -> Reservation:
    row = get(session, tenant_id, rid)
    if row.state in R.FINAL:
        raise Conflict(f"reservation {rid} already {row.state}")
    return row


def redrive(row: Reservation) -> tuple[str, list[object], str] | None:
    """The message a standalone reservation is waiting for (the sweeper calls this when it is overdue)."""
    if row.state == R.REQUESTED:
        if row.provider is None:
            return messaging.PLACE_RESERVATION, [str(row.id)], "default"
        return messaging.PROVISION_RESERVATION, [str(row.id)], provider_queue(row.provider)
    if row.state in (R.PROVISIONING, R.ACTIVE) and row.lease:
        return messaging.WATCH_RESERVATION, [str(row.id)], provider_queue(row.provider or "none")
    if row.state in (R.PROVISIONING, R.RELEASING):
        return messaging.RELEASE_RESERVATION, [str(row.id)], provider_queue(row.provider or "none")
    return None
