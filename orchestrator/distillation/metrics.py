"""Prometheus metrics of the distillation loop, computed from Postgres at scrape time.

What an operator asks of distillation: how much traffic goes to teachers and students, how many pairs
are captured and accepted, whether students agree with their teachers (and whether that is moving), and
whether routing requests to a student saves money. Pairs are bounded by the retention sweep, so they are
read whole; jobs are not, so the figures that look inside jobs' JSON (the model asked for, the route
label, tokens) cover the jobs submitted in the last 24 h (``services.metrics.WINDOW``).

Savings are measured from recorded costs, not price lists (formula in docs/distillation.md): for each
request a traffic route sent to a student, what the teacher would have cost — the teacher's measured
cost per token over completed pairs of that teacher and student, times the request's tokens — minus
what the request actually cost.
"""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from orchestrator.db.engine import session_scope
from orchestrator.db.models import DistillationPair, Job, TrafficRoute
from orchestrator.services.metrics import json_number, label, recent, window_start

AGREEMENT_WINDOWS: tuple[tuple[str, timedelta | None], ...] = (("1h", timedelta(hours=1)), ("24h", timedelta(hours=24)),
                                                               ("all", None))
# What services.jobs writes into a routed request's labels: "student <name> v<version>".
_ROUTE_LABEL = re.compile(r"^student (?P<name>.+) v(?P<version>\d+)$")


def route_student(route: str) -> str:
    """The student name of a routed request's ``route`` label (the whole label if it is not in that form)."""
    match = _ROUTE_LABEL.match(route)
    return match.group("name") if match else route


@dataclass(frozen=True)
class TeacherRate:
    """What a teacher's answers cost per token, measured over completed pairs: recorded cost of the teacher's
    job over the tokens it handled (prompt + completion), the same tokens a request's ``total_tokens`` counts."""

    cost: float
    tokens: float

    @property
    def per_token(self) -> float:
        return self.cost / self.tokens


@dataclass
class Routed:
    """The routed requests of one teacher → student, summed (succeeded ones for cost and tokens)."""

    requests: int = 0
    cost: float = 0.0
    tokens: float = 0.0
    teacher_equivalent: float = 0.0
    priced: bool = False


def teacher_rates(s: Session) -> dict[tuple[str, str], TeacherRate]:
    """(teacher, student model) → the teacher's measured rate over their completed pairs with a recorded cost."""
    p = DistillationPair
    tokens = func.sum(func.coalesce(p.prompt_tokens, 0) + func.coalesce(p.teacher_tokens, 0))
    rows = s.execute(select(p.teacher_model, p.student_model, func.sum(p.teacher_cost), tokens)
                     .where(p.status == "complete", p.teacher_cost.is_not(None), p.teacher_tokens.is_not(None))
                     .group_by(p.teacher_model, p.student_model))
    return {(t, st): TeacherRate(float(c or 0), float(n or 0)) for t, st, c, n in rows if n}


def rate_for(rates: dict[tuple[str, str], TeacherRate], teacher: str, served_model: str) -> TeacherRate | None:
    """The teacher's rate measured against this student model, else against any of its students (the teacher's
    cost per token does not depend on who it is paired with; the exact pair is only preferred when it exists)."""
    exact = rates.get((teacher, served_model))
    if exact is not None:
        return exact
    anyone = [r for (t, _), r in rates.items() if t == teacher]
    if not anyone:
        return None
    return TeacherRate(sum(r.cost for r in anyone), sum(r.tokens for r in anyone))


def resolve_teacher(candidates: list[str], served_model: str,
                    rates: dict[tuple[str, str], TeacherRate]) -> tuple[str, TeacherRate | None]:
    """The teacher a routed request stood in for, with its rate. A shadowed request's pair names it; otherwise
    the tenant's traffic routes to that student do, and when several teachers route to the same student the
    cheapest measured one is taken, so the savings are never overstated."""
    priced = [(t, r) for t in candidates if (r := rate_for(rates, t, served_model)) is not None]
    if priced:
        return min(priced, key=lambda item: (item[1].per_token, item[0]))
    return (candidates[0] if candidates else ""), None


