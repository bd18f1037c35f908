"""HTTP client for a self-hosted model server (llama.cpp, vLLM, Ollama, a Whisper server…).

Shared by every adapter that ends in "an HTTP endpoint on GPUs we run" (on-prem pools, AWS
ASG and GCP MIG pools), so that signing, error mapping and response shapes are decided once.

``base_url`` is the server root (``http://gpu-box:8000``); a trailing ``/v1`` is tolerated and
dropped. Endpoints used:

- ``POST /v1/chat/completions``: the OpenAI chat shape.
- ``POST /v1/audio/transcriptions`` with a JSON body ``{"audio_url", "model", "language",
  "duration_seconds", "response_format": "verbose_json"}``: the pool fetches the audio itself. This is
  NOT OpenAI's multipart file upload; pools put a small shim in front of their Whisper server for it.
  The answer is read as OpenAI's verbose_json (``text``, ``language``, ``duration``, timed
  ``segments``; a plain ``{"text"}`` still works, as does faster-whisper's or RunPod's worker's shape)
  and ``usage`` either as tokens or as ``{"type": "duration", "seconds": …}``; it is returned in the
  shape every transcription provider gives (``providers.transcription``).
- ``GET /health``, else ``GET /v1/models`` (Ollama has no /health).

With a secret, every request is signed (see ``signing``). Errors: unreachable, timeouts, 5xx and
429 are ``TransientProviderError`` (try elsewhere or later); 401/403 mean the pool refused our
signature; other 4xx are ``PermanentProviderError``. No message ever contains the secret.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from providers.base import Health, PermanentProviderError, TransientProviderError
from providers.pools import signing
from providers.transcription import language_code, transcription_result

_CHAT_OPTIONS = ("top_p", "stop", "seed", "presence_penalty", "frequency_penalty")


class PoolClient:
    def __init__(self, base_url: str, *, secret: str | None = None, timeout: float = 120.0, name: str = "pool") -> None:
        root = base_url.rstrip("/")
        self.base_url = root[: -len("/v1")] if root.endswith("/v1") else root
        self.name = name
        self.timeout = timeout
        self._secret = secret or None
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PoolClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- operations ------------------------------------------------------------------------------

    def chat(self, spec: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """One chat completion: ``{"text", "usage": {prompt_tokens, completion_tokens, total_tokens}, "model"}``."""
        model = spec.get("model")
        if not model:
            raise PermanentProviderError(f"pool {self.name}: inference jobs need a 'model'")
        messages = spec.get("messages") or [{"role": "user", "content": str(spec.get("prompt", ""))}]
        body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": int(spec.get("max_tokens", 256)),
                                "temperature": float(spec.get("temperature", 0.7))}
        body.update({k: spec[k] for k in _CHAT_OPTIONS if k in spec})
        payload = self._json(self._call("POST", "/v1/chat/completions", body, timeout))
        choices = payload.get("choices") or [{}]
        first = choices[0] if isinstance(choices[0], dict) else {}
        text = (first.get("message") or {}).get("content") or first.get("text") or ""
        return {"text": str(text), "usage": _chat_usage(payload.get("usage")), "model": str(payload.get("model") or model)}

    def transcribe(self, spec: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """One transcription of the audio at ``audio_url``, as every provider answers one: ``{"text",
        "language", "duration_seconds", "segments", "model", "usage"}`` plus the subtitles the spec's
        ``formats`` ask for (``providers.transcription.transcription_result``)."""
        audio_url = spec.get("audio_url")
        if not audio_url:
            raise PermanentProviderError(f"pool {self.name}: transcription jobs need an 'audio_url'")
        body: dict[str, Any] = {k: spec[k] for k in ("model", "duration_seconds", "prompt") if spec.get(k) is not None}
        if language := language_code(spec.get("language")):  # Whisper servers want "en", not "english"
            body["language"] = language
        # verbose_json carries the timed segments subtitles need; a shim that ignores it still answers the text.
        body.update(audio_url=audio_url, response_format="verbose_json")
        payload = self._json(self._call("POST", "/v1/audio/transcriptions", body, timeout))
        model = str(payload.get("model") or spec.get("model") or "")
        return dict(transcription_result(payload, model=model, spec=spec,
                                         usage=_transcription_usage(payload.get("usage"))))

    def health(self) -> Health:
        """Whether the server answers, and how fast. Never raises: an unhealthy pool is an answer."""
        started = time.monotonic()
        try:
            response = self._send("GET", "/health", None, None)
            path = "/health"
            if response.status_code in (404, 405):
                response, path = self._send("GET", "/v1/models", None, None), "/v1/models"
        except (TransientProviderError, PermanentProviderError) as exc:
            return Health(ok=False, detail=str(exc))
        ms = (time.monotonic() - started) * 1000
        if response.status_code in (401, 403):
            return Health(ok=False, detail=self._rejected(response.status_code))
        if response.status_code != 200:
            return Health(ok=False, detail=f"pool {self.name}: GET {path} answered {response.status_code}")
        return Health(ok=True, detail=f"pool {self.name}: ok in {ms:.0f} ms (GET {path})")

    # --- transport -------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict[str, Any] | None, timeout: float | None) -> httpx.Response:
        response = self._send(method, path, body, timeout)
        status = response.status_code
        if status in (401, 403):
            raise PermanentProviderError(self._rejected(status))
        if status == 429 or status >= 500:
            raise TransientProviderError(f"pool {self.name}: {method} {path} answered {status}{self._detail(response)}")
        if status >= 400:
            raise PermanentProviderError(f"pool {self.name} refused the request: {method} {path} answered "
                                         f"{status}{self._detail(response)}")
        return response

    def _send(self, method: str, path: str, body: dict[str, Any] | None, timeout: float | None) -> httpx.Response:
        content = json.dumps(body).encode() if body is not None else b""
        headers = {"content-type": "application/json"} if body is not None else {}
        request = self._http.build_request(method, path, content=content or None, headers=headers,
                                           timeout=timeout if timeout is not None else self.timeout)
        if self._secret:
            request.headers.update(signing.sign(self._secret, method, request.url.raw_path.decode(), content))
        try:
            return self._http.send(request)
        except httpx.TimeoutException:
            raise TransientProviderError(f"pool {self.name}: {method} {path} timed out") from None
        except httpx.HTTPError as exc:
            raise TransientProviderError(f"pool {self.name} unreachable: {type(exc).__name__}") from None

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        """A 200 that is not a JSON object is a broken server, not a bad job."""
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise TransientProviderError(f"pool {self.name}: answer is not a JSON object")
        return payload

    def _rejected(self, status: int) -> str:
        return f"pool {self.name} rejected our signature/credentials ({status}): check that its shared secret matches ours"

    def _detail(self, response: httpx.Response) -> str:
        text = " ".join(response.text.split())[:200]
        if self._secret:
            text = text.replace(self._secret, "***")
        return f": {text}" if text else ""


def _number(value: object) -> float | None:
    """A float from what a server sent, or None if it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _chat_usage(raw: object) -> dict[str, int]:
    """Token counts as the OpenAI shape names them; zeros when the server did not say."""
    usage = raw if isinstance(raw, dict) else {}
    prompt, completion = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": _int(usage.get("total_tokens")) or prompt + completion}


def _transcription_usage(raw: object) -> dict[str, float]:
    """Tokens if the server counts them (``total_tokens``), else the audio ``seconds`` it billed, else nothing."""
    usage = raw if isinstance(raw, dict) else {}
    tokens = _int(usage.get("total_tokens")) or _int(usage.get("input_tokens")) + _int(usage.get("output_tokens"))
    if tokens:
        return {"total_tokens": tokens}
    seconds = _number(usage.get("seconds"))
    if usage.get("type") == "duration" and seconds is not None:
        return {"seconds": seconds}
    return {}
