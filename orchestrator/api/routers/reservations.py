"""/v1/reservations: rent N GPUs for a duration; read them; give them back early."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel

from orchestrator.clock import as_utc
from orchestrator.db.engine import session_scope
from orchestrator.db.models import Reservation
from orchestrator.scheduling.queues import provider_queue
from orchestrator.services import agents, messaging, reservation_requests, reservations

from ..deps import TenantDep, bearer_scheme

router = APIRouter(prefix="/v1/reservations", tags=["reservations"])


class ReservationOut(BaseModel):
    id: uuid.UUID
    state: str
    label: str
    provider: str | None
    offer_id: str | None
    external_id: str | None
    gpu: str | None
    gpu_count: int
    price_per_hour: float
    hold_amount: float
    cost: float
    job_id: uuid.UUID | None
    request: dict[str, Any] | None
    offer: dict[str, Any] | None
    error: str | None
    created_at: datetime
    active_at: datetime | None
    expires_at: datetime | None
    released_at: datetime | None


def _out(row: Reservation) -> ReservationOut:
    out = ReservationOut.model_validate(row, from_attributes=True)
    for field in ("created_at", "active_at", "expires_at", "released_at"):
        setattr(out, field, as_utc(getattr(out, field)))
    return out


@router.post("", status_code=201, response_model=ReservationOut, name="create_reservation")
def create_reservation(body: reservation_requests.ReservationCreate, tenant: TenantDep) -> ReservationOut:
    """Reserve capacity; it waits in the queue while nothing fits and is served when capacity appears."""
    with session_scope() as s:
        out = _out(reservation_requests.create(s, tenant, body))
    messaging.send(messaging.PLACE_RESERVATION, [str(out.id)], "default")
    return out


@router.get("", response_model=list[ReservationOut], name="list_reservations")
def list_reservations(tenant: TenantDep, state: str | None = None,
                      limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> list[ReservationOut]:
    with session_scope() as s:
        return [_out(r) for r in reservation_requests.list_for(s, tenant, state, limit)]


@router.get("/{reservation_id}", response_model=ReservationOut, name="get_reservation")
def get_reservation(reservation_id: uuid.UUID, tenant: TenantDep) -> ReservationOut:
    with session_scope() as s:
        return _out(reservation_requests.get(s, tenant, reservation_id))


@router.delete("/{reservation_id}", response_model=ReservationOut, name="delete_reservation")
def delete_reservation(reservation_id: uuid.UUID, tenant: TenantDep) -> ReservationOut:
    """Give the capacity back now; the cost so far is settled when the provider confirms."""
    with session_scope() as s:
        out = _out(reservation_requests.cancel(s, tenant, reservation_id))
    if out.provider is None:  # never placed: nothing to give back but the request itself
        reservations.release(out.id, reason="deleted by the caller")
        with session_scope() as s:
            return _out(reservation_requests.get(s, tenant, reservation_id))
    messaging.send(messaging.RELEASE_RESERVATION, [str(out.id)], provider_queue(out.provider))
    return out


@router.post("/{reservation_id}/claim", name="claim_reservation_job",
             responses={204: {"description": "No job waiting"}, 401: {"description": "Missing or wrong agent token"},
                        410: {"description": "The reservation has ended: the agent should exit"}})
def claim_job(reservation_id: uuid.UUID,
              credentials: Annotated[HTTPAuthorizationCredentials | None, bearer_scheme]) -> Any:
    """Called by the agent on a reservation's capacity with GPUFLEET_AGENT_TOKEN (not an API key):
    the next job submitted onto this reservation, with the env it runs with (its own report token)."""
    if credentials is None:
        raise HTTPException(401, "missing agent token: send 'Authorization: Bearer $GPUFLEET_AGENT_TOKEN'")
    try:
        job = agents.claim(reservation_id, credentials.credentials)
    except agents.BadAgentToken:
        raise HTTPException(401, "invalid agent token") from None
    except agents.ReservationEnded as exc:
        raise HTTPException(410, str(exc)) from None
    return job if job is not None else Response(status_code=204)
