"""/v1/costs (the caller's settled spend) and /v1/budgets (the limits that apply to the caller)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.db.engine import session_scope
from orchestrator.db.models import Tenant
from orchestrator.services import budgets, costs

from ..deps import TenantDep

router = APIRouter(prefix="/v1", tags=["costs"])


@router.get("/costs", name="get_costs")
def get_costs(tenant: TenantDep, since: datetime | None = None, until: datetime | None = None) -> dict[str, object]:
    """Settled spend of the caller, by provider, job kind and day (UTC)."""
    with session_scope() as s:
        return costs.summary(s, tenant, since, until)


class TenantBudgetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    monthly_limit: Annotated[float | None, Field(ge=0, description="USD per calendar month (UTC); null: none")] = None
    hourly_limit: Annotated[float | None, Field(ge=0, description="USD per hour of capacity held at once")] = None


@router.get("/budgets", name="list_budgets")
def list_budgets(tenant: TenantDep) -> list[dict[str, object]]:
    """The budgets the caller's spend counts against: global, per provider, and the caller's own."""
    with session_scope() as s:
        name = s.get_one(Tenant, tenant).name
        rows = [b for b in budgets.all_budgets(s) if b.scope != "tenant" or b.scope_key == name]
        return budgets.status(s, rows)


@router.put("/budgets/tenant", name="set_tenant_budget")
def set_tenant_budget(body: TenantBudgetIn, tenant: TenantDep) -> dict[str, object]:
    """Set the caller's own limits (a tenant can cap itself; global and provider limits are the operator's)."""
    with session_scope() as s:
        name = s.get_one(Tenant, tenant).name
        budget = budgets.set_budget(s, "tenant", name, body.monthly_limit, body.hourly_limit)
        return budgets.status(s, [budget])[0]
