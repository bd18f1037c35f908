"""/v1/batches: batch runs — declare, add items in chunks, progress, items, cancel, estimate.

A batch submitted in one call (POST /v1/jobs/batch) is read here too. Logic lives in services.batches;
messages are published after the transaction commits (the sweeper publishes any that are lost).
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response

from orchestrator.batch_models import AppendOut, BatchItemPage, BatchRunCreate, BatchRunOut, Estimate, EstimateIn, ItemsAppend
from orchestrator.db.engine import session_scope
from orchestrator.domain import JobStatus
from orchestrator.scheduling.queues import provider_queue
from orchestrator.services import batches, messaging

from ..deps import SettingsDep, TenantDep

router = APIRouter(prefix="/v1/batches", tags=["batches"])


@router.post("", status_code=201, response_model=BatchRunOut, name="create_batch",
             responses={200: {"description": "An existing batch with the same idempotency key"}})
def create_batch(body: BatchRunCreate, tenant: TenantDep, settings: SettingsDep, response: Response) -> BatchRunOut:
    """Declare a batch run of ``size`` items; nothing runs until items are added. With ``sample`` items the
    estimate (placement as of now, nothing reserved) is recorded to be shown next to the actuals."""
    with session_scope() as s:
        found = batches.find(s, tenant, body.idempotency_key) if body.idempotency_key else None
        if found is not None:  # a restarted client: the same batch (a conflict if the key names another)
            batch, _ = batches.create(s, tenant, body, None)
            response.status_code = 200
            return batches.progress(s, tenant, batch.id)
    batches.check_options(body.kind, body.options)
    estimate = (batches.estimate_items(body.kind, body.options, body.sample, body.size, settings, tenant, "sample")
                if body.sample else None)
    with session_scope() as s:
        batch, created = batches.create(s, tenant, body, estimate)
        if not created:
            response.status_code = 200
        return batches.progress(s, tenant, batch.id)


@router.post("/estimate", response_model=Estimate, name="estimate_batch")
def estimate_batch(body: EstimateIn, tenant: TenantDep, settings: SettingsDep) -> Estimate:
    """What a batch of these items (or of ``total`` items like them) would cost and take if placed now."""
    return batches.estimate_items(body.kind, body.options, body.items, body.total, settings, tenant)


@router.post("/{batch_id}/items", response_model=AppendOut, name="add_batch_items",
             responses={409: {"description": "Batch cancelled, or an item key re-sent with a different spec"}})
def add_items(batch_id: uuid.UUID, body: ItemsAppend, tenant: TenantDep, settings: SettingsDep) -> AppendOut:
    """Add a chunk of items. Idempotent per item key: re-sending a chunk creates only what is missing."""
    with session_scope() as s:
        out, rows = batches.append(s, tenant, batch_id, body.items, settings)
    messaging.send_dispatches((r["id"], 1, r["queue"]) for r in rows)
    return out


@router.get("/{batch_id}", response_model=BatchRunOut, name="get_batch")
def get_batch(batch_id: uuid.UUID, tenant: TenantDep) -> BatchRunOut:
    """Progress: counts by status, throughput over the last minute, ETA, cost so far, estimate."""
    with session_scope() as s:
        return batches.progress(s, tenant, batch_id)


@router.get("/{batch_id}/items", response_model=BatchItemPage, name="list_batch_items")
def list_items(
    batch_id: uuid.UUID,
    tenant: TenantDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
    results: bool = False,
) -> BatchItemPage:
    """Items in submission order with their status and error (``status=failed``: the failures and why);
    ``results=true`` adds each item's result."""
    with session_scope() as s:
        return batches.list_items(s, tenant, batch_id, status=status.value if status else None, limit=limit,
                                  cursor=cursor, results=results)


@router.post("/{batch_id}/cancel", response_model=BatchRunOut, name="cancel_batch",
             responses={409: {"description": "The batch already finished"}})
def cancel_batch(batch_id: uuid.UUID, tenant: TenantDep) -> BatchRunOut:
    """Cancel every item that has not ended; rented capacity is released."""
    out, releases = batches.cancel(tenant, batch_id)
    for job_id, provider in releases:
        messaging.send(messaging.RELEASE, [str(job_id)], provider_queue(provider))
    return out
