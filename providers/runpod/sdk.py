"""The ``runpod`` SDK, imported lazily and driven with one provider's settings at a time.

The SDK keeps its API key and serverless base URL in module globals, reads the GraphQL host from
``RUNPOD_API_BASE_URL`` on every call, hard-codes a 30 s GraphQL timeout, throws the GraphQL HTTP
status away, and configures root logging when imported. Everything that touches those globals is
here: ``using`` sets them from one provider's config under a process-wide lock, and a thin stand-in
for ``requests`` inside ``runpod.api.graphql`` applies our timeout and remembers the HTTP status.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from providers.base import PermanentProviderError

API_BASE_ENV = "RUNPOD_API_BASE_URL"
# Loggers `import runpod` touches: the root (basicConfig) and three it forces to WARNING.
_TOUCHED_LOGGERS = ("urllib3", "paramiko", "uvicorn")

_import_lock = threading.Lock()
_call_lock = threading.RLock()
_local = threading.local()
_runpod: Any = None  # the runpod module, typed loosely: its globals are set at run time


@dataclass(frozen=True)
class ApiSettings:
    api_key: str = field(repr=False)
    api_base_url: str
    endpoint_base_url: str
    timeout: float


def load_runpod() -> Any:
    """Import the SDK once, without its logging side effects, and fit the GraphQL transport."""
    global _runpod
    with _import_lock:
        if _runpod is None:
            module = _import_quietly()
            graphql: Any = importlib.import_module("runpod.api.graphql")
            if not isinstance(graphql.requests, _GraphQLTransport):
                graphql.requests = _GraphQLTransport(graphql.requests)
            _runpod = module
    return _runpod


def _import_quietly() -> Any:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in _TOUCHED_LOGGERS}
    try:
        import runpod
    except ImportError as exc:
        raise PermanentProviderError("the RunPod provider needs the runpod SDK: pip install 'gpufleet[runpod]'") from exc
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, old in levels.items():
            logging.getLogger(name).setLevel(old)
    return runpod


class _GraphQLTransport:
    """Stands in for ``requests`` inside ``runpod.api.graphql``: the same ``post``, with the calling
    provider's timeout instead of the SDK's fixed 30 s, remembering the status the SDK ignores.
    Outside ``using`` it passes everything through unchanged."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def post(self, url: str, **kwargs: Any) -> Any:
        timeout = getattr(_local, "timeout", None)
        if timeout is not None:
            kwargs["timeout"] = timeout
        response = self._real.post(url, **kwargs)
        _local.last_http = (response.status_code, response.headers.get("Retry-After"))
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def last_http() -> tuple[int, str | None] | None:
    """(status, Retry-After) of this thread's last GraphQL response inside ``using``."""
    return getattr(_local, "last_http", None)


@contextmanager
def using(settings: ApiSettings) -> Iterator[Any]:
    """The SDK with its globals set to ``settings`` for the duration; restored afterwards.
    Serialised process-wide, because the globals are shared by every thread."""
    runpod = load_runpod()
    with _call_lock:
        saved = (runpod.api_key, runpod.endpoint_url_base, os.environ.get(API_BASE_ENV))
        runpod.api_key = settings.api_key
        runpod.endpoint_url_base = settings.endpoint_base_url
        os.environ[API_BASE_ENV] = settings.api_base_url
        _local.timeout, _local.last_http = settings.timeout, None
        try:
            yield runpod
        finally:
            runpod.api_key, runpod.endpoint_url_base = saved[0], saved[1]
            if saved[2] is None:
                os.environ.pop(API_BASE_ENV, None)
            else:
                os.environ[API_BASE_ENV] = saved[2]
            _local.timeout = None
