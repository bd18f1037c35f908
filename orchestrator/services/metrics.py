"""Prometheus metrics read from Postgres and the broker at scrape time.

Counting in the database (not in-process counters) gives the same numbers whichever
API replica is scraped, and they survive restarts. This module holds the job and queue
collectors and the helpers every collector shares (``provider_metrics`` and
``distillation.metrics`` build on them):

- ``recent``: a time window that Postgres answers from the ``(tenant_id, created_at)`` indexes
  instead of a scan of the whole table;
- ``json_number``: a number read from a JSON column that is NULL, not an error, when the JSON holds
  something else (a job's result comes from user code: one bad row must not break every scrape);
- ``histogram``: a histogram of a column counted in one aggregate query.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, case, false, func, select
from sqlalchemy.orm import Session

from orchestrator.clock import utcnow
from orchestrator.db.engine import session_scope
from orchestrator.db.models import Job, Tenant

log = logging.getLogger(__name__)
DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0)
# Figures that need a look inside each job's JSON (placement, result, labels) are taken over the jobs
# submitted in this window: their cost stays proportional to recent traffic, not to the table's age.
WINDOW = timedelta(hours=24)


def window_start(window: timedelta = WINDOW) -> datetime:
    return utcnow() - window


def recent(session: Session, tenant_column: Any, created_column: Any, since: datetime) -> ColumnElement[bool]:
    """``created_column >= since``, phrased so Postgres range-scans a ``(tenant_id, created_at)`` index.

    Alone, the time condition cannot use such an index (Postgres 15 has no skip scan) and reads the whole
    table. With the tenants listed (a small table) it becomes ``tenant_id = ANY(...) AND created_at >= …``,
    one index descent per tenant: only the window's rows are read."""
    tenants = list(session.scalars(select(Tenant.id)))
    if not tenants:
        return false()
    return (tenant_column.in_(tenants)) & (created_column >= since)


def json_number(session: Session, column: Any, *path: str) -> ColumnElement[Any]:
    """The number at ``path`` in a JSON column as a float, NULL when it is missing or not a number.

    A plain cast would fail the whole query on Postgres for ``"total_tokens": "lots"`` (results come from
    user code and provider responses); SQLite would silently read it as 0."""
    node = column[path] if len(path) > 1 else column[path[0]]
    value = node.as_float()
    if session.get_bind().dialect.name == "postgresql":
        return case((func.jsonb_typeof(node) == "number", value))
    json_path = "$" + "".join(f'."{key}"' for key in path)
    return case((func.json_type(column, json_path).in_(("integer", "real")), value))


def label(value: Any) -> str:
    """A label value: Prometheus labels are strings, and an absent one is the empty string."""
    return "" if value is None else str(value)


def bucket_columns(column: Any, buckets: Sequence[float]) -> list[ColumnElement[Any]]:
    """One ``sum(case …)`` per bucket: cumulative counts of ``column <= bound`` in the same aggregate query."""
    return [func.sum(case((column <= bound, 1), else_=0)) for bound in buckets]


def add_histogram(family: HistogramMetricFamily, labels: list[str], buckets: Sequence[float], count: int,
                  total: float | None, cumulative: Sequence[Any]) -> None:
    """A histogram sample from one row of ``count, sum, *bucket_columns``."""
    points = [(str(b), int(c or 0)) for b, c in zip(buckets, cumulative, strict=True)]
    family.add_metric(labels, points + [("+Inf", int(count))], float(total or 0))


def queue_depths(queues: list[str]) -> dict[str, int]:
    from workers.celery_app import get_app

    depths: dict[str, int] = {}
    with get_app().connection_for_read() as conn:
        channel = conn.default_channel
        for queue in queues:
            try:
                depths[queue] = channel.queue_declare(queue=queue, passive=True).message_count
            except Exception:  # queue never declared yet
                depths[queue] = 0
    return depths


class JobCollector(Collector):
    """Jobs by status, their cost and run time (all jobs: plain-column aggregates), and broker queue depth."""

    def describe(self) -> Iterator[Metric]:
        # Names only: lets the registry refuse a collector whose names clash with another's at start-up.
        yield from self._families()

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, HistogramMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily("gpufleet_jobs", "Jobs by status, kind and queue", labels=["status", "kind", "queue"]),
                GaugeMetricFamily("gpufleet_job_cost_dollars", "Total cost of jobs by kind and provider",
                                  labels=["kind", "provider"]),
                HistogramMetricFamily("gpufleet_job_duration_seconds", "Run time of finished jobs", labels=["kind"]),
                GaugeMetricFamily("gpufleet_queue_depth", "Messages waiting in each Celery queue", labels=["queue"]))

    def collect(self) -> Iterator[Metric]:
        jobs, cost, hist, depth = self._families()
        with session_scope() as s:
            for status, kind, queue, n in s.execute(
                    select(Job.status, Job.kind, Job.queue, func.count()).group_by(Job.status, Job.kind, Job.queue)):
                jobs.add_metric([status, kind, queue], n)
            for kind, provider, total in s.execute(
                    select(Job.kind, Job.provider, func.sum(Job.cost)).where(Job.provider.is_not(None))
                    .group_by(Job.kind, Job.provider)):
                cost.add_metric([kind, provider or ""], float(total or 0))
            for kind, count, total, *cumulative in s.execute(
                    select(Job.kind, func.count(), func.sum(Job.duration_seconds),
                           *bucket_columns(Job.duration_seconds, DURATION_BUCKETS))
                    .where(Job.duration_seconds.is_not(None)).group_by(Job.kind)):
                add_histogram(hist, [kind], DURATION_BUCKETS, count, total, cumulative)
        yield jobs
        yield cost
        yield hist
        try:
            from orchestrator.scheduling.queues import all_queues

            for queue, n in queue_depths(all_queues()).items():
                depth.add_metric([queue], n)
        except Exception as exc:
            log.warning("queue depth unavailable: %s", type(exc).__name__)
        yield depth
