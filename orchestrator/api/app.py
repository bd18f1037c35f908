"""The FastAPI application. Routers are thin; services own the logic."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from orchestrator.api import errors
from orchestrator.api.limits import BodySizeLimit
from orchestrator.api.routers import batches, costs, distillation, jobs, openai_compat, reservations, system
from orchestrator.bootstrap import prepare_database
from orchestrator.settings import Settings, get_settings


def _operation_id(route: APIRoute) -> str:
    return route.name


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        prepare_database(settings)
        yield

    app = FastAPI(title="gpufleet", version="0.1.0", lifespan=lifespan, generate_unique_id_function=_operation_id,
                  description="Submit AI jobs; gpufleet places them on the cheapest capacity that fits.")
    app.state.settings = settings
    errors.install(app)
    for router in (jobs.router, batches.router, reservations.router, costs.router, system.router, openai_compat.router,
                   distillation.router):
        app.include_router(router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_payload_bytes)
    return app
