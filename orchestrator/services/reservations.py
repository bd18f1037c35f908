"""Reservations: every piece of rented capacity, from the moment before we ask for it until
after it is given back and paid for.

``requested`` (row + budget hold, written before any provider call) → ``provisioning`` (the
provider is being asked) → ``active`` (running) → ``releasing`` → ``released``; ``failed``
when nothing was rented. Settlement — freeing the hold, adding the real cost to the ledger,
the job and the cost entries — happens exactly once, guarded by the state change into a
final state.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, insert, literal, select, update
from sqlalchemy.orm import Session

from orchestrator.clock import as_utc, utcnow
from orchestrator.db.engine import rows_changed, session_scope
from orchestrator.db.models import RESERVATIONS, Job, Reservation
from orchestrator.errors import Conflict
from orchestrator.scheduling.placement import usage_priced
from orchestrator.services import budgets
from orchestrator.settings import get_settings
from providers.base import (
    LABEL_PREFIX,
    ExternalResource,
    Lease,
    NotYetReleased,
    Offer,
    Provider,
    ProviderError,
    RunHandle,
)
from providers.registry import get_providers

log = logging.getLogger(__name__)

REQUESTED, PROVISIONING, ACTIVE, RELEASING, RELEASED, FAILED = (
    "requested", "provisioning", "active", "releasing", "released", "failed")
LIVE = (REQUESTED, PROVISIONING, ACTIVE, RELEASING)
FINAL = (RELEASED, FAILED)
_R = RESERVATIONS.c


def label_for(reservation_id: uuid.UUID) -> str:
    return f"{LABEL_PREFIX}{reservation_id}"


def hold_for(offer: Offer, kind: str, estimated_cost: float, max_seconds: float) -> tuple[float, float]:
    """(amount, rate) to hold: rented time for the longest the capacity may live, or the usage estimate."""
    if offer.price_per_hour <= 0 or usage_priced(offer, kind):
        return round(max(estimated_cost, 0.0), 8), 0.0
    return round(offer.price_per_hour * max_seconds / 3600, 8), offer.price_per_hour


def open_reservation(session: Session, *, tenant_id: uuid.UUID, offer: Offer, amount: float, rate: float,
                     job_id: uuid.UUID | None = None, job_attempt: int | None = None,
                     request: dict[str, Any] | None = None, duration_seconds: int | None = None,
                     reservation_id: uuid.UUID | None = None, limits: list[Any] | None = None) -> uuid.UUID:
    """Hold the money and write the row (``requested``) in the caller's transaction; raises OverBudget.
    ``limits``: the applicable budgets, if already looked up."""
    held = budgets.hold(session, tenant_id, offer.provider, amount, rate, limits)
    rid = reservation_id or uuid.uuid4()
    now = utcnow()
    values = {
        "tenant_id": tenant_id, "job_id": job_id, "job_attempt": job_attempt, "label": label_for(rid), "state": REQUESTED,
        "provider": offer.provider, "offer_id": offer.offer_id, "offer": offer.model_dump(mode="json"),
        "price_per_hour": rate, "gpu": offer.gpu, "gpu_count": offer.gpu_count,
        "hold_amount": held.amount, "held_on": held.budget_ids, "hold_period": held.period, "usage_cost": 0.0,
        "cost": 0.0, "updated_at": now, "request": request, "duration_seconds": duration_seconds,
        "next_check_at": now + timedelta(seconds=get_settings().sweep_grace_seconds),
    }
    if reservation_id is None:
        session.execute(insert(Reservation).values(id=rid, created_at=now, **values))
    else:
        moved = rows_changed(session.execute(update(Reservation).where(
            Reservation.id == rid, Reservation.state == REQUESTED, Reservation.provider.is_(None)).values(**values)))
        if not moved:
            raise Conflict(f"reservation {rid} was placed or released meanwhile")
    return rid


def move(session: Session, rid: uuid.UUID, frm: tuple[str, ...], to: str, **values: Any) -> bool:
    return bool(rows_changed(session.execute(
        update(RESERVATIONS).where(_R.id == rid, _R.state.in_(frm)).values(state=to, updated_at=utcnow(), **values))))


def mark_provisioning(session: Session, rid: uuid.UUID) -> bool:
    return move(session, rid, (REQUESTED,), PROVISIONING)


def record_lease(session: Session, rid: uuid.UUID, lease: Lease, active: bool) -> bool:
    values: dict[str, Any] = {"external_id": lease.external_id or None, "lease": lease.model_dump(mode="json")}
    if active:
        values["active_at"] = utcnow()
    return move(session, rid, (PROVISIONING,), ACTIVE if active else PROVISIONING, **values)


def get(rid: uuid.UUID) -> Reservation | None:
    with session_scope() as s:
        return s.get(Reservation, rid)


# --- ending -------------------------------------------------------------------------------


def fail(rid: uuid.UUID, error: str) -> None:
    """Nothing was rented (the provider refused): free the hold, no cost."""
    _settle(rid, FAILED, 0.0, error=error, frm=(REQUESTED, PROVISIONING))


def _rented_seconds(row: Reservation, resource_started: float | None) -> float:
    lease_at = (row.lease or {}).get("reserved_at")
    started = resource_started or lease_at
    if started is None:
        return 0.0
    return max(0.0, time.time() - float(started))


def release(rid: uuid.UUID, handle: RunHandle | None = None, reason: str = "", *, lease: Lease | None = None,
            usage_cost: float = 0.0) -> bool:
    """Give the capacity back and settle its cost (plus ``usage_cost`` the run reported). Idempotent;
    False means "try again later": the row is then ``releasing`` and the sweeper retries it.

    The provider is asked first and the row written once after; a crash in between leaves the row
    live with its job ended, which the sweeper releases again (provider releases are idempotent)."""
    row = get(rid)
    if row is None:
        return True
    if row.state in FINAL:
        if lease is not None and lease.external_id and lease.external_id != row.external_id:
            _give_back_late(row, lease, handle)
        return True
    if lease is not None and not row.lease:
        row.lease = lease.model_dump(mode="json")
    provider = get_providers().get(row.provider or "")
    if row.provider is None:  # a standalone request never placed: nothing was rented
        return _settle(rid, RELEASED, 0.0, error=reason or None)
    try:
        if provider is None:
            raise ProviderError(f"provider {row.provider!r} is not configured here")
        started = _give_back(provider, row, handle)
    except (NotYetReleased, ProviderError) as exc:
        log.warning("release of reservation %s on %s not finished: %s; will retry", rid, row.provider, exc)
        with session_scope() as s:
            move(s, rid, (REQUESTED, PROVISIONING, ACTIVE), RELEASING, error=reason or row.error,
                 usage_cost=Reservation.usage_cost + usage_cost,
                 next_check_at=utcnow() + timedelta(seconds=get_settings().sweep_grace_seconds))
        return False
    cost = round(billed_rate(row) * _rented_seconds(row, started) / 3600 + usage_cost, 8)
    return _settle(rid, RELEASED, cost, error=reason or None, lease=row.lease)


def _give_back_late(row: Reservation, lease: Lease, handle: RunHandle | None) -> None:
    """The provider answered after the reservation was settled without it (its executor was presumed
    lost, and nothing carried the label yet): give the resource back now and charge its rented time.
    If the provider refuses, the reaper finds it by its label."""
    provider = get_providers().get(lease.provider)
    if provider is None:
        return
    try:
        provider.release(lease, handle)
    except (NotYetReleased, ProviderError) as exc:
        log.warning("late release of %s on %s not finished: %s; the reaper will retry", lease.external_id,
                    lease.provider, exc)
        return
    resource = ExternalResource(provider=lease.provider, external_id=lease.external_id, label=lease.label,
                                offer_id=lease.offer_id, created_at=lease.reserved_at or None,
                                price_per_hour=lease.price_per_hour)
    note = f"released {lease.provider} resource {lease.external_id} that arrived after {row.label} was settled"
    cost = charge_orphan(resource, row, note)
    log.warning("%s, cost $%.6f", note, cost)


def billed_rate(row: Reservation) -> float:
    """$/h the provider bills for holding the capacity: the lease's (0 for per-request endpoints, whose
    usage is reported as cost), else the offer's."""
    lease_price = (row.lease or {}).get("price_per_hour")
    return float(lease_price) if lease_price is not None else row.price_per_hour


