"""The beat's upkeep of distillation data: retention, pairs that will never complete, and regressions
seen on live shadow traffic. Deletes go in small batches so the table never locks up."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import update

from orchestrator.clock import utcnow
from orchestrator.db.engine import delete_in_batches, rows_changed, session_scope
from orchestrator.db.models import DistillationPair
from orchestrator.distillation import traffic
from orchestrator.settings import get_settings

log = logging.getLogger(__name__)
BATCH = 1000
STALE_PENDING = timedelta(days=1)


def maintain() -> dict[str, int]:
    settings = get_settings()
    cutoff = utcnow() - timedelta(days=settings.distill_retention_days)
    deleted = delete_in_batches(DistillationPair.id, DistillationPair.created_at < cutoff, batch=BATCH)
    with session_scope() as s:
        abandoned = rows_changed(s.execute(update(DistillationPair).where(
            DistillationPair.status == "pending", DistillationPair.created_at < utcnow() - STALE_PENDING,
        ).values(status="failed", accepted=False, error="its jobs never finished")))
        changes = traffic.check_regressions(s)
    if deleted or abandoned:
        log.info("distillation upkeep: %d pairs past retention deleted, %d abandoned", deleted, abandoned)
    return {"deleted": deleted, "abandoned": int(abandoned), "routes_dropped": len(changes)}
