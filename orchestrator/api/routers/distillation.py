"""/v1/distillation (pairs, export, training, traffic routes) and /v1/models (the student registry)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from orchestrator.db.engine import session_scope
from orchestrator.db.models import DistillationPair, ModelVersion, TrafficRoute
from orchestrator.distillation import export, pairs, registry, traffic, training
from orchestrator.domain import ChatMessage
from orchestrator.errors import InvalidInput, NotFound
from orchestrator.services import jobs, messaging
from orchestrator.storage import configured_storage
from providers.base import Requirements

from ..deps import SettingsDep, TenantDep

router = APIRouter(tags=["distillation"])


class QueryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    teacher_model: str = Field(min_length=1, max_length=200)
    student_model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    prompt: str | None = None
    max_tokens: int = Field(default=256, ge=1, le=200_000)
    temperature: float = Field(default=0.7, ge=0, le=2)
    tags: list[str] = Field(default_factory=list, max_length=20)
    requirements: Requirements = Field(default_factory=Requirements)
    timeout_seconds: int | None = Field(default=None, ge=1, le=3600)


@router.post("/v1/distillation/query", name="distillation_query")
def query(body: QueryRequest, tenant: TenantDep, settings: SettingsDep) -> dict[str, Any]:
    """Ask the teacher and the student at once; answer with the teacher's reply as soon as it arrives
    (the student finishes in the background and the pair is completed and scored then)."""
    if body.messages is None and body.prompt is None:
        raise InvalidInput("messages", "give either 'messages' or 'prompt'")
    messages = [m.model_dump() for m in body.messages] if body.messages else [{"role": "user", "content": body.prompt}]
    req = pairs.PairRequest(teacher_model=body.teacher_model, student_model=body.student_model, messages=messages,
                            max_tokens=body.max_tokens, temperature=body.temperature, tags=body.tags,
                            requirements=body.requirements.model_dump(exclude_none=True), priority="high",
                            timeout_seconds=body.timeout_seconds)
    with session_scope() as s:
        ((pair_id, rows),) = pairs.open_pairs(s, tenant, settings, [req], source="query")
    jobs.dispatch_rows(rows)
    teacher = next(r for r in rows if r["pair_role"] == pairs.TEACHER)
    student = next(r for r in rows if r["pair_role"] == pairs.STUDENT)
    done = jobs.wait_for(tenant, teacher["id"], min(settings.front_door_timeout_seconds, body.timeout_seconds or 3600))
    result = done.result or {}
    return {"pair_id": str(pair_id), "teacher_job_id": str(teacher["id"]), "student_job_id": str(student["id"]),
            "status": done.status.value, "text": result.get("text"), "usage": result.get("usage"),
            "provider": done.provider, "cost": done.cost, "error": done.error}


def _pair_out(p: DistillationPair, full: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": str(p.id), "status": p.status, "source": p.source,
        "created_at": p.created_at.isoformat() if p.created_at else None,
           "teacher_model": p.teacher_model, "student_model": p.student_model, "tags": p.tags, "score": p.score,
           "score_method": p.score_method, "agreement": p.agreement, "accepted": p.accepted,
           "teacher_cost": p.teacher_cost, "student_cost": p.student_cost,
           "teacher_latency_ms": p.teacher_latency_ms, "student_latency_ms": p.student_latency_ms,
           "parent_job_id": str(p.parent_job_id) if p.parent_job_id else None, "error": p.error}
    if full:
        out.update(messages=p.messages, teacher_output=p.teacher_output, student_output=p.student_output,
                   teacher_job_id=str(p.teacher_job_id) if p.teacher_job_id else None,
                   student_job_id=str(p.student_job_id) if p.student_job_id else None,
                   prompt_tokens=p.prompt_tokens, teacher_tokens=p.teacher_tokens, student_tokens=p.student_tokens)
    return out


@router.get("/v1/distillation/pairs", name="list_pairs")
def list_pairs(tenant: TenantDep, teacher_model: str | None = None, student_model: str | None = None,
               status: str | None = None, parent_job_id: uuid.UUID | None = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> list[dict[str, Any]]:
    q = select(DistillationPair).where(DistillationPair.tenant_id == tenant)
    for column, value in ((DistillationPair.teacher_model, teacher_model), (DistillationPair.student_model, student_model),
                          (DistillationPair.status, status), (DistillationPair.parent_job_id, parent_job_id)):
        if value is not None:
            q = q.where(column == value)
    with session_scope() as s:
        return [_pair_out(p) for p in s.scalars(q.order_by(DistillationPair.created_at.desc()).limit(limit))]


@router.get("/v1/distillation/pairs/{pair_id}", name="get_pair")
def get_pair(pair_id: uuid.UUID, tenant: TenantDep) -> dict[str, Any]:
    with session_scope() as s:
        p = s.get(DistillationPair, pair_id)
        if p is None or p.tenant_id != tenant:
            raise NotFound(f"pair {pair_id} not found")
        return _pair_out(p, full=True)


def _filters(since: datetime | None, until: datetime | None, teacher_model: str | None, student_model: str | None,
             tags: list[str] | None, min_score: float | None, test_fraction: float, limit: int | None) -> export.ExportFilters:
    return export.ExportFilters(since=since, until=until, teacher_model=teacher_model, student_model=student_model,
                                tags=tags or [], min_score=min_score, test_fraction=test_fraction, limit=limit)




@router.get("/v1/distillation/export", name="export_pairs")
def export_pairs(tenant: TenantDep, settings: SettingsDep, format: Literal["jsonl"] = "jsonl",  # noqa: A002
                 split: Literal["train", "test", "all"] = "train", since: datetime | None = None,
                 until: datetime | None = None, teacher_model: str | None = None, student_model: str | None = None,
                 tags: Annotated[list[str] | None, Query()] = None,
                 min_score: Annotated[float | None, Query(ge=0, le=1)] = None,
                 test_fraction: Annotated[float, Query(ge=0, lt=1)] = 0.1,
                 limit: Annotated[int | None, Query(ge=1)] = None) -> StreamingResponse:
    """Accepted pairs as OpenAI chat fine-tuning JSONL, streamed; the split is deterministic per pair."""
    f = _filters(since, until, teacher_model, student_model, tags, min_score, test_fraction, limit)
    return StreamingResponse(export.jsonl(tenant, f, split, settings.distill_quality_threshold),
                             media_type="application/x-ndjson",
                             headers={"content-disposition": f'attachment; filename="distill-{split}.jsonl"'})


@router.get("/v1/distillation/export/manifest", name="export_manifest")
def export_manifest(tenant: TenantDep, settings: SettingsDep, since: datetime | None = None, until: datetime | None = None,
                    teacher_model: str | None = None, student_model: str | None = None,
                    tags: Annotated[list[str] | None, Query()] = None,
                    min_score: Annotated[float | None, Query(ge=0, le=1)] = None,
                    test_fraction: Annotated[float, Query(ge=0, lt=1)] = 0.1,
                    limit: Annotated[int | None, Query(ge=1)] = None) -> dict[str, Any]:
    """Counts and SHA-256 of the train and test files the same filters export."""
    f = _filters(since, until, teacher_model, student_model, tags, min_score, test_fraction, limit)
    return export.manifest(tenant, f, settings.distill_quality_threshold)


class StorageExport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: datetime | None = None
    until: datetime | None = None
    teacher_model: str | None = None
    student_model: str | None = None
    tags: list[str] = Field(default_factory=list)
    min_score: float | None = Field(default=None, ge=0, le=1)
    test_fraction: float = Field(default=0.1, ge=0, lt=1)
    limit: int | None = Field(default=None, ge=1)


@router.post("/v1/distillation/export", name="export_to_storage")
def export_to_storage(body: StorageExport, tenant: TenantDep, settings: SettingsDep) -> dict[str, Any]:
    """Write train.jsonl, test.jsonl and manifest.json to the configured object storage."""
    f = export.ExportFilters(**body.model_dump())
    prefix = f"exports/{uuid.uuid4().hex[:12]}"
    return export.to_storage(tenant, f, settings.distill_quality_threshold, configured_storage(settings), prefix)


@router.post("/v1/distillation/train", status_code=201, name="train_student")
def train_student(body: training.TrainRequest, tenant: TenantDep, settings: SettingsDep) -> dict[str, Any]:
    """Export the accepted pairs and submit a training job for the student through the normal pipeline."""
    with session_scope() as s:
        job, manifest = training.train(s, tenant, body, settings)
        job_id, queue = job.id, job.queue
    messaging.send(messaging.DISPATCH, [str(job_id), 1], queue)
    return {"job_id": str(job_id), "dataset": manifest}


# --- traffic routes --------------------------------------------------------------------------


class RouteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    student_name: str = Field(min_length=1, max_length=200)
    share: float | None = Field(default=None, ge=0, le=1)
    shadow_rate: float | None = Field(default=None, ge=0, le=1)
    auto: bool | None = None
    step: float | None = Field(default=None, gt=0, le=1)
    max_share: float | None = Field(default=None, ge=0, le=1)
    min_agreement: float | None = Field(default=None, ge=0, le=1)


def _route_out(r: TrafficRoute) -> dict[str, Any]:
    return {"teacher_model": r.teacher_model, "student_name": r.student_name, "share": r.share,
            "shadow_rate": r.shadow_rate, "auto": r.auto, "step": r.step, "max_share": r.max_share,
            "min_agreement": r.min_agreement}


@router.get("/v1/distillation/routes", name="list_routes")
def list_routes(tenant: TenantDep) -> list[dict[str, Any]]:
    with session_scope() as s:
        return [_route_out(r) for r in traffic.routes(s, tenant)]


@router.put("/v1/distillation/routes/{teacher_model}", name="set_route")
def set_route(teacher_model: str, body: RouteBody, tenant: TenantDep) -> dict[str, Any]:
    """Send a share of ``teacher_model``'s requests to the production version of a student."""
    with session_scope() as s:
        values = body.model_dump(exclude={"student_name"})
        return _route_out(traffic.set_route(s, tenant, teacher_model, body.student_name, **values))


