"""Evaluating a student version on the held-out pairs (the test split, never trained on).

Each held-out input is sent to the version as an ordinary inference job (so latency and cost are
what production would see); its answer is compared with the teacher's. Metrics go on the version
in the registry; the student's automatic traffic routes then move with them — and a version that
meets a route's bar and beats the current production version is promoted.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from sqlalchemy import select

from orchestrator.db.engine import session_scope
from orchestrator.db.models import Job, ModelVersion, TrafficRoute
from orchestrator.distillation import export, quality, registry, traffic
from orchestrator.domain import InferenceJob, JobStatus
from orchestrator.services import jobs
from orchestrator.settings import get_settings

log = logging.getLogger(__name__)


def evaluate(version_id: uuid.UUID, sample: int = 50, timeout: float = 600.0) -> dict[str, Any]:
    settings = get_settings()
    with session_scope() as s:
        version = s.get(ModelVersion, version_id)
        if version is None or not version.served_model:
            return {}
        tenant_id, name, served = version.tenant_id, version.name, version.served_model
        params = version.params or {}
        teacher = params.get("teacher_model") or s.scalar(select(TrafficRoute.teacher_model).where(
            TrafficRoute.tenant_id == tenant_id, TrafficRoute.student_name == name).limit(1))
    # The split it was trained with: the held-out set is exactly what training never saw.
    split = float(params.get("validation_split", settings.distill_test_fraction))
    filters = export.ExportFilters(teacher_model=teacher, test_fraction=split, limit=sample)
    held_out = list(export.pairs(tenant_id, filters, "test", settings.distill_quality_threshold))
    if not held_out:
        return {"examples": 0}
    submitted: list[tuple[uuid.UUID, str]] = []
    with session_scope() as s:
        for pair in held_out:
            req = InferenceJob.model_validate({"kind": "inference", "priority": "low",
                                               "labels": {"evaluation": f"{name} v{version.version}"},
                                               "spec": {"model": served, "messages": pair.messages, "max_tokens": 256}})
            job, _ = jobs.submit(s, tenant_id, req, settings, actor="evaluation")
            submitted.append((job.id, pair.teacher_output or ""))
        rows = [{"id": job_id, "queue": "low_priority"} for job_id, _ in submitted]
    jobs.dispatch_rows(rows)
    answers = _wait([job_id for job_id, _ in submitted], timeout)
    agreements, latencies, cost, tokens, failed = [], [], 0.0, 0, 0
    for job_id, teacher_text in submitted:
        answer = answers.get(job_id)
        if answer is None or answer["status"] != JobStatus.succeeded.value:
            failed += 1
            continue
        agreements.append(quality.similarity(answer["text"], teacher_text))
        latencies.append(answer["duration"] * 1000)
        cost += answer["cost"]
        tokens += answer["tokens"]
    judged = _judge([(pair.messages, answers.get(job_id)) for pair, (job_id, _) in zip(held_out, submitted, strict=True)],
                    tenant_id, settings, timeout)
    metrics = {"examples": len(submitted), "failed": failed, "judge_score": judged,
               "agreement": round(sum(agreements) / len(agreements), 4) if agreements else None,
               "latency_ms": round(sum(latencies) / len(latencies), 1) if latencies else None,
               "cost_per_1k_tokens": round(cost / tokens * 1000, 8) if tokens else None, "evaluated_at": time.time()}
    with session_scope() as s:
        registry.set_metrics(s, version_id, metrics)
        _promote_if_better(s, tenant_id, name, version_id, metrics)
        changes = traffic.after_evaluation(s, tenant_id, name, metrics["agreement"])
    metrics["traffic_changes"] = changes
    log.info("evaluated %s: %s", name, metrics)
    return metrics


def _promote_if_better(s: Any, tenant_id: uuid.UUID, name: str, version_id: uuid.UUID, metrics: dict[str, Any]) -> None:
    """An automatic route's bar met, and better than what serves now: this version takes production."""
    bars = [r.min_agreement for r in traffic.routes(s, tenant_id) if r.student_name == name and r.auto]
    agreement = metrics.get("agreement")
    if not bars or agreement is None or agreement < min(bars):
        return
    current = registry.production(s, tenant_id, name)
    if current is not None and (current.metrics or {}).get("agreement", 0) >= agreement:
        return
    candidate = s.get(ModelVersion, version_id)
    registry.promote(s, tenant_id, name, candidate.version)
    log.info("promoted %s v%d (agreement %.3f)", name, candidate.version, agreement)


def _judge(answered: list[tuple[list[dict[str, Any]], dict[str, Any] | None]], tenant_id: uuid.UUID, settings: Any,
           timeout: float) -> float | None:
    """The judge model's mean grade of the student's answers, when a judge is configured."""
    if not settings.distill_judge_model:
        return None
    asked: list[uuid.UUID] = []
    with session_scope() as s:
        for messages, answer in answered:
            if answer is None or answer["status"] != JobStatus.succeeded.value:
                continue
            req = InferenceJob.model_validate({
                "kind": "inference", "priority": "low", "labels": {"evaluation": "judge"},
                "spec": {"model": settings.distill_judge_model, "max_tokens": 8, "temperature": 0.0,
                         "messages": [{"role": "user", "content": quality.judge_prompt(messages, answer["text"])}]}})
            job, _ = jobs.submit(s, tenant_id, req, settings, actor="evaluation")
            asked.append(job.id)
    jobs.dispatch_rows([{"id": job_id, "queue": "low_priority"} for job_id in asked])
    grades = [g for g in (quality.parse_judge(a["text"]) for a in _wait(asked, timeout).values()
                          if a["status"] == JobStatus.succeeded.value) if g is not None]
    return round(sum(grades) / len(grades), 4) if grades else None


def _wait(job_ids: list[uuid.UUID], timeout: float) -> dict[uuid.UUID, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as s:
            rows = s.execute(select(Job.id, Job.status, Job.result, Job.duration_seconds, Job.cost)
                             .where(Job.id.in_(job_ids))).all()
        done = {r.id: {"status": r.status, "text": (r.result or {}).get("text", ""), "duration": r.duration_seconds or 0.0,
                       "cost": r.cost or 0.0, "tokens": int(((r.result or {}).get("usage") or {}).get("total_tokens", 0))}
                for r in rows if JobStatus(r.status).terminal}
        if len(done) == len(job_ids) or time.monotonic() > deadline:
            return done
        time.sleep(0.25)
