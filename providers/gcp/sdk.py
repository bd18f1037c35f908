"""The google-cloud-compute plumbing both GCP adapters share: clients built lazily (the SDK is slow
to import), one call wrapper with bounded retries, and one translation of SDK errors into our
error tree.

Every call passes its own ``retry`` and ``timeout``: the generated clients otherwise retry
503s for up to 600 s inside one call, which would stall a worker. Every client is built with
the same ``client_options``, including the ZoneOperationsClient we poll operations with —
``Operation.result()`` would poll through a client of its own, aimed at the real Google host.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from providers.base import NoCapacity, PermanentProviderError, ProviderError, TransientProviderError

T = TypeVar("T")

# Reasons and operation error codes that mean "no capacity here": try another zone or offer.
CAPACITY_CODES = frozenset({
    "ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", "RESOURCE_POOL_EXHAUSTED",
    "QUOTA_EXCEEDED", "quotaExceeded", "STOCKOUT", "RESOURCE_EXHAUSTED", "resourceExhausted",
})
_RATE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})


def _compute() -> Any:
    try:
        from google.cloud import compute_v1
    except ImportError:  # pragma: no cover - depends on the install
        raise PermanentProviderError("gcp: google-cloud-compute is not installed (pip install google-cloud-compute)") from None
    return compute_v1


class Compute:
    """Lazily built Compute Engine clients for one project, all aimed at the same endpoint."""

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        self.name = name
        self.project = str(config.get("project") or "")
        if not self.project:
            raise ValueError(f"{name}: 'project' is required")
        self.api_endpoint = str(config.get("api_endpoint") or "") or None
        self.anonymous = bool(config.get("anonymous", False))
        self.credentials_file = str(config.get("credentials_file") or "") or None
        self.request_timeout = float(config.get("request_timeout", 30))
        self.retry_seconds = float(config.get("retry_seconds", 5))
        if self.request_timeout <= 0 or self.retry_seconds < 0:
            raise ValueError(f"{name}: request_timeout must be > 0 and retry_seconds >= 0")
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def types(self) -> Any:
        """The ``google.cloud.compute_v1`` module (message types)."""
        return _compute()

    def _credentials(self) -> Any:
        if self.anonymous:
            from google.auth.credentials import AnonymousCredentials

            return AnonymousCredentials()
        if self.credentials_file:
            from google.oauth2 import service_account

            try:
                return service_account.Credentials.from_service_account_file(
                    self.credentials_file, scopes=["https://www.googleapis.com/auth/cloud-platform"])
            except (OSError, ValueError) as exc:
                raise PermanentProviderError(
                    f"{self.name}: cannot read credentials_file {self.credentials_file}: {type(exc).__name__}") from None
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        try:
            credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        except DefaultCredentialsError:
            raise PermanentProviderError(
                f"{self.name}: no Google credentials found (set GOOGLE_APPLICATION_CREDENTIALS, run "
                "'gcloud auth application-default login', or set credentials_file)") from None
        return credentials

    def client(self, kind: str) -> Any:
        """``instances``, ``operations`` or ``groups``: one client each, built on first use."""
        with self._lock:
            if kind not in self._clients:
                compute_v1 = _compute()
                from google.api_core.client_options import ClientOptions

                cls = {"instances": compute_v1.InstancesClient, "operations": compute_v1.ZoneOperationsClient,
                       "groups": compute_v1.InstanceGroupManagersClient}[kind]
                options = ClientOptions(api_endpoint=self.api_endpoint) if self.api_endpoint else None
                self._clients[kind] = cls(credentials=self._credentials(), transport="rest", client_options=options)
            return self._clients[kind]

    def retry(self) -> Any:
        """A short retry of transient answers, for calls safe to repeat (gets, lists, deletes, named inserts)."""
        import requests
        from google.api_core import exceptions, retry

        if self.retry_seconds <= 0:
            return None
        transient = (exceptions.ServiceUnavailable, exceptions.InternalServerError, exceptions.BadGateway,
                     exceptions.GatewayTimeout, requests.ConnectionError)

        def worth_retrying(exc: BaseException) -> bool:
            # A 503 that says the zone is out of capacity is an answer, not a blip: the next offer may have it.
            return isinstance(exc, transient) and not reasons_of(exc) & CAPACITY_CODES

        return retry.Retry(predicate=worth_retrying, initial=0.1, maximum=1.0, multiplier=2.0, timeout=self.retry_seconds)

    def call(self, kind: str, what: str, fn: Callable[[Any], T], *, capacity: bool = False) -> T:
        """Run ``fn(client)``; SDK errors come out as ProviderErrors, except NotFound and Conflict, which
        each caller reads in its own way (gone, already created)."""
        from google.api_core import exceptions

        try:
            return fn(self.client(kind))
        except (exceptions.NotFound, exceptions.Conflict):
            raise
        except Exception as exc:  # noqa: BLE001 - every SDK and transport error is translated here
            raise translate(exc, f"{self.name} {what}", capacity=capacity) from None


def reasons_of(exc: Any) -> set[str]:
    """The ``errors[].reason`` (and ErrorInfo reason) Google attached to an error answer."""
    found = {str(e.get("reason")) for e in getattr(exc, "errors", None) or [] if isinstance(e, dict) and e.get("reason")}
    reason = getattr(exc, "reason", None)
    return found | ({str(reason)} if reason else set())


def _first_line(text: str, limit: int = 300) -> str:
    return (str(text).strip().splitlines() or [""])[0][:limit]


def _message(exc: Any) -> str:
    """Google's message without the request URL api_core puts in front of it."""
    message = str(getattr(exc, "message", "") or exc)
    head, sep, tail = message.partition(": ")
    return _first_line(tail if sep and head.split(" ", 1)[0] in ("GET", "POST", "DELETE", "PUT", "PATCH") else message)


