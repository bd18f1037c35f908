"""SDK exceptions carry the server's own message, so callers see why, not just a status code."""

from __future__ import annotations

from typing import Any


class GpufleetClientError(Exception):
    """Base of SDK errors."""


class APIError(GpufleetClientError):
    def __init__(self, status_code: int, message: str, detail: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.detail = detail or []


class AuthError(APIError):
    pass


class NotFoundError(APIError):
    pass


class ValidationError(APIError):
    pass


class ConflictError(APIError):
    pass


class PayloadTooLarge(APIError):
    pass


class ConnectionFailed(GpufleetClientError):
    pass


class WaitTimeout(GpufleetClientError, TimeoutError):
    pass


_BY_STATUS: dict[int, type[APIError]] = {401: AuthError, 403: AuthError, 404: NotFoundError, 409: ConflictError,
                                         413: PayloadTooLarge, 422: ValidationError}


def error_for(status_code: int, body: Any) -> APIError:
    message = body.get("error") if isinstance(body, dict) else None
    detail = body.get("detail") if isinstance(body, dict) and isinstance(body.get("detail"), list) else None
    cls = _BY_STATUS.get(status_code, APIError)
    return cls(status_code, message or f"HTTP {status_code}", detail)
