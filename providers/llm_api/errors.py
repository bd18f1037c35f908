"""Turning an API's answer or a transport failure into the provider error tree, without secrets.

The split decides what the orchestrator does next: transient errors fail the job over to another
offer, permanent ones fail it with the API's own explanation. Rate limits are handled by the
caller (they start a cooldown) before anything here is consulted.
"""

from __future__ import annotations

import re
from typing import Any

import httpx

from providers.base import PermanentProviderError, ProviderError, TransientProviderError

# Key shapes APIs echo back in error messages (often partly masked): OpenAI/OpenRouter "sk-…",
# Anthropic "sk-ant-…", Groq "gsk_…", Google "AIza…", and bearer tokens in general.
_KEY_LIKE = re.compile(r"(?:\bsk-[\w\-*.]{4,}|\bgsk_[\w*]{4,}|\bAIza[\w\-]{10,}|(?i:bearer)\s+\S+)")
# Statuses where the same request may well succeed later or elsewhere.
_TRANSIENT_4XX = {408, 409, 425}


def scrub(text: str, secret: str | None) -> str:
    """``text`` with the key (and anything shaped like a key) replaced, so it is safe to log and store."""
    if secret:
        text = text.replace(secret, "***")
    return _KEY_LIKE.sub("***", text)


def api_message(response: httpx.Response, secret: str | None, limit: int = 300) -> str:
    """The API's own explanation of an error (``error.message`` in both OpenAI and Anthropic shapes), scrubbed."""
    try:
        payload: Any = response.json()
    except ValueError:
        payload = response.text
    if isinstance(payload, list) and payload:  # Gemini's OpenAI endpoint wraps errors in a list
        payload = payload[0]
    message: Any = payload
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        message = (error.get("message") or error) if isinstance(error, dict) else error
    text = " ".join(str(message or response.reason_phrase or "").split())
    return scrub(text, secret)[:limit] or f"HTTP {response.status_code}"


def status_error(name: str, key_env: str | None, response: httpx.Response, secret: str | None) -> ProviderError:
    """The error for a non-2xx answer other than 429 (and 402, which also cools the provider down)."""
    status = response.status_code
    if status == 401:
        if not key_env:
            return PermanentProviderError(f"{name}: the API requires a key (401) but no api_key_env is configured")
        return PermanentProviderError(f"{name}: the API key in ${key_env} was rejected (401)")
    detail = api_message(response, secret)
    if status == 403:
        where = f"the API key in ${key_env}" if key_env else "the API"
        return PermanentProviderError(f"{name}: {where} is not allowed to do this (403): {detail}")
    if status >= 500 or status in _TRANSIENT_4XX:
        return TransientProviderError(f"{name}: API error {status}: {detail}")
    return PermanentProviderError(f"{name}: the API rejected the request ({status}): {detail}")


def transport_error(name: str, exc: httpx.HTTPError, timeout: float) -> TransientProviderError:
    """A request that got no answer: worth trying elsewhere. Only the exception's type is kept (its text may hold URLs)."""
    if isinstance(exc, httpx.TimeoutException):
        return TransientProviderError(f"{name}: no answer within {timeout:g}s ({type(exc).__name__})")
    return TransientProviderError(f"{name}: API unreachable ({type(exc).__name__})")
