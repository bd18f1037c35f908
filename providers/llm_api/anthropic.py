"""Anthropic's Messages API (POST /v1/messages), spoken directly over HTTP.

Its differences from the OpenAI dialect are handled here: the key goes in ``x-api-key`` with an
``anthropic-version`` header, system messages become the top-level ``system`` field (the API
refuses a "system" role), ``max_tokens`` is mandatory, temperature is capped at 1, and the answer
is a list of content blocks with ``input_tokens``/``output_tokens`` usage.
"""

from __future__ import annotations

from typing import Any, ClassVar

from providers.base import PermanentProviderError
from providers.llm_api.base import Body, ModelAPIProvider

# Anthropic's stop reasons in the OpenAI vocabulary the normalized result uses.
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
           "refusal": "content_filter"}


class AnthropicProvider(ModelAPIProvider):
    default_base_url: ClassVar[str] = "https://api.anthropic.com"
    default_key_env: ClassVar[str] = "ANTHROPIC_API_KEY"
    health_path: ClassVar[str] = "/v1/models"

    def __init__(self, name: str, config: dict[str, Any] | None = None) -> None:
        super().__init__(name, config)
        self.api_version = str(self.config.get("anthropic_version", "2023-06-01"))
        if self.base_url.endswith("/v1"):  # paths below carry /v1 themselves
            self.base_url = self.base_url[: -len("/v1")]

    def auth_headers(self, key: str | None) -> dict[str, str]:
        headers = {"anthropic-version": self.api_version}
        if key:
            headers["x-api-key"] = key
        return headers

    def chat_request(self, model: str, messages: list[dict[str, str]], spec: dict[str, Any]) -> tuple[str, Body]:
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        # Anthropic knows only user and assistant turns; tool output is shown to the model as user input.
        turns = [{"role": "assistant" if m["role"] == "assistant" else "user", "content": m["content"]}
                 for m in messages if m["role"] != "system"]
        if not turns:
            raise PermanentProviderError(f"{self.name}: Anthropic needs at least one non-system message")
        body: Body = {"model": model, "max_tokens": int(spec.get("max_tokens") or 256), "messages": turns}
        if system:
            body["system"] = system
        if spec.get("temperature") is not None:
            body["temperature"] = min(1.0, float(spec["temperature"]))
        return "/v1/messages", body

    def parse_chat(self, payload: Body, model: str) -> Body:
        blocks = payload.get("content") or []
        text = "".join(str(b.get("text", "")) for b in blocks if isinstance(b, dict) and b.get("type") == "text")
        usage = payload.get("usage") or {}
        # Cache writes and reads are input too; charging them at the input price errs on the safe side for budgets.
        prompt = sum(int(usage.get(k) or 0) for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
        completion = int(usage.get("output_tokens") or 0)
        stop = payload.get("stop_reason")
        return {
            "text": text,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            "model": payload.get("model") or model,
            "finish_reason": _FINISH.get(str(stop), stop),
        }
