"""/health (no auth: load balancers call it), /metrics (Prometheus text, behind an API key:
scrape with `authorization: {credentials: <key>}`) and /v1/providers."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import text

from orchestrator.db.engine import session_scope
from orchestrator.distillation.metrics import DistillationCollector
from orchestrator.services import provider_status
from orchestrator.services.metrics import JobCollector
from orchestrator.services.provider_metrics import (
    CapacityCollector,
    ProviderHealthCollector,
    ProviderUsageCollector,
    RoutingCollector,
)

from ..deps import current_tenant

router = APIRouter(tags=["system"])
_registry = CollectorRegistry()
# Every figure is computed from the database at scrape time (docs/architecture.md, "Metrics"); each
# collector declares its names, so a clash between two of them fails at start-up, not in a scrape.
for _collector in (JobCollector(), RoutingCollector(), ProviderHealthCollector(), ProviderUsageCollector(),
                   CapacityCollector(), DistillationCollector()):
    _registry.register(_collector)


def _check_database() -> str:
    try:
        with session_scope() as s:
            s.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"


def _check_broker() -> str:
    from workers.celery_app import get_app

    try:
        with get_app().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"


@router.get("/health", name="health")
def health() -> JSONResponse:
    checks = {"database": _check_database(), "broker": _check_broker()}
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(status_code=200 if ok else 503, content={"status": "ok" if ok else "degraded", **checks})


@router.get("/metrics", name="metrics", dependencies=[Depends(current_tenant)])
def metrics() -> Response:
    return Response(generate_latest(_registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/providers", name="list_providers", dependencies=[Depends(current_tenant)],
            response_model=list[provider_status.ProviderStatus])
def list_providers() -> list[provider_status.ProviderStatus]:
    """Each configured provider: health, how long its health check took, capacity and cheapest prices."""
    return provider_status.status_all()
