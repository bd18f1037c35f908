"""An emulator of a self-hosted model server (llama.cpp / vLLM / Ollama with our transcription
shim) that checks gpufleet's HMAC signatures, for the pool adapters' tests.

Routes: ``POST /v1/chat/completions`` (OpenAI shape, output from ``providers.sandbox.models``),
``POST /v1/audio/transcriptions`` (JSON ``{"audio_url", "model", "language", "duration_seconds",
"response_format"}``; with ``"verbose_json"`` the answer is OpenAI's verbose shape — language named in
English words, ``duration``, segments with id/seek/start/end/text/tokens/… — else, or with
``verbose_json=False``, ``{text, model, language, duration}``),
``GET /health`` and ``GET /v1/models``. With a secret, every request must be signed
(``providers.pools.signing``): unsigned, tampered, stale or replayed requests get 401.

Tests steer it with methods: ``fail_next`` (the next N requests answer 500/429/…), ``set_latency``,
``hold``/``release_held`` (work requests wait at a gate, to observe them in flight), ``down``/``up``.
It keeps a request log and counts requests in flight (and the most seen at once).
``python -m tests.emulators.pool_server --secret s`` runs it from a shell.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from providers.pools.signing import SignatureError, Verifier
from providers.sandbox import models as fake_models
from providers.transcription import WHISPER_LANGUAGES
from tests.emulators.server import LoopbackServer

DEFAULT_SECRET = "pool-test-secret-7c1e"
WORK_PATHS = ("/v1/chat/completions", "/v1/audio/transcriptions")


@dataclass
class _Fault:
    status: int
    remaining: int
    paths: list[str] | None


class PoolServer(LoopbackServer):
    """One pool endpoint on a loopback port. Use as a context manager."""

    def __init__(self, secret: str | None = DEFAULT_SECRET, models: list[str] | None = None, *,
                 latency: float = 0.0, health_endpoint: bool = True, transcription_usage: str = "tokens",
                 verbose_json: bool = True, max_skew_seconds: float = 300, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.secret = secret
        self.models = list(models or [])
        self.health_endpoint = health_endpoint
        self.transcription_usage = transcription_usage  # "tokens", "duration" or "none"
        self.verbose_json = verbose_json  # False: a shim that ignores response_format and answers text only
        self.verifier = Verifier(secret, max_skew_seconds) if secret else None
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.host = host
        self.port = port
        self._latency = latency
        self._faults: list[_Fault] = []
        self._gate = threading.Event()
        self._gate.set()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._server = None
        self.up()

    def __enter__(self) -> PoolServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._gate.set()
        self.down()

    # --- steering --------------------------------------------------------------------------------

    def fail_next(self, count: int = 1, status: int = 500, paths: list[str] | None = None) -> None:
        """The next ``count`` requests (to ``paths``, default any) answer ``status``."""
        with self._lock:
            self._faults.append(_Fault(status, count, paths))

    def set_latency(self, seconds: float) -> None:
        """Work requests take this long before answering (a slow or overloaded GPU)."""
        self._latency = seconds

    def hold(self) -> None:
        """Work requests wait until ``release_held``."""
        self._gate.clear()

    def release_held(self) -> None:
        self._gate.set()

    def wait_in_flight(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until ``count`` requests are being served; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.in_flight >= count:
                return True
            time.sleep(0.01)
        return False

    def work_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] in WORK_PATHS]

    # --- serving ---------------------------------------------------------------------------------

    def _fault_for(self, path: str) -> int | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and (fault.paths is None or path in fault.paths):
                    fault.remaining -= 1
                    return fault.status
        return None

    def _answer(self, method: str, path: str, raw: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        status = self._fault_for(path)
        if status is not None:
            return status, {"error": {"message": "injected fault"}}
        if self.verifier is not None:
            try:
                self.verifier.verify(method, path, raw, headers)
            except SignatureError as exc:
                return 401, {"error": {"message": f"signature rejected: {exc.reason}"}}
        if method == "GET" and path == "/health" and self.health_endpoint:
            return 200, {"status": "ok"}
        if method == "GET" and path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}
        if method != "POST" or path not in WORK_PATHS:
            return 404, {"error": {"message": f"no route {method} {path}"}}
        if "json" not in headers.get("content-type", headers.get("Content-Type", "")):
            return 415, {"error": {"message": "send a JSON body"}}
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return 400, {"error": {"message": "body is not JSON"}}
        model = str(body.get("model") or "")
        if self.models and model and model not in self.models:
            return 404, {"error": {"message": f"model {model!r} not found"}}
        self._gate.wait()
        if self._latency:
            time.sleep(self._latency)
        if path == "/v1/chat/completions":
            return 200, self._chat(body, model)
        return self._transcription(body, model or (self.models[0] if self.models else "whisper"))

    def _chat(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        out = fake_models.complete(model, fake_models.prompt_text(body), int(body.get("max_tokens", 256)))
        return {"id": "chatcmpl-pool", "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]}, "finish_reason": "stop"}],
                "usage": out["usage"]}

    def _transcription(self, body: dict[str, Any], model: str) -> tuple[int, dict[str, Any]]:
        if not body.get("audio_url"):
            return 400, {"error": {"message": "audio_url is required"}}
        out = fake_models.transcribe(model, str(body["audio_url"]), float(body.get("duration_seconds") or 10.0),
                                     body.get("language"))
        answer: dict[str, Any] = {"text": out["text"], "model": model, "language": out["language"],
                                  "duration": out["duration_seconds"]}
        if self.verbose_json and body.get("response_format") == "verbose_json":  # as OpenAI and Whisper servers answer
            answer.update(task="transcribe", language=WHISPER_LANGUAGES.get(out["language"], out["language"]),
                          segments=[{"id": i, "seek": 0, "start": seg["start"], "end": seg["end"], "text": " " + seg["text"],
                                     "tokens": list(range(50364, 50364 + len(seg["text"].split()))), "temperature": 0.0,
                                     "avg_logprob": -0.25, "compression_ratio": 1.4, "no_speech_prob": 0.01}
                                    for i, seg in enumerate(out["segments"])])
        if self.transcription_usage == "tokens":
            answer["usage"] = {"type": "tokens", "input_tokens": 0, "output_tokens": out["usage"]["total_tokens"],
                               "total_tokens": out["usage"]["total_tokens"]}
        elif self.transcription_usage == "duration":
            answer["usage"] = {"type": "duration", "seconds": math.ceil(out["duration_seconds"])}
        return 200, answer

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def _serve(self, method: str) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = dict(self.headers.items())
                with outer._lock:
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    status, payload = outer._answer(method, self.path, raw, headers)
                finally:
                    with outer._lock:
                        outer.in_flight -= 1
                outer.requests.append({"method": method, "path": self.path, "headers": headers, "body": raw,
                                       "status": status})
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test): nothing to answer

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--secret", default=None, help="shared secret; unsigned requests are accepted without one")
    parser.add_argument("--model", action="append", default=[], help="a served model (repeatable; none = any)")
    args = parser.parse_args()
    server = PoolServer(secret=args.secret, models=args.model, port=args.port)
    print(f"pool emulator on {server.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":
    main()
