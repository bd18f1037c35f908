"""The answer to "why there?" (``GET /v1/jobs/{id}/placement``, ``gpufleet why``): the strategy and
data class the job was placed under, the best fitting options with their score components, every
rejected provider and rejected offer with its reason — up to ``MAX_LISTED_REJECTIONS`` offers, then
counted per provider and reason (``rejected_total``, ``rejected_summary``) — and the attempt history
(failovers, waits, budget refusals)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from orchestrator.clock import as_utc
from orchestrator.services import jobs


def explain(session: Session, tenant_id: uuid.UUID, job_id: uuid.UUID) -> dict[str, Any]:
    job = jobs.get_job(session, tenant_id, job_id)
    placement: dict[str, Any] = dict(job.placement or {})
    history = [{"at": str(as_utc(e.at)), "attempt": e.attempt, "actor": e.actor,
                "from": e.from_status, "to": e.to_status, "reason": e.reason}
               for e in jobs.events_for(session, job_id)]
    offer = placement.get("offer") or {}
    return {
        "job_id": str(job.id), "status": job.status, "attempt": job.attempt,
        "provider": job.provider, "offer": f"{offer['provider']}/{offer['offer_id']}" if offer else None,
        "strategy": placement.get("strategy"), "data_class": placement.get("data_class"),
        "rationale": placement.get("rationale"), "estimated_cost": placement.get("estimated_cost"),
        "cost": job.cost, "considered": placement.get("considered", 0),
        "scores": placement.get("scores", []), "rejected": placement.get("rejected", {}),
        # Placements stored before rejections were counted listed every one of them.
        "rejected_total": placement.get("rejected_total", len(placement.get("rejected") or {})),
        "rejected_summary": placement.get("rejected_summary", []),
        "excluded_after_failures": list(job.excluded_offers or []),
        # While it waits, the job's error says what it waits for (capacity, budget, an unhealthy provider).
        "waiting_for": job.error if job.status == "queued" else None,
        "history": history,
    }
