"""Local emulators of two hosted model APIs, for the ``providers.llm_api`` adapters' tests:
OpenAI's chat completions (``/v1/chat/completions``, ``/v1/models``, Bearer auth) and Anthropic's
Messages API (``/v1/messages``, ``/v1/models``, ``x-api-key`` + ``anthropic-version``).

Answers are deterministic so tests can assert exact costs: the reply echoes the last user message
("echo: …", cut to ``max_tokens`` words), prompt tokens are the words in every message (system
included) and completion tokens the words of the reply. Faults are injected with ``fail`` (the
next N requests answer a status, optionally with Retry-After and a message in which ``{key}``
becomes the key the client sent — to prove adapters scrub echoed keys) and ``lag`` (answer late).
Every request is kept in ``request_log``; the error bodies follow each API's real shape.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler
from typing import Any, Self

from providers.transcription import WHISPER_LANGUAGES
from tests.emulators.server import LoopbackServer

Reply = tuple[int, Any, dict[str, str]]

OPENAI_MODELS = ["gpt-4o-mini", "gpt-4o", "llama-3.1-8b-instant"]
ANTHROPIC_MODELS = ["claude-3-5-haiku-20241022", "claude-sonnet-4-20250514"]


def _form(raw: bytes, content_type: str) -> dict[str, Any]:
    """A multipart/form-data body: file fields as bytes, the rest as text."""
    message = BytesParser(policy=policy.default).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
    fields: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        fields[str(name)] = payload if part.get_filename() else payload.decode()
    return fields


def count_tokens(text: str) -> int:
    """The emulators' tokenizer: one token per whitespace-separated word."""
    return len(text.split())


def echo(messages: list[dict[str, Any]], max_tokens: int) -> tuple[str, bool]:
    """The reply to a chat, and whether ``max_tokens`` cut it short."""
    last = next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), "")
    words = f"echo: {last}".split()
    return " ".join(words[:max_tokens]), len(words) > max_tokens