class DistillationCollector(Collector):
    """Teacher/student traffic, pairs, agreement and the money routing to students saves."""

    def describe(self) -> Iterator[Metric]:
        yield from self._families().values()

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        ts = ["teacher", "student"]
        families = [
            GaugeMetricFamily("gpufleet_distillation_requests",
                              "Jobs submitted in the last 24 h as one side of a pair, by role (teacher, student, judge), "
                              "the model asked and status", labels=["role", "model", "status"]),
            GaugeMetricFamily("gpufleet_distillation_routed_requests",
                              "Requests for a teacher model submitted in the last 24 h that a traffic route sent to "
                              "its production student, by teacher, student name and status", labels=[*ts, "status"]),
            GaugeMetricFamily("gpufleet_distillation_pairs",
                              "Pairs kept (retention applies) by teacher and student model, source "
                              "(query, job, inference, shadow) and status (pending, complete, failed)",
                              labels=[*ts, "source", "status"]),
            GaugeMetricFamily("gpufleet_distillation_pairs_accepted",
                              "Pairs kept whose teacher answer scored above the quality threshold (exported for "
                              "training)", labels=ts),
            GaugeMetricFamily("gpufleet_distillation_agreement",
                              "Mean agreement (0..1) of the student's answers with the teacher's over completed pairs "
                              "created in the window (1h, 24h, all kept pairs)", labels=[*ts, "window"]),
            GaugeMetricFamily("gpufleet_distillation_agreement_pairs",
                              "Completed pairs with an agreement behind gpufleet_distillation_agreement",
                              labels=[*ts, "window"]),
            GaugeMetricFamily("gpufleet_distillation_teacher_cost_per_1k_tokens_dollars",
                              "The teacher's measured cost per 1000 tokens (prompt + completion) over completed pairs "
                              "of this teacher and student model", labels=ts),
            GaugeMetricFamily("gpufleet_distillation_routed_cost_dollars",
                              "Recorded cost of succeeded routed requests submitted in the last 24 h, by teacher "
                              "and student name", labels=ts),
            GaugeMetricFamily("gpufleet_distillation_teacher_equivalent_cost_dollars",
                              "What those routed requests would have cost on the teacher: its measured cost per "
                              "token times each request's tokens (last 24 h)", labels=ts),
            GaugeMetricFamily("gpufleet_distillation_savings_dollars",
                              "Money saved against sending everything to the teacher, last 24 h: teacher-equivalent "
                              "cost minus recorded cost of routed requests (negative: the student cost more)",
                              labels=ts),
        ]
        return {f.name.removeprefix("gpufleet_distillation_"): f for f in families}

    def collect(self) -> Iterator[Metric]:
        f = self._families()
        p = DistillationPair
        with session_scope() as s:
            window = recent(s, Job.tenant_id, Job.created_at, window_start())
            model = Job.spec["model"].as_string()
            for role, asked, status, n in s.execute(
                    select(Job.pair_role, model, Job.status, func.count())
                    .where(window, Job.pair_role.is_not(None)).group_by(Job.pair_role, model, Job.status)):
                f["requests"].add_metric([label(role), label(asked), status], n)

            for teacher, student, source, status, n in s.execute(
                    select(p.teacher_model, p.student_model, p.source, p.status, func.count())
                    .group_by(p.teacher_model, p.student_model, p.source, p.status)):
                f["pairs"].add_metric([teacher, student, source, status], n)
            for teacher, student, n in s.execute(select(p.teacher_model, p.student_model, func.count())
                                                 .where(p.accepted.is_(True)).group_by(p.teacher_model, p.student_model)):
                f["pairs_accepted"].add_metric([teacher, student], n)

            for name, span in AGREEMENT_WINDOWS:
                query = (select(p.teacher_model, p.student_model, func.avg(p.agreement), func.count())
                         .where(p.status == "complete", p.agreement.is_not(None)))
                if span is not None:
                    query = query.where(recent(s, p.tenant_id, p.created_at, window_start(span)))
                for teacher, student, mean, n in s.execute(query.group_by(p.teacher_model, p.student_model)):
                    f["agreement"].add_metric([teacher, student, name], float(mean))
                    f["agreement_pairs"].add_metric([teacher, student, name], n)

            rates = teacher_rates(s)
            for (teacher, student), rate in sorted(rates.items()):
                f["teacher_cost_per_1k_tokens_dollars"].add_metric([teacher, student], rate.per_token * 1000)
            routed, counts = _routed(s, window, rates)
        for (teacher, student, status), n in sorted(counts.items()):
            f["routed_requests"].add_metric([teacher, student, status], n)
        for (teacher, student), r in sorted(routed.items()):
            f["routed_cost_dollars"].add_metric([teacher, student], r.cost)
            if r.priced:
                f["teacher_equivalent_cost_dollars"].add_metric([teacher, student], r.teacher_equivalent)
                f["savings_dollars"].add_metric([teacher, student], r.teacher_equivalent - r.cost)
        yield from f.values()


def _routed(s: Session, window: Any, rates: dict[tuple[str, str], TeacherRate]
            ) -> tuple[dict[tuple[str, str], Routed], dict[tuple[str, str, str], int]]:
    """Routed requests of the window, summed in the database per (tenant, route, served model, shadow teacher,
    status), then attributed to a teacher here: (teacher, student) → sums, and (teacher, student, status) → count."""
    route = Job.labels["route"].as_string()
    served = Job.spec["model"].as_string()
    prompt = json_number(s, Job.result, "usage", "prompt_tokens")
    completion = json_number(s, Job.result, "usage", "completion_tokens")
    tokens = func.coalesce(json_number(s, Job.result, "usage", "total_tokens"),
                           func.coalesce(prompt, 0) + func.coalesce(completion, 0))
    shadow = DistillationPair.teacher_model
    rows = s.execute(
        select(Job.tenant_id, route, served, shadow, Job.status, func.count(), func.sum(Job.cost), func.sum(tokens))
        .select_from(Job)
        .outerjoin(DistillationPair, and_(DistillationPair.id == Job.pair_id, DistillationPair.source == "shadow"))
        .where(window, route.is_not(None))
        .group_by(Job.tenant_id, route, served, shadow, Job.status)).all()
    routes: dict[tuple[uuid.UUID, str], list[str]] = defaultdict(list)
    if rows:
        for tenant_id, teacher, student in s.execute(select(TrafficRoute.tenant_id, TrafficRoute.teacher_model,
                                                            TrafficRoute.student_name)):
            routes[(tenant_id, student)].append(teacher)
    sums: dict[tuple[str, str], Routed] = defaultdict(Routed)
    counts: dict[tuple[str, str, str], int] = defaultdict(int)
    for tenant_id, route_label, served_model, shadow_teacher, status, n, cost, used in rows:
        student = route_student(label(route_label))
        candidates = [shadow_teacher] if shadow_teacher else sorted(routes.get((tenant_id, student), []))
        teacher, rate = resolve_teacher(candidates, label(served_model), rates)
        counts[(teacher, student, status)] += int(n)
        if status != "succeeded":
            continue
        entry = sums[(teacher, student)]
        entry.requests += int(n)
        entry.cost += float(cost or 0)
        entry.tokens += float(used or 0)
        if rate is not None:
            entry.teacher_equivalent += float(used or 0) * rate.per_token
            entry.priced = True
    return dict(sums), dict(counts)
