"""Spend reports from the settled cost entries: by provider, tenant, job kind and day."""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.clock import as_utc
from orchestrator.db.models import CostEntry, Tenant


def summary(session: Session, tenant_id: uuid.UUID | None, since: datetime | None = None,
            until: datetime | None = None) -> dict[str, Any]:
    """Totals over the period; ``tenant_id`` None means every tenant (operators only)."""
    query = select(CostEntry.at, CostEntry.amount, CostEntry.provider, CostEntry.kind, Tenant.name).outerjoin(
        Tenant, Tenant.id == CostEntry.tenant_id)
    if tenant_id is not None:
        query = query.where(CostEntry.tenant_id == tenant_id)
    if since is not None:
        query = query.where(CostEntry.at >= since)
    if until is not None:
        query = query.where(CostEntry.at < until)
    groups: dict[str, defaultdict[str, float]] = {k: defaultdict(float) for k in ("provider", "tenant", "kind", "day")}
    total, count = 0.0, 0
    # Streamed: a month of entries for a busy tenant should not be loaded at once.
    for at, amount, provider, kind, tenant in session.execute(query.execution_options(yield_per=1000)):
        total += amount
        count += 1
        groups["provider"][provider] += amount
        groups["tenant"][tenant or "(none)"] += amount
        groups["kind"][kind] += amount
        groups["day"][as_utc(at).strftime("%Y-%m-%d")] += amount  # type: ignore[union-attr]
    return {"total": round(total, 6), "entries": count,
            **{f"by_{k}": {key: round(v, 6) for key, v in sorted(g.items())} for k, g in groups.items()}}