def _give_back(provider: Provider, row: Reservation, handle: RunHandle | None) -> float | None:
    """Release what the reservation holds; without a recorded lease, whatever carries its label.

    Returns when the found resource was created (for pricing), if it had to be looked up."""
    if row.lease:
        provider.release(Lease(**row.lease), handle)
        return None
    if row.state == REQUESTED:
        return None
    found = [r for r in provider.owned() if r.label == row.label]
    if not found and provider.lists_all_leases and _create_may_be_in_flight(provider, row):
        # Nothing carries the label yet, but the provider may still be carrying out the create we asked
        # for: "not found" is not yet proof nothing was rented. Look again until the create must be over.
        raise NotYetReleased(f"no {provider.name} resource labelled {row.label} yet; the create may still land")
    for resource in found:
        provider.release(resource.as_lease())
    return min((r.created_at for r in found if r.created_at), default=None)


def _create_may_be_in_flight(provider: Provider, row: Reservation) -> bool:
    """Within twice the provider's start timeout of the reservation being placed, a create may still land."""
    if row.state not in (PROVISIONING, RELEASING) or row.created_at is None:
        return False
    return (utcnow() - as_utc(row.created_at)).total_seconds() < provider.start_timeout * 2  # type: ignore[operator]


def _settle(rid: uuid.UUID, to: str, rented_cost: float, *, error: str | None = None,
            frm: tuple[str, ...] = (REQUESTED, PROVISIONING, ACTIVE, RELEASING), lease: dict[str, Any] | None = None) -> bool:
    """One transaction: the row into its final state (the guarded update that makes this happen once,
    returning what settling needs), the hold turned into spend, the job's cost, and the cost entry."""
    now = utcnow()
    values: dict[str, Any] = {"state": to, "updated_at": now, "released_at": now, "next_check_at": None,
                              "cost": _R.usage_cost + rented_cost}
    if error is not None:
        values["error"] = error
    if lease is not None:
        values.update(lease=func.coalesce(_R.lease, _json(lease)),
                      external_id=func.coalesce(_R.external_id, lease.get("external_id") or None))
    with session_scope() as s:
        row = s.execute(update(RESERVATIONS).where(_R.id == rid, _R.state.in_(frm)).values(**values).returning(
            _R.cost, _R.held_on, _R.hold_period, _R.hold_amount, _R.price_per_hour, _R.job_id, _R.tenant_id,
            _R.provider, _R.offer_id, _R.usage_cost)).first()
        if row is None:
            return s.scalar(select(_R.state).where(_R.id == rid)) in (None, *FINAL)
        total = float(row.cost)
        budgets.settle(s, list(row.held_on or []), row.hold_period, row.hold_amount, row.price_per_hour, total)
        kind = "reservation"
        if row.job_id is not None:
            job = s.execute(update(Job).where(Job.id == row.job_id).values(
                cost=Job.cost + total,
                released_at=case((Job.reservation_id == rid, now), else_=Job.released_at),
            ).returning(Job.kind)).first()
            kind = job.kind if job else kind
        if total > 0 or to == RELEASED:
            budgets.record_cost(s, source=f"reservation:{rid}", tenant_id=row.tenant_id, provider=row.provider or "",
                                kind=kind, amount=total, job_id=row.job_id, reservation_id=rid,
                                note=f"{row.offer_id}: ${row.price_per_hour:.4f}/h, usage ${row.usage_cost or 0:.6f}")
    return True


