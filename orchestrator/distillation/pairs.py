"""Teacher/student pairs: one row per input, a teacher and a student inference job per row.

Both jobs are ordinary jobs — placed, budgeted, costed and failed over like any other — that carry
the pair's id. When one ends, ``record`` copies its answer, tokens, latency and cost into the pair;
when both have, the pair is scored and marked ``complete`` (or ``failed`` when the teacher gave no
answer). The teacher's job never waits for the student's: callers that want the answer wait for
the teacher job alone.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from orchestrator.clock import utcnow
from orchestrator.db.engine import session_scope
from orchestrator.db.models import DistillationPair, Job
from orchestrator.distillation import quality
from orchestrator.domain import InferenceJob, JobStatus
from orchestrator.services import jobs
from orchestrator.services.transitions import advance, transition
from orchestrator.settings import Settings, get_settings

log = logging.getLogger(__name__)
TEACHER, STUDENT, JUDGE = "teacher", "student", "judge"
PENDING, COMPLETE, FAILED = "pending", "complete", "failed"
S = JobStatus


@dataclass
class PairRequest:
    teacher_model: str
    student_model: str
    messages: list[dict[str, Any]]
    max_tokens: int = 256
    temperature: float = 0.7
    tags: list[str] = field(default_factory=list)
    requirements: dict[str, Any] = field(default_factory=dict)
    priority: str = "normal"
    timeout_seconds: int | None = None


def _inference(req: PairRequest, model: str, role: str, priority: str) -> InferenceJob:
    return InferenceJob.model_validate({
        "kind": "inference", "priority": priority, "requirements": req.requirements,
        "timeout_seconds": req.timeout_seconds, "labels": {"distillation": role},
        "spec": {"model": model, "messages": req.messages, "max_tokens": req.max_tokens, "temperature": req.temperature,
                 "logprobs": role == TEACHER}})


def open_pairs(session: Session, tenant_id: uuid.UUID, settings: Settings, requests: list[PairRequest], *,
               source: str, parent_job_id: uuid.UUID | None = None,
               existing: tuple[str, uuid.UUID] | None = None) -> list[tuple[uuid.UUID, list[dict[str, Any]]]]:
    """Write the pairs and their jobs in the caller's transaction; returns (pair id, new job rows) per
    request for the caller to dispatch after commit. ``existing``: (role, job id) of a request already
    being served — flagged for distillation (the teacher) or routed to the student and shadowed by the
    teacher — so only the other side's job is created."""
    now = utcnow()
    out = []
    for req in requests:
        pair_id = uuid.uuid4()
        ids = {existing[0]: existing[1]} if existing else {}
        # The side nobody waits for is background work: it never competes with an answer a caller awaits.
        background = "low" if existing or parent_job_id is None else req.priority
        sides = [(TEACHER, req.teacher_model, req.priority if not existing else background),
                 (STUDENT, req.student_model, "low")]
        rows = []
        for role, model, priority in sides:
            if role in ids:
                continue
            row = jobs.build_row(tenant_id, _inference(req, model, role, priority), settings, now)
            row.update(pair_id=pair_id, pair_role=role)
            rows.append(row)
            ids[role] = row["id"]
        session.execute(insert(DistillationPair).values(
            id=pair_id, tenant_id=tenant_id, created_at=now, updated_at=now, status=PENDING, source=source,
            teacher_model=req.teacher_model, student_model=req.student_model, tags=list(req.tags),
            messages=req.messages, parent_job_id=parent_job_id, teacher_job_id=ids[TEACHER], student_job_id=ids[STUDENT]))
        jobs.insert_rows(session, rows, actor="distillation")
        out.append((pair_id, rows))
    return out


def pair_existing(session: Session, job_row: dict[str, Any], role: str, req: PairRequest, source: str) -> list[dict[str, Any]]:
    """A request being served becomes one side (``role``) of a new pair; returns the other side's job row."""
    ((pair_id, rows),) = open_pairs(session, job_row["tenant_id"], get_settings(), [req], source=source,
                                    existing=(role, job_row["id"]))
    job_row.update(pair_id=pair_id, pair_role=role)
    return rows


