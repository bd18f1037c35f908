"""Jobs on an existing standalone reservation.

A reservation's capacity runs an agent (``providers/instance/wrapper.py`` without a command) that
asks ``POST /v1/reservations/{id}/claim`` for work with the reservation's own token. A job
submitted with ``reservation_id`` is not placed and rents nothing: dispatch binds it to the
reservation, execute marks it running there, the agent claims it (getting a fresh job-scoped
token for its report), and poll finishes it from the report — or fails it when the reservation
ends first. The reservation's rented time is paid by the reservation, not by its jobs.
"""

from __future__ import annotations

import hmac
import secrets
import uuid
from typing import Any

from sqlalchemy import select, update

from orchestrator.clock import utcnow
from orchestrator.db.engine import rows_changed, session_scope
from orchestrator.db.models import Job, Reservation
from orchestrator.domain import JobStatus
from orchestrator.errors import GpufleetError, InvalidInput
from orchestrator.services import reports, reservations
from orchestrator.services.run_spec import job_spec
from orchestrator.services.snapshots import snapshot
from orchestrator.settings import get_settings

S = JobStatus


class ReservationEnded(GpufleetError):
    """The agent should stop: its reservation is over."""


class BadAgentToken(Exception):
    pass


def agent_env(rid: uuid.UUID, token: str, duration_seconds: int) -> dict[str, str]:
    """What the agent on a standalone reservation's capacity needs to take jobs."""
    settings = get_settings()
    base = (settings.callback_url or settings.api_url).rstrip("/")
    return {"GPUFLEET_AGENT_URL": f"{base}/v1/reservations/{rid}/claim", "GPUFLEET_AGENT_TOKEN": token,
            "GPUFLEET_AGENT_SECONDS": str(duration_seconds)}


def check_usable(session: Any, tenant_id: uuid.UUID, rid: uuid.UUID, kind: str, spec: dict[str, Any]) -> None:
    """At submit: the reservation is this tenant's, standalone, not over, and the job can run there."""
    row = session.get(Reservation, rid)
    if row is None or row.tenant_id != tenant_id or row.job_id is not None:
        raise InvalidInput("reservation_id", f"no standalone reservation {rid}")
    if row.state in reservations.FINAL or row.state == reservations.RELEASING:
        raise InvalidInput("reservation_id", f"reservation {rid} is {row.state}")
    if not spec.get("command"):
        raise InvalidInput("spec.command", f"{kind} jobs on a reservation run a command on its capacity")


def claim(rid: uuid.UUID, token: str) -> dict[str, Any] | None:
    """The next job bound to this reservation for its agent, or None. Raises BadAgentToken or
    ReservationEnded (the agent then exits)."""
    with session_scope() as s:
        row = s.execute(select(Reservation.state, Reservation.agent_token_hash, Reservation.label)
                        .where(Reservation.id == rid)).first()
    if row is None or not row.agent_token_hash or not hmac.compare_digest(row.agent_token_hash, reports.token_hash(token)):
        raise BadAgentToken()
    if row.state not in (reservations.PROVISIONING, reservations.ACTIVE):
        raise ReservationEnded(f"reservation {rid} is {row.state}")
    for _ in range(5):  # another agent may take the same job first: try the next one
        with session_scope() as s:
            job_id = s.scalar(select(Job.id).where(Job.use_reservation_id == rid, Job.status == S.running.value,
                                                   Job.claimed_at.is_(None)).order_by(Job.created_at).limit(1))
            if job_id is None:
                return None
            job_token = secrets.token_urlsafe(24)
            taken = rows_changed(s.execute(update(Job).where(
                Job.id == job_id, Job.status == S.running.value, Job.claimed_at.is_(None),
                Job.use_reservation_id == rid).values(
                claimed_at=utcnow(), callback_token_hash=reports.token_hash(job_token))))
        if not taken:
            continue
        job = snapshot(job_id)
        if job is None:
            continue
        spec = job_spec(job, row.label, job_token)
        env = {**{k: str(v) for k, v in job.spec.get("env", {}).items()}, **spec.env}
        return {"job_id": str(job.id), "attempt": job.attempt, "command": job.spec["command"], "env": env}
    return None
