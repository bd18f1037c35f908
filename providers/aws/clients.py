"""boto3 clients per (service, region), built lazily, and one call wrapper with our retries.

botocore's own retries are turned off (``total_max_attempts=1``): EC2 reports capacity shortages as
HTTP 500, which botocore would retry with backoff for nothing, and a worker must never stall
on an unreachable endpoint. We retry throttling, 5xx and connection errors a bounded number
of times; every call we send is safe to repeat (creates carry a ClientToken).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from providers.aws.errors import Failure, classify
from providers.base import PermanentProviderError

log = logging.getLogger(__name__)

_CREDENTIAL_KEYS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "access_key", "secret_key",
                    "secret_access_key", "session_token")


def refuse_credentials(config: dict[str, Any], provider: str) -> None:
    """Keys belong to the boto3 chain (env, profile, role): a config file is easy to leak."""
    found = [k for k in config if k.lower() in _CREDENTIAL_KEYS]
    if found:
        raise ValueError(f"{provider}: credentials do not belong in the provider config ({', '.join(found)}); "
                         "use the environment, an AWS profile or an instance role")


class Clients:
    def __init__(self, *, endpoint_url: str | None, profile: str | None = None, retry: int = 3,
                 max_retry_wait: float = 5.0, connect_timeout: float = 5.0, read_timeout: float = 30.0) -> None:
        self.endpoint_url = endpoint_url or None
        self.profile = profile or None
        self.retry = max(1, retry)
        self.max_retry_wait = max_retry_wait
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._session: Any = None
        self._clients: dict[tuple[str, str, bool], Any] = {}
        self._lock = threading.Lock()

    def _boto_session(self) -> Any:
        if self._session is None:
            try:
                import boto3
            except ImportError:  # pragma: no cover - depends on the install
                raise PermanentProviderError("aws providers need boto3: pip install boto3") from None
            self._session = boto3.session.Session(profile_name=self.profile)
        return self._session

    def client(self, service: str, region: str, *, quick: bool = False) -> Any:
        """A client; ``quick`` ones (health checks) use short timeouts."""
        key = (service, region, quick)
        with self._lock:  # boto3 sessions are not thread-safe while creating clients
            if key not in self._clients:
                from botocore.config import Config

                timeouts = (min(2.0, self.connect_timeout), min(5.0, self.read_timeout)) if quick else (
                    self.connect_timeout, self.read_timeout)
                config = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=timeouts[0],
                                read_timeout=timeouts[1], user_agent_extra="gpufleet")
                self._clients[key] = self._boto_session().client(
                    service, region_name=region, endpoint_url=self.endpoint_url, config=config)
            return self._clients[key]

    def secrets(self) -> list[str]:
        """The resolved credentials, only to scrub them out of messages."""
        try:
            creds = self._boto_session().get_credentials()
            frozen = creds.get_frozen_credentials() if creds is not None else None
        except Exception:  # noqa: BLE001 - scrubbing must never be the thing that fails
            return []
        if frozen is None:
            return []
        return [s for s in (frozen.access_key, frozen.secret_key, frozen.token) if s]

    def call(self, service: str, region: str, operation: str, what: str, *, quick: bool = False,
             attempts: int | None = None, **params: Any) -> Any:
        """``client.operation(**params)``; raises the classified error (see ``failure``) when it gives up."""
        failure = self.attempt(service, region, operation, what, quick=quick, attempts=attempts, **params)
        if isinstance(failure, Failure):
            raise failure.error
        return failure

    def attempt(self, service: str, region: str, operation: str, what: str, *, quick: bool = False,
                attempts: int | None = None, **params: Any) -> Any:
        """Like ``call`` but returns the ``Failure`` instead of raising, for callers that branch on its code."""
        method = getattr(self.client(service, region, quick=quick), operation)
        tries = 1 if quick else (attempts or self.retry)
        for n in range(1, tries + 1):
            try:
                return method(**params)
            except Exception as exc:  # noqa: BLE001 - classify re-raises what is not botocore's
                failure = classify(exc, f"{what} in {region}", self.secrets())
            if not failure.retryable or n == tries:
                return failure
            wait = min(self.max_retry_wait, 0.5 * 2 ** (n - 1))
            log.info("aws: %s failed (%s); retrying in %.1fs", what, failure.error, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")
