"""Every RunPod call the adapter makes goes through ``Api``: the SDK with this provider's settings,
a bounded retry with backoff (the SDK retries nothing over https), and errors mapped to ours."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from requests.adapters import HTTPAdapter

from providers.base import PermanentProviderError
from providers.runpod import sdk
from providers.runpod.errors import Failure, classify, scrub

log = logging.getLogger(__name__)
T = TypeVar("T")


class Api:
    """One provider's view of RunPod: GraphQL (pods) and serverless endpoints."""

    def __init__(self, settings: sdk.ApiSettings | None, *, retry_budget: float, max_attempts: int,
                 missing_key: str = "") -> None:
        self.settings = settings
        self.retry_budget = retry_budget
        self.max_attempts = max(1, max_attempts)
        self._missing_key = missing_key
        self._endpoints: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _settings(self, timeout: float | None) -> sdk.ApiSettings:
        if self.settings is None:
            raise PermanentProviderError(self._missing_key)
        return self.settings if timeout is None else replace(self.settings, timeout=timeout)

    def graphql(self, action: str, call: Callable[[Any], T], *, safe_to_repeat: bool = True,
                timeout: float | None = None, retries: bool = True) -> T:
        """``call(runpod)`` with the SDK's globals set for us, retried while that is safe and in budget."""
        settings = self._settings(timeout)

        def attempt() -> T:
            with sdk.using(settings) as runpod:
                try:
                    return call(runpod)
                except Exception as exc:  # classified; classify() re-raises what it does not know
                    raise _Classified(classify(exc, action, safe_to_repeat=safe_to_repeat, http=sdk.last_http(),
                                               timeout=settings.timeout)) from None

        return self._retrying(attempt, retries)

    def serverless(self, endpoint_id: str, action: str, call: Callable[[Any], T], *, safe_to_repeat: bool,
                   timeout: float | None = None, retries: bool = True) -> T:
        """``call(client)`` with the SDK's serverless client for ``endpoint_id`` (a ``RunPodClient``)."""
        settings = self._settings(timeout)
        client = self._client(endpoint_id)

        def attempt() -> T:
            try:
                return call(client)
            except Exception as exc:  # classified; classify() re-raises what it does not know
                raise _Classified(classify(exc, action, safe_to_repeat=safe_to_repeat, timeout=settings.timeout)) from None

        return self._retrying(attempt, retries)

    def request_timeout(self, timeout: float | None = None) -> float:
        return self._settings(timeout).timeout

    def _client(self, endpoint_id: str) -> Any:
        """The SDK's client for one endpoint, built once. Its base URL and key are copied at creation;
        its urllib3 retries (mounted only for http://) are removed so tests see production behaviour."""
        with self._lock:
            client = self._endpoints.get(endpoint_id)
            if client is None:
                settings = self._settings(None)
                with sdk.using(settings) as runpod:
                    client = runpod.Endpoint(endpoint_id, api_key=settings.api_key).rp_client
                client.endpoint_url_base = settings.endpoint_base_url.rstrip("/")
                for prefix in ("http://", "https://"):
                    client.rp_session.mount(prefix, HTTPAdapter(max_retries=0))
                self._endpoints[endpoint_id] = client
            return client

    def _retrying(self, attempt: Callable[[], T], retries: bool) -> T:
        deadline = time.monotonic() + self.retry_budget
        for number in range(1, self.max_attempts + 1):
            try:
                return attempt()
            except _Classified as classified:
                failure = classified.failure
                delay = failure.retry_after if failure.retry_after is not None else min(2.0, 0.25 * 2 ** (number - 1))
                if not (retries and failure.retryable) or number == self.max_attempts \
                        or time.monotonic() + delay > deadline:
                    raise self._scrubbed(failure) from None
                log.info("RunPod call failed (%s); retrying in %.2fs", self._scrubbed(failure), delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _scrubbed(self, failure: Failure) -> Exception:
        secret = self.settings.api_key if self.settings else None
        text = str(failure.error)
        if secret and secret in text:
            failure.error.args = (scrub(text, secret), *failure.error.args[1:])
        return failure.error


class _Classified(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(str(failure.error))
        self.failure = failure
