"""The reaper: give back anything a provider holds under our label that no live job owns.

Every lease carries the label ``gpufleet-<job id>-<attempt>``, and the job row is claimed
(``running`` at that attempt) before the provider is called — that row is the record that
exists before anything is rented. A lease is orphaned when its job has moved on without
recording it: the executor died between reserve and recording the run, or a release
failed after the job's own bookkeeping. The reaper releases those, charges their rented
time to the job, and says so in the job's events.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from sqlalchemy import select, update

from orchestrator.db.engine import session_scope
from orchestrator.db.models import Job
from orchestrator.domain import JobStatus
from orchestrator.services.transitions import record_event
from orchestrator.settings import get_settings
from providers.base import ExternalResource, NotYetReleased, ProviderError
from providers.registry import get_providers

log = logging.getLogger(__name__)
LABEL = re.compile(r"^gpufleet-(?P<job>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-(?P<attempt>\d+)$")
ACTOR = "reaper"


def _is_live(resource: ExternalResource, attempt: int, job: Any) -> bool:
    if job is None:
        return False
    lease = (job.run_handle or {}).get("lease") or {}
    if lease.get("external_id") == resource.external_id:
        # The job's own release path (with cost settlement) owns this one until it is released.
        return job.released_at is None
    starting = job.status in (JobStatus.placing.value, JobStatus.running.value) and job.run_handle is None
    return starting and job.attempt == attempt


def reap() -> int:
    """Release orphaned leases older than the sweep grace; returns how many were released."""
    grace = get_settings().sweep_grace_seconds
    now = time.time()
    released = 0
    for provider in get_providers().values():
        try:
            resources = provider.owned()
        except ProviderError as exc:
            log.warning("cannot list %s resources: %s", provider.name, exc)
            continue
        ours = [(r, m) for r in resources if (m := LABEL.match(r.label)) and now - (r.created_at or now) >= grace]
        if not ours:
            continue
        ids = {uuid.UUID(m["job"]) for _, m in ours}
        with session_scope() as s:
            jobs = {row.id: row for row in s.execute(
                select(Job.id, Job.status, Job.attempt, Job.run_handle, Job.released_at).where(Job.id.in_(ids)))}
        for resource, match in ours:
            job_id = uuid.UUID(match["job"])
            if _is_live(resource, int(match["attempt"]), jobs.get(job_id)):
                continue
            try:
                provider.release(resource.as_lease())
            except (NotYetReleased, ProviderError) as exc:
                log.warning("could not reap %s on %s: %s", resource.external_id, provider.name, exc)
                continue
            released += 1
            cost = round(resource.price_per_hour * max(0.0, now - (resource.created_at or now)) / 3600, 8)
            log.warning("reaped orphaned %s lease %s of job %s (cost $%.6f)", provider.name, resource.external_id,
                        job_id, cost)
            if job_id in jobs:
                job = jobs[job_id]
                with session_scope() as s:
                    s.execute(update(Job).where(Job.id == job_id).values(cost=Job.cost + cost))
                    record_event(s, job_id, JobStatus(job.status), JobStatus(job.status), job.attempt, ACTOR,
                                 f"released orphaned lease {resource.external_id} on {provider.name} "
                                 f"(attempt {match['attempt']}), cost ${cost:.6f}")
    return released
