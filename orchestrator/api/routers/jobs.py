"""/v1/jobs: submit, batch-submit, read, list, cancel, logs and checkpoints. Logic lives in services."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Query, Response
from fastapi.security import HTTPAuthorizationCredentials

from orchestrator.db.engine import session_scope
from orchestrator.domain import JOB_KINDS, BatchCreate, JobCreate, JobOut, JobPage, JobStatus
from orchestrator.scheduling.queues import provider_queue
from orchestrator.services import explain, jobs, messaging, reports, run_output

from ..deps import SettingsDep, TenantDep, bearer_scheme

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=201, response_model=JobOut, name="submit_job",
             responses={200: {"description": "An existing job with the same idempotency key"}})
def submit_job(body: Annotated[JobCreate, Body()], tenant: TenantDep, settings: SettingsDep, response: Response) -> JobOut:
    with session_scope() as s:
        job, created = jobs.submit(s, tenant, body, settings)
        out = jobs.to_out(job)
    if created:
        messaging.send(messaging.DISPATCH, [str(out.id), out.attempt], out.queue)
    else:
        response.status_code = 200
    return out


@router.post("/batch", status_code=201, name="submit_batch")
def submit_batch(body: BatchCreate, tenant: TenantDep, settings: SettingsDep) -> dict[str, object]:
    with session_scope() as s:
        batch_id, rows, reused = jobs.submit_batch(s, tenant, body.jobs, settings)
    messaging.send_dispatches((r["id"], 1, r["queue"]) for r in rows)
    return {"batch_id": str(batch_id), "created": len(rows),
            "job_ids": [str(r["id"]) for r in rows] + [str(j.id) for j in reused]}


@router.get("/{job_id}", response_model=JobOut, name="get_job")
def get_job(job_id: uuid.UUID, tenant: TenantDep, events: bool = True) -> JobOut:
    with session_scope() as s:
        job = jobs.get_job(s, tenant, job_id)
        return jobs.to_out(job, jobs.events_for(s, job_id) if events else None)


@router.get("/{job_id}/placement", name="explain_placement")
def explain_placement(job_id: uuid.UUID, tenant: TenantDep) -> dict[str, object]:
    """Why the job went where it did: strategy, data class, each fitting option's score components,
    each rejected option's reason, and the attempt history."""
    with session_scope() as s:
        return explain.explain(s, tenant, job_id)


@router.get("", response_model=JobPage, name="list_jobs")
def list_jobs(
    tenant: TenantDep,
    status: JobStatus | None = None,
    kind: Annotated[str | None, Query(pattern="^(" + "|".join(JOB_KINDS) + ")$")] = None,
    batch_id: uuid.UUID | None = None,
    ids: Annotated[list[uuid.UUID] | None, Query(max_length=500)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: str | None = None,
) -> JobPage:
    with session_scope() as s:
        found, next_cursor = jobs.list_jobs(s, tenant, status=status.value if status else None, kind=kind,
                                            batch_id=batch_id, ids=ids, limit=limit, cursor=cursor)
        return JobPage(jobs=[jobs.to_out(j) for j in found], next_cursor=next_cursor)


@router.post("/{job_id}/cancel", response_model=JobOut, name="cancel_job")
def cancel_job(job_id: uuid.UUID, tenant: TenantDep) -> JobOut:
    with session_scope() as s:
        job, needs_release = jobs.cancel(s, tenant, job_id)
        out = jobs.to_out(job)
    if needs_release and out.provider:
        messaging.send(messaging.RELEASE, [str(out.id)], provider_queue(out.provider))
    return out



@router.post("/{job_id}/report", status_code=202, name="report_run",
             responses={401: {"description": "Missing or wrong job token"}, 409: {"description": "Job not running"}})
def report_run(job_id: uuid.UUID, body: reports.RunReport,
               credentials: Annotated[HTTPAuthorizationCredentials | None, bearer_scheme]) -> dict[str, object]:
    """Called by the job on its rented instance, with the job-scoped token from GPUFLEET_JOB_TOKEN
    (not an API key): the run's outcome, which ends the job at the next poll — sent right away."""
    try:
        provider, attempt = reports.accept(job_id, _job_token(credentials), body)
    except reports.BadToken:
        raise HTTPException(401, "invalid job token") from None
    messaging.send(messaging.POLL, [str(job_id), attempt], provider_queue(provider))
    return {"accepted": True, "attempt": attempt}


def _job_token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None:
        raise HTTPException(401, "missing job token: send 'Authorization: Bearer $GPUFLEET_JOB_TOKEN'")
    return credentials.credentials


@router.post("/{job_id}/output", status_code=202, name="report_output",
             responses={401: {"description": "Missing or wrong job token"}, 409: {"description": "Job not running"}})
def report_output(job_id: uuid.UUID, body: reports.RunOutput,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, bearer_scheme]) -> dict[str, object]:
    """Called by the instance wrapper as the run prints, with the job-scoped token: its output is kept for
    ``GET …/logs``, and the checkpoints it announces are recorded at once (a preemption may follow)."""
    try:
        steps = reports.accept_output(job_id, _job_token(credentials), body)
    except reports.BadToken:
        raise HTTPException(401, "invalid job token") from None
    return {"accepted": len(body.chunks), "checkpoints": steps}


@router.get("/{job_id}/logs", name="job_logs")
def job_logs(job_id: uuid.UUID, tenant: TenantDep, after: Annotated[int, Query(ge=0)] = 0,
             limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> dict[str, object]:
    """The run's output in order, every attempt's; pass the last chunk id seen as ``after`` to follow."""
    with session_scope() as s:
        job = jobs.get_job(s, tenant, job_id)
        status, attempt = job.status, job.attempt
    chunks = run_output.read(job_id, after=after, limit=limit)
    return {"job_id": str(job_id), "status": status, "attempt": attempt, "chunks": chunks,
            "next_after": chunks[-1]["id"] if chunks else after}


@router.get("/{job_id}/checkpoints", name="job_checkpoints")
def job_checkpoints(job_id: uuid.UUID, tenant: TenantDep) -> dict[str, object]:
    """Every checkpoint the job reported (step, URI, attempt, time), and its restarts and lost time."""
    with session_scope() as s:
        job = jobs.get_job(s, tenant, job_id)
        restarts, lost = job.restarts, job.lost_seconds
    found = run_output.checkpoints(job_id)
    return {"job_id": str(job_id), "restarts": restarts, "lost_seconds": round(lost, 3),
            "latest": found[-1].as_dict() if found else None, "checkpoints": [c.as_dict() for c in found]}