def translate(exc: BaseException, what: str, *, capacity: bool = False) -> ProviderError:
    """One SDK or transport error as our error; ``capacity`` marks calls that rent (an insert)."""
    import requests
    from google.api_core import exceptions
    from google.auth import exceptions as auth_exceptions

    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, exceptions.RetryError) and exc.cause is not None:
        return translate(exc.cause, what, capacity=capacity)
    if isinstance(exc, auth_exceptions.InvalidOperation | exceptions.Unauthorized):
        # InvalidOperation: a 401 made google-auth try to refresh credentials that cannot be (anonymous ones).
        return PermanentProviderError(f"{what}: Google rejected the credentials (401 Unauthenticated); "
                                      "check the service account or application-default login")
    if isinstance(exc, auth_exceptions.DefaultCredentialsError):
        return PermanentProviderError(f"{what}: no Google credentials found")
    if isinstance(exc, auth_exceptions.RefreshError):
        return PermanentProviderError(f"{what}: Google credentials could not be refreshed ({type(exc).__name__})")
    if isinstance(exc, requests.RequestException | auth_exceptions.TransportError | ConnectionError | TimeoutError):
        return TransientProviderError(f"{what}: Compute API unreachable ({type(exc).__name__})")
    if not isinstance(exc, exceptions.GoogleAPICallError):
        return TransientProviderError(f"{what} failed unexpectedly: {type(exc).__name__}: {_first_line(str(exc))}")
    reasons, message = reasons_of(exc), _message(exc)
    if reasons & CAPACITY_CODES or "ZONE_RESOURCE_POOL_EXHAUSTED" in message:
        return NoCapacity(f"{what}: no capacity ({', '.join(sorted(reasons & CAPACITY_CODES)) or 'exhausted'}): {message}")
    if isinstance(exc, exceptions.Forbidden):
        if reasons & _RATE_LIMIT_REASONS:
            return TransientProviderError(f"{what}: rate limited by the Compute API (403)")
        return PermanentProviderError(f"{what}: permission denied (403): {message}")
    if isinstance(exc, exceptions.TooManyRequests):
        if capacity:
            return NoCapacity(f"{what}: resources exhausted (429): {message}")
        return TransientProviderError(f"{what}: rate limited by the Compute API (429)")
    if isinstance(exc, exceptions.ServerError):
        return TransientProviderError(f"{what}: Compute API unavailable ({exc.code}): {message}")
    return PermanentProviderError(f"{what} was refused ({exc.code}): {message}")


def operation_failure(op: Any, what: str) -> ProviderError | None:
    """The error of a finished operation as our error, or None if it succeeded."""
    errors = list(getattr(getattr(op, "error", None), "errors", None) or [])
    if not errors:
        return None
    codes = {str(e.code) for e in errors}
    detail = _first_line("; ".join(f"{e.code}: {e.message}" for e in errors))
    if codes & CAPACITY_CODES:
        return NoCapacity(f"{what}: no capacity: {detail}")
    status = int(getattr(op, "http_error_status_code", 0) or 0)
    if status >= 500 or status == 429:
        return TransientProviderError(f"{what} failed ({status}): {detail}")
    return PermanentProviderError(f"{what} failed: {detail}")


def wait_for(compute: Compute, zone: str, operation: str, seconds: float, what: str) -> Any | None:
    """Poll a zonal operation with our own ZoneOperationsClient for up to ``seconds``: the finished
    operation, or None if it is still running."""
    deadline = time.monotonic() + seconds
    delay = 0.05
    while True:
        op = compute.call("operations", f"{what} (operation {operation})",
                          lambda c: c.get(project=compute.project, zone=zone, operation=operation,
                                          retry=compute.retry(), timeout=compute.request_timeout))
        if op.status == compute.types.Operation.Status.DONE:
            return op
        if time.monotonic() + delay > deadline:
            return None
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and how long it took in milliseconds (health reports latency)."""
    started = time.monotonic()
    result = fn()
    return result, (time.monotonic() - started) * 1000