def _json(value: dict[str, Any]) -> Any:
    return literal(value, RESERVATIONS.c.lease.type)


def accrued(row: Reservation) -> float:
    return billed_rate(row) * _rented_seconds(row, None) / 3600 + (row.usage_cost or 0.0)


def stop_reason(rid: uuid.UUID, poll_margin_seconds: float) -> str | None:
    """Why a running reservation must stop for money reasons, else None: its hold is (about to be)
    used up, or an operator cut one of its budgets below what is committed."""
    with session_scope() as s:
        row = s.get(Reservation, rid)
        if row is None or row.state not in (PROVISIONING, ACTIVE) or row.price_per_hour <= 0:
            return None
        if row.held_on:
            cut = budgets.over_limit(s, list(row.held_on), row.hold_period)
            if cut:
                return f"budget exhausted: {cut}"
        upcoming = billed_rate(row) * poll_margin_seconds / 3600
        if row.hold_amount > 0 and accrued(row) + upcoming >= row.hold_amount:
            return (f"budget exhausted: reservation {row.label} has used its ${row.hold_amount:.4f} hold "
                    f"at ${row.price_per_hour:.4f}/h")
    return None


# --- the reaper's view ------------------------------------------------------------------------


def by_labels(labels: list[str]) -> dict[str, Reservation]:
    if not labels:
        return {}
    with session_scope() as s:
        return {r.label: r for r in s.scalars(select(Reservation).where(Reservation.label.in_(labels)))}


def charge_orphan(resource: ExternalResource, row: Reservation | None, note: str) -> float:
    """Charge the rented time of something destroyed that no live reservation owned. The cost entry's
    source is keyed on the resource, so the reaper and a late release never both charge it."""
    seconds = max(0.0, time.time() - (resource.created_at or time.time()))
    cost = round(resource.price_per_hour * seconds / 3600, 8)
    with session_scope() as s:
        tenant_id = row.tenant_id if row else None
        if not budgets.record_cost(s, source=f"orphan:{resource.provider}:{resource.external_id}", tenant_id=tenant_id,
                                   provider=resource.provider, kind="orphan", amount=cost,
                                   job_id=row.job_id if row else None, reservation_id=row.id if row else None,
                                   note=note):
            return 0.0  # already charged
        budgets.charge_unheld(s, tenant_id, resource.provider, cost)
        if row is not None:
            s.execute(update(Reservation).where(Reservation.id == row.id).values(cost=Reservation.cost + cost))
            if row.job_id:
                s.execute(update(Job).where(Job.id == row.job_id).values(cost=Job.cost + cost))
    return cost


def overdue(now: datetime, limit: int = 500) -> list[Reservation]:
    """Reservations whose next step is overdue: releases to retry, expiries, jobs that ended."""
    with session_scope() as s:
        return list(s.scalars(select(Reservation).where(
            Reservation.state.in_(LIVE), Reservation.next_check_at.is_not(None), Reservation.next_check_at < now,
        ).order_by(Reservation.next_check_at).limit(limit)))


def bump(ids: list[uuid.UUID], seconds: float) -> None:
    """Push the next check of these reservations out: the sweeper has just sent what they wait for."""
    if ids:
        with session_scope() as s:
            s.execute(update(Reservation).where(Reservation.id.in_(ids))
                      .values(next_check_at=utcnow() + timedelta(seconds=seconds)))
