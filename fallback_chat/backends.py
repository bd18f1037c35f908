"""What answers a chat request: a small local model, a deterministic stand-in, or an upstream API.

Every backend takes a validated ``ChatRequest`` and returns an OpenAI ``chat.completion`` body, or
raises ``BackendError`` carrying the HTTP status and OpenAI-style error the client should see.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from abc import ABC, abstractmethod
from typing import Any, Literal

import anyio.to_thread
import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fallback_chat.settings import ConfigError, FallbackSettings

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ requests


class ContentPart(BaseModel):
    """One part of a multi-part message; only text parts mean anything to the local backends."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat request we check; other fields are kept and forwarded upstream."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None

    @field_validator("stream")
    @classmethod
    def _no_streaming(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("streaming is not supported by this service; send stream=false")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only n=1 is supported")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def token_budget(self, default: int, limit: int) -> int:
        """The reply length to use: what was asked (or the default), capped so one request cannot
        hold the service's single small CPU (or the upstream bill) for long."""
        return min(self.max_completion_tokens or self.max_tokens or default, limit)


# ------------------------------------------------------------------------------------------- results


class BackendError(Exception):
    """A failure to show the client as ``{"error": {"message", "type", ...}}`` with ``status``."""

    def __init__(self, status: int, message: str, kind: str = "server_error", *, param: str | None = None,
                 code: str | None = None, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def whitespace_tokens(text: str) -> int:
    """Token count of the stand-in: whitespace-separated words. Honest about what it measures."""
    return len(text.split())


def completion_body(model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


# ------------------------------------------------------------------------------------------ backends


class ChatBackend(ABC):
    name: str

    def __init__(self, settings: FallbackSettings) -> None:
        self.settings = settings

    @abstractmethod
    async def complete(self, request: ChatRequest) -> dict[str, Any]:
        """Answer ``request`` with a chat.completion body, or raise ``BackendError``."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook; most backends hold nothing to release
        """Release connections or memory at shutdown."""

    def describe(self) -> dict[str, Any]:
        """What /health shows: enough to see which backend a deployment actually runs."""
        return {"backend": self.name, "model": self.settings.model_name}

    def _budget(self, request: ChatRequest) -> int:
        return request.token_budget(self.settings.default_max_tokens, self.settings.max_tokens_limit)


class StandInBackend(ChatBackend):
    """A deterministic reply built from the last user message, for tests and demos: same prompt,
    same answer, and token counts that add up (whitespace words)."""

    name = "stand-in"

    async def complete(self, request: ChatRequest) -> dict[str, Any]:
        prompt = next((m.text() for m in reversed(request.messages) if m.role == "user"), "")
        words = ["stand-in", "reply:", *prompt.split()]
        budget = self._budget(request)
        finish_reason = "length" if len(words) > budget else "stop"
        text = " ".join(words[:budget])
        for stop in request.stop_list():
            if stop and stop in text:
                text, finish_reason = text[: text.index(stop)].rstrip(), "stop"
        prompt_tokens = sum(whitespace_tokens(m.text()) for m in request.messages)
        return completion_body(self.settings.model_name, text, finish_reason, prompt_tokens, whitespace_tokens(text))


class LlamaCppBackend(ChatBackend):
    """A small GGUF model on the CPU through llama-cpp-python. One generation at a time: the model is
    not thread-safe and the VM has one shared core, so concurrent requests queue on a lock."""

    name = "llama-cpp"

    def __init__(self, settings: FallbackSettings) -> None:
        super().__init__(settings)
        path = settings.model_path
        if path is None or not path.is_file():
            raise ConfigError(f"FALLBACK_MODEL_PATH: no model file at {path}")
        try:
            from llama_cpp import Llama
        except ImportError:
            raise ConfigError("FALLBACK_MODEL_PATH is set but llama-cpp-python is not installed: "
                              "pip install 'gpufleet[fallback]'") from None
        log.info("loading %s (n_ctx=%d)", path.name, settings.n_ctx)
        self._llm = Llama(model_path=str(path), n_ctx=settings.n_ctx, n_threads=settings.n_threads, verbose=False)
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model_file": self.settings.model_path.name if self.settings.model_path else None}

    async def complete(self, request: ChatRequest) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(self._complete, request)

    def _complete(self, request: ChatRequest) -> dict[str, Any]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in request.messages]
        options: dict[str, Any] = {"max_tokens": self._budget(request), "stop": request.stop_list() or None}
        for name in ("temperature", "top_p", "seed"):
            if (value := getattr(request, name)) is not None:
                options[name] = value
        try:
            with self._lock:
                out = self._llm.create_chat_completion(messages=messages, **options)
        except ValueError as exc:  # llama-cpp raises ValueError when the prompt exceeds n_ctx
            raise BackendError(400, f"messages: {exc}", "invalid_request_error", param="messages") from None
        except Exception as exc:
            log.exception("local model failed")
            raise BackendError(500, f"the local model failed: {type(exc).__name__}") from None
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return completion_body(self.settings.model_name, choice["message"].get("content") or "",
                               choice.get("finish_reason") or "stop", int(usage.get("prompt_tokens", 0)),
                               int(usage.get("completion_tokens", 0)))


class UpstreamBackend(ChatBackend):
    """Forward to an external OpenAI-compatible API. Its failures become 502 (it answered badly) or
    503 (unreachable, timed out, rate limited: try again later); a request it rejects as invalid is
    the client's 400. The upstream key is only ever put in the Authorization header: it is scrubbed
    from any upstream text we relay and never logged."""

    name = "upstream"

    def __init__(self, settings: FallbackSettings) -> None:
        super().__init__(settings)
        if not settings.upstream_url.startswith(("http://", "https://")):
            raise ConfigError("FALLBACK_UPSTREAM_URL: must be an http(s):// base URL such as https://api.example.com/v1")
        self._key = settings.secret("upstream_key_env")
        url = httpx.URL(settings.upstream_url.rstrip("/"))
        self._where = f"{url.scheme}://{url.host}" + (f":{url.port}" if url.port else "")  # no userinfo, for logs
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self._client = httpx.AsyncClient(base_url=str(url), headers=headers, timeout=settings.upstream_timeout)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "upstream": self._where}

    async def aclose(self) -> None:
        await self._client.aclose()

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "[redacted]") if self._key else text

    async def complete(self, request: ChatRequest) -> dict[str, Any]:
        body = request.model_dump(exclude_none=True)
        body.pop("stream", None)
        if self.settings.upstream_model:
            body["model"] = self.settings.upstream_model
        budget = self._budget(request)
        body["max_completion_tokens" if request.max_completion_tokens else "max_tokens"] = budget
        started = time.monotonic()
        try:
            response = await self._client.post("/chat/completions", json=body)
        except httpx.TimeoutException:
            log.warning("upstream %s timed out", self._where)
            raise BackendError(503, f"the upstream API did not answer within {self.settings.upstream_timeout:g}s",
                               "upstream_unavailable") from None
        except httpx.TransportError as exc:
            log.warning("upstream %s unreachable: %s", self._where, type(exc).__name__)
            raise BackendError(503, f"the upstream API is unreachable ({type(exc).__name__})",
                               "upstream_unavailable") from None
        log.info("upstream %s model=%s status=%d in %.2fs", self._where, body["model"], response.status_code,
                 time.monotonic() - started)
        if response.status_code != 200:
            raise self._error(response)
        try:
            payload = response.json()
        except ValueError:
            payload = None
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not isinstance(payload, dict) or not isinstance(choices, list) or not choices \
                or not isinstance(choices[0], dict):
            raise BackendError(502, "the upstream API answered with an invalid chat.completion body",
                               "upstream_error")
        if not isinstance(payload.get("usage"), dict):
            # Fill the shape clients expect; counted the stand-in's way (whitespace words), not the model's.
            prompt = sum(whitespace_tokens(m.text()) for m in request.messages)
            reply = whitespace_tokens(str((choices[0].get("message") or {}).get("content") or ""))
            payload["usage"] = {"prompt_tokens": prompt, "completion_tokens": reply, "total_tokens": prompt + reply}
        payload.setdefault("object", "chat.completion")
        return dict(payload)

    def _error(self, response: httpx.Response) -> BackendError:
        status = response.status_code
        detail = self._scrub(_error_message(response))
        if status == 429:
            return BackendError(503, f"the upstream API is rate limiting: {detail}", "upstream_unavailable",
                                retry_after=response.headers.get("retry-after"))
        if status in (401, 403):
            # Our credential, not the client's: a server-side misconfiguration.
            return BackendError(502, f"the upstream API rejected this service's credentials (HTTP {status})",
                                "upstream_error")
        if status in (400, 404, 413, 422):
            return BackendError(400, f"the upstream API rejected the request: {detail}", "invalid_request_error")
        return BackendError(502, f"the upstream API failed: HTTP {status}: {detail}", "upstream_error")


def _error_message(response: httpx.Response) -> str:
    """The message of an OpenAI-style error body, else the start of the text, on one line."""
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    text = str(message or response.text or response.reason_phrase)
    return " ".join(text.split())[:300]


def build_backend(settings: FallbackSettings) -> ChatBackend:
    """The backend the settings ask for. "auto" takes the local model when its file exists, else the
    upstream API; a missing model file under "auto" is logged loudly rather than fatal, because a
    last-resort service that is up (forwarding) beats one that crash-loops."""
    choice = settings.backend
    if choice == "auto":
        if settings.model_path is not None and settings.model_path.is_file():
            choice = "llama-cpp"
        elif settings.upstream_url:
            if settings.model_path is not None:
                log.warning("FALLBACK_MODEL_PATH %s does not exist; forwarding to the upstream API instead",
                            settings.model_path)
            choice = "upstream"
        else:
            raise ConfigError("nothing to answer with: set FALLBACK_MODEL_PATH to a GGUF file, "
                              "or FALLBACK_UPSTREAM_URL, or FALLBACK_BACKEND=stand-in")
    if choice == "llama-cpp":
        return LlamaCppBackend(settings)
    if choice == "upstream":
        if not settings.upstream_url:
            raise ConfigError("FALLBACK_BACKEND=upstream needs FALLBACK_UPSTREAM_URL")
        return UpstreamBackend(settings)
    return StandInBackend(settings)
