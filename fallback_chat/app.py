"""The HTTP face of the fallback chat service: OpenAI's chat-completions shape, so gpufleet (and any
OpenAI client) can use it as its last-resort ``openai_api`` provider with nothing special-cased.

Every error, ours or the upstream's, is an OpenAI-style ``{"error": {"message", "type", ...}}`` body,
so the OpenAI SDK raises its usual typed exceptions (AuthenticationError, BadRequestError, …).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fallback_chat.backends import BackendError, ChatBackend, ChatRequest, build_backend
from fallback_chat.settings import FallbackSettings, load_settings

log = logging.getLogger(__name__)


def _error(status: int, message: str, kind: str, *, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    """The first problem, as OpenAI reports it: a 400 naming the parameter (``messages.0.role``)."""
    err = exc.errors()[0]
    loc = [str(part) for part in err.get("loc", ()) if part != "body"]
    if err.get("type") == "json_invalid":
        return _error(400, "the request body is not valid JSON", "invalid_request_error")
    param = ".".join(loc) or None
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return _error(400, f"{param}: {message}" if param else message, "invalid_request_error", param=param)


def create_app(settings: FallbackSettings | None = None) -> FastAPI:
    """Build the app. Configuration errors (no backend, a named key variable that is unset, a missing
    llama-cpp-python) raise ``ConfigError`` here, so the service fails at start rather than per request."""
    settings = settings or load_settings()
    api_key = settings.secret("api_key_env")
    backend = build_backend(settings)
    if api_key is None:
        log.warning("FALLBACK_API_KEY_ENV is not set: the chat endpoints accept requests without a key")
    log.info("fallback chat serving %s", backend.describe())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await backend.aclose()

    app = FastAPI(title="gpufleet fallback chat", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.backend = backend
    app.state.settings = settings

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise BackendError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                               "invalid_request_error", code="invalid_api_key")

    @app.exception_handler(BackendError)
    async def _backend_error(_: Request, exc: BackendError) -> JSONResponse:
        headers = {"Retry-After": exc.retry_after} if exc.retry_after else {}
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected %s while answering", type(exc).__name__, exc_info=exc)
        return _error(500, "internal error in the fallback chat service", "server_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness for Fly's checks. It does not call the upstream API: restarting this machine would
        not fix an upstream outage, and chat requests already report it as 503."""
        return {"status": "ok", **backend.describe()}

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "gpufleet-fallback"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(body: ChatRequest) -> dict[str, Any]:
        started = time.monotonic()
        result = await _complete(backend, body)
        usage = result.get("usage") or {}
        log.info("chat backend=%s model=%s prompt_tokens=%s completion_tokens=%s in %.2fs", backend.name,
                 body.model, usage.get("prompt_tokens"), usage.get("completion_tokens"), time.monotonic() - started)
        return result

    return app


async def _complete(backend: ChatBackend, body: ChatRequest) -> dict[str, Any]:
    try:
        return await backend.complete(body)
    except BackendError as exc:
        log.warning("chat backend=%s model=%s failed: %d %s", backend.name, body.model, exc.status, exc.message)
        raise
