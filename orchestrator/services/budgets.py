"""Hard budgets: money is held before capacity is rented and settled when it is given back.

A hold is a guarded ``UPDATE … SET held = held + :amount WHERE spent + held + :amount <= limit``
on each budget that applies (global, the provider's, the tenant's), all in the caller's
transaction. Postgres re-checks the WHERE clause after waiting for a concurrent holder's row
lock, so concurrent placements can never overshoot; budgets are always locked in id order so
two holders cannot deadlock. SQLite serialises writers with BEGIN IMMEDIATE.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import String, and_, cast, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from orchestrator.clock import utcnow
from orchestrator.db.engine import rows_changed
from orchestrator.db.models import Budget, BudgetPeriod, CostEntry, Tenant
from orchestrator.errors import GpufleetError, InvalidInput

SCOPES = ("global", "provider", "tenant")
EPSILON = 1e-9


class OverBudget(GpufleetError):
    """A hold does not fit. ``can_wait``: it would fit once other holds are settled."""

    def __init__(self, message: str, can_wait: bool) -> None:
        super().__init__(message)
        self.can_wait = can_wait


@dataclass(frozen=True)
class Hold:
    budget_ids: list[str]
    period: str
    amount: float
    rate: float


def current_period() -> str:
    return utcnow().strftime("%Y-%m")


def describe(budget: Budget) -> str:
    return "global budget" if budget.scope == "global" else f"{budget.scope} {budget.scope_key!r} budget"


def applicable(session: Session, tenant_id: uuid.UUID | None, provider: str) -> list[Budget]:
    """The budgets a charge by this tenant on this provider counts against, in lock order (one query)."""
    tenant_name = select(Tenant.name).where(Tenant.id == tenant_id).scalar_subquery()
    query = select(Budget).where(or_(
        Budget.scope == "global",
        and_(Budget.scope == "provider", Budget.scope_key == provider),
        and_(Budget.scope == "tenant", Budget.scope_key == tenant_name),
    )).order_by(cast(Budget.id, String))
    return list(session.scalars(query))


def _ensure_period(session: Session, budget_id: uuid.UUID, period: str) -> None:
    values: dict[str, Any] = {"budget_id": budget_id, "period": period, "spent": 0.0, "held": 0.0}
    session.execute(_insert(session, BudgetPeriod).values(**values).on_conflict_do_nothing())


def hold(session: Session, tenant_id: uuid.UUID | None, provider: str, amount: float, rate: float,
         budgets: list[Budget] | None = None) -> Hold:
    """Hold ``amount`` (and ``rate`` $/h of burn) on every applicable budget, or raise OverBudget.

    Must run inside a transaction (or savepoint) the caller rolls back on OverBudget. ``budgets``:
    the applicable ones, if the caller already looked them up."""
    period = current_period()
    amount, rate = round(max(0.0, amount), 8), round(max(0.0, rate), 8)
    held: list[str] = []
    for budget in applicable(session, tenant_id, provider) if budgets is None else budgets:
        if budget.monthly_limit is not None:
            _ensure_period(session, budget.id, period)
            ok = rows_changed(session.execute(
                update(BudgetPeriod)
                .where(BudgetPeriod.budget_id == budget.id, BudgetPeriod.period == period,
                       BudgetPeriod.spent + BudgetPeriod.held + amount <= budget.monthly_limit + EPSILON)
                .values(held=BudgetPeriod.held + amount)))
            if not ok:
                row = session.get_one(BudgetPeriod, (budget.id, period), populate_existing=True)
                free = budget.monthly_limit - row.spent - row.held
                raise OverBudget(
                    f"over the {describe(budget)}: needs ${amount:.4f} held, ${max(0.0, free):.4f} of "
                    f"${budget.monthly_limit:.2f} left this month (${row.spent:.4f} spent, ${row.held:.4f} held)",
                    can_wait=row.spent + amount <= budget.monthly_limit + EPSILON)
        if budget.hourly_limit is not None and rate > 0:
            ok = rows_changed(session.execute(
                update(Budget)
                .where(Budget.id == budget.id, Budget.rate_held + rate <= budget.hourly_limit + EPSILON)
                .values(rate_held=Budget.rate_held + rate)))
            if not ok:
                raise OverBudget(f"over the {describe(budget)}'s ${budget.hourly_limit:.2f}/h limit: "
                                 f"${rate:.4f}/h more would exceed it",
                                 can_wait=rate <= budget.hourly_limit + EPSILON)
        held.append(str(budget.id))
    return Hold(budget_ids=held, period=period, amount=amount, rate=rate)


def settle(session: Session, budget_ids: list[str], period: str | None, amount: float, rate: float, cost: float) -> None:
    """Turn a hold into spend: free ``amount`` and ``rate``, add the real ``cost``."""
    for budget_id in sorted(budget_ids):
        bid = uuid.UUID(budget_id)
        if period:
            session.execute(update(BudgetPeriod).where(BudgetPeriod.budget_id == bid, BudgetPeriod.period == period)
                            .values(held=BudgetPeriod.held - amount, spent=BudgetPeriod.spent + cost))
        if rate > 0:
            session.execute(update(Budget).where(Budget.id == bid).values(rate_held=Budget.rate_held - rate))


def charge_unheld(session: Session, tenant_id: uuid.UUID | None, provider: str, cost: float) -> None:
    """Spend that had no hold (an orphan the reaper found): it counts, even past the limit."""
    period = current_period()
    for budget in applicable(session, tenant_id, provider):
        if budget.monthly_limit is not None:
            _ensure_period(session, budget.id, period)
            session.execute(update(BudgetPeriod).where(BudgetPeriod.budget_id == budget.id, BudgetPeriod.period == period)
                            .values(spent=BudgetPeriod.spent + cost))


def _insert(session: Session, model: Any) -> Any:
    """An INSERT that can say ON CONFLICT DO NOTHING on either database we run on."""
    return (pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert)(model)


def record_cost(session: Session, *, source: str, tenant_id: uuid.UUID | None, provider: str, kind: str,
                amount: float, job_id: uuid.UUID | None = None, reservation_id: uuid.UUID | None = None,
                note: str = "") -> bool:
    """One settled charge; ``source`` is unique and stable for the thing charged, so a second charge of
    the same thing is dropped. Returns whether this one was recorded."""
    stmt = _insert(session, CostEntry).values(
        source=source, at=utcnow(), tenant_id=tenant_id, provider=provider, kind=kind, amount=round(amount, 8),
        job_id=job_id, reservation_id=reservation_id, note=note)
    return bool(rows_changed(session.execute(stmt.on_conflict_do_nothing())))


def over_limit(session: Session, budget_ids: list[str], period: str | None) -> str | None:
    """Why a running hold must stop because an operator cut a budget below what is committed, else None."""
    for budget_id in budget_ids:
        budget = session.get(Budget, uuid.UUID(budget_id))
        if budget is None or budget.monthly_limit is None or not period:
            continue
        row = session.get(BudgetPeriod, (budget.id, period))
        if row is not None and row.spent + row.held > budget.monthly_limit + EPSILON:
            return (f"the {describe(budget)} was lowered to ${budget.monthly_limit:.2f} this month, below the "
                    f"${row.spent + row.held:.4f} spent and held")
    return None


# --- administration ---------------------------------------------------------------------


def set_budget(session: Session, scope: str, key: str, monthly_limit: float | None, hourly_limit: float | None) -> Budget:
    if scope not in SCOPES:
        raise InvalidInput("scope", f"must be one of {', '.join(SCOPES)}")
    if scope == "global":
        key = ""
    elif not key:
        raise InvalidInput("key", f"a {scope} budget needs the {scope}'s name")
    for field, value in (("monthly_limit", monthly_limit), ("hourly_limit", hourly_limit)):
        if value is not None and value < 0:
            raise InvalidInput(field, "must not be negative")
    budget = session.scalar(select(Budget).where(Budget.scope == scope, Budget.scope_key == key))
    if budget is None:
        budget = Budget(id=uuid.uuid4(), scope=scope, scope_key=key, rate_held=0.0)
        session.add(budget)
    budget.monthly_limit = monthly_limit
    budget.hourly_limit = hourly_limit
    budget.updated_at = utcnow()
    session.flush()
    return budget


def all_budgets(session: Session) -> list[Budget]:
    return list(session.scalars(select(Budget).order_by(Budget.scope, Budget.scope_key)))


def status(session: Session, budgets: list[Budget] | None = None) -> list[dict[str, Any]]:
    period = current_period()
    rows = budgets if budgets is not None else all_budgets(session)
    out = []
    for b in rows:
        ledger = session.get(BudgetPeriod, (b.id, period))
        out.append({"scope": b.scope, "key": b.scope_key, "monthly_limit": b.monthly_limit,
                    "hourly_limit": b.hourly_limit, "period": period,
                    "spent": max(0.0, round(ledger.spent, 6)) if ledger else 0.0,
                    "held": max(0.0, round(ledger.held, 6)) if ledger else 0.0,
                    "rate_held": max(0.0, round(b.rate_held, 6))})
    return out
