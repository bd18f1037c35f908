"""Prometheus metrics read from Postgres and the broker at scrape time.

Counting in the database (not in-process counters) gives the same numbers whichever
API replica is scraped, and they survive restarts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select

from orchestrator.db.engine import session_scope
from orchestrator.db.models import Job

log = logging.getLogger(__name__)
DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0)


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
    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        jobs = GaugeMetricFamily("gpufleet_jobs", "Jobs by status, kind and queue", labels=["status", "kind", "queue"])
        cost = GaugeMetricFamily("gpufleet_job_cost_dollars", "Total cost of jobs by kind and provider",
                                 labels=["kind", "provider"])
        hist = HistogramMetricFamily("gpufleet_job_duration_seconds", "Run time of finished jobs", labels=["kind"])
        with session_scope() as s:
            for status, kind, queue, n in s.execute(
                    select(Job.status, Job.kind, Job.queue, func.count()).group_by(Job.status, Job.kind, Job.queue)):
                jobs.add_metric([status, kind, queue], n)
            for kind, provider, total in s.execute(
                    select(Job.kind, Job.provider, func.sum(Job.cost)).where(Job.provider.is_not(None))
                    .group_by(Job.kind, Job.provider)):
                cost.add_metric([kind, provider or ""], float(total or 0))
            columns = [func.sum(case((Job.duration_seconds <= b, 1), else_=0)) for b in DURATION_BUCKETS]
            for row in s.execute(
                    select(Job.kind, func.count(), func.sum(Job.duration_seconds), *columns)
                    .where(Job.duration_seconds.is_not(None)).group_by(Job.kind)):
                kind, count, total, *cumulative = row
                buckets = [(str(b), int(c or 0)) for b, c in zip(DURATION_BUCKETS, cumulative, strict=True)]
                hist.add_metric([kind], buckets + [("+Inf", int(count))], float(total or 0))
        yield jobs
        yield cost
        yield hist
        depth = GaugeMetricFamily("gpufleet_queue_depth", "Messages waiting in each Celery queue", labels=["queue"])
        try:
            from orchestrator.scheduling.queues import all_queues

            for queue, n in queue_depths(all_queues()).items():
                depth.add_metric([queue], n)
        except Exception as exc:
            log.warning("queue depth unavailable: %s", type(exc).__name__)
        yield depth