# --- the model registry ------------------------------------------------------------------------


class VersionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    artifact_uri: str | None = Field(default=None, max_length=2000)
    served_model: str | None = Field(default=None, max_length=200)
    metrics: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)


def _version_out(v: ModelVersion) -> dict[str, Any]:
    return {"name": v.name, "version": v.version, "stage": v.stage, "artifact_uri": v.artifact_uri,
            "served_model": v.served_model, "metrics": v.metrics, "params": v.params,
            "training_job_id": str(v.training_job_id) if v.training_job_id else None,
            "created_at": v.created_at.isoformat() if v.created_at else None,
            "promoted_at": v.promoted_at.isoformat() if v.promoted_at else None}


@router.get("/v1/models", name="list_models")
def list_models(tenant: TenantDep, name: str | None = None) -> list[dict[str, Any]]:
    with session_scope() as s:
        return [_version_out(v) for v in registry.versions(s, tenant, name)]


@router.post("/v1/models/{name}/versions", status_code=201, name="register_model")
def register_model(name: str, body: Annotated[VersionBody, Body()], tenant: TenantDep) -> dict[str, Any]:
    with session_scope() as s:
        return _version_out(registry.register(s, tenant, name, **body.model_dump()))


@router.get("/v1/models/{name}/production", name="production_model")
def production_model(name: str, tenant: TenantDep) -> dict[str, Any]:
    with session_scope() as s:
        found = registry.production(s, tenant, name)
        if found is None:
            raise NotFound(f"model {name} has no production version")
        return _version_out(found)


@router.post("/v1/models/{name}/versions/{version}/promote", name="promote_model")
def promote_model(name: str, version: int, tenant: TenantDep) -> dict[str, Any]:
    with session_scope() as s:
        return _version_out(registry.promote(s, tenant, name, version))


@router.post("/v1/models/{name}/rollback", name="rollback_model")
def rollback_model(name: str, tenant: TenantDep) -> dict[str, Any]:
    with session_scope() as s:
        return _version_out(registry.rollback(s, tenant, name))


@router.post("/v1/models/{name}/versions/{version}/evaluate", status_code=202, name="evaluate_model")
def evaluate_model(name: str, version: int, tenant: TenantDep) -> dict[str, Any]:
    """Evaluate the version on the held-out pairs in the background; its metrics appear on the version."""
    with session_scope() as s:
        found = registry.get(s, tenant, name, version)
        version_id = found.id
    messaging.send(messaging.EVALUATE_MODEL, [str(version_id)], "distillation")
    return {"accepted": True, "name": name, "version": version}