# --- completion ---------------------------------------------------------------------------


def record(job_id: uuid.UUID) -> None:
    """A pair's job ended: copy the sides that have ended into the pair (under the pair's row lock, from
    the job rows themselves, so whichever side finishes last completes the pair), and finish it when
    both are in."""
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None or job.pair_id is None or not S(job.status).terminal:
            return
        pair = s.execute(select(DistillationPair).where(DistillationPair.id == job.pair_id)
                         .with_for_update()).scalar_one_or_none()
        if pair is None or pair.status != PENDING:
            return
        if job.pair_role == JUDGE:
            result = job.result or {} if job.status == S.succeeded.value else {}
            _judged(pair, quality.parse_judge(str(result.get("text", ""))))
        else:
            sides = {j.pair_role: j for j in s.scalars(select(Job).where(
                Job.id.in_([i for i in (pair.teacher_job_id, pair.student_job_id) if i])))}
            for side in sides.values():
                if S(side.status).terminal:
                    _copy_side(pair, side, side.result or {} if side.status == S.succeeded.value else {})
            if len(sides) == 2 and all(S(j.status).terminal for j in sides.values()):
                _complete(s, pair)
        parent = pair.parent_job_id if pair.status != PENDING else None
        accepted = (pair.tenant_id, pair.teacher_model, pair.student_model) if pair.accepted else None
    if parent is not None:
        finish_parent(parent)
    if accepted is not None and pair.source != "shadow":
        from orchestrator.distillation import training

        training.maybe_auto_train(*accepted, get_settings())


def _copy_side(pair: DistillationPair, job: Job, result: dict[str, Any]) -> None:
    usage = result.get("usage") or {}
    latency = round(job.duration_seconds * 1000, 1) if job.duration_seconds is not None else None
    text = result.get("text") if job.status == S.succeeded.value else None
    if job.pair_role == TEACHER:
        pair.teacher_output, pair.teacher_tokens, pair.teacher_latency_ms = text, usage.get("completion_tokens"), latency
        pair.teacher_cost, pair.prompt_tokens = job.cost, usage.get("prompt_tokens")
        pair.teacher_logprob = result.get("logprob")
        if text is None:
            pair.error = f"teacher {job.status}: {job.error}"
    else:
        pair.student_output, pair.student_tokens, pair.student_latency_ms = text, usage.get("completion_tokens"), latency
        pair.student_cost = job.cost
    pair.updated_at = utcnow()


def _complete(s: Session, pair: DistillationPair) -> None:
    settings = get_settings()
    if pair.teacher_output is None:
        pair.status, pair.accepted = FAILED, False
        return
    if pair.student_output is not None:
        pair.agreement = quality.similarity(pair.teacher_output, pair.student_output)
    if pair.teacher_logprob is not None:
        _scored(pair, quality.from_logprob(pair.teacher_logprob), "logprob", settings)
    elif settings.distill_judge_model:
        _ask_judge(s, pair, settings)
    else:
        _scored(pair, pair.agreement if pair.agreement is not None else 0.0, "similarity", settings)


def _scored(pair: DistillationPair, score: float, method: str, settings: Settings) -> None:
    pair.score, pair.score_method = score, method
    pair.accepted = score >= settings.distill_quality_threshold
    pair.status, pair.updated_at = COMPLETE, utcnow()


def _judged(pair: DistillationPair, score: float | None) -> None:
    settings = get_settings()
    if score is None:  # the judge did not give a grade: fall back to agreement, and say so
        _scored(pair, pair.agreement if pair.agreement is not None else 0.0, "similarity", settings)
    else:
        _scored(pair, score, "judge", settings)


