"""SDK exceptions → our error tree, with what the retry loop needs to know about each.

The SDK raises a zoo: ``RuntimeError`` for a serverless 401, ``requests.HTTPError`` for other
serverless statuses, ``QueryError`` for any GraphQL body with ``errors`` (whatever the status),
``AuthenticationError`` for a GraphQL 401, ``JSONDecodeError`` for an HTML error page, and
``ValueError`` for an unknown GPU type. Messages never carry the API key: ``scrub`` removes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import requests
from urllib3.exceptions import NewConnectionError

from providers.base import NoCapacity, PermanentProviderError, ProviderError, TransientProviderError

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
# Statuses that say the request was not acted on, so even a create may be sent again.
NOT_PROCESSED = frozenset({429, 503})
# RunPod's capacity refusals ("There are no longer any instances available with the requested
# specifications…"); the wording is unverified, so match loosely.
_CAPACITY = re.compile(
    r"no longer any instances|no (gpu )?instances|not enough (free )?gpus|no (available )?machines|"
    r"instances? (are )?not available|out of stock|insufficient capacity|bid .*(too low|lower)|outbid",
    re.IGNORECASE)
_AUTH = re.compile(r"\b401\b|unauthori[sz]ed|api[ _]key", re.IGNORECASE)


class ApiError(TransientProviderError):
    """A RunPod call that failed in a way worth retrying later, with the facts callers branch on."""

    def __init__(self, message: str, *, status: int | None = None, unknown_outcome: bool = False) -> None:
        super().__init__(message)
        self.status = status
        # The request may have reached RunPod and taken effect (read timeout, dropped connection).
        self.unknown_outcome = unknown_outcome


@dataclass
class Failure:
    error: ProviderError
    retryable: bool = False
    retry_after: float | None = None


def scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def classify(exc: BaseException, action: str, *, safe_to_repeat: bool, http: tuple[int, str | None] | None = None,
             timeout: float | None = None) -> Failure:
    """What ``exc`` (raised by the SDK while doing ``action``) means for us."""
    from runpod import error as rp_error  # the SDK is loaded by now: only it raises these

    if isinstance(exc, rp_error.AuthenticationError) or (isinstance(exc, RuntimeError) and _AUTH.search(str(exc))):
        return Failure(PermanentProviderError(f"RunPod refused the API key (missing or invalid) while {action}"))
    if isinstance(exc, rp_error.QueryError):
        return _query_error(str(exc.message or exc), action, http, safe_to_repeat)
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return _http_error(exc.response, action, safe_to_repeat)
    if isinstance(exc, requests.exceptions.JSONDecodeError):
        status = http[0] if http else None
        return Failure(ApiError(f"RunPod answered {action} with a non-JSON body (HTTP {status})", status=status,
                                unknown_outcome=status not in NOT_PROCESSED),
                       _retryable(status, safe_to_repeat), _retry_after(http))
    if isinstance(exc, requests.RequestException):
        return _transport_error(exc, action, safe_to_repeat, timeout)
    if isinstance(exc, ValueError) and "No GPU found" in str(exc):
        return Failure(NoCapacity(f"RunPod does not know that GPU type ({action})"))
    if isinstance(exc, (KeyError, TypeError, IndexError, ValueError)):
        return Failure(ApiError(f"RunPod gave an unexpected answer while {action}: {type(exc).__name__}: {exc}"[:300],
                                unknown_outcome=True))
    raise exc


def _query_error(message: str, action: str, http: tuple[int, str | None] | None, safe: bool) -> Failure:
    status = http[0] if http else None
    if _CAPACITY.search(message):
        return Failure(NoCapacity(f"RunPod has no capacity for this ({action}): {message}"))
    if status in (401, 403):
        return Failure(PermanentProviderError(f"RunPod refused the API key while {action} (HTTP {status})"))
    return Failure(ApiError(f"RunPod API error while {action}: {message}"[:500], status=status,
                            unknown_outcome=status is not None and status >= 500 and status not in NOT_PROCESSED),
                   _retryable(status, safe), _retry_after(http))


def _http_error(response: requests.Response, action: str, safe: bool) -> Failure:
    status = response.status_code
    if status in (401, 403):
        return Failure(PermanentProviderError(f"RunPod refused the API key while {action} (HTTP {status})"))
    detail = _body_detail(response)
    if status in (400, 422):
        return Failure(PermanentProviderError(f"RunPod rejected the request while {action} (HTTP {status}): {detail}"))
    return Failure(ApiError(f"RunPod answered HTTP {status} while {action}: {detail}", status=status,
                            unknown_outcome=status >= 500 and status not in NOT_PROCESSED),
                   _retryable(status, safe), _retry_after((status, response.headers.get("Retry-After"))))


def _transport_error(exc: requests.RequestException, action: str, safe: bool, timeout: float | None) -> Failure:
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    never_sent = isinstance(exc, requests.ConnectTimeout) or isinstance(reason, NewConnectionError)
    if never_sent:
        message = f"cannot connect to the RunPod API while {action}"
    elif isinstance(exc, requests.Timeout):
        message = f"the RunPod API did not answer within {timeout or '?'}s while {action}"
    else:
        message = f"the connection to the RunPod API failed while {action} ({type(exc).__name__})"
    return Failure(ApiError(message, unknown_outcome=not never_sent), never_sent or safe)


def _retryable(status: int | None, safe: bool) -> bool:
    """Worth sending again: always when RunPod says it did nothing, else only if repeating is harmless."""
    if status in NOT_PROCESSED:
        return True
    return safe and (status is None or status in RETRYABLE_STATUS or status >= 500)


def _body_detail(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return (response.text or response.reason or "")[:200]
    if isinstance(body, dict):
        return str(body.get("error") or body.get("message") or body)[:200]
    return str(body)[:200]


def _retry_after(http: tuple[int, str | None] | None) -> float | None:
    """Retry-After in seconds; RunPod's may be fractional (which crashes the SDK's own retries)."""
    if not http or not http[1]:
        return None
    try:
        return max(0.0, float(http[1]))
    except ValueError:
        return None
