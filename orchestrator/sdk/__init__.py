from orchestrator.sdk.client import BatchResult, Client
from orchestrator.sdk.errors import (
    APIError,
    AuthError,
    ConflictError,
    ConnectionFailed,
    GpufleetClientError,
    NotFoundError,
    PayloadTooLarge,
    ValidationError,
    WaitTimeout,
)

__all__ = ["APIError", "AuthError", "BatchResult", "Client", "ConflictError", "ConnectionFailed",
           "GpufleetClientError", "NotFoundError", "PayloadTooLarge", "ValidationError", "WaitTimeout"]
