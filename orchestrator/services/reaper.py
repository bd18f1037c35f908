"""The reaper: nothing rented outlives its reservation unnoticed, in either direction.

Every resource we rent carries its reservation's label (``gpufleet-<reservation id>``), and the
reservation row is written before the provider is asked. Each run compares what every provider
lists under our labels (``owned()``) with the live reservations:

- a labelled resource with no live reservation (the executor died after creating it, a release
  was lost, a duplicate was created for a label that already has one) is destroyed, and its
  rented time is charged — to the reservation's job and budgets when the label names one;
- a live reservation whose resource the provider no longer lists (preempted, host gone) is
  re-polled at once, so its job fails over instead of waiting for its next scheduled poll.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from sqlalchemy import select

from orchestrator.clock import as_utc
from orchestrator.db.engine import session_scope
from orchestrator.db.models import Job, Reservation
from orchestrator.domain import JobStatus
from orchestrator.scheduling.queues import provider_queue
from orchestrator.services import messaging, reservations
from orchestrator.services.transitions import record_event
from orchestrator.settings import get_settings
from providers.base import LABEL_PREFIX, ExternalResource, NotYetReleased, Provider, ProviderError
from providers.registry import get_providers

log = logging.getLogger(__name__)
ACTOR = "reaper"


def _owner(resource: ExternalResource, row: Reservation | None) -> bool:
    """True if a live reservation owns this resource (or is still creating it)."""
    if row is None or row.state not in reservations.LIVE or row.state == reservations.RELEASING:
        return False
    return row.external_id is None or row.external_id == resource.external_id


def reap() -> int:
    """One pass over every provider; returns how many orphaned resources were destroyed."""
    reaped = 0
    for provider in get_providers().values():
        try:
            resources = [r for r in provider.owned() if r.label.startswith(LABEL_PREFIX)]
        except ProviderError as exc:
            log.warning("reaper cannot list %s resources: %s", provider.name, exc)
            continue
        reaped += _destroy_orphans(provider, resources)
        _notice_vanished(provider, resources)
    return reaped


def _destroy_orphans(provider: Provider, resources: list[ExternalResource]) -> int:
    grace = get_settings().sweep_grace_seconds
    now = time.time()
    rows = reservations.by_labels([r.label for r in resources])
    reaped = 0
    for resource in resources:
        row = rows.get(resource.label)
        young = now - (resource.created_at or now) < grace
        if _owner(resource, row) or (young and row is None) or (row is not None and row.state == reservations.RELEASING):
            continue
        try:
            provider.release(resource.as_lease())
        except (NotYetReleased, ProviderError) as exc:
            log.warning("could not reap %s on %s: %s", resource.external_id, provider.name, exc)
            continue
        reaped += 1
        state = row.state if row else "no reservation"
        note = f"released orphaned {provider.name} resource {resource.external_id} ({resource.label}, {state})"
        cost = reservations.charge_orphan(resource, row, note)
        log.warning("%s, cost $%.6f", note, cost)
        if row is not None and row.job_id is not None:
            _job_event(row.job_id, f"{note}, cost ${cost:.6f}")
    return reaped


def _notice_vanished(provider: Provider, resources: list[ExternalResource]) -> None:
    listed = {r.external_id for r in resources}
    grace = get_settings().sweep_grace_seconds
    with session_scope() as s:
        live = s.execute(select(Reservation.id, Reservation.job_id, Reservation.job_attempt, Reservation.external_id,
                                Reservation.created_at)
                         .where(Reservation.provider == provider.name,
                                Reservation.state.in_([reservations.PROVISIONING, reservations.ACTIVE]),
                                Reservation.external_id.is_not(None))).all()
    if not live or not provider.lists_all_leases:
        return
    for row in live:
        if row.external_id in listed or not row.created_at:
            continue
        if time.time() - as_utc(row.created_at).timestamp() < grace:  # type: ignore[union-attr]
            continue
        if row.job_id is not None:
            log.warning("%s no longer lists %s of reservation %s: re-polling job %s", provider.name,
                        row.external_id, row.id, row.job_id)
            messaging.send(messaging.POLL, [str(row.job_id), row.job_attempt or 1], provider_queue(provider.name))
        else:
            reservations.release(row.id, reason=f"{provider.name} no longer lists {row.external_id} (preempted?)")


def _job_event(job_id: uuid.UUID, reason: str) -> None:
    with session_scope() as s:
        job: Any = s.execute(select(Job.status, Job.attempt).where(Job.id == job_id)).first()
        if job is not None:
            status = JobStatus(job.status)
            record_event(s, job_id, status, status, job.attempt, ACTOR, reason)
