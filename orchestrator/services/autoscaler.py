"""Resizes pool providers (AWS Auto Scaling Groups, GCP Managed Instance Groups, RunPod serverless
endpoints' max workers, warm pools of rented instances) from the work
waiting for them — how many jobs, and how long the oldest has waited — on the beat. The pools own
the policy (providers/pools/scaling.py): clamping to their limits, cooldowns, scaling to zero when
idle; this module only measures demand and asks each one."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from orchestrator.clock import as_utc, utcnow
from orchestrator.db.engine import session_scope
from orchestrator.db.models import Job
from orchestrator.domain import JobStatus
from providers.base import Provider, ProviderError
from providers.registry import get_providers

log = logging.getLogger(__name__)
MAX_COUNTED = 100_000


def _scalable(providers: dict[str, Provider]) -> list[Any]:
    return [p for p in providers.values() if callable(getattr(p, "autoscale", None))]


def demand(provider: Any, waiting: list[tuple[str, dict[str, Any], datetime, Any]], now: datetime) -> tuple[int, float]:
    """(queued jobs this pool could serve — of a kind it runs, not pinned elsewhere, and for a pool that
    says whom it serves (a tenant's warm pool), that tenant's — and how long the oldest has waited, in s)."""
    kinds = set(getattr(provider, "kinds", None) or ())
    serves = getattr(provider, "serves", None)
    mine = [created for kind, req, created, tenant in waiting
            if (not kinds or kind in kinds) and (not req.get("providers") or provider.name in req["providers"])
            and (serves is None or serves(tenant, req))]
    oldest = min(mine, default=None)
    return len(mine), (now - as_utc(oldest)).total_seconds() if oldest is not None else 0.0  # type: ignore[operator]


def autoscale() -> dict[str, str]:
    """One pass; returns each pool's decision (for the task result and the logs)."""
    pools = _scalable(get_providers())
    if not pools:
        return {}
    with session_scope() as s:
        waiting = [(r.kind, r.requirements or {}, r.created_at, r.tenant_id) for r in s.execute(
            select(Job.kind, Job.requirements, Job.created_at, Job.tenant_id).where(Job.status == JobStatus.queued.value)
            .limit(MAX_COUNTED))]
        # Work in flight on each pool, counted across every worker (a pool's own count is per process).
        running = dict(s.execute(select(Job.provider, func.count()).where(
            Job.status.in_([JobStatus.placing.value, JobStatus.running.value]),
            Job.provider.in_([p.name for p in pools])).group_by(Job.provider)).tuples().all())
    decisions: dict[str, str] = {}
    now = utcnow()
    for pool in pools:
        try:
            depth, waited = demand(pool, waiting, now)
            decision = pool.autoscale(depth, in_flight=int(running.get(pool.name, 0)), waited_seconds=waited)
        except ProviderError as exc:
            log.warning("autoscaling %s failed: %s", pool.name, exc)
            decisions[pool.name] = f"failed: {exc}"
            continue
        if decision:
            log.info("autoscale %s: %s", pool.name, decision)
            decisions[pool.name] = decision
    return decisions
