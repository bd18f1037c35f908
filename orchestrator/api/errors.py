"""Error responses: one shape, {"error": message, "detail": [...]}, never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from orchestrator.errors import Conflict, GpufleetError, InvalidInput, InvalidTransition, NotFound

log = logging.getLogger(__name__)

_STATUS = {NotFound: 404, Conflict: 409, InvalidTransition: 409}

# Discriminated unions put the tag into error locations ("body", "inference", "spec", ...).
_TAGS = {"inference", "transcription", "training", "distillation", "command"}


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "function-after", "function-before"}


def _field(loc: tuple[object, ...]) -> str:
    # Union members appear in locations as type names ("list[str]", "str"): not fields.
    parts = [str(p) for p in loc if p not in ("body", "query", "path")
             and str(p).split("[")[0] not in _TYPE_NAMES]
    if parts and parts[0] in _TAGS:
        parts = parts[1:]
    if len(parts) > 2 and parts[0] == "jobs" and parts[2] in _TAGS:
        del parts[2]
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        merged: dict[str, list[str]] = {}
        for e in exc.errors():
            field = "kind" if e["type"].startswith("union_tag") else _field(tuple(e["loc"]))
            reason = str(e["msg"]).removeprefix("Value error, ")
            if reason not in merged.setdefault(field, []):
                merged[field].append(reason)
        detail = [{"field": field, "reason": " or ".join(reasons)} for field, reasons in merged.items()]
        first = detail[0] if detail else {"field": "body", "reason": "invalid"}
        return JSONResponse(status_code=422, content={"error": f"{first['field']}: {first['reason']}", "detail": detail})

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"error": exc.detail}, headers=exc.headers)

    @app.exception_handler(InvalidInput)
    async def _invalid_input(_: Request, exc: InvalidInput) -> JSONResponse:
        return JSONResponse(status_code=422, content={"error": str(exc),
                                                      "detail": [{"field": exc.field, "reason": exc.reason}]})

    @app.exception_handler(GpufleetError)
    async def _known(_: Request, exc: GpufleetError) -> JSONResponse:
        status = next((code for cls, code in _STATUS.items() if isinstance(exc, cls)), 400)
        return JSONResponse(status_code=status, content={"error": str(exc)})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(status_code=500, content={"error": f"internal error ({type(exc).__name__})"})
