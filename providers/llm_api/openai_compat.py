"""Any API speaking OpenAI's dialect: OpenAI, OpenRouter, Groq, Together, Gemini's OpenAI-compatible
endpoint, a self-hosted vLLM… — only ``base_url`` and the key differ. Chat completions for inference;
``/audio/transcriptions`` (multipart upload of the fetched audio, ``verbose_json`` with segment
timestamps, normalised by ``providers.transcription``) for transcription models priced ``per_minute``."""

from __future__ import annotations

from typing import Any, ClassVar

from providers.base import TransientProviderError
from providers.llm_api.audio import fetch_audio
from providers.llm_api.base import Body, ModelAPIProvider
from providers.transcription import language_code, transcription_result


class OpenAICompatibleProvider(ModelAPIProvider):
    default_base_url: ClassVar[str] = "https://api.openai.com/v1"
    default_key_env: ClassVar[str] = "OPENAI_API_KEY"
    health_path: ClassVar[str] = "/models"
    supported_kinds: ClassVar[frozenset[str]] = frozenset({"inference", "transcription"})

    def __init__(self, name: str, config: dict[str, Any] | None = None) -> None:
        super().__init__(name, config)
        # OpenAI's reasoning models refuse "max_tokens" and want "max_completion_tokens".
        self.max_tokens_param = str(self.config.get("max_tokens_param", "max_tokens"))

    def auth_headers(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    def chat_request(self, model: str, messages: list[dict[str, str]], spec: dict[str, Any]) -> tuple[str, Body]:
        body: Body = {"model": model, "messages": messages, self.max_tokens_param: int(spec.get("max_tokens") or 256)}
        if spec.get("temperature") is not None:
            body["temperature"] = float(spec["temperature"])
        if spec.get("logprobs"):
            body["logprobs"] = True
        return "/chat/completions", body

    def parse_chat(self, payload: Body, model: str) -> Body:
        choice = (payload.get("choices") or [{}])[0]
        usage = payload.get("usage") or {}
        prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        return {
            "text": (choice.get("message") or {}).get("content") or "",
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": int(usage.get("total_tokens") or prompt + completion)},
            "model": payload.get("model") or model,
            "finish_reason": choice.get("finish_reason"),
            **_mean_logprob(choice),
        }

    def transcribe(self, model: str, spec: dict[str, Any], timeout: float) -> Body:
        filename, audio = fetch_audio(str(spec.get("audio_url") or ""), timeout, self.name)
        # verbose_json carries the detected language, the audio's length (what the API bills) and timed
        # segments, which subtitles need; plain json has only the text.
        form = {"model": model, "response_format": "verbose_json", "timestamp_granularities[]": "segment"}
        if language := language_code(spec.get("language")):  # the API wants ISO 639-1: "en", not "english"
            form["language"] = language
        response = self._request("POST", "/audio/transcriptions", None, timeout,
                                 files={"file": (filename, audio)}, form=form)
        try:
            payload = response.json()
            text = str(payload["text"])
        except (ValueError, TypeError, KeyError):
            raise TransientProviderError(f"{self.name}: unreadable transcription from the API") from None
        # Without a reported duration the job's own figure, else where the last segment ends, prices the minutes.
        return dict(transcription_result(payload, model=model, spec=spec, usage={"total_tokens": len(text.split())}))


def _mean_logprob(choice: Body) -> Body:
    """The answer's mean token log-probability, when the API returned them (``logprobs: true``)."""
    tokens = ((choice.get("logprobs") or {}).get("content") or []) if isinstance(choice.get("logprobs"), dict) else []
    values = [float(t["logprob"]) for t in tokens if isinstance(t, dict) and isinstance(t.get("logprob"), int | float)]
    return {"logprob": round(sum(values) / len(values), 6)} if values else {}
