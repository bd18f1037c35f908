"""/v1/batches: progress of a batch submitted in one call."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from orchestrator.db.engine import session_scope
from orchestrator.domain import BatchOut
from orchestrator.services import jobs

from ..deps import TenantDep

router = APIRouter(prefix="/v1/batches", tags=["batches"])


@router.get("/{batch_id}", response_model=BatchOut, name="get_batch")
def get_batch(batch_id: uuid.UUID, tenant: TenantDep) -> BatchOut:
    with session_scope() as s:
        return jobs.batch_summary(s, tenant, batch_id)
