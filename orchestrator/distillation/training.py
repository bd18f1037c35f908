"""Training a student on the accepted pairs, through the normal pipeline.

``train`` exports the matching pairs to object storage (train and held-out test files, with their
manifest), then submits an ordinary ``training`` job — placed on the cheapest GPU that fits its
requirements and price, retried and failed over like any other — whose command is the configured
trainer (``GPUFLEET_DISTILL_TRAIN_COMMAND``; by default the sandbox's small stand-in). When that job
succeeds, ``on_trained`` registers the result as the student's next version and evaluates it.
Auto-training submits the same job once enough new accepted pairs have accumulated.
"""

from __future__ import annotations

import hashlib
import logging
import shlex
import sys
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from orchestrator.db.engine import session_scope
from orchestrator.db.models import DistillationPair, Job
from orchestrator.distillation import export, registry
from orchestrator.domain import TrainingJob
from orchestrator.errors import InvalidInput
from orchestrator.services import jobs
from orchestrator.settings import Settings
from orchestrator.storage import configured_storage
from providers.base import Requirements

log = logging.getLogger(__name__)
STUDENT_LABEL = "distill_student"


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    student_name: str = Field(min_length=1, max_length=200, description="Registry name of the student.")
    base_model: str = Field(default="standin", min_length=1, max_length=200)
    teacher_model: str | None = None
    student_model: str | None = Field(default=None, description="Only pairs captured for this student model.")
    tags: list[str] = Field(default_factory=list)
    examples: int | None = Field(default=None, ge=1, description="At most this many training examples.")
    validation_split: float = Field(default=0.1, ge=0, lt=1)
    min_score: float | None = Field(default=None, ge=0, le=1)
    requirements: Requirements = Field(default_factory=Requirements)
    max_price_per_hour: float | None = Field(default=None, gt=0)
    timeout_seconds: int | None = Field(default=None, ge=60)


def train(session: Session, tenant_id: uuid.UUID, req: TrainRequest, settings: Settings) -> tuple[Job, dict[str, Any]]:
    """Export the data and submit the training job (the caller commits, then dispatches it)."""
    store = configured_storage(settings)
    prefix = f"distill/{req.student_name}/{uuid.uuid4().hex[:12]}"
    filters = export.ExportFilters(teacher_model=req.teacher_model, student_model=req.student_model, tags=req.tags,
                                   min_score=req.min_score, test_fraction=req.validation_split, limit=req.examples)
    manifest = export.to_storage(tenant_id, filters, settings.distill_quality_threshold, store, prefix)
    if manifest["counts"]["train"] == 0:
        raise InvalidInput("examples", "no accepted pairs match these filters: nothing to train on")
    target = f"{prefix}/student.json"
    env = {"GPUFLEET_TRAIN_DATA": _readable(store, manifest["uris"]["train"]),
           "GPUFLEET_VALIDATION_DATA": _readable(store, manifest["uris"]["test"]),
           "GPUFLEET_BASE_MODEL": req.base_model, "GPUFLEET_STUDENT_NAME": req.student_name,
           "GPUFLEET_STUDENT_ARTIFACT": store.uri(target)}
    if store.reachable_by_instances:
        env["GPUFLEET_STUDENT_ARTIFACT_PUT_URL"] = store.presigned_put(target, expires=7 * 24 * 3600)
    command = settings.distill_train_command or f"{shlex.quote(sys.executable)} -m providers.sandbox.standin train"
    requirements = req.requirements.model_copy(update={"max_price_per_hour": req.max_price_per_hour}
                                               if req.max_price_per_hour else {})
    job_req = TrainingJob.model_validate({
        "kind": "training", "requirements": requirements.model_dump(exclude_none=True),
        "timeout_seconds": req.timeout_seconds,
        "labels": {STUDENT_LABEL: req.student_name, "distill_export": prefix, "distill_teacher": req.teacher_model or "",
                   "distill_validation_split": str(req.validation_split)},
        "spec": {"base_model": req.base_model, "dataset_uri": manifest["uris"]["train"], "command": command, "env": env}})
    job, _ = jobs.submit(session, tenant_id, job_req, settings, actor="distillation")
    return job, manifest


def _readable(store: Any, uri: str) -> str:
    """What a training run can open: a presigned URL on S3, a plain path locally."""
    key = store.key_of(uri)
    return store.presigned_get(key, expires=7 * 24 * 3600) if store.reachable_by_instances else uri


def on_trained(job_id: uuid.UUID) -> uuid.UUID | None:
    """A student's training job succeeded: register its artifact as the next version; returns its id."""
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None or job.status != "succeeded" or STUDENT_LABEL not in (job.labels or {}):
            return None
        name = job.labels[STUDENT_LABEL]
        result = job.result or {}
        artifact = str(result.get("artifact_uri") or job.spec.get("env", {}).get("GPUFLEET_STUDENT_ARTIFACT") or "")
        served = result.get("served_model") or (f"standin:{_local_path(artifact)}" if result.get("examples") is not None
                                                 and not result.get("served_model") else None)
        version = registry.register(s, job.tenant_id, name, artifact_uri=artifact or None, served_model=served,
                                    params={"base_model": job.spec.get("base_model"), "dataset_uri": job.spec.get("dataset_uri"),
                                            "examples": result.get("examples"),
                                            "teacher_model": job.labels.get("distill_teacher") or None,
                                            "validation_split": float(job.labels.get("distill_validation_split", 0.1))},
                                    training_job_id=job.id)
        log.info("registered %s v%d from training job %s", name, version.version, job_id)
        return version.id


def _local_path(uri: str) -> str:
    return uri.removeprefix("file://")


def maybe_auto_train(tenant_id: uuid.UUID, teacher_model: str, student_model: str, settings: Settings) -> uuid.UUID | None:
    """Enough new accepted pairs since the last training job for this student: train it again."""
    if settings.distill_auto_train_pairs <= 0:
        return None
    with session_scope() as s:
        if s.get_bind().dialect.name == "postgresql":  # pairs completing together must not each start a run
            key = int.from_bytes(hashlib.sha256(f"{tenant_id}:{student_model}".encode()).digest()[:8], "big", signed=True)
            s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        last = s.scalar(select(func.max(Job.created_at)).where(
            Job.tenant_id == tenant_id, Job.kind == "training", Job.labels[STUDENT_LABEL].as_string() == student_model))
        fresh = select(func.count()).where(
            DistillationPair.tenant_id == tenant_id, DistillationPair.teacher_model == teacher_model,
            DistillationPair.student_model == student_model, DistillationPair.accepted.is_(True))
        if last is not None:
            fresh = fresh.where(DistillationPair.updated_at > last)
        if (s.scalar(fresh) or 0) < settings.distill_auto_train_pairs:
            return None
        job, _ = train(s, tenant_id, TrainRequest(student_name=student_model, teacher_model=teacher_model,
                                                  student_model=student_model), settings)
        job_id, queue = job.id, job.queue
    from orchestrator.services import messaging

    messaging.send(messaging.DISPATCH, [str(job_id), 1], queue)
    log.info("auto-training %s: %d new accepted pairs", student_model, settings.distill_auto_train_pairs)
    return job_id