class _ModelAPIEmulator(LoopbackServer):
    """Lifecycle, fault injection and the request log; subclasses answer in their API's dialect."""

    def __init__(self, api_key: str, models: list[str], port: int = 0, host: str = "127.0.0.1") -> None:
        self.api_key = api_key
        self.models = list(models)
        self.host = host
        self.port = port
        self.request_log: list[dict[str, Any]] = []
        # Files served without auth at /media/<name>: the audio a transcription job points at.
        self.media: dict[str, bytes] = {}
        self._faults: list[dict[str, Any]] = []
        self._lags: list[dict[str, Any]] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._server = None

    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.down()

    # --- test controls -----------------------------------------------------------------------

    def fail(self, status: int, count: int = 1, retry_after: str | float | None = None, message: str | None = None,
             paths: list[str] | None = None) -> None:
        """The next ``count`` requests (whose path starts with one of ``paths``, if given) answer ``status``."""
        with self._lock:
            self._faults.append({"status": int(status), "remaining": int(count), "retry_after": retry_after,
                                 "message": message, "paths": paths})

    def lag(self, seconds: float, count: int = 1, paths: list[str] | None = None) -> None:
        """The next ``count`` matching requests are answered only after ``seconds``."""
        with self._lock:
            self._lags.append({"seconds": float(seconds), "remaining": int(count), "paths": paths})

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self._lags.clear()
            self.request_log.clear()

    def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        """Logged requests ({method, path, headers (lower-case names), body}), optionally for one path."""
        with self._lock:
            return [r for r in self.request_log if path is None or r["path"] == path]

    # --- dialect (subclasses) ----------------------------------------------------------------

    def authorize(self, headers: dict[str, str]) -> Reply | None:
        """An error reply if the request's credentials are wrong, else None."""
        raise NotImplementedError

    def error(self, status: int, message: str) -> Any:
        raise NotImplementedError

    def route(self, method: str, path: str, body: dict[str, Any]) -> Reply:
        raise NotImplementedError

    # --- serving -----------------------------------------------------------------------------

    def _take(self, queue: list[dict[str, Any]], path: str) -> dict[str, Any] | None:
        for item in queue:
            if item["remaining"] > 0 and (not item["paths"] or any(path.startswith(p) for p in item["paths"])):
                item["remaining"] -= 1
                return item
        return None

    def serve_file(self, name: str, data: bytes) -> str:
        """Serve ``data`` at ``/media/<name>``; returns its URL."""
        with self._lock:
            self.media[name] = data
        return f"{self.url}/media/{name}"

    def handle(self, method: str, path: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[Reply, float]:
        path = path.split("?", 1)[0]
        if method == "GET" and path.startswith("/media/"):
            data = self.media.get(path.removeprefix("/media/"))
            return ((200, data, {"Content-Type": "audio/wav"}) if data is not None
                    else (404, {"error": {"message": "no such file"}}, {})), 0.0
        with self._lock:
            self.request_log.append({"method": method, "path": path, "headers": headers, "body": body, "at": time.time()})
            lag = self._take(self._lags, path)
            hold = lag["seconds"] if lag else 0.0
            if denied := self.authorize(headers):
                return denied, hold
            if fault := self._take(self._faults, path):
                sent_key = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
                message = (fault["message"] or f"injected {fault['status']}").replace("{key}", sent_key)
                extra = {"Retry-After": str(fault["retry_after"])} if fault["retry_after"] is not None else {}
                return (fault["status"], self.error(fault["status"], message), extra), hold
            return self.route(method, path, body), hold

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _serve(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                ctype = self.headers.get("content-type") or ""
                try:
                    body = _form(raw, ctype) if ctype.startswith("multipart/form-data") else json.loads(raw) if raw else {}
                except ValueError:
                    body = {}
                headers = {k.lower(): v for k, v in self.headers.items()}
                (status, payload, extra), hold = outer.handle(self.command, self.path, headers,
                                                             body if isinstance(body, dict) else {})
                if hold:
                    time.sleep(hold)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for key, value in {"Content-Type": "application/json", **extra}.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up waiting (timeouts are part of the tests)
                    pass

            do_GET = do_POST = _serve  # noqa: N815

        return Handler


class OpenAIEmulator(_ModelAPIEmulator):
    """OpenAI's API on 127.0.0.1; point adapters at ``emu.url + "/v1"``."""

    def __init__(self, api_key: str = "sk-test-openai", models: list[str] | None = None, port: int = 0) -> None:
        super().__init__(api_key, models or OPENAI_MODELS, port)

    def authorize(self, headers: dict[str, str]) -> Reply | None:
        sent = headers.get("authorization", "")
        if sent == f"Bearer {self.api_key}":
            return None
        token = sent.removeprefix("Bearer ")
        masked = f"{token[:3]}***{token[-4:]}" if len(token) > 8 else "***"
        # Like OpenAI, the 401 names part of the key it was given.
        return 401, {"error": {"message": f"Incorrect API key provided: {masked}.", "type": "invalid_request_error",
                               "param": None, "code": "invalid_api_key"}}, {}

    def error(self, status: int, message: str) -> Any:
        kind = {429: "rate_limit_exceeded", 500: "server_error", 503: "server_error"}.get(status, "invalid_request_error")
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}

    def route(self, method: str, path: str, body: dict[str, Any]) -> Reply:
        if method == "GET" and path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": m, "object": "model", "created": 1700000000,
                                                     "owned_by": "emulator"} for m in self.models]}, {}
        if method == "POST" and path == "/v1/chat/completions":
            return self._chat(body)
        if method == "POST" and path == "/v1/audio/transcriptions":
            return self._transcribe(body)
        return 404, self.error(404, f"Invalid URL ({method} {path})"), {}

    def _transcribe(self, body: dict[str, Any]) -> Reply:
        """Like Whisper's endpoint: a multipart upload; the audio is taken as 16 kHz 16-bit mono, so
        its length is bytes / 32000 seconds, and the "words" are derived from the bytes.

        ``verbose_json`` answers as OpenAI does: ``language`` as an English name ("english"), the
        ``duration``, and ``segments`` of up to 10 words with start/end times spread evenly over the
        audio (left out when ``timestamp_granularities[]`` asks for words only); ``words`` when asked."""
        audio = body.get("file")
        if not isinstance(audio, bytes) or not audio:
            return 400, self.error(400, "file: an audio file upload is required"), {}
        if body.get("model") not in self.models:
            return 404, self.error(404, f"The model `{body.get('model')}` does not exist"), {}
        duration = round(len(audio) / 32000, 3)
        words = [f"word{(audio[i % len(audio)] + i) % 97}" for i in range(max(1, int(duration * 2.5)))]
        text = " ".join(words)
        payload: dict[str, Any] = {"text": text}
        if body.get("response_format") == "verbose_json":
            hint = str(body.get("language") or "en").lower()
            payload.update(task="transcribe", language=WHISPER_LANGUAGES.get(hint, hint), duration=duration)
            granularities = str(body.get("timestamp_granularities[]") or "segment")
            per_word = duration / len(words)
            if "segment" in granularities:
                payload["segments"] = [
                    {"id": n, "seek": 0, "start": round(i * per_word, 3),
                     "end": round(min(duration, (i + 10) * per_word), 3), "text": " " + " ".join(words[i:i + 10]),
                     "tokens": [], "temperature": 0.0, "avg_logprob": -0.2, "compression_ratio": 1.3,
                     "no_speech_prob": 0.01}
                    for n, i in enumerate(range(0, len(words), 10))]
            if "word" in granularities:
                payload["words"] = [{"word": w, "start": round(i * per_word, 3), "end": round((i + 1) * per_word, 3)}
                                    for i, w in enumerate(words)]
        return 200, payload, {}

    def _chat(self, body: dict[str, Any]) -> Reply:
        model = body.get("model")
        if model not in self.models:
            return 404, self.error(404, f"The model `{model}` does not exist or you do not have access to it."), {}
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return 400, self.error(400, "'messages' must be a non-empty array"), {}
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 4096)
        text, cut = echo(messages, max_tokens)
        prompt = sum(count_tokens(str(m.get("content", ""))) for m in messages)
        completion = count_tokens(text)
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "length" if cut else "stop"}
        if body.get("logprobs"):  # deterministic: every token at -0.1 (a confident answer)
            choice["logprobs"] = {"content": [{"token": w, "logprob": -0.1} for w in text.split()]}
        return 200, {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                     "model": model, "choices": [choice],
                     "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                               "total_tokens": prompt + completion}}, {}


class AnthropicEmulator(_ModelAPIEmulator):
    """Anthropic's API on 127.0.0.1; point adapters at ``emu.url``."""

    def __init__(self, api_key: str = "sk-ant-test", models: list[str] | None = None, port: int = 0) -> None:
        super().__init__(api_key, models or ANTHROPIC_MODELS, port)

    def authorize(self, headers: dict[str, str]) -> Reply | None:
        if headers.get("x-api-key") != self.api_key:
            return 401, self.error(401, "invalid x-api-key"), {}
        if not headers.get("anthropic-version"):
            return 400, self.error(400, "anthropic-version: header is required"), {}
        return None

    def error(self, status: int, message: str) -> Any:
        kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}

    def route(self, method: str, path: str, body: dict[str, Any]) -> Reply:
        if method == "GET" and path == "/v1/models":
            data = [{"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"} for m in self.models]
            return 200, {"data": data, "has_more": False, "first_id": self.models[0], "last_id": self.models[-1]}, {}
        if method == "POST" and path == "/v1/messages":
            return self._messages(body)
        return 404, self.error(404, f"Not found: {method} {path}"), {}

    def _messages(self, body: dict[str, Any]) -> Reply:
        model = body.get("model")
        if model not in self.models:
            return 404, self.error(404, f"model: {model}"), {}
        if not isinstance(body.get("max_tokens"), int):
            return 400, self.error(400, "max_tokens: Field required"), {}
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return 400, self.error(400, "messages: Field required"), {}
        for m in messages:
            if m.get("role") not in ("user", "assistant"):
                return 400, self.error(400, f"messages: Unexpected role \"{m.get('role')}\". The Messages API accepts a "
                                            "top-level `system` parameter, not \"system\" as an input message role."), {}
        temperature = body.get("temperature")
        if temperature is not None and not 0 <= float(temperature) <= 1:
            return 400, self.error(400, "temperature: Input should be less than or equal to 1"), {}
        system = body.get("system") or ""
        if isinstance(system, list):
            system = " ".join(str(b.get("text", "")) for b in system)
        text, cut = echo(messages, body["max_tokens"])
        prompt = count_tokens(str(system)) + sum(count_tokens(str(m.get("content", ""))) for m in messages)
        return 200, {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "model": model,
                     "content": [{"type": "text", "text": text}], "stop_reason": "max_tokens" if cut else "end_turn",
                     "stop_sequence": None, "usage": {"input_tokens": prompt, "output_tokens": count_tokens(text)}}, {}