def _ask_judge(s: Session, pair: DistillationPair, settings: Settings) -> None:
    # Both sides may end at once: the second record() (serialised by the pair's row lock) finds the
    # judge the first one asked, and must not pay for another.
    if s.scalar(select(Job.id).where(Job.pair_id == pair.id, Job.pair_role == JUDGE).limit(1)) is not None:
        return
    req = PairRequest(teacher_model=settings.distill_judge_model, student_model="",
                      messages=[{"role": "user", "content": quality.judge_prompt(pair.messages, pair.teacher_output or "")}],
                      max_tokens=8, temperature=0.0)
    row = jobs.build_row(pair.tenant_id, _inference(req, settings.distill_judge_model, JUDGE, "low"), settings, utcnow())
    row.update(pair_id=pair.id, pair_role=JUDGE)
    jobs.insert_rows(s, [row], actor="distillation")
    from orchestrator.services import messaging  # after commit would be better; the sweeper covers a lost message

    messaging.send(messaging.DISPATCH, [str(row["id"]), 1], row["queue"], countdown=0.5)


# --- distillation jobs (a batch of prompts) ---------------------------------------------------


def finish_parent(parent_id: uuid.UUID) -> None:
    """A distillation job is done when every pair it opened is: summarise them as its result."""
    with session_scope() as s:
        counts: dict[str, int] = {status: n for status, n in s.execute(select(DistillationPair.status, func.count()).where(
            DistillationPair.parent_job_id == parent_id).group_by(DistillationPair.status))}
        if not counts or counts.get(PENDING):
            return
        stats = s.execute(select(func.avg(DistillationPair.agreement), func.count().filter(DistillationPair.accepted.is_(True)),
                                 func.coalesce(func.sum(DistillationPair.teacher_cost), 0.0),
                                 func.coalesce(func.sum(DistillationPair.student_cost), 0.0))
                          .where(DistillationPair.parent_job_id == parent_id)).one()
        job = s.get(Job, parent_id)
        attempt = job.attempt if job else 1
    mean, accepted, teacher_cost, student_cost = stats
    result: dict[str, Any] = {"pairs": sum(counts.values()), "complete": counts.get(COMPLETE, 0), "failed": counts.get(FAILED, 0),
              "accepted": int(accepted or 0), "mean_agreement": round(float(mean), 4) if mean is not None else None,
              "teacher_cost": round(float(teacher_cost or 0), 8), "student_cost": round(float(student_cost or 0), 8)}
    done = advance(parent_id, expected=S.running, attempt=attempt, to=S.succeeded, actor="distillation",
                   reason=f"{result['complete']} of {result['pairs']} pairs complete, {result['accepted']} accepted",
                   values={"result": result, "cost": result["teacher_cost"] + result["student_cost"], "next_check_at": None})
    if done:
        log.info("distillation job %s finished: %s", parent_id, result)


def fan_out(job_id: uuid.UUID, attempt: int, actor: str = "dispatcher") -> None:
    """Dispatch of a ``distillation`` job: a pair (teacher + student inference jobs) per prompt; the job
    runs until they have all ended. It is placed nowhere itself: its pairs' jobs are. With no check
    time the sweeper leaves it alone; its pairs' jobs are swept like any others."""
    settings = get_settings()
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None or job.status != S.queued.value or job.attempt != attempt:
            return
        spec = job.spec
        requests = [PairRequest(teacher_model=spec["teacher_model"], student_model=spec["student_model"],
                                messages=[{"role": "user", "content": prompt}], max_tokens=int(spec.get("max_tokens", 256)),
                                tags=list(spec.get("tags", [])), requirements=job.requirements or {}, priority=job.priority)
                    for prompt in spec["prompts"]]
        opened = open_pairs(s, job.tenant_id, settings, requests, source="job", parent_job_id=job_id)
        transition(s, job_id, expected=S.queued, attempt=attempt, to=S.placing, actor=actor,
                   reason="placed nowhere itself: each pair's jobs are placed on their own")
        transition(s, job_id, expected=S.placing, attempt=attempt, to=S.running, actor=actor,
                   reason=f"fanned out into {len(opened)} teacher/student pairs",
                   values={"next_check_at": None, "started_at": utcnow()})
    jobs.dispatch_rows([r for _, rows in opened for r in rows])
