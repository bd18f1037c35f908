"""botocore exceptions → our error tree.

EC2 answers capacity shortages with HTTP 500 codes (``InsufficientInstanceCapacity``), so the
status alone cannot tell "try another offer" from "AWS is having a bad minute": the error code
decides first. Messages name the code and the operation, never credentials: AWS does not echo
keys, but a proxy or emulator might, so every server text goes through ``scrub``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from providers.base import NoCapacity, PermanentProviderError, ProviderError, TransientProviderError

CAPACITY_CODES = frozenset({
    "InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity", "SpotMaxPriceTooLow",
    "MaxSpotInstanceCountExceeded", "InstanceLimitExceeded", "VcpuLimitExceeded", "Unsupported",
})
AUTH_CODES = frozenset({
    "AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "SignatureDoesNotMatch", "OptInRequired",
    "Blocked", "ExpiredToken", "RequestExpired", "AccessDenied", "AccessDeniedException", "MissingAuthenticationToken",
    "UnrecognizedClientException", "IncompleteSignature",
})
THROTTLE_CODES = frozenset({
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException", "RequestThrottled",
    "ServiceUnavailable", "Unavailable", "InternalError", "InternalFailure", "ServiceUnavailableException",
})
NOT_FOUND_CODES = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})


class ApiError(TransientProviderError):
    """A call that failed in a way worth retrying (throttled, 5xx, unreachable)."""


@dataclass
class Failure:
    error: ProviderError
    code: str = ""
    retryable: bool = False

    @property
    def not_found(self) -> bool:
        return self.code in NOT_FOUND_CODES


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def classify(exc: BaseException, action: str, secrets: Iterable[str] = ()) -> Failure:
    """What ``exc`` (raised by botocore while doing ``action``) means for us; other exceptions re-raise."""
    from botocore import exceptions as bx

    secrets = list(secrets)
    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error") or {}
        code = str(error.get("Code") or "")
        status = int((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        message = scrub(str(error.get("Message") or ""), secrets).splitlines()[0][:300] if error.get("Message") else ""
        return _client_error(code, status, message, action)
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError | bx.NoAuthTokenError):
        return Failure(PermanentProviderError(
            f"aws: no usable credentials while {action} (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE or an instance role; never the provider config)"), "NoCredentials")
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError):
        return Failure(ApiError(f"aws endpoint unreachable while {action} ({type(exc).__name__})"), retryable=True)
    if isinstance(exc, bx.ReadTimeoutError | bx.ConnectionClosedError | bx.HTTPClientError):
        return Failure(ApiError(f"aws connection failed while {action} ({type(exc).__name__})"), retryable=True)
    if isinstance(exc, bx.BotoCoreError):
        return Failure(ApiError(f"aws client error while {action}: {scrub(str(exc), secrets)[:300]}"))
    raise exc


def _client_error(code: str, status: int, message: str, action: str) -> Failure:
    detail = f"{code}: {message}" if message else code or f"HTTP {status}"
    if code in CAPACITY_CODES:
        return Failure(NoCapacity(f"aws has no capacity for this while {action} ({detail})"), code)
    if code in AUTH_CODES or status in (401, 403):
        return Failure(PermanentProviderError(
            f"aws refused the credentials or permissions while {action} ({code or status}); "
            "check the boto3 credential chain and the IAM policy"), code)
    if code in THROTTLE_CODES or status == 429 or status >= 500:
        return Failure(ApiError(f"aws is unavailable or throttling while {action} ({detail})"), code, retryable=True)
    if code in NOT_FOUND_CODES:
        return Failure(ApiError(f"aws does not know that instance while {action} ({code})"), code)
    return Failure(PermanentProviderError(f"aws rejected the request while {action} ({detail})"), code)
