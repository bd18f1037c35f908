"""Shifting a teacher model's traffic to its production student.

A route says: of the requests for ``teacher_model``, send ``share`` to the production version of
``student_name`` (a canary), and of those, shadow ``shadow_rate`` with the teacher in the
background so agreement keeps being measured on live traffic. With ``auto``, each evaluation that
meets ``min_agreement`` raises the share by ``step`` (up to ``max_share``); an evaluation or a run
of shadow pairs below it drops the share back to zero. Every change is logged with its reason.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from orchestrator.clock import utcnow
from orchestrator.db.models import DistillationPair, TrafficRoute
from orchestrator.distillation import registry

log = logging.getLogger(__name__)
SHADOW_WINDOW = 50  # recent shadow pairs a regression check looks at
MIN_SHADOW_PAIRS = 5


@dataclass(frozen=True)
class Routed:
    served_model: str
    student_name: str
    version: int
    shadow: bool


def _draw(seed: str) -> float:
    return int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big") / 2**64


def active_routes(session: Session, tenant_id: uuid.UUID) -> dict[str, TrafficRoute]:
    """The tenant's routes that take traffic, by teacher model: one select per submit call, not per job."""
    return {r.teacher_model: r for r in session.scalars(select(TrafficRoute).where(
        TrafficRoute.tenant_id == tenant_id, TrafficRoute.share > 0))}


def route(session: Session, tenant_id: uuid.UUID, r: TrafficRoute | None, seed: str) -> Routed | None:
    """The student to serve this request instead of the teacher (``r``: the route of the model asked for),
    or None for the teacher."""
    if r is None or r.share <= 0 or _draw(seed) >= r.share:
        return None
    prod = registry.production(session, tenant_id, r.student_name)
    if prod is None or not prod.served_model:
        return None
    return Routed(served_model=prod.served_model, student_name=r.student_name, version=prod.version,
                  shadow=_draw(seed + ":shadow") < r.shadow_rate)


def set_route(session: Session, tenant_id: uuid.UUID, teacher_model: str, student_name: str, **values: object) -> TrafficRoute:
    r = session.scalar(select(TrafficRoute).where(TrafficRoute.tenant_id == tenant_id,
                                                 TrafficRoute.teacher_model == teacher_model))
    if r is None:
        r = TrafficRoute(id=uuid.uuid4(), tenant_id=tenant_id, teacher_model=teacher_model, student_name=student_name,
                         share=0.0, shadow_rate=0.1, auto=True, step=0.1, max_share=0.9, min_agreement=0.8)
        session.add(r)
    r.student_name = student_name
    for key, value in values.items():
        if value is not None:
            setattr(r, key, value)
    r.updated_at = utcnow()
    session.flush()
    return r


def routes(session: Session, tenant_id: uuid.UUID) -> list[TrafficRoute]:
    return list(session.scalars(select(TrafficRoute).where(TrafficRoute.tenant_id == tenant_id)
                                .order_by(TrafficRoute.teacher_model)))


def after_evaluation(session: Session, tenant_id: uuid.UUID, name: str, agreement: float | None) -> list[str]:
    """Move the automatic routes of a student by its latest production evaluation; returns what changed."""
    changes = []
    for r in session.scalars(select(TrafficRoute).where(TrafficRoute.tenant_id == tenant_id,
                                                       TrafficRoute.student_name == name, TrafficRoute.auto)):
        before = r.share
        if agreement is not None and agreement >= r.min_agreement:
            r.share = round(min(r.max_share, r.share + r.step), 4)
            why = f"evaluation agreement {agreement:.3f} >= {r.min_agreement}"
        else:
            r.share = 0.0
            why = f"evaluation agreement {agreement} below {r.min_agreement}: back to the teacher"
        if r.share != before:
            r.updated_at = utcnow()
            changes.append(f"{r.teacher_model} → {name}: share {before:.2f} → {r.share:.2f} ({why})")
    for line in changes:
        log.info("traffic: %s", line)
    return changes


def check_regressions(session: Session, tenant_id: uuid.UUID | None = None) -> list[str]:
    """Live shadow pairs disagreeing: drop the student's share back to zero (beat, with the retention sweep)."""
    q = select(TrafficRoute).where(TrafficRoute.auto, TrafficRoute.share > 0)
    if tenant_id is not None:
        q = q.where(TrafficRoute.tenant_id == tenant_id)
    changes = []
    for r in session.scalars(q):
        recent = select(DistillationPair.agreement).where(
            DistillationPair.tenant_id == r.tenant_id, DistillationPair.teacher_model == r.teacher_model,
            DistillationPair.source == "shadow", DistillationPair.status == "complete",
            DistillationPair.agreement.is_not(None), DistillationPair.updated_at >= r.updated_at,
        ).order_by(DistillationPair.created_at.desc()).limit(SHADOW_WINDOW).subquery()
        count, mean = session.execute(select(func.count(), func.avg(recent.c.agreement))).one()
        if count >= MIN_SHADOW_PAIRS and mean is not None and mean < r.min_agreement:
            changes.append(f"{r.teacher_model} → {r.student_name}: share {r.share:.2f} → 0 (shadow agreement "
                           f"{mean:.3f} over {count} pairs < {r.min_agreement})")
            r.share, r.updated_at = 0.0, utcnow()
    for line in changes:
        log.warning("traffic: %s", line)
    return changes
